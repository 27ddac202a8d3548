//! The report as Markdown: the summary tables (each weft mode beside its
//! reference, with ratio rows), the MTU sweep, DNS and CNI, and every run's
//! numbers in a closing details block.

use std::fmt::Write as _;

use super::{find, mode_figs, per_test, Report};
use crate::sys::Fig;
use crate::tunnel::{FloodResult, ModeResult, TunnelResults, MODES};

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
        if let Some(fl) = &t.flood {
            s.push_str(&flood_section(fl, t));
        }
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

    if let Some(p) = &r.policy {
        s.push_str(&p.markdown());
        s.push('\n');
    }

    if let Some(sv) = &r.services {
        s.push_str(&sv.markdown(&chart));
    }

    if let Some(sc) = &r.scale {
        s.push_str(&sc.markdown(&chart));
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
    if let Some(fl) = r.tunnel.as_ref().and_then(|t| t.flood.as_ref()) {
        for (name, fig) in fl.figures() {
            let d = if fig.runs.iter().any(|&v| v > 1000.0) {
                0
            } else {
                3
            };
            let _ = writeln!(
                s,
                "- tunnel {} handshake flood {name}: {}",
                fl.label,
                runs(fig, d)
            );
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

/// weft wireguard's single stream without and during the handshake flood,
/// the rate the flood reached and what the victim counted.
fn flood_section(fl: &FloodResult, t: &TunnelResults) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Handshake under load

One TCP stream → ({} per test), just before and then during a flood of bogus WireGuard handshake initiations at {}/s aimed at the server's WireGuard port from a third host on the underlay; the flood replays {}. Both streams in one run, back to back.\n",
        per_test(t),
        fl.target_rate,
        fl.packets
    );
    let _ = writeln!(
        s,
        "| mode | TCP 1 stream → without flood | during the flood | during ÷ without | flood rate achieved /s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    let _ = writeln!(
        s,
        "| **{}** | {} | {} | {} | {} |\n",
        fl.label,
        f(fl.tcp1_before.get(), 2),
        f(fl.tcp1_during.get(), 2),
        fl.ratio()
            .map_or_else(|| "—".into(), |r| format!("{r:.2}×")),
        f(fl.flood_rate.get(), 0)
    );
    if let Some(v) = &fl.victim {
        let _ = writeln!(
            s,
            "The server during the flooded stream (netd's `/metrics`): {} datagrams received on its WireGuard socket (the stream's and the flood's), {} dropped as malformed (wrong mac1, no work), {} cookie replies sent instead of a Diffie-Hellman, {} initiations that got a Diffie-Hellman and named no peer (the limiter's and the per-source budgets' share), {} initiations with the attacker's cookie stopped by the per-source budget before any Diffie-Hellman.\n",
            v.rx_datagrams, v.malformed, v.cookies_sent, v.dh_unknown_peer, v.over_budget
        );
    }
    if let Some(e) = &fl.error {
        let _ = writeln!(s, "- {}: `{e}`\n", fl.label);
    }
    s
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}
