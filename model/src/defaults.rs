//! Shared defaults: values more than one crate needs, named once.

use std::net::Ipv4Addr;

/// The service-discovery DNS address every container resolves through
/// (link-local, so it is the same on every host and never routed off it).
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 250);
