//! The services' load balancing in the kernel: [`compile`] turns the
//! service records, every endpoint record of the cluster and the health
//! records into `table ip weft_svc`, which sends a connection to a
//! service's virtual IP to one of its healthy containers (DNAT, on the
//! client's host; conntrack keeps the connection on the backend it got).
//!
//! ```text
//! map vips { type ipv4_addr : verdict }        # VIP -> goto svc-<vip>
//! set dead { type ipv4_addr }                  # VIPs without a healthy backend
//! chain be-<addr> {                            # one per backend, named by address
//!   ip saddr <addr> meta mark set meta mark | 0x00200000   # hairpin: it reaches itself
//!   dnat to <addr> }
//! chain svc-<vip> {                            # one per VIP with backends, one of:
//!   numgen random mod N vmap { 0 : goto be-<a>, ... }      # balance random
//!   symhash mod N vmap { ... }                             # balance hash (of the flow)
//!   jhash ip saddr mod N seed <vip> vmap { ... } }         # affinity (by client address)
//! chain prerouting { type nat hook prerouting priority dstnat; ip daddr vmap @vips }
//! chain output     { type nat hook output priority -100; ip daddr vmap @vips }
//! chain postrouting { type nat hook postrouting priority srcnat;
//!   meta mark & 0x00200000 == 0x00200000 masquerade }     # hairpin
//! chain forward { type filter hook forward priority filter;  # and output_filter
//!   ip daddr <service range> meta l4proto tcp reject with tcp reset
//!   ip daddr @dead reject                                  # no healthy backend: port unreachable
//!   ip daddr <service range> reject with icmp type admin-prohibited }  # no such VIP
//! ```
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
//! here. Chains are named by address, so they keep their names while
//! backends come and go: a change rewrites the svc chain of the VIP it
//! touches, adds or deletes a be chain and changes map and set elements,
//! one small transaction ([`crate::nft::Table::update`]).
//!
//! Hairpin: a container that reaches its own service's VIP and is balanced
//! to itself would get a packet from its own address; the be chain marks
//! such a packet (bit [`HAIRPIN_MARK`]) and postrouting masquerades it (the
//! source becomes the bridge's gateway address), so the answer comes back
//! through the host and conntrack undoes both translations.
//!
//! Policy ([`crate::nft::policy`]) applies after DNAT by itself: the
//! forward hook of `table inet weft` (priority filter) sees the backend's
//! address. The mark is only a packet mark, used between the nat hooks of
//! one packet: weft uses no other mark.
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

/// The packet mark bit that asks postrouting to masquerade (hairpin).
pub const HAIRPIN_MARK: u32 = 0x0020_0000;

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

/// `10.42.0.5` -> `10-42-0-5` (chain names).
fn dashed(a: Ipv4Addr) -> String {
    a.to_string().replace('.', "-")
}

/// The chain that DNATs to backend `a`.
pub fn backend_chain(a: Ipv4Addr) -> String {
    format!("be-{}", dashed(a))
}

/// The chain that balances VIP `vip`.
pub fn service_chain(vip: Ipv4Addr) -> String {
    format!("svc-{}", dashed(vip))
}

/// The rule of a svc chain: how a new connection picks one of `n`
/// backends. The affinity hash has a fixed seed (the VIP), so a client keeps
/// its backend when the table is written again with the same backends.
fn pick(vip: Ipv4Addr, balance: Balance, affinity: bool, n: usize) -> String {
    if affinity {
        format!("jhash ip saddr mod {n} seed {:#010x}", u32::from(vip))
    } else {
        match balance {
            Balance::Random => format!("numgen random mod {n}"),
            Balance::Hash => format!("symhash mod {n}"),
        }
    }
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
    let mut dead = Set::new("dead", "ipv4_addr");
    let mut be: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut svc_chains = Vec::new();
    for (vip, addrs) in &backends {
        if addrs.is_empty() {
            dead.add(vip.to_string());
            continue;
        }
        let Some(s) = specs.get(vip) else { continue };
        let chain = service_chain(*vip);
        vips.map(vip.to_string(), format!("goto {chain}"));
        let arms: Vec<String> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{i} : goto {}", backend_chain(*a)))
            .collect();
        let rule = format!(
            "{} vmap {{ {} }}",
            pick(*vip, s.spec.balance, s.spec.affinity, addrs.len()),
            arms.join(", ")
        );
        svc_chains.push((chain, rule));
        be.extend(addrs.iter().copied());
    }
    t.sets = vec![vips, dead];
    for a in &be {
        t.chain(
            backend_chain(*a),
            [
                format!("ip saddr {a} meta mark set meta mark | {HAIRPIN_MARK:#010x}"),
                format!("dnat to {a}"),
            ],
        );
    }
    for (chain, rule) in svc_chains {
        t.chain(chain, [rule]);
    }
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
            "type nat hook postrouting priority srcnat; policy accept;".to_owned(),
            format!("meta mark & {HAIRPIN_MARK:#010x} == {HAIRPIN_MARK:#010x} masquerade"),
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
