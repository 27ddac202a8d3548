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
//!
//! Errors are a 4xx/5xx status with an [`ApiError`] body. The types are plain
//! data; the [`client`] is a small blocking client for the CNI plugin and the
//! CLI (no async runtime, so the plugin starts fast).

pub mod client;

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// The default control socket.
pub const DEFAULT_SOCKET: &str = "/run/weft/netd.sock";

/// The service-discovery DNS address every container resolves through.
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 250);

/// A published port: traffic to `host_port` on the host goes to
/// `container_port` of the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// Only this host address, if set (CNI `hostIP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

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
}

/// DNS settings for the container's resolv.conf (CNI result `dns`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DnsConfig {
    pub nameservers: Vec<Ipv4Addr>,
    pub domain: String,
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// An endpoint as netd holds it.
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
    /// The host block has no free address (HTTP 409).
    PoolExhausted,
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
            ErrorKind::PoolExhausted => 409,
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

/// Checks a container id as CNI defines it: starts with an alphanumeric
/// character, then alphanumerics, `_`, `.` and `-`.
pub fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && id.len() <= 256
}

/// Checks an interface name as Linux and CNI allow it: 1–15 bytes, not `.`
/// or `..`, no `/`, `:` or whitespace.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// Checks a DNS label-ish name (container, service, stack, alias):
/// letters, digits, `-`, `_` and `.`, 1–63 bytes per label.
pub fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids() {
        assert!(valid_container_id("abc123"));
        assert!(valid_container_id("a-b_c.d"));
        assert!(!valid_container_id(""));
        assert!(!valid_container_id("-abc"));
        assert!(!valid_container_id("a/b"));
        assert!(!valid_container_id("a b"));
    }

    #[test]
    fn ifnames() {
        assert!(valid_ifname("eth0"));
        assert!(valid_ifname("net1"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("0123456789abcdef"));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname(".."));
        assert!(!valid_ifname("eth 0"));
    }

    #[test]
    fn dns_names() {
        assert!(valid_dns_name("web-1"));
        assert!(valid_dns_name("web.shop"));
        assert!(!valid_dns_name(""));
        assert!(!valid_dns_name("a..b"));
        assert!(!valid_dns_name("we b"));
        assert!(!valid_dns_name(&"x".repeat(64)));
    }

    #[test]
    fn protocol_serialises_lowercase() {
        let m = PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: Protocol::Tcp,
            host_ip: None,
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"host_port":8080,"container_port":80,"protocol":"tcp"}"#
        );
    }
}
