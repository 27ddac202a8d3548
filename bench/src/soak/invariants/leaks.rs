//! (c) and (d): what a host's samples show leaking (veths, tunnel routes,
//! firewall rules, conntrack entries, fds and sockets) and netd's growth
//! per process (least-squares slopes of RSS and fds).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use weft_model::host_veth_name;

use super::{around_life, at, is_final, CheckOptions, Verdict, CONTAINER_IFNAME};
use crate::soak::timeline::{HostSample, Life, Ms, Timeline};

/// The host samples per host, in time order.
fn per_host(t: &Timeline) -> BTreeMap<usize, Vec<&HostSample>> {
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
fn finals(t: &Timeline) -> BTreeMap<usize, &HostSample> {
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

/// One netd process's samples (a host's consecutive samples with one pid).
pub struct Segment<'a> {
    pub host: usize,
    pub pid: u32,
    pub samples: Vec<&'a HostSample>,
}

/// The host samples cut per netd process (samples without a netd left out).
pub fn segments(t: &Timeline) -> Vec<Segment<'_>> {
    let mut out: Vec<Segment> = Vec::new();
    for (host, ss) in per_host(t) {
        let mut cur: Option<Segment> = None;
        for s in ss {
            let Some(pid) = s.netd_pid else { continue };
            match &mut cur {
                Some(c) if c.pid == pid => c.samples.push(s),
                _ => {
                    out.extend(cur.take());
                    cur = Some(Segment {
                        host,
                        pid,
                        samples: vec![s],
                    });
                }
            }
        }
        out.extend(cur);
    }
    out
}

impl Segment<'_> {
    /// The samples after the warm-up.
    fn settled(&self, o: &CheckOptions) -> Vec<&HostSample> {
        let start = self.samples.first().map_or(0, |s| s.t_ms);
        self.samples
            .iter()
            .copied()
            .filter(|s| s.t_ms >= start + o.warmup_ms)
            .collect()
    }
}

/// (c) each netd process ends with no more fds and sockets than after its
/// warm-up, give or take [`CheckOptions::fd_margin`].
pub fn fd_leaks(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "no leaked fds or sockets",
        "each netd process ends with at most a margin more fds and sockets than after its warm-up",
    );
    for seg in segments(t) {
        let ss = seg.settled(o);
        let (Some(a), Some(b)) = (ss.first(), ss.last()) else {
            continue;
        };
        if a.t_ms == b.t_ms {
            continue;
        }
        for (what, x, y) in [("fds", a.fds, b.fds), ("sockets", a.sockets, b.sockets)] {
            let (Some(x), Some(y)) = (x, y) else { continue };
            v.checked(1);
            if y > x + o.fd_margin {
                v.violate(
                    o,
                    Some(b.t_ms),
                    format!(
                        "{}: netd {} on h{} has {y} {what}, {x} at {} (margin {})",
                        at(b.t_ms),
                        seg.pid,
                        seg.host,
                        at(a.t_ms),
                        o.fd_margin
                    ),
                );
            }
        }
    }
    v
}

/// One netd process's growth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slope {
    pub host: usize,
    pub pid: u32,
    /// The settled samples' span.
    pub from_ms: Ms,
    pub to_ms: Ms,
    pub rss_kib_per_h: Option<f64>,
    pub fds_per_h: Option<f64>,
    /// Long enough to be judged ([`CheckOptions::slope_judge_min_ms`]).
    pub judged: bool,
}

/// The least-squares slopes of RSS and fds of every netd process that
/// lived at least [`CheckOptions::slope_min_ms`] after its warm-up.
pub fn slopes(t: &Timeline, o: &CheckOptions) -> Vec<Slope> {
    let mut out = Vec::new();
    for seg in segments(t) {
        let ss = seg.settled(o);
        let (Some(a), Some(b)) = (ss.first(), ss.last()) else {
            continue;
        };
        if b.t_ms - a.t_ms < o.slope_min_ms {
            continue;
        }
        let per_h = |get: &dyn Fn(&HostSample) -> Option<u64>| {
            let pts: Vec<(f64, f64)> = ss
                .iter()
                .filter_map(|s| get(s).map(|y| (s.t_ms as f64 / 3.6e6, y as f64)))
                .collect();
            crate::scale::slope(&pts)
        };
        out.push(Slope {
            host: seg.host,
            pid: seg.pid,
            from_ms: a.t_ms,
            to_ms: b.t_ms,
            rss_kib_per_h: per_h(&|s| s.rss_kib),
            fds_per_h: per_h(&|s| s.fds),
            judged: b.t_ms - a.t_ms >= o.slope_judge_min_ms,
        });
    }
    out
}

/// (d) netd's RSS and fds flat: every slope reported, judged on long-lived
/// processes only.
pub fn flat_slopes(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "RSS and fds flat",
        &format!(
            "no netd process that lived {:.0} min grows faster than {:.0} MB/h RSS or {:.0} fds/h (least squares)",
            o.slope_judge_min_ms as f64 / 60e3,
            o.rss_slope_max_kib_h / 1024.0,
            o.fd_slope_max_per_h
        ),
    );
    let all = slopes(t, o);
    for s in &all {
        let f = |x: Option<f64>| x.map_or("n/a".into(), |x| format!("{x:+.1}"));
        v.notes.push(format!(
            "h{} netd {} over {:.0} s: RSS {} KiB/h, fds {} /h{}",
            s.host,
            s.pid,
            (s.to_ms - s.from_ms) as f64 / 1e3,
            f(s.rss_kib_per_h),
            f(s.fds_per_h),
            if s.judged {
                ""
            } else {
                " (too short to judge)"
            }
        ));
        if !s.judged {
            continue;
        }
        v.checked(1);
        if let Some(r) = s.rss_kib_per_h.filter(|&r| r > o.rss_slope_max_kib_h) {
            v.violate(
                o,
                Some(s.to_ms),
                format!(
                    "h{} netd {}: RSS grows {:.1} MB/h from {} to {}",
                    s.host,
                    s.pid,
                    r / 1024.0,
                    at(s.from_ms),
                    at(s.to_ms)
                ),
            );
        }
        if let Some(f) = s.fds_per_h.filter(|&f| f > o.fd_slope_max_per_h) {
            v.violate(
                o,
                Some(s.to_ms),
                format!(
                    "h{} netd {}: fds grow {f:.1}/h from {} to {}",
                    s.host,
                    s.pid,
                    at(s.from_ms),
                    at(s.to_ms)
                ),
            );
        }
    }
    v
}
