//! Pure decisions: which descriptor entries a request produces for a rule, the bucket key
//! they make, the client address behind trusted proxies, and the rate-limit headers.

use meshwasm_sdk_ext::matcher::RequestView;

use crate::bucket::Take;
use crate::config::{Descriptor, Rule};
use crate::slots::bounded_key;

/// Body and response code details of a rejection, as Envoy's local rate limit filter.
pub const REJECT_BODY: &str = "local_rate_limited";
pub const REJECT_DETAILS: &str = "local_rate_limited";
/// Response code details of a rejection by the rate-limit service (Envoy's rate limit filter's).
pub const GLOBAL_REJECT_DETAILS: &str = "request_rate_limited";
/// Body and details when the rate-limit service fails and the failure mode is `deny`.
pub const ERROR_BODY: &str = "rate_limit_service_error";

pub type Entries = Vec<(String, String)>;

/// The rule's descriptor entries for this request, or `None` when the rule does not apply
/// (Envoy's rule: an action that cannot produce its entry drops the whole descriptor; a
/// request header with `skipIfAbsent` just drops its entry).
pub fn entries(rule: &Rule, req: &mut dyn RequestView) -> Option<Entries> {
    let mut out = Vec::with_capacity(rule.descriptors.len());
    for d in &rule.descriptors {
        match d {
            Descriptor::RequestHeader { key, name, skip_if_absent } => match req.header(name) {
                Some(v) => out.push((key.clone(), v)),
                None if *skip_if_absent => {}
                None => return None,
            },
            Descriptor::RemoteAddress { key, trusted_hops } => {
                let xff = if *trusted_hops > 0 { req.header("x-forwarded-for") } else { None };
                let addr = client_address(xff.as_deref(), *trusted_hops, req.remote_address())?;
                out.push((key.clone(), addr));
            }
            Descriptor::Path { key } => {
                let path = req.header(":path")?;
                let path = path.split(['?', '#']).next().unwrap_or_default().to_string();
                out.push((key.clone(), path));
            }
            Descriptor::Method { key } => out.push((key.clone(), req.header(":method")?)),
            Descriptor::RouteName { key } => out.push((key.clone(), req.route_name()?)),
            Descriptor::Generic { key, value } => out.push((key.clone(), value.clone())),
            Descriptor::HeaderValueMatch { key, value, expect_match, matches } => {
                if matches.matches(req) != *expect_match {
                    return None;
                }
                out.push((key.clone(), value.clone()));
            }
        }
    }
    // Every entry skipped: no descriptor (a service would refuse an empty one).
    if out.is_empty() && !rule.descriptors.is_empty() {
        return None;
    }
    Some(out)
}

/// The bucket key of a rule's entries: `k=v` pairs joined by U+001F (which header values
/// cannot contain), bounded in length.
pub fn bucket_key(entries: &[(String, String)]) -> Vec<u8> {
    let mut key = Vec::new();
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            key.push(0x1f);
        }
        key.extend_from_slice(k.as_bytes());
        key.push(b'=');
        key.extend_from_slice(v.as_bytes());
    }
    bounded_key(key)
}

/// The client's address. With `trusted_hops = N > 0`, the N-th address from the right of
/// `x-forwarded-for` (the one the farthest trusted proxy saw; entries further left are the
/// client's own claims and are ignored); otherwise, or when the header has fewer entries,
/// the connection's peer. Ports and IPv6 brackets are stripped.
pub fn client_address(xff: Option<&str>, trusted_hops: u32, peer: Option<String>) -> Option<String> {
    if trusted_hops > 0 {
        if let Some(xff) = xff {
            let hops: Vec<&str> = xff.split(',').map(str::trim).collect();
            if let Some(i) = hops.len().checked_sub(trusted_hops as usize) {
                if let Some(a) = hops.get(i).filter(|a| !a.is_empty()) {
                    return Some(strip_port(a).to_string());
                }
            }
        }
    }
    peer.map(|p| strip_port(&p).to_string())
}

fn strip_port(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        // One colon: `ip:port`. More: a bare IPv6 address.
        Some((ip, port)) if !ip.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => ip,
        _ => addr,
    }
}

/// The tightest of the buckets a request went through: what the headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tightest {
    pub limit: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

impl Tightest {
    pub fn update(current: Option<Tightest>, max_tokens: u64, take: &Take) -> Option<Tightest> {
        let next = Tightest { limit: max_tokens, remaining: take.remaining, reset_secs: take.reset_secs };
        match current {
            Some(c)
                if (c.remaining, std::cmp::Reverse(c.reset_secs))
                    <= (next.remaining, std::cmp::Reverse(next.reset_secs)) =>
            {
                Some(c)
            }
            _ => Some(next),
        }
    }

    /// `x-ratelimit-limit`, `x-ratelimit-remaining`, `x-ratelimit-reset` (IETF draft 03, the
    /// version Envoy emits).
    pub fn headers(&self) -> Vec<(String, String)> {
        vec![
            ("x-ratelimit-limit".into(), self.limit.to_string()),
            ("x-ratelimit-remaining".into(), self.remaining.to_string()),
            ("x-ratelimit-reset".into(), self.reset_secs.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use meshwasm_sdk_ext::matcher::StaticRequest;

    fn rule(descriptors: &str) -> Rule {
        let json = format!(
            r#"{{"rules": [{{"descriptors": {descriptors}, "tokenBucket": {{"maxTokens": 1, "fillInterval": "1s"}}}}]}}"#
        );
        Config::from_json(json.as_bytes()).unwrap().rules.remove(0)
    }

    #[test]
    fn entries_per_kind() {
        let r = rule(
            r#"[{"requestHeader": {"name": "x-user", "key": "user"}}, {"path": {}}, {"method": {}},
               {"genericKey": {"value": "api"}}, {"remoteAddress": {}}, {"routeName": {}},
               {"headerValueMatch": {"value": "json", "match": {"headers": {"accept": {"exact": "application/json"}}}}}]"#,
        );
        let mut req = StaticRequest::get("/a/b?q=1").header("x-user", "ann").header("accept", "application/json");
        req.remote = Some("10.0.0.7:5555".into());
        req.route = Some("r1".into());
        let e = entries(&r, &mut req).unwrap();
        let pairs: Vec<(&str, &str)> = e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("user", "ann"),
                ("path", "/a/b"),
                ("method", "GET"),
                ("generic_key", "api"),
                ("remote_address", "10.0.0.7"),
                ("route_name", "r1"),
                ("header_match", "json")
            ]
        );
        assert_eq!(bucket_key(&e[..2]), b"user=ann\x1fpath=/a/b");
        // A missing header drops the rule; a header-value mismatch too.
        assert!(entries(&r, &mut StaticRequest::get("/")).is_none());
        let mut req = StaticRequest::get("/").header("x-user", "ann").header("accept", "text/html");
        req.route = Some("r1".into());
        req.remote = Some("10.0.0.7:1".into());
        assert!(entries(&r, &mut req).is_none());
        // skipIfAbsent drops only the entry.
        let r =
            rule(r#"[{"requestHeader": {"name": "x-user", "skipIfAbsent": true}}, {"genericKey": {"value": "v"}}]"#);
        assert_eq!(entries(&r, &mut StaticRequest::get("/")).unwrap(), [("generic_key".to_string(), "v".to_string())]);
    }

    #[test]
    fn client_address_behind_proxies() {
        let peer = || Some("192.0.2.1:40000".to_string());
        assert_eq!(client_address(None, 0, peer()).as_deref(), Some("192.0.2.1"));
        assert_eq!(client_address(Some("1.1.1.1"), 0, peer()).as_deref(), Some("192.0.2.1"), "xff ignored at 0 hops");
        assert_eq!(client_address(Some("6.6.6.6, 1.1.1.1, 2.2.2.2"), 1, peer()).as_deref(), Some("2.2.2.2"));
        assert_eq!(client_address(Some("6.6.6.6, 1.1.1.1, 2.2.2.2"), 2, peer()).as_deref(), Some("1.1.1.1"));
        assert_eq!(client_address(Some("1.1.1.1"), 2, peer()).as_deref(), Some("192.0.2.1"), "too few entries");
        assert_eq!(client_address(None, 0, Some("[2001:db8::1]:443".into())).as_deref(), Some("2001:db8::1"));
        assert_eq!(client_address(Some("2001:db8::2"), 1, None).as_deref(), Some("2001:db8::2"));
    }

    #[test]
    fn tightest_bucket_wins() {
        let t = |remaining, reset_secs| Take { admitted: true, base: 0, remaining, reset_secs };
        let a = Tightest::update(None, 10, &t(5, 0));
        let b = Tightest::update(a, 3, &t(0, 2));
        assert_eq!(b, Some(Tightest { limit: 3, remaining: 0, reset_secs: 2 }));
        assert_eq!(Tightest::update(b, 10, &t(4, 0)), b);
    }
}
