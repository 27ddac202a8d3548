//! Embedded backend: one SQLite file (WAL mode) that several processes on one
//! machine may share.
//!
//! Layout: `kv` holds the live keys, `log` every change by revision (the watch
//! history, trimmed to the last [`tables::HISTORY`] revisions), `leases` the leases
//! with their deadline in wall-clock milliseconds (processes share the file,
//! so they share the clock), `meta` the store revision and the compaction
//! point. Every write runs in one `BEGIN IMMEDIATE` transaction, so two
//! processes never interleave inside one operation. Expired leases are reaped
//! (their keys deleted, with delete events) by whichever process touches the
//! store next, including the watch poller at the earliest lease deadline, so
//! an expiry reaches watchers even when nobody writes.
//!
//! Watches: one poller thread per opened store, with its own connection,
//! serves all of them; idle it only checks `PRAGMA data_version` every
//! [`watch::WATCH_POLL`], and a write through this handle wakes it at once.
//!
//! Opening is safe when many processes open (and create) one file at the
//! same moment, as `netd`s starting together on a new file do. Every
//! connection gets its busy timeout before its first statement. Switching a
//! new file to WAL takes a write lock and may fail with `SQLITE_BUSY` at once,
//! without waiting in the busy handler, so each step of opening is retried
//! with a growing, jittered pause while another process holds the file. The
//! schema and the `meta` rows are created in one `BEGIN IMMEDIATE`
//! transaction, so exactly one process creates them and the others find them
//! complete. Only after [`open::OPEN_DEADLINE`] in all does opening give up, with
//! [`StoreError::Locked`].
//!
//! Modules: `open` (opening the file under contention), `tables` (the
//! schema, row helpers and the one write transaction), `watch` (the poller
//! and its watches); this file is the [`Store`] face over them.

mod open;
mod tables;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection};

use crate::{
    prefix_end, CasOutcome, Expect, KeyValue, LeaseId, Range, Result, Revision, Store, StoreError,
    Watch,
};
use open::{create_schema, Opening, BUSY_TIMEOUT};
use tables::{get_kv, meta, now_ms, row_to_kv, settle, Writer, KV_COLUMNS};
use watch::{first_revision, Hub};

/// The embedded store. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    name: String,
    conn: Mutex<Connection>,
    watches: Hub,
}

impl SqliteStore {
    /// Opens (creating if needed) the store file at `path`. Safe while other
    /// processes open, create or use the same file: waits for them up to
    /// [`open::OPEN_DEADLINE`], then fails with [`StoreError::Locked`].
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
                watches: Hub::new(path.clone(), name.clone()),
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
        self.write(move |conn, path| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|e| sql_err(path, e))?;
            tables::compact(&tx, revision - 1).map_err(|e| sql_err(path, e))?;
            tx.commit().map_err(|e| sql_err(path, e))
        })
        .await
    }

    /// [`SqliteStore::run`] for a call that may change keys: wakes this
    /// store's watches afterwards.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Path) -> Result<T> + Send + 'static,
    {
        let result = self.run(f).await;
        self.inner.watches.kick();
        result
    }

    /// Writes every key of `kvs` in one transaction, as one etcd txn of puts
    /// does (a revision each, in order). Returns the last revision. For
    /// tests and benches that simulate bursts of records.
    #[cfg(feature = "testing")]
    pub async fn put_batch(&self, kvs: Vec<(String, Vec<u8>)>) -> Result<Revision> {
        self.write(move |conn, path| {
            let go = |conn: &mut Connection| -> rusqlite::Result<Revision> {
                let mut w = Writer::begin(conn)?;
                for (key, value) in &kvs {
                    w.put(key, value, None)?;
                }
                w.commit()
            };
            go(conn).map_err(|e| sql_err(path, e))
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
        self.write(move |conn, path| {
            let mut w = Writer::begin(conn).map_err(|e| sql_err(path, e))?;
            check_lease(&w, lease, &name).map_err(|e| e.into_store(path))?;
            w.put(&key, &value, lease).map_err(|e| sql_err(path, e))?;
            w.commit().map_err(|e| sql_err(path, e))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_owned();
        self.write(move |conn, path| {
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
        self.write(move |conn, path| {
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
        self.write(move |conn, path| {
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
        self.write(move |conn, path| {
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
        self.write(move |conn, path| {
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
        self.write(move |conn, path| {
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
        let name = self.describe();
        let next = self
            .run(move |conn, path| {
                let current = meta(conn, "revision").map_err(|e| sql_err(path, e))?;
                let compacted = meta(conn, "compacted").map_err(|e| sql_err(path, e))?;
                first_revision(&name, start, current, compacted)
            })
            .await?;
        self.inner.watches.watch(prefix, next)
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

pub(super) fn sql_err(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite {
        path: path.display().to_string(),
        source,
    }
}
