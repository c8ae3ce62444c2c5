//! A minimal HTTP/1.1 client over `TcpStream`: one request per connection, enough for admin
//! endpoints and demo traffic. (wrk does the load; this is never on a hot path.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::{bail, Context, Result};

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// From just before connecting to the last byte.
    pub elapsed: Duration,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
    request(addr, "GET", path, headers)
}

pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
    let start = Instant::now();
    let what = format!("{method} http://{addr}{path}");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).context(&what)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).context(&what)?;
    // Read until the response is complete by its own framing, not until the peer closes:
    // Envoy keeps a connection it closes open for up to delayed_close_timeout (1s) after a
    // local reply, and that second is not the latency we want to show.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).context(&what)?;
        raw.extend_from_slice(buf.get(..n).unwrap_or_default());
        if n == 0 || is_complete(&raw) {
            break;
        }
    }
    let elapsed = start.elapsed();
    parse(&raw, elapsed).context(what)
}

/// Does `raw` hold a whole response (by content-length or the last chunk)? Responses framed
/// by connection close are complete only at EOF.
fn is_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(raw.get(..end).unwrap_or_default()).to_ascii_lowercase();
    let body = raw.get(end + 4..).unwrap_or_default();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    if status == 204 || status == 304 || (100..200).contains(&status) {
        return true;
    }
    for line in head.split("\r\n").skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            match (k.trim(), v.trim()) {
                ("content-length", n) => return n.parse::<usize>().is_ok_and(|n| body.len() >= n),
                ("transfer-encoding", te) if te.contains("chunked") => return body.ends_with(b"0\r\n\r\n"),
                _ => {}
            }
        }
    }
    false
}

fn parse(raw: &[u8], elapsed: Duration) -> Result<Response> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("incomplete response ({} bytes)", raw.len());
    };
    let head = String::from_utf8_lossy(raw.get(..end).unwrap_or_default());
    let rest = raw.get(end + 4..).unwrap_or_default();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| crate::Error::msg(format!("bad status line `{status_line}`")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let content_length = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse::<usize>().ok());
    let body = match (chunked, content_length) {
        (true, _) => dechunk(rest)?,
        (false, Some(n)) => rest.get(..n).unwrap_or(rest).to_vec(),
        (false, None) => rest.to_vec(),
    };
    Ok(Response { status, headers, body, elapsed })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            bail!("truncated chunked body");
        };
        let size_line = String::from_utf8_lossy(data.get(..eol).unwrap_or_default()).into_owned();
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).context(format!("chunk size `{size_hex}`"))?;
        if size == 0 {
            return Ok(body);
        }
        let Some(chunk) = data.get(eol + 2..eol + 2 + size) else {
            bail!("truncated chunk");
        };
        body.extend_from_slice(chunk);
        data = data.get(eol + 2 + size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_and_plain() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let rsp = parse(raw, Duration::ZERO).unwrap();
        assert_eq!(rsp.status, 200);
        assert_eq!(rsp.header("x-a"), Some("b"));
        assert_eq!(rsp.body, b"abcde");

        let raw = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\nfault";
        let rsp = parse(raw, Duration::ZERO).unwrap();
        assert_eq!((rsp.status, rsp.text().as_str()), (503, "fault"));
    }

    #[test]
    fn completeness_follows_framing() {
        assert!(!is_complete(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfau"));
        assert!(is_complete(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfault"));
        assert!(!is_complete(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"));
        assert!(is_complete(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"));
        assert!(!is_complete(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nbody"));
        assert!(is_complete(b"HTTP/1.1 204 No Content\r\n\r\n"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse(b"HTTP/1.1 200 OK\r\n", Duration::ZERO).is_err());
        assert!(parse(b"nonsense\r\n\r\n", Duration::ZERO).is_err());
    }
}
