//! The host-side veth name of an attachment.
//!
//! `wf` + 11 lowercase hex digits (13 bytes, within Linux's 15): the top 44
//! bits of a 64-bit hash of `container_id`, a NUL byte and `ifname`
//! (FNV-1a, then the splitmix64 finaliser so that every output bit depends
//! on every input bit). The name is a pure function of the attachment, so
//! DEL and GC find the interface with nothing stored anywhere. The scheme
//! must never change: a plugin upgrade would otherwise lose the veths of
//! running containers (the unit tests pin it).

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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

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
            assert!(weft_model::IfName::is_valid(&name));
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
}
