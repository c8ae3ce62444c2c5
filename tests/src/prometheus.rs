//! Prometheus on the test side: a parser for the text exposition format Envoy's
//! `/stats/prometheus` writes (the maintained parsers drop `name{} value` lines or mis-split
//! label values with `,` and `=`: see shared notes), and a launcher for Debian's
//! `prometheus` binary.

use std::collections::BTreeMap;

/// One sample: metric name (with `_bucket`/`_sum`/`_count` suffixes as written), labels,
/// value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the text format; comments and malformed lines are skipped (a malformed line is
/// reported by the `Err` of [`parse_line`]).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).filter_map(|l| parse_line(l).ok()).collect()
}

/// Parses one sample line: `name{a="x",b="y\"z"} 12` or `name 12`.
pub fn parse_line(line: &str) -> Result<Sample, String> {
    let line = line.trim();
    let name_end = line.find(['{', ' ']).ok_or_else(|| format!("no value: {line}"))?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let end;
        loop {
            while matches!(chars.peek(), Some((_, ',' | ' '))) {
                chars.next();
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = *i + 1;
                    break;
                }
                None => return Err(format!("unterminated labels: {line}")),
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} without a quoted value: {line}"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err(format!("bad escape: {line}")),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("unterminated value: {line}")),
                }
            }
            labels.insert(key, value);
        }
        rest = &r[end..];
    }
    let value_text = rest.split_whitespace().next().ok_or_else(|| format!("no value: {line}"))?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok(Sample { name, labels, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let s = parse_line(r#"istio_requests_total{route_name="a,b=c",x="q\"z",e=""} 10"#).unwrap();
        assert_eq!(s.name, "istio_requests_total");
        assert_eq!(s.labels["route_name"], "a,b=c");
        assert_eq!(s.labels["x"], "q\"z");
        assert_eq!(s.labels["e"], "");
        assert_eq!(s.value, 10.0);
        let s = parse_line("envoy_server_live{} 1").unwrap();
        assert!(s.labels.is_empty());
        assert_eq!(parse_line("up 1").unwrap().value, 1.0);
        assert_eq!(parse_line(r#"h_bucket{le="+Inf"} 3"#).unwrap().labels["le"], "+Inf");
        assert!(parse_line(r#"x{a="1} 2"#).is_err());
        assert_eq!(parse("# TYPE x counter\nx 1\n\ny{a=\"b\"} 2\n").len(), 2);
    }
}
