//! `cargo xtask test`: EVERY test, in one command, failing loudly.
//!
//! 1. build all modules (dist/*.wasm; they must load in Envoy)
//! 2. `cargo test --workspace`: host unit/property tests of sdk-ext and the filters, the
//!    fake-host filter tests, and the real-Envoy integration tests (meshwasm-tests)
//! 3. every `examples/*/envoy.yaml` passes `envoy --mode validate` (cwd = repo root)
//! 4. every `examples/*/*.json` is valid JSON and its filter accepts it inside Envoy
//! 5. every Istio resource in `examples/` (WasmPlugin, VirtualService, AuthorizationPolicy, …)
//!    validates against its CRD's OpenAPI v3 schema in `../shared/istio/crds/crd-all.gen.yaml`
//!    (`meshwasm validate`; a deliberately wrong manifest must fail, so the step cannot pass
//!    vacuously)
//! 6. clippy with `-D warnings`, on the host and for wasm32-wasip1 (where the no-panic lints
//!    matter most), and `cargo fmt --check`
//! 7. every fuzz target runs briefly (`cargo +nightly fuzz`, when nightly and cargo-fuzz are
//!    installed; `MESHWASM_FUZZ_SECS` per target, default 15, 0 skips)
//!
//! Steps after the build keep going when one fails, so one run shows every failure.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::build::{self, FILTERS, TARGET};
use crate::{bail, cargo, envoy, json, output, rel, root, run_cmd, step, Context, Result};

/// Integration tests start real Envoys; two at a time is what a 2-core machine affords.
const TEST_THREADS: &str = "2";

pub fn run() -> Result<()> {
    build::ensure_target()?;
    let envoy = envoy::ensure()?;
    println!("    ENVOY_BIN={}", envoy.display());
    std::env::set_var("MESHWASM_DIST", build::dist_dir());

    build::run().context("build failed; nothing was tested")?;

    let mut report: Vec<(&str, Result<()>)> = Vec::new();

    step("cargo test --workspace (unit, fake-host and real-Envoy integration tests)");
    report.push((
        "cargo test --workspace",
        run_cmd(cargo().args(["test", "--workspace", "--no-fail-fast", "--", "--test-threads", TEST_THREADS])),
    ));

    step("examples: envoy --mode validate");
    report.push(("examples/*/envoy.yaml validate", validate_example_configs(&envoy)));

    step("examples: plugin JSON parses and is accepted by its filter in Envoy");
    report.push(("examples/*/*.json accepted", check_example_plugin_configs(&envoy)));

    step("examples: Istio resources validate against their CRD schemas (meshwasm validate)");
    report.push(("examples Istio resources vs CRD schemas", validate_istio_resources()));

    report.push(("clippy", clippy()));
    report.push(("rustfmt", fmt()));

    if let Some(result) = fuzz() {
        report.push(("fuzz targets (smoke)", result));
    }

    step("summary");
    let mut failed = Vec::new();
    for (name, result) in &report {
        match result {
            Ok(()) => println!("    PASS  {name}"),
            Err(e) => {
                println!("    FAIL  {name}");
                failed.push(format!("{name}: {e}"));
            }
        }
    }
    if !failed.is_empty() {
        bail!("{} of {} test steps failed:\n  - {}", failed.len(), report.len(), failed.join("\n  - "));
    }
    println!("\nall tests passed");
    Ok(())
}

/// `examples/*/<file>` for files whose name satisfies `want`, sorted.
fn example_files(want: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let examples = root().join("examples");
    let mut files = Vec::new();
    let Ok(dirs) = fs::read_dir(&examples) else {
        return Ok(files);
    };
    for dir in dirs {
        let dir = dir?.path();
        if !dir.is_dir() {
            continue;
        }
        for f in fs::read_dir(&dir)? {
            let f = f?.path();
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if f.is_file() && want(&name) {
                files.push(f);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn validate_example_configs(envoy: &Path) -> Result<()> {
    let configs = example_files(|n| n == "envoy.yaml")?;
    if configs.is_empty() {
        println!("    note: no examples/*/envoy.yaml yet");
    }
    let mut failures = Vec::new();
    for config in &configs {
        match envoy::validate(envoy, config) {
            Ok(()) => println!("    OK    {}", rel(config)),
            Err(e) => {
                println!("    FAIL  {}\n{e}", rel(config));
                failures.push(rel(config));
            }
        }
    }
    if !failures.is_empty() {
        bail!("invalid: {}", failures.join(", "));
    }
    Ok(())
}

/// Every plugin JSON must (a) be JSON and (b) be accepted by its filter's `on_configure` in a
/// real Envoy: we splice it into a bootstrap with the filter and `--mode validate` it, which
/// creates the VM and configures the plugin (a rejected config fails validation).
fn check_example_plugin_configs(envoy: &Path) -> Result<()> {
    let files = example_files(|n| n.ends_with(".json"))?;
    if files.is_empty() {
        println!("    note: no examples/*/*.json yet");
    }
    let mut failures = Vec::new();
    for file in &files {
        match check_plugin_config(envoy, file) {
            Ok(filter) => println!("    OK    {} (accepted by dist/{filter}.wasm)", rel(file)),
            Err(e) => {
                println!("    FAIL  {}: {e}", rel(file));
                failures.push(rel(file));
            }
        }
    }
    if !failures.is_empty() {
        bail!("rejected: {}", failures.join(", "));
    }
    Ok(())
}

fn check_plugin_config(envoy: &Path, file: &Path) -> Result<&'static str> {
    let text = fs::read_to_string(file)?;
    json::check(&text).context("not valid JSON")?;
    let filter = filter_for(file)?;
    let wasm = build::module_path(filter);
    let fragment = envoy::wasm_filter(filter, &wasm, &text)?;
    let config = envoy::render_bootstrap("bench.yaml", &[("HTTP_FILTERS", &fragment), ("UPSTREAM_PORT", "1")])?;
    let scratch = envoy::scratch_file("example-plugin-check.yaml", &config)?;
    envoy::validate(envoy, &scratch).context(format!("dist/{filter}.wasm rejected it"))?;
    Ok(filter)
}

/// Which filter a plugin JSON belongs to: the file name (`fault.json`, `fault-*.json`), else
/// the example directory's name, else the only module its envoy.yaml loads.
fn filter_for(file: &Path) -> Result<&'static str> {
    let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = file.parent().unwrap_or(Path::new("."));
    let dir_name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let names =
        |s: &str| FILTERS.iter().find(|f| s == f.name || s.starts_with(&format!("{}-", f.name))).map(|f| f.name);
    if let Some(f) = names(&stem).or_else(|| names(&dir_name)) {
        return Ok(f);
    }
    let envoy_yaml = fs::read_to_string(dir.join("envoy.yaml")).unwrap_or_default();
    let loaded: Vec<&'static str> =
        FILTERS.iter().filter(|f| envoy_yaml.contains(&format!("dist/{}.wasm", f.name))).map(|f| f.name).collect();
    match loaded.as_slice() {
        [only] => Ok(only),
        _ => bail!("cannot tell which filter this configures: name it <filter>.json or <filter>-<what>.json"),
    }
}

/// Every `examples/**/*.yaml` but envoy.yaml that names an `istio.io` apiVersion.
fn istio_example_files() -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let Ok(entries) = fs::read_dir(dir) else { return Ok(()) };
        for e in entries {
            let p = e?.path();
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                && p.file_name().is_some_and(|n| n != "envoy.yaml")
                && fs::read_to_string(&p).unwrap_or_default().contains("istio.io/")
            {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(&root().join("examples"), &mut out)?;
    out.sort();
    Ok(out)
}

fn validate_istio_resources() -> Result<()> {
    let crds = root().join("..").join("shared").join("istio").join("crds").join("crd-all.gen.yaml");
    if !crds.is_file() {
        bail!("{} not found: the Istio CRDs are read from ../shared/istio/ beside the checkout", crds.display());
    }
    let files = istio_example_files()?;
    if files.is_empty() {
        bail!("no Istio resources found under examples/");
    }
    // Built with the workspace's feature set (what `cargo test --workspace` just compiled):
    // `cargo run -p meshwasm` alone would resolve features differently and rebuild its
    // dependencies.
    run_cmd(cargo().args(["build", "-q", "--workspace", "--bin", "meshwasm"]))?;
    let bin = root().join("target").join("debug").join("meshwasm");
    let meshwasm = || {
        let mut c = Command::new(&bin);
        c.args(["validate", "--crds"]).arg(&crds);
        c
    };
    let mut cmd = meshwasm();
    cmd.args(&files);
    run_cmd(&mut cmd)?;
    // The negative control: a WasmPlugin with a misspelt field and an impossible enum value.
    let bad = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: wrong}\n\
               spec: {url: oci://r.example/meshwasm/fault:0.1.0, failStrategy: FAIL_SOMETIMES, pluginConfg: {}}\n";
    let scratch = envoy::scratch_file("istio-negative-control.yaml", bad)?;
    let out = meshwasm().arg(&scratch).output()?;
    if out.status.success() {
        bail!("`meshwasm validate` accepted a deliberately wrong WasmPlugin ({}): the check is broken", rel(&scratch));
    }
    println!("    OK    a deliberately wrong WasmPlugin is refused:");
    for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("      ")) {
        println!("    {line}");
    }
    Ok(())
}

fn clippy() -> Result<()> {
    if output(cargo().args(["clippy", "--version"])).is_err() {
        println!("    note: clippy is not installed (rustup component add clippy); SKIPPED");
        return Ok(());
    }
    step("cargo clippy (host, all targets) -D warnings");
    let host = run_cmd(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]));
    step(format!("cargo clippy ({TARGET}, the modules as Envoy runs them) -D warnings"));
    let mut wasm = cargo();
    wasm.args(["clippy", "--release", "--target", TARGET]);
    for f in FILTERS {
        wasm.args(["-p", f.krate]);
    }
    wasm.args(["--", "-D", "warnings"]);
    let wasm = run_cmd(&mut wasm);
    host.and(wasm)
}

fn fmt() -> Result<()> {
    if output(cargo().args(["fmt", "--version"])).is_err() {
        println!("    note: rustfmt is not installed (rustup component add rustfmt); SKIPPED");
        return Ok(());
    }
    step("cargo fmt --check");
    run_cmd(cargo().args(["fmt", "--all", "--check"]))
}

/// A short run of every fuzz target: they must build and survive `MESHWASM_FUZZ_SECS` seconds
/// each (regressions found by long runs are kept in fuzz/corpus and replayed here). `None`
/// when the tooling is missing or the step is disabled.
fn fuzz() -> Option<Result<()>> {
    let secs: u64 = std::env::var("MESHWASM_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    if secs == 0 || !root().join("fuzz").join("Cargo.toml").is_file() {
        return None;
    }
    // `+nightly` needs rustup's cargo proxy, not the toolchain's cargo in $CARGO.
    let nightly = || {
        let mut c = std::process::Command::new("cargo");
        c.current_dir(root()).arg("+nightly").env_remove("RUSTUP_TOOLCHAIN");
        c
    };
    let targets = match output(nightly().args(["fuzz", "list"])) {
        Ok(list) => list.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect::<Vec<_>>(),
        Err(_) => {
            step("fuzz targets");
            println!("    note: nightly toolchain or cargo-fuzz missing (rustup toolchain install nightly; cargo install cargo-fuzz); SKIPPED");
            return None;
        }
    };
    step(format!("fuzz targets: {} × {secs}s (cargo +nightly fuzz run)", targets.len()));
    let mut failed = Vec::new();
    for t in &targets {
        // libFuzzer narrates every new input; keep its output for failures only.
        let mut cmd = nightly();
        cmd.args(["fuzz", "run", t, "--", &format!("-max_total_time={secs}")]);
        match cmd.output() {
            Ok(out) if out.status.success() => {
                let log = String::from_utf8_lossy(&out.stderr);
                let done = log.lines().rev().find(|l| l.starts_with("Done ")).unwrap_or("done");
                println!("    OK    {t}: {done}");
            }
            Ok(out) => {
                let log = String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                println!(
                    "    FAIL  {t} ({}); artifacts in fuzz/artifacts/{t}/:\n{}",
                    out.status,
                    envoy::indent(&tail.join("\n"))
                );
                failed.push(t.clone());
            }
            Err(e) => {
                println!("    FAIL  {t}: {e}");
                failed.push(t.clone());
            }
        }
    }
    Some(if failed.is_empty() {
        Ok(())
    } else {
        Err(crate::Error::msg(format!("fuzz target(s) failed: {}", failed.join(", "))))
    })
}
