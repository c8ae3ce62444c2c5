//! Just enough JSON for a build tool: a strict syntax check (RFC 8259) with line:column
//! errors, and string escaping for the results we write. Semantic checks of plugin configs are
//! done by the filters themselves, inside Envoy (see `test.rs`).

use crate::{bail, Result};

/// Check that `text` is exactly one JSON value (surrounding whitespace allowed).
pub fn check(text: &str) -> Result<()> {
    let mut p = Parser { s: text.as_bytes(), i: 0, depth: 0 };
    p.ws();
    p.value()?;
    p.ws();
    if p.i != p.s.len() {
        return p.err("trailing characters after the JSON value");
    }
    Ok(())
}

/// `s` as a JSON string literal.
pub fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A finite number as JSON (`null` for NaN/inf, which JSON cannot express).
pub fn number(x: f64) -> String {
    if x.is_finite() {
        let r = (x * 1000.0).round() / 1000.0;
        format!("{r}")
    } else {
        "null".to_string()
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn err<T>(&self, what: &str) -> Result<T> {
        let before = self.s.get(..self.i).unwrap_or_default();
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        bail!("{line}:{col}: {what}")
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn lit(&mut self, word: &str) -> Result<()> {
        if self.s.get(self.i..self.i + word.len()) == Some(word.as_bytes()) {
            self.i += word.len();
            Ok(())
        } else {
            self.err(&format!("expected `{word}`"))
        }
    }

    fn value(&mut self) -> Result<()> {
        match self.peek() {
            Some(b'{') => self.container(b'}', true),
            Some(b'[') => self.container(b']', false),
            Some(b'"') => self.string(),
            Some(b't') => self.lit("true"),
            Some(b'f') => self.lit("false"),
            Some(b'n') => self.lit("null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => self.err("expected a JSON value"),
            None => self.err("unexpected end of input"),
        }
    }

    fn container(&mut self, close: u8, object: bool) -> Result<()> {
        self.depth += 1;
        if self.depth > 128 {
            return self.err("nested too deeply");
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(close) {
            self.i += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            if object {
                if self.peek() != Some(b'"') {
                    return self.err("expected a string key");
                }
                self.string()?;
                self.ws();
                if self.peek() != Some(b':') {
                    return self.err("expected `:`");
                }
                self.i += 1;
                self.ws();
            }
            self.value()?;
            self.ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    self.ws();
                }
                Some(c) if c == close => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return self.err(&format!("expected `,` or `{}`", close as char)),
            }
        }
    }

    fn string(&mut self) -> Result<()> {
        self.i += 1;
        loop {
            match self.peek() {
                None => return self.err("unterminated string"),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            let hex = self.s.get(self.i + 1..self.i + 5).unwrap_or_default();
                            if hex.len() != 4 || !hex.iter().all(u8::is_ascii_hexdigit) {
                                return self.err("bad \\u escape");
                            }
                            self.i += 5;
                        }
                        _ => return self.err("bad escape"),
                    }
                }
                Some(c) if c < 0x20 => return self.err("control character in string"),
                Some(_) => self.i += 1,
            }
        }
    }

    fn number(&mut self) -> Result<()> {
        let digits = |p: &mut Self| {
            let start = p.i;
            while matches!(p.peek(), Some(b'0'..=b'9')) {
                p.i += 1;
            }
            p.i - start
        };
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        if self.peek() == Some(b'0') {
            self.i += 1;
        } else if digits(self) == 0 {
            return self.err("expected digits");
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return self.err("expected digits after `.`");
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return self.err("expected exponent digits");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_json() {
        for ok in [
            r#"{"rules":[{"name":"a","fault":{"abort":{"httpStatus":503,"percentage":{"value":0.5e1}}}}],"headerControl":true}"#,
            " [1, -0.25, \"\\u00e9\\n\", null, false, {}] ",
            "0",
        ] {
            assert!(check(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_invalid_json_with_position() {
        for bad in ["{\"a\":1,}", "{a:1}", "[1 2]", "01", "\"abc", "{} x", "", "tru", "{\"a\":1}\n}"] {
            assert!(check(bad).is_err(), "{bad}");
        }
        let e = check("{\n  \"a\": [1,\n  ]\n}").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.starts_with("3:3:"), "{e}");
    }

    #[test]
    fn escapes_strings() {
        assert_eq!(string("a\"b\\c\n\u{1}"), r#""a\"b\\c\n\u0001""#);
        assert_eq!(number(1.23456), "1.235");
        assert_eq!(number(f64::NAN), "null");
    }
}
