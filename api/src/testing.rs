//! Test helpers (cargo feature `testing`): a fake netd on a Unix socket in a
//! fresh directory, serving a given number of connections with a closure,
//! for tests of how clients handle netd's answers — complete, cut short,
//! silent or reset.
//!
//! ```no_run
//! use weft_api::testing::{http, FakeNetd};
//! let netd = FakeNetd::answer(1, http(200, r#"{"released":null}"#));
//! let deleted = netd.client().delete_endpoint("abc", "eth0").unwrap();
//! assert_eq!(deleted.released, None);
//! netd.join();
//! ```
//!
//! The helpers panic on setup failures: they are for tests only.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::client::Client;

/// A fake netd: a listener on `<tempdir>/netd.sock` and a thread serving
/// connections. The socket's directory lives as long as the fake.
pub struct FakeNetd {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl FakeNetd {
    /// Serves `connections` connections, one after the other, each with
    /// `behave`.
    pub fn serve(connections: usize, behave: impl Fn(UnixStream) + Send + 'static) -> FakeNetd {
        let (dir, socket) = socket_path();
        let listener = UnixListener::bind(&socket).expect("binding the fake netd's socket");
        let thread = std::thread::spawn(move || {
            for _ in 0..connections {
                let (stream, _) = listener
                    .accept()
                    .expect("accepting on the fake netd's socket");
                behave(stream);
            }
        });
        FakeNetd {
            _dir: dir,
            socket,
            thread: Some(thread),
        }
    }

    /// Reads each of `connections` requests whole, writes `answer` and
    /// closes.
    pub fn answer(connections: usize, answer: impl Into<Vec<u8>>) -> FakeNetd {
        let answer = answer.into();
        FakeNetd::serve(connections, move |mut s| {
            read_request(&mut s);
            s.write_all(&answer).expect("writing the fake answer");
        })
    }

    /// The fake's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A client of the fake with a 10 s timeout.
    pub fn client(&self) -> Client {
        Client::new(&self.socket).with_timeout(Duration::from_secs(10))
    }

    /// Waits until the fake has served all its connections, and passes on
    /// its panics (a failed assertion inside `behave`).
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

/// A socket path in a fresh directory (the directory goes with the
/// returned guard); nothing listens on it.
pub fn socket_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("making a temporary directory");
    let path = dir.path().join("netd.sock");
    (dir, path)
}

/// Reads one whole request (headers and `Content-Length` body) and returns
/// its bytes.
pub fn read_request(s: &mut UnixStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().expect("a numeric Content-Length"));
            if raw.len() >= end + 4 + length {
                return raw;
            }
        }
        let n = s.read(&mut buf).expect("reading the request");
        assert_ne!(n, 0, "the client closed mid-request");
        raw.extend_from_slice(&buf[..n]);
    }
}

/// A complete HTTP answer with a `Content-Length` JSON body.
pub fn http(status: u16, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         date: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\n{body}",
        body.len()
    )
}
