//! Handles to what a built lab contains: [`Host`], [`Container`] and
//! [`Router`], each a network namespace plus its place in the lab (addresses,
//! MTU, underlay port). Each derefs to its [`Netns`].

use std::net::Ipv4Addr;
use std::ops::Deref;

use super::{HOST_IFACE, UNDERLAY_PREFIX_LEN};
use crate::netns::Netns;

/// One host: a network namespace with `eth0` on the underlay.
#[derive(Debug, Clone)]
pub struct Host {
    pub(super) netns: Netns,
    pub(super) index: usize,
    pub(super) addr: Ipv4Addr,
    pub(super) gateway: Ipv4Addr,
    pub(super) mtu: u32,
    pub(super) far: bool,
    pub(super) underlay_port: String,
    pub(super) underlay_bridge: String,
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
    pub(super) netns: Netns,
    pub(super) host: usize,
    pub(super) name: String,
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
    pub(super) netns: Netns,
    pub(super) near_addr: Ipv4Addr,
    pub(super) far_addr: Ipv4Addr,
    pub(super) far_mtu: u32,
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
