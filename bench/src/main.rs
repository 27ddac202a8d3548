//! weft's benchmarks. Each prints its figures as a Markdown table.
//!
//! `weft-bench ipam-alloc`: endpoint allocation and release rate of one
//! process, on the embedded SQLite store and on a real etcd (started on
//! 127.0.0.1 for the run), side by side.
//!
//! `weft-bench cni-latency`: CNI ADD/DEL latency, weft beside the reference
//! bridge + host-local plugins (root).
//!
//! `weft-bench dns`: dnsd beside dnsmasq and unbound under dnsperf, on
//! 127.0.0.1 (see bench/src/dns.rs).

mod cni;
mod dns;
mod tunnel;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use weft_ipam::{Ipam, IpamConfig, Owner};
use weft_store::testing::TestStore;
use weft_store::DynStore;

#[derive(Parser)]
#[command(about = "weft benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Allocation and release rate of one process, per store backend.
    IpamAlloc {
        /// Backends to measure.
        #[arg(long, value_enum, default_values_t = [Backend::Sqlite, Backend::Etcd])]
        backend: Vec<Backend>,
        /// Host blocks to fill (each /24 holds 253 endpoints).
        #[arg(long, default_value_t = 4)]
        blocks: usize,
        /// Repeat each measurement this many times and report the median.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },

    /// Container-to-container TCP throughput over weft's tunnels beside the
    /// raw underlay (needs root).
    Tunnel {
        /// Backends to measure.
        #[arg(long, default_values_t = ["wireguard".to_string(), "vxlan".to_string()])]
        backend: Vec<String>,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        secs: u32,
    },
    /// CNI ADD/DEL latency of weft beside the reference bridge + host-local
    /// plugins (needs root; builds a lab host in a network namespace).
    CniLatency {
        /// Containers per plugin.
        #[arg(long, default_value_t = 50)]
        containers: usize,
    },
    /// DNS rate of dnsd beside dnsmasq and unbound (dnsperf, 127.0.0.1).
    Dns {
        /// Services to serve (10 per stack, 2 containers each).
        #[arg(long, default_value_t = 2000)]
        services: usize,
        /// Seconds of the saturated run per server.
        #[arg(long, default_value_t = 10)]
        secs: u32,
        /// The fixed rate of the latency run.
        #[arg(long, default_value_t = 20_000)]
        latency_qps: u32,
        /// Seconds of the latency run per server.
        #[arg(long, default_value_t = 5)]
        latency_secs: u32,
        /// dnsperf clients (sockets) in the saturated run.
        #[arg(long, default_value_t = 8)]
        clients: u32,
        /// dnsperf threads in the saturated run.
        #[arg(long, default_value_t = 2)]
        threads: u32,
        /// Threads of dnsd and unbound (dnsmasq has one).
        #[arg(long, default_value_t = 2)]
        server_threads: u32,
    },
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Backend {
    Sqlite,
    Etcd,
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().bench {
        Bench::IpamAlloc {
            backend,
            blocks,
            runs,
        } => ipam_alloc(&backend, blocks, runs.max(1)).await,
        Bench::Tunnel { backend, secs } => {
            tokio::task::spawn_blocking(move || tunnel::run(&backend, secs.max(1))).await?
        }
        Bench::Dns {
            services,
            secs,
            latency_qps,
            latency_secs,
            clients,
            threads,
            server_threads,
        } => {
            dns::run(dns::Options {
                services: services.max(10),
                seconds: secs.max(1),
                latency_qps: latency_qps.max(1),
                latency_seconds: latency_secs.max(1),
                clients: clients.max(1),
                threads: threads.max(1),
                server_threads: server_threads.max(1),
            })
            .await
        }
        Bench::CniLatency { containers } => {
            tokio::task::spawn_blocking(move || cni::run(containers.max(1))).await?
        }
    }
}

struct Rates {
    alloc_per_s: f64,
    release_per_s: f64,
    allocations: usize,
}

async fn ipam_alloc(backends: &[Backend], blocks: usize, runs: usize) -> Result<()> {
    println!(
        "| backend | allocations per run | allocations/s (median of {runs}) | releases/s | runs (alloc/s) |"
    );
    println!("|---|---|---|---|---|");
    for &backend in backends {
        let mut results = Vec::new();
        for _ in 0..runs {
            // A fresh store per run, so every run starts from the same state.
            let store = match backend {
                Backend::Sqlite => TestStore::sqlite().await,
                Backend::Etcd => TestStore::etcd().await,
            };
            results.push(one_run(store.store(), blocks).await?);
        }
        let mut alloc: Vec<f64> = results.iter().map(|r| r.alloc_per_s).collect();
        let mut release: Vec<f64> = results.iter().map(|r| r.release_per_s).collect();
        let all = alloc
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {backend:?} | {} | {:.0} | {:.0} | {all} |",
            results[0].allocations,
            median(&mut alloc),
            median(&mut release)
        );
    }
    Ok(())
}

/// Fills `blocks` host blocks (one per simulated host), then releases
/// everything, timing each phase.
async fn one_run(store: DynStore, blocks: usize) -> Result<Rates> {
    let ipam = Ipam::new(store, IpamConfig::default(), "/weft/").await?;
    let mut hosts = Vec::new();
    for h in 0..blocks {
        hosts.push(ipam.lease_block(&format!("bench-host-{h}")).await?);
    }
    let per_block = weft_ipam::plan::capacity(hosts[0].block) as usize;
    let owner = |h: usize, i: usize| Owner::new(format!("ctr-{h}-{i}"), "eth0");

    let t = Instant::now();
    for (h, block) in hosts.iter().enumerate() {
        for i in 0..per_block {
            ipam.allocate(block, &owner(h, i)).await?;
        }
    }
    let alloc = t.elapsed();

    let t = Instant::now();
    for (h, block) in hosts.iter().enumerate() {
        for i in 0..per_block {
            if ipam.release(block, &owner(h, i)).await?.is_none() {
                bail!("release of ctr-{h}-{i} found no address");
            }
        }
    }
    let release = t.elapsed();
    let n = blocks * per_block;
    Ok(Rates {
        alloc_per_s: rate(n, alloc),
        release_per_s: rate(n, release),
        allocations: n,
    })
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
