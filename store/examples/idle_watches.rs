//! Idle cost of the embedded store's watches, as a netd sees it: opens
//! WATCHES followers (default 15: netd's 12 plus its in-process dnsd's 3) on
//! one SQLite store, waits for their snapshots, then idles SECS seconds
//! (default 10) and prints the process's CPU time and thread count. Then it
//! times one write from another handle (another process's) until a follower
//! sees it, and one write through the same handle.
//!
//! `cargo run --release -p weft-store --example idle_watches [WATCHES] [SECS]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_store::{Follower, SqliteStore, Store, Update};

/// User plus system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(rc, 0, "getrusage failed");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// This process's threads, and how many of them are the store's (named
/// `weft-store-*`).
fn threads() -> (usize, usize) {
    let mut all = 0;
    let mut store = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let comm = std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap_or_default();
        all += 1;
        store += usize::from(comm.starts_with("weft-store"));
    }
    (all, store)
}

/// Times a write through `writer` until `follower` hands it over.
async fn one_write(writer: &dyn Store, follower: &mut Follower, key: &str) -> Duration {
    let started = Instant::now();
    writer.put(key, b"x", None).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), follower.next()).await {
            Ok(Update::Changes { events, .. }) if events.iter().any(|e| e.kv.key == key) => {
                return started.elapsed()
            }
            Ok(_) => {}
            Err(_) => panic!("the follower did not see {key} within 5 s"),
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let watches: usize = args.next().map_or(15, |a| a.parse().unwrap());
    let secs: u64 = args.next().map_or(10, |a| a.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    for i in 0..100 {
        store
            .put(&format!("/weft/p{}/k{i}", i % 5), b"{}", None)
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..watches {
        let mut f = Follower::new(store.clone(), format!("/weft/p{}/", w % 5));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tasks.push(tokio::spawn(async move {
            let first = f.next().await;
            let _ = ready_tx.send(first.revision());
            loop {
                f.next().await;
            }
        }));
        ready_rx.await.unwrap();
    }
    // Let every watch settle into its idle loop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu0, t0) = (cpu_time(), Instant::now());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (cpu, wall) = (cpu_time() - cpu0, t0.elapsed());
    println!(
        "{watches} watches idle {:.1} s: cpu {:.3} s = {:.2} % of a core; threads {} (the store's: {})",
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
        threads().0,
        threads().1,
    );
    for t in tasks {
        t.abort();
    }

    let other: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let mut f = Follower::new(store.clone(), "/weft/lat/");
    f.next().await;
    let mut remote = Vec::new();
    let mut local = Vec::new();
    for i in 0..20 {
        remote.push(one_write(&*other, &mut f, &format!("/weft/lat/r{i}")).await);
        local.push(one_write(&*store, &mut f, &format!("/weft/lat/l{i}")).await);
    }
    remote.sort();
    local.sort();
    println!(
        "write to follower, median of 20: another handle {:?} (max {:?}); same handle {:?} (max {:?})",
        remote[10], remote[19], local[10], local[19]
    );
}
