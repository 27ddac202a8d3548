//! The overlay MTU rule, in one place: an overlay packet plus the tunnel's
//! encapsulation must fit one IPv4 packet, and no overlay MTU is below
//! IPv4's minimum. This module owns the arithmetic, the range and the
//! encapsulation size of each tunnel protocol; netd's `tunnel` module picks
//! the one of the configured backend.

use std::fmt;

/// The smallest overlay MTU: the IPv4 datagram every host must accept
/// (RFC 791). An underlay too small for it still gets it (the underlay then
/// fragments the outer packets).
pub const MIN_MTU: u32 = 576;
/// The largest IPv4 packet (the total-length field).
pub const MAX_IPV4_PACKET: u32 = 65_535;
/// The outer IPv4 (20) and UDP (8) headers every UDP tunnel adds.
pub const IPV4_UDP_HEADERS: u32 = 28;
/// WireGuard's encapsulation on an IPv4 underlay: outer IPv4 and UDP, the
/// data message header (16) and the Poly1305 tag (16). weft-wg checks its
/// wire format against it at compile time.
pub const WIREGUARD_OVERHEAD: u32 = IPV4_UDP_HEADERS + 16 + 16;
/// VXLAN's encapsulation on an IPv4 underlay: outer IPv4 and UDP, the VXLAN
/// header (8) and the inner Ethernet header (14).
pub const VXLAN_OVERHEAD: u32 = IPV4_UDP_HEADERS + 8 + 14;

/// The overlay MTU for an underlay MTU and a tunnel's `overhead` (bytes of
/// encapsulation): what is left, but at least [`MIN_MTU`].
pub fn overlay_mtu(underlay_mtu: u32, overhead: u32) -> u32 {
    underlay_mtu.saturating_sub(overhead).max(MIN_MTU)
}

/// The largest overlay MTU a tunnel with `overhead` can carry.
pub fn max_mtu(overhead: u32) -> u32 {
    MAX_IPV4_PACKET.saturating_sub(overhead)
}

/// Checks an overlay MTU (configured or given to a device) for a tunnel
/// with `overhead`.
pub fn check_mtu(mtu: u32, overhead: u32) -> Result<(), MtuError> {
    let max = max_mtu(overhead);
    if (MIN_MTU..=max).contains(&mtu) {
        Ok(())
    } else {
        Err(MtuError { mtu, max })
    }
}

/// An overlay MTU outside `MIN_MTU..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MtuError {
    pub mtu: u32,
    /// The largest MTU the tunnel can carry.
    pub max: u32,
}

impl fmt::Display for MtuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MTU {} is outside {MIN_MTU}..={} (use at least the IPv4 minimum, at most \
             what fits one IPv4 packet with the tunnel's encapsulation)",
            self.mtu, self.max
        )
    }
}

impl std::error::Error for MtuError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_is_the_underlay_minus_the_overhead_but_at_least_the_minimum() {
        assert_eq!(overlay_mtu(1500, 60), 1440);
        assert_eq!(overlay_mtu(9000, 60), 8940);
        assert_eq!(overlay_mtu(1500, 50), 1450);
        assert_eq!(overlay_mtu(600, 60), MIN_MTU);
        assert_eq!(overlay_mtu(10, 60), MIN_MTU);
    }

    #[test]
    fn range_depends_on_the_overhead() {
        assert_eq!(check_mtu(MIN_MTU, 60), Ok(()));
        assert_eq!(check_mtu(65_475, 60), Ok(()));
        let e = check_mtu(65_476, 60).unwrap_err();
        assert_eq!(
            e,
            MtuError {
                mtu: 65_476,
                max: 65_475
            }
        );
        assert!(e.to_string().contains("576..=65475"), "{e}");
        assert!(check_mtu(575, 0).is_err());
        assert_eq!(check_mtu(65_535, 0), Ok(()));
    }
}
