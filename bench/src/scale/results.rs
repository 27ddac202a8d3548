//! The scale bench's figures: one row per store backend and number of
//! simulated hosts, the targets as met / missed, the Markdown
//! section and the charts against N.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::svg::{hbar, Chart};
use crate::sys::Fig;

/// The targets of issue 16 (for 5,000 hosts, one run of the bench).
pub const TARGET_BURST_S: f64 = 2.0;
pub const TARGET_COLD_S: f64 = 2.0;
pub const TARGET_CHANGE_MS: f64 = 50.0;
pub const TARGET_RSS_MB: f64 = 50.0;
pub const TARGET_IDLE_CPU_PCT: f64 = 2.0;
/// "At most a few log lines per minute from unreachable peers".
pub const TARGET_HANDSHAKE_LINES_PER_MIN: f64 = 5.0;

/// The store netd runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Etcd,
    Sqlite,
}

impl StoreKind {
    pub fn label(self) -> &'static str {
        match self {
            StoreKind::Etcd => "etcd",
            StoreKind::Sqlite => "SQLite (embedded)",
        }
    }
}

/// One store backend at one number of simulated hosts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScaleRow {
    /// Simulated hosts (netd has that many peers).
    pub hosts: usize,
    /// Seconds writing the burst (first write → the last write answered).
    pub write_s: Option<f64>,
    /// Seconds from the last write answered to a route for every simulated
    /// block on the WireGuard device.
    pub burst_s: Option<f64>,
    /// netd's CPU seconds (utime + stime) from before the first write to
    /// all routes present.
    pub burst_cpu_s: Option<f64>,
    /// netd's RSS before the burst (no peers), MB.
    pub rss_before_mb: Option<f64>,
    /// netd's RSS once every route is there, MB.
    pub rss_mb: Option<f64>,
    /// One more host written → its route present, ms.
    pub join_ms: Fig,
    /// That host deleted → its route gone, ms.
    pub leave_ms: Fig,
    /// netd's CPU with nothing changing, % of one core.
    pub idle_cpu_pct: Option<f64>,
    /// netd's log lines per minute during the idle window.
    pub idle_lines_per_min: Option<f64>,
    /// Of those, lines about handshakes (unreachable peers), per minute.
    pub idle_handshake_per_min: Option<f64>,
    /// Seconds after the burst when idle was measured again (the largest
    /// size of a full run: handshake retries to the unreachable hosts
    /// over).
    #[serde(default)]
    pub settled_after_s: Option<f64>,
    /// netd's CPU in that window, % of one core.
    #[serde(default)]
    pub settled_idle_cpu_pct: Option<f64>,
    /// netd's log lines per minute in that window.
    #[serde(default)]
    pub settled_lines_per_min: Option<f64>,
    /// netd's RSS after that window, MB.
    #[serde(default)]
    pub settled_rss_mb: Option<f64>,
    /// netd's log lines from the burst to the end of the idle window.
    pub log_lines: Option<usize>,
    /// Of those, lines that mention a handshake or REKEY.
    pub handshake_lines: Option<usize>,
    /// Of those, other WARN and ERROR lines.
    #[serde(default)]
    pub warning_lines: Option<usize>,
    /// The first few distinct ones.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// netd stopped and started again with the hosts in the store (its
    /// device deleted, as on a fresh boot): process start → all routes, s.
    pub cold_start_s: Option<f64>,
    /// The same, from the moment netd's log says it read the hosts.
    pub cold_from_list_s: Option<f64>,
    /// Why this size stopped early, if it did.
    pub error: Option<String>,
}

impl ScaleRow {
    /// RSS added per 1,000 peers, MB (after − before the burst).
    pub fn rss_per_1000_mb(&self) -> Option<f64> {
        match (self.rss_mb, self.rss_before_mb) {
            (Some(a), Some(b)) if self.hosts > 0 => Some((a - b) / self.hosts as f64 * 1000.0),
            _ => None,
        }
    }

    /// Each target with this row's value and whether it is met (`None`:
    /// not measured).
    pub fn targets(&self) -> Vec<(&'static str, Option<bool>)> {
        let below = |v: Option<f64>, t: f64| v.map(|v| v < t);
        let at_most = |v: Option<f64>, t: f64| v.map(|v| v <= t);
        vec![
            ("burst", at_most(self.burst_s, TARGET_BURST_S)),
            ("cold start", at_most(self.cold_start_s, TARGET_COLD_S)),
            ("join", below(self.join_ms.get(), TARGET_CHANGE_MS)),
            ("leave", below(self.leave_ms.get(), TARGET_CHANGE_MS)),
            ("RSS", below(self.rss_mb, TARGET_RSS_MB)),
            // Idle means nothing changing: once the handshake retries to
            // the unreachable hosts are over when that was measured.
            (
                "idle CPU",
                below(
                    self.settled_idle_cpu_pct.or(self.idle_cpu_pct),
                    TARGET_IDLE_CPU_PCT,
                ),
            ),
            (
                "handshake logs",
                at_most(self.idle_handshake_per_min, TARGET_HANDSHAKE_LINES_PER_MIN),
            ),
        ]
    }

    /// "met", or "missed: ..." naming the missed targets.
    pub fn verdict(&self) -> String {
        let t = self.targets();
        let missed: Vec<&str> = t
            .iter()
            .filter(|(_, m)| *m == Some(false))
            .map(|(n, _)| *n)
            .collect();
        let unmeasured = t.iter().any(|(_, m)| m.is_none());
        match (missed.is_empty(), unmeasured) {
            (true, false) => "met".into(),
            (true, true) => "n/a".into(),
            (false, _) => format!("missed: {}", missed.join(", ")),
        }
    }
}

/// One store backend, every size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreResults {
    pub store: StoreKind,
    pub rows: Vec<ScaleRow>,
}

impl StoreResults {
    /// RSS against hosts: the least-squares slope in MB per 1,000 hosts
    /// (with the no-peer RSS of every row as a point at 0), `None` with
    /// fewer than two distinct sizes.
    pub fn rss_slope_per_1000_mb(&self) -> Option<f64> {
        let mut pts: Vec<(f64, f64)> = Vec::new();
        for r in &self.rows {
            if let Some(b) = r.rss_before_mb {
                pts.push((0.0, b));
            }
            if let Some(a) = r.rss_mb {
                pts.push((r.hosts as f64, a));
            }
        }
        slope(&pts).map(|s| s * 1000.0)
    }
}

/// The least-squares slope of `pts`, `None` when all x are equal.
pub fn slope(pts: &[(f64, f64)]) -> Option<f64> {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return None;
    }
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScaleResults {
    /// Records per transaction (etcd) or per batch of concurrent puts
    /// (SQLite) in the burst.
    pub batch: usize,
    /// The pause between two batches, ms (0: back to back).
    #[serde(default)]
    pub pace_ms: f64,
    /// Seconds of the idle window.
    pub idle_s: f64,
    /// Joins and leaves timed per size.
    pub changes: usize,
    /// Seconds a burst or a cold start may take before the size gives up.
    pub timeout_s: f64,
    /// The cluster range and block size netd ran with.
    pub cluster_range: String,
    pub stores: Vec<StoreResults>,
}

fn num(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{:.digits$}", v * scale))
}

fn runs(fig: &Fig, digits: usize) -> String {
    match fig.get() {
        Some(v) => format!(
            "{v:.digits$} ({})",
            fig.runs
                .iter()
                .map(|r| format!("{r:.digits$}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "n/a".into(),
    }
}

impl ScaleResults {
    /// Every figure, for the report's completeness check.
    pub fn figures(&self) -> Vec<(String, Option<f64>)> {
        let mut v = Vec::new();
        for s in &self.stores {
            for r in &s.rows {
                let at = format!("{} {} hosts", s.store.label(), r.hosts);
                v.extend([
                    (format!("{at}: burst convergence"), r.burst_s),
                    (format!("{at}: netd CPU"), r.burst_cpu_s),
                    (format!("{at}: RSS"), r.rss_mb),
                    (format!("{at}: join"), r.join_ms.get()),
                    (format!("{at}: leave"), r.leave_ms.get()),
                    (format!("{at}: idle CPU"), r.idle_cpu_pct),
                    (format!("{at}: cold start"), r.cold_start_s),
                    (format!("{at}: log lines/min"), r.idle_lines_per_min),
                ]);
            }
        }
        v
    }

    /// The report's section; `chart` gives the Markdown of a chart by name.
    pub fn markdown(&self, chart: &dyn Fn(&str) -> String) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## Scale\n");
        let _ = writeln!(
            s,
            "One real netd (WireGuard backend) in a lab host, cluster range {}; N simulated hosts are host records written to the store as other netds would (no lease, underlay addresses in 198.18.0.0/15 that lead nowhere: the lab's underlay switch forwards nothing). \
             **Burst**: N records written in batches of {} (etcd: one transaction each; SQLite: concurrent puts), {}, then the time from the last write answered to a route for every simulated block on `weft-wg` (`ip route`, polled every 20 ms); netd's CPU (utime + stime) over the burst, its RSS after. \
             **Join / leave**: one more record written / deleted → its route present / gone (`ip route get`), median of {}. \
             **Idle**: netd's CPU and log lines over {} s with nothing changing. \
             **Cold start**: netd stopped (SIGTERM), its device deleted (as on a fresh boot), started again with the N records in the store: process start → all routes (and from its log line that it read the hosts, when it logs one). \
             A size gives up after {:.0} s. Targets (issue 16, at 5,000 hosts): burst ≤ {TARGET_BURST_S} s, cold start ≤ {TARGET_COLD_S} s, join / leave < {TARGET_CHANGE_MS} ms, RSS < {TARGET_RSS_MB} MB, idle CPU < {TARGET_IDLE_CPU_PCT} % of a core, at most {TARGET_HANDSHAKE_LINES_PER_MIN} handshake log lines a minute.\n",
            self.cluster_range,
            self.batch,
            if self.pace_ms > 0.0 {
                format!("{:.0} ms apart", self.pace_ms)
            } else {
                "back to back".to_string()
            },
            self.changes,
            self.idle_s,
            self.timeout_s
        );
        for st in &self.stores {
            let _ = writeln!(s, "### {}\n", st.store.label());
            let _ = writeln!(
                s,
                "| hosts | burst: last write → all routes s | write s | netd CPU s | RSS MB (no peers) | RSS per 1,000 peers MB | join ms (runs) | leave ms (runs) | idle CPU % | cold start s (from reading the hosts) | log lines/min idle (handshake) | log lines (handshake, other warnings) | targets |"
            );
            let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
            for r in &st.rows {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} ({}) | {} ({}) | {} ({}, {}) | {} |",
                    r.hosts,
                    num(r.burst_s, 1.0, 2),
                    num(r.write_s, 1.0, 2),
                    num(r.burst_cpu_s, 1.0, 2),
                    num(r.rss_mb, 1.0, 1),
                    num(r.rss_before_mb, 1.0, 1),
                    num(r.rss_per_1000_mb(), 1.0, 1),
                    runs(&r.join_ms, 1),
                    runs(&r.leave_ms, 1),
                    num(r.idle_cpu_pct, 1.0, 2),
                    num(r.cold_start_s, 1.0, 2),
                    num(r.cold_from_list_s, 1.0, 2),
                    num(r.idle_lines_per_min, 1.0, 1),
                    num(r.idle_handshake_per_min, 1.0, 1),
                    r.log_lines.map_or("n/a".into(), |n| n.to_string()),
                    r.handshake_lines.map_or("n/a".into(), |n| n.to_string()),
                    r.warning_lines.map_or("n/a".into(), |n| n.to_string()),
                    r.verdict(),
                );
            }
            s.push('\n');
            if let Some(sl) = st.rss_slope_per_1000_mb() {
                let _ = writeln!(
                    s,
                    "- RSS slope over every size (least squares, the no-peer RSS as N = 0): {sl:.1} MB per 1,000 peers"
                );
            }
            for r in st.rows.iter() {
                if let (Some(after), Some(cpu)) = (r.settled_after_s, r.settled_idle_cpu_pct) {
                    let _ = writeln!(
                        s,
                        "- {} hosts, idle again {after:.0} s after the burst (handshake retries to the unreachable hosts over; the idle CPU target is judged on this): CPU {cpu:.2} % of a core, {} log lines/min, RSS {} MB",
                        r.hosts,
                        num(r.settled_lines_per_min, 1.0, 1),
                        num(r.settled_rss_mb, 1.0, 1),
                    );
                }
            }
            for r in st.rows.iter().filter(|r| !r.warnings.is_empty()) {
                let _ = writeln!(
                    s,
                    "- {} hosts, netd's warnings (first {} distinct): {}",
                    r.hosts,
                    r.warnings.len(),
                    r.warnings
                        .iter()
                        .map(|w| format!("`{}`", w.replace('`', "'")))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            for r in st.rows.iter().filter(|r| r.error.is_some()) {
                let _ = writeln!(
                    s,
                    "- {} hosts stopped early: {}",
                    r.hosts,
                    r.error.as_deref().unwrap_or_default()
                );
            }
            if let Some(big) = st.rows.iter().max_by_key(|r| r.hosts) {
                let _ = writeln!(
                    s,
                    "- targets at {} hosts: {}",
                    big.hosts,
                    big.targets()
                        .iter()
                        .map(|(n, m)| format!(
                            "{n} {}",
                            match m {
                                Some(true) => "met",
                                Some(false) => "**missed**",
                                None => "not measured",
                            }
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            s.push('\n');
        }
        s.push_str(&chart("scale-converge"));
        s.push_str(&chart("scale-rss"));
        s.push_str(&chart("scale-idle"));
        s
    }

    /// The charts against N: convergence (burst and cold start), RSS and
    /// idle CPU, one bar per store backend.
    pub fn charts(&self) -> Vec<(String, String)> {
        let mut sizes: Vec<usize> = self
            .stores
            .iter()
            .flat_map(|s| s.rows.iter().map(|r| r.hosts))
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        let row = |st: &StoreResults, n: usize| st.rows.iter().find(|r| r.hosts == n).cloned();
        let groups =
            |get: &dyn Fn(&ScaleRow) -> Vec<Option<f64>>| -> Vec<(String, Vec<Option<f64>>)> {
                sizes
                    .iter()
                    .map(|&n| {
                        let mut v = Vec::new();
                        for st in &self.stores {
                            match row(st, n) {
                                Some(r) => v.extend(get(&r)),
                                None => v.extend(get(&ScaleRow::default()).iter().map(|_| None)),
                            }
                        }
                        (format!("{n} hosts"), v)
                    })
                    .collect()
            };
        const COLOURS: [&str; 4] = ["#2b6cb0", "#9ecae1", "#d94801", "#fdae6b"];
        let names: Vec<String> = self
            .stores
            .iter()
            .flat_map(|s| {
                [
                    format!("{}: burst", s.store.label()),
                    format!("{}: cold start", s.store.label()),
                ]
            })
            .collect();
        let two: Vec<(&str, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), COLOURS[i % COLOURS.len()]))
            .collect();
        let one: Vec<(&str, &str)> = self
            .stores
            .iter()
            .enumerate()
            .map(|(i, s)| (s.store.label(), COLOURS[(2 * i) % COLOURS.len()]))
            .collect();
        let converge = hbar(&Chart {
            title: "Scale: all routes present, by simulated hosts",
            subtitle: &format!(
                "burst: last write → all routes; cold start: netd started → all routes (target ≤ {TARGET_BURST_S} s at 5,000)"
            ),
            unit: "seconds (lower is better)",
            series: &two,
            groups: &groups(&|r| vec![r.burst_s, r.cold_start_s]),
            decimals: 2,
        });
        let rss = hbar(&Chart {
            title: "Scale: netd RSS, by simulated hosts",
            subtitle: &format!("after the burst (target < {TARGET_RSS_MB} MB at 5,000)"),
            unit: "MB (lower is better)",
            series: &one,
            groups: &groups(&|r| vec![r.rss_mb]),
            decimals: 1,
        });
        let idle = hbar(&Chart {
            title: "Scale: netd idle CPU, by simulated hosts",
            subtitle: &format!(
                "{} s with nothing changing (target < {TARGET_IDLE_CPU_PCT} % at 5,000)",
                self.idle_s
            ),
            unit: "% of one core (lower is better)",
            series: &one,
            groups: &groups(&|r| vec![r.idle_cpu_pct]),
            decimals: 2,
        });
        vec![
            ("scale-converge".to_string(), converge),
            ("scale-rss".to_string(), rss),
            ("scale-idle".to_string(), idle),
        ]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn row(hosts: usize, rss_before: f64, rss: f64) -> ScaleRow {
        ScaleRow {
            hosts,
            rss_before_mb: Some(rss_before),
            rss_mb: Some(rss),
            ..ScaleRow::default()
        }
    }

    #[test]
    fn rss_per_peer_and_slope() {
        let r = row(500, 10.0, 15.0);
        assert_eq!(r.rss_per_1000_mb(), Some(10.0));
        let st = StoreResults {
            store: StoreKind::Etcd,
            rows: vec![row(1000, 10.0, 20.0), row(2000, 10.0, 30.0)],
        };
        let s = st.rss_slope_per_1000_mb().unwrap();
        assert!((s - 10.0).abs() < 1e-9, "{s}");
        assert_eq!(slope(&[(1.0, 2.0)]), None);
        assert_eq!(slope(&[(1.0, 2.0), (1.0, 3.0)]), None);
    }

    #[test]
    fn targets_name_what_is_missed() {
        let mut r = ScaleRow {
            hosts: 5000,
            burst_s: Some(1.5),
            cold_start_s: Some(3.0),
            rss_mb: Some(40.0),
            idle_cpu_pct: Some(1.0),
            idle_handshake_per_min: Some(0.0),
            ..ScaleRow::default()
        };
        r.join_ms.push(10.0);
        r.leave_ms.push(60.0);
        assert_eq!(r.verdict(), "missed: cold start, leave");
        r.cold_start_s = Some(1.0);
        r.leave_ms = Fig::default();
        r.leave_ms.push(10.0);
        assert_eq!(r.verdict(), "met");
        r.rss_mb = None;
        assert_eq!(r.verdict(), "n/a");
    }

    #[test]
    fn every_row_gives_its_figures_and_charts_draw() {
        let res = ScaleResults {
            batch: 100,
            pace_ms: 0.0,
            idle_s: 3.0,
            changes: 5,
            timeout_s: 60.0,
            cluster_range: "10.64.0.0/13, /26 blocks".into(),
            stores: vec![StoreResults {
                store: StoreKind::Sqlite,
                rows: vec![row(100, 10.0, 11.0)],
            }],
        };
        let f = res.figures();
        assert_eq!(f.len(), 8);
        assert!(f.iter().any(|(n, v)| n.contains("RSS") && v.is_some()));
        assert!(f.iter().any(|(n, v)| n.contains("burst") && v.is_none()));
        let charts = res.charts();
        assert_eq!(charts.len(), 3);
        assert!(charts[1].1.contains("100 hosts"));
        let md = res.markdown(&|name| format!("![{name}]\n"));
        assert!(md.contains("### SQLite (embedded)") && md.contains("![scale-rss]"));
    }
}
