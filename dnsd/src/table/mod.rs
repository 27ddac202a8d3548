//! The lookup table: every name dnsd answers for, built from the endpoints in
//! the store, with its answer records already in wire form.
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
//! | `web.shop.weft.internal`, `web.shop` | every running container of service `web` in stack `shop`, on every host |
//! | `www.shop.weft.internal`, `www.shop` | like a service: every container with that alias |
//! | `web` (one label) from a container of stack `shop` | `web.shop.weft.internal` (the client's stack first) |
//! | `7.0.42.10.in-addr.arpa` PTR | `web-1.shop.weft.internal` |
//!
//! Endpoints without a stack get `<name>.<domain>` and `<service>.<domain>`.
//! Names that have names below them (`shop.weft.internal`, the domain
//! itself) exist without records (NOERROR, no answer); any other name in the
//! domain is NXDOMAIN. So is any other name under the short form of a stack
//! weft knows (`nosuch.shop`): it is answered at once, never forwarded (which
//! would be slow and would leak internal names to the upstream). A stack
//! named like the domain's top label or `arpa` claims nothing short.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};

use ipnetwork::Ipv4Network;
use rustc_hash::FxHashMap;
use weft_model::EndpointRecord;

use crate::wire::{
    name_from_str, wire_label_count, Name, CLASS_IN, MAX_NAME_LEN, TYPE_A, TYPE_PTR, TYPE_SOA,
};

/// Length of one A record written with a pointer to the question name.
pub const A_RECORD_LEN: usize = 16;

/// What a table is built with.
#[derive(Debug, Clone)]
pub struct TableConfig {
    /// The cluster domain, e.g. `weft.internal`.
    pub domain: String,
    /// TTL of every answer, and the SOA minimum (negative caching).
    pub ttl: u32,
    /// Addresses dnsd answers PTR queries for.
    pub cluster_range: Ipv4Network,
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
}

/// What the table says about a name.
pub enum Resolution<'t> {
    /// A name with addresses.
    Addrs(&'t NameEntry),
    /// A cluster address: its PTR record (wire, pointing at the question).
    Ptr(&'t [u8]),
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
    stacks: rustc_hash::FxHashSet<Box<[u8]>>,
    /// Client address → wire form of `<its stack>.<domain>`.
    client_suffix: FxHashMap<Ipv4Addr, Box<[u8]>>,
    /// Cluster address → its PTR record.
    ptr: FxHashMap<Ipv4Addr, Box<[u8]>>,
    domain: Box<[u8]>,
    domain_labels: usize,
    reverse_zone: Box<[u8]>,
    reverse_labels: usize,
    /// Whether the cluster range is a whole reverse zone (prefix a multiple of 8).
    reverse_exact: bool,
    cluster: Ipv4Network,
    soa_domain: Box<[u8]>,
    soa_reverse: Box<[u8]>,
    endpoints: usize,
    revision: i64,
}

const IN_ADDR_ARPA: &[u8] = b"\x07in-addr\x04arpa\x00";

impl Table {
    /// An empty table (before the first read of the store).
    pub fn empty(cfg: &TableConfig) -> Table {
        Table::build(cfg, std::iter::empty(), 0)
    }

    /// Builds the table for `endpoints` (the store snapshot at `revision`).
    /// Endpoints whose names are not valid DNS names are skipped with a
    /// warning; an invalid domain yields a table that answers nothing
    /// locally (the config is checked before, see [`crate::DnsConfig`]).
    pub fn build<'a>(
        cfg: &TableConfig,
        endpoints: impl IntoIterator<Item = &'a EndpointRecord>,
        revision: i64,
    ) -> Table {
        let domain_str = cfg.domain.trim_end_matches('.').to_ascii_lowercase();
        let domain = name_from_str(&domain_str).unwrap_or_else(|| vec![0]);
        let domain_labels = wire_label_count(&domain);
        let (reverse_zone, reverse_exact) = reverse_zone(cfg.cluster_range);
        let reverse_labels = wire_label_count(&reverse_zone);
        let ttl = cfg.ttl;

        let mut addrs: FxHashMap<Vec<u8>, Vec<Ipv4Addr>> = FxHashMap::default();
        let mut client_suffix = FxHashMap::default();
        let mut stacks = rustc_hash::FxHashSet::default();
        let mut ptr = FxHashMap::default();
        let mut count = 0;
        for ep in endpoints {
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
            for n in names.names {
                addrs.entry(n).or_default().push(ip);
            }
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
        let soa_reverse = soa_record(&reverse_zone, &domain, ttl, serial);
        Table {
            names,
            stacks,
            client_suffix,
            ptr,
            domain: domain.into_boxed_slice(),
            domain_labels,
            reverse_zone: reverse_zone.into_boxed_slice(),
            reverse_labels,
            reverse_exact,
            cluster: cfg.cluster_range,
            soa_domain,
            soa_reverse,
            endpoints: count,
            revision,
        }
    }

    /// Number of endpoints in the table.
    pub fn endpoints(&self) -> usize {
        self.endpoints
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
            Zone::Reverse => &self.soa_reverse,
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
        self.resolve_reverse(name)
    }

    fn resolve_reverse(&self, name: &Name) -> Resolution<'_> {
        let n = name.label_count();
        if n < 2 || name.suffix(n - 2) != IN_ADDR_ARPA {
            return Resolution::External;
        }
        let in_zone =
            self.reverse_exact && name.is_at_or_under(&self.reverse_zone, self.reverse_labels);
        if n == 6 {
            if let Some(ip) = reverse_address(name) {
                if self.cluster.contains(ip) {
                    return match self.ptr.get(&ip) {
                        Some(rec) => Resolution::Ptr(rec),
                        None => Resolution::NxDomain(Zone::Reverse),
                    };
                }
            }
            return if in_zone {
                Resolution::NxDomain(Zone::Reverse)
            } else {
                Resolution::External
            };
        }
        if !in_zone {
            return Resolution::External;
        }
        if n == self.reverse_labels {
            return Resolution::Apex(Zone::Reverse);
        }
        if n < 6 && (0..n - 2).all(|i| octet(name.label(i)).is_some()) {
            Resolution::NoData(Zone::Reverse)
        } else {
            Resolution::NxDomain(Zone::Reverse)
        }
    }
}

/// The names of one endpoint (lowercase wire form).
struct EndpointNames {
    names: Vec<Vec<u8>>,
    /// `<stack>.<domain>` for single-label queries from this endpoint.
    stack_suffix: Option<Vec<u8>>,
    ptr_target: Option<Vec<u8>>,
}

fn endpoint_names(ep: &EndpointRecord, domain: &str) -> Option<EndpointNames> {
    let lower = |s: Option<&str>| {
        s.map(|s| s.trim_end_matches('.').to_ascii_lowercase())
            .filter(|s| !s.is_empty())
    };
    let stack = lower(ep.stack.as_deref());
    // Without a name, the short container id (as docker shows it).
    let cname = lower(ep.name.as_deref()).or_else(|| {
        let short: String = ep.container_id.chars().take(12).collect();
        name_from_str(&short).map(|_| short.to_ascii_lowercase())
    });
    let mut texts: Vec<String> = Vec::new();
    let mut ptr = None;
    if let Some(c) = &cname {
        match &stack {
            Some(s) => {
                texts.push(format!("{c}.{s}.{domain}"));
                texts.push(format!("{c}.{s}"));
                ptr = Some(format!("{c}.{s}.{domain}"));
            }
            None => ptr = Some(format!("{c}.{domain}")),
        }
        texts.push(format!("{c}.{domain}"));
        texts.push(c.clone());
    }
    let services = lower(ep.service.as_deref()).into_iter().chain(
        ep.aliases
            .iter()
            .map(|a| a.trim_end_matches('.').to_ascii_lowercase()),
    );
    for svc in services {
        match &stack {
            Some(s) => {
                texts.push(format!("{svc}.{s}.{domain}"));
                texts.push(format!("{svc}.{s}"));
            }
            None => {
                texts.push(format!("{svc}.{domain}"));
                texts.push(svc);
            }
        }
    }
    let mut names = Vec::with_capacity(texts.len());
    for t in &texts {
        names.push(name_from_str(t)?);
    }
    names.sort();
    names.dedup();
    let stack_suffix = match &stack {
        Some(s) => Some(name_from_str(&format!("{s}.{domain}"))?),
        None => None,
    };
    let ptr_target = match ptr {
        Some(p) => Some(name_from_str(&p)?),
        None => None,
    };
    Some(EndpointNames {
        names,
        stack_suffix,
        ptr_target,
    })
}

/// The reverse zone of a range (`10.42.0.0/16` → `42.10.in-addr.arpa`),
/// rounded to whole octets, and whether the range is exactly that zone.
fn reverse_zone(range: Ipv4Network) -> (Vec<u8>, bool) {
    let octets = (range.prefix() / 8) as usize;
    let ip = range.network().octets();
    let mut text = String::new();
    for o in ip[..octets].iter().rev() {
        text.push_str(&format!("{o}."));
    }
    text.push_str("in-addr.arpa");
    let wire = name_from_str(&text).unwrap_or_else(|| IN_ADDR_ARPA.to_vec());
    (wire, range.prefix().is_multiple_of(8))
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
pub(crate) mod tests {
    use super::*;
    use crate::wire::parse_query;

    pub(crate) fn endpoint(
        id: &str,
        ip: &str,
        name: Option<&str>,
        service: Option<&str>,
        stack: Option<&str>,
        aliases: &[&str],
    ) -> EndpointRecord {
        let v = serde_json::json!({
            "container_id": id,
            "ifname": "eth0",
            "netns": "",
            "host_id": "h0",
            "address": format!("{ip}/24"),
            "gateway": "10.42.0.1",
            "mtu": 1420,
            "bridge": "weft0",
            "name": name,
            "service": service,
            "stack": stack,
            "aliases": aliases,
            "dns": {"nameservers": ["169.254.169.250"], "domain": "weft.internal", "search": []},
            "created_at_ms": 0
        });
        match serde_json::from_value(v) {
            Ok(e) => e,
            Err(e) => panic!("bad test endpoint: {e}"),
        }
    }

    pub(crate) fn cfg() -> TableConfig {
        TableConfig {
            domain: "weft.internal".into(),
            ttl: 1,
            cluster_range: "10.42.0.0/16".parse().unwrap(),
        }
    }

    pub(crate) fn sample() -> Vec<EndpointRecord> {
        vec![
            endpoint(
                "c1",
                "10.42.0.2",
                Some("web-1"),
                Some("web"),
                Some("shop"),
                &["www"],
            ),
            endpoint(
                "c2",
                "10.42.1.2",
                Some("web-2"),
                Some("Web"),
                Some("SHOP"),
                &[],
            ),
            endpoint(
                "c3",
                "10.42.0.3",
                Some("db-1"),
                Some("db"),
                Some("shop"),
                &[],
            ),
            endpoint(
                "c4",
                "10.42.1.3",
                Some("web-1"),
                Some("web"),
                Some("blog"),
                &[],
            ),
            endpoint("0123456789abcdef", "10.42.0.9", None, None, None, &[]),
        ]
    }

    fn q(name: &str) -> Name {
        let mut p = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            p.push(label.len() as u8);
            p.extend(label.as_bytes());
        }
        p.extend([0, 0, 1, 0, 1]);
        parse_query(&p).unwrap().name
    }

    fn addrs(t: &Table, name: &str, client: &str) -> Option<Vec<String>> {
        match t.resolve(&q(name), client.parse().unwrap()) {
            Resolution::Addrs(e) => Some(e.addrs().iter().map(|a| a.to_string()).collect()),
            _ => None,
        }
    }

    const OUTSIDE: &str = "127.0.0.1";

    #[test]
    fn names_services_stacks_aliases_and_case() {
        let eps = sample();
        let t = Table::build(&cfg(), &eps, 7);
        assert_eq!(t.endpoints(), 5);
        assert_eq!(t.revision(), 7);
        let both = Some(vec!["10.42.0.2".to_string(), "10.42.1.2".to_string()]);
        assert_eq!(addrs(&t, "web.shop.weft.internal", OUTSIDE), both);
        assert_eq!(addrs(&t, "WEB.Shop.Weft.Internal", OUTSIDE), both);
        assert_eq!(addrs(&t, "web.shop", OUTSIDE), both);
        assert_eq!(
            addrs(&t, "web-1.shop.weft.internal", OUTSIDE),
            Some(vec!["10.42.0.2".into()])
        );
        assert_eq!(
            addrs(&t, "web-1.blog", OUTSIDE),
            Some(vec!["10.42.1.3".into()])
        );
        // The alias resolves like the service name.
        assert_eq!(
            addrs(&t, "www.shop.weft.internal", OUTSIDE),
            Some(vec!["10.42.0.2".into()])
        );
        assert_eq!(
            addrs(&t, "www.shop", OUTSIDE),
            Some(vec!["10.42.0.2".into()])
        );
        // Bare container names are global (both web-1s).
        assert_eq!(
            addrs(&t, "web-1", OUTSIDE),
            Some(vec!["10.42.0.2".into(), "10.42.1.3".into()])
        );
        assert_eq!(
            addrs(&t, "web-1.weft.internal", OUTSIDE),
            addrs(&t, "web-1", OUTSIDE)
        );
        // A bare service name from a container of stack shop: its stack.
        assert_eq!(addrs(&t, "web", "10.42.0.3"), both);
        assert_eq!(addrs(&t, "db", "10.42.1.2"), Some(vec!["10.42.0.3".into()]));
        // ... and from stack blog, blog's.
        assert_eq!(
            addrs(&t, "web", "10.42.1.3"),
            Some(vec!["10.42.1.3".into()])
        );
        // A bare container name from a stack prefers the client's stack.
        assert_eq!(
            addrs(&t, "web-1", "10.42.1.3"),
            Some(vec!["10.42.1.3".into()])
        );
        // From outside any stack, a bare service name is not ours.
        assert!(matches!(
            t.resolve(&q("web"), OUTSIDE.parse().unwrap()),
            Resolution::External
        ));
        // Without a name: the short container id; without a stack: <name>.<domain>.
        assert_eq!(
            addrs(&t, "0123456789ab.weft.internal", OUTSIDE),
            Some(vec!["10.42.0.9".into()])
        );
        assert_eq!(
            t.lookup("db.shop.weft.internal"),
            Some(&["10.42.0.3".parse().unwrap()][..])
        );
    }

    #[test]
    fn nxdomain_nodata_apex_and_external() {
        let eps = sample();
        let t = Table::build(&cfg(), &eps, 1);
        let c: IpAddr = OUTSIDE.parse().unwrap();
        assert!(matches!(
            t.resolve(&q("nope.shop.weft.internal"), c),
            Resolution::NxDomain(Zone::Domain)
        ));
        assert!(matches!(
            t.resolve(&q("nope.weft.internal"), c),
            Resolution::NxDomain(Zone::Domain)
        ));
        assert!(matches!(
            t.resolve(&q("shop.weft.internal"), c),
            Resolution::NoData(Zone::Domain)
        ));
        assert!(matches!(
            t.resolve(&q("weft.internal"), c),
            Resolution::Apex(Zone::Domain)
        ));
        assert!(matches!(
            t.resolve(&q("example.com"), c),
            Resolution::External
        ));
        assert!(matches!(t.resolve(&q("internal"), c), Resolution::External));
        // Under the short form of a known stack: ours, answered at once.
        assert!(matches!(
            t.resolve(&q("nosuch.shop"), c),
            Resolution::NxDomain(Zone::Domain)
        ));
        assert!(matches!(
            t.resolve(&q("a.b.shop"), c),
            Resolution::NxDomain(Zone::Domain)
        ));
        assert!(matches!(t.resolve(&q("web.shop"), c), Resolution::Addrs(_)));
        // The stack's bare name and unknown stacks stay external.
        assert!(matches!(t.resolve(&q("shop"), c), Resolution::External));
        let mut odd = sample();
        odd[0].stack = Some("internal".parse().unwrap());
        odd[1].stack = Some("arpa".parse().unwrap());
        let t = Table::build(&cfg(), &odd, 1);
        assert!(matches!(
            t.resolve(&q("nosuch.internal"), c),
            Resolution::External
        ));
        assert!(matches!(
            t.resolve(&q("9.9.in-addr.arpa"), c),
            Resolution::External
        ));
        assert!(matches!(
            t.resolve(&q("nosuch.nostack"), c),
            Resolution::External
        ));
    }

    #[test]
    fn ptr_for_cluster_addresses() {
        let eps = sample();
        let t = Table::build(&cfg(), &eps, 1);
        let c: IpAddr = OUTSIDE.parse().unwrap();
        match t.resolve(&q("2.0.42.10.in-addr.arpa"), c) {
            Resolution::Ptr(rec) => {
                assert!(rec.ends_with(b"\x05web-1\x04shop\x04weft\x08internal\x00"))
            }
            _ => panic!("no PTR"),
        }
        match t.resolve(&q("9.0.42.10.IN-ADDR.ARPA"), c) {
            Resolution::Ptr(rec) => {
                assert!(rec.ends_with(b"\x0c0123456789ab\x04weft\x08internal\x00"))
            }
            _ => panic!("no PTR"),
        }
        assert!(matches!(
            t.resolve(&q("77.0.42.10.in-addr.arpa"), c),
            Resolution::NxDomain(Zone::Reverse)
        ));
        assert!(matches!(
            t.resolve(&q("0.42.10.in-addr.arpa"), c),
            Resolution::NoData(Zone::Reverse)
        ));
        assert!(matches!(
            t.resolve(&q("42.10.in-addr.arpa"), c),
            Resolution::Apex(Zone::Reverse)
        ));
        assert!(matches!(
            t.resolve(&q("x.2.0.42.10.in-addr.arpa"), c),
            Resolution::NxDomain(Zone::Reverse)
        ));
        // Outside the cluster range: forwarded.
        assert!(matches!(
            t.resolve(&q("1.1.168.192.in-addr.arpa"), c),
            Resolution::External
        ));
        assert!(matches!(
            t.resolve(&q("1.0.43.10.in-addr.arpa"), c),
            Resolution::External
        ));
    }

    #[test]
    fn non_octet_cluster_range() {
        let cfg = TableConfig {
            cluster_range: "10.40.0.0/13".parse().unwrap(),
            ..cfg()
        };
        let eps = sample();
        let t = Table::build(&cfg, &eps, 1);
        let c: IpAddr = OUTSIDE.parse().unwrap();
        assert!(matches!(
            t.resolve(&q("2.0.42.10.in-addr.arpa"), c),
            Resolution::Ptr(_)
        ));
        assert!(matches!(
            t.resolve(&q("2.0.41.10.in-addr.arpa"), c),
            Resolution::NxDomain(Zone::Reverse)
        ));
        // 10.50.x is outside 10.40.0.0/13 though inside 10.in-addr.arpa.
        assert!(matches!(
            t.resolve(&q("2.0.50.10.in-addr.arpa"), c),
            Resolution::External
        ));
        assert!(matches!(
            t.resolve(&q("42.10.in-addr.arpa"), c),
            Resolution::External
        ));
        assert!(t
            .soa(Zone::Reverse)
            .starts_with(b"\x0210\x07in-addr\x04arpa\x00"));
    }

    #[test]
    fn round_robin_rotates_every_query() {
        let eps: Vec<EndpointRecord> = (2..6)
            .map(|i| {
                endpoint(
                    &format!("c{i}"),
                    &format!("10.42.0.{i}"),
                    None,
                    Some("s"),
                    Some("k"),
                    &[],
                )
            })
            .collect();
        let t = Table::build(&cfg(), &eps, 1);
        let c: IpAddr = OUTSIDE.parse().unwrap();
        let Resolution::Addrs(e) = t.resolve(&q("s.k"), c) else {
            panic!("s.k unknown");
        };
        let mut firsts = Vec::new();
        for _ in 0..8 {
            let recs = e.rotated_records();
            assert_eq!(recs.len(), 4 * A_RECORD_LEN);
            firsts.push(recs[A_RECORD_LEN - 1]);
            // Every rotation holds every address once.
            let mut last: Vec<u8> = recs.chunks(A_RECORD_LEN).map(|r| r[15]).collect();
            last.sort();
            assert_eq!(last, vec![2, 3, 4, 5]);
        }
        assert_eq!(firsts, vec![2, 3, 4, 5, 2, 3, 4, 5]);
    }

    #[test]
    fn invalid_names_are_skipped() {
        // A record with a name that breaks the DNS name rule does not even
        // parse (sync ignores it, with a warning).
        let bad = serde_json::json!({
            "container_id": "c0", "ifname": "eth0", "netns": "", "host_id": "h0",
            "address": "10.42.0.9/24", "gateway": "10.42.0.1", "mtu": 1420,
            "bridge": "weft0", "name": "bad name",
            "dns": {"nameservers": [], "domain": "weft.internal", "search": []},
            "created_at_ms": 0
        });
        assert!(serde_json::from_value::<EndpointRecord>(bad).is_err());
        // Names that are valid alone but too long together with the stack
        // and the domain (over 253 bytes) leave the endpoint out.
        let long_stack = format!("{}.{}.{}", "b".repeat(63), "c".repeat(63), "d".repeat(63));
        let eps = vec![
            endpoint(
                "c1",
                "10.42.0.2",
                Some(&"a".repeat(63)),
                Some("web"),
                Some(&long_stack),
                &[],
            ),
            endpoint(
                "c2",
                "10.42.0.3",
                Some("ok"),
                Some("web"),
                Some("shop"),
                &[],
            ),
        ];
        let t = Table::build(&cfg(), &eps, 1);
        assert_eq!(t.endpoints(), 1);
        assert_eq!(
            t.lookup("web.shop"),
            Some(&["10.42.0.3".parse().unwrap()][..])
        );
    }
}
