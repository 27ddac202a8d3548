//! weft's shared model: every concept more than one crate needs, defined
//! once, as plain data with no I/O.
//!
//! * [`Keys`] — the store key layout under one normalised prefix.
//! * Stored records ([`EndpointRecord`], [`HostRecord`]) and what they are
//!   made of ([`PortMapping`], [`Protocol`], [`DnsConfig`],
//!   [`TunnelBackend`]); their JSON is the store format, pinned by tests.
//!   The one port-conflict rule ([`PortMapping::conflicts_with`],
//!   [`find_port_conflict`]) lives with them; netd's endpoint checks and its
//!   NAT rules both use it.
//! * Network policy ([`Policy`] and its parts): the document stored at
//!   [`Keys::policy_doc`], its validation ([`PolicyError`]) and the one
//!   pure decision ([`Policy::decide`], explained by [`Decision`]; per pair
//!   of parties for every port at once, [`Policy::reach`]) that netd's
//!   kernel rules, `netd policy check` and the tests' model all use.
//! * Validated names ([`ContainerId`], [`HostId`], [`IfName`], [`DnsName`],
//!   [`WgKey`]): one rule each, a typed error that says what is allowed,
//!   checked on parsing and deserialising, plain strings in JSON.
//! * Shared defaults ([`DNS_ADDR`], [`DEFAULT_PREFIX`],
//!   [`DEFAULT_CLUSTER_RANGE`], [`DEFAULT_DOMAIN`]).
//! * A container's port on the host bridge ([`host_veth_name`], [`Mac`]):
//!   the host veth name rule and the MAC derived from the address, shared by
//!   the CNI plugin (which makes them) and netd (which allows only them).
//! * Services ([`ServiceName`], [`ServiceSpec`], [`ServiceRecord`],
//!   [`HealthRecord`], [`HealthState`]): VIPs, balancing and health checks,
//!   stored at [`Keys::service`], [`Keys::vip`] and [`Keys::health_of`].
//! * The overlay MTU rule ([`mtu`]: the minimum, the range, the computation
//!   from the underlay; each tunnel driver in netd brings its overhead).
//!
//! The control API (`weft-api`) builds its answers from these records, so
//! changing the API does not change the store format; dnsd reads records
//! and needs no API types.

mod defaults;
mod keys;
pub mod mtu;
mod names;
mod policy;
mod port;
mod records;
mod service;
mod wgkey;

pub use defaults::{DEFAULT_CLUSTER_RANGE, DEFAULT_DOMAIN, DNS_ADDR};
pub use keys::{Keys, DEFAULT_PREFIX};
pub use names::{ContainerId, DnsName, HostId, IfName, NameError};
pub use policy::{
    Action, DecidedBy, Decision, Party, Policy, PolicyError, PortSpec, Reach, Rule, Selector,
    StackPolicy,
};
pub use port::{host_veth_name, is_host_veth_name, Mac, MacError, HOST_VETH_PREFIX};
pub use records::{
    find_port_conflict, DnsConfig, EndpointRecord, HostRecord, PortMapping, Protocol, TunnelBackend,
};
pub use service::{
    Balance, HealthCheck, HealthRecord, HealthState, Mode, Probe, ServiceError, ServiceName,
    ServiceRecord, ServiceSpec, DEFAULT_SERVICE_GRACE, DEFAULT_SERVICE_RANGE,
};
pub use wgkey::{WgKey, WgKeyError};
