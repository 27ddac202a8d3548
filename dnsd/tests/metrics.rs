//! The standalone `dnsd` binary with `--metrics-addr` on 127.0.0.1 (no root
//! needed): `/metrics` answers with dnsd's own counters, named as netd's
//! exporter names them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the process when the test ends, however it ends.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago (TCP and, almost always, UDP).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        p.push(label.len() as u8);
        p.extend(label.as_bytes());
    }
    p.push(0);
    p.extend(qtype.to_be_bytes());
    p.extend(1u16.to_be_bytes());
    p
}

/// `GET path`: status line and the whole answer.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn standalone_dnsd_serves_its_counters_on_metrics_addr() {
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    // An upstream nobody answers at (TEST-NET-1): nothing here is forwarded.
    std::fs::write(&resolv, "nameserver 192.0.2.53\n").unwrap();
    let dns: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let child = Command::new(env!("CARGO_BIN_EXE_dnsd"))
        .arg(format!(
            "--store=sqlite:{}",
            dir.path().join("store.db").display()
        ))
        .arg(format!("--listen={dns}"))
        .arg(format!("--metrics-addr={metrics}"))
        .arg(format!("--resolv-conf={}", resolv.display()))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = Kill(child);

    let started = Instant::now();
    let first = loop {
        if let Ok(text) = http_get(metrics, "/metrics") {
            break text;
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("dnsd exited with {status} before serving /metrics");
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no /metrics on {metrics} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(
        first.contains("application/openmetrics-text"),
        "content type: {first}"
    );
    assert_eq!(
        value(&first, r#"weft_dns_queries_total{transport="udp"}"#),
        Some(0.0),
        "{first}"
    );

    // Two names under the domain that do not exist: answered from the
    // table, NXDOMAIN.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for id in [1u16, 2] {
        sock.send_to(&query(id, "nosuch.weft.internal", 1), dns)
            .unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("no DNS answer");
        assert_eq!(&buf[..2], id.to_be_bytes(), "answer to query {id}");
        assert_eq!(buf[3] & 0x0F, 3, "NXDOMAIN");
        assert!(n >= 12);
    }

    let text = http_get(metrics, "/metrics").unwrap();
    for (series, want) in [
        (r#"weft_dns_queries_total{transport="udp"}"#, 2.0),
        (r#"weft_dns_queries_total{transport="tcp"}"#, 0.0),
        (r#"weft_dns_query_types_total{type="A"}"#, 2.0),
        (r#"weft_dns_responses_total{rcode="NXDOMAIN"}"#, 2.0),
        ("weft_dns_merged_total", 0.0),
        ("weft_dns_cache_evictions_total", 0.0),
        ("weft_dns_forwarded_total", 0.0),
        ("weft_dns_cache_entries", 0.0),
    ] {
        assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
    }
    assert!(
        value(
            &text,
            r#"weft_dns_request_duration_seconds_count{path="local"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert!(
        text.contains("# HELP weft_dns_queries DNS queries received, by transport"),
        "the help text dashboards know: {text}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    let other = http_get(metrics, "/nothing").unwrap();
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}
