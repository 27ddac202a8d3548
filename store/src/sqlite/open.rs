//! Opening the store file safely while other processes open, create or use
//! it: every step retries on contention with a jittered, growing pause under
//! one deadline, and gives up with [`StoreError::Locked`].

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};

use super::sql_err;
use super::tables::{renew_leases_of_another_boot, SCHEMA};
use crate::error::is_busy;
use crate::{jittered, Result, StoreError};

/// How long a write waits for another process's transaction.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening the store (connecting, WAL, schema) keeps retrying while
/// other processes hold the file, in all.
pub(super) const OPEN_DEADLINE: Duration = Duration::from_secs(30);
/// How many prepared statements a connection keeps (the store runs fewer).
const STATEMENT_CACHE: usize = 32;
/// The first pause between attempts to open; it doubles up to
/// [`OPEN_BACKOFF_MAX`], each pause jittered by ±50% so processes that
/// collided once do not collide again in lockstep.
const OPEN_BACKOFF_MIN: Duration = Duration::from_millis(2);
const OPEN_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// A connection to the store file, set up (busy timeout, WAL), for a handle
/// or a watch. The schema is the caller's business.
pub(super) fn open_conn(path: &Path) -> Result<Connection> {
    let conn = Opening::new(path).connect()?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| sql_err(path, e))?;
    Ok(conn)
}

/// Creates the tables and the `meta` rows if missing, all in one
/// `BEGIN IMMEDIATE` transaction: the first process to get the write lock
/// creates everything, the others then find it complete. The same
/// transaction renews the leases of another boot (their deadlines count
/// in that boot's clock).
pub(super) fn create_schema(conn: &mut Connection) -> rusqlite::Result<()> {
    create_schema_in_boot(conn, weft_sys::time::boot_tag())
}

pub(super) fn create_schema_in_boot(
    conn: &mut Connection,
    boot: Option<i64>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;
    renew_leases_of_another_boot(&tx, boot)?;
    tx.commit()
}

/// Opening the store file: its steps retry on contention and share one
/// deadline and one growing pause.
pub(super) struct Opening<'a> {
    path: &'a Path,
    started: Instant,
    deadline: Duration,
    pause: Duration,
}

impl<'a> Opening<'a> {
    pub(super) fn new(path: &'a Path) -> Self {
        Self::with_deadline(path, OPEN_DEADLINE)
    }

    pub(super) fn with_deadline(path: &'a Path, deadline: Duration) -> Self {
        Self {
            path,
            started: Instant::now(),
            deadline,
            pause: OPEN_BACKOFF_MIN,
        }
    }

    /// Opens the file (creating it if missing) and sets the connection up.
    /// Its busy timeout is left at the time remaining to open.
    pub(super) fn connect(&mut self) -> Result<Connection> {
        let path = self.path;
        let conn = self.retry("opening the file", |wait| {
            let conn = Connection::open(path)?;
            // Before anything else touches the file: a statement that runs
            // into a lock must wait for it, not fail at once.
            conn.busy_timeout(wait)?;
            Ok(conn)
        })?;
        // Room for every statement the store runs, so none is parsed twice.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
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
    pub(super) fn retry<T>(
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
            let pause = jittered(self.pause, 500, 1500).min(left);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::SqliteStore;

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

    /// Lease deadlines count in the boot clock: a file last used in
    /// another boot (or by a version counting in wall-clock time) gets its
    /// leases' whole TTL again, once; the same boot leaves them alone.
    #[test]
    fn leases_of_another_boot_get_their_ttl_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let mut conn = Connection::open(&path).unwrap();
        create_schema_in_boot(&mut conn, Some(42)).unwrap();
        // A wall-clock deadline from an older version, and one long past.
        conn.execute_batch(
            "INSERT INTO leases (ttl_ms, expires_ms) VALUES (60000, 1764000000000), (30000, 1);",
        )
        .unwrap();
        let deadlines = |conn: &Connection| -> Vec<i64> {
            let mut st = conn
                .prepare("SELECT expires_ms FROM leases ORDER BY id")
                .unwrap();
            st.query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        create_schema_in_boot(&mut conn, Some(42)).unwrap();
        assert_eq!(
            deadlines(&conn),
            vec![1_764_000_000_000, 1],
            "same boot: untouched"
        );

        let before = super::super::tables::now_ms();
        create_schema_in_boot(&mut conn, Some(43)).unwrap();
        let after = super::super::tables::now_ms();
        let d = deadlines(&conn);
        assert!(d[0] >= before + 60_000 && d[0] <= after + 60_000, "{d:?}");
        assert!(d[1] >= before + 30_000 && d[1] <= after + 30_000, "{d:?}");
        // Once per boot.
        conn.execute_batch("UPDATE leases SET expires_ms = 7")
            .unwrap();
        create_schema_in_boot(&mut conn, Some(43)).unwrap();
        assert_eq!(deadlines(&conn), vec![7, 7]);
        // No boot id readable: nothing renewed.
        create_schema_in_boot(&mut conn, None).unwrap();
        assert_eq!(deadlines(&conn), vec![7, 7]);
    }
}
