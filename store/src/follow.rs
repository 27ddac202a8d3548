//! List-then-watch: follow every key under a prefix through store outages
//! and compactions.
//!
//! A [`Follower`] lists the prefix and hands the snapshot to the caller, then
//! watches from the revision after the snapshot and hands over the changes in
//! batches. When a watch that was following breaks (store down, stream
//! ended) it resumes from the revision after the last one it handed over:
//! cheap (one revision read and one watch, no listing), so it is tried
//! every [`RESUME_BACKOFF`] at most and a store back from an outage is
//! followed again within about a second (the soak's DNS staleness). The
//! changes made meanwhile arrive as [`Update::Changes`]; the same when the
//! watch cannot start after a listing. When the history is gone
//! (compacted) or the store's revision went back (a new or restored
//! store), or when listing fails, it waits with a doubling backoff (jittered: thousands of
//! hosts that lost the store at the same moment do not all list again at
//! the same moment) and lists again, so the caller gets a fresh
//! [`Update::Snapshot`] to replace what it holds. The caller keeps serving
//! its last state meanwhile; the follower never gives up.
//!
//! This is the one copy of the loop: the mesh (hosts), dnsd and netd's
//! policy and service loops use it and only decide what a record means.
//! [`Update::apply_with`] (and [`Update::apply_to`] for JSON records) is the
//! one copy of applying an update to the caller's map of decoded records.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::{jittered, DynStore, Event, EventKind, KeyValue, Range, Revision, Watch};

/// First wait after a failure; doubles up to [`MAX_BACKOFF`]. Each wait is
/// between half the backoff and all of it, at random.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two attempts to list and watch.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait between two attempts to resume a broken watch: an attempt
/// costs a revision read and a watch, not a listing.
pub const RESUME_BACKOFF: Duration = Duration::from_secs(1);
/// While the store stays unreachable, one warning per this many failed
/// attempts (the first always; the rest at debug level).
const WARN_EVERY: u32 = 30;
/// After a change, further changes arriving within this window join the
/// same [`Update::Changes`].
pub const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// At most this many events in one [`Update::Changes`].
pub const MAX_BATCH: usize = 10_000;

/// What a [`Follower`] hands over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// Every key under the prefix now: replace what you hold. The first
    /// update, and the first after every relist.
    Snapshot(Range),
    /// Changes since the last update, in revision order; `revision` is the
    /// last one's. Never empty.
    Changes {
        events: Vec<Event>,
        revision: Revision,
    },
}

impl Update {
    /// The store revision the caller's state is at after applying this.
    pub fn revision(&self) -> Revision {
        match self {
            Update::Snapshot(range) => range.revision,
            Update::Changes { revision, .. } => *revision,
        }
    }

    /// Applies this update to `map`, the caller's decoded view of the
    /// prefix: a snapshot replaces it; a put sets the entry `key` names to
    /// what `decode` makes of the key and value, or removes the entry when
    /// `decode` refuses it (`None`: a record overwritten with something
    /// unusable is gone, not kept stale, as after a relist); a delete
    /// removes the entry. Store keys `key` maps to `None` are not the
    /// caller's and change nothing. Returns [`Update::revision`].
    pub fn apply_with<K: Ord, T>(
        self,
        map: &mut BTreeMap<K, T>,
        mut key: impl FnMut(&str) -> Option<K>,
        mut decode: impl FnMut(&KeyValue) -> Option<T>,
    ) -> Revision {
        let revision = self.revision();
        match self {
            Update::Snapshot(range) => {
                map.clear();
                for kv in &range.kvs {
                    if let (Some(k), Some(v)) = (key(&kv.key), decode(kv)) {
                        map.insert(k, v);
                    }
                }
            }
            Update::Changes { events, .. } => {
                for ev in &events {
                    let Some(k) = key(&ev.kv.key) else {
                        continue;
                    };
                    let value = match ev.kind {
                        EventKind::Put => decode(&ev.kv),
                        EventKind::Delete => None,
                    };
                    match value {
                        Some(v) => map.insert(k, v),
                        None => map.remove(&k),
                    };
                }
            }
        }
        revision
    }

    /// [`Update::apply_with`] for JSON records kept by their store key: a
    /// value that does not parse as `T` is left out, logged once
    /// ([`decode_json`]).
    pub fn apply_to<T: DeserializeOwned>(
        self,
        map: &mut BTreeMap<String, T>,
        what: &str,
    ) -> Revision {
        self.apply_with(map, |k| Some(k.to_owned()), |kv| decode_json(kv, what))
    }
}

/// The JSON record `kv` holds, or `None` with one warning naming the key,
/// `what` it should be (`endpoint record`) and why it does not parse.
pub fn decode_json<T: DeserializeOwned>(kv: &KeyValue, what: &str) -> Option<T> {
    match serde_json::from_slice(&kv.value) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(key = kv.key, error = %e, "unreadable {what}; ignored");
            None
        }
    }
}

enum State {
    /// List next (after waiting the backoff when `wait`).
    List { wait: bool },
    /// A snapshot at this revision was handed over; watch from the next.
    Watch { listed: Revision },
    /// The watch broke after everything up to this revision was handed
    /// over: watch again from the next (after waiting when `wait`).
    Resume { from: Revision, wait: bool },
    /// Watching.
    Following(Watch),
}

/// Follows one prefix: see the module docs.
pub struct Follower {
    store: DynStore,
    prefix: String,
    state: State,
    /// Events received but not yet handed over (kept across a cancelled
    /// [`Follower::next`]).
    pending: Vec<Event>,
    backoff: Duration,
    /// Failed attempts in a row (for the log).
    failures: u32,
    /// The revision of the last update handed over.
    revision: Revision,
}

impl Follower {
    pub fn new(store: DynStore, prefix: impl Into<String>) -> Self {
        Self {
            store,
            prefix: prefix.into(),
            state: State::List { wait: false },
            pending: Vec::new(),
            backoff: MIN_BACKOFF,
            failures: 0,
            revision: 0,
        }
    }

    /// The prefix followed.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The next update. Retries store failures itself (logging each), so it
    /// only returns with something to apply. Cancel-safe: dropping the
    /// future (say, in a `select!` with a stop signal) loses nothing; the
    /// next call carries on.
    pub async fn next(&mut self) -> Update {
        loop {
            match &mut self.state {
                State::List { wait } => {
                    if *wait {
                        tokio::time::sleep(jittered(self.backoff, 500, 1000)).await;
                        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                        self.state = State::List { wait: false };
                    }
                    match self.store.get_prefix(&self.prefix).await {
                        Ok(range) => {
                            self.pending.clear();
                            self.revision = range.revision;
                            self.state = State::Watch {
                                listed: range.revision,
                            };
                            return Update::Snapshot(range);
                        }
                        Err(e) => self.retry("listing", &e),
                    }
                }
                State::Watch { listed } => {
                    let start = *listed + 1;
                    match self.store.watch_prefix(&self.prefix, start).await {
                        Ok(watch) => self.following(watch),
                        // The relist catches up.
                        Err(e @ crate::StoreError::Compacted { .. }) => self.retry("watching", &e),
                        Err(e) => {
                            self.log_failure("watching failed", &e);
                            self.state = State::Resume {
                                from: start - 1,
                                wait: true,
                            };
                        }
                    }
                }
                State::Resume { from, wait } => {
                    let from = *from;
                    if *wait {
                        let pause = self.backoff.min(RESUME_BACKOFF);
                        tokio::time::sleep(jittered(pause, 500, 1000)).await;
                        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                        self.state = State::Resume { from, wait: false };
                    }
                    self.resume(from).await;
                }
                State::Following(watch) => {
                    let ended = receive_batch(watch, &mut self.pending).await;
                    // Everything received was handed over, or is now.
                    let upto = self.pending.last().map(Event::revision);
                    if let Some(why) = ended {
                        match why {
                            Ok(()) => tracing::warn!(
                                store = %self.store.describe(),
                                prefix = %self.prefix,
                                "store watch ended; resuming it"
                            ),
                            Err(e) => self.log_failure("the watch broke; resuming it", &e),
                        }
                        self.state = State::Resume {
                            from: upto.unwrap_or(self.revision),
                            wait: true,
                        };
                    }
                    if let Some(revision) = upto {
                        self.revision = revision;
                        let events = std::mem::take(&mut self.pending);
                        return Update::Changes { events, revision };
                    }
                }
            }
        }
    }

    /// A watch is running: the store answers again.
    fn following(&mut self, watch: Watch) {
        if self.failures > 0 {
            tracing::info!(
                store = %self.store.describe(),
                prefix = %self.prefix,
                attempts = self.failures,
                "following the store again"
            );
        }
        self.backoff = MIN_BACKOFF;
        self.failures = 0;
        self.state = State::Following(watch);
    }

    /// Watches again from the revision after `from`, unless the history is
    /// gone or the store went back to an older revision (a new or restored
    /// store, whose changes a watch from our revision would never show):
    /// then lists.
    async fn resume(&mut self, from: Revision) {
        let current = match self.store.revision().await {
            Ok(r) => r,
            Err(e) => {
                self.log_failure("resuming the watch", &e);
                self.state = State::Resume { from, wait: true };
                return;
            }
        };
        if current < from {
            tracing::warn!(
                store = %self.store.describe(),
                prefix = %self.prefix,
                current,
                from,
                "the store's revision went back (a new or restored store); listing again"
            );
            self.state = State::List { wait: false };
            return;
        }
        match self.store.watch_prefix(&self.prefix, from + 1).await {
            Ok(watch) => self.following(watch),
            Err(crate::StoreError::Compacted { .. }) => {
                self.state = State::List { wait: false };
            }
            Err(e) => {
                self.log_failure("resuming the watch", &e);
                self.state = State::Resume { from, wait: true };
            }
        }
    }

    fn retry(&mut self, step: &str, e: &crate::StoreError) {
        self.log_failure(&format!("{step} failed; listing again"), e);
        self.state = State::List { wait: true };
    }

    /// One warning for the first failure in a row and every
    /// [`WARN_EVERY`]th after it; the others at debug level.
    fn log_failure(&mut self, what: &str, e: &crate::StoreError) {
        self.failures = self.failures.saturating_add(1);
        if self.failures == 1 || self.failures.is_multiple_of(WARN_EVERY) {
            tracing::warn!(
                store = %self.store.describe(),
                prefix = %self.prefix,
                error = %e,
                attempts = self.failures,
                retry_within = ?self.backoff,
                "{what}; keeping the last state"
            );
        } else {
            tracing::debug!(
                store = %self.store.describe(),
                prefix = %self.prefix,
                error = %e,
                attempts = self.failures,
                "{what}; keeping the last state"
            );
        }
    }
}

/// Waits for one event, then takes more while they keep coming within
/// [`BATCH_WINDOW`] of each other, up to [`MAX_BATCH`]. Returns `Some` when
/// the watch is over (`Ok` when it simply ended); events received before
/// that are in `pending`.
async fn receive_batch(watch: &mut Watch, pending: &mut Vec<Event>) -> Option<crate::Result<()>> {
    if pending.is_empty() {
        match watch.recv().await {
            Some(Ok(ev)) => pending.push(ev),
            Some(Err(e)) => return Some(Err(e)),
            None => return Some(Ok(())),
        }
    }
    while pending.len() < MAX_BATCH {
        match tokio::time::timeout(BATCH_WINDOW, watch.recv()).await {
            Ok(Some(Ok(ev))) => pending.push(ev),
            Ok(Some(Err(e))) => return Some(Err(e)),
            Ok(None) => return Some(Ok(())),
            Err(_) => break,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            create_revision: 1,
            mod_revision: 7,
            version: 1,
            lease: None,
        }
    }

    fn changes(events: Vec<(EventKind, KeyValue)>) -> Update {
        Update::Changes {
            events: events
                .into_iter()
                .map(|(kind, kv)| Event { kind, kv })
                .collect(),
            revision: 9,
        }
    }

    #[test]
    fn json_updates_replace_patch_and_leave_out_bad_values() {
        let mut map: BTreeMap<String, u32> = BTreeMap::new();
        map.insert("stale".into(), 0);
        let snapshot = Update::Snapshot(Range {
            kvs: vec![kv("p/a", "1"), kv("p/b", "{corrupt"), kv("p/c", "3")],
            revision: 5,
        });
        // A snapshot replaces everything; a value that does not parse is out.
        assert_eq!(snapshot.apply_to(&mut map, "number"), 5);
        assert_eq!(map, BTreeMap::from([("p/a".into(), 1), ("p/c".into(), 3)]));
        let rev = changes(vec![
            (EventKind::Put, kv("p/b", "2")),
            (EventKind::Delete, kv("p/a", "")),
            (EventKind::Delete, kv("p/never", "")),
            // A record overwritten with garbage is gone, not kept stale.
            (EventKind::Put, kv("p/c", "nope")),
        ])
        .apply_to(&mut map, "number");
        assert_eq!(rev, 9);
        assert_eq!(map, BTreeMap::from([("p/b".into(), 2)]));
        // Changes apply in order: the last one of a key wins.
        changes(vec![
            (EventKind::Delete, kv("p/b", "")),
            (EventKind::Put, kv("p/b", "4")),
            (EventKind::Put, kv("p/d", "5")),
            (EventKind::Delete, kv("p/d", "")),
        ])
        .apply_to(&mut map, "number");
        assert_eq!(map, BTreeMap::from([("p/b".into(), 4)]));
    }

    #[test]
    fn mapped_keys_skip_foreign_keys_and_decode_sees_the_revision() {
        // Keyed by the name after the prefix; keys without it are not ours.
        let key = |k: &str| k.strip_prefix("p/").map(str::to_owned);
        let decode = |kv: &KeyValue| {
            let n: u32 = std::str::from_utf8(&kv.value).ok()?.parse().ok()?;
            Some((n, kv.mod_revision))
        };
        let mut map = BTreeMap::new();
        Update::Snapshot(Range {
            kvs: vec![kv("p/a", "1"), kv("q/b", "2"), kv("p/c", "x")],
            revision: 5,
        })
        .apply_with(&mut map, key, decode);
        assert_eq!(map, BTreeMap::from([("a".into(), (1, 7))]));
        changes(vec![
            (EventKind::Put, kv("q/a", "3")),
            (EventKind::Delete, kv("q/a", "")),
            (EventKind::Put, kv("p/e", "4")),
        ])
        .apply_with(&mut map, key, decode);
        assert_eq!(
            map,
            BTreeMap::from([("a".into(), (1, 7)), ("e".into(), (4, 7))])
        );
    }
}
