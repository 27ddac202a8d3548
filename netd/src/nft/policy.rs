//! The policy in the kernel: [`compile`] turns a [`Policy`], the endpoint
//! records of the cluster and those of this host into `table inet weft`,
//! which enforces the policy on traffic *to this host's containers*
//! (ingress; every host does its own, so every flow is checked once, where it
//! arrives).
//!
//! ```text
//! chain forward_in { type filter hook forward priority filter; policy accept;
//!   ct direction reply accept            # replies of connections let in
//!   ip saddr != <cluster range> accept   # from outside the cluster
//!   ip saddr @hosts accept               # from the other hosts themselves
//!   ip daddr vmap @to_identity           # -> goto id-<n> of the destination's party
//!   ip daddr <this host's block> goto id-0 } # no record (yet): as a stack-less container
//! chain id-<n> {                         # one per (stack, service) on this host
//!   ip saddr . meta l4proto . th dport vmap @ports-<n>
//!   ip saddr vmap @all-<n>
//!   ip saddr @known-<n> goto drop-flow
//!   <what a source not in the maps may reach>
//!   goto drop-flow }
//! chain allow-<label> { counter name "allow-<label>" accept }  # one per rule or reason: the audit
//! chain drop-flow { counter name "drops" drop }
//! ```
//!
//! Per packet this is a few hash lookups whatever the number of rules and
//! endpoints. Sources are grouped by [`Party`]; the maps of a destination
//! hold only the sources whose [`Reach`] differs from that of an unknown
//! source (a cluster address without an endpoint record, treated as a
//! container without a stack), which the chain renders inline. So the
//! default-allow cluster has empty maps. Compiling costs one
//! [`Policy::reach`] per (source party, local party), over only the rules
//! whose `to` matches the local party (26 ms for 10,000 endpoints in 1,000
//! stacks, 1,000 rules and 20 local parties, release build). Original-direction packets of
//! established connections go through the same rules, so a change that
//! removes reach stops them at once; [`lost_reach`] lists the pairs whose
//! conntrack entries should go too.
//!
//! Not subject to policy (documented in README "Policy"): traffic from
//! outside the cluster range (published ports, other hosts' addresses, the
//! internet), traffic the other hosts send through the tunnel themselves
//! (from their block's gateway address, [`PolicyInput::hosts`]) and traffic
//! the host itself sends or receives (the `input` and `output` hooks, so DNS
//! at 169.254.169.250 is always reachable). Other cluster addresses without
//! a record are treated as containers without a stack, and so is a destination in this
//! host's block without a record (say, while netd restarts: the table it
//! left refuses a new container what it refuses a stack-less one).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use weft_model::{DecidedBy, EndpointRecord, Party, Policy, Protocol, Reach};

use super::table::{Set, Table};

/// The counter of dropped flows.
pub const DROPS_COUNTER: &str = "drops";
/// Prefix of the audit counters (and their chains); the counter's comment
/// is the [`DecidedBy::label`].
pub const ALLOW_PREFIX: &str = "allow-";

/// What [`compile`] works from.
#[derive(Debug, Clone, Copy)]
pub struct PolicyInput<'a> {
    pub policy: &'a Policy,
    /// Every endpoint record of the cluster (the sources).
    pub cluster: &'a [EndpointRecord],
    /// This host's endpoint records (the destinations).
    pub local: &'a [EndpointRecord],
    pub cluster_range: Ipv4Network,
    /// This host's block.
    pub block: Ipv4Network,
    /// The other hosts' own addresses in the cluster range: their blocks'
    /// gateways, the source of what a host itself sends to a container
    /// elsewhere. Not subject to policy, like the host's own traffic.
    pub hosts: &'a [Ipv4Addr],
}

/// The table and what it was made of (for [`lost_reach`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// `table inet weft`.
    pub table: Table,
    /// Per local party: what it grants.
    dests: BTreeMap<Party, Grants>,
    /// Source addresses by party.
    sources: BTreeMap<Party, Vec<Ipv4Addr>>,
}

/// What one local party grants its sources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Grants {
    /// Its addresses on this host.
    addrs: Vec<Ipv4Addr>,
    /// What an unknown source (and every source not in `differ`) may reach.
    unknown: Reach,
    /// The source parties that may reach something else.
    differ: BTreeMap<Party, Reach>,
}

impl Grants {
    fn reach(&self, source: &Party) -> &Reach {
        self.differ.get(source).unwrap_or(&self.unknown)
    }
}

/// Addresses by party; an address in two records counts for the first.
fn by_party(records: &[EndpointRecord]) -> BTreeMap<Party, Vec<Ipv4Addr>> {
    let mut seen = BTreeSet::new();
    let mut out: BTreeMap<Party, Vec<Ipv4Addr>> = BTreeMap::new();
    for r in records {
        let ip = r.address.ip();
        if seen.insert(ip) {
            out.entry(Party::from(r)).or_default().push(ip);
        }
    }
    for addrs in out.values_mut() {
        addrs.sort();
    }
    out
}

/// `policy` with only the rules that can apply to flows into `dest` (their
/// `to` matches it), and the index in `policy` of each rule kept.
/// [`Policy::reach`] into `dest` is the same with either, except for the
/// rule indices, which [`renumber`] puts back; with rules for many stacks
/// this makes compiling a table cost about one lookup per source.
fn restrict(policy: &Policy, dest: &Party) -> (Policy, Vec<usize>) {
    let (index, rules): (Vec<usize>, Vec<_>) = policy
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.to.matches(dest))
        .map(|(i, r)| (i, r.clone()))
        .unzip();
    let restricted = Policy {
        default: policy.default,
        stacks: policy.stacks.clone(),
        rules,
    };
    (restricted, index)
}

/// `r` with the rule indices of the [`restrict`]ed policy mapped back.
fn renumber(mut r: Reach, index: &[usize]) -> Reach {
    let fix = |by: &mut DecidedBy| {
        if let DecidedBy::Rule { index: i, .. } = by {
            *i = index.get(*i).copied().unwrap_or(*i);
        }
    };
    r.all.iter_mut().for_each(fix);
    r.ports.iter_mut().for_each(|(_, by)| fix(by));
    r
}

/// The inet table for `input`: see the module docs.
pub fn compile(input: &PolicyInput<'_>) -> Compiled {
    let sources = by_party(input.cluster);
    let unknown = Party::default();
    let mut local = by_party(input.local);
    // The stack-less (and unknown) destination: always id-0, the first party.
    local.entry(unknown.clone()).or_default();
    let mut dests = BTreeMap::new();
    let mut t = Table::new("inet");
    let mut to_identity = Set::new("to_identity", "ipv4_addr : verdict");
    let mut maps = Vec::new();
    let mut id_chains = Vec::new();
    let mut labels = BTreeSet::new();
    for (n, (dp, daddrs)) in local.into_iter().enumerate() {
        let id = format!("id-{n}");
        for a in &daddrs {
            to_identity.map(a.to_string(), format!("goto {id}"));
        }
        let (policy, index) = restrict(input.policy, &dp);
        let u = policy.reach(&unknown, &dp);
        let mut differ = BTreeMap::new();
        let mut ports = Set::new(
            format!("ports-{n}"),
            "ipv4_addr . inet_proto . inet_service : verdict",
        );
        let mut all = Set::new(format!("all-{n}"), "ipv4_addr : verdict");
        let mut known = Set::new(format!("known-{n}"), "ipv4_addr");
        for (sp, saddrs) in &sources {
            let r = policy.reach(sp, &dp);
            if r == u {
                continue;
            }
            let r = renumber(r, &index);
            for a in saddrs {
                known.add(a.to_string());
                for (p, by) in &r.ports {
                    labels.insert(by.label().to_owned());
                    ports.map(
                        format!("{a} . {} . {}", p.proto.as_str(), p.port),
                        format!("jump {}", chain(by)),
                    );
                }
                if let Some(by) = &r.all {
                    labels.insert(by.label().to_owned());
                    all.map(a.to_string(), format!("jump {}", chain(by)));
                }
            }
            differ.insert(sp.clone(), r);
        }
        let u = renumber(u, &index);
        let mut rules = vec![format!("comment \"{dp}\"")];
        if !ports.elements.is_empty() {
            rules.push(format!(
                "ip saddr . meta l4proto . th dport vmap @ports-{n}"
            ));
            maps.push(ports);
        }
        if !all.elements.is_empty() {
            rules.push(format!("ip saddr vmap @all-{n}"));
            maps.push(all);
        }
        if !known.elements.is_empty() {
            rules.push(format!("ip saddr @known-{n} goto drop-flow"));
            maps.push(known);
        }
        if !u.ports.is_empty() {
            let elems: Vec<String> = u
                .ports
                .iter()
                .map(|(p, by)| format!("{} . {} : jump {}", p.proto.as_str(), p.port, chain(by)))
                .collect();
            rules.push(format!(
                "meta l4proto . th dport vmap {{ {} }}",
                elems.join(", ")
            ));
        }
        for by in u.ports.iter().map(|(_, by)| by).chain(u.all.iter()) {
            labels.insert(by.label().to_owned());
        }
        if let Some(by) = &u.all {
            rules.push(format!("jump {}", chain(by)));
        }
        rules.push("goto drop-flow".to_owned());
        id_chains.push((id, rules));
        dests.insert(
            dp,
            Grants {
                addrs: daddrs,
                unknown: u,
                differ,
            },
        );
    }
    t.counters.insert(
        DROPS_COUNTER.to_owned(),
        "flows the policy dropped".to_owned(),
    );
    for label in &labels {
        t.counters
            .insert(format!("{ALLOW_PREFIX}{label}"), label.clone());
    }
    t.sets.push(to_identity);
    let mut hosts = Set::new("hosts", "ipv4_addr");
    for a in input.hosts {
        hosts.add(a.to_string());
    }
    let from_hosts = !hosts.elements.is_empty();
    if from_hosts {
        t.sets.push(hosts);
    }
    t.sets.extend(maps);
    t.chain(
        "drop-flow",
        [format!("counter name \"{DROPS_COUNTER}\" drop")],
    );
    for label in &labels {
        t.chain(
            format!("{ALLOW_PREFIX}{label}"),
            [format!("counter name \"{ALLOW_PREFIX}{label}\" accept")],
        );
    }
    for (id, rules) in id_chains {
        t.chain(id, rules);
    }
    let (range, block) = (input.cluster_range, input.block);
    let mut forward = vec![
        "type filter hook forward priority filter; policy accept;".to_owned(),
        "ct direction reply accept".to_owned(),
        format!("ip saddr != {}/{} accept", range.network(), range.prefix()),
    ];
    if from_hosts {
        forward.push("ip saddr @hosts accept".to_owned());
    }
    forward.push("ip daddr vmap @to_identity".to_owned());
    forward.push(format!(
        "ip daddr {}/{} goto id-0",
        block.network(),
        block.prefix()
    ));
    t.chain("forward_in", forward);
    Compiled {
        table: t,
        dests,
        sources,
    }
}

/// The chain a flow allowed by `by` jumps to.
fn chain(by: &DecidedBy) -> String {
    format!("{ALLOW_PREFIX}{}", by.label())
}

/// Whether everything `old` allows, `new` allows too.
fn covers(new: &Reach, old: &Reach) -> bool {
    match (&old.all, &new.all) {
        (Some(_), None) => false,
        (Some(_), Some(_)) => true,
        (None, _) => old.ports.iter().all(|(p, _)| {
            let l4: Option<(Protocol, u16)> = Some((p.proto, p.port));
            new.allows(l4).is_some()
        }),
    }
}

/// A pair of addresses that lost reach, and what it may still reach: its
/// connections on anything else must be cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// What the pair may still reach (its connections on these stay).
    pub keep: Reach,
}

/// The (source, destination) address pairs that had reach in `old` and lost
/// some of it in `new`, with what they keep: their other connections must
/// be cut (conntrack entries deleted). A source no longer in the records
/// counts as unknown in `new`. Destinations no longer on this host are left
/// out (their entries go when the endpoint is deleted), and so are unknown
/// sources (no address to name; their packets are dropped by the rules
/// anyway).
pub fn lost_reach(old: &Compiled, new: &Compiled) -> Vec<Lost> {
    let mut pairs = BTreeMap::new();
    for (dp, was) in &old.dests {
        let Some(now) = new.dests.get(dp) else {
            continue;
        };
        let still: Vec<&Ipv4Addr> = now.addrs.iter().filter(|a| was.addrs.contains(a)).collect();
        if still.is_empty() {
            continue;
        }
        // Only sources with a reach of their own can differ, unless what an
        // unknown source gets shrank.
        let every = !covers(&now.unknown, &was.unknown);
        let candidates: Box<dyn Iterator<Item = &Party>> = if every {
            Box::new(old.sources.keys())
        } else {
            Box::new(was.differ.keys().chain(now.differ.keys()))
        };
        for sp in candidates {
            if covers(now.reach(sp), was.reach(sp)) {
                continue;
            }
            // The source may have left: then it is unknown in `new`.
            let keep = match new.sources.get(sp) {
                Some(_) => now.reach(sp),
                None => &now.unknown,
            };
            for s in old.sources.get(sp).into_iter().flatten() {
                for d in &still {
                    pairs.insert((*s, **d), keep.clone());
                }
            }
        }
    }
    pairs
        .into_iter()
        .map(|((src, dst), keep)| Lost { src, dst, keep })
        .collect()
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
