//! DNS rate: weft's dnsd beside dnsmasq and unbound (Debian packages),
//! serving the same names, measured with dnsperf in one run, all on
//! 127.0.0.1 (loopback only, free high ports, bounded run times).
//!
//! The names: `--services` services (10 per stack), each with two
//! containers. dnsd reads them from an SQLite store like netd writes them;
//! dnsmasq gets a hosts file, unbound `local-data`. The query mix:
//! 35 % service FQDN (`svc3.stack7.weft.internal`), 25 % short service
//! (`svc3.stack7`), 15 % container FQDN, 15 % PTR, 10 % NXDOMAIN in the
//! domain. Every server is checked to answer each kind correctly first.
//!
//! Figures: saturated queries/s (dnsperf with many outstanding queries),
//! p99 latency at a fixed rate (dnsperf `-Q`, per-query latencies from
//! `-v`), and the server's CPU time per query (utime + stime from
//! /proc/PID/stat over the saturated run, divided by answered queries).
//!
//! `workload` makes the names and queries, `servers` runs and checks the
//! servers, `perf` measures them with dnsperf; this file holds the options, the
//! results and the run.

mod perf;
mod servers;
mod workload;

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::sys::Fig;
use perf::{dnsperf, latency, saturate};
use servers::{check_answers, dnsd_binary, free_port, wait_ready, Server};
use workload::{dnsmasq_hosts, fill_store, plan, query_file, unbound_conf, Service};

pub struct Options {
    pub services: usize,
    pub seconds: u32,
    pub latency_qps: u32,
    pub latency_seconds: u32,
    /// dnsperf clients (sockets) and threads for the saturated run.
    pub clients: u32,
    pub threads: u32,
    /// Server threads for dnsd and unbound (dnsmasq has one).
    pub server_threads: u32,
    /// Repeat every measurement this many times (servers interleaved).
    pub runs: usize,
    /// A 1 s dnsperf run per server before measuring.
    pub warmup: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerResult {
    pub name: String,
    pub qps: Fig,
    /// Queries lost in the saturated run / at the fixed rate.
    pub lost_saturated: Fig,
    pub lost_fixed: Fig,
    /// Milliseconds at the fixed rate.
    pub p50_ms: Fig,
    pub p99_ms: Fig,
    pub cpu_us_per_query: Fig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DnsResults {
    pub services: usize,
    pub names: usize,
    pub seconds: u32,
    pub latency_qps: u32,
    pub latency_seconds: u32,
    pub clients: u32,
    pub threads: u32,
    pub server_threads: u32,
    pub runs: usize,
    /// weft dnsd first, then unbound and dnsmasq.
    pub servers: Vec<ServerResult>,
}

pub async fn run(o: Options) -> Result<DnsResults> {
    for tool in ["dnsperf", "dnsmasq", "unbound"] {
        if !crate::sys::have(tool) {
            bail!("{tool} missing: apt-get install dnsperf dnsmasq-base unbound");
        }
    }
    let dnsd = dnsd_binary()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    let plan = plan(o.services);
    let db = dir.join("store.db");
    fill_store(&plan, &db).await?;
    tokio::task::spawn_blocking(move || measure(&o, &plan, &dir, &db, &dnsd)).await?
}

fn measure(
    o: &Options,
    plan: &[Service],
    dir: &Path,
    db: &Path,
    dnsd: &Path,
) -> Result<DnsResults> {
    let queries = dir.join("queries.txt");
    query_file(plan, &queries, 100_000)?;
    let hosts = dir.join("hosts");
    dnsmasq_hosts(plan, &hosts)?;

    let port = free_port()?;
    let mut weft = Server::spawn(
        "weft dnsd",
        port,
        Command::new(dnsd)
            .arg(format!("--store=sqlite:{}", db.display()))
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!(
                "--resolv-conf={}",
                dir.join("no-resolv.conf").display()
            ))
            .arg(format!("--udp-threads={}", o.server_threads))
            .env("RUST_LOG", "warn"),
    )?;
    wait_ready(&mut weft, plan)?;
    let port = free_port()?;
    let mut dnsmasq = Server::spawn(
        "dnsmasq",
        port,
        Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--cache-size=10000",
                "--pid-file=",
                "--local=/weft.internal/",
                "--local=/42.10.in-addr.arpa/",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", hosts.display())),
    )?;
    wait_ready(&mut dnsmasq, plan)?;
    let port = free_port()?;
    let conf = unbound_conf(plan, dir, port, o.server_threads)?;
    let mut unbound = Server::spawn(
        "unbound",
        port,
        Command::new("unbound").arg("-d").arg("-c").arg(&conf),
    )?;
    wait_ready(&mut unbound, plan)?;

    let servers = [&weft, &unbound, &dnsmasq];
    for s in servers {
        check_answers(s, plan)?;
        if !o.warmup {
            continue;
        }
        let _ = dnsperf(
            s,
            &queries,
            &["-l".into(), "1".into(), "-q".into(), "100".into()],
        )?;
    }
    let mut results: Vec<ServerResult> = servers
        .iter()
        .map(|s| ServerResult {
            name: s.name.to_owned(),
            ..ServerResult::default()
        })
        .collect();
    for run in 0..o.runs {
        eprintln!("weft-bench: DNS run {}/{}", run + 1, o.runs);
        // Rotate the order so that no server always goes first.
        for k in 0..servers.len() {
            let i = (k + run) % servers.len();
            let (perf, cpu) = saturate(servers[i], &queries, o)?;
            let r = &mut results[i];
            r.qps.push(perf.qps);
            r.lost_saturated.push(perf.lost as f64);
            r.cpu_us_per_query.push(cpu);
            let _ = perf.completed;
        }
        for k in 0..servers.len() {
            let i = (k + run) % servers.len();
            let (p50, p99, lost) = latency(servers[i], &queries, o)?;
            let r = &mut results[i];
            r.p50_ms.push(p50);
            r.p99_ms.push(p99);
            r.lost_fixed.push(lost as f64);
        }
    }
    Ok(DnsResults {
        services: plan.len(),
        names: plan.len() * 7,
        seconds: o.seconds,
        latency_qps: o.latency_qps,
        latency_seconds: o.latency_seconds,
        clients: o.clients,
        threads: o.threads,
        server_threads: o.server_threads,
        runs: o.runs,
        servers: results,
    })
}
