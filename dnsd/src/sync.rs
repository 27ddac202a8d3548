//! Keeps the table in step with the store: one [`Follower`] each lists the
//! endpoints, the service records and the health records, then watches from
//! the listed revision. Once all three are listed the table is built from
//! them, swapped in, and rebuilt on every batch of changes (updates of the
//! three that are ready together make one rebuild). When a watch breaks
//! (store down, history compacted) the last table keeps serving while that
//! follower lists and watches again, with backoff.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::oneshot;
use weft_model::{EndpointRecord, HealthRecord, Keys, ServiceRecord};
use weft_store::{DynStore, EventKind, Follower, Revision, Update};

use crate::table::{Table, TableConfig};

pub(crate) struct Sync {
    pub store: DynStore,
    /// Where the records are ([`Keys::endpoints`], [`Keys::services`],
    /// [`Keys::health`]).
    pub keys: Keys,
    pub table_cfg: TableConfig,
    pub table: Arc<ArcSwap<Table>>,
}

/// The records under one prefix, by key.
struct Records<T> {
    /// What they are, for the log (`endpoint record`).
    what: &'static str,
    by_key: BTreeMap<String, T>,
    /// Whether the first snapshot came.
    listed: bool,
    /// Keys under the prefix that are not records (a service key must
    /// name a service).
    wanted: fn(&Keys, &str) -> bool,
    parse: fn(&[u8]) -> serde_json::Result<T>,
}

impl<T> Records<T> {
    fn new(
        what: &'static str,
        wanted: fn(&Keys, &str) -> bool,
        parse: fn(&[u8]) -> serde_json::Result<T>,
    ) -> Self {
        Records {
            what,
            by_key: BTreeMap::new(),
            listed: false,
            wanted,
            parse,
        }
    }

    /// Applies `update`; returns its revision.
    fn apply(&mut self, keys: &Keys, update: Update) -> Revision {
        let revision = update.revision();
        match update {
            Update::Snapshot(range) => {
                self.listed = true;
                self.by_key.clear();
                for kv in range.kvs {
                    if let Some(r) = self.decode(keys, &kv.key, &kv.value) {
                        self.by_key.insert(kv.key, r);
                    }
                }
            }
            Update::Changes { events, .. } => {
                for ev in events {
                    let record = match ev.kind {
                        EventKind::Put => self.decode(keys, &ev.kv.key, &ev.kv.value),
                        EventKind::Delete => None,
                    };
                    match record {
                        Some(r) => self.by_key.insert(ev.kv.key, r),
                        None => self.by_key.remove(&ev.kv.key),
                    };
                }
            }
        }
        revision
    }

    fn decode(&self, keys: &Keys, key: &str, value: &[u8]) -> Option<T> {
        if !(self.wanted)(keys, key) {
            return None;
        }
        match (self.parse)(value) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(key, error = %e, "{} does not parse; ignored", self.what);
                None
            }
        }
    }
}

impl Sync {
    /// Runs until the task is dropped; `ready` fires after the first table
    /// built from the store is in place.
    pub async fn run(self, mut ready: Option<oneshot::Sender<()>>) {
        let keys = &self.keys;
        let mut endpoints_f = Follower::new(self.store.clone(), keys.endpoints());
        let mut services_f = Follower::new(self.store.clone(), keys.services());
        let mut health_f = Follower::new(self.store.clone(), keys.health());
        let mut endpoints = Records::new(
            "endpoint record (JSON or a name)",
            |_, _| true,
            |v| serde_json::from_slice::<EndpointRecord>(v),
        );
        let mut services = Records::new(
            "service record",
            |k, key| k.service_of_key(key).is_some(),
            |v| serde_json::from_slice::<ServiceRecord>(v),
        );
        let mut health = Records::new(
            "health record",
            |_, _| true,
            |v| serde_json::from_slice::<HealthRecord>(v),
        );
        let mut revision: Revision = 0;
        loop {
            // The first update waits; the others' that are ready join it.
            let mut waiting = true;
            loop {
                // Follower::next is cancel-safe: the branches not taken
                // lose nothing.
                let rev = tokio::select! {
                    biased;
                    u = endpoints_f.next() => endpoints.apply(keys, u),
                    u = services_f.next() => services.apply(keys, u),
                    u = health_f.next() => health.apply(keys, u),
                    _ = std::future::ready(()), if !waiting => break,
                };
                revision = revision.max(rev);
                waiting = false;
            }
            if !(endpoints.listed && services.listed && health.listed) {
                continue;
            }
            self.publish(
                &endpoints.by_key,
                &services.by_key,
                &health.by_key,
                revision,
            );
            if let Some(tx) = ready.take() {
                let _ = tx.send(());
            }
        }
    }

    fn publish(
        &self,
        endpoints: &BTreeMap<String, EndpointRecord>,
        services: &BTreeMap<String, ServiceRecord>,
        health: &BTreeMap<String, HealthRecord>,
        revision: Revision,
    ) {
        let healthy = |ep: &EndpointRecord| {
            let key = self.keys.health_of(
                ep.host_id.as_str(),
                ep.container_id.as_str(),
                ep.ifname.as_str(),
            );
            health.get(&key).is_none_or(|h| h.healthy)
        };
        let table = Table::build_with(
            &self.table_cfg,
            endpoints.values().map(|ep| (ep, healthy(ep))),
            services.values(),
            revision,
        );
        tracing::debug!(
            endpoints = table.endpoints(),
            vips = table.vips(),
            names = table.names(),
            revision,
            "DNS table updated"
        );
        self.table.store(Arc::new(table));
    }
}
