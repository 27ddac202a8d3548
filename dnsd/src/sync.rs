//! Keeps the table in step with the store: a [`Follower`] lists the
//! endpoints, then watches from the listed revision; the table is built from
//! the snapshot, swapped in, and rebuilt on every batch of changes. When the
//! watch breaks (store down, history compacted) the last table keeps serving
//! while the follower lists and watches again, with backoff.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::oneshot;
use weft_model::EndpointRecord;
use weft_store::{DynStore, EventKind, Follower, Revision, Update};

use crate::table::{Table, TableConfig};

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
        let mut follower = Follower::new(self.store.clone(), self.prefix.clone());
        let mut endpoints: BTreeMap<String, EndpointRecord> = BTreeMap::new();
        loop {
            let update = follower.next().await;
            let revision = update.revision();
            match update {
                Update::Snapshot(range) => {
                    endpoints.clear();
                    for kv in range.kvs {
                        if let Some(ep) = decode(&kv.key, &kv.value) {
                            endpoints.insert(kv.key, ep);
                        }
                    }
                }
                Update::Changes { events, .. } => {
                    for ev in events {
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
                }
            }
            self.publish(&endpoints, revision);
            if let Some(tx) = ready.take() {
                let _ = tx.send(());
            }
        }
    }

    fn publish(&self, endpoints: &BTreeMap<String, EndpointRecord>, revision: Revision) {
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

fn decode(key: &str, value: &[u8]) -> Option<EndpointRecord> {
    match serde_json::from_slice::<EndpointRecord>(value) {
        Ok(ep) => Some(ep),
        Err(e) => {
            tracing::warn!(key, error = %e, "endpoint record does not parse (JSON or a name); ignored");
            None
        }
    }
}
