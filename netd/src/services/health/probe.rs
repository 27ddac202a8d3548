//! One probe of a container: a TCP connect, or an HTTP/1.1 GET read up to
//! its status line (2xx and 3xx are healthy), all within the timeout.

use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_model::Probe;

/// The most of an HTTP answer read to find its status line.
const MAX_STATUS_LINE: usize = 1024;

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub ok: bool,
    /// `connected`, `HTTP 200`, `connection refused`, `timed out after 400 ms`...
    pub detail: String,
}

/// Probes `addr` once, all within `timeout`.
pub async fn probe(addr: Ipv4Addr, probe: &Probe, timeout: Duration) -> Seen {
    let attempt = async {
        let mut stream = TcpStream::connect((addr, probe.port()))
            .await
            .map_err(|e| io_detail(&e))?;
        match probe {
            Probe::Tcp { .. } => Ok("connected".to_owned()),
            Probe::Http { port, path } => {
                let request = http_request(addr, *port, path);
                stream
                    .write_all(request.as_bytes())
                    .await
                    .map_err(|e| io_detail(&e))?;
                let head = read_status_line(&mut stream).await?;
                let status = http_status(&head)?;
                let detail = format!("HTTP {status}");
                if (200..400).contains(&status) {
                    Ok(detail)
                } else {
                    Err(detail)
                }
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(detail)) => Seen { ok: true, detail },
        Ok(Err(detail)) => Seen { ok: false, detail },
        Err(_) => Seen {
            ok: false,
            detail: format!("timed out after {} ms", timeout.as_millis()),
        },
    }
}

fn io_detail(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        std::io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        _ => e.to_string(),
    }
}

/// The GET a health check sends.
pub fn http_request(addr: Ipv4Addr, port: u16, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}:{port}\r\nUser-Agent: weft-netd-health\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    )
}

/// Reads until the end of the first line (or the answer's end).
async fn read_status_line(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < MAX_STATUS_LINE {
        let n = stream.read(&mut buf).await.map_err(|e| io_detail(&e))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// The status code of an HTTP answer's first line (`HTTP/1.1 200 OK`).
pub fn http_status(head: &[u8]) -> Result<u16, String> {
    if head.is_empty() {
        return Err("closed without an HTTP answer".to_owned());
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let status = match (words.next(), words.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") && code.len() == 3 => code.parse().ok(),
        _ => None,
    };
    status.ok_or_else(|| {
        let shown: String = line.trim().chars().take(60).collect();
        format!("not an HTTP answer: {shown:?}")
    })
}
