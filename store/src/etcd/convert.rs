//! Translating etcd-client's world into the store's: its errors into a
//! [`StoreError`] that says what to do, its keys, events and headers into
//! [`KeyValue`], [`Event`] and [`Revision`].

use std::time::Duration;

use etcd_client::{TxnOpResponse, WatchResponse};

use crate::{CasOutcome, Event, EventKind, KeyValue, LeaseId, Result, Revision, StoreError};

/// gRPC status codes (stable numbers from the gRPC spec; `tonic::Code` is
/// not re-exported by etcd-client).
mod grpc {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const ABORTED: i32 = 10;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const UNAVAILABLE: i32 = 14;
}

/// What error mapping and conversions need; shared with watch tasks.
#[derive(Debug, Clone)]
pub(super) struct Ctx {
    pub(super) name: String,
    pub(super) request_timeout: Duration,
}

impl Ctx {
    pub(super) fn timeout(&self) -> StoreError {
        StoreError::Timeout {
            store: self.name.clone(),
            timeout: self.request_timeout,
        }
    }

    /// Maps an etcd-client error. `lease` is the lease the request used,
    /// for a precise [`StoreError::LeaseNotFound`].
    pub(super) fn map_err(&self, e: etcd_client::Error, lease: Option<LeaseId>) -> StoreError {
        use etcd_client::Error as E;
        let store = self.name.clone();
        match e {
            E::TransportError(e) => StoreError::Unavailable {
                store,
                detail: error_chain(&e),
            },
            E::IoError(e) => StoreError::Unavailable {
                store,
                detail: e.to_string(),
            },
            E::GRpcStatus(status) => {
                let code = status.code() as i32;
                let message = status.message().to_string();
                // `Status` displays as a debug dump; build a readable line.
                let detail = || with_sources(status.message(), std::error::Error::source(&status));
                match code {
                    grpc::NOT_FOUND if message.contains("lease not found") => {
                        StoreError::LeaseNotFound {
                            store,
                            lease: lease.unwrap_or_default(),
                        }
                    }
                    grpc::DEADLINE_EXCEEDED => self.timeout(),
                    // Unavailable: no connection, or etcd has no leader.
                    // Unknown/Cancelled/Aborted: the HTTP/2 connection broke
                    // in the middle of the request.
                    grpc::UNAVAILABLE | grpc::UNKNOWN | grpc::CANCELLED | grpc::ABORTED => {
                        StoreError::Unavailable {
                            store,
                            detail: detail(),
                        }
                    }
                    // Bad key/value/range, a too large request, a compacted
                    // or future revision.
                    grpc::INVALID_ARGUMENT | grpc::OUT_OF_RANGE => StoreError::Invalid {
                        store,
                        detail: message,
                    },
                    _ => StoreError::Etcd {
                        store,
                        detail: detail(),
                    },
                }
            }
            E::LeaseKeepAliveError(detail) if detail.contains("lease not found") => {
                StoreError::LeaseNotFound {
                    store,
                    lease: lease.unwrap_or_default(),
                }
            }
            // etcd-client's own stream plumbing: the keep-alive or watch
            // stream ended or could not be fed, i.e. the connection broke.
            E::LeaseKeepAliveError(detail) | E::WatchError(detail) => {
                StoreError::Unavailable { store, detail }
            }
            E::InvalidArgs(detail) => StoreError::Invalid { store, detail },
            E::InvalidUri(e) => StoreError::Invalid {
                store,
                detail: format!("invalid endpoint URL: {e}"),
            },
            other => StoreError::Etcd {
                store,
                detail: other.to_string(),
            },
        }
    }

    pub(super) fn convert_kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
        let key = std::str::from_utf8(kv.key()).map_err(|_| StoreError::Invalid {
            store: self.name.clone(),
            detail: format!(
                "key {:?} in etcd is not valid UTF-8",
                String::from_utf8_lossy(kv.key())
            ),
        })?;
        Ok(KeyValue {
            key: key.to_string(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: (kv.lease() != 0).then_some(kv.lease()),
        })
    }

    pub(super) fn header_revision(
        &self,
        header: Option<&etcd_client::ResponseHeader>,
    ) -> Result<Revision> {
        header
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Etcd {
                store: self.name.clone(),
                detail: "etcd sent a response without a header".into(),
            })
    }

    /// The current key, from a failed transaction's `else` branch (a get).
    pub(super) fn conflict(&self, resp: &etcd_client::TxnResponse) -> Result<CasOutcome> {
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                return Ok(CasOutcome::Conflict(match get.kvs().first() {
                    Some(kv) => Some(self.convert_kv(kv)?),
                    None => None,
                }));
            }
        }
        Err(StoreError::Etcd {
            store: self.name.clone(),
            detail: "failed transaction without the expected read".into(),
        })
    }

    /// A watch event as the store contract sees it.
    pub(super) fn convert_event(&self, event: &etcd_client::Event) -> Option<Result<Event>> {
        let kv = event.kv()?;
        // etcd itself marks an event as a delete when create_revision == 0
        // (mvcc/watchable_store_txn.go); a put always has create_revision >
        // 0. Deciding the same way avoids `Event::event_type`, which panics
        // on an unknown type number.
        let kind = if kv.create_revision() == 0 {
            EventKind::Delete
        } else {
            EventKind::Put
        };
        Some(self.convert_kv(kv).map(|mut kv| {
            if kind == EventKind::Delete {
                kv.value.clear();
            }
            Event { kind, kv }
        }))
    }

    /// Why etcd canceled a watch.
    pub(super) fn canceled_error(&self, resp: &WatchResponse, start: Revision) -> StoreError {
        if resp.compact_revision() > 0 {
            return StoreError::Compacted {
                store: self.name.clone(),
                requested: start,
                compacted: resp.compact_revision(),
            };
        }
        let reason = resp.cancel_reason();
        StoreError::Etcd {
            store: self.name.clone(),
            detail: if reason.is_empty() {
                "etcd canceled the watch".to_string()
            } else {
                format!("etcd canceled the watch: {reason}")
            },
        }
    }
}

/// A message followed by the chain of errors below it, each once, e.g.
/// "tcp connect error: transport error: Connection refused (os error 111)".
fn with_sources(message: &str, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut out = message.to_string();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// An error and its sources, for messages.
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    with_sources(&e.to_string(), e.source())
}
