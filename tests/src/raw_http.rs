//! One HTTP/1.1 exchange written byte by byte on a fresh connection, so paths (`//admin`,
//! `%2F`, `#frag`), duplicate headers, non-UTF-8 values and a missing `Host` reach Envoy
//! exactly as written (hyper would normalise or refuse them). Reads the head and a
//! `content-length` or chunked body, then returns: Envoy's delayed close would otherwise
//! hold `read_to_end` for a second.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A response as read off the wire (a status of 0: no response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    /// Header lines after the status line, as received.
    pub headers: Vec<(String, String)>,
    /// The body as received (chunked framing included).
    pub body: String,
}

impl RawResponse {
    /// The first value of header `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Send `request` (a complete HTTP/1.1 request) to `addr` and read the response.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(15))).expect("read timeout");
    s.write_all(request).unwrap_or_else(|e| panic!("write to {addr}: {e}"));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let chunked = head.contains("transfer-encoding: chunked");
            let body = buf.len() - end - 4;
            if len.is_some_and(|l| body >= l) || (chunked && text.ends_with("0\r\n\r\n")) || (len.is_none() && !chunked)
            {
                break;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect();
    RawResponse { status, headers, body: body.to_string() }
}
