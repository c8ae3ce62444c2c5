//! Remote key sets (`jwksUri`): fetched by an HTTP callout from the root context of one
//! worker and shared with every other worker through Envoy shared data, so a process fetches
//! each URI once (not once per worker, as `jwt_authn` does), and every worker parses each
//! version once.
//!
//! Per source, three shared-data keys under `meshwasm.authz.jwks/<plugin>/<cluster>/<uri>`:
//! - `…/lease`: the monotonic time (ns) until which one worker holds the right to fetch,
//!   taken with compare-and-swap (created at configure time so taking it is always a CAS);
//! - `…/keys`: the fetched JWKS body, prefixed with its version (u64 LE);
//! - `…/state`: [`State`], written after `…/keys`: version, expiry, next fetch, last attempt.
//!
//! Timing, after `jwt_authn`'s fetcher where it is observable: a fetched set is valid for
//! `cacheDuration` (Envoy's `setRemoteJwks`); it is refetched 5 s before it expires
//! (`JwksAsyncFetcher`'s `RefetchBeforeExpiredSec`), so requests do not wait on a refresh;
//! a failed fetch (no answer, a status other than 200, an empty body, a body that is not a
//! JWKS with a valid key) is retried after 1 s (`failed_refetch_duration`'s default) and keeps
//! the previous set until that set expires. Time is the process-wide monotonic clock.

use std::rc::Rc;
use std::time::Duration;

use meshwasm_sdk_ext::shared::{decode_u64, encode_u64, init_u64, update_u64, Update};
use meshwasm_sdk_ext::{HttpCall, HttpReply, LogLevel};

use crate::authn::Remote;
use crate::jwks::Jwks;
use meshwasm_sdk_ext::Host;

/// A set is refetched this long before it expires (when its cache duration is longer).
pub const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5);
/// A failed fetch is retried after this long.
pub const FAILED_REFETCH: Duration = Duration::from_secs(1);
/// The root tick looks at the shared state at least this often (new versions another worker
/// fetched, a lease that ran out).
pub const POLL: Duration = Duration::from_secs(1);
/// A lease outlives its fetch's timeout by this much (a worker that dies holding it).
const LEASE_MARGIN: Duration = Duration::from_secs(1);

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// When a set fetched now is refetched.
pub fn refresh_after(cache: Duration) -> Duration {
    if cache > REFRESH_BEFORE_EXPIRY {
        cache - REFRESH_BEFORE_EXPIRY
    } else {
        cache
    }
}

// === impl State ===

/// The shared state of one source (monotonic ns).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State {
    /// Version of the set in `…/keys`; 0 before the first successful fetch.
    pub version: u64,
    /// When that set stops being used.
    pub expires_ns: u64,
    /// When the next fetch is due.
    pub next_fetch_ns: u64,
    /// When the last attempt ended, and how many there were.
    pub attempt_end_ns: u64,
    pub attempts: u64,
    /// Whether the last attempt succeeded.
    pub ok: bool,
}

impl State {
    const LEN: usize = 48;

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        for v in [self.version, self.expires_ns, self.next_fetch_ns, self.attempt_end_ns, self.attempts] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&u64::from(self.ok).to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::LEN {
            return None;
        }
        let f = |i: usize| b.get(i * 8..i * 8 + 8).and_then(decode_u64);
        Some(Self {
            version: f(0)?,
            expires_ns: f(1)?,
            next_fetch_ns: f(2)?,
            attempt_end_ns: f(3)?,
            attempts: f(4)?,
            ok: f(5)? != 0,
        })
    }
}

// === impl Fetcher ===

/// A set this worker parsed.
#[derive(Debug, Clone)]
pub struct Installed {
    pub version: u64,
    pub expires_ns: u64,
    pub jwks: Rc<Jwks>,
}

/// What a request gets for a source.
#[derive(Debug, Clone)]
pub enum Lookup {
    Ready(Rc<Jwks>, u64),
    /// No usable set yet; a fetch is due or in flight.
    Pending,
    /// No usable set, and a fetch that ended while the request waited failed.
    Failed,
}

/// How one fetch ended (for metrics and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    Success { source: usize, version: u64, keys: usize },
    Failed { source: usize, why: String },
}

#[derive(Debug, Default)]
struct Slot {
    /// `…/lease`, `…/keys`, `…/state`.
    lease_key: String,
    keys_key: String,
    state_key: String,
    /// The shared state as last read.
    state: State,
    installed: Option<Installed>,
    /// The fetch this worker has in flight: callout token and the lease's end.
    in_flight: Option<(u32, u64)>,
}

/// The remote sources of one plugin on one worker.
#[derive(Debug, Default)]
pub struct Fetcher {
    slots: Vec<Slot>,
}

/// Why a reply is not a key set, or the set with its key count.
fn evaluate(reply: &HttpReply) -> Result<(Jwks, &[u8]), String> {
    let r = match reply {
        HttpReply::Failed => return Err("no response (timeout, connection failure or reset)".into()),
        HttpReply::Response(r) => r,
    };
    match r.status() {
        Some(200) => {}
        Some(s) => return Err(format!("status {s}")),
        None => return Err("no :status".into()),
    }
    if r.body.is_empty() {
        return Err("empty body".into());
    }
    if r.body_size > r.body.len() {
        return Err(format!("body of {} bytes is larger than the {} bytes read", r.body_size, r.body.len()));
    }
    let (jwks, _) = Jwks::parse(&r.body).map_err(|e| e.0)?;
    Ok((jwks, &r.body))
}

impl Fetcher {
    /// The sources of a plugin named `plugin`; creates the lease keys so taking one is a CAS.
    pub fn new(host: &dyn Host, plugin: &str, remotes: &[Remote]) -> Self {
        let slots = remotes
            .iter()
            .map(|r| {
                let base = format!("meshwasm.authz.jwks/{plugin}/{}/{}", r.cluster, r.uri);
                let s = Slot {
                    lease_key: format!("{base}/lease"),
                    keys_key: format!("{base}/keys"),
                    state_key: format!("{base}/state"),
                    ..Slot::default()
                };
                init_u64(host, &s.lease_key);
                s
            })
            .collect();
        Self { slots }
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Read the shared state of source `i`; parse and install a version this worker has not
    /// parsed yet.
    fn sync(&mut self, host: &dyn Host, i: usize) {
        let Some(slot) = self.slots.get_mut(i) else { return };
        let state = host.shared_data(&slot.state_key).0.and_then(|b| State::decode(&b)).unwrap_or_default();
        slot.state = state;
        match &mut slot.installed {
            Some(inst) if inst.version == state.version => {
                inst.expires_ns = state.expires_ns;
                return;
            }
            _ => {}
        }
        if state.version == 0 {
            return;
        }
        let Some(blob) = host.shared_data(&slot.keys_key).0 else { return };
        let (Some(version), Some(body)) = (blob.get(..8).and_then(decode_u64), blob.get(8..)) else { return };
        if version != state.version {
            return; // a newer set is being written: the next look installs it
        }
        match Jwks::parse(body) {
            Ok((jwks, _)) => {
                slot.installed = Some(Installed { version, expires_ns: state.expires_ns, jwks: Rc::new(jwks) })
            }
            Err(e) => host.log(LogLevel::Warn, &format!("meshwasm.authz: shared JWKS version {version}: {}", e.0)),
        }
    }

    /// The keys of source `i` at `now` for a request that began waiting at `since`.
    pub fn lookup(&mut self, host: &dyn Host, i: usize, now: u64, since: u64) -> Lookup {
        let fresh = |s: &Self| {
            s.slots
                .get(i)
                .and_then(|s| s.installed.as_ref())
                .filter(|inst| now < inst.expires_ns)
                .map(|inst| Lookup::Ready(Rc::clone(&inst.jwks), inst.version))
        };
        if let Some(r) = fresh(self) {
            return r;
        }
        self.sync(host, i);
        if let Some(r) = fresh(self) {
            return r;
        }
        match self.slots.get(i) {
            Some(s) if s.state.attempts > 0 && !s.state.ok && s.state.attempt_end_ns >= since => Lookup::Failed,
            Some(_) => Lookup::Pending,
            None => Lookup::Failed,
        }
    }

    /// The root's work at `now`: pick up what other workers fetched, and start the fetches
    /// that are due and whose lease this worker wins. Returns the fetches that ended at once
    /// (the callout could not start).
    pub fn tick(&mut self, host: &dyn Host, remotes: &[Remote], now: u64) -> Vec<Fetched> {
        let mut ended = Vec::new();
        for (i, r) in remotes.iter().enumerate() {
            self.sync(host, i);
            let Some(slot) = self.slots.get_mut(i) else { continue };
            if slot.in_flight.is_some() || now < slot.state.next_fetch_ns {
                continue;
            }
            let until = now.saturating_add(ns(r.timeout + LEASE_MARGIN));
            // A lease still running belongs to another worker, who is fetching.
            match update_u64(host, &slot.lease_key, |held| if now < held { Err(()) } else { Ok((until, ())) }) {
                Ok(Update::Done(())) => {}
                Ok(Update::Declined(())) => continue,
                Err(e) => {
                    host.log(LogLevel::Warn, &format!("meshwasm.authz: JWKS lease {}: {e}", slot.lease_key));
                    continue;
                }
            }
            // The worker that held the lease before may just have finished.
            self.sync(host, i);
            let Some(slot) = self.slots.get_mut(i) else { continue };
            if now < slot.state.next_fetch_ns {
                release(host, &slot.lease_key, until);
                continue;
            }
            let headers = vec![
                (":method".to_string(), "GET".to_string()),
                (":scheme".to_string(), r.scheme.clone()),
                (":authority".to_string(), r.authority.clone()),
                (":path".to_string(), r.path.clone()),
            ];
            match host.http_call(&HttpCall { cluster: &r.cluster, headers: &headers, body: &[], timeout: r.timeout }) {
                Ok(token) => {
                    host.log(LogLevel::Debug, &format!("meshwasm.authz: JWKS {}: fetch {token} started", r.uri));
                    slot.in_flight = Some((token, until));
                }
                Err(e) => {
                    let why = format!("cannot call cluster {:?}: {e}", r.cluster);
                    ended.push(self.fail(host, i, now, until, why));
                }
            }
        }
        ended
    }

    /// A fetch this worker started ended.
    pub fn on_reply(
        &mut self,
        host: &dyn Host,
        remotes: &[Remote],
        token: u32,
        reply: &HttpReply,
        now: u64,
    ) -> Option<Fetched> {
        let i = self.slots.iter().position(|s| s.in_flight.is_some_and(|(t, _)| t == token))?;
        let until = self.slots.get_mut(i)?.in_flight.take().map_or(0, |(_, u)| u);
        let r = remotes.get(i)?;
        let (jwks, body) = match evaluate(reply) {
            Ok(v) => v,
            Err(why) => return Some(self.fail(host, i, now, until, why)),
        };
        self.sync(host, i);
        let slot = self.slots.get_mut(i)?;
        let prev = slot.state;
        let version = prev.version.wrapping_add(1).max(1);
        let state = State {
            version,
            expires_ns: now.saturating_add(ns(r.cache_duration)),
            next_fetch_ns: now.saturating_add(ns(refresh_after(r.cache_duration))),
            attempt_end_ns: now,
            attempts: prev.attempts.wrapping_add(1),
            ok: true,
        };
        let mut blob = Vec::with_capacity(body.len() + 8);
        blob.extend_from_slice(&encode_u64(version));
        blob.extend_from_slice(body);
        let keys = jwks.keys.len();
        // Keys first: a worker that sees the new state finds its set.
        if let Err(e) = host
            .set_shared_data(&slot.keys_key, &blob, None)
            .and_then(|()| host.set_shared_data(&slot.state_key, &state.encode(), None))
        {
            host.log(LogLevel::Warn, &format!("meshwasm.authz: cannot share the JWKS of {}: {e}", r.uri));
        }
        slot.state = state;
        slot.installed = Some(Installed { version, expires_ns: state.expires_ns, jwks: Rc::new(jwks) });
        release(host, &slot.lease_key, until);
        Some(Fetched::Success { source: i, version, keys })
    }

    /// Record a failed attempt: the set in use (if any) stays until it expires.
    fn fail(&mut self, host: &dyn Host, i: usize, now: u64, until: u64, why: String) -> Fetched {
        self.sync(host, i);
        if let Some(slot) = self.slots.get_mut(i) {
            let prev = slot.state;
            let state = State {
                next_fetch_ns: now.saturating_add(ns(FAILED_REFETCH)),
                attempt_end_ns: now,
                attempts: prev.attempts.wrapping_add(1),
                ok: false,
                ..prev
            };
            if let Err(e) = host.set_shared_data(&slot.state_key, &state.encode(), None) {
                host.log(LogLevel::Warn, &format!("meshwasm.authz: JWKS state {}: {e}", slot.state_key));
            }
            slot.state = state;
            release(host, &slot.lease_key, until);
        }
        Fetched::Failed { source: i, why }
    }

    /// How long the root may sleep: until the earliest fetch due, at most [`POLL`].
    pub fn next_wake(&self, now: u64) -> Duration {
        let mut wake = POLL;
        for s in &self.slots {
            if s.in_flight.is_none() {
                let due = Duration::from_nanos(s.state.next_fetch_ns.saturating_sub(now));
                wake = wake.min(due.max(Duration::from_millis(1)));
            }
        }
        wake
    }
}

/// Give the lease back if it is still the one taken (CAS: another worker may hold a later one).
fn release(host: &dyn Host, key: &str, until: u64) {
    let _ = update_u64(host, key, |held| if held == until { Ok((0, ())) } else { Err(()) });
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwasm_sdk_ext::fake::{http_reply, FakeHost};
    use meshwasm_sdk_ext::{HostError, HttpResponse};

    const JWKS: &str = r#"{"keys":[{"kty":"oct","kid":"k1","k":"c2VjcmV0"}]}"#;
    const JWKS2: &str = r#"{"keys":[{"kty":"oct","kid":"k2","k":"c2VjcmV0"},{"kty":"oct","kid":"k3","k":"eA"}]}"#;

    fn remote() -> Remote {
        Remote {
            uri: "http://keys/jwks".into(),
            cluster: "keys".into(),
            scheme: "http".into(),
            authority: "keys".into(),
            path: "/jwks".into(),
            cache_duration: Duration::from_secs(60),
            timeout: Duration::from_secs(2),
        }
    }

    fn ok(body: &str) -> HttpReply {
        http_reply("200", &[], body)
    }

    fn status(code: &str) -> HttpReply {
        http_reply(code, &[], "x")
    }

    fn now(h: &FakeHost) -> u64 {
        h.monotonic_ns()
    }

    fn kids(l: &Lookup) -> Vec<String> {
        match l {
            Lookup::Ready(j, _) => j.keys.iter().map(|k| k.kid.clone()).collect(),
            other => panic!("not ready: {other:?}"),
        }
    }

    #[test]
    fn one_worker_fetches_the_other_reads_the_shared_copy() {
        let h = FakeHost::new();
        let rs = [remote()];
        let mut a = Fetcher::new(&h, "p", &rs);
        let mut b = Fetcher::new(&h, "p", &rs);
        let t0 = now(&h);
        assert!(matches!(a.lookup(&h, 0, t0, t0), Lookup::Pending));
        assert!(a.tick(&h, &rs, t0).is_empty());
        assert!(b.tick(&h, &rs, t0).is_empty());
        let calls = h.http_calls.borrow().clone();
        assert_eq!(calls.len(), 1, "one fetch for two workers");
        assert_eq!(calls[0].cluster, "keys");
        assert_eq!(calls[0].header(":path"), Some("/jwks"));
        assert_eq!(calls[0].header(":authority"), Some("keys"));
        assert_eq!(calls[0].header(":method"), Some("GET"));
        assert_eq!(calls[0].timeout, Duration::from_secs(2));
        assert!(matches!(b.lookup(&h, 0, t0, t0), Lookup::Pending));
        h.advance(Duration::from_millis(10));
        let t1 = now(&h);
        let done = a.on_reply(&h, &rs, calls[0].token, &ok(JWKS), t1);
        assert_eq!(done, Some(Fetched::Success { source: 0, version: 1, keys: 1 }));
        assert_eq!(kids(&a.lookup(&h, 0, t1, t0)), ["k1"]);
        assert_eq!(kids(&b.lookup(&h, 0, t1, t0)), ["k1"]);
        // The lease is free again, and nothing is due until the refresh.
        assert_eq!(h.shared_u64("meshwasm.authz.jwks/p/keys/http://keys/jwks/lease"), Some(0));
        assert_eq!(a.next_wake(t1), POLL);
        b.tick(&h, &rs, t1);
        assert_eq!(h.http_calls.borrow().len(), 1);
    }

    #[test]
    fn refresh_before_expiry_keeps_the_old_set_on_failure_until_it_expires() {
        let h = FakeHost::new();
        let rs = [remote()];
        let mut a = Fetcher::new(&h, "p", &rs);
        let t0 = now(&h);
        a.tick(&h, &rs, t0);
        let tok = h.http_calls.borrow()[0].token;
        a.on_reply(&h, &rs, tok, &ok(JWKS), t0);
        // 55 s later (60 s cache, refresh 5 s before): a refresh is due.
        h.advance(Duration::from_secs(55));
        let t = now(&h);
        a.tick(&h, &rs, t);
        assert_eq!(h.http_calls.borrow().len(), 2);
        let tok = h.http_calls.borrow()[1].token;
        let f = a.on_reply(&h, &rs, tok, &status("503"), t);
        assert!(matches!(f, Some(Fetched::Failed { ref why, .. }) if why == "status 503"), "{f:?}");
        // Kept, retried 1 s later (garbage this time), still kept.
        assert_eq!(kids(&a.lookup(&h, 0, t, t)), ["k1"]);
        h.advance(FAILED_REFETCH);
        let t = now(&h);
        a.tick(&h, &rs, t);
        let tok = h.http_calls.borrow()[2].token;
        assert!(matches!(a.on_reply(&h, &rs, tok, &ok("garbage"), t), Some(Fetched::Failed { .. })));
        assert_eq!(kids(&a.lookup(&h, 0, t, t)), ["k1"]);
        // At expiry the old set is gone: a request waits, then fails when the next attempt does.
        h.advance(Duration::from_secs(4));
        let t = now(&h);
        assert!(matches!(a.lookup(&h, 0, t, t), Lookup::Pending));
        a.tick(&h, &rs, t);
        let tok = h.http_calls.borrow().last().unwrap().token;
        h.advance(Duration::from_millis(5));
        let t2 = now(&h);
        a.on_reply(&h, &rs, tok, &HttpReply::Failed, t2);
        assert!(matches!(a.lookup(&h, 0, t2, t), Lookup::Failed));
        // A request arriving after that failure waits for the next attempt.
        assert!(matches!(a.lookup(&h, 0, t2 + 1, t2 + 1), Lookup::Pending));
        // Rotation: the next success replaces the set, under a new version.
        h.advance(FAILED_REFETCH);
        let t3 = now(&h);
        a.tick(&h, &rs, t3);
        let tok = h.http_calls.borrow().last().unwrap().token;
        a.on_reply(&h, &rs, tok, &ok(JWKS2), t3);
        let l = a.lookup(&h, 0, t3, t3);
        assert_eq!(kids(&l), ["k2", "k3"]);
        assert!(matches!(l, Lookup::Ready(_, 2)));
    }

    #[test]
    fn a_refresh_by_another_worker_is_picked_up_and_parsed_once() {
        let h = FakeHost::new();
        let rs = [remote()];
        let mut a = Fetcher::new(&h, "p", &rs);
        let mut b = Fetcher::new(&h, "p", &rs);
        let t0 = now(&h);
        a.tick(&h, &rs, t0);
        let tok = h.http_calls.borrow()[0].token;
        a.on_reply(&h, &rs, tok, &ok(JWKS), t0);
        assert_eq!(kids(&b.lookup(&h, 0, t0, t0)), ["k1"]);
        h.advance(Duration::from_secs(55));
        let t = now(&h);
        // b wins the refresh this time.
        b.tick(&h, &rs, t);
        a.tick(&h, &rs, t);
        assert_eq!(h.http_calls.borrow().len(), 2);
        let tok = h.http_calls.borrow()[1].token;
        assert!(a.on_reply(&h, &rs, tok, &ok(JWKS2), t).is_none(), "a did not start it");
        b.on_reply(&h, &rs, tok, &ok(JWKS2), t);
        // a still uses its valid set until its root tick reads the new version.
        assert_eq!(kids(&a.lookup(&h, 0, t, t)), ["k1"]);
        a.tick(&h, &rs, t);
        assert_eq!(kids(&a.lookup(&h, 0, t, t)), ["k2", "k3"]);
        let Lookup::Ready(j1, _) = a.lookup(&h, 0, t, t) else { panic!() };
        let Lookup::Ready(j2, _) = a.lookup(&h, 0, t, t) else { panic!() };
        assert!(Rc::ptr_eq(&j1, &j2), "parsed once per version");
    }

    #[test]
    fn a_lease_held_elsewhere_is_respected_until_it_runs_out() {
        let h = FakeHost::new();
        let rs = [remote()];
        let mut a = Fetcher::new(&h, "p", &rs);
        let mut b = Fetcher::new(&h, "p", &rs);
        let t0 = now(&h);
        a.tick(&h, &rs, t0);
        // a's worker never answers (it went away): b fetches once the lease (timeout + 1 s) ends.
        h.advance(Duration::from_secs(2));
        b.tick(&h, &rs, now(&h));
        assert_eq!(h.http_calls.borrow().len(), 1);
        h.advance(Duration::from_millis(1001));
        b.tick(&h, &rs, now(&h));
        assert_eq!(h.http_calls.borrow().len(), 2);
    }

    #[test]
    fn a_callout_that_cannot_start_is_a_failure() {
        let h = FakeHost::new();
        let rs = [remote()];
        let mut a = Fetcher::new(&h, "p", &rs);
        h.http_call_error.set(Some(HostError::BadArgument));
        let t0 = now(&h);
        let ended = a.tick(&h, &rs, t0);
        assert!(matches!(&ended[..], [Fetched::Failed { source: 0, why }] if why.contains("keys")), "{ended:?}");
        assert!(matches!(a.lookup(&h, 0, t0, t0), Lookup::Failed));
        assert_eq!(a.next_wake(t0), FAILED_REFETCH);
    }

    #[test]
    fn replies_that_are_not_key_sets() {
        let big = HttpReply::Response(HttpResponse {
            headers: vec![(":status".into(), "200".into())],
            body: JWKS.as_bytes().to_vec(),
            body_size: 2 << 20,
            trailers: vec![],
        });
        for (r, want) in [
            (HttpReply::Failed, "no response"),
            (status("404"), "status 404"),
            (ok(""), "empty body"),
            (ok("{}"), "[keys]"),
            (ok(r#"{"keys":[{"kty":"RSA"}]}"#), "valid public key"),
            (big, "larger"),
        ] {
            let e = evaluate(&r).unwrap_err();
            assert!(e.contains(want), "{e} / {want}");
        }
        assert!(evaluate(&ok(JWKS)).is_ok());
    }

    #[test]
    fn state_round_trips() {
        let s = State { version: 3, expires_ns: 9, next_fetch_ns: 7, attempt_end_ns: 5, attempts: 4, ok: true };
        assert_eq!(State::decode(&s.encode()), Some(s));
        assert_eq!(State::decode(b"short"), None);
    }
}
