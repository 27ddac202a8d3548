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
//! end with its final name, MTU, bridge and up; the peer with `CNI_IFNAME`,
//! the MTU and its MAC (the one netd's anti-spoofing allows), created directly inside the container namespace (by the
//! namespace fd), so no interface ever appears in the host under the
//! container's name. Deleting the host end deletes the peer too.
//!
//! Everything runs on a current-thread tokio runtime owned by [`Netlink`]
//! (no worker threads: the plugin is a short-lived process).
//!
//! `error` holds [`NetError`], `links` the lookups by name, `veth` making and
//! inspecting the pair; this file holds the handles ([`Netlink`],
//! [`Sandbox`]) and the plain data they take and return.

mod error;
mod links;
mod veth;

use error::nl_err;
pub use error::NetError;
use links::{delete_by_name, link_by_name, link_state};

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use ipnetwork::Ipv4Network;
use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};
use rtnetlink::Handle;
use tokio::runtime::Runtime;

/// The loopback device's index, the same in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// What [`Sandbox::attach`] sets up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethConfig {
    /// The interface name inside the container (`CNI_IFNAME`).
    pub ifname: String,
    /// The host end's name (see [`weft_model::host_veth_name`]).
    pub host_veth: String,
    /// The container end's MAC (netd's answer: [`weft_model::Mac::for_addr`]
    /// of the address; anti-spoofing lets nothing else out of the port).
    pub mac: weft_model::Mac,
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

pub(super) fn check_name(name: &str) -> Result<(), NetError> {
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
    /// [`weft_model::host_veth_name`]'s scheme.
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
                if s.kind.as_deref() == Some("veth") && weft_model::is_host_veth_name(&s.name) {
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
