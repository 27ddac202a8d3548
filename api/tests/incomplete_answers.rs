#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The client against fake netds that misbehave: every way of not getting a
//! complete answer (no socket, nobody listening, closed early, cut short in
//! the headers or the body, reset, silent) must be a "try again" error
//! (`Unreachable`, `Io` or `Incomplete`), and only a complete answer may be
//! `Api` or `Protocol`.

use std::io::{ErrorKind as IoKind, Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use weft_api::client::{Client, ClientError};
use weft_api::testing::{http, read_request, socket_path, FakeNetd};
use weft_api::{AddEndpoint, ApiError, ErrorKind, Status};

/// A fake netd that serves one connection with `behave`.
fn serve(behave: impl Fn(std::os::unix::net::UnixStream) + Send + 'static) -> FakeNetd {
    FakeNetd::serve(1, behave)
}

/// A fake netd that reads one request, then writes `answer` and closes.
fn answer(answer: impl Into<Vec<u8>>) -> FakeNetd {
    FakeNetd::answer(1, answer)
}

fn status() -> Status {
    Status {
        version: "test".into(),
        host_id: "h1".into(),
        block: "10.42.0.0/24".parse().unwrap(),
        gateway: "10.42.0.1".parse().unwrap(),
        bridge: "weft0".into(),
        mtu: 1420,
        cluster_range: "10.42.0.0/16".parse().unwrap(),
        store: "sqlite".into(),
        store_ok: true,
        endpoints: 0,
        capacity: 253,
        iptables: "nft".into(),
    }
}

fn add_request() -> AddEndpoint {
    AddEndpoint {
        container_id: "ctr1".into(),
        ifname: "eth0".into(),
        netns: "/var/run/netns/x".into(),
        name: None,
        service: None,
        stack: None,
        aliases: Vec::new(),
        port_mappings: Vec::new(),
        service_mode: None,
    }
}

fn complete_status_answer() -> String {
    http(200, &serde_json::to_string(&status()).unwrap())
}

/// The error must be a retryable one that says what to do.
fn assert_try_again(e: &ClientError) {
    assert!(e.is_try_again(), "must be try-again: {e:?}");
    let msg = e.to_string();
    assert!(msg.contains("the runtime should retry"), "{msg}");
    assert!(msg.contains("netd.sock"), "names the socket: {msg}");
}

fn assert_incomplete(e: &ClientError, detail_has: &str) {
    match e {
        ClientError::Incomplete { detail, .. } => {
            assert!(
                detail.contains(detail_has),
                "{detail:?} lacks {detail_has:?}"
            )
        }
        other => panic!("expected Incomplete, got {other:?}"),
    }
    assert_try_again(e);
    assert!(
        e.to_string().starts_with("netd is not answering at "),
        "{e}"
    );
}

fn assert_io(e: &ClientError, kind: IoKind) {
    match e {
        ClientError::Io { source, .. } => assert_eq!(source.kind(), kind, "{e:?}"),
        other => panic!("expected Io({kind:?}), got {other:?}"),
    }
    assert_try_again(e);
}

// (a)
#[test]
fn missing_socket_is_unreachable_and_try_again() {
    let (_dir, socket) = socket_path();
    let e = Client::new(&socket).status().unwrap_err();
    match &e {
        ClientError::Unreachable { source, .. } => assert_eq!(source.kind(), IoKind::NotFound),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert_try_again(&e);
    assert!(e.to_string().contains("is netd running?"), "{e}");
}

// (b)
#[test]
fn socket_without_listener_is_unreachable_and_try_again() {
    let (_dir, socket) = socket_path();
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists(), "the socket file stays behind");
    let e = Client::new(&socket).status().unwrap_err();
    match &e {
        ClientError::Unreachable { source, .. } => {
            assert_eq!(source.kind(), IoKind::ConnectionRefused)
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert_try_again(&e);
}

// (c)
#[test]
fn close_without_answer_is_incomplete() {
    let fake = answer("");
    let e = fake.client().status().unwrap_err();
    assert_incomplete(&e, "before any answer");
    fake.join();
}

// (d) The failure of the issue: "no end of headers" was a protocol error
// (CNI 103).
#[test]
fn close_in_the_status_line_or_headers_is_incomplete() {
    let full = complete_status_answer();
    let headers_end = full.find("\r\n\r\n").unwrap();
    for cut in [
        "HTTP/1".len(),
        "HTTP/1.1 20".len(),
        "HTTP/1.1 200 X\r\n".len(),
        "HTTP/1.1 200 X\r\ncontent-ty".len(),
        headers_end,
        headers_end + 2,
        headers_end + 3,
    ] {
        let fake = answer(&full.as_bytes()[..cut]);
        let e = fake.client().add_endpoint(&add_request()).unwrap_err();
        assert_incomplete(&e, "before the end of the headers");
        assert!(e.to_string().contains(&format!("after {cut} bytes")), "{e}");
        fake.join();
    }
}

// (e)
#[test]
fn close_in_the_body_is_incomplete() {
    let fake = answer("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"version\"");
    let e = fake.client().add_endpoint(&add_request()).unwrap_err();
    assert_incomplete(&e, "after 10 of 100 body bytes");
    fake.join();
    // The same for an error answer cut short.
    let full = http(503, r#"{"kind":"try_again_later","message":"store down"}"#);
    let fake = answer(&full.as_bytes()[..full.len() - 5]);
    let e = fake.client().status().unwrap_err();
    assert_incomplete(&e, "body bytes (HTTP 503)");
    fake.join();
}

// (e) Every proper prefix of a complete answer is incomplete, never a
// protocol error; the whole answer parses.
#[test]
fn every_prefix_of_an_answer_is_incomplete() {
    let full = complete_status_answer();
    for cut in 0..full.len() {
        let fake = answer(&full.as_bytes()[..cut]);
        let e = fake.client().status().unwrap_err();
        assert!(
            matches!(e, ClientError::Incomplete { .. }),
            "cut at {cut}: {e:?}"
        );
        fake.join();
    }
    let fake = answer(full);
    assert_eq!(fake.client().status().unwrap(), status());
    fake.join();
}

// (e) Without Content-Length the body ends with the connection: JSON that
// stops short means netd stopped short.
#[test]
fn close_delimited_body_cut_in_the_json_is_incomplete() {
    let json = serde_json::to_string(&status()).unwrap();
    let fake = answer(format!(
        "HTTP/1.1 200 OK\r\n\r\n{}",
        &json[..json.len() / 2]
    ));
    let e = fake.client().status().unwrap_err();
    assert_incomplete(&e, "in the middle of the JSON");
    fake.join();
    // A whole close-delimited body is fine...
    let fake = answer(format!("HTTP/1.1 200 OK\r\n\r\n{json}"));
    assert_eq!(fake.client().status().unwrap(), status());
    fake.join();
    // ... and one that is not JSON at all is netd's nonsense.
    let fake = answer("HTTP/1.1 200 OK\r\n\r\nnot json");
    let e = fake.client().status().unwrap_err();
    assert!(matches!(e, ClientError::Protocol { .. }), "{e:?}");
    fake.join();
}

// (f)
#[test]
fn no_answer_times_out_as_try_again() {
    let (release, wait) = mpsc::channel::<()>();
    let fake = serve(move |mut s| {
        read_request(&mut s);
        let _ = wait.recv(); // hold the connection open, silent
    });
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let e = Client::new(fake.socket())
        .with_timeout(timeout)
        .status()
        .unwrap_err();
    let took = started.elapsed();
    assert_io(&e, IoKind::TimedOut);
    assert!(e.to_string().contains("no complete answer within"), "{e}");
    assert!(took >= timeout && took < Duration::from_secs(5), "{took:?}");
    drop(release);
    fake.join();
}

// (f) The timeout is for the whole answer: a netd that trickles bytes
// without ever finishing does not keep the client forever.
#[test]
fn trickling_answer_times_out_as_try_again() {
    let (release, wait) = mpsc::channel::<()>();
    let fake = serve(move |mut s| {
        read_request(&mut s);
        for b in b"HTTP/1.1 200 OK\r\nx-slow: ".iter().cycle() {
            if s.write_all(&[*b]).is_err()
                || wait.recv_timeout(Duration::from_millis(20))
                    != Err(mpsc::RecvTimeoutError::Timeout)
            {
                return;
            }
        }
    });
    let timeout = Duration::from_millis(400);
    let started = Instant::now();
    let e = Client::new(fake.socket())
        .with_timeout(timeout)
        .status()
        .unwrap_err();
    let took = started.elapsed();
    assert_io(&e, IoKind::TimedOut);
    assert!(took < Duration::from_secs(3), "{took:?}");
    drop(release);
    fake.join();
}

// (g) Closing a Unix socket with unread input makes the peer's next read
// fail with ECONNRESET.
#[test]
fn reset_is_io_and_try_again() {
    let fake = serve(|mut s| {
        // One byte: the request has arrived (it is written in one go);
        // the rest stays unread.
        s.read_exact(&mut [0u8; 1]).unwrap();
    });
    let e = fake.client().status().unwrap_err();
    assert_io(&e, IoKind::ConnectionReset);
    fake.join();
    // The same after part of an answer.
    let fake = serve(|mut s| {
        s.read_exact(&mut [0u8; 1]).unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap();
    });
    let e = fake.client().add_endpoint(&add_request()).unwrap_err();
    assert_io(&e, IoKind::ConnectionReset);
    fake.join();
}

// (h)
#[test]
fn complete_answer_with_bad_json_is_protocol() {
    for body in ["not json", "{\"version\":", r#"{"unexpected":"shape"}"#] {
        let fake = answer(http(200, body));
        let e = fake.client().status().unwrap_err();
        assert!(matches!(e, ClientError::Protocol { .. }), "{body}: {e:?}");
        assert!(!e.is_try_again(), "{e:?}");
        assert!(e.to_string().contains("decoding answer"), "{e}");
        fake.join();
    }
}

// (h) Things that are not HTTP, whatever follows, are protocol errors too.
#[test]
fn malformed_answers_are_protocol() {
    for text in [
        "garbage\r\n\r\n",
        "SSH-2.0-OpenSSH",
        "HTTP/1.1 abc\r\n",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: ten\r\n\r\n{}",
    ] {
        let fake = answer(text);
        let e = fake.client().status().unwrap_err();
        assert!(matches!(e, ClientError::Protocol { .. }), "{text:?}: {e:?}");
        assert!(!e.is_try_again());
        fake.join();
    }
    // An error status without an ApiError body.
    let fake = answer(http(502, "bad gateway"));
    let e = fake.client().status().unwrap_err();
    assert!(matches!(e, ClientError::Protocol { .. }), "{e:?}");
    fake.join();
}

// (i)
#[test]
fn complete_error_answers_map_by_kind() {
    for (kind, try_again) in [
        (ErrorKind::TryAgainLater, true),
        (ErrorKind::PoolExhausted, false),
        (ErrorKind::InvalidRequest, false),
        (ErrorKind::Internal, false),
    ] {
        let body = serde_json::to_string(&ApiError::new(kind, "because")).unwrap();
        let fake = answer(http(kind.http_status(), &body));
        let e = fake.client().add_endpoint(&add_request()).unwrap_err();
        match &e {
            ClientError::Api(api) => {
                assert_eq!(api.kind, kind);
                assert_eq!(api.message, "because");
            }
            other => panic!("expected Api({kind:?}), got {other:?}"),
        }
        assert_eq!(e.is_try_again(), try_again, "{kind:?}");
        fake.join();
    }
}

// A complete answer is taken without waiting for netd to close.
#[test]
fn complete_answer_does_not_wait_for_close() {
    let (release, wait) = mpsc::channel::<()>();
    let fake = serve(move |mut s| {
        read_request(&mut s);
        s.write_all(complete_status_answer().as_bytes()).unwrap();
        let _ = wait.recv();
    });
    let started = Instant::now();
    let got = Client::new(fake.socket())
        .with_timeout(Duration::from_secs(5))
        .status()
        .unwrap();
    assert_eq!(got, status());
    assert!(started.elapsed() < Duration::from_secs(4));
    drop(release);
    fake.join();
}
