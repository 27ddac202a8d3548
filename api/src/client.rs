//! A small blocking client for netd's Unix socket: one HTTP/1.1 request per
//! connection (`Connection: close`), no async runtime.

use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{
    AddEndpoint, ApiError, Deleted, Endpoint, GcRequest, GcResult, KeyRotation, PolicyCheck,
    PolicyDoc, PolicyVerdict, PutPolicy, ServiceInfo, ServiceSpec, Status,
};

/// Largest answer the client accepts (an endpoint list of a full /16 block
/// fits comfortably).
const MAX_RESPONSE: u64 = 64 << 20;

/// Largest header block the client accepts.
const MAX_HEADERS: usize = 64 << 10;

/// What went wrong talking to netd.
///
/// The variants split by what the caller should do: [`Unreachable`],
/// [`Io`] and [`Incomplete`] mean netd gave no complete answer (it is down,
/// restarting, or died while answering) and the request should be retried
/// ([`ClientError::is_try_again`]); [`Api`] and [`Protocol`] are answers
/// netd actually gave.
///
/// [`Unreachable`]: ClientError::Unreachable
/// [`Io`]: ClientError::Io
/// [`Incomplete`]: ClientError::Incomplete
/// [`Api`]: ClientError::Api
/// [`Protocol`]: ClientError::Protocol
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// netd is not running or not listening on the socket (connect failed).
    #[error(
        "netd is not reachable at {socket}: {source} (is netd running? it may be restarting: \
         the runtime should retry)"
    )]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The connection broke (reset, broken pipe) or timed out while sending
    /// the request or waiting for the answer.
    #[error("netd is not answering at {socket}: {source}; it may be restarting: the runtime should retry")]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// netd closed the connection before its answer was complete (in the
    /// status line, the headers or the body): it died or restarted while
    /// answering.
    #[error("netd is not answering at {socket}: {detail}; it may be restarting: the runtime should retry")]
    Incomplete { socket: PathBuf, detail: String },
    /// netd answered with an error. (Not its `source`: the message already
    /// holds it, and a `{:#}` chain would print it twice.)
    #[error("netd: {0}")]
    Api(ApiError),
    /// netd's complete answer made no sense (version mismatch?).
    #[error("unexpected answer from netd at {socket}: {detail}")]
    Protocol { socket: PathBuf, detail: String },
}

impl ClientError {
    /// True when netd is down, restarting, died while answering or is
    /// temporarily unable to serve: the caller should try again later.
    /// False only for a complete answer netd gave (an error other than
    /// "try again later", or nonsense).
    pub fn is_try_again(&self) -> bool {
        match self {
            ClientError::Unreachable { .. }
            | ClientError::Io { .. }
            | ClientError::Incomplete { .. } => true,
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

    /// How long one request may take, from connecting to the end of the
    /// answer (a deadline for the whole exchange, not per read). Connecting
    /// itself is not bounded: it returns at once unless netd's listen
    /// backlog is full.
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

    /// Rotates the host's WireGuard key (returns when the switch is done:
    /// after the settle delay, a few seconds).
    pub fn rotate_key(&self) -> Result<KeyRotation, ClientError> {
        self.call::<(), _>("POST", "/v1/wireguard/rotate-key", None)
    }

    /// The cluster's policy document and its revision.
    pub fn policy(&self) -> Result<PolicyDoc, ClientError> {
        self.call("GET", "/v1/policy", None::<&()>)
    }

    /// Replaces the cluster's policy; an [`ErrorKind::Conflict`] answer
    /// means `expect_revision` was stale.
    ///
    /// [`ErrorKind::Conflict`]: crate::ErrorKind::Conflict
    pub fn put_policy(&self, req: &PutPolicy) -> Result<PolicyDoc, ClientError> {
        self.call("PUT", "/v1/policy", Some(req))
    }

    /// What the policy decides for one flow, and why.
    pub fn check_policy(&self, req: &PolicyCheck) -> Result<PolicyVerdict, ClientError> {
        self.call("POST", "/v1/policy/check", Some(req))
    }

    /// Every service with its VIP, settings and backends.
    pub fn services(&self) -> Result<Vec<ServiceInfo>, ClientError> {
        self.call("GET", "/v1/services", None::<&()>)
    }

    /// One service (`service.stack`), or `None` if it has no record.
    pub fn service(&self, name: &str) -> Result<Option<ServiceInfo>, ClientError> {
        let path = format!("/v1/services/{}", escape(name));
        match self.call("GET", &path, None::<&()>) {
            Ok(s) => Ok(Some(s)),
            Err(ClientError::Api(e)) if e.kind == crate::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets a service's mode, balancing, affinity and health check
    /// (creating its record if needed).
    pub fn put_service(&self, name: &str, spec: &ServiceSpec) -> Result<ServiceInfo, ClientError> {
        self.call("PUT", &format!("/v1/services/{}", escape(name)), Some(spec))
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
        let deadline = Instant::now() + self.timeout;
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            })?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: netd\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        self.send(&mut stream, &request, deadline)?;
        let (raw, answer) = self.receive(&mut stream, deadline)?;
        let Answer {
            status,
            body,
            delimited,
        } = answer;
        let body = &raw[body];
        if (200..300).contains(&status) {
            serde_json::from_slice(body).map_err(|e| {
                if !delimited && e.is_eof() {
                    // No Content-Length: the body ends where the connection
                    // does, so JSON that stops short means netd stopped
                    // short.
                    self.incomplete(format!(
                        "the connection closed after {} body bytes, in the middle of the JSON \
                         ({e})",
                        body.len()
                    ))
                } else {
                    self.protocol(format!("decoding answer: {e}"))
                }
            })
        } else {
            match serde_json::from_slice::<ApiError>(body) {
                Ok(e) => Err(ClientError::Api(e)),
                Err(e) if !delimited && e.is_eof() => Err(self.incomplete(format!(
                    "the connection closed after {} body bytes of an HTTP {status} answer, \
                     in the middle of the JSON ({e})",
                    body.len()
                ))),
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

    /// Writes the whole request before the deadline.
    fn send(
        &self,
        stream: &mut UnixStream,
        mut request: &[u8],
        deadline: Instant,
    ) -> Result<(), ClientError> {
        while !request.is_empty() {
            stream
                .set_write_timeout(Some(self.time_left(deadline)?))
                .map_err(|e| self.io(e))?;
            match stream.write(request) {
                Ok(0) => {
                    return Err(self.io(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the connection took no more of the request",
                    )))
                }
                Ok(n) => request = &request[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_or_timeout(e)),
            }
        }
        Ok(())
    }

    /// Reads until the answer is complete (all headers, and as many body
    /// bytes as `Content-Length` says, or up to the end of the connection
    /// without one). Anything less is [`ClientError::Incomplete`] or
    /// [`ClientError::Io`], never [`ClientError::Protocol`].
    fn receive(
        &self,
        stream: &mut UnixStream,
        deadline: Instant,
    ) -> Result<(Vec<u8>, Answer), ClientError> {
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 << 10];
        loop {
            match parse_response(&raw, false) {
                Parsed::Complete(answer) => return Ok((raw, answer)),
                Parsed::Malformed(detail) => return Err(self.protocol(detail)),
                Parsed::Partial(_) => {}
            }
            if raw.len() as u64 >= MAX_RESPONSE {
                return Err(
                    self.protocol(format!("the answer is larger than {MAX_RESPONSE} bytes"))
                );
            }
            stream
                .set_read_timeout(Some(self.time_left(deadline)?))
                .map_err(|e| self.io(e))?;
            match stream.read(&mut buf) {
                Ok(0) => {
                    return match parse_response(&raw, true) {
                        Parsed::Complete(answer) => Ok((raw, answer)),
                        Parsed::Malformed(detail) => Err(self.protocol(detail)),
                        Parsed::Partial(detail) => Err(self.incomplete(detail)),
                    }
                }
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_or_timeout(e)),
            }
        }
    }

    /// The time left before `deadline`, or a timeout error.
    fn time_left(&self, deadline: Instant) -> Result<Duration, ClientError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(self.io(self.timed_out()))
        } else {
            Ok(left)
        }
    }

    fn timed_out(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no complete answer within {:?}", self.timeout),
        )
    }

    /// A read or write error; a timeout (which a socket reports as
    /// `WouldBlock`) says so in words.
    fn io_or_timeout(&self, e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.io(self.timed_out()),
            _ => self.io(e),
        }
    }

    fn io(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    fn incomplete(&self, detail: String) -> ClientError {
        ClientError::Incomplete {
            socket: self.socket.clone(),
            detail,
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

/// A complete answer: its status and where its body is in the bytes read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    body: Range<usize>,
    /// Whether `Content-Length` delimited the body (else the end of the
    /// connection did).
    delimited: bool,
}

/// What the bytes read so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Parsed {
    Complete(Answer),
    /// Not complete yet; what is missing, for when the connection has ended.
    Partial(String),
    /// Not a well-formed HTTP answer, whatever follows.
    Malformed(String),
}

/// Parses an HTTP/1.1 answer as far as it has come: status code and body
/// (delimited by `Content-Length`, or by the end of the connection if there
/// is none; chunked answers are refused). `eof`: the connection has ended,
/// so nothing more will come.
fn parse_response(raw: &[u8], eof: bool) -> Parsed {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        if raw.len() > MAX_HEADERS {
            return Parsed::Malformed(format!("headers longer than {MAX_HEADERS} bytes"));
        }
        // As much of the status line as has come must look like one.
        match raw.windows(2).position(|w| w == b"\r\n") {
            Some(end) => {
                if let Err(detail) = std::str::from_utf8(&raw[..end])
                    .map_err(|_| "the status line is not UTF-8".to_string())
                    .and_then(status_code)
                {
                    return Parsed::Malformed(detail);
                }
            }
            None => {
                let n = raw.len().min(5);
                if raw[..n] != b"HTTP/"[..n] {
                    return Parsed::Malformed(format!(
                        "not an HTTP answer: {:?}",
                        String::from_utf8_lossy(&raw[..raw.len().min(40)])
                    ));
                }
            }
        }
        return Parsed::Partial(if raw.is_empty() {
            "the connection closed before any answer".into()
        } else {
            format!(
                "the connection closed after {} bytes, before the end of the headers",
                raw.len()
            )
        });
    };
    let Ok(head) = std::str::from_utf8(&raw[..split]) else {
        return Parsed::Malformed("headers are not UTF-8".into());
    };
    let start = split + 4;
    let body = raw.len() - start;
    let mut lines = head.split("\r\n");
    let status = match status_code(lines.next().unwrap_or_default()) {
        Ok(s) => s,
        Err(detail) => return Parsed::Malformed(detail),
    };
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            return Parsed::Malformed("chunked answers are not supported".into());
        } else if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) => length = Some(n),
                Err(_) => return Parsed::Malformed(format!("bad Content-Length {value:?}")),
            }
        }
    }
    match length {
        Some(n) if n <= body => Parsed::Complete(Answer {
            status,
            body: start..start + n,
            delimited: true,
        }),
        Some(n) => Parsed::Partial(format!(
            "the connection closed after {body} of {n} body bytes (HTTP {status})"
        )),
        None if eof => Parsed::Complete(Answer {
            status,
            body: start..raw.len(),
            delimited: false,
        }),
        None => Parsed::Partial(format!(
            "the connection did not close after {body} body bytes (HTTP {status})"
        )),
    }
}

/// The status code of an HTTP/1.x status line.
fn status_code(line: &str) -> Result<u16, String> {
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(status))) if v.starts_with("HTTP/1.") && (100..600).contains(&status) => {
            Ok(status)
        }
        _ => Err(format!("bad status line {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error netd answered reads once, whatever way a caller prints the
    /// chain (`netd: error: netd: no VIP...: no VIP...` before).
    #[test]
    fn api_errors_are_not_their_own_source() {
        let e = ClientError::Api(ApiError::new(crate::ErrorKind::Conflict, "no VIP left"));
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(e.to_string().matches("no VIP left").count(), 1);
    }

    fn complete(raw: &[u8]) -> (u16, &[u8]) {
        match parse_response(raw, true) {
            Parsed::Complete(a) => (a.status, &raw[a.body]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_answers() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx: y\r\n\r\n{}extra";
        assert_eq!(complete(raw), (200, &b"{}"[..]));
        let raw = b"HTTP/1.1 404 Not Found\r\n\r\nbody";
        assert_eq!(complete(raw), (404, &b"body"[..]));
        // Without Content-Length the answer is complete only at the end of
        // the connection.
        assert!(matches!(parse_response(raw, false), Parsed::Partial(_)));
        assert!(matches!(
            parse_response(b"garbage", true),
            Parsed::Malformed(_)
        ));
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                true
            ),
            Parsed::Malformed(_)
        ));
    }

    #[test]
    fn every_proper_prefix_is_partial() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                    content-length: 40\r\n\r\n{\"kind\":\"try_again_later\",\"message\":\"x\"}";
        assert_eq!(complete(raw).0, 503);
        for cut in 0..raw.len() {
            for eof in [false, true] {
                assert!(
                    matches!(parse_response(&raw[..cut], eof), Parsed::Partial(_)),
                    "cut at {cut}: {:?}",
                    parse_response(&raw[..cut], eof)
                );
            }
        }
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}", true),
            Parsed::Partial(d) if d.contains("2 of 9 body bytes")
        ));
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
