//! The kernel side: the veth pair between the host bridge and the
//! container, over rtnetlink.
//!
//! # Namespaces
//!
//! The "host" is always **the network namespace of the thread that calls
//! [`Netlink::new`]**: its netlink socket is opened right there (the plugin
//! runs in the host namespace; tests run it on a thread that has `setns`'d
//! into a lab host).
//!
//! The container side is reached without ever moving the calling thread:
//! [`Netlink::sandbox`] opens `CNI_NETNS`, checks that it is a network
//! namespace other than the caller's, and spawns a short-lived helper thread
//! that `setns(2)`s into it and opens a second netlink socket there. A
//! netlink socket stays bound to the namespace it was created in, so after
//! the helper thread has exited (taking its namespace switch with it) the
//! socket keeps talking to the container's namespace from the caller's
//! thread. Nothing can leave the caller in the wrong namespace, and nothing
//! else in the process ever changes namespace.
//!
//! The pair itself is made in one request in the host namespace: the host
//! end with its final name, MTU, bridge and up; the peer with `CNI_IFNAME`
//! and the MTU, created directly inside the container namespace (by the
//! namespace fd), so no interface ever appears in the host under the
//! container's name. Deleting the host end deletes the peer too.
//!
//! Everything runs on a current-thread tokio runtime owned by [`Netlink`]
//! (no worker threads: the plugin is a short-lived process).

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};
use netlink_packet_route::AddressFamily;
use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};
use rtnetlink::{
    Handle, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};
use tokio::runtime::Runtime;

/// The loopback device's index, the same in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Errors of the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid interface name {0:?}")]
    InvalidName(String),
    #[error("network namespace {} does not exist", .path.display())]
    NetnsMissing { path: PathBuf },
    #[error("opening network namespace {}: {source}", .path.display())]
    NetnsOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a network namespace (deleted, or not a netns file)", .path.display())]
    NotNetns { path: PathBuf },
    #[error("{} is the plugin's own (host) network namespace, not a container's", .path.display())]
    SameNetns { path: PathBuf },
    #[error("entering network namespace {}: {source}", .path.display())]
    Setns {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("starting the netlink runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("the helper thread entering the container's namespace died")]
    Thread,
    #[error("bridge {bridge} does not exist in the plugin's network namespace")]
    NoBridge { bridge: String },
    #[error("host interface {name} exists already (is the container attached already?)")]
    HostVethExists { name: String },
    #[error("interface {ifname} exists already in the container's network namespace")]
    IfnameExists { ifname: String },
    #[error("{op}: {message}")]
    Netlink {
        op: String,
        /// The kernel's errno, when the kernel answered with an error.
        errno: Option<i32>,
        message: String,
    },
}

impl NetError {
    /// Whether the error says "this already exists".
    pub fn is_exists(&self) -> bool {
        matches!(
            self,
            NetError::HostVethExists { .. } | NetError::IfnameExists { .. }
        )
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().wrapping_neg()),
        _ => None,
    }
}

fn nl_err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let op = op.into();
    move |e| NetError::Netlink {
        op,
        errno: errno(&e),
        message: match &e {
            rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
            other => other.to_string(),
        },
    }
}

/// What [`Sandbox::attach`] sets up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethConfig {
    /// The interface name inside the container (`CNI_IFNAME`).
    pub ifname: String,
    /// The host end's name (see [`crate::naming::host_veth_name`]).
    pub host_veth: String,
    /// The bridge in the host namespace the host end joins.
    pub bridge: String,
    /// The container's address with its prefix.
    pub address: Ipv4Network,
    /// The default gateway (and the next hop to 169.254.169.250).
    pub gateway: Ipv4Addr,
    /// MTU of both ends.
    pub mtu: u32,
}

/// What [`Sandbox::attach`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub host_veth: String,
    pub host_mac: Option<String>,
    pub ifname: String,
    pub container_mac: Option<String>,
    /// The interface's index inside the container.
    pub container_index: u32,
}

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub name: String,
    pub index: u32,
    /// `veth`, `bridge`, ... (`None` for devices without a kind, like `lo`).
    pub kind: Option<String>,
    pub mac: Option<String>,
    pub mtu: Option<u32>,
    /// Administratively up.
    pub up: bool,
    /// Index of the bridge (or other master) it is enslaved to.
    pub master: Option<u32>,
}

/// An IPv4 route through one interface (main table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteState {
    pub dst: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
}

/// A container interface with its IPv4 addresses and main-table routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceState {
    pub link: LinkState,
    pub addresses: Vec<Ipv4Network>,
    pub routes: Vec<RouteState>,
}

fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn link_state(msg: &LinkMessage) -> LinkState {
    let mut state = LinkState {
        name: String::new(),
        index: msg.header.index,
        kind: None,
        mac: None,
        mtu: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        master: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => state.name = n.clone(),
            LinkAttribute::Address(a) => state.mac = Some(format_mac(a)),
            LinkAttribute::Mtu(m) => state.mtu = Some(*m),
            LinkAttribute::Controller(m) => state.master = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        state.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    state
}

async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc_enodev()) => Ok(None),
        Err(e) => Err(e),
    }
}

const fn libc_enodev() -> i32 {
    Errno::ENODEV as i32
}

async fn delete_by_name(h: &Handle, name: &str) -> Result<bool, NetError> {
    let Some(link) = link_by_name(h, name)
        .await
        .map_err(nl_err(format!("looking up {name}")))?
    else {
        return Ok(false);
    };
    match h.link().del(link.header.index).execute().await {
        Ok(()) => Ok(true),
        // Gone in between (e.g. its container namespace was just deleted).
        Err(e) if errno(&e) == Some(libc_enodev()) => Ok(false),
        Err(e) => Err(nl_err(format!("deleting {name}"))(e)),
    }
}

fn check_name(name: &str) -> Result<(), NetError> {
    if weft_model::IfName::is_valid(name) {
        Ok(())
    } else {
        Err(NetError::InvalidName(name.to_string()))
    }
}

/// A netlink connection to the caller's ("host") network namespace, with
/// the runtime that drives it and the connections of any [`Sandbox`].
pub struct Netlink {
    rt: Runtime,
    host: Handle,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").finish_non_exhaustive()
    }
}

impl Netlink {
    /// Connects to the network namespace of the calling thread.
    pub fn new() -> Result<Netlink, NetError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetError::Runtime)?;
        let (conn, host, _) = {
            let _enter = rt.enter();
            rtnetlink::new_connection().map_err(NetError::Socket)?
        };
        rt.spawn(conn);
        Ok(Netlink { rt, host })
    }

    /// Opens a container's network namespace (`CNI_NETNS`) and connects to
    /// it (see the module docs).
    pub fn sandbox(&self, path: impl AsRef<Path>) -> Result<Sandbox<'_>, NetError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => NetError::NetnsMissing { path: path.clone() },
            _ => NetError::NetnsOpen {
                path: path.clone(),
                source,
            },
        })?;
        match fstatfs(&file) {
            Ok(st) if st.filesystem_type() == NSFS_MAGIC => {}
            Ok(_) => return Err(NetError::NotNetns { path }),
            Err(e) => {
                return Err(NetError::NetnsOpen {
                    path,
                    source: e.into(),
                })
            }
        }
        let meta = file.metadata().map_err(|source| NetError::NetnsOpen {
            path: path.clone(),
            source,
        })?;
        let own = std::fs::metadata("/proc/thread-self/ns/net")
            .or_else(|_| std::fs::metadata("/proc/self/ns/net"));
        if let Ok(own) = own {
            if own.dev() == meta.dev() && own.ino() == meta.ino() {
                return Err(NetError::SameNetns { path });
            }
        }

        let rt = self.rt.handle().clone();
        let joined = std::thread::scope(|s| {
            s.spawn(|| {
                // The helper registers its socket with our runtime's I/O
                // driver, then exits: its namespace switch dies with it.
                let _enter = rt.enter();
                nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    if e == Errno::EINVAL {
                        NetError::NotNetns { path: path.clone() }
                    } else {
                        NetError::Setns {
                            path: path.clone(),
                            source: e,
                        }
                    }
                })?;
                rtnetlink::new_connection().map_err(NetError::Socket)
            })
            .join()
        });
        let (conn, handle, _) = joined.map_err(|_| NetError::Thread)??;
        self.rt.spawn(conn);
        Ok(Sandbox {
            nl: self,
            path,
            file,
            handle,
        })
    }

    /// A link of the host namespace by name.
    pub fn link(&self, name: &str) -> Result<Option<LinkState>, NetError> {
        check_name(name)?;
        self.rt.block_on(async {
            Ok(link_by_name(&self.host, name)
                .await
                .map_err(nl_err(format!("looking up {name}")))?
                .as_ref()
                .map(link_state))
        })
    }

    /// Deletes a link of the host namespace by name (a host-side veth:
    /// its container peer goes with it). `Ok(false)` if there was none.
    pub fn delete_link(&self, name: &str) -> Result<bool, NetError> {
        check_name(name)?;
        self.rt.block_on(delete_by_name(&self.host, name))
    }

    /// The veths of the host namespace whose names follow
    /// [`crate::naming`]'s scheme.
    pub fn host_veths(&self) -> Result<Vec<String>, NetError> {
        self.rt.block_on(async {
            let mut names = Vec::new();
            let mut links = self.host.link().get().execute();
            while let Some(link) = links
                .try_next()
                .await
                .map_err(nl_err("listing host links"))?
            {
                let s = link_state(&link);
                if s.kind.as_deref() == Some("veth") && crate::naming::is_host_veth_name(&s.name) {
                    names.push(s.name);
                }
            }
            Ok(names)
        })
    }
}

/// A container's network namespace, opened by [`Netlink::sandbox`].
pub struct Sandbox<'nl> {
    nl: &'nl Netlink,
    path: PathBuf,
    file: File,
    handle: Handle,
}

impl std::fmt::Debug for Sandbox<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Sandbox<'_> {
    /// The namespace's path (`CNI_NETNS`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether an interface of that name exists in the container.
    pub fn has_link(&self, ifname: &str) -> Result<bool, NetError> {
        check_name(ifname)?;
        self.nl.rt.block_on(async {
            Ok(link_by_name(&self.handle, ifname)
                .await
                .map_err(nl_err(format!("looking up {ifname} in the container")))?
                .is_some())
        })
    }

    /// Creates the veth pair and configures the container side: `lo` up;
    /// `ifname` with the address, the MTU, up; a default route and a route to
    /// 169.254.169.250/32, both via the gateway. The host end joins the
    /// bridge, with the MTU, up.
    ///
    /// Fails without touching anything if the bridge is missing, or if the
    /// host end or `ifname` exist already. If a later step fails, the pair
    /// is deleted again before the error is returned: either everything is
    /// made or nothing is.
    pub fn attach(&self, cfg: &VethConfig) -> Result<Attached, NetError> {
        check_name(&cfg.ifname)?;
        check_name(&cfg.host_veth)?;
        check_name(&cfg.bridge)?;
        let host = &self.nl.host;
        self.nl.rt.block_on(async {
            let bridge = link_by_name(host, &cfg.bridge)
                .await
                .map_err(nl_err(format!("looking up bridge {}", cfg.bridge)))?
                .ok_or_else(|| NetError::NoBridge {
                    bridge: cfg.bridge.clone(),
                })?;
            // The peer cannot be created up: veth refuses to open one end
            // before both exist (ENOTCONN). It goes up after its address.
            let peer = LinkUnspec::new_with_name(&cfg.ifname)
                .mtu(cfg.mtu)
                .setns_by_fd(self.file.as_raw_fd())
                .build();
            let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
                .name(cfg.host_veth.clone())
                .mtu(cfg.mtu)
                .controller(bridge.header.index)
                .up()
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build();
            if let Err(e) = host.link().add(pair).execute().await {
                if errno(&e) == Some(Errno::EEXIST as i32) {
                    // Which end collided? Nothing was made either way.
                    let host_exists =
                        matches!(link_by_name(host, &cfg.host_veth).await, Ok(Some(_)));
                    return Err(if host_exists {
                        NetError::HostVethExists {
                            name: cfg.host_veth.clone(),
                        }
                    } else {
                        NetError::IfnameExists {
                            ifname: cfg.ifname.clone(),
                        }
                    });
                }
                return Err(nl_err(format!(
                    "creating veth pair {} / {} (mtu {}) on bridge {}",
                    cfg.host_veth, cfg.ifname, cfg.mtu, cfg.bridge
                ))(e));
            }
            // Hairpin on the bridge port: with br_netfilter, a container
            // reaching its own published port through the host address is
            // DNATed back out of the port it came in on.
            let hairpin = async {
                let index = link_by_name(host, &cfg.host_veth)
                    .await
                    .map_err(nl_err(format!("looking up {}", cfg.host_veth)))?
                    .map(|l| l.header.index)
                    .ok_or_else(|| NetError::HostVethExists {
                        name: cfg.host_veth.clone(),
                    })?;
                host.link()
                    .set_port(LinkBridgePort::new(index).hairpin(true).build())
                    .execute()
                    .await
                    .map_err(nl_err(format!("setting hairpin mode on {}", cfg.host_veth)))
            };
            let configured = match hairpin.await {
                Ok(()) => self.configure(cfg).await,
                Err(e) => Err(e),
            };
            match configured {
                Ok(attached) => Ok(attached),
                Err(e) => {
                    // Undo: the host end takes the container end with it.
                    let _ = delete_by_name(host, &cfg.host_veth).await;
                    Err(e)
                }
            }
        })
    }

    async fn configure(&self, cfg: &VethConfig) -> Result<Attached, NetError> {
        let c = &self.handle;
        let ifname = &cfg.ifname;
        let link = link_by_name(c, ifname)
            .await
            .map_err(nl_err(format!("looking up {ifname} in the container")))?
            .ok_or_else(|| NetError::Netlink {
                op: format!("looking up {ifname} in the container"),
                errno: None,
                message: "the new interface is not there".into(),
            })?;
        let index = link.header.index;
        let container_mac = link_state(&link).mac;

        // The rest goes out in one batch: requests on one netlink socket are
        // sent and applied in the order they were issued (join! polls its
        // futures in order, and each enqueues its request on first poll), so
        // the address exists before the link goes up, and the link is up
        // before the routes through it are added. One round trip, not six.
        let route = |dst: Ipv4Addr, prefix: u8| {
            let msg = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst, prefix)
                .gateway(cfg.gateway)
                .output_interface(index)
                .build();
            c.route().add(msg).execute()
        };
        let (lo_up, addr, up, default_route, dns_route, host_link) = futures_util::join!(
            c.link()
                .set(LinkUnspec::new_with_index(LOOPBACK_IFINDEX).up().build())
                .execute(),
            c.address()
                .add(index, IpAddr::V4(cfg.address.ip()), cfg.address.prefix())
                .execute(),
            c.link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute(),
            route(Ipv4Addr::UNSPECIFIED, 0),
            route(weft_api::DNS_ADDR, 32),
            link_by_name(&self.nl.host, &cfg.host_veth),
        );
        lo_up.map_err(nl_err("setting lo up in the container"))?;
        addr.map_err(nl_err(format!(
            "adding address {} to {ifname}",
            cfg.address
        )))?;
        up.map_err(nl_err(format!("setting {ifname} up")))?;
        for (dst, prefix, result) in [
            (Ipv4Addr::UNSPECIFIED, 0, default_route),
            (weft_api::DNS_ADDR, 32, dns_route),
        ] {
            match result {
                Ok(()) => {}
                // The spec: another network may own the default route
                // already; CHECK reports it if it is not ours.
                Err(e) if errno(&e) == Some(Errno::EEXIST as i32) => {}
                Err(e) => {
                    return Err(nl_err(format!(
                        "adding route {dst}/{prefix} via {} dev {ifname}",
                        cfg.gateway
                    ))(e))
                }
            }
        }
        let host_mac = host_link
            .map_err(nl_err(format!("looking up {}", cfg.host_veth)))?
            .and_then(|l| link_state(&l).mac);
        Ok(Attached {
            host_veth: cfg.host_veth.clone(),
            host_mac,
            ifname: cfg.ifname.clone(),
            container_mac,
            container_index: index,
        })
    }

    /// The container interface `ifname` with its IPv4 addresses and its
    /// main-table IPv4 routes; `None` if there is no such interface.
    pub fn inspect(&self, ifname: &str) -> Result<Option<InterfaceState>, NetError> {
        check_name(ifname)?;
        let c = &self.handle;
        self.nl.rt.block_on(async {
            let Some(link) = link_by_name(c, ifname)
                .await
                .map_err(nl_err(format!("looking up {ifname} in the container")))?
            else {
                return Ok(None);
            };
            let link = link_state(&link);
            let mut addresses = Vec::new();
            let mut addrs = c
                .address()
                .get()
                .set_link_index_filter(link.index)
                .execute();
            while let Some(a) = addrs
                .try_next()
                .await
                .map_err(nl_err("listing container addresses"))?
            {
                if a.header.family != AddressFamily::Inet {
                    continue;
                }
                let mut local = None;
                let mut address = None;
                for attr in &a.attributes {
                    match attr {
                        AddressAttribute::Local(IpAddr::V4(ip)) => local = Some(*ip),
                        AddressAttribute::Address(IpAddr::V4(ip)) => address = Some(*ip),
                        _ => {}
                    }
                }
                if let Some(ip) = local.or(address) {
                    if let Ok(net) = Ipv4Network::new(ip, a.header.prefix_len) {
                        addresses.push(net);
                    }
                }
            }
            let mut routes = Vec::new();
            let mut all = c
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute();
            while let Some(r) = all
                .try_next()
                .await
                .map_err(nl_err("listing container routes"))?
            {
                let mut table = u32::from(r.header.table);
                let mut oif = None;
                let mut dst = Ipv4Addr::UNSPECIFIED;
                let mut gateway = None;
                for attr in &r.attributes {
                    match attr {
                        RouteAttribute::Table(t) => table = *t,
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(*a),
                        _ => {}
                    }
                }
                if table != u32::from(RouteHeader::RT_TABLE_MAIN) || oif != Some(link.index) {
                    continue;
                }
                if let Ok(dst) = Ipv4Network::new(dst, r.header.destination_prefix_length) {
                    routes.push(RouteState { dst, gateway });
                }
            }
            Ok(Some(InterfaceState {
                link,
                addresses,
                routes,
            }))
        })
    }
}

/// Attaches a container: [`Netlink::new`] in the calling thread's network
/// namespace (the host), [`Netlink::sandbox`] for `netns`, then
/// [`Sandbox::attach`].
pub fn attach(netns: impl AsRef<Path>, cfg: &VethConfig) -> Result<Attached, NetError> {
    let nl = Netlink::new()?;
    let sandbox = nl.sandbox(netns)?;
    sandbox.attach(cfg)
}

/// Detaches a container by deleting its host-side veth from the calling
/// thread's network namespace (the peer inside the container goes with it).
/// `Ok(false)` if it did not exist.
pub fn detach(host_veth: &str) -> Result<bool, NetError> {
    Netlink::new()?.delete_link(host_veth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_macs() {
        assert_eq!(
            format_mac(&[0xaa, 0, 0x0b, 1, 2, 0xff]),
            "aa:00:0b:01:02:ff"
        );
        assert_eq!(format_mac(&[]), "");
    }

    #[test]
    fn missing_and_non_netns_files() {
        let nl = Netlink::new().unwrap();
        let e = nl.sandbox("/nonexistent/netns/x").unwrap_err();
        assert!(matches!(e, NetError::NetnsMissing { .. }), "{e}");
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = nl.sandbox(f.path()).unwrap_err();
        assert!(matches!(e, NetError::NotNetns { .. }), "{e}");
    }

    #[test]
    fn own_namespace_is_refused() {
        let nl = Netlink::new().unwrap();
        match nl.sandbox("/proc/thread-self/ns/net") {
            Err(NetError::SameNetns { .. }) => {}
            // Unprivileged runs may not open it; that is fine too.
            Err(NetError::NetnsOpen { .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_names_are_refused_before_the_kernel() {
        let nl = Netlink::new().unwrap();
        assert!(matches!(
            nl.delete_link("much-too-long-name"),
            Err(NetError::InvalidName(_))
        ));
        assert!(matches!(nl.link(""), Err(NetError::InvalidName(_))));
    }
}
