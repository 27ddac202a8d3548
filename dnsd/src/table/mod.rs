//! The lookup table: every name dnsd answers for, built from the endpoints,
//! the service records and the health records in the store, with its answer
//! records already in wire form.
//!
//! A table is immutable once built (apart from the round-robin counters);
//! the store sync builds a new one on every change and swaps it in
//! atomically, so queries never wait for a rebuild.
//!
//! Names for an endpoint {name `web-1`, service `web`, stack `shop`,
//! aliases `www`} in domain `weft.internal` (all lowercase; queries are
//! matched case-insensitively):
//!
//! | name | answers |
//! |---|---|
//! | `web-1.shop.weft.internal`, `web-1.shop` | the container |
//! | `web-1.weft.internal`, `web-1` | every container named `web-1` (any stack) |
//! | `web.shop.weft.internal`, `web.shop` | `vip` mode: the service's VIP (one A record); otherwise every healthy container of service `web` in stack `shop`, on every host, round robin |
//! | `tasks.web.shop.weft.internal`, `tasks.web.shop` | every healthy container of the service (Docker's name), in both modes |
//! | `www.shop.weft.internal`, `www.shop` | like a round-robin service: every healthy container with that alias |
//! | `web` (one label) from a container of stack `shop` | `web.shop.weft.internal` (the client's stack first) |
//! | `7.0.42.10.in-addr.arpa` PTR | `web-1.shop.weft.internal` |
//! | `9.0.43.10.in-addr.arpa` PTR (a VIP) | `web.shop.weft.internal` |
//!
//! A service is in `vip` mode when its [`ServiceRecord`] says so and has a
//! VIP; a service with no record, in `dnsrr` mode or without a VIP (the
//! service range was full) is answered by round robin, as before services
//! had records. The VIP names (and the VIP's PTR) exist while the service
//! has a container in the table; they answer the VIP alone, even if a
//! container is named like the service. A container whose [`HealthRecord`]
//! says unhealthy leaves every service answer (the round robin, `tasks.`,
//! aliases) and keeps its own names; a service name whose containers are
//! all unhealthy exists without records (NOERROR, no answer).
//!
//! Endpoints without a stack get `<name>.<domain>`, `<service>.<domain>`
//! and `tasks.<service>[.<domain>]`. Names that have names below them
//! (`shop.weft.internal`, the domain itself) exist without records
//! (NOERROR, no answer); any other name in the domain is NXDOMAIN. So is
//! any other name under the short form of a stack weft knows
//! (`nosuch.shop`): it is answered at once, never forwarded (which would be
//! slow and would leak internal names to the upstream). A stack named like
//! the domain's top label or `arpa` claims nothing short. PTR names are
//! answered for the cluster range and the service range (NXDOMAIN for
//! addresses there without a record).
//!
//! [`HealthRecord`]: weft_model::HealthRecord

mod names;
mod reverse;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};

use ipnetwork::Ipv4Network;
use rustc_hash::{FxHashMap, FxHashSet};
use weft_model::{EndpointRecord, Mode, ServiceRecord};

use crate::wire::{
    name_from_str, wire_label_count, Name, CLASS_IN, MAX_NAME_LEN, TYPE_A, TYPE_PTR, TYPE_SOA,
};
use names::{endpoint_names, service_id, ServiceId};
use reverse::ReverseZone;

/// Length of one A record written with a pointer to the question name.
pub const A_RECORD_LEN: usize = 16;

/// What a table is built with.
#[derive(Debug, Clone)]
pub struct TableConfig {
    /// The cluster domain, e.g. `weft.internal`.
    pub domain: String,
    /// TTL of every answer, and the SOA minimum (negative caching).
    pub ttl: u32,
    /// Addresses dnsd answers PTR queries for (the containers').
    pub cluster_range: Ipv4Network,
    /// The VIPs' range: dnsd answers PTR queries for these too.
    pub service_range: Ipv4Network,
}

/// One name: its addresses (sorted) and their A records.
pub struct NameEntry {
    addrs: Box<[Ipv4Addr]>,
    /// The A records of `addrs`, written twice in a row, so that every
    /// rotation is one contiguous slice.
    records: Box<[u8]>,
    next: AtomicUsize,
}

impl NameEntry {
    fn new(addrs: Vec<Ipv4Addr>, ttl: u32) -> Self {
        let mut records = Vec::with_capacity(addrs.len() * 2 * A_RECORD_LEN);
        for _ in 0..2 {
            for a in &addrs {
                records.extend_from_slice(&[0xC0, 0x0C]);
                records.extend_from_slice(&TYPE_A.to_be_bytes());
                records.extend_from_slice(&CLASS_IN.to_be_bytes());
                records.extend_from_slice(&ttl.to_be_bytes());
                records.extend_from_slice(&4u16.to_be_bytes());
                records.extend_from_slice(&a.octets());
            }
        }
        NameEntry {
            addrs: addrs.into_boxed_slice(),
            records: records.into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }

    /// The addresses, sorted.
    pub fn addrs(&self) -> &[Ipv4Addr] {
        &self.addrs
    }

    /// The A records for the next query: all of them, starting one further
    /// along each time (round robin).
    #[inline]
    pub fn rotated_records(&self) -> &[u8] {
        let n = self.addrs.len();
        if n <= 1 {
            return &self.records[..n * A_RECORD_LEN];
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        &self.records[start * A_RECORD_LEN..(start + n) * A_RECORD_LEN]
    }
}

/// The zones dnsd is authoritative for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// The cluster domain.
    Domain,
    /// The reverse zone of the cluster range.
    Reverse,
    /// The reverse zone of the service range (the VIPs).
    ServiceReverse,
}

/// What the table says about a name.
pub enum Resolution<'t> {
    /// A name with addresses.
    Addrs(&'t NameEntry),
    /// A container's address or a VIP: its PTR record (wire, pointing at
    /// the question), and the reverse zone it is in.
    Ptr(&'t [u8], Zone),
    /// The apex of a zone (SOA queries get the SOA).
    Apex(Zone),
    /// The name exists but has no records (names below it do).
    NoData(Zone),
    /// The name is in a zone of ours and does not exist.
    NxDomain(Zone),
    /// Not ours: forward it.
    External,
}

/// The lookup table.
pub struct Table {
    /// Lowercase wire-form name → entry (no addresses for empty non-terminals).
    names: FxHashMap<Box<[u8]>, NameEntry>,
    /// Wire form of each known stack's short zone (`\x04shop\x00`).
    stacks: FxHashSet<Box<[u8]>>,
    /// Client address → wire form of `<its stack>.<domain>`.
    client_suffix: FxHashMap<Ipv4Addr, Box<[u8]>>,
    /// Container address or VIP → its PTR record.
    ptr: FxHashMap<Ipv4Addr, Box<[u8]>>,
    domain: Box<[u8]>,
    domain_labels: usize,
    /// The cluster range's, then the service range's.
    reverse: [ReverseZone; 2],
    soa_domain: Box<[u8]>,
    endpoints: usize,
    vips: usize,
    revision: i64,
}

impl Table {
    /// An empty table (before the first read of the store).
    pub fn empty(cfg: &TableConfig) -> Table {
        Table::build(cfg, std::iter::empty(), 0)
    }

    /// Builds the table for `endpoints` alone (every one healthy, every
    /// service round robin): see [`Table::build_with`].
    pub fn build<'a>(
        cfg: &TableConfig,
        endpoints: impl IntoIterator<Item = &'a EndpointRecord>,
        revision: i64,
    ) -> Table {
        Table::build_with(
            cfg,
            endpoints.into_iter().map(|ep| (ep, true)),
            std::iter::empty(),
            revision,
        )
    }

    /// Builds the table for `endpoints`, each with whether it is healthy
    /// (no health record is healthy), and the `services`' records (the
    /// store snapshot at `revision`). Endpoints whose names are not valid
    /// DNS names are skipped with a warning; an invalid domain yields a
    /// table that answers nothing locally (the config is checked before,
    /// see [`crate::DnsConfig`]).
    pub fn build_with<'a>(
        cfg: &TableConfig,
        endpoints: impl IntoIterator<Item = (&'a EndpointRecord, bool)>,
        services: impl IntoIterator<Item = &'a ServiceRecord>,
        revision: i64,
    ) -> Table {
        let domain_str = cfg.domain.trim_end_matches('.').to_ascii_lowercase();
        let domain = name_from_str(&domain_str).unwrap_or_else(|| vec![0]);
        let domain_labels = wire_label_count(&domain);
        let ttl = cfg.ttl;
        // The services answered by their VIP.
        let vip_of: FxHashMap<ServiceId, Ipv4Addr> = services
            .into_iter()
            .filter(|r| r.spec.mode == Mode::Vip)
            .filter_map(|r| Some((service_id(&r.name), r.vip?)))
            .collect();

        let mut addrs: FxHashMap<Vec<u8>, Vec<Ipv4Addr>> = FxHashMap::default();
        // A service's name → its VIP; the VIP → the service's FQDN.
        let mut vip_names: FxHashMap<Vec<u8>, Ipv4Addr> = FxHashMap::default();
        let mut vip_targets: FxHashMap<Ipv4Addr, Vec<u8>> = FxHashMap::default();
        let mut client_suffix = FxHashMap::default();
        let mut stacks = FxHashSet::default();
        let mut ptr = FxHashMap::default();
        let mut count = 0;
        for (ep, healthy) in endpoints {
            let Some(names) = endpoint_names(ep, &domain_str) else {
                tracing::warn!(
                    container = %ep.container_id,
                    name = ep.name.as_deref().unwrap_or(""),
                    service = ep.service.as_deref().unwrap_or(""),
                    stack = ep.stack.as_deref().unwrap_or(""),
                    "endpoint has names that are not valid DNS names; not in DNS"
                );
                continue;
            };
            count += 1;
            let ip = ep.address.ip();
            for n in names.container {
                addrs.entry(n).or_default().push(ip);
            }
            // Service names exist while the service has a container; an
            // unhealthy one adds no address to them.
            let mut member = |list: Vec<Vec<u8>>| {
                for n in list {
                    let entry = addrs.entry(n).or_default();
                    if healthy {
                        entry.push(ip);
                    }
                }
            };
            match names.service_id.as_ref().and_then(|id| vip_of.get(id)) {
                Some(&vip) => {
                    if let Some(fqdn) = names.service.first() {
                        vip_targets.insert(vip, fqdn.clone());
                    }
                    for n in names.service {
                        vip_names.insert(n, vip);
                    }
                }
                None => member(names.service),
            }
            member(names.tasks);
            member(names.aliases);
            if let Some(s) = names.stack_suffix {
                // `<stack>.<domain>`: its first label, as a one-label name.
                let first = 1 + s[0] as usize;
                let mut zone = s[..first].to_vec();
                zone.push(0);
                stacks.insert(zone.into_boxed_slice());
                client_suffix.insert(ip, s.into_boxed_slice());
            }
            if let Some(target) = names.ptr_target {
                ptr.insert(ip, ptr_record(&target, ttl));
            }
        }
        // The VIP alone, even over a container named like the service.
        for (name, vip) in vip_names {
            addrs.insert(name, vec![vip]);
        }
        let vips = vip_targets.len();
        for (vip, target) in vip_targets {
            ptr.insert(vip, ptr_record(&target, ttl));
        }

        // A stack named like the domain's top label or `arpa` claims nothing
        // short: those names belong to the domain or the reverse zones.
        if domain_labels > 0 {
            let mut pos = 0;
            for _ in 1..domain_labels {
                pos += 1 + domain[pos] as usize;
            }
            stacks.remove(&domain[pos..]);
        }
        stacks.remove(&b"\x04arpa\x00"[..]);

        // Names in the domain that have names below them exist too.
        let mut ents: Vec<Vec<u8>> = vec![domain.clone()];
        for name in addrs.keys() {
            let labels = wire_label_count(name);
            if labels <= domain_labels || !name.ends_with(&domain) {
                continue;
            }
            let mut pos = 0;
            for _ in 0..labels - domain_labels {
                pos += 1 + name[pos] as usize;
                ents.push(name[pos..].to_vec());
            }
        }
        let mut names: FxHashMap<Box<[u8]>, NameEntry> = FxHashMap::default();
        for (name, mut list) in addrs {
            list.sort_unstable();
            list.dedup();
            names.insert(name.into_boxed_slice(), NameEntry::new(list, ttl));
        }
        for ent in ents {
            names
                .entry(ent.into_boxed_slice())
                .or_insert_with(|| NameEntry::new(Vec::new(), ttl));
        }

        let serial = (revision.max(0) as u64 & 0xFFFF_FFFF) as u32;
        let soa_domain = soa_record(&domain, &domain, ttl, serial);
        let reverse = [
            ReverseZone::new(Zone::Reverse, cfg.cluster_range, &domain, ttl, serial),
            ReverseZone::new(
                Zone::ServiceReverse,
                cfg.service_range,
                &domain,
                ttl,
                serial,
            ),
        ];
        Table {
            names,
            stacks,
            client_suffix,
            ptr,
            domain: domain.into_boxed_slice(),
            domain_labels,
            reverse,
            soa_domain,
            endpoints: count,
            vips,
            revision,
        }
    }

    /// Number of endpoints in the table.
    pub fn endpoints(&self) -> usize {
        self.endpoints
    }

    /// Number of services answered by their VIP.
    pub fn vips(&self) -> usize {
        self.vips
    }

    /// Number of names (with and without addresses).
    pub fn names(&self) -> usize {
        self.names.len()
    }

    /// The store revision the table was built from.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The SOA record of a zone, in wire form (owner name written out).
    pub fn soa(&self, zone: Zone) -> &[u8] {
        match zone {
            Zone::Domain => &self.soa_domain,
            Zone::Reverse => &self.reverse[0].soa,
            Zone::ServiceReverse => &self.reverse[1].soa,
        }
    }

    /// The addresses a dotted name has (for tests and tools).
    pub fn lookup(&self, name: &str) -> Option<&[Ipv4Addr]> {
        let wire = name_from_str(name)?;
        self.names.get(wire.as_slice()).map(|e| e.addrs())
    }

    /// What `name` (asked by `client`) is.
    pub fn resolve(&self, name: &Name, client: IpAddr) -> Resolution<'_> {
        // A single label: the client's own stack first.
        if name.label_count() == 1 {
            if let IpAddr::V4(c) = client.to_canonical() {
                if let Some(suffix) = self.client_suffix.get(&c) {
                    let label = name.label_wire(0);
                    let len = label.len() + suffix.len();
                    if len <= MAX_NAME_LEN {
                        let mut key = [0u8; MAX_NAME_LEN];
                        key[..label.len()].copy_from_slice(label);
                        key[label.len()..len].copy_from_slice(suffix);
                        if let Some(e) = self.names.get(&key[..len]) {
                            if !e.addrs.is_empty() {
                                return Resolution::Addrs(e);
                            }
                        }
                    }
                }
            }
        }
        if let Some(e) = self.names.get(name.wire()) {
            if !e.addrs.is_empty() {
                return Resolution::Addrs(e);
            }
            if name.wire() == &*self.domain {
                return Resolution::Apex(Zone::Domain);
            }
            return Resolution::NoData(Zone::Domain);
        }
        if name.is_at_or_under(&self.domain, self.domain_labels) {
            return Resolution::NxDomain(Zone::Domain);
        }
        let n = name.label_count();
        if n >= 2 && self.stacks.contains(name.suffix(n - 1)) {
            return Resolution::NxDomain(Zone::Domain);
        }
        reverse::resolve(&self.reverse, &self.ptr, name)
    }
}

fn ptr_record(target: &[u8], ttl: u32) -> Box<[u8]> {
    let mut r = Vec::with_capacity(12 + target.len());
    r.extend_from_slice(&[0xC0, 0x0C]);
    r.extend_from_slice(&TYPE_PTR.to_be_bytes());
    r.extend_from_slice(&CLASS_IN.to_be_bytes());
    r.extend_from_slice(&ttl.to_be_bytes());
    r.extend_from_slice(&(target.len() as u16).to_be_bytes());
    r.extend_from_slice(target);
    r.into_boxed_slice()
}

/// `<zone> SOA ns.<domain> hostmaster.<domain> serial 3600 600 86400 <ttl>`
/// with TTL `ttl`: the minimum is the TTL, so negative answers are cached
/// no longer than positive ones.
fn soa_record(zone: &[u8], domain: &[u8], ttl: u32, serial: u32) -> Box<[u8]> {
    let mut rdata = Vec::new();
    rdata.extend_from_slice(b"\x02ns");
    rdata.extend_from_slice(domain);
    rdata.extend_from_slice(b"\x0ahostmaster");
    rdata.extend_from_slice(domain);
    for v in [serial, 3600, 600, 86400, ttl] {
        rdata.extend_from_slice(&v.to_be_bytes());
    }
    let mut r = Vec::with_capacity(zone.len() + 10 + rdata.len());
    r.extend_from_slice(zone);
    r.extend_from_slice(&TYPE_SOA.to_be_bytes());
    r.extend_from_slice(&CLASS_IN.to_be_bytes());
    r.extend_from_slice(&ttl.to_be_bytes());
    r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    r.extend_from_slice(&rdata);
    r.into_boxed_slice()
}

#[cfg(test)]
pub(crate) mod tests;
