//! Keeps the table in step with the store: list the endpoints, build a
//! table, swap it in; then watch from the listed revision and rebuild on
//! every batch of changes. When the watch breaks (store down, history
//! compacted) the last table keeps serving while the loop lists and watches
//! again, with backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::oneshot;
use weft_api::Endpoint;
use weft_store::{DynStore, EventKind, Revision};

use crate::table::{Table, TableConfig};

/// First retry after a failure; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// After a change, further changes arriving within this window go into the
/// same rebuild.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
const MAX_BATCH: usize = 10_000;

pub(crate) struct Sync {
    pub store: DynStore,
    /// `<store prefix>endpoints/`.
    pub prefix: String,
    pub table_cfg: TableConfig,
    pub table: Arc<ArcSwap<Table>>,
}

impl Sync {
    /// Runs until the task is dropped; `ready` fires after the first table
    /// built from the store is in place.
    pub async fn run(self, mut ready: Option<oneshot::Sender<()>>) {
        let mut backoff = MIN_BACKOFF;
        loop {
            match self.list_and_watch(&mut ready, &mut backoff).await {
                Ok(()) => {
                    tracing::warn!(store = %self.store.describe(), "store watch ended; listing again")
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "store sync failed; serving the last table")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn list_and_watch(
        &self,
        ready: &mut Option<oneshot::Sender<()>>,
        backoff: &mut Duration,
    ) -> Result<(), weft_store::StoreError> {
        let range = self.store.get_prefix(&self.prefix).await?;
        let mut endpoints: BTreeMap<String, Endpoint> = BTreeMap::new();
        for kv in &range.kvs {
            if let Some(ep) = decode(&kv.key, &kv.value) {
                endpoints.insert(kv.key.clone(), ep);
            }
        }
        self.publish(&endpoints, range.revision);
        if let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
        let mut watch = self
            .store
            .watch_prefix(&self.prefix, range.revision + 1)
            .await?;
        *backoff = MIN_BACKOFF;
        let mut revision: Revision = range.revision;
        loop {
            let Some(first) = watch.recv().await else {
                return Ok(());
            };
            let mut ended = None;
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout(BATCH_WINDOW, watch.recv()).await {
                    Ok(Some(ev)) => batch.push(ev),
                    Ok(None) => {
                        ended = Some(Ok(()));
                        break;
                    }
                    Err(_) => break,
                }
            }
            let mut changed = false;
            for ev in batch {
                match ev {
                    Ok(ev) => {
                        revision = revision.max(ev.revision());
                        changed = true;
                        match ev.kind {
                            EventKind::Put => match decode(&ev.kv.key, &ev.kv.value) {
                                Some(ep) => {
                                    endpoints.insert(ev.kv.key, ep);
                                }
                                None => {
                                    endpoints.remove(&ev.kv.key);
                                }
                            },
                            EventKind::Delete => {
                                endpoints.remove(&ev.kv.key);
                            }
                        }
                    }
                    Err(e) => {
                        ended = Some(Err(e));
                        break;
                    }
                }
            }
            if changed {
                self.publish(&endpoints, revision);
            }
            if let Some(end) = ended {
                return end;
            }
        }
    }

    fn publish(&self, endpoints: &BTreeMap<String, Endpoint>, revision: Revision) {
        let table = Table::build(&self.table_cfg, endpoints.values(), revision);
        tracing::debug!(
            endpoints = table.endpoints(),
            names = table.names(),
            revision,
            "DNS table updated"
        );
        self.table.store(Arc::new(table));
    }
}

fn decode(key: &str, value: &[u8]) -> Option<Endpoint> {
    match serde_json::from_slice::<Endpoint>(value) {
        Ok(ep) => Some(ep),
        Err(e) => {
            tracing::warn!(key, error = %e, "endpoint record is not valid JSON; ignored");
            None
        }
    }
}
