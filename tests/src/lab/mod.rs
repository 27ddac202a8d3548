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
//!
//! `options` holds the settings and fixed addresses, `nodes` the handles to
//! hosts, containers and the router, `prefixes` the per-lab name prefixes and
//! the sweep of leftovers; this file builds and tears down the [`Lab`].

mod nodes;
mod options;
mod prefixes;

pub use nodes::{Container, Host, Router};
pub use options::{
    LabOptions, RouterOptions, FAR_SUBNET, HOST_IFACE, HOST_OFFSET, MAX_HOSTS, NEAR_SUBNET,
    UNDERLAY_PREFIX_LEN,
};
pub use prefixes::sweep_stale;
use prefixes::{alloc_prefix, unregister, TEMP_DIR_TAG};

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::naming::{self, Role};
use crate::netns::{list_netns, Netns};

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
