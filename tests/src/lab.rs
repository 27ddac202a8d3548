//! The lab: hosts, underlay switch, optional router, containers.
//!
//! ```text
//!  flat (default)                         with RouterOptions
//!
//!  h0 eth0 .10 ─┐                         h0 eth0 77.10 ─┐              ┌─ h2 eth0 78.12
//!  h1 eth0 .11 ─┼─ <p>br0 .1 (<p>-ul)     h1 eth0 77.11 ─┤              │   (far MTU)
//!  h2 eth0 .12 ─┘                                    <p>br0        <p>br1   (both in <p>-ul)
//!                                                        └─ eth0 ─(rt)─ eth1 ─┘
//!                                                          77.1         78.1 (far MTU)
//! ```
//!
//! Addresses: the near subnet is 192.168.77.0/24, the far one (router only)
//! 192.168.78.0/24; host `i` is `192.168.77.(10+i)` or `192.168.78.(10+i)`, and
//! every host's default route goes via `.1` of its subnet through `eth0`.
//! Without a router, `.1` is an address on the underlay switch's bridge: it
//! answers ARP and ping (so "outside the cluster" traffic can be observed there)
//! but forwards nothing. With a router, `.1` is the router's leg in that subnet.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::ops::Deref;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::naming::{self, Role};
use crate::netns::{list_netns, pid_alive, Netns};

/// First three octets of the near underlay subnet (`192.168.77.0/24`).
pub const NEAR_SUBNET: [u8; 3] = [192, 168, 77];
/// First three octets of the far underlay subnet (`192.168.78.0/24`, router only).
pub const FAR_SUBNET: [u8; 3] = [192, 168, 78];
/// Prefix length of both underlay subnets.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// Host `i` gets `.(HOST_OFFSET + i)`.
pub const HOST_OFFSET: usize = 10;
/// Most hosts a lab can have (addresses .10 to .249).
pub const MAX_HOSTS: usize = 240;
/// Lab temp dirs are `<tmp>/weft-tests-<prefix>-XXXXXX`.
const TEMP_DIR_TAG: &str = "weft-tests-";
/// Name of every host's underlay interface.
pub const HOST_IFACE: &str = "eth0";

/// How to build a [`Lab`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabOptions {
    /// Number of hosts (1 to [`MAX_HOSTS`]).
    pub hosts: usize,
    /// MTU of the underlay (hosts' `eth0`, bridge ports, bridge) — with a router,
    /// of the near subnet. Default 1500.
    pub mtu: u32,
    /// Put a router between two underlay subnets; `None` (default) is one flat
    /// subnet on one switch.
    pub router: Option<RouterOptions>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            hosts: 2,
            mtu: 1500,
            router: None,
        }
    }
}

impl LabOptions {
    /// `n` hosts on a flat 1500-byte underlay.
    pub fn hosts(n: usize) -> Self {
        LabOptions {
            hosts: n,
            ..LabOptions::default()
        }
    }

    /// Sets the underlay MTU.
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = mtu;
        self
    }

    /// Adds a router between two underlay subnets.
    pub fn router(mut self, router: RouterOptions) -> Self {
        self.router = Some(router);
        self
    }

    fn validate(&self) -> Result<()> {
        if self.hosts == 0 || self.hosts > MAX_HOSTS {
            return Err(Error::Options(format!(
                "hosts must be 1 to {MAX_HOSTS}, not {}",
                self.hosts
            )));
        }
        if !(68..=65535).contains(&self.mtu) {
            return Err(Error::Options(format!(
                "mtu must be 68 to 65535, not {}",
                self.mtu
            )));
        }
        if let Some(r) = &self.router {
            if r.near_hosts > self.hosts {
                return Err(Error::Options(format!(
                    "router.near_hosts ({}) is more than hosts ({})",
                    r.near_hosts, self.hosts
                )));
            }
            if !(68..=65535).contains(&r.far_mtu) {
                return Err(Error::Options(format!(
                    "router.far_mtu must be 68 to 65535, not {}",
                    r.far_mtu
                )));
            }
        }
        Ok(())
    }
}

/// A router between two underlay subnets, for path-MTU tests.
///
/// Hosts `0..near_hosts` sit on the near subnet (192.168.77.0/24, MTU
/// [`LabOptions::mtu`]); the others on the far subnet (192.168.78.0/24), whose
/// every link — the router's second leg `eth1`, the far bridge and the far hosts'
/// `eth0` — has `far_mtu`. So a near host sees a big local MTU but a smaller path
/// MTU to far hosts; the router answers oversize DF packets with ICMP
/// "fragmentation needed" (filter that in the router namespace to make a PMTU
/// black hole). IPv4 forwarding is on in the router, nowhere else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterOptions {
    /// How many hosts (the first ones) are on the near side.
    pub near_hosts: usize,
    /// MTU of the far subnet.
    pub far_mtu: u32,
}

/// One host: a network namespace with `eth0` on the underlay.
#[derive(Debug, Clone)]
pub struct Host {
    netns: Netns,
    index: usize,
    addr: Ipv4Addr,
    gateway: Ipv4Addr,
    mtu: u32,
    far: bool,
    underlay_port: String,
    underlay_bridge: String,
}

impl Host {
    /// Its index in the lab.
    pub fn index(&self) -> usize {
        self.index
    }
    /// Its underlay address (on `eth0`).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }
    /// Its underlay address with prefix length, e.g. `192.168.77.10/24`.
    pub fn cidr(&self) -> String {
        format!("{}/{UNDERLAY_PREFIX_LEN}", self.addr)
    }
    /// The next hop of its default route.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }
    /// The MTU of its `eth0`.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }
    /// The name of its underlay interface: `eth0`.
    pub fn iface(&self) -> &str {
        HOST_IFACE
    }
    /// Whether it is on the far side of the router.
    pub fn is_far(&self) -> bool {
        self.far
    }
    /// The other end of its `eth0`, a bridge port in the underlay namespace (where
    /// to run tcpdump to see exactly this host's traffic).
    pub fn underlay_port(&self) -> &str {
        &self.underlay_port
    }
    /// The bridge (in the underlay namespace) it is plugged into.
    pub fn underlay_bridge(&self) -> &str {
        &self.underlay_bridge
    }
    /// Its namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }
}

impl Deref for Host {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.netns
    }
}

/// A container: an empty network namespace (only `lo`, up) that belongs to a host
/// and that the CNI plugin is meant to wire up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    netns: Netns,
    host: usize,
    name: String,
}

impl Container {
    /// The index of the host it belongs to.
    pub fn host_index(&self) -> usize {
        self.host
    }
    /// The name it was given (not the namespace's name; see [`Netns::name`]).
    pub fn container_name(&self) -> &str {
        &self.name
    }
    /// Its namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }
}

impl Deref for Container {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.netns
    }
}

/// The router namespace (only with [`RouterOptions`]): `eth0` on the near subnet,
/// `eth1` on the far one.
#[derive(Debug, Clone)]
pub struct Router {
    netns: Netns,
    near_addr: Ipv4Addr,
    far_addr: Ipv4Addr,
    far_mtu: u32,
}

impl Router {
    /// Its address on the near subnet (`eth0`), the near hosts' gateway.
    pub fn near_addr(&self) -> Ipv4Addr {
        self.near_addr
    }
    /// Its address on the far subnet (`eth1`), the far hosts' gateway.
    pub fn far_addr(&self) -> Ipv4Addr {
        self.far_addr
    }
    /// The MTU of `eth1` and the far subnet.
    pub fn far_mtu(&self) -> u32 {
        self.far_mtu
    }
    /// Its namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }
}

impl Deref for Router {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.netns
    }
}

/// Prefixes of the labs alive in this process. A namespace carrying this
/// process's pid whose prefix is not here is left over from an earlier process
/// that had the same pid.
static LIVE: Mutex<Option<HashSet<String>>> = Mutex::new(None);
static COUNTER: AtomicU32 = AtomicU32::new(0);
static OFFSET: OnceLock<u32> = OnceLock::new();

fn live() -> std::sync::MutexGuard<'static, Option<HashSet<String>>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Picks a prefix that no lab of this process uses and no namespace has, and
/// registers it as live.
fn alloc_prefix() -> Result<String> {
    let pid = std::process::id();
    let offset = *OFFSET.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        ((nanos ^ (nanos >> 17)) % u128::from(naming::UNIQUE_SPACE)) as u32
    });
    let existing = list_netns()?;
    for _ in 0..naming::UNIQUE_SPACE {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let unique = offset.wrapping_add(n) % naming::UNIQUE_SPACE;
        let prefix = naming::prefix(pid, unique);
        let taken = existing
            .iter()
            .any(|ns| ns.len() > prefix.len() && ns.starts_with(&prefix));
        if taken {
            continue;
        }
        if live()
            .get_or_insert_with(HashSet::new)
            .insert(prefix.clone())
        {
            return Ok(prefix);
        }
    }
    Err(Error::Options(
        "no free lab prefix left in this process".into(),
    ))
}

fn unregister(prefix: &str) {
    if let Some(set) = live().as_mut() {
        set.remove(prefix);
    }
}

/// Deletes namespaces left behind by harness runs that died without cleaning up
/// (SIGKILL, abort): those whose name follows [`naming`] exactly and whose creator
/// pid is gone — or is this very process but not one of its live labs (a reused
/// pid). Processes inside them are killed first. Returns the names deleted.
/// [`Lab::new`] calls this; nothing outside the naming scheme is ever touched.
pub fn sweep_stale() -> Result<Vec<String>> {
    let names = list_netns()?;
    let me = std::process::id();
    let is_stale = |p: &naming::ParsedName, live: &Option<HashSet<String>>| {
        if p.pid == me {
            !live.as_ref().is_some_and(|s| s.contains(&p.prefix))
        } else {
            !pid_alive(p.pid)
        }
    };
    let stale: Vec<String> = {
        let guard = live();
        names
            .into_iter()
            .filter(|name| naming::parse(name).is_some_and(|p| is_stale(&p, &guard)))
            .collect()
    };
    // Temp dirs of dead labs (`<tmp>/weft-tests-<prefix>-XXXXXX`) go too.
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in dir.flatten() {
            let file_name = entry.file_name();
            let Some(rest) = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(TEMP_DIR_TAG))
            else {
                continue;
            };
            let Some(prefix) = rest.get(..naming::PREFIX_LEN) else {
                continue;
            };
            if rest.as_bytes().get(naming::PREFIX_LEN) != Some(&b'-') {
                continue;
            }
            let parsed = naming::parse(&naming::netns_name(prefix, &Role::Underlay));
            if parsed.is_some_and(|p| is_stale(&p, &live())) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let mut swept = Vec::new();
    for name in stale {
        let ns = Netns::named(&name);
        match ns.destroy() {
            Ok(()) => {
                eprintln!("weft-tests: deleted stale netns {name} (its creator is gone)");
                swept.push(name);
            }
            Err(e) => eprintln!("weft-tests: could not delete stale netns {name}: {e}"),
        }
    }
    Ok(swept)
}

/// A set of hosts in network namespaces on a shared underlay; everything is torn
/// down on drop (also when a test panics).
///
/// Namespaces: `<prefix>-ul` (underlay switch), `<prefix>-rt` (router, optional),
/// `<prefix>-h<i>` (hosts), `<prefix>-h<i>-<name>` (containers); see
/// [`naming`]. No link, address or route is ever created in the root namespace.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    options: LabOptions,
    underlay: Netns,
    router: Option<Router>,
    hosts: Vec<Host>,
    containers: Mutex<Vec<Container>>,
    /// Every namespace this lab created, in creation order.
    created: Mutex<Vec<Netns>>,
    dir: tempfile::TempDir,
}

impl Lab {
    /// Builds a lab. Fails with [`Error::NotRoot`] unless running as root (use
    /// [`crate::require_root!`] first in tests). Also sweeps stale namespaces of
    /// dead earlier runs ([`sweep_stale`]). If building fails half way, what was
    /// built is torn down before the error is returned.
    pub fn new(options: LabOptions) -> Result<Lab> {
        if !crate::is_root() {
            return Err(Error::NotRoot);
        }
        options.validate()?;
        let prefix = alloc_prefix()?;
        if let Err(e) = sweep_stale() {
            eprintln!("weft-tests: sweeping stale namespaces failed: {e}");
        }
        let dir = match tempfile::Builder::new()
            .prefix(&format!("{TEMP_DIR_TAG}{prefix}-"))
            .tempdir()
        {
            Ok(d) => d,
            Err(e) => {
                unregister(&prefix);
                return Err(Error::io("creating the lab's temp dir", e));
            }
        };
        let mut lab = Lab {
            underlay: Netns::named(naming::netns_name(&prefix, &Role::Underlay)),
            prefix,
            options,
            router: None,
            hosts: Vec::new(),
            containers: Mutex::new(Vec::new()),
            created: Mutex::new(Vec::new()),
            dir,
        };
        // On error `lab` is dropped here, which deletes whatever was made.
        lab.build()?;
        Ok(lab)
    }

    fn ifname(&self, suffix: &str) -> Result<String> {
        let name = format!("{}{suffix}", self.prefix);
        naming::check_ifname(&name)?;
        Ok(name)
    }

    fn create_ns(&self, role: &Role) -> Result<Netns> {
        let name = naming::netns_name(&self.prefix, role);
        let ns = Netns::create(&name)?;
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ns.clone());
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn build(&mut self) -> Result<()> {
        let mtu = self.options.mtu.to_string();
        let ul = self.create_ns(&Role::Underlay)?;
        let near_br = self.ifname("br0")?;
        let far_br = self.ifname("br1")?;
        let bridge = |name: &str, mtu: &str| -> Result<()> {
            ul.ip(["link", "add", "name", name, "mtu", mtu, "type", "bridge"])?;
            ul.ip(["link", "set", name, "up"])?;
            Ok(())
        };
        bridge(&near_br, &mtu)?;
        let near_gw = Ipv4Addr::new(NEAR_SUBNET[0], NEAR_SUBNET[1], NEAR_SUBNET[2], 1);
        let far_gw = Ipv4Addr::new(FAR_SUBNET[0], FAR_SUBNET[1], FAR_SUBNET[2], 1);
        let plen = UNDERLAY_PREFIX_LEN;
        let near_hosts = match self.options.router.clone() {
            None => {
                ul.ip(["addr", "add", &format!("{near_gw}/{plen}"), "dev", &near_br])?;
                self.options.hosts
            }
            Some(r) => {
                let far_mtu = r.far_mtu.to_string();
                bridge(&far_br, &far_mtu)?;
                let rt = self.create_ns(&Role::Router)?;
                for (dev, peer, br, m, addr) in [
                    ("eth0", self.ifname("rn")?, &near_br, &mtu, near_gw),
                    ("eth1", self.ifname("rf")?, &far_br, &far_mtu, far_gw),
                ] {
                    self.veth(&rt, dev, &peer, br, m)?;
                    rt.ip(["addr", "add", &format!("{addr}/{plen}"), "dev", dev])?;
                    rt.ip(["link", "set", dev, "up"])?;
                }
                rt.exec(["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
                self.router = Some(Router {
                    netns: rt,
                    near_addr: near_gw,
                    far_addr: far_gw,
                    far_mtu: r.far_mtu,
                });
                r.near_hosts
            }
        };
        for i in 0..self.options.hosts {
            let far = i >= near_hosts;
            let (net, gw, br, host_mtu) = match (&self.options.router, far) {
                (Some(r), true) => (FAR_SUBNET, far_gw, &far_br, r.far_mtu),
                _ => (NEAR_SUBNET, near_gw, &near_br, self.options.mtu),
            };
            let last = u8::try_from(HOST_OFFSET + i)
                .map_err(|_| Error::Options(format!("host index {i} too large")))?;
            let addr = Ipv4Addr::new(net[0], net[1], net[2], last);
            let ns = self.create_ns(&Role::Host(i))?;
            let port = self.ifname(&format!("p{i}"))?;
            self.veth(&ns, HOST_IFACE, &port, br, &host_mtu.to_string())?;
            ns.ip(["addr", "add", &format!("{addr}/{plen}"), "dev", HOST_IFACE])?;
            ns.ip(["link", "set", HOST_IFACE, "up"])?;
            ns.ip([
                "route",
                "add",
                "default",
                "via",
                &gw.to_string(),
                "dev",
                HOST_IFACE,
            ])?;
            self.hosts.push(Host {
                netns: ns,
                index: i,
                addr,
                gateway: gw,
                mtu: host_mtu,
                far,
                underlay_port: port,
                underlay_bridge: br.clone(),
            });
        }
        Ok(())
    }

    /// A veth pair made directly across namespaces: `dev` in `ns`, `peer` in the
    /// underlay namespace enslaved to `bridge`; both ends get `mtu`, the peer is
    /// brought up (the caller brings `dev` up once it has an address).
    fn veth(&self, ns: &Netns, dev: &str, peer: &str, bridge: &str, mtu: &str) -> Result<()> {
        naming::check_ifname(dev)?;
        naming::check_ifname(peer)?;
        let ul = self.underlay.name();
        ns.ip([
            "link", "add", dev, "mtu", mtu, "type", "veth", "peer", "name", peer, "mtu", mtu,
            "netns", ul,
        ])?;
        self.underlay
            .ip(["link", "set", peer, "master", bridge, "up"])?;
        Ok(())
    }

    /// The lab's unique prefix (see [`naming`]).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The options it was built with.
    pub fn options(&self) -> &LabOptions {
        &self.options
    }

    /// All hosts, in index order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `i`. Panics if there is no such host.
    pub fn host(&self, i: usize) -> &Host {
        match self.hosts.get(i) {
            Some(h) => h,
            None => panic!(
                "lab {} has {} hosts, no host {i}",
                self.prefix,
                self.hosts.len()
            ),
        }
    }

    /// The underlay switch's namespace (bridges `<prefix>br0`/`br1`; run tcpdump
    /// here).
    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// The router, if the lab has one.
    pub fn router(&self) -> Option<&Router> {
        self.router.as_ref()
    }

    /// A per-lab temporary directory (sockets, databases, captures, logs),
    /// removed when the lab is dropped.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates container `name` on host `host_index`: an empty network namespace
    /// `<prefix>-h<host>-<name>` with only `lo` (up). Names are 1 to 40 characters
    /// of `A-Z a-z 0-9 _ . -`; one name per host.
    pub fn container(&self, host_index: usize, name: &str) -> Result<Container> {
        naming::check_container_name(name)?;
        if host_index >= self.hosts.len() {
            return Err(Error::Options(format!(
                "lab {} has {} hosts, no host {host_index}",
                self.prefix,
                self.hosts.len()
            )));
        }
        let ns = self.create_ns(&Role::Container {
            host: host_index,
            name: name.to_string(),
        })?;
        let c = Container {
            netns: ns,
            host: host_index,
            name: name.to_string(),
        };
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c.clone());
        Ok(c)
    }

    /// Deletes a container's namespace now (killing what runs in it), as a
    /// runtime would after CNI DEL.
    pub fn remove_container(&self, c: &Container) -> Result<()> {
        c.netns.destroy()?;
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|x| x != c);
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|x| x != &c.netns);
        Ok(())
    }

    /// The containers created so far (and not removed).
    pub fn containers(&self) -> Vec<Container> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every namespace of this lab that exists now: underlay, router, hosts,
    /// containers.
    pub fn namespaces(&self) -> Vec<Netns> {
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Tears everything down now (what drop does), reporting the first failure.
    pub fn destroy(mut self) -> Result<()> {
        // Drop runs teardown again afterwards and finds nothing left to do.
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let mut all: Vec<Netns> =
            std::mem::take(&mut *self.created.lock().unwrap_or_else(|e| e.into_inner()));
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        // Anything else carrying our prefix (created behind our back, or a
        // half-tracked one) goes too.
        let ours = format!("{}-", self.prefix);
        if let Ok(names) = list_netns() {
            for name in names {
                if name.starts_with(&ours) && !all.iter().any(|n| n.name() == name) {
                    all.push(Netns::named(name));
                }
            }
        }
        // Stop processes everywhere first so nothing re-creates state, then
        // delete, newest first (containers, hosts, router, underlay).
        for ns in &all {
            let _ = ns.kill_all();
        }
        let mut first_err = None;
        for ns in all.iter().rev() {
            if let Err(e) = ns.destroy() {
                eprintln!("weft-tests: deleting netns {ns} failed: {e}");
                first_err.get_or_insert(e);
            }
        }
        unregister(&self.prefix);
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Errors were printed already; a destructor cannot do more.
        let _ = self.teardown();
    }
}
