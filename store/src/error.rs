use std::time::Duration;

use crate::{LeaseId, Revision};

/// What went wrong talking to the store. Every variant names the backend and
/// says what an operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached (etcd down, network gone). The data
    /// path is not affected; retry later.
    #[error("store {store} is unreachable: {detail} (is it running and reachable? retry later)")]
    Unavailable { store: String, detail: String },

    /// A request did not finish in time.
    #[error("store {store} did not answer within {timeout:?} (is it overloaded or down?)")]
    Timeout { store: String, timeout: Duration },

    /// The lease does not exist (it expired or was revoked).
    #[error(
        "lease {lease:#x} not found in store {store}: it expired or was revoked; grant a new one"
    )]
    LeaseNotFound { store: String, lease: LeaseId },

    /// A watch asked for history that the store has already discarded.
    #[error(
        "store {store} has compacted history up to revision {compacted}; \
         cannot watch from revision {requested}: re-read the prefix and watch from its revision"
    )]
    Compacted {
        store: String,
        requested: Revision,
        compacted: Revision,
    },

    /// The SQLite file could not be opened or used.
    #[error(
        "embedded store {path}: {source} (check the path, its permissions and free disk space)"
    )]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },

    /// Other processes kept the SQLite file locked for as long as opening it
    /// may wait (creating it, switching it to WAL, creating the schema).
    #[error(
        "embedded store {path}: still locked by another process after {waited:?} \
         while {step} ({source}); a process using the file may be stuck inside a \
         transaction: stop stale weft processes using it (`fuser -v {path}`) and start again"
    )]
    Locked {
        path: String,
        step: &'static str,
        waited: Duration,
        #[source]
        source: rusqlite::Error,
    },

    /// A key or value the store cannot hold.
    #[error("invalid request to store {store}: {detail}")]
    Invalid { store: String, detail: String },

    /// etcd answered with an error.
    #[error("etcd {store}: {detail}")]
    Etcd { store: String, detail: String },
}

impl StoreError {
    /// True when retrying the same call later may succeed (the store is
    /// down or slow), as opposed to a logic error in the request.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. } | StoreError::Timeout { .. } | StoreError::Locked { .. }
        ) || matches!(self, StoreError::Sqlite { source, .. } if is_busy(source))
    }
}

pub(crate) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy) | Some(rusqlite::ErrorCode::DatabaseLocked)
    )
}
