//! The authz stream context: reads what the policies need (one header-map read, a few
//! properties, the peer certificate only when identities are used), runs CUSTOM (a paused
//! callout to the authorizer), then AUDIT, DENY and ALLOW, and replies as Envoy's RBAC and
//! ext_authz filters do.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use meshwasm_sdk_ext::config::ConfigError;
use meshwasm_sdk_ext::host::plugin_name;
use meshwasm_sdk_ext::metrics::{define, rule_metric_name};
use meshwasm_sdk_ext::{
    Flow, GrpcCall, GrpcReply, HeaderMap, Headers, Host, HttpCall, HttpFilter, HttpReply, LocalReply, LogLevel,
    MetricKind, Plugin,
};

use crate::authn::{self, Env, KeyState, Keys, Op};
use crate::config::{DirectAddress, ProviderKind, DIRECT_ADDRESS_FILTER_STATE};
use crate::extauthz::{self, CheckInput, Outcome};
use crate::jwt::{Jwt, Status};
use crate::policy::{self, Config, NamedPolicy, Verdict};
use crate::rbac::{Attributes, PeerIdentity};
use crate::remote::{Fetched, Fetcher, Lookup};

pub const NAME: &str = "authz";
const DENIED_BODY: &str = "RBAC: access denied";

// === impl metrics ===

/// Metric ids: filter-wide, per policy label, per provider.
#[derive(Debug, Default)]
struct Ids {
    allowed: Option<u32>,
    denied: Option<u32>,
    shadow_allowed: Option<u32>,
    shadow_denied: Option<u32>,
    /// label → [allowed, denied, shadow_allowed, shadow_denied, audited]
    policies: Vec<(String, [Option<u32>; 5])>,
    /// [ok, denied, error, failure_mode_allowed]
    provider: [Option<u32>; 4],
    /// JWT: [allowed, denied, cache_hits, verified, jwks_fetch_success, jwks_fetch_failed]
    jwt: [Option<u32>; 6],
    /// JWT denials by reason (`Status::reason`).
    jwt_denied: Vec<(&'static str, Option<u32>)>,
    /// Per remote key set (label `rule="<jwksUri>"`): [jwks_fetch_success, jwks_fetch_failed].
    jwks: Vec<[Option<u32>; 2]>,
}

const JWT_STATS: [&str; 6] = ["allowed", "denied", "cache_hits", "verified", "jwks_fetch_success", "jwks_fetch_failed"];
const JWT_REASONS: [&str; 10] = [
    "missing",
    "not_yet_valid",
    "expired",
    "unknown_issuer",
    "audience",
    "signature",
    "no_key",
    "jwks_fetch",
    "malformed",
    "ok",
];

#[derive(Clone, Copy)]
enum JwtStat {
    Allowed = 0,
    Denied = 1,
    CacheHits = 2,
    Verified = 3,
    FetchSuccess = 4,
    FetchFailed = 5,
}

const POLICY_STATS: [&str; 5] = ["allowed", "denied", "shadow_allowed", "shadow_denied", "audited"];
const PROVIDER_STATS: [&str; 4] = ["ok", "denied", "error", "failure_mode_allowed"];

#[derive(Clone, Copy)]
enum Stat {
    Allowed = 0,
    Denied = 1,
    ShadowAllowed = 2,
    ShadowDenied = 3,
    Audited = 4,
}

#[derive(Clone, Copy)]
enum ProviderStat {
    Ok = 0,
    Denied = 1,
    Error = 2,
    FailureModeAllowed = 3,
}

fn bump(host: &dyn Host, id: Option<u32>) {
    if let Some(id) = id {
        if let Err(e) = host.increment_metric(id, 1) {
            host.log(LogLevel::Debug, &format!("meshwasm.authz: metric: {e}"));
        }
    }
}

// === impl AuthzPlugin ===

pub struct AuthzPlugin {
    pub config: Config,
    ids: Ids,
    name: String,
    /// Verified tokens of this worker (an optimisation: every time check still runs).
    cache: RefCell<TokenCache>,
    /// Remote key sets: this worker's parsed copies, the fetches it runs for the process.
    fetcher: RefCell<Fetcher>,
    /// `tick` ran once (the call right after `configure`).
    ticked: std::cell::Cell<bool>,
}

// === impl TokenCache ===

/// One provider's verified tokens: token → (key set generation, token).
type ProviderTokens = HashMap<Box<str>, (u64, Rc<Jwt>), TokenHashing>;

/// The cache's hashing: SipHash with random keys (std's), over a token's length, its first
/// 16 and its last 48 bytes rather than all of it. A token's tail is its signature, so
/// distinct verified tokens keep distinct hashes; a crafted token sharing those bytes with a
/// cached one only costs the exact comparison that follows every hash match (a hit is still
/// the whole token, equal), and only verified tokens are ever inserted. Hashing ~550 bytes
/// of an RS256 token was a tenth of a cached request's own work in the native profile.
#[derive(Clone, Default)]
struct TokenHashing(std::collections::hash_map::RandomState);

impl std::hash::BuildHasher for TokenHashing {
    type Hasher = TokenHasher;
    fn build_hasher(&self) -> TokenHasher {
        TokenHasher(self.0.build_hasher())
    }
}

struct TokenHasher(std::collections::hash_map::DefaultHasher);

impl std::hash::Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0.finish()
    }

    fn write(&mut self, bytes: &[u8]) {
        const HEAD: usize = 16;
        const TAIL: usize = 48;
        match (bytes.get(..HEAD), bytes.len().checked_sub(TAIL).and_then(|at| bytes.get(at..))) {
            (Some(head), Some(tail)) if bytes.len() > HEAD + TAIL => {
                self.0.write_usize(bytes.len());
                self.0.write(head);
                self.0.write(tail);
            }
            _ => self.0.write(bytes),
        }
    }
}

/// Most tokens remembered per worker.
pub const TOKEN_CACHE_SIZE: usize = 1024;
/// Most token bytes remembered per worker (the cache keeps each token to compare it).
pub const TOKEN_CACHE_BYTES: usize = 1 << 20;

/// Verified tokens, per provider, each valid for the key set generation that verified it (a
/// rotation forgets them) and dropped after its `exp`. Keyed by the token itself: the map
/// finds it by its (SipHash, randomly keyed) hash and a hit is an exact comparison of the
/// whole token, so no forged token can ever alias a verified one. (A SHA-256 of the token
/// as the key cost more per request in the VM than the rest of a cached request.)
#[derive(Default)]
pub struct TokenCache {
    entries: Vec<ProviderTokens>,
    len: usize,
    bytes: usize,
}

impl TokenCache {
    fn get(&self, provider: usize, token: &str, generation: u64, now: u64) -> Option<Rc<Jwt>> {
        let (g, jwt) = self.entries.get(provider)?.get(token)?;
        (*g == generation && (jwt.exp == 0 || now <= jwt.exp.saturating_add(crate::jwt::CLOCK_SKEW_SECONDS)))
            .then(|| Rc::clone(jwt))
    }

    fn put(&mut self, provider: usize, token: &str, generation: u64, jwt: Rc<Jwt>, now: u64) {
        if token.len() > TOKEN_CACHE_BYTES / 16 {
            return; // a huge token is verified each time rather than crowding out the rest
        }
        if self.len >= TOKEN_CACHE_SIZE || self.bytes + token.len() > TOKEN_CACHE_BYTES {
            let skew = crate::jwt::CLOCK_SKEW_SECONDS;
            for m in &mut self.entries {
                m.retain(|_, (_, j)| j.exp == 0 || now <= j.exp.saturating_add(skew));
            }
            self.recount();
            if self.len >= TOKEN_CACHE_SIZE || self.bytes + token.len() > TOKEN_CACHE_BYTES {
                self.entries.iter_mut().for_each(HashMap::clear);
                self.recount();
            }
        }
        if self.entries.len() <= provider {
            self.entries.resize_with(provider + 1, HashMap::default);
        }
        let Some(m) = self.entries.get_mut(provider) else { return };
        if m.insert(token.into(), (generation, jwt)).is_none() {
            self.len += 1;
            self.bytes += token.len();
        }
    }

    fn recount(&mut self) {
        self.len = self.entries.iter().map(HashMap::len).sum();
        self.bytes = self.entries.iter().flat_map(HashMap::keys).map(|k| k.len()).sum();
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Plugin for AuthzPlugin {
    const NAME: &'static str = NAME;
    type Filter = AuthzFilter;

    fn configure(bytes: &[u8], host: &dyn Host) -> Result<Self, ConfigError> {
        let config = policy::parse(bytes)?;
        let mut ids = Ids {
            allowed: define(host, MetricKind::Counter, "meshwasm.authz.allowed"),
            denied: define(host, MetricKind::Counter, "meshwasm.authz.denied"),
            shadow_allowed: define(host, MetricKind::Counter, "meshwasm.authz.shadow_allowed"),
            shadow_denied: define(host, MetricKind::Counter, "meshwasm.authz.shadow_denied"),
            ..Ids::default()
        };
        for label in &config.labels {
            let stats = POLICY_STATS.map(|s| define(host, MetricKind::Counter, &rule_metric_name(NAME, label, s)));
            ids.policies.push((label.clone(), stats));
        }
        if let Some(p) = &config.provider {
            ids.provider = PROVIDER_STATS
                .map(|s| define(host, MetricKind::Counter, &format!("meshwasm.authz.provider.{}.{s}", p.name)));
        }
        if !config.authn.is_empty() {
            ids.jwt = JWT_STATS.map(|s| define(host, MetricKind::Counter, &format!("meshwasm.authz.jwt.{s}")));
            ids.jwt_denied = JWT_REASONS
                .iter()
                .filter(|r| **r != "ok")
                .map(|r| (*r, define(host, MetricKind::Counter, &format!("meshwasm.authz.jwt.denied_{r}"))))
                .collect();
        }
        ids.jwks = config
            .authn
            .remotes
            .iter()
            .map(|r| {
                ["jwks_fetch_success", "jwks_fetch_failed"]
                    .map(|s| define(host, MetricKind::Counter, &rule_metric_name(NAME, &r.uri, s)))
            })
            .collect();
        let name = plugin_name(host);
        let fetcher = RefCell::new(Fetcher::new(host, &name, &config.authn.remotes));
        Ok(Self { config, ids, name, cache: RefCell::default(), fetcher, ticked: Default::default() })
    }

    fn tick(&self, host: &dyn Host) -> Option<Duration> {
        let remotes = &self.config.authn.remotes;
        if remotes.is_empty() {
            return None;
        }
        if !self.ticked.replace(true) {
            // Not from `on_configure`: Envoy configures a throw-away VM on the main thread
            // and destroys it at once; a fetch started there would hold the lease (and so
            // delay every worker's first fetch) until the lease ran out. Its timer never fires.
            return Some(Duration::from_millis(1));
        }
        let now = host.monotonic_ns();
        let mut fetcher = self.fetcher.borrow_mut();
        for f in fetcher.tick(host, remotes, now) {
            self.fetched(host, &f);
        }
        Some(fetcher.next_wake(now))
    }

    fn on_http_reply(&self, host: &dyn Host, token: u32, reply: HttpReply) -> Option<Duration> {
        let remotes = &self.config.authn.remotes;
        let now = host.monotonic_ns();
        let mut fetcher = self.fetcher.borrow_mut();
        match fetcher.on_reply(host, remotes, token, &reply, now) {
            Some(f) => self.fetched(host, &f),
            None => self.log(host, LogLevel::Debug, &format!("reply for unknown JWKS fetch {token}")),
        }
        (!remotes.is_empty()).then(|| fetcher.next_wake(now))
    }

    fn new_filter(self: &Rc<Self>, _context_id: u32, _seed: u64) -> AuthzFilter {
        AuthzFilter {
            plugin: Rc::clone(self),
            state: State::Start,
            attrs: Attrs { own_jwt: !self.config.authn.is_empty(), ..Attrs::default() },
            downstream: Downstream::default(),
        }
    }
}

impl AuthzPlugin {
    fn count(&self, host: &dyn Host, p: &NamedPolicy, stat: Stat) {
        let id = self
            .ids
            .policies
            .iter()
            .find(|(l, _)| *l == p.label)
            .and_then(|(_, s)| s.get(stat as usize).copied().flatten());
        bump(host, id);
    }

    fn count_jwt(&self, host: &dyn Host, stat: JwtStat, n: u32) {
        if n > 0 {
            if let Some(id) = self.ids.jwt.get(stat as usize).copied().flatten() {
                let _ = host.increment_metric(id, i64::from(n));
            }
        }
    }

    /// Count and log how a JWKS fetch ended.
    fn fetched(&self, host: &dyn Host, f: &Fetched) {
        let (source, stat, i) = match f {
            Fetched::Success { source, .. } => (*source, JwtStat::FetchSuccess, 0),
            Fetched::Failed { source, .. } => (*source, JwtStat::FetchFailed, 1),
        };
        self.count_jwt(host, stat, 1);
        bump(host, self.ids.jwks.get(source).and_then(|s| s.get(i)).copied().flatten());
        let uri = self.config.authn.remotes.get(source).map_or("", |r| r.uri.as_str());
        match f {
            Fetched::Success { version, keys, .. } => {
                self.log(host, LogLevel::Info, &format!("JWKS {uri}: fetched version {version}, {keys} keys"))
            }
            Fetched::Failed { why, .. } => self.log(host, LogLevel::Warn, &format!("JWKS {uri}: fetch failed: {why}")),
        }
    }

    fn count_provider(&self, host: &dyn Host, stat: ProviderStat) {
        bump(host, self.ids.provider.get(stat as usize).copied().flatten());
    }

    fn log(&self, host: &dyn Host, level: LogLevel, msg: &str) {
        host.log(level, &format!("meshwasm.authz[{}]: {msg}", self.name));
    }
}

// === impl Attrs ===

/// The request as the matchers see it, read lazily from the host and cached for the stream.
#[derive(Debug, Default)]
struct Attrs {
    headers: Option<Headers>,
    /// `jwt_authn`'s edits of `headers`, applied when a policy first reads a header.
    edits: Option<authn::Edits>,
    destination: Option<Option<(Option<IpAddr>, Option<u32>)>>,
    remote: Option<Option<IpAddr>>,
    direct: Option<Option<IpAddr>>,
    sni: Option<String>,
    peer: Option<Option<PeerIdentity>>,
    metadata: Option<Vec<u8>>,
    /// This filter's `jwt_authn` result: `{"payload": {...}}` after a verified token.
    /// The verified token's normalized payload: `metadata.filter_metadata[jwt_authn].payload`.
    jwt: Option<Rc<serde_json::Value>>,
    /// RequestAuthentication is configured: `jwt_authn` metadata is `jwt`, not the host's.
    own_jwt: bool,
}

/// `1.2.3.4:80`, `[::1]:80` or a bare address.
fn parse_addr(s: &str) -> (Option<IpAddr>, Option<u32>) {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return (Some(ip), None);
    }
    match s.rsplit_once(':') {
        Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']').parse().ok(), p.parse().ok()),
        None => (None, None),
    }
}

fn prop_string(host: &dyn Host, path: &[&str]) -> Option<String> {
    host.property(path).and_then(|b| String::from_utf8(b).ok())
}

struct HostAttrs<'a> {
    host: &'a dyn Host,
    cache: &'a mut Attrs,
    direct_from: DirectAddress,
}

impl HostAttrs<'_> {
    fn all_headers(&mut self) -> &Headers {
        let host = self.host;
        let headers = self.cache.headers.get_or_insert_with(|| host.header_block(HeaderMap::RequestHeaders));
        if let Some(edits) = self.cache.edits.take() {
            *headers = edits.apply(headers);
        }
        headers
    }

    fn destination(&mut self) -> (Option<IpAddr>, Option<u32>) {
        let host = self.host;
        *self
            .cache
            .destination
            .get_or_insert_with(|| prop_string(host, &["destination", "address"]).map(|s| parse_addr(&s)))
            .as_ref()
            .unwrap_or(&(None, None))
    }
}

impl Attributes for HostAttrs<'_> {
    fn header(&mut self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        self.all_headers().joined(name)
    }
    fn path(&mut self) -> Option<&str> {
        self.all_headers().get(":path")
    }
    fn destination_ip(&mut self) -> Option<IpAddr> {
        self.destination().0
    }
    fn destination_port(&mut self) -> Option<u32> {
        self.destination().1
    }
    fn remote_ip(&mut self) -> Option<IpAddr> {
        let host = self.host;
        *self
            .cache
            .remote
            .get_or_insert_with(|| prop_string(host, &["source", "address"]).and_then(|s| parse_addr(&s).0))
    }
    fn direct_remote_ip(&mut self) -> Option<IpAddr> {
        if let Some(v) = self.cache.direct {
            return v;
        }
        let v = match self.direct_from {
            DirectAddress::SourceAddress => self.remote_ip(),
            DirectAddress::FilterState => prop_string(self.host, &["filter_state", DIRECT_ADDRESS_FILTER_STATE])
                .and_then(|s| parse_addr(s.trim()).0),
        };
        self.cache.direct = Some(v);
        v
    }
    fn requested_server_name(&mut self) -> String {
        let host = self.host;
        self.cache
            .sni
            .get_or_insert_with(|| prop_string(host, &["connection", "requested_server_name"]).unwrap_or_default())
            .clone()
    }
    fn peer(&mut self) -> Option<PeerIdentity> {
        let host = self.host;
        self.cache.peer.get_or_insert_with(|| read_peer(host)).clone()
    }
    fn metadata(&mut self, filter: &str, path: &[String]) -> Option<serde_json::Value> {
        if self.cache.own_jwt && filter == crate::istio::JWT_FILTER {
            let (first, rest) = path.split_first()?;
            if first != "payload" {
                return None;
            }
            let mut v: &serde_json::Value = self.cache.jwt.as_deref()?;
            for k in rest {
                v = v.get(k)?;
            }
            return Some(v.clone());
        }
        let host = self.host;
        let raw = self.cache.metadata.get_or_insert_with(|| host.property(&["metadata"]).unwrap_or_default());
        if raw.is_empty() {
            return None;
        }
        let ns = meshwasm_sdk_ext::props::metadata_namespace(raw, filter).ok().flatten()?;
        let mut v = &ns;
        for k in path {
            v = v.get(k)?;
        }
        Some(v.clone())
    }
}

/// The verified peer certificate's identities (`None` on plaintext or without a client
/// certificate).
fn read_peer(host: &dyn Host) -> Option<PeerIdentity> {
    let mtls = host.property(&["connection", "mtls"]).is_some_and(|b| b.first().is_some_and(|x| *x != 0));
    if !mtls {
        return None;
    }
    let (uri_sans, dns_sans) = host
        .property(&["connection", "peer_certificate"])
        .and_then(|pem| crate::x509::sans(&pem))
        .unwrap_or_else(|| {
            // Fall back to the first SAN of each kind Envoy exposes directly.
            let first = |k: &str| prop_string(host, &["connection", k]).into_iter().filter(|s| !s.is_empty()).collect();
            (first("uri_san_peer_certificate"), first("dns_san_peer_certificate"))
        });
    let subject = prop_string(host, &["connection", "subject_peer_certificate"]).unwrap_or_default();
    Some(PeerIdentity { uri_sans, dns_sans, subject })
}

// === impl HostEnv ===

/// How often a request waiting for a remote JWKS looks again.
const KEY_POLL: Duration = Duration::from_millis(20);

/// What verification reads from the worker: keys, the clock, the token cache.
struct HostEnv<'a> {
    plugin: &'a AuthzPlugin,
    host: &'a dyn Host,
    /// Monotonic ns, read when first needed (only remote key sets need it).
    now_ns: std::cell::OnceCell<u64>,
    /// When the request began waiting for keys (`None`: it has not, so now).
    waiting_since: Option<u64>,
    /// Wall-clock seconds, read once per request (a hostcall each time otherwise).
    unix_s: std::cell::OnceCell<u64>,
}

impl<'a> HostEnv<'a> {
    fn new(plugin: &'a AuthzPlugin, host: &'a dyn Host, waiting_since: Option<u64>) -> Self {
        Self { plugin, host, now_ns: std::cell::OnceCell::new(), waiting_since, unix_s: std::cell::OnceCell::new() }
    }

    fn unix_now(&self) -> u64 {
        *self.unix_s.get_or_init(|| unix_now(self.host))
    }

    fn now_ns(&self) -> u64 {
        *self.now_ns.get_or_init(|| self.host.monotonic_ns())
    }

    fn since_ns(&self) -> u64 {
        self.waiting_since.unwrap_or_else(|| self.now_ns())
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn unix_now(host: &dyn Host) -> u64 {
    host.now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Env for HostEnv<'_> {
    fn keys(&self, provider: usize) -> KeyState {
        let Some(p) = self.plugin.config.authn.providers.get(provider) else { return KeyState::Failed };
        match &p.keys {
            Keys::Inline(jwks) => KeyState::Ready(Rc::clone(jwks), 0),
            Keys::Remote(source) => {
                let (now, since) = (self.now_ns(), self.since_ns());
                match self.plugin.fetcher.borrow_mut().lookup(self.host, *source, now, since) {
                    Lookup::Ready(jwks, version) => KeyState::Ready(jwks, version),
                    Lookup::Failed => KeyState::Failed,
                    // The request waits for the keys at most its rule's `timeout`.
                    Lookup::Pending if now.saturating_sub(since) >= nanos(p.timeout) => KeyState::Failed,
                    Lookup::Pending => KeyState::Pending,
                }
            }
        }
    }
    fn now(&self) -> u64 {
        self.unix_now()
    }
    fn cached(&mut self, provider: usize, token: &str, generation: u64) -> Option<Rc<Jwt>> {
        self.plugin.cache.borrow().get(provider, token, generation, self.unix_now())
    }
    fn remember(&mut self, provider: usize, token: &str, generation: u64, jwt: Rc<Jwt>) {
        self.plugin.cache.borrow_mut().put(provider, token, generation, jwt, self.unix_now());
    }
}

// === impl AuthzFilter ===

#[derive(Debug)]
enum State {
    Start,
    /// Waiting for the body the check includes.
    AwaitBody(Box<CheckInput>),
    /// The check is in flight.
    Checking(u32),
    /// Waiting for a remote JWKS since `since` until `deadline` (monotonic ns).
    AwaitKeys {
        since: u64,
        deadline: u64,
    },
    Done,
}

pub struct AuthzFilter {
    plugin: Rc<AuthzPlugin>,
    state: State,
    attrs: Attrs,
    /// Headers the authorizer asked to put on the response.
    downstream: Downstream,
}

/// Response header mutations from an allowing authorizer, applied in Envoy's order.
#[derive(Debug, Default)]
struct Downstream {
    add: Vec<(String, String)>,
    set: Vec<(String, String)>,
    add_if_absent: Vec<(String, String)>,
    overwrite_if_exists: Vec<(String, String)>,
}

/// `path` with query parameters set (replaced or appended) and removed.
fn rewrite_query(path: &str, set: &[(String, String)], remove: &[String]) -> String {
    let (base, query) = path.split_once('?').unwrap_or((path, ""));
    let mut params: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect();
    params.retain(|(k, _)| !remove.contains(k));
    for (k, v) in set {
        match params.iter_mut().find(|(pk, _)| pk == k) {
            Some(p) => p.1 = v.clone(),
            None => params.push((k.clone(), v.clone())),
        }
    }
    if params.is_empty() {
        return base.to_string();
    }
    let q: Vec<String> =
        params.iter().map(|(k, v)| if v.is_empty() { k.clone() } else { format!("{k}={v}") }).collect();
    format!("{base}?{}", q.join("&"))
}

impl AuthzFilter {
    fn attrs<'a>(&'a mut self, host: &'a dyn Host) -> HostAttrs<'a> {
        HostAttrs {
            host,
            cache: &mut self.attrs,
            direct_from: self.plugin.config.direct_address.unwrap_or(DirectAddress::FilterState),
        }
    }

    fn deny(&mut self, host: &dyn Host, reply: LocalReply) -> Flow {
        self.state = State::Done;
        if let Err(e) = host.send_local_reply(&reply) {
            self.plugin.log(host, LogLevel::Debug, &format!("local reply: {e}"));
        }
        Flow::Pause
    }

    /// RequestAuthentication (after CUSTOM allowed, or when no CUSTOM policy matched), then
    /// AUDIT, DENY and ALLOW; a rejected token pre-empts the policies.
    fn authenticate(&mut self, host: &dyn Host) -> Flow {
        let plugin = Rc::clone(&self.plugin);
        let authn = &plugin.config.authn;
        if authn.is_empty() {
            return self.rbac(host);
        }
        let waiting = match self.state {
            State::AwaitKeys { since, deadline } => Some((since, deadline)),
            _ => None,
        };
        let mut env = HostEnv::new(&plugin, host, waiting.map(|(since, _)| since));
        let result = {
            let mut a = self.attrs(host);
            authn::authenticate(authn, a.all_headers(), &mut env)
        };
        let outcome = match result {
            Ok(o) => o,
            Err(authn::Pending) => {
                // Polled: another worker's fetch lands in shared data, not in this VM.
                let (since, now_ns) = (env.since_ns(), env.now_ns());
                let deadline = waiting.map_or_else(|| since.saturating_add(nanos(authn.max_timeout())), |(_, d)| d);
                self.state = State::AwaitKeys { since, deadline };
                let left = Duration::from_nanos(deadline.saturating_sub(now_ns));
                return Flow::Delay(left.clamp(Duration::from_millis(1), KEY_POLL));
            }
        };
        plugin.count_jwt(host, JwtStat::CacheHits, outcome.cache_hits);
        plugin.count_jwt(host, JwtStat::Verified, outcome.verified);
        for op in &outcome.ops {
            let _ = match op {
                Op::Remove(h) => host.set_header(HeaderMap::RequestHeaders, h, None),
                Op::Add(h, v) => host.add_header(HeaderMap::RequestHeaders, h, v),
                Op::SetPath(p) => host.set_header(HeaderMap::RequestHeaders, ":path", Some(p)),
            };
        }
        // The policies see the request as jwt_authn left it: `outcome.edits` are its removals
        // and additions, applied to the header view when a policy first reads a header.
        if !outcome.edits.is_empty() {
            self.attrs.edits = Some(outcome.edits);
        }
        self.attrs.jwt = outcome.payload;
        if outcome.status == Status::Ok {
            plugin.count_jwt(host, JwtStat::Allowed, 1);
            return self.rbac(host);
        }
        plugin.count_jwt(host, JwtStat::Denied, 1);
        let reason = outcome.status.reason();
        if let Some((_, id)) = plugin.ids.jwt_denied.iter().find(|(r, _)| *r == reason) {
            bump(host, *id);
        }
        bump(host, plugin.ids.denied);
        let uri = authn::Request::new(self.attrs(host).all_headers()).original_uri();
        let (status, body, www, details) = authn::rejection(outcome.status, &uri);
        plugin.log(host, LogLevel::Debug, &format!("jwt rejected: {body}"));
        self.deny(
            host,
            LocalReply { status, body, headers: vec![("www-authenticate".into(), www)], grpc_status: None, details },
        )
    }

    /// AUDIT, DENY and ALLOW.
    fn rbac(&mut self, host: &dyn Host) -> Flow {
        let plugin = Rc::clone(&self.plugin);
        let cfg = &plugin.config;
        let verdict: Verdict<'_> = {
            let mut a = self.attrs(host);
            policy::decide(cfg, &mut a)
        };
        if let Some(p) = verdict.audited {
            plugin.count(host, p, Stat::Audited);
            plugin.log(host, LogLevel::Info, &format!("audit: policy {} ({}) matched", p.resource, p.id));
        }
        for (shadow, kind) in [(verdict.shadow_deny, "DENY"), (verdict.shadow_allow, "ALLOW")] {
            let Some(s) = shadow else { continue };
            let (global, stat) = if s.allowed {
                (plugin.ids.shadow_allowed, Stat::ShadowAllowed)
            } else {
                (plugin.ids.shadow_denied, Stat::ShadowDenied)
            };
            bump(host, global);
            if let Some(p) = s.policy {
                plugin.count(host, p, stat);
            }
            let who = s
                .policy
                .map_or_else(|| "no policy matched".to_string(), |p| format!("policy {} ({})", p.resource, p.id));
            plugin.log(
                host,
                LogLevel::Info,
                &format!(
                    "dry-run {kind}: the request would be {} ({who})",
                    if s.allowed { "allowed" } else { "denied" }
                ),
            );
        }
        if verdict.allowed {
            self.state = State::Done;
            bump(host, plugin.ids.allowed);
            if let Some(p) = verdict.policy {
                plugin.count(host, p, Stat::Allowed);
            }
            return Flow::Continue;
        }
        bump(host, plugin.ids.denied);
        if let Some(p) = verdict.policy {
            plugin.count(host, p, Stat::Denied);
        }
        let id = verdict.policy.map_or("none", |p| p.id.as_str());
        plugin.log(host, LogLevel::Debug, &format!("denied: matched policy {id}"));
        self.deny(
            host,
            LocalReply {
                status: 403,
                body: DENIED_BODY.into(),
                headers: Vec::new(),
                grpc_status: None,
                details: format!("rbac_access_denied_matched_policy[{id}]"),
            },
        )
    }

    fn check_input(&mut self, host: &dyn Host) -> CheckInput {
        let headers = {
            let mut a = self.attrs(host);
            a.all_headers().to_vec()
        };
        CheckInput {
            headers,
            body: None,
            body_truncated: false,
            source_address: prop_string(host, &["source", "address"]),
            destination_address: prop_string(host, &["destination", "address"]),
            source_principal: prop_string(host, &["connection", "uri_san_peer_certificate"]),
            destination_principal: prop_string(host, &["connection", "uri_san_local_certificate"]),
            sni: prop_string(host, &["connection", "requested_server_name"]).filter(|s| !s.is_empty()),
            protocol: prop_string(host, &["request", "protocol"]),
            request_id: host.header(HeaderMap::RequestHeaders, "x-request-id"),
            time_unix_nanos: host
                .now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .and_then(|d| u64::try_from(d.as_nanos()).ok()),
        }
    }

    fn send_check(&mut self, host: &dyn Host, input: &CheckInput) -> Flow {
        let plugin = Rc::clone(&self.plugin);
        let Some(p) = plugin.config.provider.as_ref() else { return self.authenticate(host) };
        let started = match &p.kind {
            ProviderKind::Http(http) => {
                let (headers, body) = extauthz::http_check(p, http, input);
                host.http_call(&HttpCall { cluster: &p.cluster, headers: &headers, body: &body, timeout: p.timeout })
            }
            ProviderKind::Grpc => {
                let message = extauthz::grpc_check(p, input);
                host.grpc_call(&GrpcCall {
                    cluster: &p.cluster,
                    service: "envoy.service.auth.v3.Authorization",
                    method: "Check",
                    initial_metadata: &[],
                    message: &message,
                    timeout: p.timeout,
                })
            }
        };
        match started {
            Ok(token) => {
                self.state = State::Checking(token);
                Flow::Pause
            }
            Err(e) => self.outcome(
                host,
                Outcome::Error(format!("cannot call the authorizer through cluster {:?}: {e}", p.cluster)),
            ),
        }
    }

    /// Apply the authorizer's answer.
    fn outcome(&mut self, host: &dyn Host, outcome: Outcome) -> Flow {
        let plugin = Rc::clone(&self.plugin);
        let Some(p) = plugin.config.provider.as_ref() else { return self.authenticate(host) };
        match outcome {
            Outcome::Allow {
                upstream_set,
                upstream_append,
                upstream_remove,
                downstream,
                downstream_set,
                downstream_add_if_absent,
                downstream_overwrite_if_exists,
                query_set,
                query_remove,
            } => {
                plugin.count_provider(host, ProviderStat::Ok);
                let mutated = !(upstream_set.is_empty()
                    && upstream_append.is_empty()
                    && upstream_remove.is_empty()
                    && query_set.is_empty()
                    && query_remove.is_empty());
                for (k, v) in &upstream_set {
                    let _ = host.set_header(HeaderMap::RequestHeaders, k, Some(v));
                }
                for (k, v) in &upstream_append {
                    if let Some(old) = host.header(HeaderMap::RequestHeaders, k) {
                        let _ = host.set_header(HeaderMap::RequestHeaders, k, Some(&format!("{old},{v}")));
                    }
                }
                for k in &upstream_remove {
                    let _ = host.set_header(HeaderMap::RequestHeaders, k, None);
                }
                if !(query_set.is_empty() && query_remove.is_empty()) {
                    if let Some(path) = host.header(HeaderMap::RequestHeaders, ":path") {
                        let _ = host.set_header(
                            HeaderMap::RequestHeaders,
                            ":path",
                            Some(&rewrite_query(&path, &query_set, &query_remove)),
                        );
                    }
                }
                if mutated {
                    // Later policies see the request as the authorizer left it.
                    self.attrs.headers = None;
                    self.attrs.edits = None;
                }
                self.downstream = Downstream {
                    add: downstream,
                    set: downstream_set,
                    add_if_absent: downstream_add_if_absent,
                    overwrite_if_exists: downstream_overwrite_if_exists,
                };
                self.authenticate(host)
            }
            Outcome::Deny { status, body, headers } => {
                plugin.count_provider(host, ProviderStat::Denied);
                bump(host, plugin.ids.denied);
                self.deny(
                    host,
                    LocalReply { status, body, headers, grpc_status: None, details: "ext_authz_denied".into() },
                )
            }
            Outcome::Error(why) => {
                plugin.count_provider(host, ProviderStat::Error);
                plugin.log(host, LogLevel::Warn, &format!("provider {}: {why}", p.name));
                if p.fail_open {
                    plugin.count_provider(host, ProviderStat::FailureModeAllowed);
                    return self.authenticate(host);
                }
                bump(host, plugin.ids.denied);
                self.deny(
                    host,
                    LocalReply {
                        status: p.status_on_error,
                        body: String::new(),
                        headers: Vec::new(),
                        grpc_status: None,
                        details: "ext_authz_error".into(),
                    },
                )
            }
        }
    }
}

impl HttpFilter for AuthzFilter {
    fn on_request_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Flow {
        if !matches!(self.state, State::Start) {
            return Flow::Continue;
        }
        let plugin = Rc::clone(&self.plugin);
        let custom = {
            let mut a = self.attrs(host);
            policy::custom(&plugin.config, &mut a).is_some()
        };
        if !custom {
            return self.authenticate(host);
        }
        let input = self.check_input(host);
        let wants_body = plugin.config.provider.as_ref().is_some_and(|p| p.body.is_some());
        if wants_body && !end_of_stream {
            self.state = State::AwaitBody(Box::new(input));
            return Flow::Pause;
        }
        self.send_check(host, &input)
    }

    fn on_request_body(&mut self, host: &dyn Host, size: usize, end_of_stream: bool) -> Flow {
        match &self.state {
            State::AwaitBody(_) => {}
            State::Checking(_) | State::AwaitKeys { .. } => return Flow::Pause,
            _ => return Flow::Continue,
        }
        let plugin = Rc::clone(&self.plugin);
        let Some(limit) = plugin.config.provider.as_ref().and_then(|p| p.body) else { return Flow::Continue };
        let max = limit.max_request_bytes as usize;
        if !end_of_stream && size < max {
            return Flow::Pause; // Envoy keeps buffering
        }
        if !end_of_stream && size >= max && !limit.allow_partial_message {
            // Envoy's ext_authz answers 413 when the body outgrows the buffer it may send.
            return self.deny(
                host,
                LocalReply {
                    status: 413,
                    body: "Payload Too Large".into(),
                    headers: Vec::new(),
                    grpc_status: None,
                    details: "ext_authz_error".into(),
                },
            );
        }
        let State::AwaitBody(mut input) = std::mem::replace(&mut self.state, State::Done) else {
            return Flow::Continue;
        };
        let body = host.request_body(max);
        input.body_truncated = size > body.len();
        input.body = Some(body);
        self.send_check(host, &input)
    }

    fn on_request_trailers(&mut self, host: &dyn Host) -> Flow {
        // Trailers end a body the check was waiting for.
        if matches!(self.state, State::AwaitBody(_)) {
            let State::AwaitBody(mut input) = std::mem::replace(&mut self.state, State::Done) else {
                return Flow::Continue;
            };
            let max =
                self.plugin.config.provider.as_ref().and_then(|p| p.body).map_or(0, |b| b.max_request_bytes as usize);
            input.body = Some(host.request_body(max));
            return self.send_check(host, &input);
        }
        if matches!(self.state, State::Checking(_) | State::AwaitKeys { .. }) {
            return Flow::Pause;
        }
        Flow::Continue
    }

    fn on_response_headers(&mut self, host: &dyn Host, _end_of_stream: bool) -> Flow {
        let d = std::mem::take(&mut self.downstream);
        let map = HeaderMap::ResponseHeaders;
        for (k, v) in &d.add {
            let _ = host.add_header(map, k, v);
        }
        for (k, v) in &d.set {
            let _ = host.set_header(map, k, Some(v));
        }
        for (k, v) in &d.add_if_absent {
            if host.header(map, k).is_none() {
                let _ = host.add_header(map, k, v);
            }
        }
        for (k, v) in &d.overwrite_if_exists {
            if host.header(map, k).is_some() {
                let _ = host.set_header(map, k, Some(v));
            }
        }
        Flow::Continue
    }

    fn on_http_reply(&mut self, host: &dyn Host, token: u32, reply: HttpReply) -> Flow {
        if !matches!(self.state, State::Checking(t) if t == token) {
            return Flow::Pause;
        }
        let plugin = Rc::clone(&self.plugin);
        let outcome = match plugin.config.provider.as_ref().map(|p| (p, &p.kind)) {
            Some((p, ProviderKind::Http(http))) => extauthz::http_outcome(p, http, &reply),
            _ => Outcome::Error("HTTP reply for a gRPC provider".into()),
        };
        self.outcome(host, outcome)
    }

    fn on_grpc_reply(&mut self, host: &dyn Host, token: u32, reply: GrpcReply) -> Flow {
        if !matches!(self.state, State::Checking(t) if t == token) {
            return Flow::Pause;
        }
        let plugin = Rc::clone(&self.plugin);
        let outcome = match plugin.config.provider.as_ref() {
            Some(p) if p.kind == ProviderKind::Grpc => extauthz::grpc_outcome(p, &reply),
            _ => Outcome::Error("gRPC reply for an HTTP provider".into()),
        };
        self.outcome(host, outcome)
    }

    fn on_timer(&mut self, host: &dyn Host) -> Flow {
        if matches!(self.state, State::AwaitKeys { .. }) {
            return self.authenticate(host);
        }
        Flow::Continue
    }

    fn on_done(&mut self, _host: &dyn Host) {
        self.state = State::Done;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::b64_encode;
    use hmac::{KeyInit, Mac};
    use meshwasm_sdk_ext::fake::{http_reply, FakeHost};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const URI: &str = "http://keys.example/jwks.json";

    fn b64u(b: &[u8]) -> String {
        b64_encode(b).trim_end_matches('=').replace('+', "-").replace('/', "_")
    }

    fn token(kid: &str, exp: u64) -> String {
        let h = json!({"alg": "HS256", "kid": kid}).to_string();
        let p = json!({"iss": "iss1", "sub": "alice", "exp": exp}).to_string();
        let data = format!("{}.{}", b64u(h.as_bytes()), b64u(p.as_bytes()));
        let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SECRET).unwrap();
        m.update(data.as_bytes());
        format!("{data}.{}", b64u(&m.finalize().into_bytes()))
    }

    fn jwks(kid: &str) -> String {
        json!({"keys": [{"kty": "oct", "kid": kid, "k": b64u(SECRET)}]}).to_string()
    }

    fn plugin(host: &FakeHost, timeout: &str) -> Rc<AuthzPlugin> {
        let cfg = json!({
            "authentication": [{"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
                "metadata": {"name": "ra", "namespace": "foo"},
                "spec": {"jwtRules": [{"issuer": "iss1", "jwksUri": URI, "timeout": timeout}]}}],
            "jwks": {URI: {"cluster": "keys", "cacheDuration": "60s"}},
        });
        Rc::new(AuthzPlugin::configure(cfg.to_string().as_bytes(), host).unwrap())
    }

    fn request(host: &FakeHost, auth: Option<&str>) {
        let mut h = vec![(":method".to_string(), "GET".to_string()), (":path".into(), "/".into())];
        h.push((":authority".into(), "h".into()));
        if let Some(t) = auth {
            h.push(("authorization".into(), format!("Bearer {t}")));
        }
        *host.request_headers.borrow_mut() = h;
    }

    fn exp(host: &FakeHost) -> u64 {
        unix_now(host) + 600
    }

    #[test]
    fn the_token_cache_hits_only_the_exact_token_and_stays_within_its_budgets() {
        let jwt = |exp: u64| {
            let mut j = crate::jwt::Jwt::parse(&token("k1", exp)).unwrap();
            j.exp = exp;
            Rc::new(j)
        };
        let mut c = TokenCache::default();
        let now = 1_000;
        c.put(0, "aaaa.bbbb.cccc", 1, jwt(now + 100), now);
        assert!(c.get(0, "aaaa.bbbb.cccc", 1, now).is_some());
        for other in ["aaaa.bbbb.ccc", "aaaa.bbbb.ccccc", "aaaa.bbbb.cccC", ""] {
            assert!(c.get(0, other, 1, now).is_none(), "{other:?}");
        }
        assert!(c.get(1, "aaaa.bbbb.cccc", 1, now).is_none(), "another provider");
        assert!(c.get(0, "aaaa.bbbb.cccc", 2, now).is_none(), "another key generation");
        assert!(c.get(0, "aaaa.bbbb.cccc", 1, now + 100 + 61).is_none(), "expired beyond the skew");
        // Long tokens hash by length, head and tail only: ones equal there still never alias.
        let (head, tail) = ("h".repeat(16), "t".repeat(48));
        let long = |middle: &str| format!("{head}{middle}{tail}");
        c.put(0, &long("one.two"), 1, jwt(now + 100), now);
        c.put(0, &long("one.twO"), 1, jwt(now + 200), now);
        assert_eq!(c.get(0, &long("one.two"), 1, now).map(|j| j.exp), Some(now + 100));
        assert_eq!(c.get(0, &long("one.twO"), 1, now).map(|j| j.exp), Some(now + 200));
        assert!(c.get(0, &long("one.tw0"), 1, now).is_none(), "same length, head and tail");
        // Entries: never more than TOKEN_CACHE_SIZE.
        for i in 0..TOKEN_CACHE_SIZE + 10 {
            c.put(0, &format!("t{i}"), 1, jwt(now + 100), now);
            assert!(c.len() <= TOKEN_CACHE_SIZE);
        }
        // Bytes: never more than TOKEN_CACHE_BYTES; a huge token is not kept at all.
        let big = "x".repeat(TOKEN_CACHE_BYTES / 16 - 10);
        for i in 0..40 {
            c.put(0, &format!("{big}{i}"), 1, jwt(now + 100), now);
            assert!(
                c.bytes <= TOKEN_CACHE_BYTES
                    && c.bytes == c.entries.iter().flat_map(HashMap::keys).map(|k| k.len()).sum::<usize>()
            );
        }
        let huge = "y".repeat(TOKEN_CACHE_BYTES / 16 + 1);
        c.put(0, &huge, 1, jwt(now + 100), now);
        assert!(c.get(0, &huge, 1, now).is_none());
    }

    #[test]
    fn a_request_waits_for_the_first_fetch_then_verifies() {
        let host = FakeHost::new();
        let p = plugin(&host, "5s");
        // The call right after configure only schedules the first fetch.
        assert_eq!(p.tick(&host), Some(Duration::from_millis(1)));
        assert!(host.http_calls.borrow().is_empty());
        assert_eq!(p.tick(&host), Some(POLL_OR_LESS));
        let call = host.http_calls.borrow()[0].clone();
        assert_eq!((call.cluster.as_str(), call.header(":path")), ("keys", Some("/jwks.json")));
        // No token: not delayed by the missing key set.
        request(&host, None);
        assert_eq!(p.new_filter(1, 0).on_request_headers(&host, true), Flow::Continue);
        // A token waits.
        request(&host, Some(&token("k1", exp(&host))));
        let mut f = p.new_filter(2, 0);
        assert!(matches!(f.on_request_headers(&host, true), Flow::Delay(_)));
        host.advance(Duration::from_millis(20));
        assert!(matches!(f.on_timer(&host), Flow::Delay(_)));
        p.on_http_reply(&host, call.token, http_reply("200", &[], jwks("k1")));
        assert_eq!(f.on_timer(&host), Flow::Continue);
        assert!(host.replies.borrow().is_empty());
        assert_eq!(host.metric_value("meshwasm.authz.jwt.jwks_fetch_success"), 1);
        assert_eq!(host.metric_value(&rule_metric_name(NAME, URI, "jwks_fetch_success")), 1);
        // The authorization header was removed after success (forwardOriginalToken false).
        assert!(host.header(HeaderMap::RequestHeaders, "authorization").is_none());
        // An unknown kid is rejected with jwt_authn's reply, without waiting.
        request(&host, Some(&token("k9", exp(&host))));
        assert_eq!(p.new_filter(3, 0).on_request_headers(&host, true), Flow::Pause);
        assert_eq!(host.replies.borrow()[0].body, "Jwks doesn't have key to match kid or alg from Jwt");
    }

    const POLL_OR_LESS: Duration = crate::remote::POLL;

    #[test]
    fn keys_that_cannot_be_had_fail_tokens_with_jwks_fetch_failed() {
        let host = FakeHost::new();
        let p = plugin(&host, "1s");
        p.tick(&host);
        p.tick(&host);
        let call = host.http_calls.borrow()[0].clone();
        request(&host, Some(&token("k1", exp(&host))));
        let mut f = p.new_filter(1, 0);
        assert!(matches!(f.on_request_headers(&host, true), Flow::Delay(_)));
        // The fetch fails while the request waits: 401 at once.
        host.advance(Duration::from_millis(5));
        p.on_http_reply(&host, call.token, HttpReply::Failed);
        assert_eq!(f.on_timer(&host), Flow::Pause);
        let r = host.replies.borrow()[0].clone();
        assert_eq!((r.status, r.body.as_str()), (401, "Jwks remote fetch is failed"));
        assert_eq!(
            r.headers,
            vec![("www-authenticate".into(), "Bearer realm=\"://h/\", error=\"invalid_token\"".into())]
        );
        assert_eq!(host.metric_value("meshwasm.authz.jwt.jwks_fetch_failed"), 1);
        assert_eq!(host.metric_value("meshwasm.authz.jwt.denied_jwks_fetch"), 1);
        // A slow fetch: the request gives up after its timeout (1 s), never skipping verification.
        host.advance(Duration::from_secs(1));
        p.tick(&host);
        assert_eq!(host.http_calls.borrow().len(), 2);
        let mut g = p.new_filter(2, 0);
        assert!(matches!(g.on_request_headers(&host, true), Flow::Delay(_)));
        host.advance(Duration::from_millis(999));
        assert!(matches!(g.on_timer(&host), Flow::Delay(_)));
        host.advance(Duration::from_millis(1));
        assert_eq!(g.on_timer(&host), Flow::Pause);
        assert_eq!(host.replies.borrow()[1].body, "Jwks remote fetch is failed");
    }

    #[test]
    fn a_stream_gone_while_waiting_is_left_alone() {
        let host = FakeHost::new();
        let p = plugin(&host, "1s");
        p.tick(&host);
        p.tick(&host);
        request(&host, Some(&token("k1", exp(&host))));
        let mut f = p.new_filter(1, 0);
        assert!(matches!(f.on_request_headers(&host, true), Flow::Delay(_)));
        f.on_done(&host);
        assert_eq!(f.on_timer(&host), Flow::Continue);
        assert!(host.replies.borrow().is_empty());
    }
}
