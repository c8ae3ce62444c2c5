//! A real Redis for one test, and blocking look-ups in it through redis-rs.
//!
//! ```no_run
//! use meshwasm_tests::Redis;
//! let redis = Redis::start();              // 127.0.0.1:<free port>, no persistence
//! assert_eq!(redis.command(&["SET", "k", "1"]), "OK");
//! assert_eq!(redis.command(&["INCRBY", "k", "2"]), "3");
//! assert_eq!(redis.keys("*"), vec!["k".to_string()]);
//! redis.flushall();
//! ```
//!
//! [`Redis::start`] spawns `redis-server` (`$REDIS_SERVER`, else `redis-server` on `PATH`,
//! from the Debian package `redis-server`) with `--save "" --appendonly no` in its own
//! temp dir, waits until it answers `PING`, and kills it on drop (its log is printed when
//! the test panicked, like [`crate::Envoy`]).
//!
//! Commands go through redis-rs (the `redis` crate, blocking here; the rate-limit service
//! counts with its tokio client): no RESP code of our own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use redis::Value;

/// How long `redis-server` may take to answer `PING` after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `redis-server` child process on 127.0.0.1; killed on drop.
pub struct Redis {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
    log_path: PathBuf,
}

// === impl Redis ===

impl Redis {
    /// Starts `redis-server` on `127.0.0.1:<free port>` and waits until it answers PING.
    pub fn start() -> Self {
        // A free port can be taken between probing and binding: try a few.
        let mut last_err = String::new();
        for _ in 0..3 {
            match Self::try_start_on(crate::envoy::free_port()) {
                Ok(r) => return r,
                Err(e) => last_err = e,
            }
        }
        panic!("redis-server did not start: {last_err}");
    }

    /// Starts `redis-server` on `127.0.0.1:port` (e.g. the port of a stopped instance).
    pub fn start_on(port: u16) -> Self {
        Self::try_start_on(port).unwrap_or_else(|e| panic!("redis-server did not start: {e}"))
    }

    fn try_start_on(port: u16) -> Result<Self, String> {
        let dir = temp_dir();
        let log_path = dir.join("redis.log");
        let log = std::fs::File::create(&log_path).expect("create redis log");
        let bin = redis_bin();
        let mut cmd = Command::new(&bin);
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(["--daemonize", "no", "--protected-mode", "yes", "--logfile", ""])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup redis log"))
            .stderr(log);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "{} not found: install the Debian package `redis-server` (apt-get install redis-server), \
                 or set REDIS_SERVER to a redis-server binary",
                bin.display()
            ),
            Err(e) => panic!("spawn {}: {e}", bin.display()),
        };
        let mut redis = Self { child: Some(child), addr: SocketAddr::from(([127, 0, 0, 1], port)), dir, log_path };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = redis.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = redis.log();
                redis.child = None;
                return Err(format!("redis-server on port {port} exited with {status}:\n{log}"));
            }
            if matches!(redis.try_query(&["PING"]), Ok(Value::SimpleString(ref s)) if s == "PONG") {
                return Ok(redis);
            }
            if Instant::now() > deadline {
                return Err(format!("redis-server on port {port} did not answer PING in {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills the server (its port refuses afterwards); [`Redis::start_on`] with the same
    /// port brings an empty one back.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A redis-rs client for this server (for tests that talk to it themselves).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://{}/", self.addr)).expect("a redis:// URL")
    }

    /// Runs one command on a new connection and returns its reply; panics on a transport
    /// error or an error reply.
    pub fn query(&self, args: &[&str]) -> Value {
        self.try_query(args).unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// Runs one command on a new connection (2 s to connect, 5 s for the reply).
    pub fn try_query(&self, args: &[&str]) -> Result<Value, String> {
        let (name, rest) = args.split_first().ok_or("no command")?;
        let mut conn = self.client().get_connection_with_timeout(Duration::from_secs(2)).map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        redis::cmd(name).arg(rest).query::<Value>(&mut conn).map_err(|e| e.to_string())
    }

    /// Runs one command and renders its reply as text: simple strings and bulk strings
    /// as they are, integers in decimal, nil as `(nil)`, arrays one element a line.
    /// Panics on an error reply or a transport error.
    pub fn command(&self, args: &[&str]) -> String {
        text(&self.query(args))
    }

    /// `KEYS pattern`, sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys = match self.query(&["KEYS", pattern]) {
            Value::Array(items) => items.iter().map(text).collect::<Vec<_>>(),
            other => panic!("redis KEYS {pattern}: unexpected reply {other:?}"),
        };
        keys.sort();
        keys
    }

    /// `GET key` (`None` when the key does not exist).
    pub fn get(&self, key: &str) -> Option<String> {
        match self.query(&["GET", key]) {
            Value::Nil => None,
            r => Some(text(&r)),
        }
    }

    /// `FLUSHALL`: forget every key (every rate-limit counter).
    pub fn flushall(&self) {
        assert_eq!(self.command(&["FLUSHALL"]), "OK", "redis FLUSHALL");
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() || std::env::var_os("MESHWASM_TEST_LOG").is_some() {
            eprintln!("===== redis-server log ({}) =====\n{}\n===== end of redis log =====", self.addr, self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The redis-server binary: `$REDIS_SERVER`, else `redis-server` (looked up on `PATH`).
pub fn redis_bin() -> PathBuf {
    match std::env::var_os("REDIS_SERVER") {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(p.exists(), "REDIS_SERVER={} does not exist", p.display());
            p
        }
        None => PathBuf::from("redis-server"),
    }
}

fn temp_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "meshwasm-redis-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create redis temp dir");
    dir
}

/// A reply as text, as `redis-cli` prints it (without its quotes and numbering).
pub fn text(v: &Value) -> String {
    match v {
        Value::Nil => "(nil)".into(),
        Value::Int(n) => n.to_string(),
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Okay => "OK".into(),
        Value::Array(items) | Value::Set(items) => items.iter().map(text).collect::<Vec<_>>().join("\n"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_render_as_redis_cli_prints_them() {
        assert_eq!(text(&Value::Okay), "OK");
        assert_eq!(text(&Value::Int(3)), "3");
        assert_eq!(text(&Value::Nil), "(nil)");
        assert_eq!(text(&Value::Array(vec![Value::BulkString(b"a".to_vec()), Value::Int(1)])), "a\n1");
    }
}
