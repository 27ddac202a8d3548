//! The two-host WireGuard lab the root tests share (`wg.rs`, `rotate.rs`,
//! `flood.rs`), set up as netd would: each lab host H gets the block
//! 10.42.H.0/24 with its gateway 10.42.H.1 on a bridge `weft0` (forwarding
//! on), a `WgDevice` on TUN `weft-wg` (created inside the host's namespace
//! by a thread that joined it), a route for the other host's block via the
//! TUN sourced from its gateway, and the other host as its peer. Also: ping
//! between gateways, iperf3 with retries, the device threads' CPU time, and
//! one test at a time.
#![allow(dead_code)] // each test file uses its own part of it

use std::net::SocketAddrV4;
use std::process::Output;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use weft_tests::{in_netns, Host, Lab};
use weft_wg::{self as wg, KeyPair, WgConfig, WgDevice, WgPeer};

pub const TUN: &str = "weft-wg";
pub const PORT: u16 = 51820;
pub const UNDERLAY_MTU: u32 = 1500;
pub const MTU: u32 = UNDERLAY_MTU - wg::OVERHEAD_IPV4;

/// One test at a time: the throughput numbers mean more without neighbours,
/// and two cores do not run several labs well.
static SERIAL: Mutex<()> = Mutex::new(());

/// Logs to the test's output (`RUST_LOG`), then waits for the other tests
/// of this file to finish.
pub fn serial() -> MutexGuard<'static, ()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device settings of the lab: TUN `weft-wg` on port 51820 with the
/// overlay MTU of a 1500-byte underlay.
pub fn config(private_key: [u8; 32], keepalive: Option<u16>, queues: usize) -> WgConfig {
    WgConfig {
        ifname: TUN.into(),
        listen_port: PORT,
        mtu: MTU,
        private_key,
        keepalive,
        queues,
    }
}

/// One lab host with its block, its keys and (once started) its device.
pub struct Node {
    pub host: Host,
    pub index: usize,
    pub keys: KeyPair,
    pub keepalive: Option<u16>,
    pub dev: Option<WgDevice>,
}

impl Node {
    /// Lab host `index` with its block on bridge `weft0` and forwarding on;
    /// no device yet ([`Node::start`]).
    pub fn new(lab: &Lab, index: usize, keys: KeyPair, keepalive: Option<u16>) -> Node {
        let host = lab.host(index).clone();
        host.ip(["link", "add", "weft0", "type", "bridge"]).unwrap();
        host.ip([
            "addr",
            "add",
            &format!("10.42.{index}.1/24"),
            "dev",
            "weft0",
        ])
        .unwrap();
        host.ip(["link", "set", "weft0", "up"]).unwrap();
        host.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .unwrap();
        Node {
            host,
            index,
            keys,
            keepalive,
            dev: None,
        }
    }

    /// Starts (or restarts: reattaches the TUN) the device with the node's
    /// keys, inside the host's namespace.
    pub fn start(&mut self) {
        let cfg = config(self.keys.private_key(), self.keepalive, 0);
        self.dev = Some(in_netns(self.host.netns().path(), || {
            WgDevice::start(cfg).unwrap()
        }));
    }

    pub fn block(&self) -> String {
        format!("10.42.{}.0/24", self.index)
    }

    pub fn gw(&self) -> String {
        format!("10.42.{}.1", self.index)
    }

    pub fn endpoint(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.host.addr(), PORT)
    }

    /// The running device.
    pub fn dev(&self) -> &WgDevice {
        self.dev.as_ref().unwrap()
    }

    /// This node as a peer of the other, with its own public key.
    pub fn peer(&self) -> WgPeer {
        self.peer_with(self.keys.public_key())
    }

    /// This node as a peer of the other, under `public_key`.
    pub fn peer_with(&self, public_key: [u8; 32]) -> WgPeer {
        WgPeer {
            public_key,
            endpoint: self.endpoint().into(),
            allowed: self.block().parse().unwrap(),
        }
    }

    /// As netd does: the other's block via the TUN, sourced from our gateway.
    pub fn route_to(&self, other: &Node) {
        self.host
            .ip([
                "route",
                "add",
                &other.block(),
                "dev",
                TUN,
                "src",
                &self.gw(),
            ])
            .unwrap();
    }

    /// This device's view of `other`.
    pub fn stats_for(&self, other: &Node) -> wg::PeerStats {
        self.dev()
            .stats()
            .into_iter()
            .find(|s| s.public_key == other.keys.public_key())
            .unwrap()
    }
}

/// Lab hosts 0 and 1 with fresh keys, each with its block on bridge
/// `weft0`, a running device, the other's block routed via the TUN, and
/// each other as peers.
pub fn pair(lab: &Lab, keepalive: Option<u16>) -> (Node, Node) {
    let mut a = Node::new(lab, 0, KeyPair::generate().unwrap(), keepalive);
    let mut b = Node::new(lab, 1, KeyPair::generate().unwrap(), keepalive);
    a.start();
    b.start();
    assert_eq!(a.dev().mtu(), MTU);
    a.route_to(&b);
    b.route_to(&a);
    a.dev().set_peers(vec![b.peer()]);
    b.dev().set_peers(vec![a.peer()]);
    (a, b)
}

/// Three pings from `from`'s gateway to `to`'s, 200 ms apart, with `extra`
/// options.
pub fn ping(from: &Node, to: &Node, extra: &[&str]) -> Output {
    let gw_from = from.gw();
    let gw_to = to.gw();
    let mut argv = vec![
        "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "-I", &gw_from,
    ];
    argv.extend_from_slice(extra);
    argv.push(&gw_to);
    from.host.output(&argv).unwrap()
}

/// A command's standard output and error, for messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// One iperf3 run from `client` (bound to `client_addr`) to a one-off
/// server on `server` at `server_addr`, with `args` (`-n 200M`, `-t 3`);
/// retried for up to 10 s while the server does not listen yet. Returns
/// iperf3's JSON report.
pub fn iperf3(
    server: &Host,
    client: &Host,
    server_addr: &str,
    client_addr: &str,
    port: u16,
    args: &[&str],
) -> serde_json::Value {
    let port = port.to_string();
    let mut srv = server
        .spawn(["iperf3", "-s", "-1", "-B", server_addr, "-p", &port])
        .unwrap();
    let mut argv = vec![
        "iperf3",
        "-c",
        server_addr,
        "-B",
        client_addr,
        "-p",
        &port,
        "-J",
    ];
    argv.extend_from_slice(args);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = client.output(&argv).unwrap();
        let v = serde_json::from_slice::<serde_json::Value>(&o.stdout).ok();
        // iperf3 -J exits 0 even when it could not connect; the JSON says.
        if let Some(v) = v.filter(|v| o.status.success() && v.get("error").is_none()) {
            let _ = srv.wait_timeout(Duration::from_secs(5));
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "iperf3 never succeeded: {}; server: {}",
            text(&o),
            srv.stderr()
        );
        // The server may not listen yet.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// CPU seconds used so far by this process's WireGuard threads (every
/// lab host's device runs in this process).
pub fn wg_cpu_seconds() -> f64 {
    weft_tests::proc::thread_cpu_seconds("weft-wg").unwrap()
}
