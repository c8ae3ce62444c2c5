//! A real Redis for one test, and a minimal RESP client for it.
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
//! The RESP (REdis Serialization Protocol, version 2) codec is shared by the blocking
//! test helper [`Redis::command`] and the async [`Connection`] the rate-limit service
//! counts with: [`encode`] writes a command as an array of bulk strings, [`parse`] reads
//! one reply from a buffer (incrementally: `Ok(None)` means "need more bytes").

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long `redis-server` may take to answer `PING` after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `redis-server` child process on 127.0.0.1; killed on drop.
pub struct Redis {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
    log_path: PathBuf,
}

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR …`
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$3\r\nfoo`
    Bulk(Vec<u8>),
    /// `$-1` or `*-1`
    Nil,
    /// `*2\r\n…`
    Array(Vec<Reply>),
}

/// An async RESP connection (one request at a time; commands may be pipelined).
pub struct Connection {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    /// Bytes read since the last [`Connection::pipeline`] began.
    received: usize,
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
            if matches!(redis.try_query(&["PING"]), Ok(Reply::Simple(ref s)) if s == "PONG") {
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

    /// Runs one command on a new connection and returns its reply; panics on a transport
    /// error.
    pub fn query(&self, args: &[&str]) -> Reply {
        self.try_query(args).unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// Runs one command on a new connection.
    pub fn try_query(&self, args: &[&str]) -> Result<Reply, String> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        stream.write_all(&encode(args)).map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((reply, _)) = parse(&buf)? {
                return Ok(reply);
            }
            let n = stream.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed before a complete reply".into());
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }

    /// Runs one command and renders its reply as text: simple strings and bulk strings
    /// as they are, integers in decimal, nil as `(nil)`, arrays one element a line.
    /// Panics on an error reply or a transport error.
    pub fn command(&self, args: &[&str]) -> String {
        match self.query(args) {
            Reply::Error(e) => panic!("redis {args:?}: {e}"),
            r => r.to_string(),
        }
    }

    /// `KEYS pattern`, sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys = match self.query(&["KEYS", pattern]) {
            Reply::Array(items) => items.iter().map(ToString::to_string).collect::<Vec<_>>(),
            other => panic!("redis KEYS {pattern}: unexpected reply {other:?}"),
        };
        keys.sort();
        keys
    }

    /// `GET key` (`None` when the key does not exist).
    pub fn get(&self, key: &str) -> Option<String> {
        match self.query(&["GET", key]) {
            Reply::Nil => None,
            Reply::Error(e) => panic!("redis GET {key}: {e}"),
            r => Some(r.to_string()),
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

// === impl Reply ===

impl Reply {
    /// The integer of an `Integer` reply.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Reply::Integer(n) => Some(*n),
            _ => None,
        }
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Simple(s) => f.write_str(s),
            Reply::Error(e) => write!(f, "(error) {e}"),
            Reply::Integer(n) => write!(f, "{n}"),
            Reply::Bulk(b) => f.write_str(&String::from_utf8_lossy(b)),
            Reply::Nil => f.write_str("(nil)"),
            Reply::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str("\n")?;
                    }
                    write!(f, "{item}")?;
                }
                Ok(())
            }
        }
    }
}

// === RESP codec ===

/// A command as a RESP array of bulk strings.
pub fn encode<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses one reply from the start of `buf`: `Ok(Some((reply, bytes used)))`, `Ok(None)`
/// when `buf` holds only part of a reply, `Err` on a protocol violation.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let (&tag, line) = buf.get(..line_end).and_then(<[u8]>::split_first).ok_or("RESP: empty line")?;
    let text = std::str::from_utf8(line).map_err(|_| "RESP: header line is not UTF-8")?;
    let rest = line_end + 2;
    let int = || text.parse::<i64>().map_err(|_| format!("RESP: bad length/integer {text:?}"));
    match tag {
        b'+' => Ok(Some((Reply::Simple(text.to_string()), rest))),
        b'-' => Ok(Some((Reply::Error(text.to_string()), rest))),
        b':' => Ok(Some((Reply::Integer(int()?), rest))),
        b'$' => {
            let Ok(len) = usize::try_from(int()?) else {
                return Ok(Some((Reply::Nil, rest)));
            };
            let end = rest + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if buf.get(end..end + 2) != Some(b"\r\n".as_slice()) {
                return Err("RESP: bulk string not terminated by CRLF".into());
            }
            Ok(Some((Reply::Bulk(buf.get(rest..end).unwrap_or_default().to_vec()), end + 2)))
        }
        b'*' => {
            let Ok(n) = usize::try_from(int()?) else {
                return Ok(Some((Reply::Nil, rest)));
            };
            let mut items = Vec::with_capacity(n.min(1024));
            let mut at = rest;
            for _ in 0..n {
                match parse(buf.get(at..).unwrap_or_default())? {
                    Some((item, used)) => {
                        items.push(item);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(items), at)))
        }
        other => Err(format!("RESP: unexpected type byte {:?}", char::from(other))),
    }
}

// === impl Connection ===

impl Connection {
    /// Connects to `addr` (fails after `timeout`).
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, String> {
        let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect to redis {addr}: timed out after {timeout:?}"))?
            .map_err(|e| format!("connect to redis {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(Self { stream, buf: Vec::new(), received: 0 })
    }

    /// False when the server closed the connection (or it broke) while it was idle, so a
    /// pool can drop it instead of failing the next command.
    pub fn is_open(&self) -> bool {
        if !self.buf.is_empty() {
            return false; // an unsolicited reply: out of sync
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// True when the last [`Connection::pipeline`] got no byte back (so when it failed,
    /// the server most likely never saw the commands: the connection was already dead).
    pub fn received_nothing(&self) -> bool {
        self.received == 0
    }

    /// Sends `commands` in one write (a pipeline) and reads one reply per command.
    pub async fn pipeline(&mut self, commands: &[Vec<Vec<u8>>]) -> Result<Vec<Reply>, String> {
        self.received = 0;
        let mut out = Vec::new();
        for c in commands {
            out.extend_from_slice(&encode(c));
        }
        self.stream.write_all(&out).await.map_err(|e| format!("write to redis: {e}"))?;
        let mut replies = Vec::with_capacity(commands.len());
        while replies.len() < commands.len() {
            replies.push(self.read_reply().await?);
        }
        Ok(replies)
    }

    async fn read_reply(&mut self) -> Result<Reply, String> {
        loop {
            if let Some((reply, used)) = parse(&self.buf)? {
                self.buf.drain(..used);
                return Ok(reply);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.map_err(|e| format!("read from redis: {e}"))?;
            if n == 0 {
                return Err("redis closed the connection".into());
            }
            self.received += n;
            self.buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_as_bulk_arrays() {
        assert_eq!(encode(&["SET", "k", ""]), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
    }

    #[test]
    fn parses_every_reply_type_incrementally() {
        let wire = b"*5\r\n+OK\r\n-ERR no\r\n:42\r\n$4\r\na\r\nb\r\n$-1\r\n";
        for cut in 0..wire.len() {
            assert_eq!(parse(&wire[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (reply, used) = parse(wire).unwrap().unwrap();
        assert_eq!(used, wire.len());
        assert_eq!(
            reply,
            Reply::Array(vec![
                Reply::Simple("OK".into()),
                Reply::Error("ERR no".into()),
                Reply::Integer(42),
                Reply::Bulk(b"a\r\nb".to_vec()),
                Reply::Nil,
            ])
        );
        assert_eq!(parse(b"*-1\r\n").unwrap(), Some((Reply::Nil, 5)));
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b"$1\r\nabc\r\n").is_err());
    }
}
