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

// === a real Prometheus ===

/// Debian's `prometheus` binary on a free loopback port, scraping the given Envoy admin
/// addresses (`/stats/prometheus`) every second; killed on drop.
pub struct Prometheus {
    child: Option<std::process::Child>,
    addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
}

impl Prometheus {
    pub fn start(envoy_admins: &[std::net::SocketAddr]) -> Prometheus {
        let dir = std::env::temp_dir().join(format!(
            "meshwasm-prometheus-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let targets: Vec<String> = envoy_admins.iter().map(|a| format!("'{a}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: envoy\n  metrics_path: /stats/prometheus\n  static_configs:\n  - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let port = crate::envoy::free_port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = std::process::Command::new(std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into()))
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start prometheus (apt-get install --no-install-recommends prometheus)");
        let p = Prometheus { child: Some(child), addr, dir };
        let n = envoy_admins.len();
        crate::eventually("prometheus scraping every Envoy (up == 1)", std::time::Duration::from_secs(30), || {
            let r = p.try_query("sum(up)").ok()?;
            let v = r["data"]["result"][0]["value"][1].as_str()?.parse::<f64>().ok()?;
            (v == n as f64).then_some(())
        });
        p
    }

    /// An instant query; `Err` with Prometheus' error for a failed one.
    pub fn try_query(&self, promql: &str) -> Result<serde_json::Value, String> {
        let mut enc = String::new();
        for b in promql.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                enc.push(char::from(b));
            } else {
                enc.push_str(&format!("%{b:02X}"));
            }
        }
        let req = crate::Request::get(&format!("/api/v1/query?query={enc}")).authority(&self.addr.to_string());
        let rsp = crate::client::try_send(self.addr, &req)?;
        let v: serde_json::Value = serde_json::from_slice(&rsp.body).map_err(|e| format!("{e}: {}", rsp.text()))?;
        if v["status"] == "success" {
            Ok(v)
        } else {
            Err(format!("{}: {}", v["errorType"], v["error"]))
        }
    }

    /// The query's result vector as (labels, value) pairs.
    pub fn vector(&self, promql: &str) -> Result<Vec<(serde_json::Value, f64)>, String> {
        let v = self.try_query(promql)?;
        let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
        Ok(result
            .into_iter()
            .map(|r| {
                let value = r["value"][1].as_str().and_then(|s| s.parse::<f64>().ok()).unwrap_or(f64::NAN);
                (r["metric"].clone(), value)
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- prometheus log ---\n{}",
                std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
