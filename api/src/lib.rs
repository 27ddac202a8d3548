//! netd's control API: JSON over HTTP/1.1 on a Unix socket (default
//! `/run/weft/netd.sock`, mode 0600).
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /v1/status` | | [`Status`] |
//! | `GET /v1/endpoints` | | `Vec<`[`Endpoint`]`>` |
//! | `POST /v1/endpoints` | [`AddEndpoint`] | [`Endpoint`] (idempotent per container id + interface) |
//! | `GET /v1/endpoints/{container_id}/{ifname}` | | [`Endpoint`] or 404 |
//! | `DELETE /v1/endpoints/{container_id}/{ifname}` | | [`Deleted`] (idempotent) |
//! | `POST /v1/gc` | [`GcRequest`] | [`GcResult`] |
//! | `GET /v1/peers` | | `Vec<`[`PeerInfo`]`>` |
//! | `GET /v1/policy` | | [`PolicyDoc`] |
//! | `PUT /v1/policy` | [`PutPolicy`] | [`PolicyDoc`] (400 if invalid, 409 if `expect_revision` is stale) |
//! | `POST /v1/policy/check` | [`PolicyCheck`] | [`PolicyVerdict`] |
//! | `GET /v1/services` | | `Vec<`[`ServiceInfo`]`>` |
//! | `GET /v1/services/{name}` | | [`ServiceInfo`] or 404 |
//! | `PUT /v1/services/{name}` | [`ServiceSpec`] | [`ServiceInfo`] (creates the record if needed; 400 if invalid, 409 `pool_exhausted` if `vip` mode finds the service range full) |
//! | `POST /v1/wireguard/rotate-key` | | [`KeyRotation`] (400 on a VXLAN host: no key; 409 while a rotation is under way) |
//!
//! Errors are a 4xx/5xx status with an [`ApiError`] body. The types are plain
//! data; the [`client`] is a small blocking client for the CNI plugin and the
//! CLI (no async runtime, so the plugin starts fast). With the cargo feature
//! `testing`, [`testing`] has a fake netd for client tests.
//!
//! The stored records and validated names live in `weft-model`; netd parses
//! requests into them, and answers with types built from them.

pub mod client;
mod policy;
mod services;
#[cfg(feature = "testing")]
pub mod testing;

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// The default control socket.
pub const DEFAULT_SOCKET: &str = "/run/weft/netd.sock";

pub use weft_model::{Action, DecidedBy, Decision, Party, Policy, PortSpec};
/// The stored types the API carries as they are (their JSON is the same in
/// the store and on the socket), and the DNS address, from the model.
pub use weft_model::{DnsConfig, PortMapping, Protocol, DNS_ADDR};

pub use policy::{PolicyCheck, PolicyDoc, PolicyVerdict, PutPolicy};
pub use services::{Backend, ServiceInfo};
pub use weft_model::{Balance, HealthCheck, Mode, Probe, ServiceName, ServiceSpec};

/// Asks netd for an address for a container interface and records what the
/// container is (for DNS and published ports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddEndpoint {
    pub container_id: String,
    pub ifname: String,
    /// The container's network namespace path (informational).
    #[serde(default)]
    pub netns: String,
    /// Container name (DNS `name` and `name.stack`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Service the container belongs to (DNS `service`, `service.stack`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Stack (namespace) of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
    /// More names that resolve like service names.
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    /// The mode of the container's service (CNI_ARGS `WEFT_SERVICE_MODE`),
    /// used only when its first container creates the service's record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_mode: Option<Mode>,
}

/// An endpoint as netd answers it. Built from the stored
/// [`EndpointRecord`](weft_model::EndpointRecord) (`From`), so the API and
/// the store format can change apart; the JSON is the record's plus `mac`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub host_id: String,
    /// The container's address with the block's prefix, e.g. 10.42.3.7/24.
    pub address: Ipv4Network,
    pub gateway: Ipv4Addr,
    /// MTU for the container's interface.
    pub mtu: u32,
    /// The host bridge the host side of the veth joins.
    pub bridge: String,
    /// The MAC the container interface must have: netd's anti-spoofing
    /// lets only this MAC with `address` out of the container's port. Derived
    /// from the address ([`weft_model::Mac::for_addr`], not stored); absent in
    /// answers of a netd older than anti-spoofing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<weft_model::Mac>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    pub dns: DnsConfig,
    /// Wall-clock milliseconds when the endpoint was added.
    pub created_at_ms: u64,
}

impl From<weft_model::EndpointRecord> for Endpoint {
    fn from(r: weft_model::EndpointRecord) -> Self {
        let name = |n: Option<weft_model::DnsName>| n.map(String::from);
        Endpoint {
            container_id: r.container_id.into(),
            ifname: r.ifname.into(),
            netns: r.netns,
            host_id: r.host_id.into(),
            address: r.address,
            gateway: r.gateway,
            mtu: r.mtu,
            bridge: r.bridge.into(),
            mac: Some(weft_model::Mac::for_addr(r.address.ip())),
            name: name(r.name),
            service: name(r.service),
            stack: name(r.stack),
            aliases: r.aliases.into_iter().map(String::from).collect(),
            port_mappings: r.port_mappings,
            dns: r.dns,
            created_at_ms: r.created_at_ms,
        }
    }
}

/// The answer to a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// The address that was released, if the endpoint existed.
    pub released: Option<Ipv4Addr>,
}

/// One container interface that is still in use.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// CNI GC: release everything of this host not in `valid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    pub valid: Vec<Attachment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcResult {
    pub released: Vec<Endpoint>,
}

/// A completed WireGuard key rotation (`netd rotate-key`): the public keys
/// in WireGuard's base64 form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotation {
    pub old_public_key: String,
    pub new_public_key: String,
}

/// What netd reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub host_id: String,
    pub block: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub bridge: String,
    pub mtu: u32,
    pub cluster_range: Ipv4Network,
    pub store: String,
    /// Whether the last store call succeeded.
    pub store_ok: bool,
    pub endpoints: usize,
    /// Endpoint addresses the block can hold.
    pub capacity: u32,
    pub iptables: String,
}

/// Another host as this host's data plane sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub host_id: String,
    pub underlay: Ipv4Addr,
    pub block: Ipv4Network,
    /// `wireguard` or `vxlan`.
    pub backend: String,
    /// Seconds since the last WireGuard handshake (none yet, or VXLAN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_age_secs: Option<u64>,
    #[serde(default)]
    pub rx_bytes: u64,
    #[serde(default)]
    pub tx_bytes: u64,
}

/// Machine-readable error kinds, so clients can map them (the CNI plugin
/// turns them into CNI error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or invalid (HTTP 400).
    InvalidRequest,
    /// No such endpoint (HTTP 404).
    NotFound,
    /// The host block, or the service range, has no free address (HTTP 409).
    PoolExhausted,
    /// What the request expected changed meanwhile (the policy's
    /// revision): read again and retry (HTTP 409).
    Conflict,
    /// The store or the kernel is unavailable now; retry (HTTP 503).
    TryAgainLater,
    /// Anything else (HTTP 500).
    Internal,
}

impl ErrorKind {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::PoolExhausted | ErrorKind::Conflict => 409,
            ErrorKind::TryAgainLater => 503,
            ErrorKind::Internal => 500,
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API's endpoint, built from a stored record, has the record's
    /// JSON plus the MAC derived from the address (the CNI plugin and the
    /// CLI read it); an answer without `mac` (an older netd) still parses.
    #[test]
    fn endpoint_from_record_keeps_the_json() {
        let json = r#"{"container_id":"abc","ifname":"eth0","netns":"/run/netns/x","host_id":"h1","address":"10.42.3.7/24","gateway":"10.42.3.1","mtu":1420,"bridge":"weft0","name":"web-1","service":"web","stack":"shop","aliases":["www"],"port_mappings":[{"host_port":8080,"container_port":80,"protocol":"tcp","host_ip":"0.0.0.0"}],"dns":{"nameservers":["169.254.169.250"],"domain":"weft.local","search":["weft.local"],"options":[]},"created_at_ms":7}"#;
        let with_mac = json.replace(
            r#""bridge":"weft0","#,
            r#""bridge":"weft0","mac":"0a:58:0a:2a:03:07","#,
        );
        let record: weft_model::EndpointRecord = serde_json::from_str(json).unwrap();
        let ep = Endpoint::from(record);
        assert_eq!(ep.service.as_deref(), Some("web"));
        assert_eq!(
            ep.mac,
            Some(weft_model::Mac::for_addr("10.42.3.7".parse().unwrap()))
        );
        assert_eq!(serde_json::to_string(&ep).unwrap(), with_mac);
        assert_eq!(serde_json::from_str::<Endpoint>(&with_mac).unwrap(), ep);
        let old = serde_json::from_str::<Endpoint>(json).unwrap();
        assert_eq!(old.mac, None);
        assert_eq!(Endpoint { mac: ep.mac, ..old }, ep);
    }
}
