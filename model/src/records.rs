//! The records weft keeps in the store (see [`crate::Keys`] for where), and
//! the types they are made of. Their JSON is the store format: a change here
//! is a change of what every host reads, so fields are only ever added with
//! a default, and the tests below pin what old records look like.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::{ContainerId, DnsName, HostId, IfName, WgKey};

/// A published port: traffic to `host_port` on the host goes to
/// `container_port` of the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// Only this host address, if set (CNI `hostIP`); `0.0.0.0` means every
    /// address, like no address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
}

impl PortMapping {
    /// The host address the port is restricted to; `None` (also for a
    /// `0.0.0.0` host IP) means every address of the host.
    pub fn host_addr(&self) -> Option<Ipv4Addr> {
        self.host_ip.filter(|ip| !ip.is_unspecified())
    }

    /// The one port-conflict rule: two mappings claim the same host socket
    /// when protocol and host port are the same and their host addresses
    /// overlap (one of them is every address — unset or `0.0.0.0` — or
    /// both are the same address).
    pub fn conflicts_with(&self, other: &PortMapping) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && match (self.host_addr(), other.host_addr()) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
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

/// DNS settings for a container's resolv.conf (CNI result `dns`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DnsConfig {
    pub nameservers: Vec<Ipv4Addr>,
    pub domain: String,
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// One container interface, as netd records it under
/// `endpoints/<host>/<container>/<ifname>` and dnsd reads it on every host.
///
/// The names are checked when a record is read, too: netd has written only
/// names that keep these rules (it checked them with the same rules before
/// they moved here), so old records parse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub container_id: ContainerId,
    pub ifname: IfName,
    /// The container's network namespace path (informational).
    pub netns: String,
    pub host_id: HostId,
    /// The container's address with the block's prefix, e.g. 10.42.3.7/24.
    pub address: Ipv4Network,
    pub gateway: Ipv4Addr,
    /// MTU for the container's interface.
    pub mtu: u32,
    /// The host bridge the host side of the veth joins.
    pub bridge: IfName,
    /// Container name (DNS `name` and `name.stack`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<DnsName>,
    /// Service the container belongs to (DNS `service`, `service.stack`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<DnsName>,
    /// Stack (namespace) of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<DnsName>,
    /// More names that resolve like service names.
    #[serde(default)]
    pub aliases: Vec<DnsName>,
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    pub dns: DnsConfig,
    /// Wall-clock milliseconds when the endpoint was added.
    pub created_at_ms: u64,
}

/// The first of `wanted` that conflicts ([`PortMapping::conflicts_with`])
/// with a port another record publishes, and that record.
pub fn find_port_conflict<'a>(
    wanted: &'a [PortMapping],
    records: &'a [EndpointRecord],
) -> Option<(&'a PortMapping, &'a EndpointRecord)> {
    wanted.iter().find_map(|m| {
        records
            .iter()
            .find(|r| r.port_mappings.iter().any(|o| o.conflicts_with(m)))
            .map(|r| (m, r))
    })
}

/// Which tunnel connects the hosts. (Each backend's overhead and devices
/// are netd's tunnel drivers' business, not the record's.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelBackend {
    /// Userspace WireGuard (boringtun): encrypted. The default.
    Wireguard,
    /// Kernel VXLAN: plain, for trusted networks.
    Vxlan,
}

impl TunnelBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelBackend::Wireguard => "wireguard",
            TunnelBackend::Vxlan => "vxlan",
        }
    }
}

impl std::str::FromStr for TunnelBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wireguard" | "wg" => Ok(TunnelBackend::Wireguard),
            "vxlan" => Ok(TunnelBackend::Vxlan),
            other => Err(format!("{other:?}: use wireguard or vxlan")),
        }
    }
}

/// What a host publishes about itself under `hosts/<host>` (under a lease).
///
/// The host id and WireGuard key are checked when a record is read: netd
/// has only written a key it made and a host id it checked with the same
/// rule, so old records parse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub host_id: HostId,
    pub underlay: Ipv4Addr,
    pub block: Ipv4Network,
    pub backend: TunnelBackend,
    /// WireGuard public key (base64 in JSON), for the wireguard backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_public_key: Option<WgKey>,
    /// The WireGuard key this host will switch to (a key rotation under
    /// way): peers accept a handshake from it in place of `wg_public_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_next_key: Option<WgKey>,
    pub wg_port: u16,
    /// The VXLAN device's MAC, `aa:bb:cc:dd:ee:ff`.
    pub vtep_mac: String,
    pub vxlan_port: u16,
    pub vni: u32,
    /// The host's overlay MTU.
    pub mtu: u32,
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint record as netd wrote it before the record moved here
    /// (field order and all).
    const OLD_ENDPOINT: &str = r#"{"container_id":"abc123","ifname":"eth0","netns":"/var/run/netns/x","host_id":"h1-0a1b2c","address":"10.42.3.7/24","gateway":"10.42.3.1","mtu":1420,"bridge":"weft0","name":"web-1","service":"web","stack":"shop","aliases":["www"],"port_mappings":[{"host_port":8080,"container_port":80,"protocol":"tcp"},{"host_port":5353,"container_port":53,"protocol":"udp","host_ip":"127.0.0.1"}],"dns":{"nameservers":["169.254.169.250"],"domain":"weft.local","search":["shop.weft.local","web.shop.weft.local","weft.local"],"options":["ndots:1"]},"created_at_ms":1700000000000}"#;

    /// The smallest record an old netd wrote: no name, service, stack or ports.
    const OLD_BARE_ENDPOINT: &str = r#"{"container_id":"c","ifname":"net1","netns":"","host_id":"h","address":"10.42.0.2/24","gateway":"10.42.0.1","mtu":1450,"bridge":"weft0","aliases":[],"port_mappings":[],"dns":{"nameservers":["169.254.169.250"],"domain":"weft.local","search":["weft.local"],"options":["ndots:1"]},"created_at_ms":1}"#;

    #[test]
    fn endpoint_record_json_is_pinned() {
        let rec: EndpointRecord = serde_json::from_str(OLD_ENDPOINT).unwrap();
        assert_eq!(rec.container_id, "abc123");
        assert_eq!(rec.stack.as_deref(), Some("shop"));
        assert_eq!(rec.port_mappings[1].host_ip, Some(Ipv4Addr::LOCALHOST));
        // A record serialises to the same bytes, field for field.
        assert_eq!(serde_json::to_string(&rec).unwrap(), OLD_ENDPOINT);
        let bare: EndpointRecord = serde_json::from_str(OLD_BARE_ENDPOINT).unwrap();
        assert_eq!(bare.name, None);
        assert_eq!(serde_json::to_string(&bare).unwrap(), OLD_BARE_ENDPOINT);
        // Fields added later with defaults may be missing in old records.
        let no_lists = OLD_BARE_ENDPOINT
            .replace(r#""aliases":[],"#, "")
            .replace(r#""port_mappings":[],"#, "")
            .replace(r#","options":["ndots:1"]"#, "");
        let r: EndpointRecord = serde_json::from_str(&no_lists).unwrap();
        assert!(r.aliases.is_empty() && r.port_mappings.is_empty() && r.dns.options.is_empty());
    }

    #[test]
    fn an_endpoint_record_with_a_bad_name_does_not_parse() {
        let bad = OLD_ENDPOINT.replace(r#""service":"web""#, r#""service":"we b""#);
        let e = serde_json::from_str::<EndpointRecord>(&bad).unwrap_err();
        assert!(e.to_string().contains("invalid DNS name"), "{e}");
    }

    const OLD_HOST: &str = r#"{"host_id":"h1","underlay":"192.168.1.10","block":"10.42.1.0/24","backend":"wireguard","wg_public_key":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","wg_port":51820,"vtep_mac":"02:aa:bb:cc:dd:ee","vxlan_port":4789,"vni":42,"mtu":1420,"version":"0.1.0"}"#;

    #[test]
    fn host_record_json_is_pinned() {
        let rec: HostRecord = serde_json::from_str(OLD_HOST).unwrap();
        assert_eq!(rec.backend, TunnelBackend::Wireguard);
        assert_eq!(rec.wg_public_key.map(|k| k.to_bytes()[31]), Some(31));
        assert_eq!(serde_json::to_string(&rec).unwrap(), OLD_HOST);
        // A VXLAN host has no key, and writes none.
        let vxlan = OLD_HOST.replace("wireguard", "vxlan").replace(
            r#""wg_public_key":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","#,
            "",
        );
        let rec: HostRecord = serde_json::from_str(&vxlan).unwrap();
        assert_eq!(rec.wg_public_key, None);
        assert_eq!(serde_json::to_string(&rec).unwrap(), vxlan);
    }

    #[test]
    fn host_record_next_key_is_optional() {
        // Old records have no next key, and a record without one writes none.
        let mut rec: HostRecord = serde_json::from_str(OLD_HOST).unwrap();
        assert_eq!(rec.wg_next_key, None);
        // During a rotation the next key follows the key.
        rec.wg_next_key = Some(WgKey::from_bytes([7; 32]));
        let json = serde_json::to_string(&rec).unwrap();
        let with_next = OLD_HOST.replace(
            r#""wg_port""#,
            r#""wg_next_key":"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=","wg_port""#,
        );
        assert_eq!(json, with_next);
        let back: HostRecord = serde_json::from_str(&with_next).unwrap();
        assert_eq!(back, rec);
    }

    #[test]
    fn tunnel_backends() {
        assert_eq!("vxlan".parse::<TunnelBackend>(), Ok(TunnelBackend::Vxlan));
        assert_eq!("wg".parse::<TunnelBackend>(), Ok(TunnelBackend::Wireguard));
        assert!("gre".parse::<TunnelBackend>().is_err());
    }

    fn pm(host_port: u16, protocol: Protocol, host_ip: Option<[u8; 4]>) -> PortMapping {
        PortMapping {
            host_port,
            container_port: 80,
            protocol,
            host_ip: host_ip.map(Ipv4Addr::from),
        }
    }

    #[test]
    fn port_conflicts_treat_0_0_0_0_as_every_address() {
        use Protocol::*;
        let any = pm(8080, Tcp, None);
        let zeros = pm(8080, Tcp, Some([0, 0, 0, 0]));
        let one = pm(8080, Tcp, Some([10, 0, 0, 1]));
        let two = pm(8080, Tcp, Some([10, 0, 0, 2]));
        for (a, b, want) in [
            (&any, &one, true),
            (&zeros, &one, true),
            (&zeros, &any, true),
            (&one, &one, true),
            (&one, &two, false),
            (&any, &pm(8080, Udp, None), false),
            (&any, &pm(8081, Tcp, None), false),
        ] {
            assert_eq!(a.conflicts_with(b), want, "{a:?} {b:?}");
            assert_eq!(b.conflicts_with(a), want, "symmetric: {b:?} {a:?}");
        }
    }

    #[test]
    fn protocol_serialises_lowercase() {
        let json = serde_json::to_string(&pm(8080, Protocol::Tcp, None)).unwrap();
        assert_eq!(
            json,
            r#"{"host_port":8080,"container_port":80,"protocol":"tcp"}"#
        );
    }
}
