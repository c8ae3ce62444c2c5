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
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).context(&what)?;
    let elapsed = start.elapsed();
    parse(&raw, elapsed).context(what)
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
    let body = if chunked { dechunk(rest)? } else { rest.to_vec() };
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
    fn rejects_garbage() {
        assert!(parse(b"HTTP/1.1 200 OK\r\n", Duration::ZERO).is_err());
        assert!(parse(b"nonsense\r\n\r\n", Duration::ZERO).is_err());
    }
}
