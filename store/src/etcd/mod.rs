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
//!   re-watches from the revision after its last event ([`crate::Follower`]
//!   does that).
//!
//! Modules: `convert` (errors and types from etcd-client), `watch` (opening
//! and forwarding watches); this file holds the connection and the [`Store`]
//! face.

mod convert;
mod watch;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp,
};
use tokio::sync::RwLock;

use crate::{
    CasOutcome, Expect, KeyValue, LeaseId, Range, Result, Revision, Store, StoreError, Watch,
};
use convert::Ctx;

/// How often an HTTP/2 connection with open streams (watches) is pinged, so
/// that a vanished etcd or network path is noticed. etcd answers pings more
/// frequent than every 5 s (`--grpc-keepalive-min-time`) with GOAWAY.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

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
        self.start_watch(prefix, start).await
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
