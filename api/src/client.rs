//! A small blocking client for netd's Unix socket: one HTTP/1.1 request per
//! connection (`Connection: close`), no async runtime.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{AddEndpoint, ApiError, Deleted, Endpoint, GcRequest, GcResult, Status};

/// Largest answer the client accepts (an endpoint list of a full /16 block
/// fits comfortably).
const MAX_RESPONSE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// netd is not running or not listening on the socket.
    #[error("netd is not reachable at {socket}: {source} (is netd running?)")]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The connection broke or timed out mid-request.
    #[error("talking to netd at {socket} failed: {source}")]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// netd answered with an error.
    #[error("netd: {0}")]
    Api(#[from] ApiError),
    /// netd's answer made no sense (version mismatch?).
    #[error("unexpected answer from netd at {socket}: {detail}")]
    Protocol { socket: PathBuf, detail: String },
}

impl ClientError {
    /// True when netd is down, restarting or temporarily unable to serve:
    /// the caller should try again later.
    pub fn is_try_again(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Io { .. } => true,
            ClientError::Api(e) => e.kind == crate::ErrorKind::TryAgainLater,
            ClientError::Protocol { .. } => false,
        }
    }
}

/// A client for one socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: Duration::from_secs(30),
        }
    }

    /// How long one request may take (connect, send, answer).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn status(&self) -> Result<Status, ClientError> {
        self.call("GET", "/v1/status", None::<&()>)
    }

    pub fn list_endpoints(&self) -> Result<Vec<Endpoint>, ClientError> {
        self.call("GET", "/v1/endpoints", None::<&()>)
    }

    pub fn add_endpoint(&self, req: &AddEndpoint) -> Result<Endpoint, ClientError> {
        self.call("POST", "/v1/endpoints", Some(req))
    }

    /// The endpoint, or `None` if netd does not know it.
    pub fn get_endpoint(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<Endpoint>, ClientError> {
        let path = endpoint_path(container_id, ifname);
        match self.call("GET", &path, None::<&()>) {
            Ok(ep) => Ok(Some(ep)),
            Err(ClientError::Api(e)) if e.kind == crate::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn delete_endpoint(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Deleted, ClientError> {
        self.call("DELETE", &endpoint_path(container_id, ifname), None::<&()>)
    }

    pub fn peers(&self) -> Result<Vec<crate::PeerInfo>, ClientError> {
        self.call("GET", "/v1/peers", None::<&()>)
    }

    pub fn gc(&self, req: &GcRequest) -> Result<GcResult, ClientError> {
        self.call("POST", "/v1/gc", Some(req))
    }

    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = match body {
            Some(b) => serde_json::to_vec(b)
                .map_err(|e| self.protocol(format!("encoding request: {e}")))?,
            None => Vec::new(),
        };
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            })?;
        let io = |source| ClientError::Io {
            socket: self.socket.clone(),
            source,
        };
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: netd\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(io)?;
        stream.write_all(&body).map_err(io)?;
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .map_err(io)?;
        let (status, body) = parse_response(&raw).map_err(|d| self.protocol(d))?;
        if (200..300).contains(&status) {
            serde_json::from_slice(body).map_err(|e| self.protocol(format!("decoding answer: {e}")))
        } else {
            match serde_json::from_slice::<ApiError>(body) {
                Ok(e) => Err(ClientError::Api(e)),
                Err(_) => Err(self.protocol(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(body)
                        .chars()
                        .take(200)
                        .collect::<String>()
                ))),
            }
        }
    }

    fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            detail,
        }
    }
}

fn endpoint_path(container_id: &str, ifname: &str) -> String {
    format!("/v1/endpoints/{}/{}", escape(container_id), escape(ifname))
}

/// Percent-encodes everything but unreserved URL characters.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits an HTTP/1.1 answer into its status code and body. Handles a
/// `Content-Length` body and a chunked one.
fn parse_response(raw: &[u8]) -> Result<(u16, &[u8]), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty answer")?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    if chunked {
        return Err("chunked answers are not supported".into());
    }
    match length {
        Some(n) if n <= body.len() => Ok((status, &body[..n])),
        Some(n) => Err(format!("answer cut short: {} of {n} bytes", body.len())),
        None => Ok((status, body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx: y\r\n\r\n{}extra";
        assert_eq!(parse_response(raw).unwrap(), (200, &b"{}"[..]));
        let raw = b"HTTP/1.1 404 Not Found\r\n\r\nbody";
        assert_eq!(parse_response(raw).unwrap(), (404, &b"body"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}").is_err());
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn escapes_path_segments() {
        assert_eq!(escape("abc-1.2_x"), "abc-1.2_x");
        assert_eq!(escape("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn unreachable_socket_is_try_again() {
        let c = Client::new("/nonexistent/netd.sock");
        let e = c.status().unwrap_err();
        assert!(e.is_try_again());
        assert!(e.to_string().contains("is netd running?"), "{e}");
    }
}
