//! `weft-bench ipam-alloc`: the IPAM allocation and release rate of one
//! process, per store backend (no root).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::ValueEnum;
use weft_ipam::{Ipam, IpamConfig, Owner};
use weft_store::testing::TestStore;
use weft_store::DynStore;

use crate::sys;

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum Backend {
    Sqlite,
    Etcd,
}

struct Rates {
    alloc_per_s: f64,
    release_per_s: f64,
    allocations: usize,
}

pub async fn run(backends: &[Backend], blocks: usize, runs: usize) -> Result<()> {
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
        let alloc: Vec<f64> = results.iter().map(|r| r.alloc_per_s).collect();
        let release: Vec<f64> = results.iter().map(|r| r.release_per_s).collect();
        let all = alloc
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {backend:?} | {} | {:.0} | {:.0} | {all} |",
            results[0].allocations,
            sys::median(&alloc),
            sys::median(&release)
        );
    }
    Ok(())
}

/// Fills `blocks` host blocks (one per simulated host), then releases
/// everything, timing each phase.
async fn one_run(store: DynStore, blocks: usize) -> Result<Rates> {
    let ipam = Ipam::new(store, IpamConfig::default(), weft_model::DEFAULT_PREFIX).await?;
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
