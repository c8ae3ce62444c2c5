//! A real OCI distribution registry for one test: Debian's `docker-registry` (CNCF
//! distribution 2.8) on 127.0.0.1, filesystem storage in its own temp dir, no auth.
//!
//! ```no_run
//! use meshwasm_tests::Registry;
//! let registry = Registry::start();          // 127.0.0.1:<free port>, plain HTTP
//! let reference = registry.reference("meshwasm/fault:0.1.0");
//! ```
//!
//! [`Registry::start`] writes its own config (the package's default listens on every
//! interface and wants htpasswd), spawns `docker-registry serve CONFIG`
//! (`$DOCKER_REGISTRY`, else `docker-registry` on `PATH`), waits until `GET /v2/` answers
//! 200, and kills it on drop (its log is printed when the test panicked).

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running registry; killed on drop.
pub struct Registry {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
    log_path: PathBuf,
}

impl Registry {
    /// Starts a registry on `127.0.0.1:<free port>` and waits until it serves `/v2/`.
    pub fn start() -> Self {
        let mut last_err = String::new();
        for _ in 0..3 {
            match Self::try_start_on(crate::envoy::free_port()) {
                Ok(r) => return r,
                Err(e) => last_err = e,
            }
        }
        panic!("docker-registry did not start: {last_err}");
    }

    fn try_start_on(port: u16) -> Result<Self, String> {
        let dir = temp_dir();
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).expect("create registry storage");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog: {{ disabled: true }}\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete: {{ enabled: true }}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: meshwasm-test-only\n",
            storage.display()
        );
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config).expect("write registry config");
        let log_path = dir.join("registry.log");
        let log = std::fs::File::create(&log_path).expect("create registry log");
        let bin = registry_bin();
        let child = match Command::new(&bin)
            .arg("serve")
            .arg(&config_path)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup registry log"))
            .stderr(log)
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "{} not found: install the Debian package `docker-registry` (apt-get install docker-registry), \
                 or set DOCKER_REGISTRY to its binary",
                bin.display()
            ),
            Err(e) => panic!("spawn {}: {e}", bin.display()),
        };
        let mut registry = Self { child: Some(child), addr: SocketAddr::from(([127, 0, 0, 1], port)), dir, log_path };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = registry.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = registry.log();
                registry.child = None;
                return Err(format!("docker-registry on port {port} exited with {status}:\n{log}"));
            }
            if TcpStream::connect_timeout(&registry.addr, Duration::from_millis(200)).is_ok() {
                let rsp = crate::client::try_send(registry.addr, &crate::Request::get("/v2/"));
                if matches!(rsp, Ok(ref r) if r.status == 200) {
                    return Ok(registry);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("docker-registry on port {port} did not serve /v2/ in {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:<port>/<repository:tag>`.
    pub fn reference(&self, repository_and_tag: &str) -> String {
        format!("{}/{repository_and_tag}", self.addr)
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() || std::env::var_os("MESHWASM_TEST_LOG").is_some() {
            eprintln!(
                "===== docker-registry log ({}) =====\n{}\n===== end of registry log =====",
                self.addr,
                self.log()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The registry binary: `$DOCKER_REGISTRY`, else `docker-registry` (on `PATH`).
pub fn registry_bin() -> PathBuf {
    std::env::var_os("DOCKER_REGISTRY").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("docker-registry"))
}

fn temp_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "meshwasm-registry-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create registry temp dir");
    dir
}
