//! The lab behind the tunnel figures: four hosts on one underlay switch and,
//! per mode, a container pair across two of them (see the parent module's
//! picture). Each `setup_*` builds one mode the way that tunnel is meant to
//! be run; [`testbed`] builds them all and checks each pair can reach itself.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use weft_tests::weft::{CniCall, Netd};
use weft_tests::{Lab, LabOptions, Netns, NsChild};

use super::Mode;

/// A mode that is up: its two containers and what to measure CPU on.
pub(super) struct Pair {
    pub(super) mode: Mode,
    pub(super) client: Netns,
    pub(super) server: Netns,
    pub(super) server_ip: String,
    pub(super) advertised: u32,
    pub(super) tunnel_pids: Vec<u32>,
    /// The server host's WireGuard device, for the flood (weft wireguard).
    pub(super) victim: Option<Victim>,
}

/// The server side of a weft wireguard pair as a flood sees it.
pub(super) struct Victim {
    /// The server's host (netd runs there).
    pub(super) host: Netns,
    /// Its WireGuard socket on the underlay.
    pub(super) endpoint: SocketAddrV4,
    /// Its static public key (mac1 of the flood's initiations).
    pub(super) public_key: [u8; 32],
    /// Its netd's `/metrics`, reachable from `host`.
    pub(super) metrics_url: String,
    /// A lab host outside the pair, on the same underlay: the attacker.
    pub(super) attacker: Netns,
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
pub(super) struct Testbed {
    pub(super) paths: Vec<Pair>,
    pub(super) errors: Vec<(Mode, String)>,
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
        victim: None,
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
        victim: None,
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
        victim: None,
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
    let ip = out.address()?.to_string();
    Ok((c.netns().clone(), ip))
}

fn netd_pid(host: &Netns) -> Result<u32> {
    host.pids()?
        .into_iter()
        .find(|&p| crate::sys::proc_comm(p).as_deref() == Some("netd"))
        .with_context(|| format!("no netd process in {host}"))
}

/// Where the weft wireguard server's netd serves `/metrics` (in its host).
const VICTIM_METRICS: &str = "127.0.0.1:9542";

/// The flood's view of the server netd `nb` of the pair `(a, b)`: netd's default
/// WireGuard port on its underlay address, the key netd loaded from its
/// state directory, and a host of the lab that is not in the pair.
fn victim(lab: &Lab, nb: &Netd, (a, b): (usize, usize)) -> Result<Victim> {
    let keys =
        weft_wg::load_or_create_key(nb.dir()).context("reading the server's WireGuard key")?;
    let attacker = (0..lab.hosts().len())
        .find(|&h| h != a && h != b)
        .context("no lab host outside the pair to flood from")?;
    Ok(Victim {
        host: nb.host().clone(),
        endpoint: SocketAddrV4::new(
            underlay_addr(b),
            weft_netd::config::settings::DEFAULT_WG_PORT,
        ),
        public_key: keys.public_key(),
        metrics_url: format!("http://{VICTIM_METRICS}/metrics"),
        attacker: lab.host(attacker).netns().clone(),
    })
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
    // The WireGuard server serves its counters, read around the flood.
    let metrics = format!("--metrics-addr={VICTIM_METRICS}");
    let server_flags: &[&str] = if mode == Mode::WeftWireguard {
        &[&flag, &metrics]
    } else {
        &[&flag]
    };
    let na = Netd::start(lab, a, &store, &[&flag]).with_context(|| format!("netd in h{a}"))?;
    let nb = Netd::start(lab, b, &store, server_flags).with_context(|| format!("netd in h{b}"))?;
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
    let victim = if mode == Mode::WeftWireguard {
        Some(victim(lab, &nb, (a, b))?)
    } else {
        None
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
        victim,
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

pub(super) fn testbed(mtu: u32, modes: &[Mode]) -> Result<Testbed> {
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
