//! weft's store: one contract, modelled on etcd v3, with two backends.
//!
//! * [`SqliteStore`] (embedded, the default): one SQLite file that several
//!   processes on one machine may share.
//! * [`EtcdStore`]: a real etcd v3 cluster, for multi-host deployments.
//!
//! Every mutation bumps one store-wide revision. Keys carry the revision that
//! created them and the one that last changed them, so callers can
//! compare-and-swap on a key's `mod_revision`. Leases carry a TTL; keys
//! attached to a lease vanish when it expires. A watch delivers every change
//! under a prefix from a given revision on, in revision order, so a watcher
//! that restarts can resume exactly where it stopped. [`Follower`] is the
//! list-then-watch loop built on that: a snapshot, then changes, and a fresh
//! snapshot after any outage or compaction.

mod config;
mod error;
mod etcd;
mod follow;
mod sqlite;
#[cfg(feature = "testing")]
mod test_store;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use config::{StoreConfig, StoreSpecError};
pub use error::StoreError;
pub use etcd::{EtcdConfig, EtcdStore};
pub use follow::{decode_json, Follower, Update, MAX_BACKOFF as FOLLOW_MAX_BACKOFF};
pub use sqlite::SqliteStore;

/// A store-wide revision number. Revisions start at 1 and grow by one with
/// every mutation (put, delete, lease expiry of a key).
pub type Revision = i64;

/// A lease identifier. Keys attached to a lease are deleted when it expires.
pub type LeaseId = i64;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One key with its value and bookkeeping, as etcd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the put that created this key (since its last delete).
    pub create_revision: Revision,
    /// Revision of the last put to this key.
    pub mod_revision: Revision,
    /// Number of puts since the key was created (1 after creation).
    pub version: i64,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// What a compare-and-swap expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist with exactly this `mod_revision`.
    ModRevision(Revision),
}

/// The result of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The write happened at this revision.
    Done(Revision),
    /// The expectation did not hold; this is what the key holds now
    /// (`None` when it does not exist).
    Conflict(Option<KeyValue>),
}

impl CasOutcome {
    pub fn is_done(&self) -> bool {
        matches!(self, CasOutcome::Done(_))
    }
}

/// The kind of a change seen by a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch. For deletes, `kv.value` is empty and
/// `kv.mod_revision` is the revision of the delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
}

impl Event {
    /// The revision at which this change happened.
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// A snapshot of the keys under a prefix, and the store revision it was
/// taken at (start a watch at `revision + 1` to see every later change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
}

/// A stream of changes. It ends (`recv` returns `None`) when the store side
/// stops; an `Err` item is the last item and says why.
pub struct Watch {
    rx: mpsc::Receiver<Result<Event>>,
    /// Called after each item taken with how many still wait: the embedded
    /// store's poller skips a full watch until its reader made room.
    drained: Option<DrainHook>,
}

type DrainHook = Box<dyn Fn(usize) + Send + Sync>;

impl Watch {
    pub(crate) fn new(rx: mpsc::Receiver<Result<Event>>) -> Self {
        Self { rx, drained: None }
    }

    pub(crate) fn with_drain_hook(rx: mpsc::Receiver<Result<Event>>, drained: DrainHook) -> Self {
        Self {
            rx,
            drained: Some(drained),
        }
    }

    /// The next change, in revision order.
    pub async fn recv(&mut self) -> Option<Result<Event>> {
        let item = self.rx.recv().await;
        if let Some(drained) = &self.drained {
            drained(self.rx.len());
        }
        item
    }
}

/// The store contract. Both backends pass the same contract test suite
/// (`store/tests/contract.rs`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short name for logs and errors: `sqlite:/path` or `etcd:host:port`.
    fn describe(&self) -> String;

    /// The value of one key, or `None`.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Every key that starts with `prefix`, sorted by key, with the revision
    /// of the snapshot.
    async fn get_prefix(&self, prefix: &str) -> Result<Range>;

    /// Writes `key`, optionally attached to a lease. Returns the new revision.
    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision>;

    /// Deletes `key`. Returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Writes `key` only if it matches `expect`.
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome>;

    /// Deletes `key` only if its `mod_revision` is `mod_revision`.
    async fn compare_and_delete(&self, key: &str, mod_revision: Revision) -> Result<CasOutcome>;

    /// Creates a lease that expires after `ttl` unless kept alive.
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renews a lease for another full TTL. Fails with
    /// [`StoreError::LeaseNotFound`] when it already expired.
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()>;

    /// Ends a lease now and deletes its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<()>;

    /// The current store revision.
    async fn revision(&self) -> Result<Revision>;

    /// Every change to keys under `prefix` with a revision `>= start`, in
    /// order. `start = 0` means "from now on". Fails with
    /// [`StoreError::Compacted`] if history before `start` is gone.
    async fn watch_prefix(&self, prefix: &str, start: Revision) -> Result<Watch>;
}

/// A shared handle to either backend.
pub type DynStore = Arc<dyn Store>;

/// Opens the configured backend.
pub async fn open(config: &StoreConfig) -> Result<DynStore> {
    Ok(match config {
        StoreConfig::Sqlite { path } => Arc::new(SqliteStore::open(path)?),
        StoreConfig::Etcd(cfg) => Arc::new(EtcdStore::connect(cfg.clone()).await?),
    })
}

/// The end of the key range that holds every key starting with `prefix`
/// (etcd's `range_end` for a prefix query). `None` means "no upper bound".
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// `pause` scaled by a random factor in `[lo, hi)` per mille, so processes
/// that failed together (a store outage, a file held by another process) do
/// not retry in lockstep. Without the kernel's randomness (never on a
/// supported kernel) the factor is `lo`.
pub(crate) fn jittered(pause: Duration, lo: u32, hi: u32) -> Duration {
    let spread = u64::from(hi.saturating_sub(lo)).max(1);
    let per_mille = lo + weft_sys::random::u64().map_or(0, |r| (r % spread) as u32);
    pause * per_mille / 1000
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{jittered, prefix_end};

    #[test]
    fn jitter_stays_within_its_bounds() {
        let base = Duration::from_millis(100);
        for (lo, hi) in [(500, 1500), (500, 1000)] {
            let (mut min, mut max) = (base * 2, Duration::ZERO);
            for _ in 0..1000 {
                let p = jittered(base, lo, hi);
                assert!(p >= base * lo / 1000 && p < base * hi / 1000, "{p:?}");
                (min, max) = (min.min(p), max.max(p));
            }
            // It does spread (1000 draws of a range of 500 ms per mille).
            assert!(max - min > base / 4, "{min:?}..{max:?}");
        }
    }

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/weft/a"), Some(b"/weft/b".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b""), None);
    }
}
