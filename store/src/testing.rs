//! Test helpers: a throwaway etcd server on 127.0.0.1.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use weft_store::{testing::EtcdServer, EtcdStore, Store};
//! let server = EtcdServer::start()?;
//! let store = EtcdStore::connect(server.config()).await?;
//! store.put("/k", b"v", None).await?;
//! # Ok(())
//! # }
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::EtcdConfig;

/// Where Debian's `etcd-server` package installs etcd.
const ETCD_BINARY: &str = "/usr/bin/etcd";
/// How long to wait for etcd to answer `/health` after starting it.
const STARTUP_LIMIT: Duration = Duration::from_secs(15);
/// How many bytes of etcd's log to put in an error.
const LOG_TAIL_BYTES: u64 = 4096;

static SERVER_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A single-member etcd cluster in a temporary directory, listening only on
/// 127.0.0.1. Dropping it kills the process and removes its data.
pub struct EtcdServer {
    binary: PathBuf,
    name: String,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Where it listens: 127.0.0.1, or an address inside `netns`.
    listen: Ipv4Addr,
    /// A network namespace (`ip netns` name) to run in.
    netns: Option<String>,
}

impl std::fmt::Debug for EtcdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdServer")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint())
            .field("dir", &self.dir.path())
            .field("running", &self.child.is_some())
            .finish()
    }
}

impl EtcdServer {
    /// Starts etcd on two free ports of 127.0.0.1 with a fresh data dir and
    /// waits until it answers (at most 15 s).
    pub fn start() -> io::Result<EtcdServer> {
        let binary = find_etcd()?;
        // A port picked here may be taken by someone else before etcd binds
        // it; try a few times with new ports.
        let mut last_err = None;
        for _ in 0..3 {
            let (client_port, peer_port) = free_ports()?;
            let n = SERVER_COUNTER.fetch_add(1, Ordering::Relaxed);
            let mut server = EtcdServer {
                binary: binary.clone(),
                name: format!("weft-test-{}-{n}", std::process::id()),
                client_port,
                peer_port,
                dir: tempfile::Builder::new().prefix("weft-etcd-").tempdir()?,
                child: None,
                listen: Ipv4Addr::LOCALHOST,
                netns: None,
            };
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("etcd did not start")))
    }

    /// Starts etcd inside network namespace `netns` (an `ip netns` name),
    /// listening on `listen`, an address of that namespace: for daemons in
    /// test namespaces that cannot reach the root namespace's loopback.
    pub fn start_in_netns(netns: &str, listen: Ipv4Addr) -> io::Result<EtcdServer> {
        let binary = find_etcd()?;
        let (client_port, peer_port) = free_ports()?;
        let n = SERVER_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut server = EtcdServer {
            binary,
            name: format!("weft-test-{}-{n}", std::process::id()),
            client_port,
            peer_port,
            dir: tempfile::Builder::new().prefix("weft-etcd-").tempdir()?,
            child: None,
            listen,
            netns: Some(netns.to_owned()),
        };
        server.launch()?;
        Ok(server)
    }

    /// The client URL, `http://<listen address>:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.listen, self.client_port)
    }

    /// A store config for this server with short timeouts for tests:
    /// 1 s to connect, 2 s per request.
    pub fn config(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.endpoint()],
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
        }
    }

    /// Kills etcd (SIGKILL) and waits for it to exit. Keeps the data dir and
    /// the ports, for [`restart`](Self::restart).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data dir and waits until it
    /// answers. Stops it first if it is running.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        // The ports were just released by the killed process; retry once
        // after a moment if binding races.
        let mut last_err = None;
        for _ in 0..2 {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last_err = Some(e);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("etcd did not restart")))
    }

    /// The process id of the running etcd, if it runs (e.g. to freeze it
    /// with SIGSTOP in a test).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The temporary directory holding the data dir and `etcd.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Spawns etcd and waits for it to answer; on failure, kills it and
    /// returns an error with the tail of its log.
    fn launch(&mut self) -> io::Result<()> {
        let client_url = self.endpoint();
        let peer_url = format!("http://{}:{}", self.listen, self.peer_port);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        };
        // Settings from the environment (ETCD_*) would override nothing we
        // pass, but could add listeners or change behaviour: drop them.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("{}={peer_url}", self.name))
            .arg("--initial-cluster-token")
            .arg(&self.name)
            .arg("--initial-cluster-state")
            .arg("new")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start {}: {e}", self.binary.display()),
            )
        })?;
        self.child = Some(child);
        match self.wait_healthy() {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stop();
                Err(io::Error::new(
                    e.kind(),
                    format!(
                        "etcd on {} did not come up: {e}\n--- tail of {} ---\n{}",
                        self.endpoint(),
                        self.log_path().display(),
                        log_tail(&self.log_path())
                    ),
                ))
            }
        }
    }

    fn wait_healthy(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + STARTUP_LIMIT;
        let addr = SocketAddr::from((self.listen, self.client_port));
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(io::Error::other(format!("etcd exited early with {status}")));
                }
            }
            if health_ok_in(self.netns.as_deref(), addr) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no healthy answer within {STARTUP_LIMIT:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        // `dir` (a TempDir) removes itself after this.
    }
}

fn find_etcd() -> io::Result<PathBuf> {
    let path = PathBuf::from(ETCD_BINARY);
    if path.is_file() {
        return Ok(path);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("etcd");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "etcd binary not found: apt-get install etcd-server",
    ))
}

/// Two distinct free TCP ports on 127.0.0.1 (both held open while picking,
/// so they differ).
fn free_ports() -> io::Result<(u16, u16)> {
    let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let b = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// [`health_ok`] from inside network namespace `netns` (a thread of its
/// own enters it), or from here.
fn health_ok_in(netns: Option<&str>, addr: SocketAddr) -> bool {
    let Some(ns) = netns else {
        return health_ok(addr);
    };
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let Ok(file) = File::open(&path) else {
            return false;
        };
        // SAFETY: setns(2) on a valid namespace fd affects only this thread,
        // which exits right after the check.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return false;
        }
        health_ok(addr)
    })
    .join()
    .unwrap_or(false)
}

/// Whether etcd at `addr` answers `GET /health` with `"health":"true"`.
fn health_ok(addr: SocketAddr) -> bool {
    let attempt = || -> io::Result<bool> {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        conn.set_read_timeout(Some(Duration::from_secs(1)))?;
        conn.set_write_timeout(Some(Duration::from_secs(1)))?;
        conn.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut reply = Vec::new();
        conn.take(64 * 1024).read_to_end(&mut reply)?;
        let reply = String::from_utf8_lossy(&reply);
        Ok(reply.starts_with("HTTP/1.")
            && reply.contains(" 200 ")
            && reply.contains("\"health\":\"true\""))
    };
    attempt().unwrap_or(false)
}

/// The last few KiB of a log file, or a note why it cannot be read.
fn log_tail(path: &Path) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read log: {e})"))
}

pub use crate::test_store::{BatchWriter, TestStore};
