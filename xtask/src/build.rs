//! `cargo xtask build`: every filter → wasm32-wasip1 → wasm-opt → `dist/<name>.wasm`.

use std::path::PathBuf;
use std::process::Command;

use crate::{bail, cargo, envoy, on_path, output, rel, root, run_cmd, step, Context, Result};

pub const TARGET: &str = "wasm32-wasip1";

/// A filter module: `dist/<name>.wasm` is built from the cdylib crate `krate`.
pub struct Filter {
    pub name: &'static str,
    pub krate: &'static str,
    /// A plugin configuration the module must accept: used to prove the optimized module
    /// still loads and configures in Envoy.
    pub smoke_config: &'static str,
}

/// THE list of modules. A new filter is one line here.
pub const FILTERS: &[Filter] = &[
    Filter { name: "fault", krate: "meshwasm-fault", smoke_config: r#"{"headerControl":true}"# },
    Filter {
        name: "ratelimit",
        krate: "meshwasm-ratelimit",
        smoke_config: r#"{"rules":[{"tokenBucket":{"maxTokens":10,"fillInterval":"1s"}}]}"#,
    },
    Filter {
        name: "authz",
        krate: "meshwasm-authz",
        smoke_config: r#"{"policies":[{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"p","namespace":"ns"},"spec":{"rules":[{"to":[{"operation":{"methods":["GET"]}}]}]}}]}"#,
    },
    Filter {
        name: "retry",
        krate: "meshwasm-retry",
        smoke_config: r#"{"rules":[{"retries":{"attempts":2,"retryOn":"5xx"},"budget":{}}]}"#,
    },
    Filter {
        name: "telemetry",
        krate: "meshwasm-telemetry",
        smoke_config: r#"{"maxSeries":10000,"metrics":[{"overrides":[{"match":{"metric":"REQUEST_COUNT"},"tagOverrides":{"request_protocol":{"value":"request.protocol"}}}]}]}"#,
    },
    Filter { name: "noop", krate: "meshwasm-noop", smoke_config: "{}" },
    Filter { name: "noop-sdk", krate: "meshwasm-noop-sdk", smoke_config: "{}" },
    Filter { name: "floor", krate: "meshwasm-floor", smoke_config: r#"{"request":["headers","counter"]}"# },
];

/// A built module.
pub struct Module {
    pub name: &'static str,
    pub path: PathBuf,
    /// Size of cargo's output, before wasm-opt.
    pub cargo_size: u64,
    pub size: u64,
}

pub fn dist_dir() -> PathBuf {
    root().join("dist")
}

pub fn module_path(name: &str) -> PathBuf {
    dist_dir().join(format!("{name}.wasm"))
}

pub fn run() -> Result<Vec<Module>> {
    ensure_target()?;

    step(format!("building {} filter module(s) for {TARGET}", FILTERS.len()));
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--target", TARGET]);
    for f in FILTERS {
        cmd.args(["-p", f.krate]);
    }
    run_cmd(&mut cmd)?;

    let dist = dist_dir();
    std::fs::create_dir_all(&dist).context(format!("creating {}", dist.display()))?;
    let wasm_opt = on_path("wasm-opt");
    let opt_flags = match &wasm_opt {
        Some(bin) => Some(wasm_opt_flags(bin)?),
        None => {
            println!("    note: wasm-opt is not on PATH (apt-get install binaryen); modules are not optimized");
            None
        }
    };

    let mut modules = Vec::new();
    for f in FILTERS {
        let built =
            root().join("target").join(TARGET).join("release").join(format!("{}.wasm", f.krate.replace('-', "_")));
        let out = module_path(f.name);
        let cargo_size = std::fs::metadata(&built).context(format!("{} was not built", built.display()))?.len();
        match (&wasm_opt, &opt_flags) {
            (Some(bin), Some(flags)) => {
                let mut cmd = Command::new(bin);
                cmd.arg(&built).arg("-o").arg(&out).args(flags);
                run_cmd(&mut cmd)?;
            }
            _ => {
                std::fs::copy(&built, &out).context(format!("copying {} to {}", built.display(), out.display()))?;
            }
        }
        let size = std::fs::metadata(&out)?.len();
        modules.push(Module { name: f.name, path: out, cargo_size, size });
    }

    verify_in_envoy()?;

    step("modules");
    for m in &modules {
        println!(
            "    {:<20} {:>9} bytes ({:.1} KiB; cargo output {:.1} KiB)",
            rel(&m.path),
            m.size,
            m.size as f64 / 1024.0,
            m.cargo_size as f64 / 1024.0
        );
    }
    Ok(modules)
}

/// `rustup target add wasm32-wasip1` unless it is installed (rust-toolchain.toml also asks for
/// it, but a toolchain installed before that file existed may lack it).
pub fn ensure_target() -> Result<()> {
    let Some(rustup) = on_path("rustup") else {
        println!("    note: rustup not found; assuming the {TARGET} target is installed");
        return Ok(());
    };
    let mut list = Command::new(&rustup);
    list.current_dir(root()).args(["target", "list", "--installed"]);
    let installed = output(&mut list)?;
    if !installed.lines().any(|l| l.trim() == TARGET) {
        step(format!("installing the {TARGET} target"));
        run_cmd(Command::new(&rustup).current_dir(root()).args(["target", "add", TARGET]))?;
    }
    Ok(())
}

/// wasm-opt flags: size-optimize, strip what Envoy does not need, and enable exactly the
/// post-MVP features rustc emits for wasm32-wasip1 (and V8 runs) that this wasm-opt knows.
/// Without the explicit features an older binaryen rejects newer rustc output, or lowers it.
fn wasm_opt_flags(bin: &std::path::Path) -> Result<Vec<String>> {
    const FEATURES: &[&str] = &[
        "sign-ext",
        "mutable-globals",
        "nontrapping-float-to-int",
        "bulk-memory",
        "multivalue",
        "reference-types",
        "extended-const",
    ];
    let help = output(Command::new(bin).arg("--help"))?;
    let mut flags: Vec<String> = ["-Oz", "--strip-debug", "--strip-producers"].map(String::from).to_vec();
    for feature in FEATURES {
        let flag = format!("--enable-{feature}");
        if help.split_whitespace().any(|w| w == flag) {
            flags.push(flag);
        }
    }
    Ok(flags)
}

/// Prove every optimized module still instantiates and accepts a configuration in Envoy
/// (`envoy --mode validate` creates the VM and configures the plugin).
fn verify_in_envoy() -> Result<()> {
    let Some(envoy) = envoy::find() else {
        println!("    note: no Envoy yet (ENVOY_BIN / .venv); skipping the load check (`cargo xtask test` does it)");
        return Ok(());
    };
    step("checking every module loads in Envoy (--mode validate)");
    for f in FILTERS {
        let filter = envoy::wasm_filter(f.name, &module_path(f.name), f.smoke_config)?;
        let config = envoy::render_bootstrap("bench.yaml", &[("HTTP_FILTERS", &filter), ("UPSTREAM_PORT", "1")])?;
        let file = envoy::scratch_file(&format!("validate-{}.yaml", f.name), &config)?;
        if let Err(e) = envoy::validate(&envoy, &file) {
            bail!("dist/{}.wasm does not load in Envoy: {e}", f.name);
        }
        println!("    dist/{}.wasm: OK", f.name);
    }
    Ok(())
}
