//! The report: one structure serialised as JSON, rendered as Markdown, and
//! drawn as SVG charts; plus the check that every figure got a number.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::cni::CniResults;
use crate::dns::DnsResults;
use crate::svg::{hbar, Chart};
use crate::sys::{Fig, Machine, PartInfo, BUSY_BACKGROUND};
use crate::tunnel::{Mode, ModeResult, MtuResults, TunnelResults, MODES};

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub date: String,
    pub started: String,
    pub seconds: f64,
    pub quick: bool,
    pub command: String,
    pub commit: Option<String>,
    pub machine: Machine,
    pub tools: BTreeMap<String, String>,
    pub busy_rule: String,
    pub parts: Vec<PartInfo>,
    pub tunnel: Option<TunnelResults>,
    pub mtu: Option<MtuResults>,
    pub dns: Option<DnsResults>,
    pub cni: Option<CniResults>,
    /// Figures that got no number (empty when the run is complete).
    pub missing: Vec<String>,
}

pub fn busy_rule() -> String {
    format!(
        "a part is flagged busy when more than {:.0} % of the machine's CPU was in use during the quiet window (nothing of the bench running) just before or just after it",
        BUSY_BACKGROUND * 100.0
    )
}

fn colour(m: Mode) -> &'static str {
    match m {
        Mode::Raw => "#9e9e9e",
        Mode::KernelVxlan => "#9ecae1",
        Mode::WeftVxlan => "#08519c",
        Mode::WireguardGo => "#fdae6b",
        Mode::WeftWireguard => "#d94801",
    }
}

fn f(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "n/a".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.abs() > 1e-12 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn runs(fig: &Fig, decimals: usize) -> String {
    if fig.runs.is_empty() {
        return "n/a".into();
    }
    fig.runs
        .iter()
        .map(|v| format!("{v:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every figure of the report that has no number.
pub fn missing(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let mut need = |what: String, v: Option<f64>| {
        if v.is_none() {
            out.push(what);
        }
    };
    for p in &r.parts {
        if let Some(e) = &p.error {
            need(format!("part {}: {e}", p.name), None);
        }
    }
    if let Some(t) = &r.tunnel {
        for m in &t.modes {
            for (name, fig) in mode_figs(m) {
                need(format!("tunnel {}: {name}", m.label), fig.get());
            }
        }
    }
    if let Some(mt) = &r.mtu {
        for row in &mt.rows {
            let at = format!("MTU {} {}", row.underlay_mtu, row.label);
            need(format!("{at}: path MTU"), row.path_mtu.map(f64::from));
            need(format!("{at}: TCP 1 stream"), row.tcp1_fwd.get());
            need(format!("{at}: TCP 4 streams"), row.tcp4_fwd.get());
        }
    }
    if let Some(d) = &r.dns {
        for s in &d.servers {
            for (name, fig) in [
                ("qps", &s.qps),
                ("p50", &s.p50_ms),
                ("p99", &s.p99_ms),
                ("CPU µs/query", &s.cpu_us_per_query),
            ] {
                need(format!("DNS {}: {name}", s.name), fig.get());
            }
        }
    }
    if let Some(c) = &r.cni {
        for p in &c.plugins {
            for (i, (name, fig)) in p.figures().iter().enumerate() {
                let how = if i < 4 { "sequential" } else { "concurrent" };
                need(format!("CNI {} {how} {name}", p.name), fig.get());
            }
        }
    }
    out
}

fn mode_figs(m: &ModeResult) -> Vec<(&'static str, &Fig)> {
    let mut v = vec![
        ("TCP 1 stream →", &m.tcp1_fwd),
        ("TCP 1 stream ←", &m.tcp1_rev),
        ("TCP 4 streams →", &m.tcp4_fwd),
        ("TCP 4 streams ←", &m.tcp4_rev),
        ("UDP received", &m.udp_gbps),
        ("UDP loss %", &m.udp_loss_pct),
        ("ping p50", &m.ping_p50_ms),
        ("ping p99", &m.ping_p99_ms),
        ("CPU s/GB machine", &m.cpu_system_s_per_gb),
    ];
    if let Some(t) = &m.cpu_tunnel_s_per_gb {
        v.push(("CPU s/GB tunnel process", t));
    }
    v
}

fn find(modes: &[ModeResult], m: Mode) -> Option<&ModeResult> {
    modes.iter().find(|r| r.mode == Some(m))
}

/// Reads one figure of a mode.
type Getter = fn(&ModeResult) -> Option<f64>;

/// The tunnel table rows in order, each weft mode followed by its ratio
/// row against its reference.
fn tunnel_rows(t: &TunnelResults, cols: &[(usize, Getter)]) -> String {
    let mut s = String::new();
    for &m in &MODES {
        let Some(r) = find(&t.modes, m) else { continue };
        let name = if m.reference().is_some() {
            format!("**{}**", m.label())
        } else {
            m.label().to_owned()
        };
        let cells: Vec<String> = cols.iter().map(|(d, get)| f(get(r), *d)).collect();
        let _ = writeln!(s, "| {name} | {} |", cells.join(" | "));
        if let Some(refm) = m.reference() {
            if let Some(rr) = find(&t.modes, refm) {
                let cells: Vec<String> = cols
                    .iter()
                    .map(|(d, get)| {
                        // A ratio of MTUs says nothing: columns without decimals get none.
                        if *d == 0 {
                            String::new()
                        } else {
                            ratio(get(r), get(rr))
                        }
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "| ↳ {} ÷ {} | {} |",
                    m.short(),
                    refm.short(),
                    cells.join(" | ")
                );
            }
        }
    }
    s
}

/// The report as Markdown; `chart_prefix` is how the charts are named next
/// to it (e.g. `2026-11-23`).
pub fn markdown(r: &Report, chart_prefix: &str, charts: &[(String, String)]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# weft benchmark report, {}{}\n",
        r.date,
        if r.quick {
            " (QUICK: harness check, not a measurement)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "`{}` on {} cores ({}), {} GiB, Linux {}; weft {}; started {}, took {:.0} s.\n",
        r.command,
        r.machine.cores,
        r.machine.cpu,
        r.machine.memory_gib,
        r.machine.kernel,
        r.commit.as_deref().unwrap_or("(unknown commit)"),
        r.started,
        r.seconds
    );
    let tools: Vec<String> = r.tools.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(s, "Tools (Debian packages): {}.\n", tools.join(", "));
    let _ = writeln!(
        s,
        "Every figure is the median of its runs (all runs are listed at the end). Ratios are weft ÷ its reference: above 1 is better for throughput and queries/s, below 1 is better for latency, loss and CPU.\n"
    );

    // Machine load.
    let _ = writeln!(s, "## Machine load\n");
    let _ = writeln!(s, "Busy rule: {}.\n", r.busy_rule);
    let _ = writeln!(
        s,
        "| part | took s | load avg before (1/5/15 min) | after | background CPU before / after | busy |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for p in &r.parts {
        let la = |l: [f64; 3]| format!("{:.2} / {:.2} / {:.2}", l[0], l[1], l[2]);
        let _ = writeln!(
            s,
            "| {}{} | {:.0} | {} | {} | {:.0} % / {:.0} % | {} |",
            p.name,
            if p.error.is_some() { " (failed)" } else { "" },
            p.seconds,
            la(p.load_before),
            la(p.load_after),
            p.background_cpu_before * 100.0,
            p.background_cpu_after * 100.0,
            if p.busy { "**BUSY**" } else { "no" }
        );
    }
    s.push('\n');
    for p in &r.parts {
        if let Some(e) = &p.error {
            let _ = writeln!(s, "Part {} failed: `{e}`\n", p.name);
        }
    }

    let chart = |name: &str| -> String {
        charts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(n, _)| format!("![{n}]({chart_prefix}-{n}.svg)\n\n"))
            .unwrap_or_default()
    };

    if let Some(t) = &r.tunnel {
        let _ = writeln!(
            s,
            "## Tunnel throughput (underlay MTU {})\n",
            t.underlay_mtu
        );
        let _ = writeln!(
            s,
            "{}, two hosts on one underlay bridge. iperf3, {} per test, {} runs; → client to server, ← reverse (`-R`). UDP: {} Mbit/s offered, datagrams of overlay MTU − 28 bytes. Gbit/s received.\n",
            capitalise(&t.topology),
            per_test(t),
            t.runs,
            t.udp_mbit
        );
        let _ = writeln!(
            s,
            "| mode | TCP 1 stream → | TCP 1 stream ← | TCP 4 streams → | TCP 4 streams ← | UDP received | UDP loss % |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        s.push_str(&tunnel_rows(
            t,
            &[
                (2, |m| m.tcp1_fwd.get()),
                (2, |m| m.tcp1_rev.get()),
                (2, |m| m.tcp4_fwd.get()),
                (2, |m| m.tcp4_rev.get()),
                (2, |m| m.udp_gbps.get()),
                (2, |m| m.udp_loss_pct.get()),
            ],
        ));
        s.push('\n');
        s.push_str(&chart("throughput"));
        let _ = writeln!(
            s,
            "### Latency and CPU\n\n{} pings 10 ms apart per run (idle tunnel). CPU seconds per GB (10⁹ bytes received) over the four TCP tests of a run: *machine* is all busy CPU time of the machine from /proc/stat (user + system + irq + softirq: it includes both iperf3 ends and the kernel's work for every mode, so it is comparable across modes); *tunnel process* is utime + stime of the userspace tunnel processes of both hosts (wireguard-go, or netd for weft wireguard) from /proc/PID/stat. Kernel modes have no tunnel process.\n",
            t.pings
        );
        let _ = writeln!(
            s,
            "| mode | overlay MTU | ping p50 ms | ping p99 ms | CPU s/GB machine | CPU s/GB tunnel process |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        s.push_str(&tunnel_rows(
            t,
            &[
                (0, |m| m.overlay_mtu.map(f64::from)),
                (3, |m| m.ping_p50_ms.get()),
                (3, |m| m.ping_p99_ms.get()),
                (2, |m| m.cpu_system_s_per_gb.get()),
                (2, |m| m.cpu_tunnel_s_per_gb.as_ref().and_then(|f| f.get())),
            ],
        ));
        s.push('\n');
        s.push_str(&chart("latency"));
        s.push_str(&chart("cpu"));
        for m in &t.modes {
            if let Some(e) = &m.error {
                let _ = writeln!(s, "- {}: `{e}`", m.label);
            }
        }
        s.push('\n');
    }

    if let Some(mt) = &r.mtu {
        let _ = writeln!(s, "## MTU\n");
        let _ = writeln!(
            s,
            "For each underlay MTU a fresh lab; the largest ICMP payload that passes container to container with DF set (checked at the advertised size and one byte more, binary search when that is off), + 28 bytes of headers = the path MTU, checked against the MTU the mode advertises (weft: `netd status`; references: the device MTU set by hand; the container's eth0 has it). Throughput: iperf3 TCP →, median of the runs (the {} row is the main measurement above). 1400 stands for a nested overlay.\n",
            mt.mtus.first().copied().unwrap_or(1500)
        );
        let _ = writeln!(
            s,
            "| underlay MTU | mode | advertised MTU | largest DF payload | path MTU | = advertised | one byte more | TCP 1 stream → Gbit/s | TCP 4 streams → Gbit/s |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for &u in &mt.mtus {
            for &m in &MODES {
                let Some(row) = mt
                    .rows
                    .iter()
                    .find(|x| x.underlay_mtu == u && x.mode == Some(m))
                else {
                    continue;
                };
                let name = if m.reference().is_some() {
                    format!("**{}**", m.short())
                } else {
                    m.short().to_owned()
                };
                let _ = writeln!(
                    s,
                    "| {u} | {name} | {} | {} | {} | {} | {} | {} | {} |",
                    row.advertised.map_or("n/a".into(), |v| v.to_string()),
                    row.largest_df_payload
                        .map_or("n/a".into(), |v| v.to_string()),
                    row.path_mtu.map_or("n/a".into(), |v| v.to_string()),
                    match row.matches {
                        Some(true) => "yes",
                        Some(false) => "**NO**",
                        None => "n/a",
                    },
                    row.one_over.as_deref().unwrap_or("n/a"),
                    f(row.tcp1_fwd.get(), 2),
                    f(row.tcp4_fwd.get(), 2)
                );
                if let Some(refm) = m.reference() {
                    if let Some(rr) = mt
                        .rows
                        .iter()
                        .find(|x| x.underlay_mtu == u && x.mode == Some(refm))
                    {
                        let _ = writeln!(
                            s,
                            "| {u} | ↳ {} ÷ {} | | | | | | {} | {} |",
                            m.short(),
                            refm.short(),
                            ratio(row.tcp1_fwd.get(), rr.tcp1_fwd.get()),
                            ratio(row.tcp4_fwd.get(), rr.tcp4_fwd.get())
                        );
                    }
                }
            }
        }
        s.push('\n');
        s.push_str(&chart("mtu"));
        for row in &mt.rows {
            if let Some(e) = &row.error {
                let _ = writeln!(s, "- MTU {} {}: `{e}`", row.underlay_mtu, row.label);
            }
        }
        s.push('\n');
    }

    if let Some(d) = &r.dns {
        let _ = writeln!(s, "## DNS\n");
        let _ = writeln!(
            s,
            "dnsperf on 127.0.0.1 against weft's dnsd, unbound and dnsmasq serving the same {} services ({} names: service and container A records, short names, PTR; 10 % NXDOMAIN). Saturated: {} s, {} clients, {} threads; fixed rate: {} queries/s for {} s. Server threads: dnsd and unbound {}, dnsmasq 1 (it has no threads). CPU µs/query: the server's utime + stime over the saturated run ÷ answered queries. {} runs.\n",
            d.services, d.names, d.seconds, d.clients, d.threads, d.latency_qps, d.latency_seconds, d.server_threads, d.runs
        );
        let _ = writeln!(
            s,
            "| server | queries/s saturated | p50 ms @ fixed rate | p99 ms @ fixed rate | CPU µs/query | lost (saturated / fixed) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for sr in &d.servers {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} / {} |",
                if sr.name.starts_with("weft") {
                    format!("**{}**", sr.name)
                } else {
                    sr.name.clone()
                },
                f(sr.qps.get(), 0),
                f(sr.p50_ms.get(), 3),
                f(sr.p99_ms.get(), 3),
                f(sr.cpu_us_per_query.get(), 2),
                f(sr.lost_saturated.get(), 0),
                f(sr.lost_fixed.get(), 0)
            );
        }
        if let Some(w) = d.servers.first() {
            for o in d.servers.iter().skip(1) {
                let _ = writeln!(
                    s,
                    "| ↳ weft ÷ {} | {} | {} | {} | {} | |",
                    o.name,
                    ratio(w.qps.get(), o.qps.get()),
                    ratio(w.p50_ms.get(), o.p50_ms.get()),
                    ratio(w.p99_ms.get(), o.p99_ms.get()),
                    ratio(w.cpu_us_per_query.get(), o.cpu_us_per_query.get())
                );
            }
        }
        s.push('\n');
        s.push_str(&chart("dns"));
    }

    if let Some(c) = &r.cni {
        let _ = writeln!(s, "## CNI\n");
        let _ = writeln!(
            s,
            "ADD/DEL latency in ms (wall time of the plugin process, as a runtime sees it) in one lab host: weft's plugin with netd beside the reference `bridge` + `host-local` plugins. {} containers per plugin per round, {} rounds; sequential calls interleaved weft/reference, then {} calls at once per plugin. Each round gives p50 and p95; the figure is the median over rounds.\n",
            c.containers, c.rounds, c.concurrency
        );
        let _ = writeln!(
            s,
            "| plugin | ADD p50 | ADD p95 | DEL p50 | DEL p95 | {n}× ADD p50 | {n}× ADD p95 | {n}× DEL p50 | {n}× DEL p95 |",
            n = c.concurrency
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for p in &c.plugins {
            let cells: Vec<String> = p.figures().iter().map(|(_, x)| f(x.get(), 2)).collect();
            let _ = writeln!(
                s,
                "| {} | {} |",
                if p.name.starts_with("weft") {
                    format!("**{}**", p.name)
                } else {
                    p.name.clone()
                },
                cells.join(" | ")
            );
        }
        if let [w, rf] = c.plugins.as_slice() {
            let cells: Vec<String> = w
                .figures()
                .iter()
                .zip(rf.figures())
                .map(|((_, a), (_, b))| ratio(a.get(), b.get()))
                .collect();
            let _ = writeln!(s, "| ↳ weft ÷ reference | {} |", cells.join(" | "));
        }
        s.push('\n');
        s.push_str(&chart("cni"));
    }

    if !r.missing.is_empty() {
        let _ = writeln!(s, "## Not measured\n");
        for m in &r.missing {
            let _ = writeln!(s, "- {m}");
        }
        s.push('\n');
    }

    // All runs.
    let _ = writeln!(
        s,
        "## All runs\n\n<details><summary>every run's value</summary>\n"
    );
    if let Some(t) = &r.tunnel {
        for m in &t.modes {
            for (name, fig) in mode_figs(m) {
                let _ = writeln!(s, "- tunnel {} {name}: {}", m.label, runs(fig, 3));
            }
        }
    }
    if let Some(mt) = &r.mtu {
        for row in &mt.rows {
            let _ = writeln!(
                s,
                "- MTU {} {}: TCP 1 → {}; TCP 4 → {}",
                row.underlay_mtu,
                row.label,
                runs(&row.tcp1_fwd, 3),
                runs(&row.tcp4_fwd, 3)
            );
        }
    }
    if let Some(d) = &r.dns {
        for sr in &d.servers {
            let _ = writeln!(
                s,
                "- DNS {}: qps {}; p50 {}; p99 {}; CPU µs/query {}",
                sr.name,
                runs(&sr.qps, 0),
                runs(&sr.p50_ms, 3),
                runs(&sr.p99_ms, 3),
                runs(&sr.cpu_us_per_query, 2)
            );
        }
    }
    if let Some(c) = &r.cni {
        for p in &c.plugins {
            for (i, (name, fig)) in p.figures().iter().enumerate() {
                let how = if i < 4 { "sequential" } else { "concurrent" };
                let _ = writeln!(s, "- CNI {} {how} {name}: {}", p.name, runs(fig, 2));
            }
        }
    }
    let _ = writeln!(s, "\n</details>");
    s
}

fn per_test(t: &TunnelResults) -> String {
    match t.bytes {
        Some(b) => format!("{} MB", b / 1_000_000),
        None => format!("{} s", t.secs),
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// The charts: (name, SVG).
pub fn charts(r: &Report) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let series: Vec<(&str, &str)> = MODES.iter().map(|&m| (m.short(), colour(m))).collect();
    if let Some(t) = &r.tunnel {
        let per_mode = |get: &dyn Fn(&ModeResult) -> Option<f64>| -> Vec<Option<f64>> {
            MODES
                .iter()
                .map(|&m| find(&t.modes, m).and_then(get))
                .collect()
        };
        let groups = vec![
            (
                "TCP 1 stream →".to_string(),
                per_mode(&|m| m.tcp1_fwd.get()),
            ),
            (
                "TCP 1 stream ←".to_string(),
                per_mode(&|m| m.tcp1_rev.get()),
            ),
            (
                "TCP 4 streams →".to_string(),
                per_mode(&|m| m.tcp4_fwd.get()),
            ),
            (
                "TCP 4 streams ←".to_string(),
                per_mode(&|m| m.tcp4_rev.get()),
            ),
            (
                format!("UDP @ {} Mbit/s", t.udp_mbit),
                per_mode(&|m| m.udp_gbps.get()),
            ),
        ];
        let subtitle = format!(
            "container to container across two hosts, underlay MTU {}, iperf3 {}, median of {} runs",
            t.underlay_mtu,
            per_test(t),
            t.runs
        );
        out.push((
            "throughput".to_string(),
            hbar(&Chart {
                title: "Tunnel throughput by mode",
                subtitle: &subtitle,
                unit: "Gbit/s received (higher is better)",
                series: &series,
                groups: &groups,
                decimals: 2,
            }),
        ));
        let groups = vec![
            ("ping p50".to_string(), per_mode(&|m| m.ping_p50_ms.get())),
            ("ping p99".to_string(), per_mode(&|m| m.ping_p99_ms.get())),
        ];
        out.push((
            "latency".to_string(),
            hbar(&Chart {
                title: "Round-trip latency by mode",
                subtitle: &format!(
                    "{} pings 10 ms apart, idle tunnel, median of {} runs",
                    t.pings, t.runs
                ),
                unit: "milliseconds (lower is better)",
                series: &series,
                groups: &groups,
                decimals: 3,
            }),
        ));
        let groups = vec![
            (
                "machine".to_string(),
                per_mode(&|m| m.cpu_system_s_per_gb.get()),
            ),
            (
                "tunnel process".to_string(),
                per_mode(&|m| m.cpu_tunnel_s_per_gb.as_ref().and_then(|f| f.get())),
            ),
        ];
        out.push((
            "cpu".to_string(),
            hbar(&Chart {
                title: "CPU seconds per GB transferred",
                subtitle: "TCP tests; machine = all busy CPU (/proc/stat), tunnel process = wireguard-go or netd (n/a: kernel data path)",
                unit: "CPU seconds per 10⁹ bytes (lower is better)",
                series: &series,
                groups: &groups,
                decimals: 2,
            }),
        ));
    }
    if let Some(mt) = &r.mtu {
        let mut groups = Vec::new();
        let mut mtus = mt.mtus.clone();
        mtus.sort_unstable();
        for &u in &mtus {
            for (label, four) in [("1 stream", false), ("4 streams", true)] {
                let vals = MODES
                    .iter()
                    .map(|&m| {
                        mt.rows
                            .iter()
                            .find(|x| x.underlay_mtu == u && x.mode == Some(m))
                            .and_then(|x| {
                                if four {
                                    x.tcp4_fwd.get()
                                } else {
                                    x.tcp1_fwd.get()
                                }
                            })
                    })
                    .collect();
                groups.push((format!("MTU {u}, TCP {label}"), vals));
            }
        }
        out.push((
            "mtu".to_string(),
            hbar(&Chart {
                title: "Throughput by underlay MTU",
                subtitle: "TCP client → server, container to container; 1400 = nested overlay",
                unit: "Gbit/s received (higher is better)",
                series: &series,
                groups: &groups,
                decimals: 2,
            }),
        ));
    }
    if let Some(d) = &r.dns {
        let names: Vec<String> = d.servers.iter().map(|s| s.name.clone()).collect();
        let dns_colours = ["#238b45", "#9e9e9e", "#bdbdbd"];
        let series: Vec<(&str, &str)> = names
            .iter()
            .zip(dns_colours)
            .map(|(n, c)| (n.as_str(), c))
            .collect();
        let groups = vec![(
            "saturated".to_string(),
            d.servers
                .iter()
                .map(|s| s.qps.get().map(|q| q / 1000.0))
                .collect(),
        )];
        out.push((
            "dns".to_string(),
            hbar(&Chart {
                title: "DNS queries per second",
                subtitle: &format!(
                    "dnsperf on 127.0.0.1, {} names, {} s saturated, median of {} runs",
                    d.names, d.seconds, d.runs
                ),
                unit: "thousand queries/s (higher is better)",
                series: &series,
                groups: &groups,
                decimals: 1,
            }),
        ));
    }
    if let Some(c) = &r.cni {
        let names: Vec<String> = c.plugins.iter().map(|p| p.name.clone()).collect();
        let cni_colours = ["#6a51a3", "#9e9e9e"];
        let series: Vec<(&str, &str)> = names
            .iter()
            .zip(cni_colours)
            .map(|(n, c)| (n.as_str(), c))
            .collect();
        let labels = ["ADD p50", "ADD p95", "DEL p50", "DEL p95"];
        let mut groups = Vec::new();
        for (how, offset) in [("sequential", 0), ("concurrent", 4)] {
            for (i, l) in labels.iter().enumerate() {
                let label = if offset == 0 {
                    format!("{l}, {how}")
                } else {
                    format!("{l}, {}× {how}", c.concurrency)
                };
                groups.push((
                    label,
                    c.plugins
                        .iter()
                        .map(|p| p.figures()[offset + i].1.get())
                        .collect(),
                ));
            }
        }
        out.push((
            "cni".to_string(),
            hbar(&Chart {
                title: "CNI ADD/DEL latency",
                subtitle: &format!(
                    "{} containers per plugin, median of {} rounds",
                    c.containers, c.rounds
                ),
                unit: "milliseconds (lower is better)",
                series: &series,
                groups: &groups,
                decimals: 1,
            }),
        ));
    }
    out
}

/// Writes `<dir>/<date>.md`, `.json` and `<date>-<chart>.svg`; returns the
/// paths written.
pub fn write(r: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let charts = charts(r);
    let mut written = Vec::new();
    for (name, svg) in &charts {
        let p = dir.join(format!("{}-{name}.svg", r.date));
        std::fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))?;
        written.push(p);
    }
    let md = markdown(r, &r.date, &charts);
    let p = dir.join(format!("{}.md", r.date));
    std::fs::write(&p, md).with_context(|| format!("writing {}", p.display()))?;
    written.push(p);
    let p = dir.join(format!("{}.json", r.date));
    std::fs::write(&p, serde_json::to_string_pretty(r)? + "\n")
        .with_context(|| format!("writing {}", p.display()))?;
    written.push(p);
    Ok(written)
}
