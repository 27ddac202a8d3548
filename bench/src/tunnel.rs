//! Container-to-container TCP throughput across two hosts, weft's backends
//! beside the raw underlay between the same two host namespaces (no tunnel),
//! with iperf3, 1 and 4 streams.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use weft_tests::weft::{CniCall, Netd};
use weft_tests::{Lab, LabOptions, Netns};

/// iperf3 from `client` to `addr` (server already running in `server`):
/// received Gbit/s.
fn iperf(client: &Netns, server: &Netns, addr: &str, streams: u32, secs: u32) -> Result<f64> {
    let _srv = server.spawn(["iperf3", "-s", "-1"])?;
    std::thread::sleep(Duration::from_millis(300));
    let out = client.exec([
        "iperf3",
        "-c",
        addr,
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 reported no throughput")
}

fn attach(netd: &Netd, lab: &Lab, host: usize, name: &str) -> Result<(Netns, String)> {
    let c = lab.container(host, name)?;
    let out = CniCall {
        host: netd.host(),
        command: "ADD",
        container_id: name,
        netns: &c.path().display().to_string(),
        ifname: "eth0",
        args: "IgnoreUnknown=1",
        config: &netd.cni_config("1.0.0"),
    }
    .run()?;
    if !out.ok() {
        bail!("CNI ADD failed: {} {}", out.stdout, out.stderr);
    }
    let ip = out.json()["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .context("no address in the CNI result")?
        .to_owned();
    Ok((c.netns().clone(), ip))
}

pub fn run(backends: &[String], secs: u32) -> Result<()> {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "Container-to-container TCP throughput, 2 hosts, iperf3 {secs} s (load average before: {})",
        load.trim()
    );
    println!();
    println!("| mode | 1 stream Gbit/s | 4 streams Gbit/s | raw underlay 1 / 4 (same namespaces) | ratio to raw 1 / 4 |");
    println!("|---|---|---|---|---|");
    for backend in backends {
        let lab = Lab::new(LabOptions::hosts(2)).context("creating the lab (needs root)")?;
        let (h0, h1) = (lab.host(0).netns().clone(), lab.host(1).netns().clone());
        let raw1 = iperf(&h0, &h1, &lab.host(1).addr().to_string(), 1, secs)?;
        let raw4 = iperf(&h0, &h1, &lab.host(1).addr().to_string(), 4, secs)?;
        let store = format!("sqlite:{}", lab.dir().join("store.db").display());
        let flag = format!("--backend={backend}");
        let n0 = Netd::start(&lab, 0, &store, &[&flag])?;
        let n1 = Netd::start(&lab, 1, &store, &[&flag])?;
        let (a, _) = attach(&n0, &lab, 0, "a")?;
        let (b, ip_b) = attach(&n1, &lab, 1, "b")?;
        // Wait for the peers (and the handshake).
        let mut up = false;
        for _ in 0..50 {
            if a.output(["ping", "-c1", "-W1", &ip_b])?.status.success() {
                up = true;
                break;
            }
        }
        if !up {
            bail!("{backend}: containers cannot reach each other");
        }
        let t1 = iperf(&a, &b, &ip_b, 1, secs)?;
        let t4 = iperf(&a, &b, &ip_b, 4, secs)?;
        println!(
            "| weft {backend} | {t1:.2} | {t4:.2} | {raw1:.2} / {raw4:.2} | {:.2} / {:.2} |",
            t1 / raw1,
            t4 / raw4
        );
    }
    Ok(())
}
