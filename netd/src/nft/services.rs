//! The services' load balancing in the kernel: [`compile`] turns the
//! service records, every endpoint record of the cluster and the health
//! records into `table ip weft_svc`, which sends a connection to a
//! service's virtual IP to one of its healthy containers (DNAT, on the
//! client's host; conntrack keeps the connection on the backend it got).
//!
//! ```text
//! map vips  { type ipv4_addr : verdict }            # VIP -> goto pick-<how>
//! map slots { typeof ip daddr . numgen random mod 60 : ip daddr }
//!                                                   # VIP . slot (0..59) -> backend
//! set hairpin { type ipv4_addr . ipv4_addr }        # backend . backend
//! set dead  { type ipv4_addr }                      # VIPs without a healthy backend
//! chain pick-random   { dnat to ip daddr . numgen random mod 60 map @slots }
//! chain pick-hash     { dnat to ip daddr . symhash mod 60 map @slots }      # of the flow
//! chain pick-affinity { dnat to ip daddr . jhash ip saddr mod 60 seed S map @slots }
//! chain prerouting { type nat hook prerouting priority dstnat; ip daddr vmap @vips }
//! chain output     { type nat hook output priority -100; ip daddr vmap @vips }
//! chain postrouting { type nat hook postrouting priority srcnat;
//!   ct status dnat ip saddr . ip daddr @hairpin masquerade }   # a backend reached itself
//! chain forward { type filter hook forward priority filter;  # and output_filter
//!   ip daddr <service range> meta l4proto tcp reject with tcp reset
//!   ip daddr @dead reject                                  # no healthy backend: port unreachable
//!   ip daddr <service range> reject with icmp type admin-prohibited }  # no such VIP
//! ```
//!
//! Every VIP has [`SLOTS`] slots, slot `i` holding backend `i mod n` of its
//! `n` backends (sorted), so a pick is uniform when `n` divides 60 (1-6,
//! 10, 12, 15, 20, 30, 60) and within a few percent otherwise (7
//! backends: 9 or 8 slots each). The table's chains and rules are fixed;
//! services and backends are only elements of named maps and sets. A change
//! is a few element changes ([`crate::nft::Table::update`]) and a whole load
//! is linear in the elements: per-service chains with an anonymous vmap each
//! cost the kernel quadratic time to load (`__nft_set_trans_bind` walks the
//! transaction for every anonymous set: 245 s for 10,000 services of 10
//! backends, and a change 505 s; this layout loads them in ~9 s and changes
//! one backend in ~30 ms of `nft`).
//!
//! A live VIP never reaches the filter hooks (DNAT changed the
//! destination before them), so what is left of the service range there is
//! refused at once rather than black-holed: TCP with a reset, the rest with
//! ICMP port unreachable when the VIP has no healthy backend and
//! administratively prohibited when the address is no VIP.
//!
//! Per new connection this is one map lookup and one hash or random number,
//! whatever the number of services and containers (kube-proxy's nftables
//! mode does the same; there is no IPVS here); later packets of the
//! connection pass only conntrack. Traffic to any port of a VIP, TCP, UDP
//! and ICMP alike, is DNATed with its port unchanged.
//!
//! A backend is a container of the service ([`ServiceName::of`] its
//! endpoint record, on any host) whose health record is absent or healthy
//! ([`backends`]). A service in `dnsrr` mode or without a VIP gets nothing
//! here.
//!
//! Hairpin: a container that reaches its own service's VIP and is balanced
//! to itself would get a packet from its own address; postrouting
//! masquerades a DNATed packet whose source and destination are the same
//! backend (the `hairpin` set), so the answer comes back through the host
//! and conntrack undoes both translations.
//!
//! Policy ([`crate::nft::policy`]) applies after DNAT by itself: the
//! forward hook of `table inet weft` (priority filter) sees the backend's
//! address.
//!
//! What [`compile`] returns also says which backends each VIP had, so the
//! follower ([`crate::services::lb`]) can delete the UDP conntrack entries
//! of flows to a VIP answered by a backend that left ([`removed`]; TCP is
//! left to fail or finish by itself).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use weft_model::{Balance, EndpointRecord, HealthRecord, Keys, Mode, ServiceName, ServiceRecord};

use super::table::{Set, Table};
use super::SERVICES_TABLE;

/// Slots per VIP: backends are spread over them (see the module docs).
pub const SLOTS: u32 = 60;

/// The seed of the affinity hash: fixed, so a client keeps its slot (and
/// its backend, while the backends stay) when the table is written again.
const AFFINITY_SEED: u32 = 0x7765_6674;

/// What [`compile`] works from.
#[derive(Debug, Clone, Copy)]
pub struct ServicesInput<'a> {
    /// Every service record.
    pub services: &'a [ServiceRecord],
    /// Every endpoint record of the cluster.
    pub endpoints: &'a [EndpointRecord],
    /// Every health record, by store key ([`Keys::health_of`]).
    pub health: &'a BTreeMap<String, HealthRecord>,
    /// Where the health records live.
    pub keys: &'a Keys,
    /// The cluster's service range: an address in it that is no VIP with a
    /// backend is refused.
    pub service_range: Ipv4Network,
}

/// The table and, per VIP, the backends it balances over (for [`removed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// `table ip weft_svc`.
    pub table: Table,
    /// VIP -> its backends' addresses, sorted (empty: the VIP is dead).
    pub backends: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
}

/// Whether the container of `record` may take traffic, by its record in
/// `health` ([`HealthRecord::is_healthy`]).
pub fn healthy(
    record: &EndpointRecord,
    health: &BTreeMap<String, HealthRecord>,
    keys: &Keys,
) -> bool {
    let key = keys.health_of(
        record.host_id.as_str(),
        record.container_id.as_str(),
        record.ifname.as_str(),
    );
    HealthRecord::is_healthy(health.get(&key))
}

/// The backends of every service with a VIP in `vip` mode: the addresses
/// of its healthy containers on every host, sorted, each once.
pub fn backends(input: &ServicesInput<'_>) -> BTreeMap<Ipv4Addr, Vec<Ipv4Addr>> {
    let mut by_name: BTreeMap<ServiceName, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for r in input.endpoints {
        if let Some(name) = ServiceName::of(r) {
            if healthy(r, input.health, input.keys) {
                by_name.entry(name).or_default().insert(r.address.ip());
            }
        }
    }
    let mut out = BTreeMap::new();
    for s in input.services {
        let Some(vip) = s.vip.filter(|_| s.spec.mode == Mode::Vip) else {
            continue;
        };
        let addrs = by_name.get(&s.name).map(|a| a.iter().copied().collect());
        out.insert(vip, addrs.unwrap_or_default());
    }
    out
}

/// The chain a VIP of `spec` goes to: how its new connections pick a slot.
fn pick_chain(spec: &ServiceRecord) -> &'static str {
    match (spec.spec.affinity, spec.spec.balance) {
        (true, _) => "pick-affinity",
        (false, Balance::Random) => "pick-random",
        (false, Balance::Hash) => "pick-hash",
    }
}

/// The key of slot `i` of `vip` in the `slots` map.
fn slot_key(vip: Ipv4Addr, i: u32) -> String {
    format!("{vip} . {i}")
}

/// `nft get element ip weft_svc slots { ... }`'s argument for every slot of
/// `vip` (what tools and the bench ask the kernel to see a VIP's backends).
pub fn slot_query(vip: Ipv4Addr) -> String {
    let keys: Vec<String> = (0..SLOTS).map(|i| slot_key(vip, i)).collect();
    format!("{{ {} }}", keys.join(", "))
}

/// The backends named in an `nft get element` / `nft list` output of the
/// `slots` map (the addresses after ` : `).
pub fn backends_listed(text: &str) -> BTreeSet<Ipv4Addr> {
    text.split(" : ")
        .skip(1)
        .filter_map(|rest| {
            let addr: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            addr.parse().ok()
        })
        .collect()
}

/// The services' table for `input`: see the module docs.
pub fn compile(input: &ServicesInput<'_>) -> Compiled {
    let backends = backends(input);
    let specs: BTreeMap<Ipv4Addr, &ServiceRecord> = input
        .services
        .iter()
        .filter_map(|s| Some((s.vip?, s)))
        .collect();
    let mut t = Table::named("ip", SERVICES_TABLE);
    let mut vips = Set::new("vips", "ipv4_addr : verdict");
    let mut slots = Set::new(
        "slots",
        format!("typeof ip daddr . numgen random mod {SLOTS} : ip daddr"),
    );
    let mut hairpin = Set::new("hairpin", "ipv4_addr . ipv4_addr");
    let mut dead = Set::new("dead", "ipv4_addr");
    for (vip, addrs) in &backends {
        if addrs.is_empty() {
            dead.add(vip.to_string());
            continue;
        }
        let Some(s) = specs.get(vip) else { continue };
        vips.map(vip.to_string(), format!("goto {}", pick_chain(s)));
        for i in 0..SLOTS {
            let a = addrs[i as usize % addrs.len()];
            slots.map(slot_key(*vip, i), a.to_string());
        }
        for a in addrs {
            hairpin.add(format!("{a} . {a}"));
        }
    }
    t.sets = vec![vips, slots, hairpin, dead];
    t.chain(
        "pick-random",
        [format!(
            "dnat to ip daddr . numgen random mod {SLOTS} map @slots"
        )],
    );
    t.chain(
        "pick-hash",
        [format!("dnat to ip daddr . symhash mod {SLOTS} map @slots")],
    );
    t.chain(
        "pick-affinity",
        [format!(
            "dnat to ip daddr . jhash ip saddr mod {SLOTS} seed {AFFINITY_SEED:#010x} map @slots"
        )],
    );
    let dnat = "ip daddr vmap @vips";
    t.chain(
        "prerouting",
        [
            "type nat hook prerouting priority dstnat; policy accept;",
            dnat,
        ],
    );
    // nft 1.0 knows `dstnat` for prerouting only; -100 is its value.
    t.chain(
        "output",
        ["type nat hook output priority -100; policy accept;", dnat],
    );
    t.chain(
        "postrouting",
        [
            "type nat hook postrouting priority srcnat; policy accept;",
            "ct status dnat ip saddr . ip daddr @hairpin masquerade",
        ],
    );
    // UDP ignores a host or network unreachable (a soft error): an
    // address without a VIP gets administratively prohibited, which UDP
    // too takes as final (EHOSTUNREACH).
    let range = input.service_range;
    let refuse = [
        format!("ip daddr {range} meta l4proto tcp reject with tcp reset"),
        "ip daddr @dead reject".to_owned(),
        format!("ip daddr {range} reject with icmp type admin-prohibited"),
    ];
    for (name, hook) in [("forward", "forward"), ("output_filter", "output")] {
        let mut lines = vec![format!(
            "type filter hook {hook} priority filter; policy accept;"
        )];
        lines.extend(refuse.iter().cloned());
        t.chain(name, lines);
    }
    Compiled { table: t, backends }
}

/// The (VIP, backend) pairs `old` balanced over that `new` does not: the
/// UDP flows to each VIP answered by that backend should go (their next
/// packet then picks a backend that is there).
pub fn removed(old: &Compiled, new: &Compiled) -> Vec<(Ipv4Addr, Ipv4Addr)> {
    let mut out = Vec::new();
    for (vip, was) in &old.backends {
        let now = new.backends.get(vip);
        for b in was {
            if !now.is_some_and(|n| n.contains(b)) {
                out.push((*vip, *b));
            }
        }
    }
    out
}

#[cfg(test)]
#[path = "services_tests.rs"]
mod tests;
