//! CNI ADD/DEL latency: weft (plugin + netd) beside the reference `bridge` +
//! `host-local` plugins from Debian's containernetworking-plugins, in the
//! same lab host, interleaved container by container so both see the same
//! machine load.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use weft_tests::weft::{CniCall, Netd};
use weft_tests::{Container, Lab, LabOptions, Netns};

const REFERENCE_DIR: &str = "/usr/lib/cni";

struct Timing {
    add: Vec<Duration>,
    del: Vec<Duration>,
}

fn call(
    host: &Netns,
    cmd: &str,
    id: &str,
    c: &Container,
    config: &str,
    path: &str,
) -> Result<Duration> {
    let t = Instant::now();
    let netns = c.path().display().to_string();
    let out = CniCall {
        host,
        command: cmd,
        container_id: id,
        netns: &netns,
        ifname: "eth0",
        args: "IgnoreUnknown=1",
        config,
    }
    .run_with_path(path)?;
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

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

pub fn run(containers: usize) -> Result<()> {
    if !std::path::Path::new(REFERENCE_DIR).join("bridge").exists() {
        bail!("reference plugins missing in {REFERENCE_DIR}: apt-get install containernetworking-plugins");
    }
    let lab = Lab::new(LabOptions::hosts(1)).context("creating the lab (needs root)")?;
    let store = format!("sqlite:{}", lab.dir().join("store.db").display());
    let netd = Netd::start(&lab, 0, &store, &[]).context("starting netd")?;
    let host = lab.host(0).netns().clone();
    let weft_cfg = netd.cni_config("1.0.0");
    let weft_path = weft_tests::weft::bin("weft")?
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let ref_cfg = format!(
        r#"{{"cniVersion":"1.0.0","name":"ref","type":"bridge","bridge":"cniref0","isGateway":true,
            "ipMasq":false,"ipam":{{"type":"host-local","subnet":"10.88.0.0/16","dataDir":"{}"}}}}"#,
        lab.dir().join("host-local").display()
    );
    let mut weft = Timing {
        add: vec![],
        del: vec![],
    };
    let mut reference = Timing {
        add: vec![],
        del: vec![],
    };
    let cs: Vec<(Container, Container)> = (0..containers)
        .map(|i| {
            Ok((
                lab.container(0, &format!("w{i}"))?,
                lab.container(0, &format!("r{i}"))?,
            ))
        })
        .collect::<Result<_>>()?;
    // One warm-up each (first bridge creation, page cache), not counted.
    let warm_w = lab.container(0, "warmw")?;
    let warm_r = lab.container(0, "warmr")?;
    call(&host, "ADD", "warmw", &warm_w, &weft_cfg, &weft_path)?;
    call(&host, "ADD", "warmr", &warm_r, &ref_cfg, REFERENCE_DIR)?;
    for (i, (w, r)) in cs.iter().enumerate() {
        weft.add.push(call(
            &host,
            "ADD",
            &format!("w{i}"),
            w,
            &weft_cfg,
            &weft_path,
        )?);
        reference.add.push(call(
            &host,
            "ADD",
            &format!("r{i}"),
            r,
            &ref_cfg,
            REFERENCE_DIR,
        )?);
    }
    for (i, (w, r)) in cs.iter().enumerate() {
        weft.del.push(call(
            &host,
            "DEL",
            &format!("w{i}"),
            w,
            &weft_cfg,
            &weft_path,
        )?);
        reference.del.push(call(
            &host,
            "DEL",
            &format!("r{i}"),
            r,
            &ref_cfg,
            REFERENCE_DIR,
        )?);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "CNI latency, {containers} containers, sequential, interleaved (load average: {})",
        load.trim()
    );
    println!();
    println!("| plugin | ADD p50 ms | ADD p95 ms | DEL p50 ms | DEL p95 ms |");
    println!("|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (name, t) in [
        ("weft (plugin + netd)", &mut weft),
        ("bridge + host-local", &mut reference),
    ] {
        let row = [
            percentile(&mut t.add, 0.5),
            percentile(&mut t.add, 0.95),
            percentile(&mut t.del, 0.5),
            percentile(&mut t.del, 0.95),
        ];
        println!(
            "| {name} | {} | {} | {} | {} |",
            ms(row[0]),
            ms(row[1]),
            ms(row[2]),
            ms(row[3])
        );
        rows.push(row);
    }
    let ratio = |i: usize| rows[0][i].as_secs_f64() / rows[1][i].as_secs_f64().max(1e-9);
    println!(
        "| weft / reference | {:.2} | {:.2} | {:.2} | {:.2} |",
        ratio(0),
        ratio(1),
        ratio(2),
        ratio(3)
    );
    Ok(())
}
