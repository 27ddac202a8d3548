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
use weft_store::{decode_json, DynStore, Follower, KeyValue, Revision, Update};

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
    /// [`decode_json`] for `T`.
    decode: fn(&KeyValue, &str) -> Option<T>,
}

impl<T> Records<T> {
    fn new(
        what: &'static str,
        wanted: fn(&Keys, &str) -> bool,
        decode: fn(&KeyValue, &str) -> Option<T>,
    ) -> Self {
        Records {
            what,
            by_key: BTreeMap::new(),
            listed: false,
            wanted,
            decode,
        }
    }

    /// Applies `update`; returns its revision.
    fn apply(&mut self, keys: &Keys, update: Update) -> Revision {
        self.listed |= matches!(update, Update::Snapshot(_));
        let wanted = |key: &str| (self.wanted)(keys, key).then(|| key.to_owned());
        update.apply_with(&mut self.by_key, wanted, |kv| (self.decode)(kv, self.what))
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
        let mut endpoints: Records<EndpointRecord> =
            Records::new("endpoint record (JSON or a name)", |_, _| true, decode_json);
        let mut services: Records<ServiceRecord> = Records::new(
            "service record",
            |k, key| k.service_of_key(key).is_some(),
            decode_json,
        );
        let mut health: Records<HealthRecord> =
            Records::new("health record", |_, _| true, decode_json);
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
            HealthRecord::is_healthy(health.get(&key))
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
