//! Shared test helpers: running the plugin binary, a fake netd that speaks
//! `weft_api`'s protocol on a Unix socket (so the plugin's ADD/DEL/CHECK/GC
//! paths can be driven without the real daemon), and running code inside a
//! network namespace on a dedicated thread.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde_json::Value;
use weft_api::{
    AddEndpoint, ApiError, Attachment, Deleted, DnsConfig, Endpoint, ErrorKind, GcRequest,
    GcResult, Status,
};

/// The plugin binary.
pub const PLUGIN: &str = env!("CARGO_BIN_EXE_weft");

/// What one plugin run gave.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// The CNI error code (panics unless this is a spec-shaped error).
    pub fn error_code(&self) -> u64 {
        assert_ne!(self.code, 0, "expected a failure: {self:?}");
        let v = self.json();
        let obj = v.as_object().unwrap();
        for key in obj.keys() {
            assert!(
                ["cniVersion", "code", "msg", "details"].contains(&key.as_str()),
                "unexpected key {key} in error {v}"
            );
        }
        assert!(v["cniVersion"].is_string(), "{v}");
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v["code"].as_u64().unwrap()
    }

    pub fn msg(&self) -> String {
        self.json()["msg"].as_str().unwrap_or_default().to_string()
    }

    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "plugin failed: {self:?}");
        self
    }
}

/// A plugin invocation: `CNI_*` variables and the config on stdin.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub stdin: String,
    /// Sets `WEFT_CNI_TIMING=1` (step timings on stderr).
    pub timing: bool,
}

impl Invocation {
    pub fn new(command: &str, stdin: impl Into<String>) -> Self {
        Invocation {
            command: Some(command.into()),
            stdin: stdin.into(),
            ..Default::default()
        }
    }

    pub fn container(mut self, id: &str, ifname: &str) -> Self {
        self.container_id = Some(id.into());
        self.ifname = Some(ifname.into());
        self
    }

    pub fn netns(mut self, netns: impl AsRef<Path>) -> Self {
        self.netns = Some(netns.as_ref().to_string_lossy().into_owned());
        self
    }

    pub fn args(mut self, args: &str) -> Self {
        self.args = Some(args.into());
        self
    }

    pub fn timing(mut self) -> Self {
        self.timing = true;
        self
    }

    /// Runs the plugin in the calling thread's network namespace.
    pub fn run(&self) -> Run {
        let mut cmd = Command::new(PLUGIN);
        for var in [
            "CNI_COMMAND",
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_ARGS",
            "CNI_PATH",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("CNI_PATH", "/opt/cni/bin");
        if self.timing {
            cmd.env("WEFT_CNI_TIMING", "1");
        } else {
            cmd.env_remove("WEFT_CNI_TIMING");
        }
        let pairs = [
            ("CNI_COMMAND", &self.command),
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_NETNS", &self.netns),
            ("CNI_IFNAME", &self.ifname),
            ("CNI_ARGS", &self.args),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting the plugin");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(self.stdin.as_bytes())
            .unwrap();
        let Output {
            status,
            stdout,
            stderr,
        } = child.wait_with_output().unwrap();
        Run {
            code: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }
}

/// A network configuration for the plugin.
pub fn conf(version: &str, socket: impl AsRef<Path>) -> Value {
    serde_json::json!({
        "cniVersion": version,
        "name": "weft",
        "type": "weft",
        "socket": socket.as_ref(),
    })
}

/// How the fake netd answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// POST /v1/endpoints → 409 PoolExhausted.
    PoolExhausted,
    /// Everything → 503 TryAgainLater.
    TryAgain,
    /// GET /v1/status says the store is down.
    StoreDown,
}

/// The fake's state, open for tests to look at and change.
#[derive(Debug)]
pub struct State {
    pub mode: Mode,
    pub block: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    pub bridge: String,
    pub dns: DnsConfig,
    pub endpoints: BTreeMap<(String, String), Endpoint>,
    /// Every request: (method, path, body).
    pub requests: Vec<(String, String, String)>,
    next: u32,
}

/// A fake netd on a Unix socket in a temporary directory.
pub struct FakeNetd {
    pub socket: PathBuf,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl FakeNetd {
    pub fn start() -> FakeNetd {
        let dir = tempfile::Builder::new()
            .prefix("weft-cni-test-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("netd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Normal,
            block: "10.42.0.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 42, 0, 1),
            mtu: 1400,
            bridge: "weft0".into(),
            dns: DnsConfig {
                nameservers: vec![weft_api::DNS_ADDR],
                domain: "weft.local".into(),
                search: vec!["shop.weft.local".into(), "weft.local".into()],
                options: vec!["ndots:2".into()],
            },
            endpoints: BTreeMap::new(),
            requests: Vec::new(),
            next: 2,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        serve(conn, &state);
                    }
                }
            })
        };
        FakeNetd {
            socket,
            state,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.state
            .lock()
            .unwrap()
            .endpoints
            .values()
            .cloned()
            .collect()
    }
}

impl Drop for FakeNetd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(mut conn: UnixStream, state: &Mutex<State>) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head, body_start) = loop {
        let n = match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break (String::from_utf8_lossy(&buf[..p]).into_owned(), p + 4);
        }
    };
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < body_start + length {
        let n = match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[body_start..]).into_owned();
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let method = words.next().unwrap_or_default().to_string();
    let path = words.next().unwrap_or_default().to_string();
    let (status, answer) = {
        let mut st = state.lock().unwrap();
        st.requests
            .push((method.clone(), path.clone(), body.clone()));
        route(&mut st, &method, &path, &body)
    };
    let answer = answer.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{answer}",
        answer.len()
    );
}

fn error(kind: ErrorKind, msg: &str) -> (u16, Value) {
    (
        kind.http_status(),
        serde_json::to_value(ApiError::new(kind, msg)).unwrap(),
    )
}

fn route(st: &mut State, method: &str, path: &str, body: &str) -> (u16, Value) {
    if st.mode == Mode::TryAgain {
        return error(ErrorKind::TryAgainLater, "store unavailable");
    }
    let parts: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(unescape)
        .collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    match (method, parts.as_slice()) {
        ("GET", ["v1", "status"]) => {
            let status = Status {
                version: "fake".into(),
                host_id: "h0".into(),
                block: st.block,
                gateway: st.gateway,
                bridge: st.bridge.clone(),
                mtu: st.mtu,
                cluster_range: "10.42.0.0/16".parse().unwrap(),
                store: "fake".into(),
                store_ok: st.mode != Mode::StoreDown,
                endpoints: st.endpoints.len(),
                capacity: 253,
                iptables: "none".into(),
            };
            (200, serde_json::to_value(status).unwrap())
        }
        ("POST", ["v1", "endpoints"]) => {
            let req: AddEndpoint = match serde_json::from_str(body) {
                Ok(r) => r,
                Err(e) => return error(ErrorKind::InvalidRequest, &e.to_string()),
            };
            if st.mode == Mode::PoolExhausted {
                return error(ErrorKind::PoolExhausted, "block 10.42.0.0/24 is full");
            }
            let key = (req.container_id.clone(), req.ifname.clone());
            if let Some(ep) = st.endpoints.get(&key) {
                return (200, serde_json::to_value(ep).unwrap());
            }
            let ip = Ipv4Addr::from(u32::from(st.block.network()) + st.next);
            st.next += 1;
            let ep = Endpoint {
                container_id: req.container_id,
                ifname: req.ifname,
                netns: req.netns,
                host_id: "h0".into(),
                address: Ipv4Network::new(ip, st.block.prefix()).unwrap(),
                gateway: st.gateway,
                mtu: st.mtu,
                bridge: st.bridge.clone(),
                mac: Some(weft_model::Mac::for_addr(ip)),
                name: req.name,
                service: req.service,
                stack: req.stack,
                aliases: req.aliases,
                port_mappings: req.port_mappings,
                dns: st.dns.clone(),
                created_at_ms: 1,
            };
            st.endpoints.insert(key, ep.clone());
            (200, serde_json::to_value(ep).unwrap())
        }
        ("GET", ["v1", "endpoints", id, ifname]) => {
            match st.endpoints.get(&(id.to_string(), ifname.to_string())) {
                Some(ep) => (200, serde_json::to_value(ep).unwrap()),
                None => error(ErrorKind::NotFound, "no such endpoint"),
            }
        }
        ("DELETE", ["v1", "endpoints", id, ifname]) => {
            let released = st
                .endpoints
                .remove(&(id.to_string(), ifname.to_string()))
                .map(|ep| ep.address.ip());
            (200, serde_json::to_value(Deleted { released }).unwrap())
        }
        ("POST", ["v1", "gc"]) => {
            let req: GcRequest = match serde_json::from_str(body) {
                Ok(r) => r,
                Err(e) => return error(ErrorKind::InvalidRequest, &e.to_string()),
            };
            let valid: Vec<Attachment> = req.valid;
            let mut released = Vec::new();
            st.endpoints.retain(|(id, ifname), ep| {
                let keep = valid
                    .iter()
                    .any(|a| &a.container_id == id && &a.ifname == ifname);
                if !keep {
                    released.push(ep.clone());
                }
                keep
            });
            (200, serde_json::to_value(GcResult { released }).unwrap())
        }
        _ => error(ErrorKind::NotFound, "no such route"),
    }
}
