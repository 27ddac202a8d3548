//! Tunnel throughput, latency, CPU and MTU: weft's two backends beside their
//! references, container to container across two hosts, all built in one lab
//! of four hosts on one underlay switch and measured interleaved, run by run.
//!
//! ```text
//!  h0, h1: raw underlay (routed, no tunnel)   10.97.{0,1}.0/24
//!          hand-made kernel VXLAN (VNI 100)   10.98.{0,1}.0/24
//!          weft vxlan (netd)                  10.42.{0,1}.0/24
//!  h2, h3: wireguard-go (Debian)              10.99.{0,1}.0/24
//!          weft wireguard (netd)              10.42.{0,1}.0/24 (own store)
//! ```
//!
//! Every mode has the same shape: a container namespace with `eth0` (veth)
//! on a bridge in its host, the host routing into the tunnel, the tunnel
//! over the underlay to the other host, its bridge and container. The
//! container's MTU is the mode's overlay MTU: underlay − 50 for VXLAN,
//! underlay − 60 for WireGuard (weft's choice for an IPv4 underlay; given to
//! wireguard-go too so both carry the same segments), the underlay MTU for
//! raw routing. The client always runs in the container on the first host
//! of the pair, the server in the one on the second; "←" is iperf3 `-R`.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weft_tests::weft::{CniCall, Netd};
use weft_tests::{Lab, LabOptions, Netns, NsChild};

use crate::sys::{percentile, CpuMeter, Fig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Raw,
    KernelVxlan,
    WeftVxlan,
    WireguardGo,
    WeftWireguard,
}

pub const MODES: [Mode; 5] = [
    Mode::Raw,
    Mode::KernelVxlan,
    Mode::WeftVxlan,
    Mode::WireguardGo,
    Mode::WeftWireguard,
];

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Raw => "raw underlay (no tunnel)",
            Mode::KernelVxlan => "kernel VXLAN (hand-made)",
            Mode::WeftVxlan => "weft vxlan",
            Mode::WireguardGo => "wireguard-go",
            Mode::WeftWireguard => "weft wireguard",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Mode::Raw => "raw underlay",
            Mode::KernelVxlan => "kernel VXLAN",
            Mode::WeftVxlan => "weft vxlan",
            Mode::WireguardGo => "wireguard-go",
            Mode::WeftWireguard => "weft wireguard",
        }
    }

    /// The reference a weft mode is compared with.
    pub fn reference(self) -> Option<Mode> {
        match self {
            Mode::WeftVxlan => Some(Mode::KernelVxlan),
            Mode::WeftWireguard => Some(Mode::WireguardGo),
            _ => None,
        }
    }

    fn overhead(self) -> u32 {
        match self {
            Mode::Raw => 0,
            Mode::KernelVxlan | Mode::WeftVxlan => 50,
            Mode::WireguardGo | Mode::WeftWireguard => 60,
        }
    }

    /// The pair of hosts it runs on: (client host, server host).
    fn hosts(self) -> (usize, usize) {
        match self {
            Mode::Raw | Mode::KernelVxlan | Mode::WeftVxlan => (0, 1),
            Mode::WireguardGo | Mode::WeftWireguard => (2, 3),
        }
    }

    /// Second octet of the reference modes' container subnets.
    fn subnet(self) -> u8 {
        match self {
            Mode::Raw => 97,
            Mode::KernelVxlan => 98,
            Mode::WireguardGo => 99,
            Mode::WeftVxlan | Mode::WeftWireguard => 42,
        }
    }

    /// Whether its data path runs in a process (else in the kernel).
    pub fn userspace(self) -> bool {
        matches!(self, Mode::WireguardGo | Mode::WeftWireguard)
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub runs: usize,
    pub secs: u32,
    /// Bytes per iperf3 test instead of `secs` (--quick).
    pub bytes: Option<u64>,
    pub udp_mbit: u32,
    pub pings: u32,
    pub sweep_mtus: Vec<u32>,
}

/// One mode's figures at the main underlay MTU.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModeResult {
    pub mode: Option<Mode>,
    pub label: String,
    pub overlay_mtu: Option<u32>,
    /// Gbit/s received.
    pub tcp1_fwd: Fig,
    pub tcp1_rev: Fig,
    pub tcp4_fwd: Fig,
    pub tcp4_rev: Fig,
    pub udp_gbps: Fig,
    pub udp_loss_pct: Fig,
    pub ping_p50_ms: Fig,
    pub ping_p99_ms: Fig,
    /// Whole-machine busy CPU seconds per GB (10^9 bytes) received, over the
    /// four TCP tests of a run.
    pub cpu_system_s_per_gb: Fig,
    /// The tunnel processes' CPU seconds per GB (userspace modes only).
    pub cpu_tunnel_s_per_gb: Option<Fig>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelResults {
    pub underlay_mtu: u32,
    pub runs: usize,
    pub secs: u32,
    /// Bytes per test instead of seconds (--quick).
    #[serde(default)]
    pub bytes: Option<u64>,
    pub udp_mbit: u32,
    pub pings: u32,
    pub topology: String,
    pub modes: Vec<ModeResult>,
}

/// The DF search and throughput of one mode at one underlay MTU.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MtuRow {
    pub underlay_mtu: u32,
    pub mode: Option<Mode>,
    pub label: String,
    /// The MTU the mode advertises: netd's `status` for weft, the device
    /// MTU set by hand for the references (the container's eth0 in all).
    pub advertised: Option<u32>,
    /// The largest ICMP payload that passes with DF set.
    pub largest_df_payload: Option<u32>,
    /// largest payload + 28 (IPv4 + ICMP headers).
    pub path_mtu: Option<u32>,
    pub matches: Option<bool>,
    /// What happens one byte over the path MTU.
    pub one_over: Option<String>,
    pub tcp1_fwd: Fig,
    pub tcp4_fwd: Fig,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MtuResults {
    pub mtus: Vec<u32>,
    pub rows: Vec<MtuRow>,
}

/// A mode that is up: its two containers and what to measure CPU on.
struct Pair {
    mode: Mode,
    client: Netns,
    server: Netns,
    server_ip: String,
    advertised: u32,
    tunnel_pids: Vec<u32>,
}

/// What the mode setups start: kept until the testbed goes.
#[derive(Default)]
struct Extras {
    children: Vec<NsChild>,
    netds: Vec<Netd>,
    wg_sockets: Vec<std::path::PathBuf>,
}

impl Drop for Extras {
    fn drop(&mut self) {
        for s in &self.wg_sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// The lab with every mode set up. Fields drop in order: the processes
/// first, then the lab (which deletes the namespaces).
struct Testbed {
    paths: Vec<Pair>,
    errors: Vec<(Mode, String)>,
    extras: Extras,
    lab: Lab,
}

fn underlay_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, 10 + i as u8)
}

/// A container behind a bridge on `host`, for the reference modes:
/// returns its namespace and address (10.S.side.2, gateway .1).
fn ref_container(
    lab: &Lab,
    host: usize,
    mode: Mode,
    side: u8,
    mtu: u32,
) -> Result<(Netns, String)> {
    let s = mode.subnet();
    let h = lab.host(host).netns().clone();
    let c = lab.container(host, &format!("r{s}"))?;
    let m = mtu.to_string();
    let br = format!("rb{s}");
    let veth = format!("rv{s}");
    h.ip(["link", "add", &br, "mtu", &m, "type", "bridge"])?;
    h.ip(["addr", "add", &format!("10.{s}.{side}.1/24"), "dev", &br])?;
    h.ip(["link", "set", &br, "up"])?;
    h.ip([
        "link",
        "add",
        &veth,
        "mtu",
        &m,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "mtu",
        &m,
        "netns",
        c.name(),
    ])?;
    h.ip(["link", "set", &veth, "master", &br, "up"])?;
    c.ip(["addr", "add", &format!("10.{s}.{side}.2/24"), "dev", "eth0"])?;
    c.ip(["link", "set", "eth0", "up"])?;
    c.ip([
        "route",
        "add",
        "default",
        "via",
        &format!("10.{s}.{side}.1"),
    ])?;
    Ok((c.netns().clone(), format!("10.{s}.{side}.2")))
}

fn setup_raw(lab: &Lab, mtu: u32) -> Result<Pair> {
    let mode = Mode::Raw;
    let (a, b) = mode.hosts();
    let (client, _) = ref_container(lab, a, mode, 0, mtu)?;
    let (server, server_ip) = ref_container(lab, b, mode, 1, mtu)?;
    for (me, peer, side) in [(a, b, 1), (b, a, 0)] {
        lab.host(me).ip([
            "route",
            "add",
            &format!("10.97.{side}.0/24"),
            "via",
            &underlay_addr(peer).to_string(),
            "dev",
            "eth0",
        ])?;
    }
    Ok(Pair {
        mode,
        client,
        server,
        server_ip,
        advertised: mtu,
        tunnel_pids: vec![],
    })
}

/// Kernel VXLAN set up the way weft's vxlan backend does it: no learning,
/// per peer a route to the peer's subnet via its .0 address onlink, a
/// permanent neighbour for that address and an FDB entry to the peer's
/// underlay address.
fn setup_kernel_vxlan(lab: &Lab, mtu: u32) -> Result<Pair> {
    let mode = Mode::KernelVxlan;
    let (a, b) = mode.hosts();
    let omtu = mtu - mode.overhead();
    let (client, _) = ref_container(lab, a, mode, 0, omtu)?;
    let (server, server_ip) = ref_container(lab, b, mode, 1, omtu)?;
    let mac = |side: usize| format!("02:00:00:98:00:{:02x}", side + 1);
    for (side, (me, peer)) in [(a, b), (b, a)].into_iter().enumerate() {
        let h = lab.host(me);
        let peer_side = 1 - side;
        h.ip([
            "link",
            "add",
            "kvx0",
            "address",
            &mac(side),
            "mtu",
            &omtu.to_string(),
            "type",
            "vxlan",
            "id",
            "100",
            "local",
            &underlay_addr(me).to_string(),
            "dev",
            "eth0",
            "dstport",
            "4789",
            "nolearning",
        ])?;
        h.ip(["link", "set", "kvx0", "up"])?;
        h.ip(["addr", "add", &format!("10.98.{side}.0/32"), "dev", "kvx0"])?;
        let gw = format!("10.98.{peer_side}.0");
        h.ip([
            "neigh",
            "add",
            &gw,
            "lladdr",
            &mac(peer_side),
            "dev",
            "kvx0",
            "nud",
            "permanent",
        ])?;
        h.exec([
            "bridge",
            "fdb",
            "append",
            &mac(peer_side),
            "dev",
            "kvx0",
            "dst",
            &underlay_addr(peer).to_string(),
        ])?;
        h.ip([
            "route",
            "add",
            &format!("10.98.{peer_side}.0/24"),
            "via",
            &gw,
            "dev",
            "kvx0",
            "onlink",
            "src",
            &format!("10.98.{side}.1"),
        ])?;
    }
    Ok(Pair {
        mode,
        client,
        server,
        server_ip,
        advertised: omtu,
        tunnel_pids: vec![],
    })
}

fn wg_key(stdin: Option<&str>, arg: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("wg")
        .arg(arg)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running wg (apt-get install wireguard-tools)")?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("wg {arg} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Debian's wireguard-go in each host, configured with `wg` over its UAPI
/// socket; same port style, MTU and routing as weft's WireGuard backend.
fn setup_wireguard_go(lab: &Lab, mtu: u32, ex: &mut Extras) -> Result<Pair> {
    let mode = Mode::WireguardGo;
    let (a, b) = mode.hosts();
    let omtu = mtu - mode.overhead();
    let (client, _) = ref_container(lab, a, mode, 0, omtu)?;
    let (server, server_ip) = ref_container(lab, b, mode, 1, omtu)?;
    let keys: Vec<(String, String)> = (0..2)
        .map(|_| {
            let private = wg_key(None, "genkey")?;
            let public = wg_key(Some(&private), "pubkey")?;
            Ok((private, public))
        })
        .collect::<Result<_>>()?;
    let mut pids = Vec::new();
    for (side, (me, peer)) in [(a, b), (b, a)].into_iter().enumerate() {
        let h = lab.host(me);
        // UAPI sockets live in the shared /var/run/wireguard: the interface
        // name must be unique on the machine, so it carries the lab prefix.
        let ifname = format!("{}g{me}", lab.prefix());
        let sock = Pair::socket(&ifname);
        let child = h.spawn([
            "env",
            "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1",
            "LOG_LEVEL=error",
            "wireguard-go",
            "-f",
            &ifname,
        ])?;
        pids.push(child.pid());
        ex.wg_sockets.push(sock.clone());
        ex.children.push(child);
        weft_tests::wait_until(Duration::from_secs(10), "wireguard-go UAPI socket", || {
            sock.exists()
        })?;
        let keyfile = lab.dir().join(format!("wg{side}.key"));
        std::fs::write(&keyfile, &keys[side].0)?;
        let peer_side = 1 - side;
        h.exec([
            "wg",
            "set",
            &ifname,
            "private-key",
            &keyfile.display().to_string(),
            "listen-port",
            "51821",
            "peer",
            &keys[peer_side].1,
            "endpoint",
            &format!("{}:51821", underlay_addr(peer)),
            "allowed-ips",
            &format!("10.99.{peer_side}.0/24"),
        ])?;
        h.ip(["link", "set", &ifname, "mtu", &omtu.to_string(), "up"])?;
        h.ip([
            "route",
            "add",
            &format!("10.99.{peer_side}.0/24"),
            "dev",
            &ifname,
            "src",
            &format!("10.99.{side}.1"),
        ])?;
    }
    Ok(Pair {
        mode,
        client,
        server,
        server_ip,
        advertised: omtu,
        tunnel_pids: pids,
    })
}

impl Pair {
    fn socket(ifname: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
    }
}

fn attach(netd: &Netd, lab: &Lab, host: usize, name: &str) -> Result<(Netns, String)> {
    let c = lab.container(host, name)?;
    let out = CniCall {
        host: netd.host(),
        command: "ADD",
        container_id: name,
        netns: &c.path().display().to_string(),
        ifname: "eth0",
        args: "IgnoreUnknown=1",
        config: &netd.cni_config("1.0.0"),
    }
    .run()?;
    if !out.ok() {
        bail!("CNI ADD failed: {} {}", out.stdout, out.stderr);
    }
    let ip = out.json()["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .context("no address in the CNI result")?
        .to_owned();
    Ok((c.netns().clone(), ip))
}

fn netd_pid(host: &Netns) -> Result<u32> {
    host.pids()?
        .into_iter()
        .find(|&p| crate::sys::proc_comm(p).as_deref() == Some("netd"))
        .with_context(|| format!("no netd process in {host}"))
}

fn setup_weft(lab: &Lab, mode: Mode, ex: &mut Extras) -> Result<Pair> {
    let (a, b) = mode.hosts();
    let backend = if mode == Mode::WeftVxlan {
        "vxlan"
    } else {
        "wireguard"
    };
    let store = format!(
        "sqlite:{}",
        lab.dir().join(format!("{backend}.db")).display()
    );
    let flag = format!("--backend={backend}");
    let na = Netd::start(lab, a, &store, &[&flag]).with_context(|| format!("netd in h{a}"))?;
    let nb = Netd::start(lab, b, &store, &[&flag]).with_context(|| format!("netd in h{b}"))?;
    let (client, _) = attach(&na, lab, a, &format!("w{backend}"))?;
    let (server, server_ip) = attach(&nb, lab, b, &format!("w{backend}"))?;
    let out = na.cli(&["status", "--json"])?;
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("netd status --json")?;
    let advertised = status["mtu"].as_u64().context("no mtu in netd status")? as u32;
    let pids = if mode.userspace() {
        vec![netd_pid(na.host())?, netd_pid(nb.host())?]
    } else {
        vec![]
    };
    ex.netds.push(na);
    ex.netds.push(nb);
    Ok(Pair {
        mode,
        client,
        server,
        server_ip,
        advertised,
        tunnel_pids: pids,
    })
}

fn reachable(p: &Pair, within: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        if p.client
            .output(["ping", "-c1", "-W1", &p.server_ip])?
            .status
            .success()
        {
            return Ok(());
        }
        if t.elapsed() > within {
            bail!(
                "{}: {} does not answer from {}",
                p.mode.short(),
                p.server_ip,
                p.client
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn testbed(mtu: u32, modes: &[Mode]) -> Result<Testbed> {
    let lab = Lab::new(LabOptions::hosts(4).mtu(mtu)).context("creating the lab (needs root)")?;
    for h in lab.hosts() {
        h.exec(["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
    }
    let mut tb = Testbed {
        paths: vec![],
        errors: vec![],
        extras: Extras::default(),
        lab,
    };
    for &mode in modes {
        let made = match mode {
            Mode::Raw => setup_raw(&tb.lab, mtu),
            Mode::KernelVxlan => setup_kernel_vxlan(&tb.lab, mtu),
            Mode::WireguardGo => setup_wireguard_go(&tb.lab, mtu, &mut tb.extras),
            Mode::WeftVxlan | Mode::WeftWireguard => setup_weft(&tb.lab, mode, &mut tb.extras),
        }
        .and_then(|p| {
            reachable(&p, Duration::from_secs(15))?;
            Ok(p)
        });
        match made {
            Ok(p) => tb.paths.push(p),
            Err(e) => {
                eprintln!("weft-bench: {} at MTU {mtu}: {e:#}", mode.short());
                tb.errors.push((mode, format!("{e:#}")));
            }
        }
    }
    Ok(tb)
}

/// What one iperf3 run reported.
struct Iperf {
    gbps: f64,
    bytes: f64,
    loss_pct: f64,
}

fn wait_listening(ns: &Netns, port: u16) -> Result<()> {
    weft_tests::wait_until(Duration::from_secs(5), "iperf3 server listening", || {
        ns.output(["ss", "-ltnH", &format!("sport = :{port}")])
            .map(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
            .unwrap_or(false)
    })?;
    Ok(())
}

enum Test {
    Tcp { streams: u32, reverse: bool },
    Udp { mbit: u32, len: u32 },
}

fn iperf(p: &Pair, test: &Test, o: &Options) -> Result<Iperf> {
    let mut srv = p.server.spawn(["iperf3", "-s", "-1", "-p", "5201"])?;
    wait_listening(&p.server, 5201)?;
    let limit = (o.secs + 20).to_string();
    // A fixed time, or (--quick) a fixed size: iperf3 takes whole seconds.
    let (flag, amount) = match o.bytes {
        Some(b) => ("-n", b.to_string()),
        None => ("-t", o.secs.to_string()),
    };
    let mut argv: Vec<String> = [
        "timeout",
        &limit,
        "iperf3",
        "-c",
        &p.server_ip,
        "-p",
        "5201",
        flag,
        &amount,
        "-J",
        "--connect-timeout",
        "3000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match test {
        Test::Tcp { streams, reverse } => {
            argv.extend(["-P".into(), streams.to_string()]);
            if *reverse {
                argv.push("-R".into());
            }
        }
        Test::Udp { mbit, len } => {
            argv.extend([
                "-u".into(),
                "-b".into(),
                format!("{mbit}M"),
                "-l".into(),
                len.to_string(),
            ]);
        }
    }
    let out = p.client.output(&argv)?;
    let _ = srv.wait_timeout(Duration::from_secs(3));
    drop(srv);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("iperf3 JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let r = &v["end"]["sum_received"];
    Ok(Iperf {
        gbps: r["bits_per_second"]
            .as_f64()
            .context("iperf3 reported no throughput")?
            / 1e9,
        bytes: r["bytes"].as_f64().unwrap_or(0.0),
        loss_pct: r["lost_percent"].as_f64().unwrap_or(0.0),
    })
}

/// Round trip times (ms) of `count` pings 10 ms apart: (p50, p99).
fn ping_rtt(p: &Pair, count: u32) -> Result<(f64, f64)> {
    let out = p.client.output([
        "ping",
        "-c",
        &count.to_string(),
        "-i",
        "0.01",
        "-W",
        "1",
        &p.server_ip,
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    if rtts.is_empty() {
        bail!("ping got no replies: {text}");
    }
    Ok((percentile(&rtts, 0.5), percentile(&rtts, 0.99)))
}

/// Does a DF ping with `payload` bytes pass? (ok, output text).
fn df_ping(p: &Pair, payload: u32) -> Result<(bool, String)> {
    let size = payload.to_string();
    // Two tries, so that one lost packet is not taken for "too big".
    let mut text = String::new();
    for _ in 0..2 {
        let out = p
            .client
            .output(["ping", "-M", "do", "-c1", "-W1", "-s", &size, &p.server_ip])?;
        text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            return Ok((true, text));
        }
        if text.contains("too long") {
            break;
        }
    }
    Ok((false, text))
}

fn classify_failure(text: &str) -> String {
    if text.contains("too long") {
        "refused at the sender (EMSGSIZE)".into()
    } else if text.contains("Frag needed") || text.contains("frag needed") {
        "ICMP fragmentation needed".into()
    } else {
        "silent drop".into()
    }
}

/// The largest ICMP payload that passes with DF set: checks the advertised
/// size first (and one byte more), binary search only when that is off.
fn df_search(p: &Pair, underlay: u32) -> Result<(u32, String)> {
    let guess = p.advertised.saturating_sub(28);
    let (ok, _) = df_ping(p, guess)?;
    let (over, text) = df_ping(p, guess + 1)?;
    if ok && !over {
        return Ok((guess, classify_failure(&text)));
    }
    let (mut lo, mut hi) = (0u32, underlay.max(p.advertised) + 1);
    if !df_ping(p, lo)?.0 {
        bail!("{}: even an empty DF ping fails", p.mode.short());
    }
    let (hi_ok, _) = df_ping(p, hi)?;
    if hi_ok {
        bail!(
            "{}: a DF ping of {hi} bytes passes, more than the underlay",
            p.mode.short()
        );
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if df_ping(p, mid)?.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (_, text) = df_ping(p, lo + 1)?;
    Ok((lo, classify_failure(&text)))
}

fn mtu_row(tb: &Testbed, underlay: u32, mode: Mode) -> MtuRow {
    let mut row = MtuRow {
        underlay_mtu: underlay,
        mode: Some(mode),
        label: mode.label().into(),
        ..MtuRow::default()
    };
    if let Some((_, e)) = tb.errors.iter().find(|(m, _)| *m == mode) {
        row.error = Some(e.clone());
        return row;
    }
    let Some(p) = tb.paths.iter().find(|p| p.mode == mode) else {
        row.error = Some("not set up".into());
        return row;
    };
    row.advertised = Some(p.advertised);
    match df_search(p, underlay) {
        Ok((payload, over)) => {
            row.largest_df_payload = Some(payload);
            row.path_mtu = Some(payload + 28);
            row.matches = Some(payload + 28 == p.advertised);
            row.one_over = Some(over);
        }
        Err(e) => row.error = Some(format!("{e:#}")),
    }
    row
}

fn note_err(slot: &mut Option<String>, what: &str, e: anyhow::Error) {
    eprintln!("weft-bench: {what}: {e:#}");
    slot.get_or_insert_with(|| format!("{what}: {e:#}"));
}

/// The main measurement (underlay MTU 1500): every test, every mode, and
/// the DF check.
pub fn run_main(o: &Options, modes: &[Mode]) -> Result<(TunnelResults, Vec<MtuRow>)> {
    let underlay = 1500;
    let tb = testbed(underlay, modes)?;
    let mut results: Vec<ModeResult> = modes
        .iter()
        .map(|&m| ModeResult {
            mode: Some(m),
            label: m.label().into(),
            overlay_mtu: tb.paths.iter().find(|p| p.mode == m).map(|p| p.advertised),
            cpu_tunnel_s_per_gb: m.userspace().then(Fig::default),
            error: tb
                .errors
                .iter()
                .find(|(x, _)| *x == m)
                .map(|(_, e)| e.clone()),
            ..ModeResult::default()
        })
        .collect();
    let mut mtu_rows: Vec<MtuRow> = modes.iter().map(|&m| mtu_row(&tb, underlay, m)).collect();
    let tcp = [(1, false), (1, true), (4, false), (4, true)];
    for run in 0..o.runs {
        // Rotate the order so that no mode always goes first.
        for k in 0..tb.paths.len() {
            let p = &tb.paths[(k + run) % tb.paths.len()];
            let Some(r) = results.iter_mut().find(|r| r.mode == Some(p.mode)) else {
                continue;
            };
            eprintln!(
                "weft-bench: tunnel run {}/{}: {}",
                run + 1,
                o.runs,
                p.mode.short()
            );
            let (mut sys_s, mut proc_s, mut bytes) = (0.0, 0.0, 0.0);
            for (i, &(streams, reverse)) in tcp.iter().enumerate() {
                let meter = CpuMeter::start(&p.tunnel_pids);
                match iperf(p, &Test::Tcp { streams, reverse }, o) {
                    Ok(res) => {
                        let (s, t) = meter.stop();
                        sys_s += s;
                        proc_s += t;
                        bytes += res.bytes;
                        let fig = match i {
                            0 => &mut r.tcp1_fwd,
                            1 => &mut r.tcp1_rev,
                            2 => &mut r.tcp4_fwd,
                            _ => &mut r.tcp4_rev,
                        };
                        fig.push(res.gbps);
                    }
                    Err(e) => note_err(
                        &mut r.error,
                        &format!(
                            "TCP {streams} stream(s){}",
                            if reverse { " reverse" } else { "" }
                        ),
                        e,
                    ),
                }
            }
            if bytes > 0.0 {
                let gb = bytes / 1e9;
                r.cpu_system_s_per_gb.push(sys_s / gb);
                if let Some(f) = r.cpu_tunnel_s_per_gb.as_mut() {
                    f.push(proc_s / gb);
                }
            }
            let udp = Test::Udp {
                mbit: o.udp_mbit,
                len: p.advertised - 28,
            };
            match iperf(p, &udp, o) {
                Ok(res) => {
                    r.udp_gbps.push(res.gbps);
                    r.udp_loss_pct.push(res.loss_pct);
                }
                Err(e) => note_err(&mut r.error, "UDP", e),
            }
            match ping_rtt(p, o.pings) {
                Ok((p50, p99)) => {
                    r.ping_p50_ms.push(p50);
                    r.ping_p99_ms.push(p99);
                }
                Err(e) => note_err(&mut r.error, "ping", e),
            }
        }
    }
    // The sweep's figures at this MTU are the main measurement's.
    for row in &mut mtu_rows {
        if let Some(r) = results.iter().find(|r| r.mode == row.mode) {
            row.tcp1_fwd = r.tcp1_fwd.clone();
            row.tcp4_fwd = r.tcp4_fwd.clone();
        }
    }
    Ok((
        TunnelResults {
            underlay_mtu: underlay,
            runs: o.runs,
            secs: o.secs,
            bytes: o.bytes,
            udp_mbit: o.udp_mbit,
            pings: o.pings,
            topology: "container to container across two hosts (veth + bridge on each host, routed into the tunnel)".into(),
            modes: results,
        },
        mtu_rows,
    ))
}

/// One more underlay MTU: a fresh lab, the DF check, TCP 1 and 4 streams.
pub fn run_sweep(o: &Options, modes: &[Mode], underlay: u32) -> Result<Vec<MtuRow>> {
    let tb = testbed(underlay, modes)?;
    let mut rows: Vec<MtuRow> = modes.iter().map(|&m| mtu_row(&tb, underlay, m)).collect();
    let streams: &[u32] = &[1, 4];
    for run in 0..o.runs {
        for k in 0..tb.paths.len() {
            let p = &tb.paths[(k + run) % tb.paths.len()];
            let Some(row) = rows.iter_mut().find(|r| r.mode == Some(p.mode)) else {
                continue;
            };
            eprintln!(
                "weft-bench: MTU {underlay} run {}/{}: {}",
                run + 1,
                o.runs,
                p.mode.short()
            );
            for &n in streams {
                match iperf(
                    p,
                    &Test::Tcp {
                        streams: n,
                        reverse: false,
                    },
                    o,
                ) {
                    Ok(res) if n == 1 => row.tcp1_fwd.push(res.gbps),
                    Ok(res) => row.tcp4_fwd.push(res.gbps),
                    Err(e) => note_err(&mut row.error, &format!("TCP {n} stream(s)"), e),
                }
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified() {
        assert_eq!(
            classify_failure("ping: local error: message too long, mtu=1450"),
            "refused at the sender (EMSGSIZE)"
        );
        assert_eq!(
            classify_failure("From 10.42.0.1 icmp_seq=1 Frag needed and DF set (mtu = 1450)"),
            "ICMP fragmentation needed"
        );
        assert_eq!(
            classify_failure("1 packets transmitted, 0 received"),
            "silent drop"
        );
    }

    #[test]
    fn references() {
        assert_eq!(Mode::WeftVxlan.reference(), Some(Mode::KernelVxlan));
        assert_eq!(Mode::WeftWireguard.reference(), Some(Mode::WireguardGo));
        assert_eq!(Mode::Raw.reference(), None);
    }
}
