//! The soak report's charts, one set per store: netd's and dnsd's RSS and
//! fds per host over time (a chart each; a break at each new process), the gaps (a bar each, by the
//! fault they overlap), violations per 10 s, DNS answers per second.

use std::collections::BTreeMap;

use super::StoreRun;
use crate::soak::invariants::{self, CheckOptions, Process};
use crate::soak::timeline::{DnsSecond, FaultKind, HostSample, Ms};
use crate::svg::{time_chart, Mark, TimeChart, TimeSeries};

const COLOURS: [&str; 8] = [
    "#2b6cb0", "#d94801", "#238b45", "#6a51a3", "#b15928", "#e7298a", "#66a61e", "#7f7f7f",
];

/// Violations are counted per window this long.
const WINDOW_MS: Ms = 10_000;

fn sec(ms: Ms) -> f64 {
    ms as f64 / 1e3
}

/// The charts of one store: (name, SVG).
pub fn charts_of(st: &StoreRun) -> Vec<(&'static str, String)> {
    let t = &st.full;
    let o = CheckOptions::default();
    let label = st.store.label();
    // RSS and fds per host, the line broken where a new process started.
    let per_host = |p: Process, get: &dyn Fn(&HostSample) -> Option<f64>| {
        let mut by_host: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
        for seg in invariants::segments(t, p) {
            let pts = by_host.entry(seg.host).or_default();
            if let Some(first) = seg.samples.first() {
                pts.push((sec(first.t_ms), f64::NAN));
            }
            pts.extend(
                seg.samples
                    .iter()
                    .filter_map(|s| get(s).map(|y| (sec(s.t_ms), y))),
            );
        }
        by_host
    };
    let names: Vec<String> = (0..t.hosts.iter().map(|s| s.host + 1).max().unwrap_or(0))
        .map(|h| format!("h{h}"))
        .collect();
    let host_series = |m: BTreeMap<usize, Vec<(f64, f64)>>| -> Vec<TimeSeries> {
        m.into_iter()
            .map(|(h, points)| TimeSeries {
                name: names.get(h).map_or("h?", String::as_str),
                colour: COLOURS[h % COLOURS.len()],
                mark: Mark::Line,
                points,
            })
            .collect()
    };
    let rss = |p: Process| {
        host_series(per_host(p, &|s| {
            p.rss_kib(s).map(|k| k as f64 * 1024.0 / 1e6)
        }))
    };
    let fds = |p: Process| host_series(per_host(p, &|s| p.fds(s).map(|f| f as f64)));

    // Gaps: a bar per gap at its start, by the (first) fault it overlaps.
    let mut gap_bars: BTreeMap<Option<FaultKind>, Vec<(f64, f64)>> = BTreeMap::new();
    for g in &t.gaps {
        let (from, to) = invariants::gap_span(t, g);
        let kind = invariants::gap_faults(t, &o, g).into_iter().next();
        gap_bars
            .entry(kind)
            .or_default()
            .push((sec(from), sec(to - from)));
    }
    let gaps: Vec<TimeSeries> = gap_bars
        .into_iter()
        .enumerate()
        .map(|(i, (k, points))| TimeSeries {
            name: k.map_or("no fault", FaultKind::label),
            colour: if k.is_none() {
                "#c00000"
            } else {
                COLOURS[i % COLOURS.len()]
            },
            mark: Mark::Bars,
            points,
        })
        .collect();

    // Violations per window: DNS from the per second counts, the rest from
    // the verdicts' details (the first ones per invariant).
    let mut dns_w: BTreeMap<Ms, f64> = BTreeMap::new();
    for d in &t.dns_seconds {
        *dns_w.entry(d.t_s * 1000 / WINDOW_MS).or_default() += (d.wrong + d.failed) as f64;
    }
    let mut other_w: BTreeMap<Ms, f64> = BTreeMap::new();
    for v in st
        .verdicts
        .iter()
        .filter(|v| v.invariant != invariants::DNS_INVARIANT)
    {
        for at in v.details.iter().filter_map(|d| d.t_ms) {
            *other_w.entry(at / WINDOW_MS).or_default() += 1.0;
        }
    }
    let win = |m: BTreeMap<Ms, f64>| -> Vec<(f64, f64)> {
        m.into_iter()
            .filter(|(_, n)| *n > 0.0)
            .map(|(w, n)| (sec(w * WINDOW_MS), n))
            .collect()
    };
    let violations = vec![
        TimeSeries {
            name: "DNS wrong or failed",
            colour: "#d94801",
            mark: Mark::Bars,
            points: win(dns_w),
        },
        TimeSeries {
            name: "other invariants",
            colour: "#c00000",
            mark: Mark::Bars,
            points: win(other_w),
        },
    ];

    let dns_line = |get: &dyn Fn(&DnsSecond) -> u64| -> Vec<(f64, f64)> {
        t.dns_seconds
            .iter()
            .map(|d| (d.t_s as f64, get(d) as f64))
            .collect()
    };
    let dns = vec![
        TimeSeries {
            name: "right",
            colour: "#238b45",
            mark: Mark::Line,
            points: dns_line(&|d| d.right),
        },
        TimeSeries {
            name: "wrong",
            colour: "#d94801",
            mark: Mark::Line,
            points: dns_line(&|d| d.wrong),
        },
        TimeSeries {
            name: "failed",
            colour: "#c00000",
            mark: Mark::Line,
            points: dns_line(&|d| d.failed),
        },
    ];

    let chart = |title: String, subtitle: &str, y_unit: &str, series: &[TimeSeries]| {
        time_chart(&TimeChart {
            title: &title,
            subtitle,
            x_unit: "seconds since the start",
            y_unit,
            series,
        })
    };
    vec![
        (
            "rss",
            chart(
                format!("netd RSS per host, {label}"),
                "VmRSS every second; a break is a restart (a new process)",
                "MB",
                &rss(Process::Netd),
            ),
        ),
        (
            "fds",
            chart(
                format!("netd open fds per host, {label}"),
                "/proc/PID/fd every second; a break is a restart (a new process)",
                "open file descriptors",
                &fds(Process::Netd),
            ),
        ),
        (
            "dnsd-rss",
            chart(
                format!("dnsd RSS per host, {label}"),
                "VmRSS every second while one dnsd runs; a break is a new process (a replacement or a restart)",
                "MB",
                &rss(Process::Dnsd),
            ),
        ),
        (
            "dnsd-fds",
            chart(
                format!("dnsd open fds per host, {label}"),
                "/proc/PID/fd every second while one dnsd runs; a break is a new process",
                "open file descriptors",
                &fds(Process::Dnsd),
            ),
        ),
        (
            "gaps",
            chart(
                format!("Gaps in the flows, {label}"),
                "each bar a gap (ping, UDP or TCP) at its start, by the fault it overlaps",
                "gap, seconds",
                &gaps,
            ),
        ),
        (
            "violations",
            chart(
                format!("Invariant violations per 10 s, {label}"),
                "DNS: wrong or failed answers; other: the violations' times (the first ones per invariant)",
                "violations",
                &violations,
            ),
        ),
        (
            "dns",
            chart(
                format!("DNS answers per second, {label}"),
                "every answer judged against the live containers at that moment",
                "queries per second",
                &dns,
            ),
        ),
    ]
}
