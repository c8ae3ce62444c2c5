//! Tag override expressions: the subset of CEL Istio's Telemetry API examples use.
//!
//! - attribute paths: `request.headers['x-user']`, `xds.node.metadata.LABELS.version`,
//!   `xds.cluster_metadata.filter_metadata.istio.services[0].name`,
//!   `filter_state.upstream_peer.service`, `filter_state['wasm.x']`;
//! - literals: `'single'`, `"double"`, integers, `true`, `false`, `null`;
//! - `+` (string concatenation, integer addition), `==`, `!=`, `<`, `<=`, `>`, `>=` (integers,
//!   strings), `&&`, `||`, `!`, `( )`;
//! - the conditional `cond ? a : b`.
//!
//! Parsing happens at configure time; a syntax error rejects the configuration with its
//! position. Evaluation never fails loudly: a missing attribute or a type mismatch yields
//! `None`, which the metric shows as `unknown` (as Istio does). A CEL crate (cel-interpreter)
//! pulls in a parser generator runtime and chrono: far beyond the module budget for this subset.

use std::fmt::Write as _;

use serde_json::Value as Json;

/// A value an expression produces.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Str(String),
    Int(i64),
    Bool(bool),
    Json(Json),
    Null,
}

impl Val {
    /// Normalise JSON scalars into their plain variants.
    pub fn from_json(v: Json) -> Val {
        match v {
            Json::String(s) => Val::Str(s),
            Json::Bool(b) => Val::Bool(b),
            Json::Null => Val::Null,
            Json::Number(n) => match n.as_i64() {
                Some(i) => Val::Int(i),
                None => Val::Json(Json::Number(n)),
            },
            other => Val::Json(other),
        }
    }

    /// The label value: strings as they are, numbers and booleans printed, JSON compact.
    pub fn render(&self) -> String {
        match self {
            Val::Str(s) => s.clone(),
            Val::Int(i) => i.to_string(),
            Val::Bool(b) => b.to_string(),
            Val::Json(j) => j.to_string(),
            Val::Null => String::new(),
        }
    }
}

/// One step of an attribute path after its root identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Field(String),
    Index(i64),
}

impl Seg {
    /// The segment as a property path element (`[0]` as `0`).
    pub fn as_key(&self) -> String {
        match self {
            Seg::Field(f) => f.clone(),
            Seg::Index(i) => i.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Lit(Val),
    /// Root identifier and the steps after it.
    Path(String, Vec<Seg>),
    Add(Box<Expr>, Box<Expr>),
    Eq(Box<Expr>, Box<Expr>, bool),
    /// An ordering comparison (access-log filters: `response.code >= 400`).
    Cmp(Box<Expr>, Box<Expr>, Cmp),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
}

/// The ordering comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
}

/// Where attribute paths are resolved: the filter reads the proxy, tests use a map.
pub trait Attributes {
    fn lookup(&mut self, root: &str, path: &[Seg]) -> Option<Val>;
}

/// Walk `path` into a JSON value (a helper for attribute sources backed by JSON).
pub fn walk(mut v: &Json, path: &[Seg]) -> Option<Val> {
    for seg in path {
        v = match (seg, v) {
            (Seg::Field(f), Json::Object(m)) => m.get(f)?,
            (Seg::Index(i), Json::Array(a)) => a.get(usize::try_from(*i).ok()?)?,
            _ => return None,
        };
    }
    Some(Val::from_json(v.clone()))
}

// === parsing ===

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(i64),
    Punct(&'static str),
}

const PUNCT: &[&str] = &["==", "!=", "<=", ">=", "<", ">", "&&", "||", ".", "[", "]", "(", ")", "+", "?", ":", "!"];

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, String> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while b.get(i).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_') {
                i += 1;
            }
            out.push((start, Tok::Ident(src.get(start..i).unwrap_or_default().to_string())));
        } else if c.is_ascii_digit() {
            let start = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            let n = src
                .get(start..i)
                .unwrap_or_default()
                .parse::<i64>()
                .map_err(|_| format!("at {start}: integer too large"))?;
            out.push((start, Tok::Int(n)));
        } else if c == b'\'' || c == b'"' {
            let start = i;
            i += 1;
            let mut s = String::new();
            loop {
                let Some(ch) = src.get(i..).and_then(|r| r.chars().next()) else {
                    return Err(format!("at {start}: unterminated string"));
                };
                i += ch.len_utf8();
                if ch as u32 == u32::from(c) {
                    break;
                }
                if ch == '\\' {
                    let Some(esc) = src.get(i..).and_then(|r| r.chars().next()) else {
                        return Err(format!("at {start}: unterminated string"));
                    };
                    i += esc.len_utf8();
                    s.push(match esc {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                } else {
                    s.push(ch);
                }
            }
            out.push((start, Tok::Str(s)));
        } else {
            let rest = src.get(i..).unwrap_or_default();
            let Some(p) = PUNCT.iter().find(|p| rest.starts_with(**p)) else {
                let ch = rest.chars().next().unwrap_or('?');
                return Err(format!("at {i}: unexpected character {ch:?}"));
            };
            out.push((i, Tok::Punct(p)));
            i += p.len();
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    at: usize,
    len: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at).map(|(_, t)| t)
    }
    fn pos(&self) -> usize {
        self.toks.get(self.at).map_or(self.len, |(p, _)| *p)
    }
    fn eat(&mut self, p: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Punct(q)) if *q == p) {
            self.at += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, p: &str) -> Result<(), String> {
        if self.eat(p) {
            Ok(())
        } else {
            Err(format!("at {}: expected `{p}`", self.pos()))
        }
    }

    fn expr(&mut self) -> Result<Expr, String> {
        let cond = self.or()?;
        if self.eat("?") {
            let a = self.expr()?;
            self.expect(":")?;
            let b = self.expr()?;
            return Ok(Expr::Cond(Box::new(cond), Box::new(a), Box::new(b)));
        }
        Ok(cond)
    }
    fn or(&mut self) -> Result<Expr, String> {
        let mut l = self.and()?;
        while self.eat("||") {
            l = Expr::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.eq()?;
        while self.eat("&&") {
            l = Expr::And(Box::new(l), Box::new(self.eq()?));
        }
        Ok(l)
    }
    fn eq(&mut self) -> Result<Expr, String> {
        let l = self.add()?;
        if self.eat("==") {
            return Ok(Expr::Eq(Box::new(l), Box::new(self.add()?), false));
        }
        if self.eat("!=") {
            return Ok(Expr::Eq(Box::new(l), Box::new(self.add()?), true));
        }
        for (p, op) in [("<=", Cmp::Le), (">=", Cmp::Ge), ("<", Cmp::Lt), (">", Cmp::Gt)] {
            if self.eat(p) {
                return Ok(Expr::Cmp(Box::new(l), Box::new(self.add()?), op));
            }
        }
        Ok(l)
    }
    fn add(&mut self) -> Result<Expr, String> {
        let mut l = self.unary()?;
        while self.eat("+") {
            l = Expr::Add(Box::new(l), Box::new(self.unary()?));
        }
        Ok(l)
    }
    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat("!") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        self.postfix()
    }
    fn postfix(&mut self) -> Result<Expr, String> {
        let pos = self.pos();
        let tok = self.peek().cloned();
        self.at += 1;
        let root = match tok {
            Some(Tok::Str(s)) => return Ok(Expr::Lit(Val::Str(s))),
            Some(Tok::Int(i)) => return Ok(Expr::Lit(Val::Int(i))),
            Some(Tok::Ident(id)) if id == "true" => return Ok(Expr::Lit(Val::Bool(true))),
            Some(Tok::Ident(id)) if id == "false" => return Ok(Expr::Lit(Val::Bool(false))),
            Some(Tok::Ident(id)) if id == "null" => return Ok(Expr::Lit(Val::Null)),
            Some(Tok::Punct("(")) => {
                let e = self.expr()?;
                self.expect(")")?;
                return Ok(e);
            }
            Some(Tok::Ident(id)) => id,
            Some(_) => return Err(format!("at {pos}: expected a value")),
            None => return Err(format!("at {pos}: unexpected end of expression")),
        };
        let mut segs = Vec::new();
        loop {
            if self.eat(".") {
                match self.peek().cloned() {
                    Some(Tok::Ident(f)) => {
                        self.at += 1;
                        segs.push(Seg::Field(f));
                    }
                    _ => return Err(format!("at {}: expected a field name after `.`", self.pos())),
                }
            } else if self.eat("[") {
                let seg = match self.peek().cloned() {
                    Some(Tok::Str(s)) => Seg::Field(s),
                    Some(Tok::Int(i)) => Seg::Index(i),
                    _ => return Err(format!("at {}: an index must be a string or integer literal", self.pos())),
                };
                self.at += 1;
                self.expect("]")?;
                segs.push(seg);
            } else {
                break;
            }
        }
        Ok(Expr::Path(root, segs))
    }
}

/// Parse an expression; the error names the byte offset.
pub fn parse(src: &str) -> Result<Expr, String> {
    let toks = lex(src)?;
    let mut p = Parser { toks, at: 0, len: src.len() };
    let e = p.expr()?;
    if p.at < p.toks.len() {
        return Err(format!("at {}: unexpected token after the expression", p.pos()));
    }
    Ok(e)
}

// === evaluation ===

fn truthy(v: &Val) -> Option<bool> {
    match v {
        Val::Bool(b) => Some(*b),
        _ => None,
    }
}

impl Expr {
    pub fn eval(&self, a: &mut dyn Attributes) -> Option<Val> {
        match self {
            Expr::Lit(v) => Some(v.clone()),
            Expr::Path(root, segs) => a.lookup(root, segs),
            Expr::Add(l, r) => match (l.eval(a)?, r.eval(a)?) {
                (Val::Str(mut x), Val::Str(y)) => {
                    x.push_str(&y);
                    Some(Val::Str(x))
                }
                (Val::Int(x), Val::Int(y)) => x.checked_add(y).map(Val::Int),
                _ => None,
            },
            Expr::Eq(l, r, negate) => {
                let (x, y) = (l.eval(a)?, r.eval(a)?);
                Some(Val::Bool((x == y) != *negate))
            }
            Expr::Cmp(l, r, op) => {
                let ord = match (l.eval(a)?, r.eval(a)?) {
                    (Val::Int(x), Val::Int(y)) => x.cmp(&y),
                    (Val::Str(x), Val::Str(y)) => x.cmp(&y),
                    _ => return None,
                };
                Some(Val::Bool(match op {
                    Cmp::Lt => ord.is_lt(),
                    Cmp::Le => ord.is_le(),
                    Cmp::Gt => ord.is_gt(),
                    Cmp::Ge => ord.is_ge(),
                }))
            }
            Expr::And(l, r) => {
                if !truthy(&l.eval(a)?)? {
                    return Some(Val::Bool(false));
                }
                truthy(&r.eval(a)?).map(Val::Bool)
            }
            Expr::Or(l, r) => {
                if truthy(&l.eval(a)?)? {
                    return Some(Val::Bool(true));
                }
                truthy(&r.eval(a)?).map(Val::Bool)
            }
            Expr::Not(e) => truthy(&e.eval(a)?).map(|b| Val::Bool(!b)),
            Expr::Cond(c, x, y) => {
                if truthy(&c.eval(a)?)? {
                    x.eval(a)
                } else {
                    y.eval(a)
                }
            }
        }
    }

    /// Every attribute root the expression reads (for configure-time checks).
    pub fn roots(&self, out: &mut Vec<String>) {
        match self {
            Expr::Lit(_) => {}
            Expr::Path(r, _) => out.push(r.clone()),
            Expr::Add(l, r) | Expr::Eq(l, r, _) | Expr::Cmp(l, r, _) | Expr::And(l, r) | Expr::Or(l, r) => {
                l.roots(out);
                r.roots(out);
            }
            Expr::Not(e) => e.roots(out),
            Expr::Cond(c, x, y) => {
                c.roots(out);
                x.roots(out);
                y.roots(out);
            }
        }
    }
}

/// `root.a['b'][0]` for logs.
pub fn path_string(root: &str, segs: &[Seg]) -> String {
    let mut s = root.to_string();
    for seg in segs {
        let _ = match seg {
            Seg::Field(f) => write!(s, ".{f}"),
            Seg::Index(i) => write!(s, "[{i}]"),
        };
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    struct Map(Json);
    impl Attributes for Map {
        fn lookup(&mut self, root: &str, path: &[Seg]) -> Option<Val> {
            walk(self.0.get(root)?, path)
        }
    }

    fn eval(src: &str) -> Option<String> {
        let mut m = Map(json!({
            "xds": {"node": {"metadata": {"WORKLOAD_NAME": "productpage-v1", "LABELS": {"app": "productpage", "version": "v1"}}},
                    "route_name": "r", "cluster_name": "c",
                    "cluster_metadata": {"filter_metadata": {"istio": {"services": [{"name": "server"}]}}}},
            "request": {"protocol": "HTTP/1.1", "headers": {"x-user": "ana"}},
            "response": {"code": 503},
        }));
        parse(src).unwrap().eval(&mut m).map(|v| v.render())
    }

    #[test]
    fn istio_examples() {
        assert_eq!(eval("'_' + xds.node.metadata['WORKLOAD_NAME']").as_deref(), Some("_productpage-v1"));
        assert_eq!(eval("'_' + xds.node.metadata['LABELS'].app").as_deref(), Some("_productpage"));
        assert_eq!(eval("'_' + xds.node.metadata.LABELS.version").as_deref(), Some("_v1"));
        assert_eq!(eval("request.protocol").as_deref(), Some("HTTP/1.1"));
        assert_eq!(
            eval(r#"xds.route_name + "," + xds.cluster_name + "," + xds.cluster_metadata.filter_metadata.istio.services[0].name"#)
                .as_deref(),
            Some("r,c,server")
        );
        assert_eq!(eval("\"gateway\"").as_deref(), Some("gateway"));
        assert_eq!(eval("cannot_evaluate"), None, "an unknown attribute evaluates to nothing (shown as unknown)");
        assert_eq!(eval("response.code").as_deref(), Some("503"));
        assert_eq!(eval("response.code == 503 ? 'err' : 'ok'").as_deref(), Some("err"));
        assert_eq!(eval("request.headers['x-user'] != 'ana' ? 'other' : 'ana'").as_deref(), Some("ana"));
        assert_eq!(eval("request.headers['missing'] == 'x' || true").as_deref(), None, "missing propagates");
        assert_eq!(eval("!(response.code == 200) && true").as_deref(), Some("true"));
        assert_eq!(eval("'a' + 1"), None, "type mismatch");
    }

    #[test]
    fn ordering_comparisons() {
        assert_eq!(eval("response.code >= 400").as_deref(), Some("true"));
        assert_eq!(eval("response.code < 400").as_deref(), Some("false"));
        assert_eq!(eval("response.code > 503 || response.code <= 503").as_deref(), Some("true"));
        assert_eq!(eval("request.protocol > 'HTTP/1.0'").as_deref(), Some("true"));
        assert_eq!(eval("response.code >= '400'"), None, "no ordering across types");
        assert_eq!(eval("response.code >= 500 && request.headers['x-user'] == 'ana'").as_deref(), Some("true"));
    }

    #[test]
    fn syntax_errors_name_the_position() {
        assert_eq!(parse("cannot _ parse | 1").unwrap_err(), "at 15: unexpected character '|'");
        assert!(parse("'open").unwrap_err().contains("unterminated"));
        assert!(parse("a[b]").unwrap_err().contains("literal"));
        assert!(parse("a ? b").unwrap_err().contains("expected `:`"));
        assert!(parse("").unwrap_err().contains("end of expression"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,40}") {
            if let Ok(e) = parse(&s) {
                let _ = e.eval(&mut Map(json!({})));
            }
        }
    }
}
