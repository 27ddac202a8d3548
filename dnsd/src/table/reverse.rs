//! The reverse zones: PTR names of the cluster range (containers) and of
//! the service range (VIPs), each with its SOA.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use rustc_hash::FxHashMap;

use super::{soa_record, Resolution, Zone};
use crate::wire::{name_from_str, wire_label_count, Name};

const IN_ADDR_ARPA: &[u8] = b"\x07in-addr\x04arpa\x00";

/// One range's reverse zone.
pub(super) struct ReverseZone {
    which: Zone,
    range: Ipv4Network,
    /// `42.10.in-addr.arpa` for `10.42.0.0/16`, rounded to whole octets.
    zone: Box<[u8]>,
    labels: usize,
    /// Whether the range is a whole reverse zone (prefix a multiple of 8).
    exact: bool,
    pub soa: Box<[u8]>,
}

impl ReverseZone {
    pub fn new(
        which: Zone,
        range: Ipv4Network,
        domain: &[u8],
        ttl: u32,
        serial: u32,
    ) -> ReverseZone {
        let octets = (range.prefix() / 8) as usize;
        let ip = range.network().octets();
        let mut text = String::new();
        for o in ip[..octets].iter().rev() {
            text.push_str(&format!("{o}."));
        }
        text.push_str("in-addr.arpa");
        let zone = name_from_str(&text).unwrap_or_else(|| IN_ADDR_ARPA.to_vec());
        ReverseZone {
            which,
            range,
            labels: wire_label_count(&zone),
            exact: range.prefix().is_multiple_of(8),
            soa: soa_record(&zone, domain, ttl, serial),
            zone: zone.into_boxed_slice(),
        }
    }

    fn holds(&self, name: &Name) -> bool {
        self.exact && name.is_at_or_under(&self.zone, self.labels)
    }
}

/// What a name under `in-addr.arpa` is: a PTR of `ptr` for an address in
/// one of `zones`' ranges, NXDOMAIN for other addresses there and other
/// names in an exact zone, the apex, or empty non-terminals; anything else
/// is forwarded.
pub(super) fn resolve<'t>(
    zones: &'t [ReverseZone],
    ptr: &'t FxHashMap<Ipv4Addr, Box<[u8]>>,
    name: &Name,
) -> Resolution<'t> {
    let n = name.label_count();
    if n < 2 || name.suffix(n - 2) != IN_ADDR_ARPA {
        return Resolution::External;
    }
    if n == 6 {
        if let Some(ip) = reverse_address(name) {
            if let Some(z) = zones.iter().find(|z| z.range.contains(ip)) {
                return match ptr.get(&ip) {
                    Some(rec) => Resolution::Ptr(rec, z.which),
                    None => Resolution::NxDomain(z.which),
                };
            }
        }
        return match zones.iter().find(|z| z.holds(name)) {
            Some(z) => Resolution::NxDomain(z.which),
            None => Resolution::External,
        };
    }
    let Some(z) = zones.iter().find(|z| z.holds(name)) else {
        return Resolution::External;
    };
    if n == z.labels {
        return Resolution::Apex(z.which);
    }
    if n < 6 && (0..n - 2).all(|i| octet(name.label(i)).is_some()) {
        Resolution::NoData(z.which)
    } else {
        Resolution::NxDomain(z.which)
    }
}

/// A decimal octet label (`0` to `255`).
fn octet(label: &[u8]) -> Option<u8> {
    if label.is_empty() || label.len() > 3 || !label.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v = label
        .iter()
        .fold(0u32, |acc, d| acc * 10 + (d - b'0') as u32);
    u8::try_from(v).ok()
}

/// `d.c.b.a.in-addr.arpa` → a.b.c.d.
fn reverse_address(name: &Name) -> Option<Ipv4Addr> {
    let d = octet(name.label(0))?;
    let c = octet(name.label(1))?;
    let b = octet(name.label(2))?;
    let a = octet(name.label(3))?;
    Some(Ipv4Addr::new(a, b, c, d))
}
