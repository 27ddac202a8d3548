//! The report's SVG charts (drawn with [`crate::svg`]): tunnel throughput,
//! latency and CPU per mode, the MTU sweep, DNS and CNI.

use super::{find, per_test, Report};
use crate::svg::{hbar, Chart};
use crate::tunnel::{Mode, ModeResult, MODES};

fn colour(m: Mode) -> &'static str {
    match m {
        Mode::Raw => "#9e9e9e",
        Mode::KernelVxlan => "#9ecae1",
        Mode::WeftVxlan => "#08519c",
        Mode::WireguardGo => "#fdae6b",
        Mode::WeftWireguard => "#d94801",
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
    if let Some(sv) = &r.services {
        out.extend(sv.charts());
    }
    if let Some(sc) = &r.scale {
        out.extend(sc.charts());
    }
    out
}
