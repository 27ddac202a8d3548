//! (c) and (d) per process, netd and dnsd alike ([`Process`]): exactly one
//! dnsd per host, no fds or sockets leaked by a process, and each
//! process's growth (least-squares slopes of RSS and fds). A process is a
//! [`Segment`]: a host's consecutive samples with one pid (a restart, a
//! replacement, starts a new one).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use weft_netd::dns::DNSD_BIN;

use super::leaks::{finals, per_host};
use super::{at, CheckOptions, Verdict};
use crate::soak::timeline::{HostSample, Ms, Timeline};

/// The weft processes the sampler measures on each host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Process {
    Netd,
    Dnsd,
}

impl Process {
    pub const ALL: [Process; 2] = [Process::Netd, Process::Dnsd];

    /// Its process name (`comm`).
    pub fn name(self) -> &'static str {
        match self {
            Process::Netd => "netd",
            Process::Dnsd => DNSD_BIN,
        }
    }

    /// Its pid in sample `s` (None: not running, or not exactly one dnsd).
    pub fn pid(self, s: &HostSample) -> Option<u32> {
        match self {
            Process::Netd => s.netd_pid,
            Process::Dnsd => match s.dnsd_pids[..] {
                [p] => Some(p),
                _ => None,
            },
        }
    }

    pub fn rss_kib(self, s: &HostSample) -> Option<u64> {
        match self {
            Process::Netd => s.rss_kib,
            Process::Dnsd => s.dnsd_rss_kib,
        }
    }

    pub fn fds(self, s: &HostSample) -> Option<u64> {
        match self {
            Process::Netd => s.fds,
            Process::Dnsd => s.dnsd_fds,
        }
    }

    pub fn sockets(self, s: &HostSample) -> Option<u64> {
        match self {
            Process::Netd => s.sockets,
            Process::Dnsd => s.dnsd_sockets,
        }
    }
}

/// (c) each host runs exactly one dnsd: a run of samples with none or
/// several longer than [`CheckOptions::dnsd_handover_ms`] (first to last
/// such sample: the least it lasted) is a violation, and so is anything
/// but one in the host's sample after the run.
pub fn one_dnsd(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "one dnsd per host",
        &format!(
            "each host runs exactly one dnsd: never none or several for longer than {:.0} s (a replacement overlaps the old one briefly; a dead one is started again at once), and one after the run",
            o.dnsd_handover_ms as f64 / 1e3
        ),
    );
    let finals = finals(t);
    for (h, ss) in per_host(t) {
        let mut pids: BTreeSet<u32> = BTreeSet::new();
        let mut off = 0;
        // The first and last samples of the current run with other than one.
        let mut run: Option<(&HostSample, &HostSample)> = None;
        for s in ss.iter().copied().map(Some).chain([None]) {
            let one = s.is_none_or(|s| s.dnsd_pids.len() == 1);
            if let Some(s) = s {
                v.checked(1);
                pids.extend(&s.dnsd_pids);
                if !one {
                    off += 1;
                    run = Some(run.map_or((s, s), |(a, _)| (a, s)));
                    continue;
                }
            }
            let Some((a, b)) = run.take() else { continue };
            if b.t_ms - a.t_ms > o.dnsd_handover_ms {
                let counts: BTreeSet<usize> = ss
                    .iter()
                    .filter(|s| (a.t_ms..=b.t_ms).contains(&s.t_ms))
                    .map(|s| s.dnsd_pids.len())
                    .collect();
                let (lo, hi) = (counts.first(), counts.last());
                let n = match (lo, hi) {
                    (Some(lo), Some(hi)) if lo != hi => format!("{lo} to {hi}"),
                    (Some(n), _) => n.to_string(),
                    _ => "?".into(),
                };
                v.violate(
                    o,
                    Some(a.t_ms),
                    format!(
                        "{}: h{h} ran {n} dnsd processes until {} ({:.1} s, limit {:.1} s)",
                        at(a.t_ms),
                        at(b.t_ms),
                        (b.t_ms - a.t_ms) as f64 / 1e3,
                        o.dnsd_handover_ms as f64 / 1e3
                    ),
                );
            }
        }
        match finals.get(&h) {
            Some(s) if s.dnsd_pids.len() == 1 => {}
            Some(s) => v.violate(
                o,
                Some(s.t_ms),
                format!(
                    "{}: h{h} runs {} dnsd processes after the run ({:?}), not one",
                    at(s.t_ms),
                    s.dnsd_pids.len(),
                    s.dnsd_pids
                ),
            ),
            None => v.violate(o, None, format!("h{h}: no sample after the run")),
        }
        v.notes.push(format!(
            "h{h}: {} dnsd process{} over the run; {off} of {} samples saw other than one",
            pids.len(),
            if pids.len() == 1 { "" } else { "es" },
            ss.len()
        ));
    }
    v
}

/// One process's samples (a host's consecutive samples with one pid).
pub struct Segment<'a> {
    pub process: Process,
    pub host: usize,
    pub pid: u32,
    pub samples: Vec<&'a HostSample>,
}

/// The host samples cut per process of kind `p` (samples without one
/// left out).
pub fn segments(t: &Timeline, p: Process) -> Vec<Segment<'_>> {
    let mut out: Vec<Segment> = Vec::new();
    for (host, ss) in per_host(t) {
        let mut cur: Option<Segment> = None;
        for s in ss {
            let Some(pid) = p.pid(s) else { continue };
            match &mut cur {
                Some(c) if c.pid == pid => c.samples.push(s),
                _ => {
                    out.extend(cur.take());
                    cur = Some(Segment {
                        process: p,
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

/// Every process's segments, netd's then dnsd's.
fn all_segments(t: &Timeline) -> impl Iterator<Item = Segment<'_>> {
    Process::ALL.into_iter().flat_map(|p| segments(t, p))
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

/// (c) each netd and dnsd process ends with no more fds and sockets than
/// after its warm-up, give or take [`CheckOptions::fd_margin`].
pub fn fd_leaks(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "no leaked fds or sockets",
        "each netd and dnsd process ends with at most a margin more fds and sockets than after its warm-up",
    );
    for seg in all_segments(t) {
        let p = seg.process;
        let ss = seg.settled(o);
        let (Some(a), Some(b)) = (ss.first(), ss.last()) else {
            continue;
        };
        if a.t_ms == b.t_ms {
            continue;
        }
        for (what, x, y) in [
            ("fds", p.fds(a), p.fds(b)),
            ("sockets", p.sockets(a), p.sockets(b)),
        ] {
            let (Some(x), Some(y)) = (x, y) else { continue };
            v.checked(1);
            if y > x + o.fd_margin {
                v.violate(
                    o,
                    Some(b.t_ms),
                    format!(
                        "{}: {} {} on h{} has {y} {what}, {x} at {} (margin {})",
                        at(b.t_ms),
                        p.name(),
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

/// One process's growth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slope {
    pub process: Process,
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

/// The least-squares slopes of RSS and fds of every netd and dnsd process
/// that lived at least [`CheckOptions::slope_min_ms`] after its warm-up.
pub fn slopes(t: &Timeline, o: &CheckOptions) -> Vec<Slope> {
    let mut out = Vec::new();
    for seg in all_segments(t) {
        let p = seg.process;
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
            process: p,
            host: seg.host,
            pid: seg.pid,
            from_ms: a.t_ms,
            to_ms: b.t_ms,
            rss_kib_per_h: per_h(&|s| p.rss_kib(s)),
            fds_per_h: per_h(&|s| p.fds(s)),
            judged: b.t_ms - a.t_ms >= o.slope_judge_min_ms,
        });
    }
    out.sort_by_key(|s| (s.host, s.process, s.from_ms));
    out
}

/// (d) netd's and dnsd's RSS and fds flat: every slope reported, judged
/// on long-lived processes only.
pub fn flat_slopes(t: &Timeline, o: &CheckOptions) -> Verdict {
    let mut v = Verdict::new(
        "RSS and fds flat",
        &format!(
            "no netd or dnsd process that lived {:.0} min grows faster than {:.0} MB/h RSS or {:.0} fds/h (least squares)",
            o.slope_judge_min_ms as f64 / 60e3,
            o.rss_slope_max_kib_h / 1024.0,
            o.fd_slope_max_per_h
        ),
    );
    let all = slopes(t, o);
    for s in &all {
        let name = s.process.name();
        let f = |x: Option<f64>| x.map_or("n/a".into(), |x| format!("{x:+.1}"));
        v.notes.push(format!(
            "h{} {name} {} over {:.0} s: RSS {} KiB/h, fds {} /h{}",
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
                    "h{} {name} {}: RSS grows {:.1} MB/h from {} to {}",
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
                    "h{} {name} {}: fds grow {f:.1}/h from {} to {}",
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
