//! Watches: one poller thread per opened store (per [`SqliteStore`] and its
//! clones), with its own connection, serves every watch of that store.
//!
//! Idle, the poller wakes every [`WATCH_POLL`] and asks SQLite for
//! `PRAGMA data_version`, which changes only when another connection (this
//! process's writes go through another one too) committed; nothing else is
//! read. Only when it changed, when a lease's deadline passed (the earliest
//! one is kept from the last read, and reaped then, so an expiry reaches
//! watchers even when nobody writes) or when a watch is behind (new from an
//! old revision, or its receiver was full) does it read the `log` from the
//! oldest revision a watch still needs, and hands each change to the watches
//! whose prefix holds its key. A write through this process's handle wakes
//! the poller at once ([`Hub::kick`]); another process's write is seen
//! within [`WATCH_POLL`].
//!
//! A watch whose receiver is full is skipped (it keeps its place in the
//! history) until its reader has taken half of what waits, so one slow
//! reader does not hold up the others. History trimmed past a watch ends it
//! with [`StoreError::Compacted`]. The thread starts with the first watch and
//! ends when the last one is dropped.
//!
//! [`SqliteStore`]: super::SqliteStore

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection};
use tokio::sync::mpsc::{self, error::TrySendError};

use super::open::open_conn;
use super::sql_err;
use super::tables::{meta, now_ms, row_to_kv, settle, KIND_DELETE};
use crate::error::is_busy;
use crate::{prefix_end, Event, EventKind, Result, Revision, StoreError, Watch};

/// How often the poller looks for another process's writes.
pub(super) const WATCH_POLL: Duration = Duration::from_millis(20);
/// How many changes may wait in one [`Watch`].
const WATCH_CAPACITY: usize = 1024;
/// At most this many changes are read from the log in one go; more are read
/// right after.
const READ_LIMIT: i64 = 4096;

/// The watches of one opened store and the poller serving them.
pub(super) struct Hub {
    path: PathBuf,
    name: String,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<HubState>,
    wake: Condvar,
}

#[derive(Default)]
struct HubState {
    /// Watches registered since the poller last looked.
    added: Vec<Sub>,
    /// Something to look at now: a write here, a new watch, a drained one.
    kicked: bool,
    /// A poller thread is running (it clears this when it ends).
    running: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A poisoned lock only means the poller panicked; the state is
        // plain data and still consistent.
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn kick(&self) {
        let mut state = self.lock();
        if state.running {
            state.kicked = true;
            self.wake.notify_one();
        }
    }
}

/// One watch, as the poller sees it.
struct Sub {
    prefix: Vec<u8>,
    end: Option<Vec<u8>>,
    /// The next revision this watch needs.
    next: Revision,
    tx: mpsc::Sender<Result<Event>>,
    /// Set by the poller when `tx` was full; cleared by the reader once it
    /// has taken half, which also wakes the poller.
    full: Arc<AtomicBool>,
    /// The last item to send, after which the watch ends.
    ending: Option<StoreError>,
}

impl Sub {
    fn holds(&self, key: &[u8]) -> bool {
        key >= self.prefix.as_slice() && self.end.as_deref().is_none_or(|end| key < end)
    }

    /// Waiting for its reader, or done.
    fn idle(&self) -> bool {
        self.full.load(Ordering::SeqCst) || self.tx.is_closed()
    }

    /// Hands over one item; false when the receiver is full (the watch is
    /// then marked full) or gone.
    fn offer(&self, item: Result<Event>) -> std::result::Result<(), Option<Result<Event>>> {
        match self.tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(TrySendError::Closed(_)) => Err(None),
            Err(TrySendError::Full(item)) => {
                // Marked before trying again: a reader that took an item in
                // between either left room for this retry or sees the mark.
                self.full.store(true, Ordering::SeqCst);
                match self.tx.try_send(item) {
                    Ok(()) => {
                        self.full.store(false, Ordering::SeqCst);
                        Ok(())
                    }
                    Err(TrySendError::Closed(_)) => Err(None),
                    Err(TrySendError::Full(item)) => Err(Some(item)),
                }
            }
        }
    }
}

impl Hub {
    pub(super) fn new(path: PathBuf, name: String) -> Self {
        Self {
            path,
            name,
            shared: Arc::new(Shared {
                state: Mutex::new(HubState::default()),
                wake: Condvar::new(),
            }),
        }
    }

    /// Wakes the poller (if any) to look for changes now: after a write
    /// through this store's handle.
    pub(super) fn kick(&self) {
        self.shared.kick();
    }

    /// Adds a watch of `prefix` from `next`, a revision the caller checked
    /// against the store's compaction point, so nothing written after this
    /// returns can be missed.
    pub(super) fn watch(&self, prefix: &str, next: Revision) -> Result<Watch> {
        let prefix = prefix.as_bytes().to_vec();
        let (tx, rx) = mpsc::channel(WATCH_CAPACITY);
        let full = Arc::new(AtomicBool::new(false));
        let sub = Sub {
            end: prefix_end(&prefix),
            prefix,
            next,
            tx,
            full: full.clone(),
            ending: None,
        };
        let mut state = self.shared.lock();
        state.added.push(sub);
        state.kicked = true;
        if state.running {
            self.shared.wake.notify_one();
        } else {
            let poller = Poller {
                path: self.path.clone(),
                name: self.name.clone(),
                shared: self.shared.clone(),
                subs: Vec::new(),
                data_version: None,
                known: 0,
                next_expiry: None,
                dirty: true,
            };
            let spawned = std::thread::Builder::new()
                .name("weft-store-watch".into())
                .spawn(move || poller.run());
            if let Err(e) = spawned {
                state.added.pop();
                return Err(StoreError::Invalid {
                    store: self.name.clone(),
                    detail: format!("cannot start the watch thread: {e}"),
                });
            }
            state.running = true;
        }
        drop(state);
        let shared = self.shared.clone();
        Ok(Watch::with_drain_hook(
            rx,
            Box::new(move |waiting| {
                if waiting <= WATCH_CAPACITY / 2
                    && full.load(Ordering::SeqCst)
                    && full.swap(false, Ordering::SeqCst)
                {
                    shared.kick();
                }
            }),
        ))
    }
}

/// The revision a watch from `start` (0: from now on) begins at, given the
/// store's `current` revision and its compaction point.
pub(super) fn first_revision(
    name: &str,
    start: Revision,
    current: Revision,
    compacted: Revision,
) -> Result<Revision> {
    if start == 0 {
        Ok(current + 1)
    } else if start <= compacted {
        Err(StoreError::Compacted {
            store: name.to_owned(),
            requested: start,
            compacted,
        })
    } else {
        Ok(start)
    }
}

/// The poller thread's state.
struct Poller {
    path: PathBuf,
    name: String,
    shared: Arc<Shared>,
    subs: Vec<Sub>,
    /// `PRAGMA data_version` when the log was last read.
    data_version: Option<i64>,
    /// The store revision the log was last read up to.
    known: Revision,
    /// The earliest lease deadline (ms) as of the last read.
    next_expiry: Option<i64>,
    /// The store changed since the last complete read.
    dirty: bool,
}

impl Poller {
    fn run(mut self) {
        let mut conn: Option<Connection> = None;
        let mut more = false;
        while self.wait(more) {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match open_conn(&self.path) {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        // Tried again for the next watch; these end.
                        let detail = e.to_string();
                        self.fail_all(&detail);
                        continue;
                    }
                },
            };
            more = match self.round(c) {
                Ok(more) => more,
                Err(e) if is_busy(&e) => {
                    // Another process holds the write lock for longer than
                    // the busy timeout; try again on the next tick.
                    tracing::debug!(store = %self.name, error = %e, "watch poll busy");
                    false
                }
                Err(e) => {
                    let detail = sql_err(&self.path, e).to_string();
                    tracing::debug!(store = %self.name, error = %detail, "watch poll failed");
                    self.fail_all(&detail);
                    // A fresh connection for the watches that come next.
                    conn = None;
                    false
                }
            };
        }
    }

    /// Waits for a kick or the next tick (not at all when `more` is to be
    /// read), takes new watches and drops finished ones. False when no
    /// watch is left: the thread ends.
    fn wait(&mut self, more: bool) -> bool {
        let mut state = self.shared.lock();
        if !more && !state.kicked {
            state = match self.shared.wake.wait_timeout(state, WATCH_POLL) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        state.kicked = false;
        self.subs.append(&mut state.added);
        self.subs.retain(|s| !s.tx.is_closed());
        if self.subs.is_empty() {
            state.running = false;
            return false;
        }
        true
    }

    /// One look at the store. Returns true when there is more to read now.
    fn round(&mut self, conn: &mut Connection) -> rusqlite::Result<bool> {
        self.send_endings();
        if self
            .next_expiry
            .is_some_and(|deadline| now_ms() >= deadline)
        {
            // Reaps the expired leases' keys (their deletes go to the log).
            settle(conn)?;
            self.dirty = true;
        }
        let version = conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get::<_, i64>(0))?;
        if self.data_version != Some(version) {
            self.data_version = Some(version);
            self.dirty = true;
        }
        let behind = self
            .subs
            .iter()
            .any(|s| !s.idle() && s.ending.is_none() && s.next <= self.known);
        if !self.dirty && !behind {
            return Ok(false);
        }

        let tx = conn.transaction()?;
        let current = meta(&tx, "revision")?;
        let compacted = meta(&tx, "compacted")?;
        if self.dirty {
            self.next_expiry = tx
                .prepare_cached("SELECT MIN(expires_ms) FROM leases")?
                .query_row([], |r| r.get::<_, Option<i64>>(0))?;
        }
        for sub in &mut self.subs {
            if sub.ending.is_none() && sub.next <= compacted {
                sub.ending = Some(StoreError::Compacted {
                    store: self.name.clone(),
                    requested: sub.next,
                    compacted,
                });
            }
        }
        let from = self
            .subs
            .iter()
            .filter(|s| !s.idle() && s.ending.is_none())
            .map(|s| s.next)
            .min();
        let mut upto = current;
        if let Some(from) = from.filter(|&f| f <= current) {
            let events = read_log(&tx, from, current)?;
            if events.len() as i64 == READ_LIMIT {
                upto = events.last().map_or(current, Event::revision);
            }
            self.fan_out(&events, upto);
        }
        drop(tx);
        self.send_endings();
        self.known = current;
        self.dirty = false;
        Ok(upto < current)
    }

    /// Hands `events` (the log read up to `upto`) to each watch from its
    /// next revision on, for the keys under its prefix.
    fn fan_out(&mut self, events: &[Event], upto: Revision) {
        for sub in &mut self.subs {
            if sub.idle() || sub.ending.is_some() {
                continue;
            }
            let mut blocked = false;
            for ev in events {
                if ev.revision() < sub.next || !sub.holds(ev.kv.key.as_bytes()) {
                    continue;
                }
                match sub.offer(Ok(ev.clone())) {
                    Ok(()) => sub.next = ev.revision() + 1,
                    Err(_) => {
                        // Full (or gone: dropped at the next wait). Resume
                        // from this change once the reader made room.
                        sub.next = ev.revision();
                        blocked = true;
                        break;
                    }
                }
            }
            if !blocked {
                sub.next = sub.next.max(upto + 1);
            }
        }
    }

    /// Offers each ending watch its last item; ended ones are dropped.
    fn send_endings(&mut self) {
        self.subs.retain_mut(|sub| {
            let Some(err) = sub.ending.take() else {
                return true;
            };
            if sub.full.load(Ordering::SeqCst) {
                sub.ending = Some(err);
                return true;
            }
            match sub.offer(Err(err)) {
                Ok(()) | Err(None) => false,
                Err(Some(Err(err))) => {
                    sub.ending = Some(err);
                    true
                }
                Err(Some(Ok(_))) => false,
            }
        });
    }

    /// Ends every watch with an error saying `detail`.
    fn fail_all(&mut self, detail: &str) {
        for sub in &mut self.subs {
            if sub.ending.is_none() {
                sub.ending = Some(StoreError::Invalid {
                    store: self.name.clone(),
                    detail: format!("the watch failed: {detail}"),
                });
            }
        }
        self.send_endings();
    }
}

/// Every change in `[from, current]`, at most [`READ_LIMIT`], in revision
/// order.
fn read_log(conn: &Connection, from: Revision, current: Revision) -> rusqlite::Result<Vec<Event>> {
    let mut st = conn.prepare_cached(
        "SELECT key, value, create_rev, rev, version, lease, kind FROM log
         WHERE rev >= ?1 AND rev <= ?2 ORDER BY rev LIMIT ?3",
    )?;
    // The first six columns are a key's row, with `rev` as its mod_revision.
    let rows = st.query_map(params![from, current, READ_LIMIT], |r| {
        let kind: i64 = r.get(6)?;
        Ok(Event {
            kind: if kind == KIND_DELETE {
                EventKind::Delete
            } else {
                EventKind::Put
            },
            kv: row_to_kv(r)?,
        })
    })?;
    rows.collect()
}
