//! Full-match regular expressions for the few shapes this filter generates, instead of
//! `regex-lite`, which cost 41.6 KiB of `authz.wasm` after wasm-opt (its parser, compiler,
//! Unicode tables and the formatting they pull in; 674,445 → 631,840 bytes, this matcher
//! included; see docs/authz.md "Size and speed").
//!
//! The regexes come from `crate::istio` (istiod's translation: `.+`, `spiffe://.*<suffix>`,
//! `.*/ns/<ns>/.*` with `*` as `.*`, `spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?`,
//! `spiffe://<td>/.*` with `*` as `[^/]*`) and from `crate::rbac::UriTemplate` (segment
//! classes). User values inside them are escaped, so the syntax needed is small: literals,
//! escaped meta characters, `.`, bracket classes with ranges and `^`, groups (`(…)`,
//! `(?:…)`), `|`, and the greedy `*`, `+`, `?`. Anything else is refused (a configuration
//! error, never a different meaning). Matching follows regex-lite's semantics on `&str`: one
//! step per Unicode scalar value, `.` matches any character but `\n`, a negated class matches
//! `\n`. The matcher simulates the automaton (Thompson/Pike, no backtracking): time linear in
//! the input times the pattern size, whatever the input.
//!
//! `tests::same_as_regex_lite` (proptest) proves it equal to regex-lite — acceptance of the
//! pattern and the full-match result — on generated patterns of istiod's shapes, of the
//! supported grammar, and on arbitrary strings.

/// One instruction of the automaton.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Inst {
    Char(char),
    /// `.`: any character but `\n`.
    Any,
    /// A bracket class: inclusive ranges, negated or not.
    Class(Vec<(char, char)>, bool),
    /// Continue at both.
    Split(usize, usize),
    Jmp(usize),
    Match,
}

/// A compiled regex, matched against the whole input.
#[derive(Debug, Clone)]
pub struct Regex {
    prog: Vec<Inst>,
}

/// Characters with a meaning in regex syntax; escaped, they stand for themselves (regex-lite's
/// `is_meta_character`).
const META: &str = "\\.+*?()|[]{}^$#&-~";

/// `s` with every regex meta character escaped (as `regex_lite::escape`).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if META.contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The pattern as a tree.
#[derive(Debug)]
enum Node {
    Char(char),
    Any,
    Class(Vec<(char, char)>, bool),
    Concat(Vec<Node>),
    Alt(Vec<Node>),
    Star(Box<Node>),
    Plus(Box<Node>),
    Quest(Box<Node>),
}

/// Deepest group nesting accepted (istiod's shapes nest one deep).
const MAX_DEPTH: usize = 16;

struct Parser<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    depth: usize,
}

impl Parser<'_> {
    fn alt(&mut self) -> Option<Node> {
        let mut alts = vec![self.concat()?];
        while self.chars.peek() == Some(&'|') {
            self.chars.next();
            alts.push(self.concat()?);
        }
        Some(if alts.len() == 1 { alts.pop()? } else { Node::Alt(alts) })
    }

    fn concat(&mut self) -> Option<Node> {
        let mut seq = Vec::new();
        while let Some(&c) = self.chars.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom()?;
            let node = match self.chars.peek() {
                Some('*') => Node::Star(Box::new(atom)),
                Some('+') => Node::Plus(Box::new(atom)),
                Some('?') => Node::Quest(Box::new(atom)),
                _ => {
                    seq.push(atom);
                    continue;
                }
            };
            self.chars.next();
            // Lazy (`*?`) and stacked (`a**`) repetitions are not generated: refused.
            if matches!(self.chars.peek(), Some('*' | '+' | '?' | '{')) {
                return None;
            }
            seq.push(node);
        }
        Some(Node::Concat(seq))
    }

    fn atom(&mut self) -> Option<Node> {
        match self.chars.next()? {
            '(' => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return None;
                }
                if self.chars.peek() == Some(&'?') {
                    self.chars.next();
                    if self.chars.next()? != ':' {
                        return None;
                    }
                }
                let inner = self.alt()?;
                if self.chars.next()? != ')' {
                    return None;
                }
                self.depth -= 1;
                Some(inner)
            }
            '.' => Some(Node::Any),
            '[' => self.class(),
            '\\' => self.escaped().map(Node::Char),
            // Repetitions without an operand, anchors, counted repetitions: refused.
            '*' | '+' | '?' | ')' | ']' | '{' | '}' | '^' | '$' => None,
            c => Some(Node::Char(c)),
        }
    }

    fn escaped(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        META.contains(c).then_some(c)
    }

    /// After `[`: items up to `]`. `&&`, `--`, `~~` (regex-lite's set operations), nested
    /// classes and a leading `]` are refused.
    fn class(&mut self) -> Option<Node> {
        let negated = self.chars.peek() == Some(&'^');
        if negated {
            self.chars.next();
        }
        let mut ranges = Vec::new();
        loop {
            let start = match self.chars.next()? {
                ']' if !ranges.is_empty() => return Some(Node::Class(ranges, negated)),
                '[' | ']' => return None,
                '\\' => self.escaped()?,
                c @ ('&' | '-' | '~') if self.chars.peek() == Some(&c) => return None,
                c => c,
            };
            let end = if self.chars.peek() == Some(&'-') {
                self.chars.next();
                match self.chars.next()? {
                    // A trailing `-` is a literal.
                    ']' => {
                        ranges.push((start, start));
                        ranges.push(('-', '-'));
                        return Some(Node::Class(ranges, negated));
                    }
                    '[' | '-' => return None,
                    '\\' => self.escaped()?,
                    c => c,
                }
            } else {
                start
            };
            if end < start {
                return None;
            }
            ranges.push((start, end));
        }
    }
}

impl Node {
    fn compile(&self, prog: &mut Vec<Inst>) {
        match self {
            Self::Char(c) => prog.push(Inst::Char(*c)),
            Self::Any => prog.push(Inst::Any),
            Self::Class(r, n) => prog.push(Inst::Class(r.clone(), *n)),
            Self::Concat(seq) => seq.iter().for_each(|n| n.compile(prog)),
            Self::Alt(alts) => {
                // split L1, next; L1: a; jmp end; next: split L2, next'; … ; last alternative.
                let mut jumps = Vec::new();
                let last = alts.len().saturating_sub(1);
                for (i, a) in alts.iter().enumerate() {
                    if i < last {
                        let split = prog.len();
                        prog.push(Inst::Split(split + 1, 0));
                        a.compile(prog);
                        jumps.push(prog.len());
                        prog.push(Inst::Jmp(0));
                        let next = prog.len();
                        if let Some(Inst::Split(_, b)) = prog.get_mut(split) {
                            *b = next;
                        }
                    } else {
                        a.compile(prog);
                    }
                }
                let end = prog.len();
                for j in jumps {
                    if let Some(Inst::Jmp(t)) = prog.get_mut(j) {
                        *t = end;
                    }
                }
            }
            Self::Star(n) => {
                let split = prog.len();
                prog.push(Inst::Split(split + 1, 0));
                n.compile(prog);
                prog.push(Inst::Jmp(split));
                let end = prog.len();
                if let Some(Inst::Split(_, b)) = prog.get_mut(split) {
                    *b = end;
                }
            }
            Self::Plus(n) => {
                let start = prog.len();
                n.compile(prog);
                prog.push(Inst::Split(start, prog.len() + 1));
            }
            Self::Quest(n) => {
                let split = prog.len();
                prog.push(Inst::Split(split + 1, 0));
                n.compile(prog);
                let end = prog.len();
                if let Some(Inst::Split(_, b)) = prog.get_mut(split) {
                    *b = end;
                }
            }
        }
    }
}

impl Regex {
    /// Compile `src` for full matches (`^(?:src)$`); `None` when it uses syntax beyond the
    /// shapes above.
    pub fn new(src: &str) -> Option<Self> {
        let mut p = Parser { chars: src.chars().peekable(), depth: 0 };
        let tree = p.alt()?;
        if p.chars.next().is_some() {
            return None; // an unbalanced `)`
        }
        let mut prog = Vec::new();
        tree.compile(&mut prog);
        prog.push(Inst::Match);
        Some(Self { prog })
    }

    /// Add thread `pc` and what it reaches without reading a character.
    fn add(&self, list: &mut Vec<usize>, seen: &mut [usize], generation: usize, pc: usize) {
        let mut stack = vec![pc];
        while let Some(pc) = stack.pop() {
            match seen.get_mut(pc) {
                Some(s) if *s != generation => *s = generation,
                _ => continue,
            }
            match self.prog.get(pc) {
                Some(Inst::Jmp(t)) => stack.push(*t),
                Some(Inst::Split(a, b)) => {
                    stack.push(*b);
                    stack.push(*a);
                }
                Some(_) => list.push(pc),
                None => {}
            }
        }
    }

    /// Does the whole of `s` match?
    pub fn is_match(&self, s: &str) -> bool {
        let mut seen = vec![usize::MAX; self.prog.len()];
        let mut cur = Vec::new();
        let mut next = Vec::new();
        self.add(&mut cur, &mut seen, 0, 0);
        for (i, c) in s.chars().enumerate() {
            if cur.is_empty() {
                return false;
            }
            next.clear();
            for &pc in &cur {
                let ok = match self.prog.get(pc) {
                    Some(Inst::Char(x)) => *x == c,
                    Some(Inst::Any) => c != '\n',
                    Some(Inst::Class(ranges, negated)) => ranges.iter().any(|(a, b)| *a <= c && c <= *b) != *negated,
                    _ => false,
                };
                if ok {
                    self.add(&mut next, &mut seen, i + 1, pc + 1);
                }
            }
            std::mem::swap(&mut cur, &mut next);
        }
        cur.iter().any(|pc| self.prog.get(*pc) == Some(&Inst::Match))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn theirs(src: &str) -> Option<regex_lite::Regex> {
        regex_lite::Regex::new(&format!("^(?:{src})$")).ok()
    }

    /// Both accept the pattern or ours refuses it; where both accept, they agree on `inputs`.
    fn agree(src: &str, inputs: &[String]) -> Result<(), TestCaseError> {
        let ours = Regex::new(src);
        let lib = theirs(src);
        if let Some(ours) = &ours {
            let Some(lib) = &lib else {
                return Err(TestCaseError::fail(format!("{src:?}: accepted here, refused by regex-lite")));
            };
            for h in inputs {
                prop_assert_eq!(ours.is_match(h), lib.is_match(h), "pattern {:?} input {:?}", src, h);
            }
        }
        Ok(())
    }

    /// Values as users write them: path-ish words, meta characters, `*`, non-ASCII, `\n`.
    fn value() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                Just("foo".to_string()),
                Just("bar".to_string()),
                Just("a".to_string()),
                Just("-".to_string()),
                Just(".".to_string()),
                Just("*".to_string()),
                Just("/".to_string()),
                Just("é".to_string()),
                Just("\n".to_string()),
                "[ -~]".prop_map(String::from),
            ],
            1..5,
        )
        .prop_map(|v| v.concat())
    }

    /// istiod's shapes (see `crate::istio`) and the URI template classes, each with an
    /// identity or path built to match it (so that matches, not only misses, are compared).
    fn istio_pattern() -> impl Strategy<Value = (String, String)> {
        use crate::istio::quote_meta;
        prop_oneof![
            Just((".+".to_string(), "x".to_string())),
            value().prop_map(|s| (format!("spiffe://.*{}", quote_meta(&s)), format!("spiffe://td/{s}"))),
            (value(), value()).prop_map(|(ns, sa)| (
                format!("spiffe://.+/ns/{}/(.+/|)sa/{}(/.+)?", quote_meta(&ns), quote_meta(&sa)),
                format!("spiffe://td/ns/{ns}/sa/{sa}")
            )),
            value().prop_map(|ns| (
                format!(".*/ns/{}/.*", quote_meta(&ns).replace("\\*", ".*")),
                format!("spiffe://td/ns/{}/sa/x", ns.replace('*', "q"))
            )),
            value().prop_map(|td| (
                format!("spiffe://{}/.*", quote_meta(&td).replace("\\*", "[^/]*")),
                format!("spiffe://{}/ns/a", td.replace('*', "q"))
            )),
            prop::collection::vec(prop_oneof![value(), Just("*".to_string()), Just("**".to_string())], 1..4).prop_map(
                |segs| {
                    let path: Vec<&str> = segs
                        .iter()
                        .map(|s| {
                            if s == "*" {
                                "seg"
                            } else if s == "**" {
                                "a/b"
                            } else {
                                s.as_str()
                            }
                        })
                        .collect();
                    (
                        crate::rbac::UriTemplate::regex_source(&format!("/{}", segs.join("/"))),
                        format!("/{}", path.join("/")),
                    )
                }
            ),
        ]
    }

    /// Inputs near the pattern: pieces of SPIFFE ids, the pattern's own characters.
    fn inputs(src: String) -> impl Strategy<Value = (String, Vec<String>)> {
        let own: Vec<String> = src.chars().filter(|c| *c != '\\').map(String::from).collect();
        let piece = prop_oneof![
            Just("spiffe://".to_string()),
            Just("cluster.local".to_string()),
            Just("/ns/".to_string()),
            Just("/sa/".to_string()),
            Just("/".to_string()),
            Just("\n".to_string()),
            value(),
            prop::sample::select(own),
        ];
        (Just(src), prop::collection::vec(prop::collection::vec(piece, 0..8).prop_map(|v| v.concat()), 1..24))
    }

    /// Patterns of the supported grammar, with characters that are special in places.
    fn grammar() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            "[a-c/\\n]".prop_map(String::from),
            Just(".".to_string()),
            Just("\\.".to_string()),
            Just("\\*".to_string()),
            Just("-".to_string()),
            Just("[^/]".to_string()),
            Just("[a-c]".to_string()),
            Just("[\\-.~a]".to_string()),
            Just("[ab-]".to_string()),
            Just("é".to_string()),
        ];
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 1..4).prop_map(|v| v.concat()),
                prop::collection::vec(inner.clone(), 2..4).prop_map(|v| format!("({})", v.join("|"))),
                inner.clone().prop_map(|s| format!("(?:{s})*")),
                inner.clone().prop_map(|s| format!("({s})+")),
                inner.clone().prop_map(|s| format!("(?:{s})?")),
                inner.prop_map(|s| format!("{s}|")),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn same_as_regex_lite_on_istio_shapes(((src, hs), built) in istio_pattern().prop_flat_map(|(src, built)| (inputs(src), Just(built)))) {
            prop_assert!(Regex::new(&src).is_some(), "istiod's shape refused: {:?}", src);
            let mut hs = hs;
            hs.push(built);
            agree(&src, &hs)?;
        }

        #[test]
        fn same_as_regex_lite_on_the_grammar((src, hs) in grammar().prop_flat_map(inputs)) {
            prop_assert!(Regex::new(&src).is_some(), "{:?}", src);
            agree(&src, &hs)?;
        }

        #[test]
        fn never_accepts_what_regex_lite_reads_otherwise(src in "[-a.*+?()|\\[\\]{}^$\\\\/&~#:]{0,12}", hs in prop::collection::vec("[-a.*/\\[\\]&~\n]{0,8}", 8)) {
            agree(&src, &hs)?;
        }
    }

    /// The built identities match in most cases, so the comparison above sees matches.
    #[test]
    fn built_inputs_mostly_match() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::deterministic();
        let mut hits = 0;
        for _ in 0..500 {
            let (src, built) = istio_pattern().new_tree(&mut runner).unwrap().current();
            hits += usize::from(Regex::new(&src).unwrap().is_match(&built));
        }
        assert!(hits > 250, "{hits} of 500 built inputs matched");
    }

    #[test]
    fn examples() {
        let re = Regex::new("spiffe://.+/ns/foo/(.+/|)sa/bar(/.+)?").unwrap();
        assert!(re.is_match("spiffe://cluster.local/ns/foo/sa/bar"));
        assert!(re.is_match("spiffe://td/ns/foo/x/sa/bar/y"));
        assert!(!re.is_match("spiffe://td/ns/foo/sa/barz"));
        let any = Regex::new(".+").unwrap();
        assert!(any.is_match("é") && !any.is_match("") && !any.is_match("a\nb"));
        assert!(Regex::new("[^/]*").unwrap().is_match("a\nb"));
        for bad in ["a{2}", "^a", "a$", "(a", "a)", "[a", "[]", "[a&&b]", "\\d", "a**", "a*?", "[z-a]"] {
            assert!(Regex::new(bad).is_none(), "{bad}");
        }
    }
}
