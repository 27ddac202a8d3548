//! The invariants of a soak run, judged over its whole [`Timeline`]: pure
//! functions of plain data (no root, no clock), so each rule is unit-tested
//! on hand-made timelines below.
//!
//! [`check`] gives one [`Verdict`] per invariant: how many things were
//! checked, how many violations (each a short sentence with its time and
//! ids), and a one-line verdict. The thresholds are [`CheckOptions`]'
//! fields, each with its reason. The DNS rule is [`judge_dns`]: the
//! traffic probes call it online for every answer (against the lives
//! recorded so far) and keep only the counts and the wrong samples.
//!
//! | invariant | from |
//! |---|---|
//! | (a) no address held by two containers | lives, endpoint records |
//! | (b) every IPAM address has a live holder | store samples |
//! | (c) no leaked veth, route, rule, conntrack entry, fd or socket | host samples |
//! | (c) exactly one dnsd per host (beyond a short handover) | host samples |
//! | (d) netd's and dnsd's RSS and fds flat (slopes) | host samples per netd / dnsd pid |
//! | (e) DNS right within 1 s of every change | the probes' counts |
//! | (f) every fault heals within its limit | faults |
//! | (g) no TCP stream between live containers broken | stream errors |
//! | (h) no gap longer than 1 s outside a fault | gaps, faults |
//! | (i) no CNI failure outside a fault | CNI failures, faults |

mod dns;
mod leaks;
mod procs;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::timeline::{DnsSample, Fault, FaultKind, Gap, Life, Ms, Timeline};
pub use dns::{judge_dns, DNS_INVARIANT};
pub use leaks::{conntrack_leaks, firewall_rules, tunnel_routes, veth_leaks};
pub use procs::{fd_leaks, flat_slopes, one_dnsd, segments, slopes, Process, Slope};

/// The interface name the churn attaches containers with (`CNI_IFNAME`):
/// their host veth is `weft_model::host_veth_name(id, CONTAINER_IFNAME)`.
pub use super::churn::IFNAME as CONTAINER_IFNAME;

/// The thresholds of the checks.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// How long an address, a veth, may outlive the container's DEL answer
    /// (or precede its ADD answer, or outlive a failed ADD): IPAM and the
    /// kernel are read while calls are in flight.
    pub grace_ms: Ms,
    /// How long a deleted container's conntrack entries may stay after its
    /// DEL answered: netd flushes them in the background, one batch at a
    /// time. The sampler reports only addresses deleted longer ago.
    pub conntrack_grace_ms: Ms,
    /// A gap in a flow longer than this that overlaps no fault is a
    /// violation (flows probe every 10 ms; a lost packet or two is not a
    /// gap).
    pub gap_limit_ms: Ms,
    /// A gap or a CNI failure is put down to a fault when it overlaps the
    /// fault from this long before it started to this long after it healed.
    pub fault_margin_ms: Ms,
    /// How long a host may run no dnsd, or several, before it is a
    /// violation: a replacement overlaps the old one until it is ready and
    /// the old one has answered what it holds, and a dead one is started
    /// again within ~20 ms (seen as one sample, or none, at 1 s sampling).
    pub dnsd_handover_ms: Ms,
    /// The start of each netd and dnsd process (per pid) left out of the
    /// fd and socket checks and the slopes: startup opens its fds and
    /// grows its heap.
    pub warmup_ms: Ms,
    /// A netd or dnsd may end with this many more fds (or sockets) than it
    /// had after its warm-up: requests and store calls in flight.
    pub fd_margin: u64,
    /// Slopes are computed for netd and dnsd processes that lived at least
    /// this long after their warm-up (shorter ones say nothing).
    pub slope_min_ms: Ms,
    /// Slopes are judged only on processes that lived this long (a minute
    /// of growth after a restart is caches filling, not a leak).
    pub slope_judge_min_ms: Ms,
    /// An RSS slope above this, KiB per hour, is a leak (20 MB/h: a week
    /// would be 3 GB).
    pub rss_slope_max_kib_h: f64,
    /// An fd slope above this, fds per hour, is a leak (a week: 8,400).
    pub fd_slope_max_per_h: f64,
    /// How many violations a verdict keeps as sentences (the count is
    /// always whole).
    pub max_details: usize,
    /// The store is reached over the lab's underlay (etcd in the underlay
    /// namespace): a host whose underlay link is down cannot learn of
    /// changes, so its DNS answers may be stale or missing until it is
    /// back and has caught up. False for the embedded store (a file every
    /// host reads).
    pub store_across_underlay: bool,
    /// How long after a partition heals a host's DNS may still be behind,
    /// on top of the partition's own length: a store call sent while the
    /// link was down is retransmitted by TCP with a backoff that doubled
    /// all along (after a 4 s outage the next try can be ~3 s after the
    /// link is back), then the follower resumes its watch within a second
    /// (`weft_store` follow.rs, RESUME_BACKOFF) and the answers follow.
    pub partition_catchup_ms: Ms,
    /// A failed ADD's endpoint may be answered (an address no container
    /// of the service had) from the ADD's start until this long after its
    /// failure: netd wrote the record, then rolled it back, or the
    /// runtime's DEL after the failure removed it.
    pub rollback_ms: Ms,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            grace_ms: 5_000,
            conntrack_grace_ms: 3_000,
            gap_limit_ms: 1_000,
            fault_margin_ms: 1_000,
            dnsd_handover_ms: 3_000,
            warmup_ms: 10_000,
            fd_margin: 16,
            slope_min_ms: 60_000,
            slope_judge_min_ms: 600_000,
            rss_slope_max_kib_h: 20.0 * 1024.0,
            fd_slope_max_per_h: 50.0,
            max_details: 200,
            store_across_underlay: false,
            partition_catchup_ms: 2_000,
            rollback_ms: 5_000,
        }
    }
}

/// One violation: when (None: not tied to a moment) and what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Violation {
    pub t_ms: Option<Ms>,
    pub what: String,
}

/// What one invariant came to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Short name, e.g. "unique addresses".
    pub invariant: String,
    /// The rule, one sentence.
    pub rule: String,
    /// How many things were checked (None: not countable).
    pub checks: Option<u64>,
    /// How many violations (may exceed `details`).
    pub violations: u64,
    /// The first [`CheckOptions::max_details`] violations.
    pub details: Vec<Violation>,
    /// Figures worth reporting whatever the verdict (slopes, longest gaps).
    pub notes: Vec<String>,
}

impl Verdict {
    fn new(invariant: &str, rule: &str) -> Verdict {
        Verdict {
            invariant: invariant.into(),
            rule: rule.into(),
            checks: Some(0),
            violations: 0,
            details: vec![],
            notes: vec![],
        }
    }

    fn violate(&mut self, o: &CheckOptions, t_ms: Option<Ms>, what: String) {
        self.violations += 1;
        if self.details.len() < o.max_details {
            self.details.push(Violation { t_ms, what });
        }
    }

    fn checked(&mut self, n: u64) {
        if let Some(c) = &mut self.checks {
            *c += n;
        }
    }

    pub fn held(&self) -> bool {
        self.violations == 0
    }

    /// `held: unique addresses (1,234 checks)` or `VIOLATED: ... 3 times;
    /// first: t=12.3 s ...`.
    pub fn line(&self) -> String {
        let checks = self
            .checks
            .map_or(String::new(), |c| format!(" ({c} checks)"));
        if self.held() {
            return format!("held: {}{checks}", self.invariant);
        }
        let first = self
            .details
            .first()
            .map_or(String::new(), |v| format!("; first: {}", v.what));
        format!(
            "VIOLATED: {}{checks}, {} violation{}{first}",
            self.invariant,
            self.violations,
            if self.violations == 1 { "" } else { "s" }
        )
    }
}

/// `t=12.3 s`.
pub fn at(ms: Ms) -> String {
    format!("t={:.1} s", ms as f64 / 1e3)
}

/// Every invariant over `t`.
pub fn check(t: &Timeline, o: &CheckOptions) -> Vec<Verdict> {
    vec![
        unique_addresses(t, o),
        ipam_owned(t, o),
        veth_leaks(t, o),
        tunnel_routes(t, o),
        firewall_rules(t, o),
        conntrack_leaks(t, o),
        one_dnsd(t, o),
        fd_leaks(t, o),
        flat_slopes(t, o),
        dns(t, o),
        faults_heal(t, o),
        streams(t, o),
        gaps(t, o),
        cni_failures(t, o),
    ]
}

/// Whether `t_ms` is after the run (the final samples).
fn is_final(t: &Timeline, t_ms: Ms) -> bool {
    t_ms >= t.end_ms
}

/// (a) no address held by two containers at once: the lives' intervals
/// from the ADD answer to the DEL sent (an ADD answered while a DEL of the
/// same address is in flight is fine), and the endpoint records of every
/// store sample.
pub fn unique_addresses(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "unique addresses",
        "no address is held by two containers at once (lives from ADD answer to DEL sent; endpoint records in each store sample)",
    );
    let mut by_addr: HashMap<Ipv4Addr, Vec<&Life>> = HashMap::new();
    for l in &t.lives {
        by_addr.entry(l.addr).or_default().push(l);
    }
    v.checked(t.lives.len() as u64);
    let mut addrs: Vec<_> = by_addr.into_iter().collect();
    addrs.sort_by_key(|(a, _)| *a);
    for (addr, mut ls) in addrs {
        ls.sort_by_key(|l| l.added_ms);
        let mut holder: Option<(&Life, Ms)> = None;
        for l in ls {
            let until = l.del_sent_ms.or(l.deleted_ms).unwrap_or(Ms::MAX);
            if let Some((h, h_until)) = holder {
                if l.added_ms < h_until {
                    v.violate(
                        o,
                        Some(l.added_ms),
                        format!(
                            "{}: {addr} given to {} (h{}) while {} (h{}) held it",
                            at(l.added_ms),
                            l.id,
                            l.host,
                            h.id,
                            h.host
                        ),
                    );
                }
                if until > h_until {
                    holder = Some((l, until));
                }
            } else {
                holder = Some((l, until));
            }
        }
    }
    for s in t.store.iter().filter(|s| s.reachable) {
        v.checked(s.endpoints.len() as u64);
        let mut seen: HashMap<Ipv4Addr, &str> = HashMap::new();
        for (id, addr) in &s.endpoints {
            if let Some(other) = seen.insert(*addr, id) {
                if other != id {
                    v.violate(
                        o,
                        Some(s.t_ms),
                        format!(
                            "{}: endpoint records of {other} and {id} both have {addr}",
                            at(s.t_ms)
                        ),
                    );
                }
            }
        }
    }
    v
}

/// Whether life `l` may hold something at `t_ms`: from `grace` before its
/// ADD was sent to `grace` after its DEL answered.
fn around_life(l: &Life, t_ms: Ms, grace: Ms) -> bool {
    l.add_sent_ms <= t_ms + grace && l.deleted_ms.is_none_or(|d| t_ms <= d + grace)
}

/// (b) every address IPAM hands out belongs to a live container, or one
/// whose ADD or DEL is in flight or within the grace (or a failed ADD's,
/// within the grace); after the run only the probes' addresses are left.
pub fn ipam_owned(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "IPAM addresses owned",
        "every address in IPAM belongs to a live container (or one within the grace of its ADD/DEL); after the run, only the probes'",
    );
    let mut by_id: HashMap<&str, Vec<&Life>> = HashMap::new();
    for l in &t.lives {
        by_id.entry(&l.id).or_default().push(l);
    }
    // (addr, holder) -> (first seen, samples)
    let mut stray: BTreeMap<(Ipv4Addr, String), (Ms, u64)> = BTreeMap::new();
    let mut final_seen = false;
    for s in t.store.iter().filter(|s| s.reachable) {
        let fin = is_final(t, s.t_ms);
        final_seen |= fin;
        v.checked(s.ipam_addrs.len() as u64);
        for (addr, holder) in &s.ipam_addrs {
            let lives = by_id.get(holder.as_str()).map_or(&[][..], |v| &v[..]);
            let ok = if fin {
                lives
                    .iter()
                    .any(|l| l.addr == *addr && (l.probe || l.deleted_ms.is_none()))
            } else {
                lives
                    .iter()
                    .any(|l| l.addr == *addr && around_life(l, s.t_ms, o.grace_ms))
                    || t.cni_failures
                        .iter()
                        .any(|f| f.id == *holder && s.t_ms <= f.t_ms + o.grace_ms)
            };
            if !ok {
                let e = stray.entry((*addr, holder.clone())).or_insert((s.t_ms, 0));
                e.1 += 1;
            }
        }
    }
    for ((addr, holder), (first, n)) in stray {
        v.violate(
            o,
            Some(first),
            format!(
                "{}: IPAM holds {addr} for {holder}, no live container ({n} sample{})",
                at(first),
                if n == 1 { "" } else { "s" }
            ),
        );
    }
    if !final_seen {
        v.violate(o, None, "no store sample after the run".into());
    }
    v
}

/// (e) DNS: every wrong or failed answer the probes counted, judged again
/// against the whole run. Not violations, and counted in the notes: an
/// answer right against the whole run (the probes judge against a
/// snapshot of the lives); stale or missing answers on a host cut off from
/// the store by an underlay fault, until it caught up
/// ([`CheckOptions::store_across_underlay`]); an address of a failed ADD
/// while it was rolled back ([`CheckOptions::rollback_ms`]). Timeouts and
/// errors are never excused.
pub fn dns(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        DNS_INVARIANT,
        "every answer has a container from 1 s after its ADD until its DEL, never 1 s after its DEL; no timeouts or errors",
    );
    let (mut sent, mut wrong, mut failed) = (0, 0, 0);
    for d in &t.dns_seconds {
        sent += d.sent;
        wrong += d.wrong;
        failed += d.failed;
    }
    v.checks = Some(sent);
    let (mut skew, mut partitioned, mut rolled_back, mut judged) = (0u64, 0u64, 0u64, 0u64);
    for s in &t.dns_kept {
        let w = dns::wrongs(s, &t.lives);
        if w.is_empty() {
            skew += 1;
        } else if partition_excuses(t, o, s, &w) {
            partitioned += 1;
        } else if rollback_excuses(t, o, s, &w) {
            rolled_back += 1;
        } else {
            judged += 1;
            v.violate(o, Some(s.sent_ms), dns::describe(s, &w));
        }
    }
    // The kept samples are at most DNS_KEPT_MAX: what the probes counted
    // wrong or failed but did not keep counts as it is (nothing excused).
    let unkept = (wrong + failed).saturating_sub(t.dns_kept.len() as u64);
    v.violations = judged + unkept;
    v.notes.push(format!(
        "{sent} queries, {wrong} wrong and {failed} failed as the probes judged them"
    ));
    if skew + partitioned + rolled_back > 0 {
        v.notes.push(format!(
            "not violations: {skew} right against the whole run (the probes' snapshot lagged), \
             {partitioned} stale or missing on a host cut off from the store (underlay down, \
             then as long again plus {:.0} s to catch up), {rolled_back} naming a failed ADD's address while \
             it was rolled back",
            o.partition_catchup_ms as f64 / 1e3
        ));
    }
    v
}

/// A stale or missing answer on a host whose underlay (and with it the
/// store) was down when it was asked, or had just come back.
fn partition_excuses(t: &Timeline, o: &CheckOptions, s: &DnsSample, w: &[dns::Wrong]) -> bool {
    o.store_across_underlay
        && w.iter().all(|w| w.kind != dns::WrongKind::Failed)
        && t.faults.iter().any(|f| {
            f.kind == FaultKind::UnderlayDown
                && f.host == Some(s.host)
                && f.start_ms <= s.sent_ms
                && s.sent_ms <= fault_over(f) + (f.end_ms - f.start_ms) + o.partition_catchup_ms
        })
}

/// Only unexpected addresses, each in the block of a host where an ADD
/// failed around the query (its endpoint existed until rolled back).
fn rollback_excuses(t: &Timeline, o: &CheckOptions, s: &DnsSample, w: &[dns::Wrong]) -> bool {
    let block = |a: std::net::Ipv4Addr| {
        let o = a.octets();
        [o[0], o[1], o[2]]
    };
    w.iter().all(|w| match w.kind {
        dns::WrongKind::Unexpected(a) => t.cni_failures.iter().any(|c| {
            c.command == "ADD"
                && c.sent_ms <= s.answered_ms
                && s.sent_ms <= c.t_ms + o.rollback_ms
                && t.lives
                    .iter()
                    .any(|l| l.host == c.host && block(l.addr) == block(a))
        }),
        _ => false,
    })
}

/// When fault `f` is over: healed, or (never healed) its limit.
fn fault_over(f: &Fault) -> Ms {
    f.healed_ms.unwrap_or(f.end_ms + f.kind.heal_limit_ms())
}

/// Whether `[from, to]` overlaps fault `f`'s window (with the margin).
fn overlaps_fault(f: &Fault, from: Ms, to: Ms, o: &CheckOptions) -> bool {
    from <= fault_over(f) + o.fault_margin_ms && f.start_ms.saturating_sub(o.fault_margin_ms) <= to
}

/// (f) every fault healed within its kind's limit after it ended.
pub fn faults_heal(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "faults heal",
        "every fault is healed within its kind's stated time after it ends",
    );
    for f in &t.faults {
        let limit = f.kind.heal_limit_ms();
        let host = f.host.map_or("the store".into(), |h| format!("h{h}"));
        match f.healed_ms {
            Some(h) if h <= f.end_ms + limit => v.checked(1),
            Some(h) => {
                v.checked(1);
                v.violate(
                    o,
                    Some(f.start_ms),
                    format!(
                        "{}: {} on {host} healed {:.1} s after it ended (limit {:.0} s)",
                        at(f.start_ms),
                        f.kind.label(),
                        (h.saturating_sub(f.end_ms)) as f64 / 1e3,
                        limit as f64 / 1e3
                    ),
                )
            }
            // The run ended before the limit was up: not judged.
            None if f.end_ms + limit > t.end_ms => v.notes.push(format!(
                "{}: {} on {host} still healing when the run ended",
                at(f.start_ms),
                f.kind.label()
            )),
            None => {
                v.checked(1);
                v.violate(
                    o,
                    Some(f.start_ms),
                    format!(
                        "{}: {} on {host} not healed within {:.0} s",
                        at(f.start_ms),
                        f.kind.label(),
                        limit as f64 / 1e3
                    ),
                )
            }
        }
    }
    v
}

/// (g) no TCP stream between live containers ended with an error.
pub fn streams(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "TCP streams unbroken",
        "no TCP stream between live containers is reset or broken",
    );
    v.checks = None;
    for e in &t.stream_errors {
        v.violate(
            o,
            Some(e.t_ms),
            format!("{}: stream {}: {}", at(e.t_ms), e.flow, e.error),
        );
    }
    v
}

/// A gap's span; one that never ended runs to the end of the run.
pub fn gap_span(t: &Timeline, g: &Gap) -> (Ms, Ms) {
    (g.start_ms, g.end_ms.unwrap_or(t.end_ms.max(g.start_ms)))
}

/// The longest gap per fault kind it overlaps (`None`: overlaps no fault),
/// with its flow and start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongestGap {
    pub fault: Option<FaultKind>,
    pub gaps: u64,
    pub longest_ms: Ms,
    pub flow: String,
    pub start_ms: Ms,
}

/// The kinds of the faults gap `g` overlaps (with the margin), each once.
pub fn gap_faults(t: &Timeline, o: &CheckOptions, g: &Gap) -> BTreeSet<FaultKind> {
    let (from, to) = gap_span(t, g);
    t.faults
        .iter()
        .filter(|f| overlaps_fault(f, from, to, o))
        .map(|f| f.kind)
        .collect()
}

pub fn longest_gaps(t: &Timeline, o: &CheckOptions) -> Vec<LongestGap> {
    let mut m: BTreeMap<Option<FaultKind>, LongestGap> = BTreeMap::new();
    for g in &t.gaps {
        let (from, to) = gap_span(t, g);
        let mut kinds: BTreeSet<Option<FaultKind>> =
            gap_faults(t, o, g).into_iter().map(Some).collect();
        if kinds.is_empty() {
            kinds.insert(None);
        }
        for k in kinds {
            let e = m.entry(k).or_insert(LongestGap {
                fault: k,
                gaps: 0,
                longest_ms: 0,
                flow: g.flow.clone(),
                start_ms: g.start_ms,
            });
            e.gaps += 1;
            if to - from > e.longest_ms {
                e.longest_ms = to - from;
                e.flow = g.flow.clone();
                e.start_ms = g.start_ms;
            }
        }
    }
    m.into_values().collect()
}

/// (h) no gap longer than [`CheckOptions::gap_limit_ms`] outside every
/// fault's window, and no flow that never came back after a fault's limit.
pub fn gaps(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "no gaps outside faults",
        "no flow stops answering for more than 1 s unless a fault overlaps the gap; every flow comes back",
    );
    let longest_limit = FaultKind::ALL
        .iter()
        .map(|k| k.heal_limit_ms())
        .max()
        .unwrap_or(0);
    v.checked(t.gaps.len() as u64);
    for g in &t.gaps {
        let (from, to) = gap_span(t, g);
        let faulted = t.faults.iter().any(|f| overlaps_fault(f, from, to, o));
        if !faulted && to - from > o.gap_limit_ms {
            v.violate(
                o,
                Some(from),
                format!(
                    "{}: {} ({:?}) got no answer for {:.2} s, no fault",
                    at(from),
                    g.flow,
                    g.kind,
                    (to - from) as f64 / 1e3
                ),
            );
        } else if g.end_ms.is_none() && from + longest_limit + o.fault_margin_ms < t.end_ms {
            v.violate(
                o,
                Some(from),
                format!("{}: {} ({:?}) never came back", at(from), g.flow, g.kind),
            );
        }
    }
    for l in longest_gaps(t, o) {
        v.notes.push(format!(
            "longest gap {}: {:.2} s ({}, {}; {} gaps)",
            l.fault.map_or("without a fault", |k| k.label()),
            l.longest_ms as f64 / 1e3,
            l.flow,
            at(l.start_ms),
            l.gaps
        ));
    }
    v
}

/// (i) no CNI call failed outside the window of a fault on its host (or on
/// the store / every host).
pub fn cni_failures(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "CNI calls succeed outside faults",
        "no CNI ADD or DEL fails unless a fault on its host or the store overlaps it",
    );
    v.checked(t.lives.iter().filter(|l| !l.probe).count() as u64 * 2 + t.cni_failures.len() as u64);
    for c in &t.cni_failures {
        let explained = t.faults.iter().any(|f| {
            f.host.is_none_or(|h| h == c.host)
                && overlaps_fault(f, c.sent_ms.min(c.t_ms), c.t_ms, o)
        });
        if !explained {
            v.violate(
                o,
                Some(c.t_ms),
                format!(
                    "{}: CNI {} of {} on h{} failed: {}",
                    at(c.t_ms),
                    c.command,
                    c.id,
                    c.host,
                    c.error
                ),
            );
        }
    }
    v
}

#[cfg(test)]
mod tests;
