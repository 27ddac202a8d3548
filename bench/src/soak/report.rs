//! The soak report: `<out>/soak-<tag>.md` (a one-line verdict per
//! invariant and store at the top, then per store the fault counts, the
//! longest gap per fault kind, netd's and dnsd's RSS/fd slopes, DNS
//! totals and the violations), `.json` (the same figures and the timeline,
//! slimmed: host samples as counts, store samples as counts, no lives or
//! kept DNS samples) and `-<store>-<chart>.svg` (netd's and dnsd's RSS and
//! fds per host, gaps, violations per 10 s, DNS answers per second).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::invariants::{self, CheckOptions, LongestGap, Slope, Verdict};
use super::timeline::{CniFailure, DnsSecond, Fault, FaultKind, Gap, Ms, StreamError, Timeline};
use super::{stem, Options, StoreKind};
pub use charts::charts_of;

mod charts;

/// The run's options, as the report states them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOptions {
    pub hosts: usize,
    pub duration_s: f64,
    pub churn_per_s: f64,
    pub max_live: usize,
    pub dns_per_s: u32,
    pub fault_every_s: f64,
    /// Empty: every kind that applies to the store.
    pub faults: Vec<FaultKind>,
    pub seed: u64,
}

/// One fault kind's injections.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FaultCount {
    pub injected: u64,
    /// Healed within the kind's limit.
    pub healed_in_time: u64,
    /// The longest time from the fault's end to healed, ms.
    pub longest_heal_ms: Option<Ms>,
}

/// DNS queries of the run, summed over its seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DnsTotals {
    pub sent: u64,
    pub right: u64,
    pub wrong: u64,
    pub failed: u64,
}

/// A host sample as the JSON keeps it: the lists as counts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostPoint {
    pub t_ms: Ms,
    pub host: usize,
    pub netd_pid: Option<u32>,
    pub rss_kib: Option<u64>,
    pub fds: Option<u64>,
    pub sockets: Option<u64>,
    /// The dnsd pids (one, two in a handover) and, when one, its figures.
    pub dnsd_pids: Vec<u32>,
    pub dnsd_rss_kib: Option<u64>,
    pub dnsd_fds: Option<u64>,
    pub dnsd_sockets: Option<u64>,
    pub veths: usize,
    pub tunnel_routes: usize,
    pub iptables_rules: usize,
    pub iptables_jumps_ok: bool,
    pub nft_tables: usize,
    pub conntrack_dead: Vec<Ipv4Addr>,
}

/// A store sample as the JSON keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorePoint {
    pub t_ms: Ms,
    pub reachable: bool,
    pub ipam_addrs: usize,
    pub endpoints: usize,
}

/// The timeline without what makes it large.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlimTimeline {
    pub end_ms: Ms,
    pub cni_failures: Vec<CniFailure>,
    pub dns_seconds: Vec<DnsSecond>,
    pub gaps: Vec<Gap>,
    pub stream_errors: Vec<StreamError>,
    pub faults: Vec<Fault>,
    pub hosts: Vec<HostPoint>,
    pub store: Vec<StorePoint>,
}

/// One store's run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreRun {
    pub store: StoreKind,
    /// Churn, traffic and faults, seconds.
    pub run_s: f64,
    /// Churned containers (ADD answered) and probes.
    pub containers: usize,
    pub probes: usize,
    pub faults: BTreeMap<FaultKind, FaultCount>,
    pub longest_gaps: Vec<LongestGap>,
    pub slopes: Vec<Slope>,
    pub dns: DnsTotals,
    pub verdicts: Vec<Verdict>,
    pub timeline: SlimTimeline,
    /// The whole timeline, for the charts (not in the JSON).
    #[serde(skip)]
    pub full: Timeline,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SoakResults {
    pub tag: String,
    pub started: String,
    pub commit: Option<String>,
    pub machine: crate::sys::Machine,
    pub options: RunOptions,
    pub stores: Vec<StoreRun>,
}

impl SoakResults {
    pub fn new(o: &Options) -> Self {
        SoakResults {
            tag: o.tag.clone(),
            started: crate::sys::now_utc().1,
            commit: crate::sys::commit(),
            machine: crate::sys::machine(),
            options: RunOptions {
                hosts: o.hosts,
                duration_s: o.duration.as_secs_f64(),
                churn_per_s: o.churn_per_s,
                max_live: o.max_live,
                dns_per_s: o.dns_per_s,
                fault_every_s: o.fault_every.as_secs_f64(),
                faults: o.faults.clone(),
                seed: o.seed,
            },
            stores: vec![],
        }
    }

    /// Adds one store's run, with its figures.
    pub fn push(&mut self, store: StoreKind, t: Timeline, verdicts: Vec<Verdict>) {
        self.stores
            .push(store_run(store, t, verdicts, &CheckOptions::default()));
    }

    /// Whether every invariant held on every store.
    pub fn all_held(&self) -> bool {
        self.stores
            .iter()
            .all(|s| s.verdicts.iter().all(Verdict::held))
    }
}

fn store_run(store: StoreKind, t: Timeline, verdicts: Vec<Verdict>, o: &CheckOptions) -> StoreRun {
    let mut faults: BTreeMap<FaultKind, FaultCount> = BTreeMap::new();
    for f in &t.faults {
        let c = faults.entry(f.kind).or_default();
        c.injected += 1;
        if let Some(h) = f.healed_ms {
            if h <= f.end_ms + f.kind.heal_limit_ms() {
                c.healed_in_time += 1;
            }
            let took = h.saturating_sub(f.end_ms);
            c.longest_heal_ms = Some(c.longest_heal_ms.map_or(took, |l| l.max(took)));
        }
    }
    let mut dns = DnsTotals::default();
    for d in &t.dns_seconds {
        dns.sent += d.sent;
        dns.right += d.right;
        dns.wrong += d.wrong;
        dns.failed += d.failed;
    }
    let timeline = SlimTimeline {
        end_ms: t.end_ms,
        cni_failures: t.cni_failures.clone(),
        dns_seconds: t.dns_seconds.clone(),
        gaps: t.gaps.clone(),
        stream_errors: t.stream_errors.clone(),
        faults: t.faults.clone(),
        hosts: t
            .hosts
            .iter()
            .map(|s| HostPoint {
                t_ms: s.t_ms,
                host: s.host,
                netd_pid: s.netd_pid,
                rss_kib: s.rss_kib,
                fds: s.fds,
                sockets: s.sockets,
                dnsd_pids: s.dnsd_pids.clone(),
                dnsd_rss_kib: s.dnsd_rss_kib,
                dnsd_fds: s.dnsd_fds,
                dnsd_sockets: s.dnsd_sockets,
                veths: s.veths.len(),
                tunnel_routes: s.tunnel_routes,
                iptables_rules: s.iptables_rules,
                iptables_jumps_ok: s.iptables_jumps_ok,
                nft_tables: s.nft_tables.len(),
                conntrack_dead: s.conntrack_dead.clone(),
            })
            .collect(),
        store: t
            .store
            .iter()
            .map(|s| StorePoint {
                t_ms: s.t_ms,
                reachable: s.reachable,
                ipam_addrs: s.ipam_addrs.len(),
                endpoints: s.endpoints.len(),
            })
            .collect(),
    };
    StoreRun {
        store,
        run_s: t.end_ms as f64 / 1e3,
        containers: t.lives.iter().filter(|l| !l.probe).count(),
        probes: t.lives.iter().filter(|l| l.probe).count(),
        faults,
        longest_gaps: invariants::longest_gaps(&t, o),
        slopes: invariants::slopes(&t, o),
        dns,
        verdicts,
        timeline,
        full: t,
    }
}

/// The store's short name in file names.
fn slug(s: StoreKind) -> &'static str {
    match s {
        StoreKind::Etcd => "etcd",
        StoreKind::Sqlite => "sqlite",
    }
}

/// Writes the Markdown, the JSON and the charts; returns the Markdown's
/// path.
pub fn write(out: &Path, r: &SoakResults) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let base = stem(out, &r.tag);
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut charts = Vec::new();
    for s in &r.stores {
        for (chart, svg) in charts_of(s) {
            let file = format!("{name}-{}-{chart}.svg", slug(s.store));
            let p = out.join(&file);
            std::fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))?;
            charts.push((s.store, chart, file));
        }
    }
    let md = PathBuf::from(format!("{}.md", base.display()));
    std::fs::write(&md, markdown(r, &charts))
        .with_context(|| format!("writing {}", md.display()))?;
    let json = PathBuf::from(format!("{}.json", base.display()));
    std::fs::write(&json, serde_json::to_string_pretty(r)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    Ok(md)
}

fn secs(ms: Ms) -> String {
    format!("{:.1}", ms as f64 / 1e3)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{v:+.digits$}"))
}

/// The report's Markdown; `charts` are (store, chart, file name).
pub fn markdown(r: &SoakResults, charts: &[(StoreKind, &'static str, String)]) -> String {
    let mut s = String::new();
    let o = &r.options;
    let _ = writeln!(s, "# weft soak, {}\n", r.tag);
    let _ = writeln!(
        s,
        "{} hosts (netd, WireGuard), {:.0} s per store; churn {} CNI calls/s (at most {} live), {} DNS queries/s, a fault every {:.0} s on average ({}), seed {}. {} cores ({}), Linux {}; weft {}; started {}.\n",
        o.hosts,
        o.duration_s,
        o.churn_per_s,
        o.max_live,
        o.dns_per_s,
        o.fault_every_s,
        if o.faults.is_empty() {
            "every kind".to_string()
        } else {
            o.faults.iter().map(|k| k.label()).collect::<Vec<_>>().join(", ")
        },
        o.seed,
        r.machine.cores,
        r.machine.cpu,
        r.machine.kernel,
        r.commit.as_deref().unwrap_or("(unknown commit)"),
        r.started
    );
    let _ = writeln!(s, "## Verdicts\n");
    let _ = write!(s, "| invariant |");
    for st in &r.stores {
        let _ = write!(s, " {} |", st.store.label());
    }
    let _ = writeln!(s, " rule |");
    let _ = writeln!(s, "|---|{}---|", "---|".repeat(r.stores.len()));
    let names: Vec<&Verdict> = r
        .stores
        .first()
        .map_or(vec![], |st| st.verdicts.iter().collect());
    for v in names {
        let _ = write!(s, "| {} |", v.invariant);
        for st in &r.stores {
            let cell = match st.verdicts.iter().find(|x| x.invariant == v.invariant) {
                Some(x) if x.held() => format!(
                    "held{}",
                    x.checks.map_or(String::new(), |c| format!(" ({c} checks)"))
                ),
                Some(x) => format!("**{} violations**", x.violations),
                None => "n/a".into(),
            };
            let _ = write!(s, " {cell} |");
        }
        let _ = writeln!(s, " {} |", v.rule);
    }
    s.push('\n');
    for st in &r.stores {
        store_section(&mut s, st, charts);
    }
    s
}

fn store_section(s: &mut String, st: &StoreRun, charts: &[(StoreKind, &'static str, String)]) {
    let _ = writeln!(s, "## {}\n", st.store.label());
    let _ = writeln!(
        s,
        "{:.0} s of churn, traffic and faults; {} containers churned, {} probes; DNS: {} queries, {} right, {} wrong, {} failed.\n",
        st.run_s, st.containers, st.probes, st.dns.sent, st.dns.right, st.dns.wrong, st.dns.failed
    );
    for v in &st.verdicts {
        let _ = writeln!(s, "- {}", v.line());
    }
    s.push('\n');
    let _ = writeln!(s, "### Faults\n");
    let _ = writeln!(
        s,
        "| fault | injected | healed in time | limit s | longest heal s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for (k, c) in &st.faults {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            k.label(),
            c.injected,
            c.healed_in_time,
            secs(k.heal_limit_ms()),
            c.longest_heal_ms.map_or("never".into(), secs)
        );
    }
    if st.faults.is_empty() {
        let _ = writeln!(s, "| (none) | 0 | | | |");
    }
    let _ = writeln!(s, "\n### Longest gap per fault kind\n");
    let _ = writeln!(s, "| overlapping fault | gaps | longest s | flow | at s |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for g in &st.longest_gaps {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            g.fault.map_or("none", |k| k.label()),
            g.gaps,
            secs(g.longest_ms),
            g.flow,
            secs(g.start_ms)
        );
    }
    if st.longest_gaps.is_empty() {
        let _ = writeln!(s, "| (no gaps) | 0 | | | |");
    }
    let _ = writeln!(s, "\n### netd and dnsd RSS and fd slopes\n");
    let _ = writeln!(
        s,
        "Least squares per process (a restart or a replacement starts a new one), after its warm-up; processes shorter than the judging span are shown, not judged.\n"
    );
    let _ = writeln!(
        s,
        "| host | process | pid | from s | to s | RSS KiB/h | fds/h | judged |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for sl in &st.slopes {
        let _ = writeln!(
            s,
            "| h{} | {} | {} | {} | {} | {} | {} | {} |",
            sl.host,
            sl.process.name(),
            sl.pid,
            secs(sl.from_ms),
            secs(sl.to_ms),
            opt(sl.rss_kib_per_h, 0),
            opt(sl.fds_per_h, 1),
            if sl.judged { "yes" } else { "no" }
        );
    }
    if st.slopes.is_empty() {
        let _ = writeln!(s, "| (no process lived long enough) | | | | | | | |");
    }
    let _ = writeln!(s, "\n### Violations and notes\n");
    for v in &st.verdicts {
        if v.details.is_empty() && v.notes.is_empty() {
            continue;
        }
        let _ = writeln!(s, "- **{}**", v.invariant);
        for n in &v.notes {
            let _ = writeln!(s, "  - {n}");
        }
        for d in &v.details {
            let _ = writeln!(s, "  - {}", d.what.replace('|', "\\|"));
        }
        if (v.details.len() as u64) < v.violations {
            let _ = writeln!(s, "  - … {} more", v.violations - v.details.len() as u64);
        }
    }
    s.push('\n');
    for (store, chart, file) in charts {
        if *store == st.store {
            let _ = writeln!(s, "![{} {chart}]({file})\n", st.store.label());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::soak::timeline::{FlowKind, HostSample, Life};

    fn results() -> SoakResults {
        let mut t = Timeline {
            end_ms: 20_000,
            ..Timeline::default()
        };
        t.lives.push(Life {
            id: "p0".into(),
            host: 0,
            name: "p0".into(),
            service: None,
            stack: None,
            aliases: vec![],
            ports: vec![],
            addr: "10.42.0.2".parse().unwrap(),
            add_sent_ms: 0,
            added_ms: 5,
            del_sent_ms: None,
            deleted_ms: None,
            probe: true,
        });
        for i in 0..20 {
            t.hosts.push(HostSample {
                t_ms: i * 1_000,
                host: 0,
                netd_pid: Some(if i < 10 { 7 } else { 8 }),
                rss_kib: Some(20_000 + i),
                fds: Some(30),
                dnsd_pids: vec![99],
                dnsd_rss_kib: Some(4_000),
                dnsd_fds: Some(20),
                veths: vec![weft_model::host_veth_name(
                    "p0",
                    invariants::CONTAINER_IFNAME,
                )],
                ..HostSample::default()
            });
        }
        t.faults.push(Fault {
            kind: FaultKind::NetdKill,
            host: Some(0),
            start_ms: 9_500,
            end_ms: 9_600,
            healed_ms: Some(11_000),
            detail: "kill".into(),
        });
        t.gaps.push(Gap {
            flow: "ping h0->h1".into(),
            kind: FlowKind::Ping,
            start_ms: 9_600,
            end_ms: Some(10_400),
        });
        t.dns_seconds.push(DnsSecond {
            t_s: 3,
            sent: 10,
            right: 9,
            wrong: 0,
            failed: 1,
        });
        let verdicts = invariants::check(&t, &CheckOptions::default());
        let mut r = SoakResults {
            tag: "test".into(),
            started: "2026-01-01T00:00:00Z".into(),
            commit: None,
            machine: crate::sys::machine(),
            options: RunOptions {
                hosts: 3,
                duration_s: 20.0,
                churn_per_s: 10.0,
                max_live: 50,
                dns_per_s: 100,
                fault_every_s: 6.0,
                faults: vec![],
                seed: 1,
            },
            stores: vec![],
        };
        r.push(StoreKind::Sqlite, t, verdicts);
        r
    }

    #[test]
    fn figures_are_gathered() {
        let r = results();
        let st = &r.stores[0];
        assert_eq!(st.faults[&FaultKind::NetdKill].injected, 1);
        assert_eq!(st.faults[&FaultKind::NetdKill].healed_in_time, 1);
        assert_eq!(st.faults[&FaultKind::NetdKill].longest_heal_ms, Some(1_400));
        assert_eq!(st.longest_gaps[0].fault, Some(FaultKind::NetdKill));
        assert_eq!((st.dns.sent, st.dns.failed), (10, 1));
        assert_eq!(st.probes, 1);
        // One failed DNS query: not all held.
        assert!(!r.all_held());
    }

    #[test]
    fn json_is_slim_and_markdown_has_verdicts_tables_and_charts() {
        let r = results();
        let json = serde_json::to_string(&r).unwrap();
        let veth = weft_model::host_veth_name("p0", invariants::CONTAINER_IFNAME);
        assert!(!json.contains(&veth), "veth names left out");
        assert!(json.contains("\"veths\":1"));
        let charts = charts_of(&r.stores[0]);
        assert_eq!(charts.len(), 7);
        for (name, svg) in &charts {
            assert!(svg.starts_with("<svg"), "{name}");
        }
        // Two netd processes: the RSS line is broken once per process.
        let path = charts[0]
            .1
            .lines()
            .find(|l| l.starts_with("<path"))
            .unwrap();
        assert_eq!(path.matches('M').count(), 2, "{path}");
        let files: Vec<_> = charts
            .iter()
            .map(|(c, _)| (StoreKind::Sqlite, *c, format!("soak-test-sqlite-{c}.svg")))
            .collect();
        let md = markdown(&r, &files);
        assert!(md.starts_with("# weft soak, test"));
        assert!(
            md.contains("| DNS right within 1 s | **1 violations** |"),
            "{md}"
        );
        assert!(md.contains("| netd SIGKILL + restart | 1 | 1 |"));
        assert!(md.contains("![SQLite (embedded) rss](soak-test-sqlite-rss.svg)"));
        assert!(md.contains("![SQLite (embedded) dnsd-rss](soak-test-sqlite-dnsd-rss.svg)"));
        assert!(
            md.contains("| one dnsd per host | **1 violations** |"),
            "{md}"
        );
        assert!(json.contains("\"dnsd_pids\":[99]"));
    }

    #[test]
    fn write_puts_every_file_under_out() {
        let r = results();
        let dir = tempfile::tempdir().unwrap();
        let md = write(dir.path(), &r).unwrap();
        assert_eq!(md, dir.path().join("soak-test.md"));
        assert!(dir.path().join("soak-test.json").exists());
        assert!(dir.path().join("soak-test-sqlite-gaps.svg").exists());
    }
}
