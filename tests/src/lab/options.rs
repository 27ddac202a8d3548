//! What a lab is made of, before it exists: the underlay's fixed addresses and
//! names, [`LabOptions`] and [`RouterOptions`], and the check that they fit.

use crate::error::{Error, Result};

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

    pub(super) fn validate(&self) -> Result<()> {
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
