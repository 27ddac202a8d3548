//! CNI ADD/DEL latency: weft (plugin + netd) beside the reference `bridge` +
//! `host-local` plugins from Debian's containernetworking-plugins, in the
//! same lab host.
//!
//! Each round creates fresh container namespaces (not timed), then:
//! * sequential: ADD for every container, weft and reference interleaved
//!   container by container, then DEL the same way;
//! * concurrent: `concurrency` threads ADD all containers of one plugin at
//!   once (weft, then reference), then DEL them the same way.
//!
//! A call's latency is the wall time of the plugin process, as a runtime
//! sees it. Each round yields p50 and p95; the figure is the median over
//! rounds.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weft_tests::weft::{CniCall, Netd};
use weft_tests::{Container, Lab, LabOptions, Netns};

use crate::sys::{percentile, Fig};

const REFERENCE_DIR: &str = "/usr/lib/cni";

#[derive(Debug, Clone)]
pub struct Options {
    pub containers: usize,
    pub rounds: usize,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PluginResult {
    pub name: String,
    /// Milliseconds.
    pub seq_add_p50: Fig,
    pub seq_add_p95: Fig,
    pub seq_del_p50: Fig,
    pub seq_del_p95: Fig,
    pub conc_add_p50: Fig,
    pub conc_add_p95: Fig,
    pub conc_del_p50: Fig,
    pub conc_del_p95: Fig,
}

impl PluginResult {
    /// (column title, figure) in table order.
    pub fn figures(&self) -> [(&'static str, &Fig); 8] {
        [
            ("ADD p50", &self.seq_add_p50),
            ("ADD p95", &self.seq_add_p95),
            ("DEL p50", &self.seq_del_p50),
            ("DEL p95", &self.seq_del_p95),
            ("ADD p50", &self.conc_add_p50),
            ("ADD p95", &self.conc_add_p95),
            ("DEL p50", &self.conc_del_p50),
            ("DEL p95", &self.conc_del_p95),
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CniResults {
    pub containers: usize,
    pub rounds: usize,
    pub concurrency: usize,
    /// weft first, then the reference.
    pub plugins: Vec<PluginResult>,
}

struct Plugin {
    config: String,
    path: String,
    /// Container ids are `<tag><round>-<i>`.
    tag: &'static str,
}

fn call(host: &Netns, cmd: &str, id: &str, c: &Container, p: &Plugin) -> Result<Duration> {
    let t = Instant::now();
    let netns = c.path().display().to_string();
    let out = CniCall {
        host,
        command: cmd,
        container_id: id,
        netns: &netns,
        ifname: "eth0",
        args: "IgnoreUnknown=1",
        config: &p.config,
    }
    .run_with_path(&p.path)?;
    let took = t.elapsed();
    if !out.ok() {
        bail!(
            "{cmd} {id} failed ({}): {}{}",
            out.code,
            out.stdout,
            out.stderr
        );
    }
    Ok(took)
}

fn ms(v: &[Duration], p: f64) -> f64 {
    let v: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    percentile(&v, p)
}

/// `cmd` for every container of `cs`, `n` threads at once.
fn concurrent(
    host: &Netns,
    cmd: &str,
    cs: &[(String, Container)],
    p: &Plugin,
    n: usize,
) -> Result<Vec<Duration>> {
    let chunks: Vec<Vec<&(String, Container)>> = (0..n)
        .map(|k| cs.iter().skip(k).step_by(n).collect())
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|(id, c)| call(host, cmd, id, c, p))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            match h.join() {
                Ok(r) => all.extend(r?),
                Err(_) => bail!("a CNI thread panicked"),
            }
        }
        Ok(all)
    })
}

pub fn run(o: &Options) -> Result<CniResults> {
    if !std::path::Path::new(REFERENCE_DIR).join("bridge").exists() {
        bail!("reference plugins missing in {REFERENCE_DIR}: apt-get install containernetworking-plugins");
    }
    let lab = Lab::new(LabOptions::hosts(1)).context("creating the lab (needs root)")?;
    let store = format!("sqlite:{}", lab.dir().join("store.db").display());
    let netd = Netd::start(&lab, 0, &store, &[]).context("starting netd")?;
    let host = lab.host(0).netns().clone();
    let weft_path = weft_tests::weft::bin("weft")?
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let weft = Plugin {
        // run_with_path looks up the config's type in the path: `weft`.
        config: netd.cni_config("1.0.0"),
        path: weft_path,
        tag: "w",
    };
    let reference = Plugin {
        config: format!(
            r#"{{"cniVersion":"1.0.0","name":"ref","type":"bridge","bridge":"cniref0","isGateway":true,
                "ipMasq":false,"ipam":{{"type":"host-local","subnet":"10.88.0.0/16","dataDir":"{}"}}}}"#,
            lab.dir().join("host-local").display()
        ),
        path: REFERENCE_DIR.into(),
        tag: "r",
    };
    // One warm-up each (first bridge creation, page cache), not counted.
    for p in [&weft, &reference] {
        let id = format!("{}warm", p.tag);
        let c = lab.container(0, &id)?;
        call(&host, "ADD", &id, &c, p)?;
    }
    let mut results = [
        PluginResult {
            name: "weft (plugin + netd)".into(),
            ..PluginResult::default()
        },
        PluginResult {
            name: "bridge + host-local".into(),
            ..PluginResult::default()
        },
    ];
    for round in 0..o.rounds {
        eprintln!("weft-bench: CNI round {}/{}", round + 1, o.rounds);
        // Sequential, interleaved.
        let mut sets: Vec<Vec<(String, Container)>> = Vec::new();
        for p in [&weft, &reference] {
            let set = (0..o.containers)
                .map(|i| {
                    let id = format!("{}{round}s{i}", p.tag);
                    Ok((id.clone(), lab.container(0, &id)?))
                })
                .collect::<Result<Vec<_>>>()?;
            sets.push(set);
        }
        let mut seq: [[Vec<Duration>; 2]; 2] = Default::default();
        for (k, cmd) in ["ADD", "DEL"].iter().enumerate() {
            for (w, r) in sets[0].iter().zip(&sets[1]) {
                for (j, (p, (id, c))) in [(&weft, w), (&reference, r)].into_iter().enumerate() {
                    seq[j][k].push(call(&host, cmd, id, c, p)?);
                }
            }
        }
        for set in &sets {
            for (_, c) in set {
                lab.remove_container(c)?;
            }
        }
        // Concurrent, one plugin at a time.
        let mut conc: [[Vec<Duration>; 2]; 2] = Default::default();
        for (j, p) in [&weft, &reference].iter().enumerate() {
            let set = (0..o.containers)
                .map(|i| {
                    let id = format!("{}{round}c{i}", p.tag);
                    Ok((id.clone(), lab.container(0, &id)?))
                })
                .collect::<Result<Vec<_>>>()?;
            conc[j][0] = concurrent(&host, "ADD", &set, p, o.concurrency)?;
            conc[j][1] = concurrent(&host, "DEL", &set, p, o.concurrency)?;
            for (_, c) in &set {
                lab.remove_container(c)?;
            }
        }
        for (j, r) in results.iter_mut().enumerate() {
            r.seq_add_p50.push(ms(&seq[j][0], 0.5));
            r.seq_add_p95.push(ms(&seq[j][0], 0.95));
            r.seq_del_p50.push(ms(&seq[j][1], 0.5));
            r.seq_del_p95.push(ms(&seq[j][1], 0.95));
            r.conc_add_p50.push(ms(&conc[j][0], 0.5));
            r.conc_add_p95.push(ms(&conc[j][0], 0.95));
            r.conc_del_p50.push(ms(&conc[j][1], 0.5));
            r.conc_del_p95.push(ms(&conc[j][1], 0.95));
        }
    }
    Ok(CniResults {
        containers: o.containers,
        rounds: o.rounds,
        concurrency: o.concurrency,
        plugins: results.into(),
    })
}
