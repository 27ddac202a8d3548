//! A container's port on the host bridge: the two rules netd and the CNI
//! plugin must agree on, so that what netd allows on a port (anti-spoofing)
//! is exactly what the plugin made.
//!
//! * [`host_veth_name`]: the host-side veth name of an attachment. `wf` + 11
//!   lowercase hex digits (13 bytes, within Linux's 15): the top 44 bits of
//!   a 64-bit hash of `container_id`, a NUL byte and `ifname` (FNV-1a, then
//!   the splitmix64 finaliser so that every output bit depends on every
//!   input bit). The name is a pure function of the attachment, so DEL and
//!   GC find the interface, and netd names the bridge port in its
//!   anti-spoofing table, with nothing stored anywhere. The scheme must
//!   never change: a plugin upgrade would otherwise lose the veths of
//!   running containers (the unit tests pin it).
//! * [`Mac`]: the container interface's MAC, derived from its address
//!   ([`Mac::for_addr`]: `0a:58:` + the 4 address bytes, as ovn-kubernetes
//!   does; locally administered, unicast). A container may send only with
//!   this MAC and its address.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of every host-side veth weft creates.
pub const HOST_VETH_PREFIX: &str = "wf";
/// Hex digits after the prefix.
pub const HOST_VETH_HASH_DIGITS: usize = 11;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(hash, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The host-side veth name for `container_id` and `ifname`.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let h = fnv1a(FNV_OFFSET, container_id.as_bytes());
    let h = fnv1a(h, &[0]);
    let h = mix64(fnv1a(h, ifname.as_bytes()));
    format!(
        "{HOST_VETH_PREFIX}{:0width$x}",
        h >> (64 - 4 * HOST_VETH_HASH_DIGITS),
        width = HOST_VETH_HASH_DIGITS
    )
}

/// Whether `name` follows the host-side veth scheme.
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == HOST_VETH_PREFIX.len() + HOST_VETH_HASH_DIGITS
        && name.starts_with(HOST_VETH_PREFIX)
        && name[HOST_VETH_PREFIX.len()..]
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The first two bytes of every container MAC weft assigns.
pub const MAC_PREFIX: [u8; 2] = [0x0a, 0x58];

/// An Ethernet address; `aa:bb:cc:dd:ee:ff` (lowercase) in text and JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The MAC of the container interface with address `addr`:
    /// `0a:58:` + the address's 4 bytes.
    pub fn for_addr(addr: Ipv4Addr) -> Mac {
        let [a, b, c, d] = addr.octets();
        Mac([MAC_PREFIX[0], MAC_PREFIX[1], a, b, c, d])
    }

    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A text that is not `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address: write six hex bytes separated by ':', e.g. 0a:58:0a:2a:00:02")]
pub struct MacError(pub String);

impl FromStr for Mac {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Mac, MacError> {
        let bad = || MacError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::IfName;

    #[test]
    fn names_are_pinned() {
        // These values must never change (see the module docs).
        for (id, ifname, name) in [
            ("abc", "eth0", "wfa4f37b237e2"),
            ("abc", "net1", "wf8cacae54a3b"),
            (
                "3f6940ab5ab43bc522569d15b23f8c1bbde1d7678b080398506924fc01d72755",
                "eth0",
                "wf0a559ddf898",
            ),
        ] {
            assert_eq!(host_veth_name(id, ifname), name, "{id}/{ifname}");
        }
    }

    #[test]
    fn names_fit_and_differ() {
        let mut seen = HashSet::new();
        for i in 0..20_000 {
            let name = host_veth_name(&format!("container-{i}"), "eth0");
            assert_eq!(name.len(), 13);
            assert!(name.len() <= 15);
            assert!(IfName::is_valid(&name));
            assert!(is_host_veth_name(&name));
            assert!(seen.insert(name));
        }
        // The separator keeps (id, ifname) pairs apart.
        assert_ne!(host_veth_name("ab", "ceth0"), host_veth_name("abc", "eth0"));
        assert_ne!(host_veth_name("abc", "eth0"), host_veth_name("abc", "eth1"));
    }

    #[test]
    fn recognises_the_scheme() {
        assert!(is_host_veth_name("wf0123456789a"));
        assert!(!is_host_veth_name("wf0123456789"));
        assert!(!is_host_veth_name("wf0123456789ab"));
        assert!(!is_host_veth_name("wf0123456789A"));
        assert!(!is_host_veth_name("xx0123456789a"));
        assert!(!is_host_veth_name("eth0"));
    }

    #[test]
    fn the_mac_is_pinned_to_the_address() {
        let mac = Mac::for_addr(Ipv4Addr::new(10, 42, 3, 7));
        assert_eq!(mac.to_string(), "0a:58:0a:2a:03:07");
        assert_eq!(mac.octets(), [0x0a, 0x58, 10, 42, 3, 7]);
        // Locally administered (bit 1 of the first byte), unicast (bit 0 clear).
        assert_eq!(mac.0[0] & 0b11, 0b10);
        // Different addresses, different MACs.
        assert_ne!(mac, Mac::for_addr(Ipv4Addr::new(10, 42, 3, 8)));
    }

    #[test]
    fn mac_text_and_json_round_trip() {
        let mac: Mac = "0a:58:0A:2a:00:ff".parse().unwrap();
        assert_eq!(mac, Mac([0x0a, 0x58, 0x0a, 0x2a, 0x00, 0xff]));
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            r#""0a:58:0a:2a:00:ff""#
        );
        let back: Mac = serde_json::from_str(r#""0a:58:0a:2a:00:ff""#).unwrap();
        assert_eq!(back, mac);
        for bad in [
            "",
            "0a:58:0a:2a:00",
            "0a:58:0a:2a:00:ff:01",
            "0a-58-0a-2a-00-ff",
            "0a:58:0a:2a:0:fff",
            "zz:58:0a:2a:00:ff",
            "+a:58:0a:2a:00:ff",
        ] {
            let e = bad.parse::<Mac>().unwrap_err();
            assert!(e.to_string().contains("six hex bytes"), "{bad}: {e}");
        }
        assert!(serde_json::from_str::<Mac>(r#""nope""#).is_err());
    }
}
