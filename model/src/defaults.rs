//! Shared defaults: values more than one crate needs, named once.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// The service-discovery DNS address every container resolves through
/// (link-local, so it is the same on every host and never routed off it).
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 250);

/// The cluster range when none is configured: container addresses, carved
/// into one block per host by IPAM; dnsd answers PTR queries for it.
pub const DEFAULT_CLUSTER_RANGE: Ipv4Network =
    match Ipv4Network::new_checked(Ipv4Addr::new(10, 42, 0, 0), 16) {
        Some(n) => n,
        None => panic!("10.42.0.0/16 is a network"),
    };

/// The cluster's DNS domain when none is configured (`web.shop.weft.internal`).
pub const DEFAULT_DOMAIN: &str = "weft.internal";
