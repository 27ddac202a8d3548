//! etcd v3 backend, on the `etcd-client` crate.
//!
//! * Every call is bounded by [`EtcdConfig::request_timeout`]: when etcd
//!   cannot be reached a call fails with [`StoreError::Unavailable`] or
//!   [`StoreError::Timeout`] instead of hanging.
//! * The connection is lazy and self-healing: [`EtcdStore::connect`]
//!   succeeds even while etcd is down, and after a transport failure or a
//!   timeout the next call builds a fresh gRPC channel, so the same store
//!   works again as soon as etcd is back.
//! * Revoking a lease that etcd does not know (it expired or was already
//!   revoked) returns `Ok(())`: the caller wanted it gone, and it is.
//! * A watch ends with `Err(Unavailable)` when its stream breaks (etcd
//!   stopped); it does not resume by itself. The caller re-reads and
//!   re-watches from the revision after its last event.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchResponse, WatchStream,
};
use tokio::sync::{mpsc, RwLock};

use crate::{
    CasOutcome, Event, EventKind, Expect, KeyValue, LeaseId, Range, Result, Revision, Store,
    StoreError, Watch,
};

/// How many watch events may wait in a [`Watch`] before the forwarding task
/// stops reading from etcd (back-pressure).
const WATCH_CHANNEL_CAPACITY: usize = 1024;

/// How often an HTTP/2 connection with open streams (watches) is pinged, so
/// that a vanished etcd or network path is noticed. etcd answers pings more
/// frequent than every 5 s (`--grpc-keepalive-min-time`) with GOAWAY.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

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

/// How to reach an etcd v3 cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// How long to wait for a TCP connection to one endpoint.
    pub connect_timeout: Duration,
    /// Upper bound for every request, including establishing a watch.
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// A config with the default timeouts: 2 s to connect, 5 s per request.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// A [`Store`] backed by an etcd v3 cluster.
pub struct EtcdStore {
    cfg: EtcdConfig,
    ctx: Ctx,
    conn: RwLock<Conn>,
    /// Generation of the newest client that failed with a transport error or
    /// a timeout (0: none). When it equals [`Conn::generation`], the next
    /// call builds a new client.
    failed_generation: AtomicU64,
}

/// The current gRPC client and its generation number.
struct Conn {
    generation: u64,
    client: Option<Client>,
}

/// What error mapping and conversions need; shared with watch tasks.
#[derive(Debug, Clone)]
struct Ctx {
    name: String,
    request_timeout: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Prepares a connection to etcd. The connection itself is made lazily:
    /// this succeeds even when etcd is down at this moment; calls then fail
    /// with [`StoreError::Unavailable`] or [`StoreError::Timeout`] until it
    /// is back. Fails only when the config is unusable (no endpoints, a
    /// malformed URL).
    pub async fn connect(cfg: EtcdConfig) -> Result<Self> {
        let ctx = Ctx {
            name: format!("etcd:{}", cfg.endpoints.join(",")),
            request_timeout: cfg.request_timeout,
        };
        if cfg.endpoints.is_empty() {
            return Err(StoreError::Invalid {
                store: ctx.name,
                detail: "no etcd endpoints configured".into(),
            });
        }
        let store = Self {
            cfg,
            ctx,
            conn: RwLock::new(Conn {
                generation: 1,
                client: None,
            }),
            failed_generation: AtomicU64::new(0),
        };
        // Build the (lazy) client now so that a malformed endpoint is
        // reported here rather than on every call.
        store.client().await?;
        Ok(store)
    }

    fn options(&self) -> ConnectOptions {
        ConnectOptions::new()
            .with_connect_timeout(self.cfg.connect_timeout)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, self.cfg.request_timeout)
    }

    /// The current client and its generation, building a new client if
    /// there is none or if the current one failed.
    async fn client(&self) -> Result<(Client, u64)> {
        {
            let conn = self.conn.read().await;
            if let Some(client) = self.usable(&conn) {
                return Ok((client, conn.generation));
            }
        }
        let mut conn = self.conn.write().await;
        // Another call may have rebuilt it while this one waited.
        if let Some(client) = self.usable(&conn) {
            return Ok((client, conn.generation));
        }
        // Without authentication, Client::connect does no I/O: it sets up a
        // channel that connects on first use. Bound it anyway.
        let connect = Client::connect(self.cfg.endpoints.clone(), Some(self.options()));
        let client = match tokio::time::timeout(self.cfg.request_timeout, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(self.ctx.map_err(e, None)),
            Err(_) => return Err(self.ctx.timeout()),
        };
        if conn.client.is_some() {
            conn.generation += 1;
            tracing::debug!(
                store = %self.ctx.name,
                generation = conn.generation,
                "reconnecting to etcd with a new client"
            );
        }
        conn.client = Some(client.clone());
        Ok((client, conn.generation))
    }

    fn usable(&self, conn: &Conn) -> Option<Client> {
        let client = conn.client.as_ref()?;
        (self.failed_generation.load(Ordering::Acquire) != conn.generation).then(|| client.clone())
    }

    /// Runs one request on the current client, bounded by the request
    /// timeout. A transport failure or a timeout marks the client as broken
    /// so that the next call builds a new one.
    async fn call<T, F, Fut>(&self, lease: Option<LeaseId>, f: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let (client, generation) = self.client().await?;
        let err = match tokio::time::timeout(self.cfg.request_timeout, f(client)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => self.ctx.map_err(e, lease),
            Err(_) => self.ctx.timeout(),
        };
        if err.is_transient() {
            self.failed_generation
                .fetch_max(generation, Ordering::AcqRel);
        }
        Err(err)
    }

    /// Whether etcd's history before `start` is gone (compacted). A read at
    /// revision `start` fails with "required revision has been compacted"
    /// exactly when a watch from `start` would be canceled for compaction.
    async fn history_compacted(&self, start: Revision) -> Result<bool> {
        let options = GetOptions::new().with_count_only().with_revision(start);
        let result = self
            .call(None, |mut c| async move {
                c.get(b"\0".to_vec(), Some(options)).await
            })
            .await;
        match result {
            Ok(_) => Ok(false),
            Err(StoreError::Invalid { detail, .. }) if detail.contains("compacted") => Ok(true),
            // A future revision: fine for a watch, it waits for it.
            Err(StoreError::Invalid { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Opens an etcd watch and waits until etcd confirms it ("created"), so
    /// that every change after this returns is seen. Returns the stream, the
    /// watch id, and a response already read that must be handled first.
    async fn open_watch(
        &self,
        prefix: &str,
        start: Revision,
    ) -> Result<(WatchStream, i64, Option<WatchResponse>)> {
        // etcd confirms a watch from compacted history and cancels it only
        // afterwards (up to 100 ms later). Detect that case up front so that
        // watch_prefix itself fails with Compacted, as the SQLite backend
        // does; a compaction that happens later still ends the stream with
        // Compacted.
        let compacted = start > 0 && self.history_compacted(start).await?;
        let mut options = WatchOptions::new().with_prefix();
        if start > 0 {
            options = options.with_start_revision(start);
        }
        let key = prefix.as_bytes().to_vec();
        let (mut stream, first, second) = self
            .call(None, |mut client| async move {
                let mut stream = client.watch(key, Some(options)).await?;
                let first = stream.message().await?;
                let confirmed = first.as_ref().is_some_and(|f| f.created() && !f.canceled());
                let second = if compacted && confirmed {
                    stream.message().await?
                } else {
                    None
                };
                Ok((stream, first, second))
            })
            .await?;
        let Some(first) = first else {
            return Err(StoreError::Unavailable {
                store: self.ctx.name.clone(),
                detail: "watch stream closed before etcd confirmed the watch".into(),
            });
        };
        if first.canceled() {
            return Err(self.ctx.canceled_error(&first, start));
        }
        // etcd's first response on a new watch stream is always the
        // confirmation, without events.
        if !first.created() || !first.events().is_empty() {
            cancel_watch(&mut stream, first.watch_id(), self.cfg.request_timeout).await;
            return Err(StoreError::Etcd {
                store: self.ctx.name.clone(),
                detail: "etcd did not confirm the watch as expected".into(),
            });
        }
        if let Some(second) = &second {
            if second.canceled() && second.events().is_empty() {
                return Err(self.ctx.canceled_error(second, start));
            }
        }
        Ok((stream, first.watch_id(), second))
    }
}

impl Ctx {
    fn timeout(&self) -> StoreError {
        StoreError::Timeout {
            store: self.name.clone(),
            timeout: self.request_timeout,
        }
    }

    /// Maps an etcd-client error. `lease` is the lease the request used,
    /// for a precise [`StoreError::LeaseNotFound`].
    fn map_err(&self, e: etcd_client::Error, lease: Option<LeaseId>) -> StoreError {
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

    fn convert_kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
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

    fn header_revision(&self, header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
        header
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Etcd {
                store: self.name.clone(),
                detail: "etcd sent a response without a header".into(),
            })
    }

    /// The current key, from a failed transaction's `else` branch (a get).
    fn conflict(&self, resp: &etcd_client::TxnResponse) -> Result<CasOutcome> {
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
    fn convert_event(&self, event: &etcd_client::Event) -> Option<Result<Event>> {
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
    fn canceled_error(&self, resp: &WatchResponse, start: Revision) -> StoreError {
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

/// Forwards etcd watch responses into `tx` until the receiver is dropped,
/// etcd cancels the watch, or the stream fails.
async fn forward_watch(
    ctx: Ctx,
    mut stream: WatchStream,
    watch_id: i64,
    start: Revision,
    mut pending: Option<WatchResponse>,
    tx: mpsc::Sender<Result<Event>>,
) {
    let stop = ctx.request_timeout;
    loop {
        let message = if let Some(resp) = pending.take() {
            Ok(Some(resp))
        } else {
            tokio::select! {
                message = stream.message() => message,
                () = tx.closed() => {
                    cancel_watch(&mut stream, watch_id, stop).await;
                    return;
                }
            }
        };
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                let _ = tx
                    .send(Err(StoreError::Unavailable {
                        store: ctx.name.clone(),
                        detail: "etcd closed the watch stream".into(),
                    }))
                    .await;
                return;
            }
            Err(e) => {
                // Whatever broke the stream, the watch is gone and the
                // caller must re-read and re-watch: report it as the store
                // being unreachable.
                let err = match ctx.map_err(e, None) {
                    StoreError::Etcd { store, detail } | StoreError::Invalid { store, detail } => {
                        StoreError::Unavailable { store, detail }
                    }
                    other => other,
                };
                tracing::debug!(store = %ctx.name, error = %err, "etcd watch stream ended");
                let _ = tx.send(Err(err)).await;
                return;
            }
        };
        for event in resp.events() {
            let Some(item) = ctx.convert_event(event) else {
                continue;
            };
            let last = item.is_err();
            if tx.send(item).await.is_err() || last {
                cancel_watch(&mut stream, watch_id, stop).await;
                return;
            }
        }
        if resp.canceled() {
            let _ = tx.send(Err(ctx.canceled_error(&resp, start))).await;
            return;
        }
    }
}

/// Best effort: asks etcd to cancel the watch; dropping the stream right
/// after closes it on the server side in any case.
async fn cancel_watch(stream: &mut WatchStream, watch_id: i64, limit: Duration) {
    let _ = tokio::time::timeout(limit, stream.cancel(watch_id)).await;
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
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    with_sources(&e.to_string(), e.source())
}

/// Rounds a TTL up to whole seconds, at least 1.
fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0));
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

#[async_trait]
impl Store for EtcdStore {
    fn describe(&self) -> String {
        self.ctx.name.clone()
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.as_bytes().to_vec();
        let resp = self
            .call(None, |mut c| async move { c.get(key, None).await })
            .await?;
        resp.kvs()
            .first()
            .map(|kv| self.ctx.convert_kv(kv))
            .transpose()
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Range> {
        let key = prefix.as_bytes().to_vec();
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let resp = self
            .call(None, |mut c| async move { c.get(key, Some(options)).await })
            .await?;
        let revision = self.ctx.header_revision(resp.header())?;
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| self.ctx.convert_kv(kv))
            .collect::<Result<Vec<_>>>()?;
        Ok(Range { kvs, revision })
    }

    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision> {
        let key = key.as_bytes().to_vec();
        let value = value.to_vec();
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        let resp = self
            .call(
                lease,
                |mut c| async move { c.put(key, value, options).await },
            )
            .await?;
        self.ctx.header_revision(resp.header())
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.as_bytes().to_vec();
        let resp = self
            .call(None, |mut c| async move {
                c.delete(key, None::<DeleteOptions>).await
            })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome> {
        let k = key.as_bytes().to_vec();
        let compare = match expect {
            Expect::Absent => Compare::create_revision(k.clone(), CompareOp::Equal, 0),
            Expect::ModRevision(r) => Compare::mod_revision(k.clone(), CompareOp::Equal, r),
        };
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(k.clone(), value.to_vec(), options)])
            .or_else([TxnOp::get(k, None)]);
        let resp = self
            .call(lease, |mut c| async move { c.txn(txn).await })
            .await?;
        if resp.succeeded() {
            Ok(CasOutcome::Done(self.ctx.header_revision(resp.header())?))
        } else {
            self.ctx.conflict(&resp)
        }
    }

    async fn compare_and_delete(&self, key: &str, mod_revision: Revision) -> Result<CasOutcome> {
        let k = key.as_bytes().to_vec();
        let txn = Txn::new()
            .when([Compare::mod_revision(
                k.clone(),
                CompareOp::Equal,
                mod_revision,
            )])
            .and_then([TxnOp::delete(k.clone(), None)])
            .or_else([TxnOp::get(k, None)]);
        let resp = self
            .call(None, |mut c| async move { c.txn(txn).await })
            .await?;
        if resp.succeeded() {
            Ok(CasOutcome::Done(self.ctx.header_revision(resp.header())?))
        } else {
            self.ctx.conflict(&resp)
        }
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl = ttl_seconds(ttl);
        let resp = self
            .call(None, |mut c| async move { c.lease_grant(ttl, None).await })
            .await?;
        Ok(resp.id())
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()> {
        // etcd-client's keep_alive opens the keep-alive stream, sends one
        // request and reads one response; a response TTL <= 0 comes back as
        // "lease not found". Dropping the keeper and stream closes it.
        self.call(Some(lease), |mut c| async move {
            c.lease_keep_alive(lease).await.map(drop)
        })
        .await
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        let result = self
            .call(Some(lease), |mut c| async move {
                c.lease_revoke(lease).await.map(drop)
            })
            .await;
        match result {
            // Already gone (expired or revoked): what the caller wanted.
            Err(StoreError::LeaseNotFound { .. }) => Ok(()),
            other => other,
        }
    }

    async fn revision(&self) -> Result<Revision> {
        // A count-only read of one key: the cheapest request with a header.
        let options = GetOptions::new().with_count_only();
        let resp = self
            .call(None, |mut c| async move {
                c.get(b"\0".to_vec(), Some(options)).await
            })
            .await?;
        self.ctx.header_revision(resp.header())
    }

    async fn watch_prefix(&self, prefix: &str, start: Revision) -> Result<Watch> {
        let (stream, watch_id, pending) = self.open_watch(prefix, start).await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let ctx = self.ctx.clone();
        tokio::spawn(forward_watch(ctx, stream, watch_id, start, pending, tx));
        Ok(Watch::new(rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::from_secs(1)), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(ttl_seconds(Duration::from_secs(30)), 30);
        assert_eq!(ttl_seconds(Duration::MAX), i64::MAX);
    }

    #[test]
    fn config_defaults() {
        let cfg = EtcdConfig::new(vec!["http://127.0.0.1:2379".into()]);
        assert_eq!(cfg.connect_timeout, Duration::from_secs(2));
        assert_eq!(cfg.request_timeout, Duration::from_secs(5));
    }

    #[tokio::test]
    async fn connect_is_lazy_and_describes_endpoints() {
        let cfg = EtcdConfig::new(vec![
            "http://127.0.0.1:1".into(),
            "http://127.0.0.1:2".into(),
        ]);
        let store = EtcdStore::connect(cfg).await.unwrap();
        assert_eq!(
            store.describe(),
            "etcd:http://127.0.0.1:1,http://127.0.0.1:2"
        );
    }

    #[tokio::test]
    async fn connect_rejects_empty_endpoints() {
        let err = EtcdStore::connect(EtcdConfig::new(vec![]))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
    }
}
