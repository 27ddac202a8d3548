//! (c): what a host's samples show leaking: veths, tunnel routes, firewall
//! rules, conntrack entries (fds and sockets per process: `procs.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use weft_model::host_veth_name;

use super::{around_life, at, is_final, CheckOptions, Verdict, CONTAINER_IFNAME};
use crate::soak::timeline::{HostSample, Life, Ms, Timeline};

/// The host samples per host, in time order.
pub(super) fn per_host(t: &Timeline) -> BTreeMap<usize, Vec<&HostSample>> {
    let mut m: BTreeMap<usize, Vec<&HostSample>> = BTreeMap::new();
    for s in &t.hosts {
        m.entry(s.host).or_default().push(s);
    }
    for v in m.values_mut() {
        v.sort_by_key(|s| s.t_ms);
    }
    m
}

/// (c) no veth on a host's bridge without a live container of that host
/// (within the grace of its ADD/DEL or a failed ADD); after the run only
/// live (probe) containers' veths.
pub fn veth_leaks(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "no leaked veths",
        "every container veth on a host's bridge belongs to a live container of that host (after the grace)",
    );
    let mut by_veth: HashMap<(usize, String), Vec<&Life>> = HashMap::new();
    for l in &t.lives {
        by_veth
            .entry((l.host, host_veth_name(&l.id, CONTAINER_IFNAME)))
            .or_default()
            .push(l);
    }
    let failed: HashMap<(usize, String), Vec<Ms>> =
        t.cni_failures.iter().fold(HashMap::new(), |mut m, f| {
            m.entry((f.host, host_veth_name(&f.id, CONTAINER_IFNAME)))
                .or_default()
                .push(f.t_ms);
            m
        });
    let mut stray: BTreeMap<(usize, String), (Ms, u64)> = BTreeMap::new();
    for s in &t.hosts {
        v.checked(s.veths.len() as u64);
        let fin = is_final(t, s.t_ms);
        for name in &s.veths {
            let key = (s.host, name.clone());
            let lives = by_veth.get(&key).map_or(&[][..], |v| &v[..]);
            let ok = if fin {
                lives.iter().any(|l| l.deleted_ms.is_none())
            } else {
                lives.iter().any(|l| around_life(l, s.t_ms, o.grace_ms))
                    || failed
                        .get(&key)
                        .is_some_and(|ts| ts.iter().any(|&f| s.t_ms <= f + o.grace_ms))
            };
            if !ok {
                stray.entry(key).or_insert((s.t_ms, 0)).1 += 1;
            }
        }
    }
    for ((host, name), (first, n)) in stray {
        v.violate(
            o,
            Some(first),
            format!(
                "{}: veth {name} on h{host} without a live container ({n} sample{})",
                at(first),
                if n == 1 { "" } else { "s" }
            ),
        );
    }
    v
}

/// The last sample of each host after the run.
pub(super) fn finals(t: &Timeline) -> BTreeMap<usize, &HostSample> {
    per_host(t)
        .into_iter()
        .filter_map(|(h, ss)| {
            ss.into_iter()
                .rev()
                .find(|s| is_final(t, s.t_ms))
                .map(|s| (h, s))
        })
        .collect()
}

/// The number of lab hosts the samples show.
fn host_count(t: &Timeline) -> usize {
    t.hosts.iter().map(|s| s.host + 1).max().unwrap_or(0)
}

/// (c) after the run, each host routes every other host's block into the
/// tunnel, and nothing more; during the run the samples that differ are
/// counted (faults take routes away for a while).
pub fn tunnel_routes(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "tunnel routes",
        "after the run every host has exactly one tunnel route per other host",
    );
    let n = host_count(t);
    let want = n.saturating_sub(1);
    let finals = finals(t);
    for h in 0..n {
        v.checked(1);
        match finals.get(&h) {
            Some(s) if s.tunnel_routes == want => {}
            Some(s) => v.violate(
                o,
                Some(s.t_ms),
                format!(
                    "{}: h{h} has {} tunnel routes after the run, not {want}",
                    at(s.t_ms),
                    s.tunnel_routes
                ),
            ),
            None => v.violate(o, None, format!("h{h}: no sample after the run")),
        }
    }
    let off = t
        .hosts
        .iter()
        .filter(|s| !is_final(t, s.t_ms) && s.tunnel_routes != want)
        .count();
    v.notes.push(format!(
        "{off} of {} samples during the run had other than {want} tunnel routes",
        t.hosts.iter().filter(|s| !is_final(t, s.t_ms)).count()
    ));
    v
}

/// (c) after the run each host has as many rules in weft's iptables
/// chains as at the start, every jump into them, and the same nf_tables
/// tables.
pub fn firewall_rules(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "firewall rules restored, none leaked",
        "after the run each host has the iptables rules and jumps, and the nf_tables tables, it had at the start",
    );
    let finals = finals(t);
    for (h, ss) in per_host(t) {
        v.checked(1);
        let Some(first) = ss.iter().find(|s| s.netd_pid.is_some()) else {
            continue;
        };
        let Some(last) = finals.get(&h) else {
            v.violate(o, None, format!("h{h}: no sample after the run"));
            continue;
        };
        let when = Some(last.t_ms);
        if last.iptables_rules != first.iptables_rules {
            v.violate(
                o,
                when,
                format!(
                    "{}: h{h} has {} rules in weft's iptables chains after the run, {} at the start",
                    at(last.t_ms),
                    last.iptables_rules,
                    first.iptables_rules
                ),
            );
        }
        if !last.iptables_jumps_ok {
            v.violate(
                o,
                when,
                format!(
                    "{}: h{h} lacks a jump into weft's chains after the run",
                    at(last.t_ms)
                ),
            );
        }
        let (a, b): (BTreeSet<_>, BTreeSet<_>) = (
            first.nft_tables.iter().collect(),
            last.nft_tables.iter().collect(),
        );
        if a != b {
            v.violate(
                o,
                when,
                format!(
                    "{}: h{h} has nf_tables tables {b:?} after the run, {a:?} at the start",
                    at(last.t_ms)
                ),
            );
        }
    }
    let jumpless = t
        .hosts
        .iter()
        .filter(|s| s.netd_pid.is_some() && !s.iptables_jumps_ok)
        .count();
    v.notes.push(format!(
        "{jumpless} samples during the run lacked a jump (rule wipes until restored)"
    ));
    v
}

/// (c) no conntrack entry of an address deleted longer ago than
/// [`CheckOptions::conntrack_grace_ms`] (the sampler reports only those):
/// one violation per host and address.
pub fn conntrack_leaks(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "no stale conntrack",
        "no conntrack entry names an address whose container was deleted (after the grace) and that no live container holds",
    );
    let mut seen: BTreeMap<(usize, Ipv4Addr), (Ms, u64)> = BTreeMap::new();
    for s in &t.hosts {
        v.checked(1);
        for a in &s.conntrack_dead {
            seen.entry((s.host, *a)).or_insert((s.t_ms, 0)).1 += 1;
        }
    }
    for ((h, a), (first, n)) in seen {
        v.violate(
            o,
            Some(first),
            format!(
                "{}: h{h} has conntrack entries of deleted {a} ({n} sample{})",
                at(first),
                if n == 1 { "" } else { "s" }
            ),
        );
    }
    v
}
