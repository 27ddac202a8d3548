//! The store contract: the same test functions run against the embedded
//! SQLite backend (`sqlite::*`) and a real etcd server (`etcd::*`).
//!
//! The etcd tests start Debian's `etcd` (package `etcd-server`) on 127.0.0.1
//! with a free port and a temporary data dir.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use weft_store::testing::TestStore;
use weft_store::{
    CasOutcome, DynStore, Event, EventKind, Expect, Follower, KeyValue, LeaseId, Range, Revision,
    SqliteStore, Store, StoreError, Update, Watch,
};

async fn next_event(w: &mut Watch) -> Event {
    match tokio::time::timeout(Duration::from_secs(10), w.recv()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within 10 s"),
    }
}

/// Asserts that no event arrives within `wait`.
async fn no_event(w: &mut Watch, wait: Duration) {
    if let Ok(item) = tokio::time::timeout(wait, w.recv()).await {
        panic!("unexpected watch item: {item:?}");
    }
}

async fn put_get_delete(f: TestStore) {
    let s = &f.store();
    assert_eq!(s.get("/t/a").await.unwrap(), None);
    let r1 = s.put("/t/a", b"one", None).await.unwrap();
    let kv = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!(kv.value, b"one");
    assert_eq!(kv.version, 1);
    assert_eq!(kv.create_revision, r1);
    assert_eq!(kv.mod_revision, r1);
    assert_eq!(kv.lease, None);

    let r2 = s.put("/t/a", b"two", None).await.unwrap();
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");
    let kv = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.version), (&b"two"[..], 2));
    assert_eq!((kv.create_revision, kv.mod_revision), (r1, r2));
    assert!(s.revision().await.unwrap() >= r2);

    assert!(s.delete("/t/a").await.unwrap());
    assert_eq!(s.get("/t/a").await.unwrap(), None);
    assert!(
        !s.delete("/t/a").await.unwrap(),
        "second delete finds nothing"
    );

    // Recreated keys start over.
    let r3 = s.put("/t/a", b"three", None).await.unwrap();
    let kv = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version), (r3, 1));
}

async fn prefix_is_sorted_and_bounded(f: TestStore) {
    let s = &f.store();
    for key in ["/p/b", "/p/a", "/p/a/1", "/p", "/q/a", "/p0", "/o/z"] {
        s.put(key, key.as_bytes(), None).await.unwrap();
    }
    let last = s.put("/p/c", b"c", None).await.unwrap();
    let range = s.get_prefix("/p/").await.unwrap();
    let keys: Vec<&str> = range.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/p/a", "/p/a/1", "/p/b", "/p/c"]);
    assert!(range
        .kvs
        .iter()
        .all(|kv| kv.value == kv.key.as_bytes() || kv.key == "/p/c"));
    assert!(range.revision >= last);
    assert!(s.get_prefix("/nothing/").await.unwrap().kvs.is_empty());
}

async fn cas_conflicts(f: TestStore) {
    let s = &f.store();
    let rev = match s
        .compare_and_swap("/c/k", Expect::Absent, b"v1", None)
        .await
        .unwrap()
    {
        CasOutcome::Done(r) => r,
        other => panic!("create on absent key: {other:?}"),
    };
    // Creating again conflicts and shows what is there.
    match s
        .compare_and_swap("/c/k", Expect::Absent, b"v2", None)
        .await
        .unwrap()
    {
        CasOutcome::Conflict(Some(kv)) => {
            assert_eq!((kv.value, kv.mod_revision), (b"v1".to_vec(), rev))
        }
        other => panic!("second create must conflict: {other:?}"),
    }
    // A stale revision conflicts.
    let outcome = s
        .compare_and_swap("/c/k", Expect::ModRevision(rev - 1), b"v2", None)
        .await
        .unwrap();
    assert!(
        matches!(outcome, CasOutcome::Conflict(Some(_))),
        "{outcome:?}"
    );
    // Expecting a revision on a missing key conflicts with None.
    let outcome = s
        .compare_and_swap("/c/missing", Expect::ModRevision(rev), b"x", None)
        .await
        .unwrap();
    assert_eq!(outcome, CasOutcome::Conflict(None));
    // The right revision wins.
    let rev2 = match s
        .compare_and_swap("/c/k", Expect::ModRevision(rev), b"v2", None)
        .await
        .unwrap()
    {
        CasOutcome::Done(r) => r,
        other => panic!("swap with current revision: {other:?}"),
    };
    assert_eq!(s.get("/c/k").await.unwrap().unwrap().value, b"v2");
    // Conditional delete: stale loses, current wins.
    assert!(!s.compare_and_delete("/c/k", rev).await.unwrap().is_done());
    assert!(s.get("/c/k").await.unwrap().is_some());
    assert!(s.compare_and_delete("/c/k", rev2).await.unwrap().is_done());
    assert_eq!(s.get("/c/k").await.unwrap(), None);
    assert_eq!(
        s.compare_and_delete("/c/k", rev2).await.unwrap(),
        CasOutcome::Conflict(None)
    );
}

/// Many writers doing read-modify-write through CAS on two handles: no
/// increment is lost.
async fn cas_no_lost_update(f: TestStore) {
    let handles = [f.store(), f.another_handle().await];
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = handles[t % 2].clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..15 {
                loop {
                    let current = s.get("/c/counter").await.unwrap();
                    let (expect, n) = match &current {
                        None => (Expect::Absent, 0u64),
                        Some(kv) => (
                            Expect::ModRevision(kv.mod_revision),
                            std::str::from_utf8(&kv.value).unwrap().parse().unwrap(),
                        ),
                    };
                    let next = (n + 1).to_string();
                    if s.compare_and_swap("/c/counter", expect, next.as_bytes(), None)
                        .await
                        .unwrap()
                        .is_done()
                    {
                        break;
                    }
                    conflicts += 1;
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    let kv = f.store().get("/c/counter").await.unwrap().unwrap();
    assert_eq!(
        kv.value, b"120",
        "8 writers x 15 increments ({conflicts} CAS conflicts retried)"
    );
    assert_eq!(kv.version, 120);
}

async fn lease_expiry(f: TestStore) {
    let s = &f.store();
    let mut watch = s.watch_prefix("/l/", 0).await.unwrap();
    // etcd raises TTLs below its minimum (about 2 s with default timing).
    let lease = s.lease_grant(Duration::from_secs(2)).await.unwrap();
    s.put("/l/held", b"x", Some(lease)).await.unwrap();
    s.put("/l/kept", b"y", None).await.unwrap();
    assert_eq!(s.get("/l/held").await.unwrap().unwrap().lease, Some(lease));
    assert_eq!(next_event(&mut watch).await.kv.key, "/l/held");
    assert_eq!(next_event(&mut watch).await.kv.key, "/l/kept");

    // Kept alive for longer than the TTL, the key stays.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        s.lease_keep_alive(lease).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        s.get("/l/held").await.unwrap().is_some(),
        "kept-alive lease must not expire"
    );

    // Left alone, it expires: the key vanishes and watchers see a delete.
    let stopped = Instant::now();
    let ev = next_event(&mut watch).await;
    assert_eq!(
        (ev.kind, ev.kv.key.as_str()),
        (EventKind::Delete, "/l/held")
    );
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(8), "expiry took {took:?}");
    assert_eq!(s.get("/l/held").await.unwrap(), None);
    assert!(
        s.get("/l/kept").await.unwrap().is_some(),
        "keys without a lease stay"
    );

    // The expired lease is gone for good.
    assert!(matches!(
        s.lease_keep_alive(lease).await,
        Err(StoreError::LeaseNotFound { .. })
    ));
    assert!(matches!(
        s.put("/l/late", b"z", Some(lease)).await,
        Err(StoreError::LeaseNotFound { .. })
    ));
    assert_eq!(s.get("/l/late").await.unwrap(), None);

    // Revoking deletes the keys at once.
    let lease2 = s.lease_grant(Duration::from_secs(60)).await.unwrap();
    s.put("/l/a", b"1", Some(lease2)).await.unwrap();
    s.put("/l/b", b"2", Some(lease2)).await.unwrap();
    s.lease_revoke(lease2).await.unwrap();
    assert_eq!(
        s.get_prefix("/l/").await.unwrap().kvs.len(),
        1,
        "only /l/kept is left"
    );
    // Revoking an unknown lease is not an error.
    s.lease_revoke(lease2).await.unwrap();
}

async fn watch_ordering(f: TestStore) {
    let s = &f.store();
    let other = f.another_handle().await;
    let mut watch = s.watch_prefix("/w/", 0).await.unwrap();
    // Writes from another handle, interleaved with keys outside the prefix.
    let mut expected = Vec::new();
    for i in 0..40 {
        let key = format!("/w/k{}", i % 7);
        let rev = other
            .put(&key, format!("v{i}").as_bytes(), None)
            .await
            .unwrap();
        expected.push((EventKind::Put, key.clone(), format!("v{i}"), rev));
        other
            .put(&format!("/x/k{i}"), b"outside", None)
            .await
            .unwrap();
        if i % 5 == 4 {
            let before = other.revision().await.unwrap();
            assert!(other.delete(&key).await.unwrap());
            let rev = other.revision().await.unwrap();
            assert!(rev > before);
            expected.push((EventKind::Delete, key, String::new(), rev));
        }
    }
    let mut last = 0;
    for (kind, key, value, rev) in expected {
        let ev = next_event(&mut watch).await;
        assert_eq!((ev.kind, ev.kv.key.as_str()), (kind, key.as_str()));
        if kind == EventKind::Put {
            assert_eq!(ev.kv.value, value.as_bytes());
        }
        assert_eq!(ev.revision(), rev);
        assert!(ev.revision() > last, "events in revision order");
        last = ev.revision();
    }
    no_event(&mut watch, Duration::from_millis(300)).await;
}

/// A change reaches a watcher on another handle in under 200 ms (median of 10).
async fn watch_latency(f: TestStore) {
    let writer = f.another_handle().await;
    let mut watch = f.store().watch_prefix("/lat/", 0).await.unwrap();
    let mut took = Vec::new();
    for i in 0..10 {
        let t = Instant::now();
        writer
            .put("/lat/k", format!("{i}").as_bytes(), None)
            .await
            .unwrap();
        let ev = next_event(&mut watch).await;
        took.push(t.elapsed());
        assert_eq!(ev.kv.value, format!("{i}").as_bytes());
    }
    took.sort();
    let median = took[took.len() / 2];
    assert!(
        median < Duration::from_millis(200),
        "watch latency median {median:?}: {took:?}"
    );
}

/// A watch nobody reads for a while (more changes than it buffers) holds
/// up neither the writers nor another watch, and later delivers every change
/// in order.
async fn slow_watch_holds_up_nobody(f: TestStore) {
    const N: usize = 2_500;
    let s = &f.store();
    let mut slow = s.watch_prefix("/sw/", 0).await.unwrap();
    let mut other = s.watch_prefix("/sw/", 0).await.unwrap();
    let t = Instant::now();
    let reader = tokio::spawn(async move {
        for i in 0..N {
            assert_eq!(next_event(&mut other).await.kv.key, format!("/sw/{i:05}"));
        }
    });
    for i in 0..N {
        s.put(&format!("/sw/{i:05}"), b"v", None).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the read watch got every change within 30 s")
        .unwrap();
    let took = t.elapsed();
    let mut last = 0;
    for i in 0..N {
        let ev = next_event(&mut slow).await;
        assert_eq!(ev.kv.key, format!("/sw/{i:05}"));
        assert!(ev.revision() > last);
        last = ev.revision();
    }
    no_event(&mut slow, Duration::from_millis(100)).await;
    eprintln!("{N} puts reached a watch in {took:?}");
}

/// A watcher that stops and restarts (a new handle, as after a process
/// restart) resumes from the revision after the last one it saw and gets
/// exactly the changes it missed.
async fn watch_resume(f: TestStore) {
    let s = &f.store();
    let mut watch = s.watch_prefix("/r/", 0).await.unwrap();
    for i in 0..5 {
        s.put(&format!("/r/{i}"), b"a", None).await.unwrap();
    }
    let mut last = 0;
    for _ in 0..5 {
        last = next_event(&mut watch).await.revision();
    }
    drop(watch);

    // While nobody watches: more changes.
    let mut missed = Vec::new();
    for i in 0..5 {
        let rev = s.put(&format!("/r/{i}"), b"b", None).await.unwrap();
        missed.push((format!("/r/{i}"), rev));
        s.put("/elsewhere", b"x", None).await.unwrap();
    }
    s.delete("/r/0").await.unwrap();

    let restarted = f.another_handle().await;
    let mut watch = restarted.watch_prefix("/r/", last + 1).await.unwrap();
    for (key, rev) in missed {
        let ev = next_event(&mut watch).await;
        assert_eq!(
            (ev.revision(), ev.kind, ev.kv.key),
            (rev, EventKind::Put, key)
        );
    }
    let ev = next_event(&mut watch).await;
    assert_eq!((ev.kind, ev.kv.key.as_str()), (EventKind::Delete, "/r/0"));
    no_event(&mut watch, Duration::from_millis(300)).await;

    // And it keeps following live changes.
    s.put("/r/9", b"live", None).await.unwrap();
    assert_eq!(next_event(&mut watch).await.kv.key, "/r/9");
}

/// Watching from a snapshot's revision + 1 sees exactly the later changes:
/// the list-then-watch pattern the daemon uses.
async fn list_then_watch(f: TestStore) {
    let s = &f.store();
    let mut model = BTreeMap::new();
    for i in 0..10 {
        s.put(&format!("/lw/{i}"), b"0", None).await.unwrap();
        model.insert(format!("/lw/{i}"), b"0".to_vec());
    }
    let snapshot = s.get_prefix("/lw/").await.unwrap();
    s.put("/lw/3", b"1", None).await.unwrap();
    s.delete("/lw/4").await.unwrap();
    let mut state: BTreeMap<String, Vec<u8>> = snapshot
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect();
    assert_eq!(state, model);
    let mut watch = s.watch_prefix("/lw/", snapshot.revision + 1).await.unwrap();
    for _ in 0..2 {
        let ev = next_event(&mut watch).await;
        match ev.kind {
            EventKind::Put => state.insert(ev.kv.key, ev.kv.value),
            EventKind::Delete => state.remove(&ev.kv.key),
        };
    }
    model.insert("/lw/3".into(), b"1".to_vec());
    model.remove("/lw/4");
    assert_eq!(state, model);
}

async fn next_update(f: &mut Follower) -> Update {
    match tokio::time::timeout(Duration::from_secs(10), f.next()).await {
        Ok(u) => u,
        Err(_) => panic!("no update from the follower within 10 s"),
    }
}

/// The keys and values of a snapshot.
fn snapshot_state(update: Update) -> BTreeMap<String, Vec<u8>> {
    match update {
        Update::Snapshot(range) => range.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect(),
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

/// Applies updates until `state` holds `want` (changes may come in more than
/// one batch); a snapshot on the way fails the test.
async fn follow_until(
    f: &mut Follower,
    state: &mut BTreeMap<String, Vec<u8>>,
    want: &BTreeMap<String, Vec<u8>>,
) {
    while state != want {
        match next_update(f).await {
            Update::Changes { events, revision } => {
                assert_eq!(revision, events.last().unwrap().revision());
                for ev in events {
                    match ev.kind {
                        EventKind::Put => state.insert(ev.kv.key, ev.kv.value),
                        EventKind::Delete => state.remove(&ev.kv.key),
                    };
                }
            }
            other => panic!("expected changes, got {other:?}"),
        }
    }
}

/// The follower: a snapshot of the prefix first, then the changes after it
/// (nothing from other prefixes), in order.
async fn follower_snapshot_then_changes(f: TestStore) {
    let s = f.store();
    s.put("/fo/a", b"1", None).await.unwrap();
    s.put("/fo/b", b"1", None).await.unwrap();
    s.put("/other", b"x", None).await.unwrap();
    let mut follower = Follower::new(s.clone(), "/fo/");
    let first = next_update(&mut follower).await;
    let listed = first.revision();
    let mut state = snapshot_state(first);
    let mut want: BTreeMap<String, Vec<u8>> = [
        ("/fo/a".into(), b"1".to_vec()),
        ("/fo/b".into(), b"1".to_vec()),
    ]
    .into();
    assert_eq!(state, want);

    s.put("/fo/c", b"1", None).await.unwrap();
    s.put("/other", b"y", None).await.unwrap();
    s.delete("/fo/a").await.unwrap();
    let last = s.put("/fo/b", b"2", None).await.unwrap();
    want.remove("/fo/a");
    want.insert("/fo/c".into(), b"1".to_vec());
    want.insert("/fo/b".into(), b"2".to_vec());
    follow_until(&mut follower, &mut state, &want).await;
    assert!(last > listed);

    // Nothing more is pending.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), follower.next())
            .await
            .is_err(),
        "no update without a change"
    );
}

/// A burst, as hosts joining at once write it: 5,000 new keys in 50
/// transactions of 100 from another writer. The follower hands over every
/// change once, in revision order, in batches (never a relist), and the
/// state it builds is the store's.
async fn follower_takes_a_burst(f: TestStore) {
    const N: usize = 5_000;
    let mut follower = Follower::new(f.store(), "/fb/");
    let mut state = snapshot_state(next_update(&mut follower).await);
    assert!(state.is_empty());
    let mut writer = f.batch_writer().await;
    let t = Instant::now();
    let mut last = 0;
    for batch in 0..N / 100 {
        let kvs = (0..100)
            .map(|i| {
                // Not in key order within a transaction.
                let n = (batch * 100 + i) * 7919 % N;
                (format!("/fb/{n:05}"), format!("v{n}").into_bytes())
            })
            .collect();
        last = writer.put(kvs).await;
    }
    let wrote = t.elapsed();
    let mut updates = 0;
    let mut seen = 0;
    let mut rev = 0;
    while seen < N {
        match next_update(&mut follower).await {
            Update::Changes { events, revision } => {
                updates += 1;
                seen += events.len();
                assert_eq!(revision, events.last().unwrap().revision());
                for ev in events {
                    // (etcd gives a transaction's changes one revision.)
                    assert!(ev.revision() >= rev, "in revision order");
                    rev = ev.revision();
                    assert_eq!(ev.kind, EventKind::Put);
                    let key = ev.kv.key.clone();
                    assert!(
                        state.insert(ev.kv.key, ev.kv.value).is_none(),
                        "{key} twice"
                    );
                }
            }
            other => panic!("expected changes, got {other:?}"),
        }
    }
    assert_eq!(seen, N);
    assert_eq!(rev, last);
    assert_eq!(
        state,
        snapshot_state(Update::Snapshot(
            f.store().get_prefix("/fb/").await.unwrap()
        ))
    );
    eprintln!(
        "{N} keys in {} transactions: written in {wrote:?}, followed after {:?} in {updates} updates",
        N / 100,
        t.elapsed()
    );
}

/// A store that, when the follower first starts its watch, makes two more
/// changes and compacts the history past the follower's snapshot, as a
/// compaction racing a slow watcher would.
struct CompactBeforeFirstWatch {
    f: Arc<TestStore>,
    armed: AtomicBool,
}

#[async_trait]
impl Store for CompactBeforeFirstWatch {
    fn describe(&self) -> String {
        self.f.store().describe()
    }
    async fn get(&self, key: &str) -> weft_store::Result<Option<KeyValue>> {
        self.f.store().get(key).await
    }
    async fn get_prefix(&self, prefix: &str) -> weft_store::Result<Range> {
        self.f.store().get_prefix(prefix).await
    }
    async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> weft_store::Result<Revision> {
        self.f.store().put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> weft_store::Result<bool> {
        self.f.store().delete(key).await
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> weft_store::Result<CasOutcome> {
        self.f
            .store()
            .compare_and_swap(key, expect, value, lease)
            .await
    }
    async fn compare_and_delete(&self, key: &str, rev: Revision) -> weft_store::Result<CasOutcome> {
        self.f.store().compare_and_delete(key, rev).await
    }
    async fn lease_grant(&self, ttl: Duration) -> weft_store::Result<LeaseId> {
        self.f.store().lease_grant(ttl).await
    }
    async fn lease_keep_alive(&self, lease: LeaseId) -> weft_store::Result<()> {
        self.f.store().lease_keep_alive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> weft_store::Result<()> {
        self.f.store().lease_revoke(lease).await
    }
    async fn revision(&self) -> weft_store::Result<Revision> {
        self.f.store().revision().await
    }
    async fn watch_prefix(&self, prefix: &str, start: Revision) -> weft_store::Result<Watch> {
        if self.armed.swap(false, Ordering::SeqCst) {
            let s = self.f.store();
            s.put("/fc/late1", b"1", None).await.unwrap();
            let last = s.put("/fc/late2", b"1", None).await.unwrap();
            assert!(start < last);
            self.f.compact(last).await;
        }
        self.f.store().watch_prefix(prefix, start).await
    }
}

/// History compacted past the follower's snapshot before its watch starts:
/// the watch fails with Compacted, and the follower lists again, so the
/// changes it could not watch arrive in a fresh snapshot; then it follows.
async fn follower_relists_after_compaction(f: TestStore) {
    let f = Arc::new(f);
    let s = f.store();
    s.put("/fc/a", b"1", None).await.unwrap();
    let compacting = Arc::new(CompactBeforeFirstWatch {
        f: f.clone(),
        armed: AtomicBool::new(true),
    });
    let mut follower = Follower::new(compacting.clone() as DynStore, "/fc/");
    let state = snapshot_state(next_update(&mut follower).await);
    assert_eq!(state.keys().collect::<Vec<_>>(), ["/fc/a"]);

    // Its watch from the snapshot's revision + 1 hits compacted history.
    let relisted = next_update(&mut follower).await;
    assert!(
        !compacting.armed.load(Ordering::SeqCst),
        "the watch was started"
    );
    let mut state = snapshot_state(relisted);
    let mut want: BTreeMap<String, Vec<u8>> = ["/fc/a", "/fc/late1", "/fc/late2"]
        .into_iter()
        .map(|k| (k.to_string(), b"1".to_vec()))
        .collect();
    assert_eq!(state, want, "the relist has what the watch missed");

    s.put("/fc/d", b"1", None).await.unwrap();
    want.insert("/fc/d".into(), b"1".to_vec());
    follow_until(&mut follower, &mut state, &want).await;
}

macro_rules! contract {
    ($($test:ident),* $(,)?) => {
        /// The contract against the embedded SQLite backend.
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(weft_store::testing::TestStore::sqlite().await).await
                }
            )*
        }
        /// The contract against a real etcd server.
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(weft_store::testing::TestStore::etcd().await).await
                }
            )*
        }
    };
}

contract!(
    put_get_delete,
    prefix_is_sorted_and_bounded,
    cas_conflicts,
    cas_no_lost_update,
    lease_expiry,
    watch_ordering,
    watch_latency,
    watch_resume,
    slow_watch_holds_up_nobody,
    list_then_watch,
    follower_snapshot_then_changes,
    follower_takes_a_burst,
    follower_relists_after_compaction,
);

/// etcd stops: every call fails with a clear, transient error within its
/// timeout and nothing panics; a watch reports the loss; when etcd is back
/// the same handle works again and nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_unreachable_then_back() {
    let mut f = TestStore::etcd().await;
    let s = f.store();
    s.put("/u/kept", b"before", None).await.unwrap();
    let mut watch = s.watch_prefix("/u/", 0).await.unwrap();
    let server = f.etcd_server().unwrap();
    server.stop();

    let t = Instant::now();
    let errors = [
        s.get("/u/kept").await.err(),
        s.put("/u/new", b"x", None).await.err(),
        s.compare_and_swap("/u/new", Expect::Absent, b"x", None)
            .await
            .err(),
        s.get_prefix("/u/").await.err(),
        s.lease_grant(Duration::from_secs(5)).await.err(),
        s.delete("/u/kept").await.err(),
    ];
    let took = t.elapsed();
    for e in &errors {
        let e = e.as_ref().expect("a call to a stopped etcd must fail");
        assert!(e.is_transient(), "error must be marked transient: {e}");
        assert!(
            e.to_string().contains("etcd"),
            "error must name the store: {e}"
        );
    }
    assert!(
        took < Duration::from_secs(30),
        "6 failing calls took {took:?}"
    );
    match tokio::time::timeout(Duration::from_secs(15), watch.recv()).await {
        Ok(Some(Err(e))) => assert!(e.is_transient(), "{e}"),
        other => panic!("watch must report the outage, got {other:?}"),
    }

    server.restart().unwrap();
    // The same handle recovers (allow the client a few seconds to reconnect).
    let t = Instant::now();
    loop {
        match s.get("/u/kept").await {
            Ok(v) => {
                assert_eq!(v.unwrap().value, b"before", "data survives the outage");
                break;
            }
            Err(e) if t.elapsed() < Duration::from_secs(20) => {
                assert!(e.is_transient(), "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("store did not recover after etcd restart: {e}"),
        }
    }
    s.put("/u/after", b"y", None).await.unwrap();
    assert!(s
        .compare_and_swap("/u/fresh", Expect::Absent, b"z", None)
        .await
        .unwrap()
        .is_done());
}

/// The embedded store in a place it cannot use gives a clear error.
#[test]
fn sqlite_bad_path_is_clear_error() {
    let Err(e) = SqliteStore::open("/nonexistent-dir/weft/store.db") else {
        panic!("opening a store in a missing directory must fail")
    };
    let msg = e.to_string();
    assert!(msg.contains("/nonexistent-dir/weft/store.db"), "{msg}");
    assert!(msg.contains("check the path"), "{msg}");
}

/// Two handles on one file (two processes) see each other's writes and CAS
/// across them is exclusive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_shared_file() {
    let f = TestStore::sqlite().await;
    let b = f.another_handle().await;
    f.store().put("/s/a", b"1", None).await.unwrap();
    assert_eq!(b.get("/s/a").await.unwrap().unwrap().value, b"1");
    let kv = b.get("/s/a").await.unwrap().unwrap();
    assert!(b
        .compare_and_swap("/s/a", Expect::ModRevision(kv.mod_revision), b"2", None)
        .await
        .unwrap()
        .is_done());
    assert!(!f
        .store()
        .compare_and_swap("/s/a", Expect::ModRevision(kv.mod_revision), b"3", None)
        .await
        .unwrap()
        .is_done());
    assert_eq!(f.store().get("/s/a").await.unwrap().unwrap().value, b"2");
}
