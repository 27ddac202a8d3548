//! The report: one structure serialised as JSON, rendered as Markdown, and
//! drawn as SVG charts; plus the check that every figure got a number.
//!
//! `markdown` renders it, `charts` draws it; this file holds the structure,
//! the completeness check and writing the files.

mod charts;
mod markdown;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::cni::CniResults;
use crate::dns::DnsResults;
use crate::policy::PolicyResults;
use crate::scale::ScaleResults;
use crate::services::ServicesResults;
use crate::sys::{Fig, Machine, PartInfo, BUSY_BACKGROUND};
use crate::tunnel::{Mode, ModeResult, MtuResults, TunnelResults};
use charts::charts;
pub use markdown::markdown;

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
    #[serde(default)]
    pub policy: Option<PolicyResults>,
    #[serde(default)]
    pub services: Option<ServicesResults>,
    #[serde(default)]
    pub scale: Option<ScaleResults>,
    /// Figures that got no number (empty when the run is complete).
    pub missing: Vec<String>,
}

pub fn busy_rule() -> String {
    format!(
        "a part is flagged busy when more than {:.0} % of the machine's CPU was in use during the quiet window (nothing of the bench running) just before or just after it",
        BUSY_BACKGROUND * 100.0
    )
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
        if let Some(fl) = &t.flood {
            for (name, fig) in fl.figures() {
                need(
                    format!("tunnel {} handshake flood: {name}", fl.label),
                    fig.get(),
                );
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
    if let Some(p) = &r.policy {
        for (name, v) in p.figures() {
            need(format!("policy: {name}"), v);
        }
    }
    if let Some(sv) = &r.services {
        for (name, v) in sv.figures() {
            need(format!("services: {name}"), v);
        }
    }
    if let Some(sc) = &r.scale {
        for (name, v) in sc.figures() {
            need(format!("scale: {name}"), v);
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

fn per_test(t: &TunnelResults) -> String {
    match t.bytes {
        Some(b) => format!("{} MB", b / 1_000_000),
        None => format!("{} s", t.secs),
    }
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
