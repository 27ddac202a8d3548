//! Watches: each polls the `log` table every [`WATCH_POLL`] from a thread of
//! its own with its own connection and sends the changes under its prefix in
//! revision order; history trimmed past it ends the watch with
//! [`StoreError::Compacted`].

use std::path::PathBuf;
use std::time::Duration;

use rusqlite::{params, Connection};
use tokio::sync::mpsc;

use super::open::open_conn;
use super::sql_err;
use super::tables::{meta, row_to_kv, settle, KIND_DELETE};
use crate::error::is_busy;
use crate::{prefix_end, Event, EventKind, Result, Revision, StoreError, Watch};

/// How often a watch looks for new revisions.
pub(super) const WATCH_POLL: Duration = Duration::from_millis(20);

/// Starts a watch of `prefix` from `start` (0: from now on) on its own
/// connection and thread. The starting point is fixed before this returns, so
/// nothing written after it returns can be missed.
pub(super) async fn start(
    path: PathBuf,
    name: String,
    prefix: &str,
    start: Revision,
) -> Result<Watch> {
    let name_for_err = name.clone();
    let prefix = prefix.as_bytes().to_vec();
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
            store: name_for_err,
            detail: format!("cannot start watch thread: {e}"),
        })?;
    Ok(Watch::new(rx))
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
        "SELECT key, value, create_rev, rev, version, lease, kind FROM log
         WHERE rev >= ?1 AND rev <= ?2 AND key >= ?3 AND (?4 IS NULL OR key < ?4)
         ORDER BY rev",
    )?;
    // The first six columns are a key's row, with `rev` as its mod_revision.
    let rows = st.query_map(params![next, current, prefix, end], |r| {
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
    let events = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((events, current))
}
