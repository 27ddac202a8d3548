//! Embedded backend: one SQLite file (WAL mode) that several processes on one
//! machine may share.
//!
//! Layout: `kv` holds the live keys, `log` every change by revision (the watch
//! history, trimmed to the last [`HISTORY`] revisions), `leases` the leases
//! with their deadline in wall-clock milliseconds (processes share the file,
//! so they share the clock), `meta` the store revision and the compaction
//! point. Every write runs in one `BEGIN IMMEDIATE` transaction, so two
//! processes never interleave inside one operation. Expired leases are reaped
//! (their keys deleted, with delete events) by whichever process touches the
//! store next, including every watcher's poll, so an expiry reaches watchers
//! even when nobody writes.
//!
//! Watches poll the revision counter every [`WATCH_POLL`] from a thread of
//! their own with their own connection.
//!
//! Opening is safe when many processes open (and create) one file at the
//! same moment, as `netd`s starting together on a new file do. Every
//! connection gets its busy timeout before its first statement. Switching a
//! new file to WAL takes a write lock and may fail with `SQLITE_BUSY` at once,
//! without waiting in the busy handler, so each step of opening is retried
//! with a growing, jittered pause while another process holds the file. The
//! schema and the `meta` rows are created in one `BEGIN IMMEDIATE`
//! transaction, so exactly one process creates them and the others find them
//! complete. Only after [`OPEN_DEADLINE`] in all does opening give up, with
//! [`StoreError::Locked`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::mpsc;

use crate::error::is_busy;
use crate::{
    prefix_end, CasOutcome, Event, EventKind, Expect, KeyValue, LeaseId, Range, Result, Revision,
    Store, StoreError, Watch,
};

/// How often a watch looks for new revisions.
const WATCH_POLL: Duration = Duration::from_millis(20);
/// How many revisions of history a watch can resume from.
const HISTORY: i64 = 100_000;
/// How long a write waits for another process's transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening the store (connecting, WAL, schema) keeps retrying while
/// other processes hold the file, in all.
const OPEN_DEADLINE: Duration = Duration::from_secs(30);
/// The first pause between attempts to open; it doubles up to
/// [`OPEN_BACKOFF_MAX`], each pause jittered by ±50% so processes that
/// collided once do not collide again in lockstep.
const OPEN_BACKOFF_MIN: Duration = Duration::from_millis(2);
const OPEN_BACKOFF_MAX: Duration = Duration::from_millis(250);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 1), ('compacted', 0);
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_expiry ON leases (expires_ms);
CREATE TABLE IF NOT EXISTS log (
    rev INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL
);
";

const KIND_PUT: i64 = 0;
const KIND_DELETE: i64 = 1;

/// The embedded store. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    name: String,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store file at `path`. Safe while other
    /// processes open, create or use the same file: waits for them up to
    /// [`OPEN_DEADLINE`], then fails with [`StoreError::Locked`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let name = format!("sqlite:{}", path.display());
        let mut opening = Opening::new(&path);
        let mut conn = opening.connect()?;
        opening.retry("creating the schema", |wait| {
            conn.busy_timeout(wait)?;
            create_schema(&mut conn)
        })?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| sql_err(&path, e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                name,
                conn: Mutex::new(conn),
            }),
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Discards the watch history before `revision` (etcd's compaction:
    /// `revision` itself stays watchable), as the store does on its own once
    /// the history is long. For tests of what watchers do then.
    #[cfg(feature = "testing")]
    pub async fn compact(&self, revision: Revision) -> Result<()> {
        self.run(move |conn, path| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| sql_err(path, e))?;
            compact(&tx, revision - 1).map_err(|e| sql_err(path, e))?;
            tx.commit().map_err(|e| sql_err(path, e))
        })
        .await
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Path) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            // A poisoned lock only means another call panicked mid-way; the
            // connection itself is still usable (SQLite rolled back).
            let mut conn = match inner.conn.lock() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            f(&mut conn, &inner.path)
        })
        .await
        .map_err(|e| StoreError::Invalid {
            store: self.inner.name.clone(),
            detail: format!("store task failed: {e}"),
        })?
    }
}

/// A connection to the store file, set up (busy timeout, WAL), for a handle
/// or a watch. The schema is the caller's business.
fn open_conn(path: &Path) -> Result<Connection> {
    let conn = Opening::new(path).connect()?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| sql_err(path, e))?;
    Ok(conn)
}

/// Creates the tables and the `meta` rows if missing, all in one
/// `BEGIN IMMEDIATE` transaction: the first process to get the write lock
/// creates everything, the others then find it complete.
fn create_schema(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;
    tx.commit()
}

/// Opening the store file: its steps retry on contention and share one
/// deadline and one growing pause.
struct Opening<'a> {
    path: &'a Path,
    started: Instant,
    deadline: Duration,
    pause: Duration,
}

impl<'a> Opening<'a> {
    fn new(path: &'a Path) -> Self {
        Self::with_deadline(path, OPEN_DEADLINE)
    }

    fn with_deadline(path: &'a Path, deadline: Duration) -> Self {
        Self {
            path,
            started: Instant::now(),
            deadline,
            pause: OPEN_BACKOFF_MIN,
        }
    }

    /// Opens the file (creating it if missing) and sets the connection up.
    /// Its busy timeout is left at the time remaining to open.
    fn connect(&mut self) -> Result<Connection> {
        let path = self.path;
        let conn = self.retry("opening the file", |wait| {
            let conn = Connection::open(path)?;
            // Before anything else touches the file: a statement that runs
            // into a lock must wait for it, not fail at once.
            conn.busy_timeout(wait)?;
            Ok(conn)
        })?;
        // WAL lets readers (watch polls) run beside a writer. Switching a new
        // file to WAL needs the write lock and can report SQLITE_BUSY without
        // waiting, hence the retry.
        let mode = self.retry("switching to WAL", |wait| {
            conn.busy_timeout(wait)?;
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
        })?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(
                path = %self.path.display(),
                journal_mode = %mode,
                "the store file cannot use WAL here; readers will wait for writers"
            );
        }
        // NORMAL sync keeps the file consistent on a crash and loses at most
        // the last commits on a power cut.
        self.retry("setting synchronous", |wait| {
            conn.busy_timeout(wait)?;
            conn.pragma_update(None, "synchronous", "NORMAL")
        })?;
        Ok(conn)
    }

    /// Runs `step` until it succeeds, fails for a reason other than another
    /// process holding the file, or the deadline passes. `step` gets the time
    /// left, for its busy timeout.
    fn retry<T>(
        &mut self,
        what: &'static str,
        mut step: impl FnMut(Duration) -> rusqlite::Result<T>,
    ) -> Result<T> {
        loop {
            let left = self.deadline.saturating_sub(self.started.elapsed());
            let err = match step(left.min(BUSY_TIMEOUT)) {
                Ok(v) => return Ok(v),
                Err(e) if is_contention(&e) => e,
                Err(e) => return Err(sql_err(self.path, e)),
            };
            let waited = self.started.elapsed();
            let left = self.deadline.saturating_sub(waited);
            if left.is_zero() {
                return Err(StoreError::Locked {
                    path: self.path.display().to_string(),
                    step: what,
                    waited,
                    source: err,
                });
            }
            let pause = jittered(self.pause).min(left);
            tracing::debug!(
                path = %self.path.display(),
                step = what,
                error = %err,
                ?pause,
                "store file busy while opening; retrying"
            );
            std::thread::sleep(pause);
            self.pause = (self.pause * 2).min(OPEN_BACKOFF_MAX);
        }
    }
}

/// True when an error during opening means another process holds the file
/// for now: busy, locked, or WAL's lock protocol giving up under contention.
fn is_contention(e: &rusqlite::Error) -> bool {
    is_busy(e) || e.sqlite_error_code() == Some(rusqlite::ErrorCode::FileLockingProtocolFailed)
}

/// `pause` scaled by a random factor in [0.5, 1.5).
fn jittered(pause: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per process; mixing in the pid and the
    // clock makes successive draws differ too. Good enough for jitter.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let per_mille = 500 + (h.finish() % 1000) as u32;
    pause * per_mille / 1000
}

fn sql_err(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite {
        path: path.display().to_string(),
        source,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn meta(conn: &Connection, name: &str) -> rusqlite::Result<i64> {
    conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
        r.get(0)
    })
}

fn set_meta(conn: &Connection, name: &str, value: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE meta SET value = ?2 WHERE name = ?1",
        params![name, value],
    )?;
    Ok(())
}

fn key_string(bytes: Vec<u8>) -> String {
    // Keys only ever enter as &str, so this is lossless in practice.
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn row_to_kv(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
    let lease: i64 = r.get(5)?;
    Ok(KeyValue {
        key: key_string(r.get(0)?),
        value: r.get(1)?,
        create_revision: r.get(2)?,
        mod_revision: r.get(3)?,
        version: r.get(4)?,
        lease: (lease != 0).then_some(lease),
    })
}

const KV_COLUMNS: &str = "key, value, create_rev, mod_rev, version, lease";

fn get_kv(conn: &Connection, key: &str) -> rusqlite::Result<Option<KeyValue>> {
    conn.query_row(
        &format!("SELECT {KV_COLUMNS} FROM kv WHERE key = ?1"),
        [key.as_bytes()],
        row_to_kv,
    )
    .optional()
}

/// A write transaction's view: bumps the revision once per change and logs it.
struct Writer<'a> {
    tx: rusqlite::Transaction<'a>,
    rev: Revision,
}

impl<'a> Writer<'a> {
    fn begin(conn: &'a mut Connection) -> rusqlite::Result<Self> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let rev = meta(&tx, "revision")?;
        let mut w = Writer { tx, rev };
        w.reap_expired(now_ms())?;
        Ok(w)
    }

    fn next_rev(&mut self) -> Revision {
        self.rev += 1;
        self.rev
    }

    fn put(
        &mut self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> rusqlite::Result<Revision> {
        let rev = self.next_rev();
        let lease = lease.unwrap_or(0);
        let (create_rev, version) = match get_kv(&self.tx, key)? {
            Some(old) => (old.create_revision, old.version + 1),
            None => (rev, 1),
        };
        self.tx.execute(
            "INSERT INTO kv (key, value, create_rev, mod_rev, version, lease)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (key) DO UPDATE SET value = ?2, mod_rev = ?4, version = ?5, lease = ?6",
            params![key.as_bytes(), value, create_rev, rev, version, lease],
        )?;
        self.log(rev, KIND_PUT, key, value, create_rev, version, lease)?;
        Ok(rev)
    }

    fn delete(&mut self, key: &str) -> rusqlite::Result<Option<Revision>> {
        let Some(old) = get_kv(&self.tx, key)? else {
            return Ok(None);
        };
        let rev = self.next_rev();
        self.tx
            .execute("DELETE FROM kv WHERE key = ?1", [key.as_bytes()])?;
        self.log(rev, KIND_DELETE, key, &[], old.create_revision, 0, 0)?;
        Ok(Some(rev))
    }

    #[allow(clippy::too_many_arguments)]
    fn log(
        &self,
        rev: Revision,
        kind: i64,
        key: &str,
        value: &[u8],
        create_rev: Revision,
        version: i64,
        lease: LeaseId,
    ) -> rusqlite::Result<()> {
        self.tx.execute(
            "INSERT INTO log (rev, kind, key, value, create_rev, version, lease)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![rev, kind, key.as_bytes(), value, create_rev, version, lease],
        )?;
        Ok(())
    }

    /// Deletes every key of every lease whose deadline passed.
    fn reap_expired(&mut self, now: i64) -> rusqlite::Result<()> {
        let expired: Vec<i64> = {
            let mut st = self
                .tx
                .prepare_cached("SELECT id FROM leases WHERE expires_ms <= ?1")?;
            let ids = st.query_map([now], |r| r.get(0))?;
            ids.collect::<rusqlite::Result<_>>()?
        };
        for id in expired {
            self.drop_lease(id)?;
        }
        Ok(())
    }

    fn drop_lease(&mut self, id: LeaseId) -> rusqlite::Result<()> {
        let keys: Vec<Vec<u8>> = {
            let mut st = self
                .tx
                .prepare_cached("SELECT key FROM kv WHERE lease = ?1 ORDER BY key")?;
            let keys = st.query_map([id], |r| r.get(0))?;
            keys.collect::<rusqlite::Result<_>>()?
        };
        for key in keys {
            self.delete(&key_string(key))?;
        }
        self.tx.execute("DELETE FROM leases WHERE id = ?1", [id])?;
        Ok(())
    }

    fn lease_alive(&self, id: LeaseId) -> rusqlite::Result<bool> {
        Ok(self
            .tx
            .query_row("SELECT 1 FROM leases WHERE id = ?1", [id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn commit(self) -> rusqlite::Result<Revision> {
        let Writer { tx, rev } = self;
        set_meta(&tx, "revision", rev)?;
        if rev % 1000 == 0 && rev > HISTORY {
            compact(&tx, rev - HISTORY)?;
        }
        tx.commit()?;
        Ok(rev)
    }
}

/// Drops the watch history up to and including `upto`: a watch from a
/// revision `<= upto` fails with [`StoreError::Compacted`] from then on.
fn compact(conn: &Connection, upto: Revision) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM log WHERE rev <= ?1", [upto])?;
    set_meta(conn, "compacted", upto)
}

/// True when some lease's deadline has passed and its keys are still there.
fn expiry_pending(conn: &Connection) -> rusqlite::Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM leases WHERE expires_ms <= ?1 LIMIT 1",
            [now_ms()],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Before a read: apply pending lease expiries so reads never see keys of an
/// expired lease.
fn settle(conn: &mut Connection) -> rusqlite::Result<()> {
    if expiry_pending(conn)? {
        Writer::begin(conn)?.commit()?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    fn describe(&self) -> String {
        self.inner.name.clone()
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_owned();
        self.run(move |conn, path| {
            settle(conn)
                .and_then(|_| get_kv(conn, &key))
                .map_err(|e| sql_err(path, e))
        })
        .await
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Range> {
        let prefix = prefix.as_bytes().to_vec();
        self.run(move |conn, path| {
            let go = |conn: &mut Connection| -> rusqlite::Result<Range> {
                settle(conn)?;
                let tx = conn.transaction()?;
                let revision = meta(&tx, "revision")?;
                let kvs = match prefix_end(&prefix) {
                    Some(end) => {
                        let mut st = tx.prepare_cached(&format!(
                            "SELECT {KV_COLUMNS} FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key"
                        ))?;
                        let rows = st.query_map(params![prefix, end], row_to_kv)?;
                        rows.collect::<rusqlite::Result<Vec<_>>>()?
                    }
                    None => {
                        let mut st = tx.prepare_cached(&format!(
                            "SELECT {KV_COLUMNS} FROM kv WHERE key >= ?1 ORDER BY key"
                        ))?;
                        let rows = st.query_map(params![prefix], row_to_kv)?;
                        rows.collect::<rusqlite::Result<Vec<_>>>()?
                    }
                };
                Ok(Range { kvs, revision })
            };
            go(conn).map_err(|e| sql_err(path, e))
        })
        .await
    }

    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision> {
        let (key, value) = (key.to_owned(), value.to_vec());
        let name = self.describe();
        self.run(move |conn, path| {
            let mut w = Writer::begin(conn).map_err(|e| sql_err(path, e))?;
            check_lease(&w, lease, &name).map_err(|e| e.into_store(path))?;
            w.put(&key, &value, lease).map_err(|e| sql_err(path, e))?;
            w.commit().map_err(|e| sql_err(path, e))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_owned();
        self.run(move |conn, path| {
            let go = |conn: &mut Connection| -> rusqlite::Result<bool> {
                let mut w = Writer::begin(conn)?;
                let deleted = w.delete(&key)?.is_some();
                w.commit()?;
                Ok(deleted)
            };
            go(conn).map_err(|e| sql_err(path, e))
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome> {
        let (key, value) = (key.to_owned(), value.to_vec());
        let name = self.describe();
        self.run(move |conn, path| {
            let mut w = Writer::begin(conn).map_err(|e| sql_err(path, e))?;
            let current = get_kv(&w.tx, &key).map_err(|e| sql_err(path, e))?;
            if !matches_expect(current.as_ref(), expect) {
                w.commit().map_err(|e| sql_err(path, e))?;
                return Ok(CasOutcome::Conflict(current));
            }
            check_lease(&w, lease, &name).map_err(|e| e.into_store(path))?;
            w.put(&key, &value, lease).map_err(|e| sql_err(path, e))?;
            w.commit()
                .map(CasOutcome::Done)
                .map_err(|e| sql_err(path, e))
        })
        .await
    }

    async fn compare_and_delete(&self, key: &str, mod_revision: Revision) -> Result<CasOutcome> {
        let key = key.to_owned();
        self.run(move |conn, path| {
            let go = |conn: &mut Connection| -> rusqlite::Result<CasOutcome> {
                let mut w = Writer::begin(conn)?;
                let current = get_kv(&w.tx, &key)?;
                if !matches_expect(current.as_ref(), Expect::ModRevision(mod_revision)) {
                    w.commit()?;
                    return Ok(CasOutcome::Conflict(current));
                }
                w.delete(&key)?;
                w.commit().map(CasOutcome::Done)
            };
            go(conn).map_err(|e| sql_err(path, e))
        })
        .await
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl_ms = ttl.as_millis().clamp(1, i64::MAX as u128) as i64;
        self.run(move |conn, path| {
            let go = |conn: &mut Connection| -> rusqlite::Result<LeaseId> {
                let w = Writer::begin(conn)?;
                w.tx.execute(
                    "INSERT INTO leases (ttl_ms, expires_ms) VALUES (?1, ?2)",
                    params![ttl_ms, now_ms().saturating_add(ttl_ms)],
                )?;
                let id = w.tx.last_insert_rowid();
                w.commit()?;
                Ok(id)
            };
            go(conn).map_err(|e| sql_err(path, e))
        })
        .await
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()> {
        let name = self.describe();
        self.run(move |conn, path| {
            let go = |conn: &mut Connection| -> rusqlite::Result<usize> {
                // Writer::begin reaps the lease first if it already expired.
                let w = Writer::begin(conn)?;
                let n = w.tx.execute(
                    "UPDATE leases SET expires_ms = ?2 + ttl_ms WHERE id = ?1",
                    params![lease, now_ms()],
                )?;
                w.commit()?;
                Ok(n)
            };
            match go(conn).map_err(|e| sql_err(path, e))? {
                0 => Err(StoreError::LeaseNotFound { store: name, lease }),
                _ => Ok(()),
            }
        })
        .await
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        self.run(move |conn, path| {
            let go = |conn: &mut Connection| -> rusqlite::Result<()> {
                let mut w = Writer::begin(conn)?;
                if w.lease_alive(lease)? {
                    w.drop_lease(lease)?;
                }
                w.commit()?;
                Ok(())
            };
            go(conn).map_err(|e| sql_err(path, e))
        })
        .await
    }

    async fn revision(&self) -> Result<Revision> {
        self.run(move |conn, path| {
            settle(conn)
                .and_then(|_| meta(conn, "revision"))
                .map_err(|e| sql_err(path, e))
        })
        .await
    }

    async fn watch_prefix(&self, prefix: &str, start: Revision) -> Result<Watch> {
        let path = self.inner.path.clone();
        let name = self.describe();
        let prefix = prefix.as_bytes().to_vec();
        // Fix the starting point before returning, so nothing written after
        // this call returns can be missed.
        let (conn, next) = tokio::task::spawn_blocking({
            let path = path.clone();
            let name = name.clone();
            move || -> Result<(Connection, Revision)> {
                let conn = open_conn(&path)?;
                let current = meta(&conn, "revision").map_err(|e| sql_err(&path, e))?;
                let compacted = meta(&conn, "compacted").map_err(|e| sql_err(&path, e))?;
                if start == 0 {
                    return Ok((conn, current + 1));
                }
                if start <= compacted {
                    return Err(StoreError::Compacted {
                        store: name,
                        requested: start,
                        compacted,
                    });
                }
                Ok((conn, start))
            }
        })
        .await
        .map_err(|e| StoreError::Invalid {
            store: name.clone(),
            detail: format!("watch setup failed: {e}"),
        })??;

        let (tx, rx) = mpsc::channel(1024);
        std::thread::Builder::new()
            .name("weft-store-watch".into())
            .spawn(move || watch_loop(conn, path, name, prefix, next, tx))
            .map_err(|e| StoreError::Invalid {
                store: self.describe(),
                detail: format!("cannot start watch thread: {e}"),
            })?;
        Ok(Watch::new(rx))
    }
}

fn matches_expect(current: Option<&KeyValue>, expect: Expect) -> bool {
    match (current, expect) {
        (None, Expect::Absent) => true,
        (Some(kv), Expect::ModRevision(r)) => kv.mod_revision == r,
        _ => false,
    }
}

enum LeaseCheck {
    Sql(rusqlite::Error),
    NotFound(String, LeaseId),
}

impl LeaseCheck {
    fn into_store(self, path: &Path) -> StoreError {
        match self {
            LeaseCheck::Sql(e) => sql_err(path, e),
            LeaseCheck::NotFound(store, lease) => StoreError::LeaseNotFound { store, lease },
        }
    }
}

fn check_lease(w: &Writer<'_>, lease: Option<LeaseId>, name: &str) -> Result<(), LeaseCheck> {
    match lease {
        None => Ok(()),
        Some(id) => match w.lease_alive(id) {
            Ok(true) => Ok(()),
            Ok(false) => Err(LeaseCheck::NotFound(name.to_owned(), id)),
            Err(e) => Err(LeaseCheck::Sql(e)),
        },
    }
}

fn watch_loop(
    mut conn: Connection,
    path: PathBuf,
    name: String,
    prefix: Vec<u8>,
    mut next: Revision,
    tx: mpsc::Sender<Result<Event>>,
) {
    let end = prefix_end(&prefix);
    loop {
        if tx.is_closed() {
            return;
        }
        match poll_once(&mut conn, &prefix, end.as_deref(), next) {
            Ok((events, upto)) => {
                for ev in events {
                    if tx.blocking_send(Ok(ev)).is_err() {
                        return;
                    }
                }
                next = upto + 1;
            }
            Err(PollError::Compacted(compacted)) => {
                let _ = tx.blocking_send(Err(StoreError::Compacted {
                    store: name,
                    requested: next,
                    compacted,
                }));
                return;
            }
            Err(PollError::Sql(e)) if is_busy(&e) => {
                // Another process holds the write lock for longer than the
                // busy timeout; try again on the next tick.
                tracing::debug!(store = %name, error = %e, "watch poll busy");
            }
            Err(PollError::Sql(e)) => {
                let _ = tx.blocking_send(Err(sql_err(&path, e)));
                return;
            }
        }
        std::thread::sleep(WATCH_POLL);
    }
}

enum PollError {
    Sql(rusqlite::Error),
    Compacted(Revision),
}

impl From<rusqlite::Error> for PollError {
    fn from(e: rusqlite::Error) -> Self {
        PollError::Sql(e)
    }
}

/// Reads the events in `[next, current]` under `prefix`. Returns them and
/// the revision read up to.
fn poll_once(
    conn: &mut Connection,
    prefix: &[u8],
    end: Option<&[u8]>,
    next: Revision,
) -> Result<(Vec<Event>, Revision), PollError> {
    settle(conn)?;
    let tx = conn.transaction()?;
    let current = meta(&tx, "revision")?;
    if current < next {
        return Ok((Vec::new(), next - 1));
    }
    let compacted = meta(&tx, "compacted")?;
    if next <= compacted {
        return Err(PollError::Compacted(compacted));
    }
    let mut st = tx.prepare_cached(
        "SELECT rev, kind, key, value, create_rev, version, lease FROM log
         WHERE rev >= ?1 AND rev <= ?2 AND key >= ?3 AND (?4 IS NULL OR key < ?4)
         ORDER BY rev",
    )?;
    let rows = st.query_map(params![next, current, prefix, end], |r| {
        let kind: i64 = r.get(1)?;
        let lease: i64 = r.get(6)?;
        Ok(Event {
            kind: if kind == KIND_DELETE {
                EventKind::Delete
            } else {
                EventKind::Put
            },
            kv: KeyValue {
                key: key_string(r.get(2)?),
                value: r.get(3)?,
                create_revision: r.get(4)?,
                mod_revision: r.get(0)?,
                version: r.get(5)?,
                lease: (lease != 0).then_some(lease),
            },
        })
    })?;
    let events = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((events, current))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A process that keeps the file locked past the deadline gets the typed
    /// error naming the step, not a bare "database is locked".
    #[test]
    fn open_gives_up_with_locked_after_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        // Another holder: rollback journal, exclusive locking, one write, so
        // it keeps the exclusive lock until closed.
        let holder = Connection::open(&path).unwrap();
        holder
            .execute_batch(
                "PRAGMA locking_mode = EXCLUSIVE; CREATE TABLE t (x); INSERT INTO t VALUES (1);",
            )
            .unwrap();

        let deadline = Duration::from_millis(300);
        let started = Instant::now();
        let err = match Opening::with_deadline(&path, deadline).connect() {
            Ok(_) => panic!("opening a file another connection holds exclusively must fail"),
            Err(e) => e,
        };
        assert!(started.elapsed() >= deadline, "gave up early: {err}");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.is_transient(), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("switching to WAL"), "{msg}");
        assert!(msg.contains("stop stale weft processes"), "{msg}");

        // Once the holder lets go, opening works.
        drop(holder);
        SqliteStore::open(&path).unwrap();
    }

    #[test]
    fn jitter_stays_within_half_and_one_and_a_half() {
        let base = Duration::from_millis(100);
        for _ in 0..1000 {
            let p = jittered(base);
            assert!(p >= base / 2 && p < base * 3 / 2, "{p:?}");
        }
    }
}
