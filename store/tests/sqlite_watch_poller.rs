//! The embedded store serves all watches of one opened store from one poller
//! thread, which ends with the last watch. One test in this binary, so no
//! other test's threads are counted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use weft_store::{SqliteStore, Store, Watch};

/// This process's store poller threads (named `weft-store-watch`, which
/// the kernel cuts to 15 bytes).
fn pollers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.as_ref().unwrap().path().join("comm"));
            comm.is_ok_and(|c| c.starts_with("weft-store-watc"))
        })
        .count()
}

async fn next_key(w: &mut Watch) -> String {
    match tokio::time::timeout(Duration::from_secs(10), w.recv()).await {
        Ok(Some(Ok(ev))) => ev.kv.key,
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn pollers_within(want: usize, limit: Duration) {
    let t = Instant::now();
    while pollers() != want {
        assert!(
            t.elapsed() < limit,
            "{} poller threads, want {want}",
            pollers()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_poller_thread_per_store_for_all_its_watches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(pollers(), 0, "no watch, no thread");

    // As many watches as a netd with its dnsd opens, on five prefixes.
    let mut watches = Vec::new();
    for i in 0..15 {
        watches.push((
            i % 5,
            store
                .watch_prefix(&format!("/p{}/", i % 5), 0)
                .await
                .unwrap(),
        ));
    }
    // (A new thread names itself once it runs, hence the wait.)
    pollers_within(1, Duration::from_secs(2)).await;
    for p in 0..5 {
        store.put(&format!("/p{p}/k"), b"v", None).await.unwrap();
    }
    for (p, w) in &mut watches {
        assert_eq!(next_key(w).await, format!("/p{p}/k"));
    }

    // Another opened store (another process's handle) has its own, and its
    // writes reach this store's watches too.
    let other = SqliteStore::open(&path).unwrap();
    let mut other_watch = other.watch_prefix("/p0/", 0).await.unwrap();
    pollers_within(2, Duration::from_secs(2)).await;
    other.put("/p0/from-other", b"v", None).await.unwrap();
    assert_eq!(next_key(&mut watches[0].1).await, "/p0/from-other");
    assert_eq!(next_key(&mut other_watch).await, "/p0/from-other");

    // The threads end with their last watch; a new watch starts one again
    // and resumes from history.
    drop(other_watch);
    pollers_within(1, Duration::from_secs(2)).await;
    drop(watches);
    pollers_within(0, Duration::from_secs(2)).await;
    let mut again = store.watch_prefix("/p1/", 1).await.unwrap();
    assert_eq!(next_key(&mut again).await, "/p1/k");
    pollers_within(1, Duration::from_secs(2)).await;
}
