//! `cargo xtask oci`: every module built (as `cargo xtask build` does), then packaged as
//! Wasm OCI images by the `meshwasm` command itself (`cargo run -p meshwasm -- oci …`, the
//! same code users install), so xtask stays std-only.
//!
//!   cargo xtask oci                         images as OCI layouts in dist/oci/<name>-<variant>/
//!   cargo xtask oci --push <registry/prefix> [--plain-http]
//!                                           push <registry/prefix>/<name>:<version> (compat)
//!                                           and :<version>-artifact

use crate::build::{self, FILTERS};
use crate::{bail, cargo, rel, run_cmd, step, Result};

pub fn run(args: &[String]) -> Result<()> {
    let mut push: Option<String> = None;
    let mut plain_http = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--push" => match it.next() {
                Some(p) => push = Some(p.trim_end_matches('/').to_string()),
                None => bail!("--push needs <registry/prefix>"),
            },
            "--plain-http" => plain_http = true,
            other => bail!("unexpected argument `{other}` (cargo xtask help)"),
        }
    }
    build::run()?;
    let version = env!("CARGO_PKG_VERSION");
    for f in FILTERS {
        let module = build::module_path(f.name);
        for (variant, suffix) in [("compat", ""), ("artifact", "-artifact")] {
            let mut cmd = cargo();
            cmd.args(["run", "-q", "-p", "meshwasm", "--", "oci"]);
            match &push {
                Some(prefix) => {
                    let reference = format!("{prefix}/{}:{version}{suffix}", f.name);
                    step(format!("{} → {reference} ({variant})", rel(&module)));
                    cmd.arg("push").arg(&module).arg(&reference);
                    if plain_http {
                        cmd.arg("--plain-http");
                    }
                }
                None => {
                    let dir = build::dist_dir().join("oci").join(format!("{}-{variant}", f.name));
                    step(format!("{} → {} ({variant})", rel(&module), rel(&dir)));
                    cmd.arg("build").arg(&module).arg("--output").arg(&dir).args(["--tag", version]);
                }
            }
            cmd.args(["--variant", variant]);
            run_cmd(&mut cmd)?;
        }
    }
    Ok(())
}
