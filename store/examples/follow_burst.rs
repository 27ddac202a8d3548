//! How a burst of records reaches a [`Follower`]: writes N keys (default
//! 5,000) under `/weft/hosts/` in transactions of B (default 100) from
//! another writer, as simulated hosts joining do, and reports how long the
//! writes took, when the follower had the last one, and in how many
//! `Update::Changes` they came, on the embedded store and on a throwaway
//! etcd (Debian's `etcd-server`).
//!
//! `cargo run --release -p weft-store --example follow_burst [N] [B] [sqlite|etcd]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use weft_store::testing::TestStore;
use weft_store::{Follower, Update};

/// A host record's size and shape (about 300 bytes of JSON).
fn record(i: usize) -> Vec<u8> {
    format!(
        r#"{{"host":"h{i:05}","underlay":"192.0.2.{}","block":"10.42.{}.{}/28","backend":"wireguard","wg":{{"key":"{:0>43}=","port":51820}},"mtu":1420,"version":"0.1.0","started_ms":1764400000000}}"#,
        i % 250,
        i / 16 % 256,
        i % 16 * 16,
        i
    )
    .into_bytes()
}

async fn burst(f: TestStore, backend: &str, n: usize, batch: usize) {
    let mut follower = Follower::new(f.store(), "/weft/hosts/");
    let first = follower.next().await;
    assert!(matches!(first, Update::Snapshot(_)));
    let mut writer = f.batch_writer().await;
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let mut got = 0;
        let mut sizes = Vec::new();
        let mut decode = Duration::ZERO;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(30), follower.next()).await {
                Ok(Update::Changes { events, .. }) => {
                    let t = Instant::now();
                    for ev in &events {
                        let _: serde_json::Value = serde_json::from_slice(&ev.kv.value).unwrap();
                    }
                    decode += t.elapsed();
                    got += events.len();
                    sizes.push(events.len());
                }
                Ok(Update::Snapshot(_)) => panic!("relisted during the burst"),
                Err(_) => panic!("only {got} of {n} changes within 30 s"),
            }
        }
        (started.elapsed(), sizes, decode)
    });
    let mut keys: Vec<usize> = (0..n).collect();
    // Random order, as hosts joining: a fixed shuffle.
    for i in (1..n).rev() {
        keys.swap(i, (i * 7919 + 13) % (i + 1));
    }
    for chunk in keys.chunks(batch) {
        let kvs = chunk
            .iter()
            .map(|&i| (format!("/weft/hosts/h{i:05}"), record(i)))
            .collect();
        writer.put(kvs).await;
    }
    let wrote = started.elapsed();
    let (all, sizes, decode) = reader.await.unwrap();
    let max = sizes.iter().max().copied().unwrap_or(0);
    println!(
        "{backend}: {n} keys in {} txns of {batch}: written in {:.1} ms, all at the follower after {:.1} ms, \
         {} Changes (largest {max}, {:.0} events on average), decoding them as JSON took {:.1} ms",
        n.div_ceil(batch),
        wrote.as_secs_f64() * 1e3,
        all.as_secs_f64() * 1e3,
        sizes.len(),
        n as f64 / sizes.len() as f64,
        decode.as_secs_f64() * 1e3,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(5_000, |a| a.parse().unwrap());
    let batch: usize = args.next().map_or(100, |a| a.parse().unwrap());
    let only = args.next();
    if only.as_deref() != Some("etcd") {
        burst(TestStore::sqlite().await, "sqlite", n, batch).await;
    }
    if only.as_deref() != Some("sqlite") {
        burst(TestStore::etcd().await, "etcd", n, batch).await;
    }
}
