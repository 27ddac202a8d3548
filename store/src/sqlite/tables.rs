//! The tables (`kv`, `log`, `leases`, `meta`), reading rows, and the one
//! write transaction every change goes through: it bumps the revision per
//! change, logs each change for watchers, reaps expired leases and trims the
//! history.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::{KeyValue, LeaseId, Revision};

/// How many revisions of history a watch can resume from.
pub(super) const HISTORY: i64 = 100_000;
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 1), ('compacted', 0), ('lease_boot', 0);
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

pub(super) const KIND_PUT: i64 = 0;
pub(super) const KIND_DELETE: i64 = 1;

/// The leases' clock as SQLite's integer: the machine's boot clock
/// ([`weft_sys::time::boot_ms`]), the same for every process sharing the
/// file, so stepping the wall clock expires no lease. A lease deadline from
/// an earlier boot is renewed when the file is opened
/// ([`renew_leases_of_another_boot`]).
pub(super) fn now_ms() -> i64 {
    i64::try_from(weft_sys::time::boot_ms()).unwrap_or(i64::MAX)
}

/// Lease deadlines count in [`now_ms`], which starts again at every boot:
/// when the file was last used in another boot (or by a version that
/// counted leases in wall-clock time), every lease gets its whole TTL from
/// now, as etcd gives its leases after a restart. Inside the schema's
/// transaction, so the first process to open the file after a boot does it
/// once.
pub(super) fn renew_leases_of_another_boot(
    conn: &Connection,
    boot: Option<i64>,
) -> rusqlite::Result<()> {
    let Some(boot) = boot else {
        return Ok(());
    };
    if meta(conn, "lease_boot")? == boot {
        return Ok(());
    }
    conn.execute(
        "UPDATE leases SET expires_ms = ?1 + ttl_ms",
        params![now_ms()],
    )?;
    set_meta(conn, "lease_boot", boot)
}

pub(super) fn meta(conn: &Connection, name: &str) -> rusqlite::Result<i64> {
    // Cached: every write and every read of the watch poller calls it.
    conn.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
}

pub(super) fn set_meta(conn: &Connection, name: &str, value: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE meta SET value = ?2 WHERE name = ?1")?
        .execute(params![name, value])?;
    Ok(())
}

fn key_string(bytes: Vec<u8>) -> String {
    // Keys only ever enter as &str, so this is lossless in practice.
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A key from the first six columns of a row: key, value, create_rev,
/// mod_rev, version, lease (0: none), as [`KV_COLUMNS`] selects them.
pub(super) fn row_to_kv(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
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

pub(super) const KV_COLUMNS: &str = "key, value, create_rev, mod_rev, version, lease";

pub(super) fn get_kv(conn: &Connection, key: &str) -> rusqlite::Result<Option<KeyValue>> {
    conn.prepare_cached(&format!("SELECT {KV_COLUMNS} FROM kv WHERE key = ?1"))?
        .query_row([key.as_bytes()], row_to_kv)
        .optional()
}

/// A write transaction's view: bumps the revision once per change and logs it.
pub(super) struct Writer<'a> {
    pub(super) tx: rusqlite::Transaction<'a>,
    rev: Revision,
}

impl<'a> Writer<'a> {
    pub(super) fn begin(conn: &'a mut Connection) -> rusqlite::Result<Self> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let rev = meta(&tx, "revision")?;
        let mut w = Writer { tx, rev };
        w.reap_expired(now_ms())?;
        Ok(w)
    }

    pub(super) fn next_rev(&mut self) -> Revision {
        self.rev += 1;
        self.rev
    }

    pub(super) fn put(
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
        self.tx
            .prepare_cached(
                "INSERT INTO kv (key, value, create_rev, mod_rev, version, lease)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (key) DO UPDATE SET value = ?2, mod_rev = ?4, version = ?5, lease = ?6",
            )?
            .execute(params![key.as_bytes(), value, create_rev, rev, version, lease])?;
        self.log(rev, KIND_PUT, key, value, create_rev, version, lease)?;
        Ok(rev)
    }

    pub(super) fn delete(&mut self, key: &str) -> rusqlite::Result<Option<Revision>> {
        let Some(old) = get_kv(&self.tx, key)? else {
            return Ok(None);
        };
        let rev = self.next_rev();
        self.tx
            .prepare_cached("DELETE FROM kv WHERE key = ?1")?
            .execute([key.as_bytes()])?;
        self.log(rev, KIND_DELETE, key, &[], old.create_revision, 0, 0)?;
        Ok(Some(rev))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn log(
        &self,
        rev: Revision,
        kind: i64,
        key: &str,
        value: &[u8],
        create_rev: Revision,
        version: i64,
        lease: LeaseId,
    ) -> rusqlite::Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO log (rev, kind, key, value, create_rev, version, lease)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                rev,
                kind,
                key.as_bytes(),
                value,
                create_rev,
                version,
                lease
            ])?;
        Ok(())
    }

    /// Deletes every key of every lease whose deadline passed.
    pub(super) fn reap_expired(&mut self, now: i64) -> rusqlite::Result<()> {
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

    pub(super) fn drop_lease(&mut self, id: LeaseId) -> rusqlite::Result<()> {
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

    pub(super) fn lease_alive(&self, id: LeaseId) -> rusqlite::Result<bool> {
        Ok(self
            .tx
            .prepare_cached("SELECT 1 FROM leases WHERE id = ?1")?
            .query_row([id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    pub(super) fn commit(self) -> rusqlite::Result<Revision> {
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
pub(super) fn compact(conn: &Connection, upto: Revision) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM log WHERE rev <= ?1", [upto])?;
    set_meta(conn, "compacted", upto)
}

/// True when some lease's deadline has passed and its keys are still there.
pub(super) fn expiry_pending(conn: &Connection) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM leases WHERE expires_ms <= ?1 LIMIT 1")?
        .query_row([now_ms()], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Before a read: apply pending lease expiries so reads never see keys of an
/// expired lease.
pub(super) fn settle(conn: &mut Connection) -> rusqlite::Result<()> {
    if expiry_pending(conn)? {
        Writer::begin(conn)?.commit()?;
    }
    Ok(())
}
