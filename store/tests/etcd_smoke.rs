//! Smoke tests of the etcd backend against a throwaway etcd server.
//!
//! Run with `cargo test -p weft-store --features testing --test etcd_smoke`.
//! Needs Debian's etcd-server installed; fails, with what to install, without it.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "testing")]

use std::time::{Duration, Instant};

use weft_store::testing::EtcdServer;
use weft_store::{CasOutcome, EtcdStore, EventKind, Expect, Store, StoreError, Watch};

/// Starts a server. A missing etcd fails the test (never a silent skip):
/// the error says which package to install.
fn server() -> Option<EtcdServer> {
    match EtcdServer::start() {
        Ok(s) => Some(s),
        Err(e) => panic!("etcd did not start: {e}"),
    }
}

async fn next(watch: &mut Watch) -> weft_store::Event {
    tokio::time::timeout(Duration::from_secs(5), watch.recv())
        .await
        .expect("watch event within 5s")
        .expect("watch still open")
        .expect("watch event, not error")
}

#[tokio::test]
async fn kv_and_cas() {
    let Some(server) = server() else { return };
    let store = EtcdStore::connect(server.config()).await.unwrap();
    assert_eq!(store.describe(), format!("etcd:{}", server.endpoint()));

    assert_eq!(store.get("/t/a").await.unwrap(), None);
    let r1 = store.put("/t/b", b"2", None).await.unwrap();
    let r2 = store.put("/t/a", b"1", None).await.unwrap();
    assert_eq!(r2, r1 + 1);
    store.put("/u/x", b"other prefix", None).await.unwrap();
    let a = store.get("/t/a").await.unwrap().unwrap();
    assert_eq!(a.value, b"1");
    assert_eq!((a.create_revision, a.mod_revision, a.version), (r2, r2, 1));
    assert_eq!(a.lease, None);

    let range = store.get_prefix("/t/").await.unwrap();
    let keys: Vec<_> = range.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/a", "/t/b"]);
    assert_eq!(range.revision, r2 + 1);
    assert_eq!(store.revision().await.unwrap(), r2 + 1);

    // CAS: absent on an existing key conflicts and returns the current kv.
    match store
        .compare_and_swap("/t/a", Expect::Absent, b"x", None)
        .await
        .unwrap()
    {
        CasOutcome::Conflict(Some(kv)) => assert_eq!(kv, a),
        other => panic!("expected conflict, got {other:?}"),
    }
    // Wrong mod_revision on a missing key: conflict with None.
    assert_eq!(
        store
            .compare_and_swap("/t/none", Expect::ModRevision(1), b"x", None)
            .await
            .unwrap(),
        CasOutcome::Conflict(None)
    );
    let done = store
        .compare_and_swap("/t/a", Expect::ModRevision(a.mod_revision), b"1b", None)
        .await
        .unwrap();
    let CasOutcome::Done(rev) = done else {
        panic!("expected done, got {done:?}")
    };
    let a2 = store.get("/t/a").await.unwrap().unwrap();
    assert_eq!(
        (a2.mod_revision, a2.version, a2.value),
        (rev, 2, b"1b".to_vec())
    );
    assert!(store
        .compare_and_swap("/t/c", Expect::Absent, b"3", None)
        .await
        .unwrap()
        .is_done());

    // compare_and_delete.
    assert!(matches!(
        store
            .compare_and_delete("/t/a", a.mod_revision)
            .await
            .unwrap(),
        CasOutcome::Conflict(Some(_))
    ));
    let del = store.compare_and_delete("/t/a", rev).await.unwrap();
    assert!(del.is_done(), "{del:?}");
    assert_eq!(store.get("/t/a").await.unwrap(), None);

    assert!(store.delete("/t/b").await.unwrap());
    assert!(!store.delete("/t/b").await.unwrap());

    // etcd rejects an empty key.
    let err = store.put("", b"v", None).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid { .. }), "{err}");

    // Empty values and non-ASCII keys round-trip.
    store.put("/t/ü", b"", None).await.unwrap();
    assert_eq!(store.get("/t/ü").await.unwrap().unwrap().value, b"");
}

#[tokio::test]
async fn leases() {
    let Some(server) = server() else { return };
    let store = EtcdStore::connect(server.config()).await.unwrap();

    let lease = store.lease_grant(Duration::from_millis(300)).await.unwrap();
    store.put("/l/k", b"v", Some(lease)).await.unwrap();
    assert_eq!(store.get("/l/k").await.unwrap().unwrap().lease, Some(lease));
    store.lease_keep_alive(lease).await.unwrap();
    let cas = store
        .compare_and_swap("/l/k2", Expect::Absent, b"v", Some(lease))
        .await
        .unwrap();
    assert!(cas.is_done());

    // The lease (TTL rounded up to 1 s; etcd's minimum is 2 s here) expires
    // and takes its keys with it.
    let started = Instant::now();
    while store.get("/l/k").await.unwrap().is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "leased key still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("leased key vanished after {:?}", started.elapsed());
    assert_eq!(store.get("/l/k2").await.unwrap(), None);

    let err = store.lease_keep_alive(lease).await.unwrap_err();
    assert!(
        matches!(err, StoreError::LeaseNotFound { lease: l, .. } if l == lease),
        "{err}"
    );
    let err = store.put("/l/k3", b"v", Some(lease)).await.unwrap_err();
    assert!(matches!(err, StoreError::LeaseNotFound { .. }), "{err}");
    // Revoking an unknown lease is fine.
    store.lease_revoke(lease).await.unwrap();

    // Revoking deletes the keys at once.
    let lease = store.lease_grant(Duration::from_secs(30)).await.unwrap();
    store.put("/l/r", b"v", Some(lease)).await.unwrap();
    store.lease_revoke(lease).await.unwrap();
    assert_eq!(store.get("/l/r").await.unwrap(), None);
}

#[tokio::test]
async fn watches() {
    let Some(server) = server() else { return };
    let store = EtcdStore::connect(server.config()).await.unwrap();

    let before = store.put("/w/a", b"0", None).await.unwrap();
    let mut watch = store.watch_prefix("/w/", 0).await.unwrap();
    // Written right after watch_prefix returns: must be seen.
    let r1 = store.put("/w/a", b"1", None).await.unwrap();
    store.put("/other", b"x", None).await.unwrap();
    let r2 = store.put("/w/b", b"2", None).await.unwrap();
    let r3 = store.delete("/w/a").await.map(|_| r2 + 1).unwrap();

    let e = next(&mut watch).await;
    assert_eq!(
        (e.kind, e.kv.key.as_str(), e.revision()),
        (EventKind::Put, "/w/a", r1)
    );
    assert_eq!(e.kv.value, b"1");
    assert_eq!(e.kv.version, 2);
    let e = next(&mut watch).await;
    assert_eq!(
        (e.kind, e.kv.key.as_str(), e.revision()),
        (EventKind::Put, "/w/b", r2)
    );
    let e = next(&mut watch).await;
    assert_eq!(
        (e.kind, e.kv.key.as_str(), e.revision()),
        (EventKind::Delete, "/w/a", r3)
    );
    assert!(e.kv.value.is_empty());

    // From an old revision: replays history in order.
    let mut old = store.watch_prefix("/w/", before).await.unwrap();
    let revs: Vec<_> = [
        next(&mut old).await,
        next(&mut old).await,
        next(&mut old).await,
        next(&mut old).await,
    ]
    .iter()
    .map(|e| (e.kind, e.revision()))
    .collect();
    assert_eq!(
        revs,
        [
            (EventKind::Put, before),
            (EventKind::Put, r1),
            (EventKind::Put, r2),
            (EventKind::Delete, r3)
        ]
    );
    drop(old);

    // Many events arrive in order.
    let mut last = r3;
    for i in 0..200 {
        store
            .put(&format!("/w/n{}", i % 7), i.to_string().as_bytes(), None)
            .await
            .unwrap();
    }
    for _ in 0..200 {
        let e = next(&mut watch).await;
        assert_eq!(e.revision(), last + 1);
        last = e.revision();
    }

    // Watching compacted history fails with Compacted.
    let mut raw = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .unwrap();
    raw.compact(last, None).await.unwrap();
    // watch_prefix itself fails, as with the SQLite backend.
    let err = match store.watch_prefix("/w/", before).await {
        Err(e) => e,
        Ok(_) => panic!("watch from compacted history must fail"),
    };
    assert!(
        matches!(err, StoreError::Compacted { requested, compacted, .. }
            if requested == before && compacted == last),
        "{err}"
    );
    // From the compaction revision on, history is still there.
    let mut w = store.watch_prefix("/w/", last).await.unwrap();
    assert_eq!(next(&mut w).await.revision(), last);
    // A watch from a future revision waits for it.
    let mut future = store.watch_prefix("/w/", last + 2).await.unwrap();
    store.put("/w/f1", b"", None).await.unwrap();
    let r = store.put("/w/f2", b"", None).await.unwrap();
    assert_eq!(next(&mut future).await.revision(), r);

    // Dropping the watches cancels them in etcd.
    assert_eq!(etcd_watchers(&server), 3);
    drop((watch, w, future));
    let started = Instant::now();
    while etcd_watchers(&server) != 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "watchers left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many watchers etcd has, from its Prometheus metrics.
fn etcd_watchers(server: &EtcdServer) -> u64 {
    use std::io::{Read, Write};
    let addr = server.endpoint().trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
        .expect("watcher metric")
        .trim()
        .parse()
        .unwrap()
}

/// Measures one call while etcd is down.
async fn down_call<T: std::fmt::Debug>(
    what: &str,
    f: impl std::future::Future<Output = weft_store::Result<T>>,
) -> Duration {
    let started = Instant::now();
    let result = f.await;
    let took = started.elapsed();
    eprintln!("{what} while etcd is down: {took:?}: {result:?}");
    let err = result.expect_err("must fail while etcd is down");
    assert!(err.is_transient(), "{what}: {err}");
    assert!(took < Duration::from_millis(3000), "{what} took {took:?}");
    took
}

#[tokio::test]
async fn outage_and_recovery() {
    let Some(mut server) = server() else { return };
    let store = EtcdStore::connect(server.config()).await.unwrap();
    store.put("/o/a", b"1", None).await.unwrap();
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    let mut watch = store.watch_prefix("/o/", 0).await.unwrap();

    server.stop();

    // The open watch ends with Unavailable.
    let started = Instant::now();
    let item = tokio::time::timeout(Duration::from_secs(5), watch.recv())
        .await
        .expect("watch notices the outage within 5s");
    eprintln!("watch ended after {:?}: {item:?}", started.elapsed());
    assert!(
        matches!(item, Some(Err(StoreError::Unavailable { .. }))),
        "{item:?}"
    );
    assert!(watch.recv().await.is_none());

    down_call("get", store.get("/o/a")).await;
    down_call("put", store.put("/o/a", b"2", None)).await;
    down_call(
        "cas",
        store.compare_and_swap("/o/a", Expect::Absent, b"2", None),
    )
    .await;
    down_call("revision", store.revision()).await;
    down_call("lease_keep_alive", store.lease_keep_alive(lease)).await;
    down_call("watch_prefix", async {
        store.watch_prefix("/o/", 0).await.map(|_| ())
    })
    .await;

    // A store created while etcd is down: connect succeeds, calls fail.
    let late = EtcdStore::connect(server.config()).await.unwrap();
    down_call("get on a store connected while down", late.get("/o/a")).await;

    server.restart().unwrap();

    // The same stores work again, at once.
    let started = Instant::now();
    assert_eq!(store.get("/o/a").await.unwrap().unwrap().value, b"1");
    eprintln!("first call after restart took {:?}", started.elapsed());
    store.put("/o/a", b"3", None).await.unwrap();
    store.lease_keep_alive(lease).await.unwrap();
    assert_eq!(late.get("/o/a").await.unwrap().unwrap().value, b"3");
    let mut watch = store.watch_prefix("/o/", 0).await.unwrap();
    let rev = late.put("/o/b", b"4", None).await.unwrap();
    assert_eq!(next(&mut watch).await.revision(), rev);
}

fn signal(server: &EtcdServer, sig: &str) {
    let pid = server.pid().expect("etcd runs");
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// etcd hangs (frozen with SIGSTOP: connections are accepted by the kernel
/// but nothing answers): calls time out after request_timeout instead of
/// hanging, and work again once etcd resumes.
#[tokio::test]
async fn frozen_etcd_times_out_and_recovers() {
    let Some(server) = server() else { return };
    let store = EtcdStore::connect(server.config()).await.unwrap();
    store.put("/f/a", b"1", None).await.unwrap();

    signal(&server, "STOP");
    let took = down_call("get (frozen)", store.get("/f/a")).await;
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    down_call("watch_prefix (frozen)", async {
        store.watch_prefix("/f/", 0).await.map(|_| ())
    })
    .await;
    signal(&server, "CONT");

    let started = Instant::now();
    assert_eq!(store.get("/f/a").await.unwrap().unwrap().value, b"1");
    eprintln!("first call after resume took {:?}", started.elapsed());
    let mut watch = store.watch_prefix("/f/", 0).await.unwrap();
    let rev = store.put("/f/b", b"2", None).await.unwrap();
    assert_eq!(next(&mut watch).await.revision(), rev);
}

/// A server that cannot come up reports why, with the tail of its log.
#[test]
fn restart_failure_reports_log_tail() {
    let Some(mut server) = server() else { return };
    server.stop();
    let addr = server.endpoint().trim_start_matches("http://").to_string();
    let _squatter = std::net::TcpListener::bind(&addr).unwrap();
    let started = Instant::now();
    let err = server.restart().unwrap_err().to_string();
    eprintln!("restart failed after {:?}: {err}", started.elapsed());
    assert!(err.contains("did not come up"), "{err}");
    assert!(err.contains("address already in use"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A follower whose watch broke when etcd went away resumes it from the
/// revision after the last update once etcd is back: what was written after
/// the outage arrives as changes (no relisting), within about a second
/// (`follow::RESUME_BACKOFF`), whatever the outage's length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_resumes_its_watch_after_an_outage() {
    use weft_store::{DynStore, Follower, Update};
    let Some(mut server) = server() else { return };
    let store: DynStore = std::sync::Arc::new(EtcdStore::connect(server.config()).await.unwrap());
    store.put("/fr/a", b"1", None).await.unwrap();
    let mut follower = Follower::new(store.clone(), "/fr/");
    let first = tokio::time::timeout(Duration::from_secs(5), follower.next())
        .await
        .unwrap();
    assert!(matches!(first, Update::Snapshot(_)), "{first:?}");

    // The follower waits for changes while etcd goes away for 4 s: its
    // resume attempts fail and back off meanwhile.
    let next = tokio::spawn(async move {
        let update = tokio::time::timeout(Duration::from_secs(30), follower.next())
            .await
            .expect("an update within 30 s");
        (update, Instant::now())
    });
    server.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    server.restart().unwrap();
    let back = Instant::now();
    store.put("/fr/b", b"2", None).await.unwrap();
    let (update, at) = next.await.unwrap();
    let took = at.duration_since(back);
    eprintln!("change after the outage followed {took:?} after etcd was back: {update:?}");
    match update {
        Update::Changes { events, .. } => {
            assert_eq!(events.len(), 1, "{events:?}");
            assert_eq!(events[0].kv.key, "/fr/b");
        }
        other => panic!("resumed with a relisting instead of the change: {other:?}"),
    }
    assert!(took < Duration::from_millis(1500), "took {took:?}");
}
