//! List-then-watch: follow every key under a prefix through store outages
//! and compactions.
//!
//! A [`Follower`] lists the prefix and hands the snapshot to the caller, then
//! watches from the revision after the snapshot and hands over the changes in
//! batches. When the watch cannot start or breaks (store down, history
//! compacted, stream ended) it logs why, waits with a doubling backoff and
//! lists again, so the caller gets a fresh [`Update::Snapshot`] to replace
//! what it holds. The caller keeps serving its last state meanwhile; the
//! follower never gives up.
//!
//! This is the one copy of the loop: the mesh (hosts) and dnsd (endpoints)
//! both use it and only decide what a record means.

use std::time::Duration;

use crate::{DynStore, Event, Range, Revision, Watch};

/// First wait after a failure; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two attempts to list and watch.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
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
}

enum State {
    /// List next (after waiting the backoff when `wait`).
    List { wait: bool },
    /// A snapshot at this revision was handed over; watch from the next.
    Watch { listed: Revision },
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
}

impl Follower {
    pub fn new(store: DynStore, prefix: impl Into<String>) -> Self {
        Self {
            store,
            prefix: prefix.into(),
            state: State::List { wait: false },
            pending: Vec::new(),
            backoff: MIN_BACKOFF,
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
                        tokio::time::sleep(self.backoff).await;
                        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                        self.state = State::List { wait: false };
                    }
                    match self.store.get_prefix(&self.prefix).await {
                        Ok(range) => {
                            self.pending.clear();
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
                        Ok(watch) => {
                            self.backoff = MIN_BACKOFF;
                            self.state = State::Following(watch);
                        }
                        // Compacted lands here too: the relist catches up.
                        Err(e) => self.retry("watching", &e),
                    }
                }
                State::Following(watch) => {
                    let ended = receive_batch(watch, &mut self.pending).await;
                    if let Some(why) = ended {
                        match why {
                            Ok(()) => tracing::warn!(
                                store = %self.store.describe(),
                                prefix = %self.prefix,
                                "store watch ended; listing again"
                            ),
                            Err(e) => self.log_failure("the watch broke", &e),
                        }
                        self.state = State::List { wait: true };
                    }
                    if let Some(last) = self.pending.last() {
                        let revision = last.revision();
                        let events = std::mem::take(&mut self.pending);
                        return Update::Changes { events, revision };
                    }
                }
            }
        }
    }

    fn retry(&mut self, step: &str, e: &crate::StoreError) {
        self.log_failure(step, e);
        self.state = State::List { wait: true };
    }

    fn log_failure(&self, step: &str, e: &crate::StoreError) {
        tracing::warn!(
            store = %self.store.describe(),
            prefix = %self.prefix,
            error = %e,
            retry_in = ?self.backoff,
            "{step} failed; keeping the last state and listing again"
        );
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
