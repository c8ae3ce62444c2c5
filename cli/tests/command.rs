//! The `meshwasm` binary as CI pipelines use it: exit status and messages.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // a test

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn meshwasm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshwasm")).current_dir(root()).args(args).output().unwrap()
}

fn scratch(name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("meshwasm-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn check_exits_0_for_an_accepted_config_and_1_with_the_path_for_a_refused_one() {
    let ok = meshwasm(&["check", "fault", "examples/fault/fault.json"]);
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    let bad = scratch("bad.json", r#"{"rules":[{"fault":{"abort":{"httpStatus":700}}}]}"#);
    let out = meshwasm(&["check", "fault", &bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rules[0].fault.abort.httpStatus: must be in 200..=599"));
    let route = scratch("route.json", r#"{"maxActiveFaults": 1}"#);
    assert_eq!(meshwasm(&["check", "fault", &route]).status.code(), Some(0));
    assert_eq!(meshwasm(&["check", "fault", "--route", &route]).status.code(), Some(1));
    assert_eq!(meshwasm(&["check", "nope", &route]).status.code(), Some(1));
}

/// Every filter: its example configuration passes, a wrong one fails with exit status 1 and
/// the filter's own message naming the JSON path (what Envoy would log before refusing it).
#[test]
fn check_runs_every_filters_own_parser() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "fault",
            "examples/fault/fault.json",
            r#"{"rules":[{"fault":{"delay":{"fixedDelay":"soon"}}}]}"#,
            "rules[0].fault.delay.fixedDelay: ",
        ),
        (
            "ratelimit",
            "examples/ratelimit/ratelimit.json",
            r#"{"rules":[{"tokenBucket":{"maxTokens":0,"fillInterval":"1s"}}]}"#,
            "rules[0].tokenBucket.maxTokens: ",
        ),
        (
            "retry",
            "examples/retry/retry.json",
            r#"{"rules":[{"retries":{"attempts":3,"retryOn":"5xx,bogus"}}]}"#,
            "rules[0].retries.retryOn: unknown retry condition \"bogus\"",
        ),
        (
            "authz",
            "examples/authz/authz.json",
            r#"{"policies":[{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"p"},"spec":{"action":"NOPE"}}]}"#,
            "policies[0].spec.action: ",
        ),
        ("telemetry", "examples/telemetry/telemetry.json", r#"{"maxSeries": 0}"#, "maxSeries: must be at least 1"),
    ];
    let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    for f in meshwasm_cli::filters::FILTERS {
        assert!(names.contains(&f.name), "no check case for filter {}", f.name);
    }
    for (filter, good, bad, want) in cases {
        let ok = meshwasm(&["check", filter, good]);
        assert_eq!(ok.status.code(), Some(0), "{filter} {good}: {}", String::from_utf8_lossy(&ok.stderr));
        assert!(String::from_utf8_lossy(&ok.stdout).contains(&format!("OK ({filter})")));
        let file = scratch(&format!("bad-{filter}.json"), bad);
        let out = meshwasm(&["check", filter, &file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{filter}: {stderr}");
        assert!(stderr.starts_with(&format!("{file}: {want}")), "{filter}: {stderr}");
        // Not JSON at all: refused too.
        let junk = scratch(&format!("junk-{filter}.json"), "{");
        assert_eq!(meshwasm(&["check", filter, &junk]).status.code(), Some(1), "{filter}");
    }
    // Per-route overrides: retry has them (budgets are plugin-wide), authz has none.
    let route = scratch("retry-route.json", r#"{"rules":[{"retries":{"attempts":2},"budget":{}}]}"#);
    let out = meshwasm(&["check", "retry", "--route", &route]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rules[0].budget: budgets live in shared data"));
    let out = meshwasm(&["check", "authz", "--route", &route]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("takes no per-route override"));
}

#[test]
fn from_istio_converts_the_examples_and_exits_2_when_something_is_not_converted() {
    let files = [
        "examples/from-istio/virtualservice.yaml",
        "examples/from-istio/authorizationpolicy.yaml",
        "examples/from-istio/telemetry.yaml",
    ];
    let out = meshwasm(&[&["from-istio"][..], &files].concat());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["plugins"]["fault"]["rules"][0]["name"], "ratings-jason");
    assert_eq!(doc["plugins"]["retry"]["rules"][1]["timeout"], "10s");
    assert_eq!(doc["plugins"]["authz"]["policies"][0]["metadata"]["name"], "ratings-viewer");
    assert_eq!(doc["plugins"]["telemetry"]["kind"], "Telemetry");
    // A field no filter implements: named, exit status 2, the rest still printed.
    let vs = scratch(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [r]\n  http:\n  - \
         mirror: {host: m}\n    retries: {attempts: 2, backoff: 1s}\n    route: [{destination: {host: r}}]\n",
    );
    let out = meshwasm(&["from-istio", &vs]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec.http[0].mirror: not converted"), "{stderr}");
    assert!(stderr.contains("spec.http[0].retries.backoff: left out: cannot be set per request"), "{stderr}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["plugins"]["retry"]["rules"][0]["retries"], serde_json::json!({"attempts": 2}));
    // A value the filter refuses: exit status 1, the path named.
    let bad = scratch(
        "bad-vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [r]\n  http:\n  - \
         timeout: 1.5ms\n",
    );
    let out = meshwasm(&["from-istio", &bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.http[0].timeout: must be a whole number of milliseconds")
    );
}

#[test]
fn validate_exits_1_on_a_wrong_manifest() {
    let crds = root().join("../shared/istio/crds/crd-all.gen.yaml");
    let crds = crds.to_string_lossy();
    let good = meshwasm(&["validate", "--crds", &crds, "examples/fault/wasmplugin.yaml"]);
    assert_eq!(good.status.code(), Some(0), "{}", String::from_utf8_lossy(&good.stdout));
    let bad = scratch(
        "wp.yaml",
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: meshwasm-fault}\n\
         spec: {url: oci://r/meshwasm/fault:1, pluginConfig: {rules: [{fault: {abort: {httpStatus: 700}}}]}}\n",
    );
    let out = meshwasm(&["validate", "--crds", &crds, &bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("/spec/pluginConfig: refused by the fault filter: rules[0]"));
}

#[test]
fn oci_build_is_reproducible_across_runs_of_the_command() {
    let dist = root().join("dist").join("fault.wasm");
    if !dist.exists() {
        eprintln!("dist/fault.wasm not built; tests/tests/oci.rs covers the real modules");
        return;
    }
    let dist = dist.to_string_lossy();
    let a = meshwasm(&["oci", "build", &dist]);
    let b = meshwasm(&["oci", "build", &dist]);
    assert_eq!(a.status.code(), Some(0));
    assert_eq!(a.stdout, b.stdout);
    assert!(String::from_utf8_lossy(&a.stdout).contains("manifest digest  sha256:"));
}

/// Every `examples/*/wasmplugin.yaml` is the output of the command on its `# Generated by`
/// line (with its pinned sha256), so pluginConfig is the example's JSON as it is today and
/// the placement is the filter table's. Comment lines above the generated part are the
/// example's own; everything from `# Generated by` on must match byte for byte, except the
/// recorded command line, which gains the `--sha256` we pass.
#[test]
fn example_wasmplugins_are_what_their_recorded_command_generates() {
    let mut seen = Vec::new();
    for dir in std::fs::read_dir(root().join("examples")).unwrap() {
        let file = dir.unwrap().path().join("wasmplugin.yaml");
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        let start = text
            .find("# Generated by `meshwasm wasmplugin ")
            .unwrap_or_else(|| panic!("{}: no `# Generated by `meshwasm wasmplugin …`` line", file.display()));
        let generated = &text[start..];
        let command = generated.lines().next().unwrap();
        let args = command
            .strip_prefix("# Generated by `meshwasm ")
            .and_then(|c| c.strip_suffix("`."))
            .unwrap_or_else(|| panic!("{}: malformed {command:?}", file.display()));
        let sha256 = generated
            .lines()
            .find_map(|l| l.trim().strip_prefix("sha256: "))
            .unwrap_or_else(|| panic!("{}: no sha256", file.display()));
        let mut argv: Vec<&str> = args.split_whitespace().collect();
        argv.extend(["--sha256", sha256]);
        let out = meshwasm(&argv);
        assert_eq!(out.status.code(), Some(0), "{}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
        let want = String::from_utf8(out.stdout).unwrap();
        let want = want.split_once('\n').unwrap().1;
        let got = generated.split_once('\n').unwrap().1;
        assert_eq!(got, want, "{}: regenerate it with `meshwasm {args}`", file.display());
        seen.push(argv[1].to_string());
    }
    seen.sort();
    assert_eq!(seen, ["authz", "fault", "ratelimit", "retry", "telemetry"], "one WasmPlugin example per filter");
}
