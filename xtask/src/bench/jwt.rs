//! The JWT rows of `cargo xtask bench`: RequestAuthentication + an AuthorizationPolicy on
//! `requestPrincipals` and a claim, in `authz.wasm` and in native `jwt_authn` + RBAC
//! configured as istiod configures them, with the same inline key set (istiod's default:
//! it fetches a `jwksUri` itself and inlines the keys).
//!
//! - `authz_jwt`: the same valid RS256 token on every request (the verified-token cache);
//! - `authz_jwt_fresh[_<alg>]`: a different valid token on every request (a wrk Lua script
//!   cycling through two sets of more tokens than the cache holds, one set per wrk run in
//!   turn, so no request can hit the cache; the bench fails if one does);
//! - `native_jwt`: native `jwt_authn` (no JWT cache, as istiod configures it) + RBAC, the
//!   same token on every request.
//!
//! Keys and tokens come from `meshwasm-jwks` (tests crate): `init` into `target/xtask/jwt`,
//! `token --count N` per algorithm.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use super::{Load, Setup, AUTHZ_COUNTERS, NATIVE_RBAC_COUNTERS};
use crate::build;
use crate::envoy;
use crate::{bail, cargo, json, output, root, run_cmd, step, Context, Result};

/// The JWT configurations, in the order they run.
pub const KEYS: [&str; 7] = [
    "authz_jwt",
    "floor_jwt",
    "authz_jwt_fresh",
    "authz_jwt_fresh_es256",
    "authz_jwt_fresh_eddsa",
    "authz_jwt_fresh_hs256",
    "native_jwt",
];

const ISSUER: &str = "https://issuer.example";
/// Tokens per set; two sets, used by alternate wrk runs. More than the filter's cache holds
/// (1024 per worker), so each run evicts what the previous one left.
const TOKENS_PER_SET: u32 = 1100;

pub const VERIFIED: &str = "wasmcustom.meshwasm.authz.jwt.verified";
pub const CACHE_HITS: &str = "wasmcustom.meshwasm.authz.jwt.cache_hits";
const NATIVE_JWT_ALLOWED: &str = "http.ingress.jwt_authn.allowed";

/// The hostcalls `authz.wasm` makes on the cached row's request (`floor_jwt`, see
/// `filters/floor`): the header map, the clock (token times), the token's header removed
/// (`forwardOriginalToken` is false), four counters (cache hit, JWT allowed, allowed, the
/// policy's allowed), and the response-headers callback it exports.
pub const FLOOR: &str =
    r#"{"request":["headers","time","remove authorization","counter","counter","counter","counter"]}"#;

/// The AuthorizationPolicy: alice of the issuer, with `bench` in her `groups` claim.
const POLICY: &str = r#"{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"bench","namespace":"default"},"spec":{"action":"ALLOW","rules":[{"from":[{"source":{"requestPrincipals":["https://issuer.example/alice"]}}],"when":[{"key":"request.auth.claims[groups]","values":["bench"]}]}]}}"#;

/// The plugin configuration of the authz rows (`jwks`: the key set's JSON text).
pub fn plugin_config(jwks: &str) -> String {
    format!(
        r#"{{"authentication":[{{"apiVersion":"security.istio.io/v1","kind":"RequestAuthentication","metadata":{{"name":"bench","namespace":"default"}},"spec":{{"jwtRules":[{{"issuer":"{ISSUER}","audiences":["api.example"],"jwks":{}}}]}}}}],"policies":[{POLICY}]}}"#,
        json::string(jwks)
    )
}

/// istiod's `jwt_authn` for the rule and its RBAC translation of the policy (the matchers
/// `tests/tests/authz_jwt.rs` compares the module with).
fn native_filters(jwks: &str) -> String {
    let jwt_authn = format!(
        r#"{{"@type":"type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication","providers":{{"origins-0":{{"issuer":"{ISSUER}","audiences":["api.example"],"local_jwks":{{"inline_string":{}}},"forward":false,"payload_in_metadata":"payload","normalize_payload_in_metadata":{{"space_delimited_claims":["permission","scope"]}}}}}},"rules":[{{"match":{{"prefix":"/"}},"requires":{{"requires_any":{{"requirements":[{{"provider_name":"origins-0"}},{{"allow_missing":{{}}}}]}}}}}}],"bypass_cors_preflight":true}}"#,
        json::string(jwks)
    );
    let meta = |path: &str, value: &str| {
        format!(
            r#"{{"metadata":{{"filter":"envoy.filters.http.jwt_authn","path":[{{"key":"payload"}},{{"key":"{path}"}}],"value":{value}}}}}"#
        )
    };
    let principal = format!(
        r#"{{"andIds":{{"ids":[{},{}]}}}}"#,
        meta("iss", &format!(r#"{{"stringMatch":{{"exact":"{ISSUER}"}}}}"#)),
        meta("sub", r#"{"stringMatch":{"exact":"alice"}}"#)
    );
    let claim = meta(
        "groups",
        r#"{"orMatch":{"valueMatchers":[{"listMatch":{"oneOf":{"stringMatch":{"exact":"bench"}}}},{"stringMatch":{"exact":"bench"}}]}}"#,
    );
    let rbac = format!(
        r#"{{"@type":"type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC","rules":{{"action":"ALLOW","policies":{{"ns[default]-policy[bench]-rule[0]":{{"permissions":[{{"any":true}}],"principals":[{{"andIds":{{"ids":[{principal},{claim}]}}}}]}}}}}}}}"#
    );
    format!(
        "- name: envoy.filters.http.jwt_authn\n  typed_config: {jwt_authn}\n- name: envoy.filters.http.rbac\n  typed_config: {rbac}\n"
    )
}

/// A token whose signature has one bit changed (in the middle: the last base64url character
/// may carry bits a decoder ignores).
fn tampered(token: &str) -> String {
    let mut b = token.as_bytes().to_vec();
    let i = b.len().saturating_sub(10);
    if let Some(c) = b.get_mut(i) {
        *c = if *c == b'A' { b'B' } else { b'A' };
    }
    String::from_utf8_lossy(&b).into_owned()
}

struct Minter {
    bin: PathBuf,
    dir: PathBuf,
}

impl Minter {
    fn tokens(&self, alg: &str, count: Option<u32>) -> Result<Vec<String>> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("token").arg(&self.dir).args(["--alg", alg, "--claim", r#"groups=["bench"]"#, "--exp", "86400"]);
        if let Some(n) = count {
            cmd.args(["--count", &n.to_string()]);
        }
        Ok(output(&mut cmd)?.lines().map(str::to_string).filter(|l| !l.is_empty()).collect())
    }

    fn token(&self, alg: &str) -> Result<String> {
        self.tokens(alg, None)?.into_iter().next().ok_or_else(|| crate::Error::msg("meshwasm-jwks printed no token"))
    }
}

/// The JWT setups `want` selects and their loads (headers, scripts, probes, counters).
pub fn setups(want: &dyn Fn(&str) -> bool) -> Result<(Vec<Setup>, HashMap<&'static str, Load>)> {
    let mut setups = Vec::new();
    let mut loads = HashMap::new();
    if !KEYS.iter().any(|k| want(k)) {
        return Ok((setups, loads));
    }
    step("JWT rows: building meshwasm-jwks, generating keys and tokens");
    run_cmd(cargo().args(["build", "--quiet", "-p", "meshwasm-tests", "--bin", "meshwasm-jwks"]))?;
    let bin = root().join("target").join("debug").join("meshwasm-jwks");
    let dir = envoy::scratch_dir()?.join("jwt");
    if !dir.join("jwks-with-hmac.json").is_file() {
        run_cmd(Command::new(&bin).arg("init").arg(&dir))?;
    }
    let jwks = std::fs::read_to_string(dir.join("jwks-with-hmac.json")).context("reading the bench key set")?;
    let minter = Minter { bin, dir: dir.clone() };
    let authz = build::module_path("authz");
    let plugin = envoy::wasm_filter("authz", &authz, &plugin_config(&jwks))?;
    let bad_probe = |token: &str| (vec![("authorization".to_string(), format!("Bearer {}", tampered(token)))], 401);
    let bearer = |t: &str| vec![("authorization".to_string(), format!("Bearer {t}"))];

    // One RS256 token for the cached row, native's row and their references: the same requests.
    let cached =
        if want("authz_jwt") || want("native_jwt") || want("floor_jwt") { Some(minter.token("RS256")?) } else { None };
    if let Some(t) = &cached {
        // The JWT rows' requests carry a ~550-byte Authorization header, which costs bare Envoy
        // (and the no-op module) something too: their ratios are taken against these.
        let noop = build::module_path("noop");
        for (key, label, filters) in [
            ("bare_token", "bare Envoy, requests carrying the JWT rows' token (their reference)", String::new()),
            (
                "noop_token",
                "no-op wasm module, requests carrying the JWT rows' token (their reference)",
                envoy::wasm_filter("noop", &noop, "{}")?,
            ),
        ] {
            setups.push(Setup { key, label, filters, must_fault: None, counters: None });
            loads.insert(key, Load { headers: bearer(t), ..Load::default() });
        }
    }
    if let Some(t) = cached.as_ref().filter(|_| want("authz_jwt")) {
        setups.push(Setup {
            key: "authz_jwt",
            label: "meshwasm authz, JWT (RS256) + requestPrincipals/claim policy, same token (cached)",
            filters: plugin.clone(),
            must_fault: Some(("/", &[], 403)),
            counters: Some(AUTHZ_COUNTERS),
        });
        loads.insert(
            "authz_jwt",
            Load {
                headers: bearer(t),
                probes: vec![bad_probe(t)],
                covers: vec![CACHE_HITS],
                still: vec![VERIFIED],
                ..Load::default()
            },
        );
    }
    if let Some(t) = cached.as_ref().filter(|_| want("floor_jwt")) {
        let floor = build::module_path("floor");
        setups.push(Setup {
            key: "floor_jwt",
            label: "hostcall floor of meshwasm authz with that JWT: its hostcalls on that request, no work",
            filters: envoy::wasm_filter("floor", &floor, FLOOR)?,
            must_fault: None,
            counters: None,
        });
        loads.insert("floor_jwt", Load { headers: bearer(t), ..Load::default() });
    }
    for (key, alg, label) in [
        ("authz_jwt_fresh", "RS256", "meshwasm authz, JWT RS256, a new token each request (uncached)"),
        ("authz_jwt_fresh_es256", "ES256", "meshwasm authz, JWT ES256, a new token each request (uncached)"),
        ("authz_jwt_fresh_eddsa", "EdDSA", "meshwasm authz, JWT EdDSA, a new token each request (uncached)"),
        ("authz_jwt_fresh_hs256", "HS256", "meshwasm authz, JWT HS256, a new token each request (uncached)"),
    ] {
        if !want(key) {
            continue;
        }
        let probe = minter.token(alg)?;
        let all = minter.tokens(alg, Some(2 * TOKENS_PER_SET))?;
        if all.len() != 2 * TOKENS_PER_SET as usize {
            bail!("meshwasm-jwks printed {} {alg} tokens, expected {}", all.len(), 2 * TOKENS_PER_SET);
        }
        let (a, b) = all.split_at(TOKENS_PER_SET as usize);
        let files = [dir.join(format!("{alg}-a.txt")), dir.join(format!("{alg}-b.txt"))];
        for (f, set) in files.iter().zip([a, b]) {
            std::fs::write(f, set.join("\n") + "\n").context(format!("writing {}", f.display()))?;
        }
        setups.push(Setup {
            key,
            label,
            filters: plugin.clone(),
            must_fault: Some(("/", &[], 403)),
            counters: Some(AUTHZ_COUNTERS),
        });
        loads.insert(
            key,
            Load {
                headers: bearer(&probe),
                script: Some((lua_script()?, files.to_vec())),
                probes: vec![bad_probe(&probe)],
                covers: vec![VERIFIED],
                still: vec![CACHE_HITS],
                ..Load::default()
            },
        );
    }
    if let Some(t) = cached.as_ref().filter(|_| want("native_jwt")) {
        setups.push(Setup {
            key: "native_jwt",
            label: "Envoy native jwt_authn (RS256) + RBAC, istiod's configuration, same token",
            filters: native_filters(&jwks),
            must_fault: Some(("/", &[], 403)),
            counters: Some(NATIVE_RBAC_COUNTERS),
        });
        loads.insert(
            "native_jwt",
            Load {
                headers: bearer(t),
                probes: vec![bad_probe(t)],
                covers: vec![NATIVE_JWT_ALLOWED],
                ..Load::default()
            },
        );
    }
    Ok((setups, loads))
}

/// The wrk script of the fresh rows: `-- <tokens file>` names the set of this run.
fn lua_script() -> Result<PathBuf> {
    let text = r#"-- meshwasm bench: a different token on every request, cycling through the file named after `--`.
local tokens = {}
local i = 0
function init(args)
  for line in io.lines(args[1]) do
    tokens[#tokens + 1] = line
  end
end
function request()
  i = i % #tokens + 1
  return wrk.format(nil, nil, {["authorization"] = "Bearer " .. tokens[i], ["x-bench-client"] = "wrk"})
end
"#;
    envoy::scratch_file("jwt-fresh.lua", text)
}

/// The counters the JWT rows are checked with, for the report's setup notes.
pub fn describe() -> String {
    format!(
        "- JWT rows (`authz_jwt*`, `native_jwt`): RequestAuthentication (issuer `{ISSUER}`, audience `api.example`, inline key set of `meshwasm-jwks init`: RSA 2048, P-256, Ed25519, HMAC) + AuthorizationPolicy `{POLICY}`; native: istiod's `jwt_authn` (no JWT cache) + RBAC for the same. Probes: no token → 403, a token with one signature bit changed → 401, the valid token → 200. `authz_jwt`: one token, `{CACHE_HITS}` covers every measured request and `{VERIFIED}` did not move after the probes; fresh rows: {TOKENS_PER_SET}×2 tokens cycled by a wrk Lua script (one set per run in turn), `{VERIFIED}` covers every measured request and `{CACHE_HITS}` did not move after the probes; `native_jwt`: `{NATIVE_JWT_ALLOWED}` covers every measured request. The JWT rows' overheads and ratios are taken against `bare_token` and `noop_token` (bare Envoy and the no-op module under requests carrying the same RS256 token: the ~550-byte header costs Envoy something without any filter); `floor_jwt` (filters/floor) config: `{FLOOR}`\n"
    )
}
