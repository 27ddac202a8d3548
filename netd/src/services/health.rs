//! Service health checks: this host's netd probes this host's containers
//! whose service has a [`weft_model::HealthCheck`] and writes what it finds
//! to the store for every host (the VIP backends and DNS leave out a
//! container whose [`weft_model::HealthRecord`] says unhealthy). Checks
//! scale with hosts: each netd probes only its own containers, from the
//! host over the bridge (the isolation policy does not apply to the host's
//! own traffic).
//!
//! * [`run`] follows `services/`, this host's `endpoints/` and this host's
//!   `health/` records with [`weft_store::Follower`]; after every change it
//!   decides ([`targets`], [`plan`]) which containers are probed with which
//!   check, starts and stops one task per container, and deletes the health
//!   records of containers that went or whose service no longer has a check.
//! * Each task probes its container every `interval_ms` ([`probe`]: a TCP
//!   connect, or an HTTP/1.1 GET where 2xx and 3xx are healthy, within
//!   `timeout_ms`), first after an offset taken from its key
//!   ([`first_probe_after`]) so probes spread over the interval. The tasks
//!   are independent: a slow container delays only its own probes.
//! * [`Tracker`] (pure) feeds each result to [`weft_model::HealthState`]
//!   (rise/fall) and says when to write: the store holds one record per
//!   transition, never one per probe; a failed write is retried on the next
//!   probe (with the transition's time). A container starts in the state its record says (no record: healthy),
//!   so a netd restart neither flaps nor forgets an unhealthy container.
//!
//! One log line per transition; probes are only counted
//! ([`crate::counters::HealthCounters`]).
//!
//! Files: the pure decisions in `health/decide.rs`, one probe in
//! `health/probe.rs`, the tasks and the store here.

mod decide;
mod probe;

pub use decide::{first_probe_after, plan, targets, Plan, Step, Target, Tracker};
pub use probe::{http_request, http_status, probe, Seen};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use weft_model::{EndpointRecord, HealthRecord, Keys, ServiceRecord};
use weft_store::{decode_json, DynStore, Follower, Update};
use weft_sys::time::now_ms;

use crate::counters::HealthCounters;

/// How soon a failed record delete is tried again.
const RETRY_DELETE: Duration = Duration::from_secs(5);

/// What every probe task shares.
#[derive(Clone)]
struct Ctx {
    store: DynStore,
    counters: HealthCounters,
}

/// Counts one unhealthy container in the gauge while it is unhealthy,
/// until dropped (a stopped task's container leaves the count).
struct Unhealthy {
    gauge: prometheus_client::metrics::gauge::Gauge,
    counted: bool,
}

impl Unhealthy {
    fn set(&mut self, unhealthy: bool) {
        if unhealthy != self.counted {
            if unhealthy {
                self.gauge.inc();
            } else {
                self.gauge.dec();
            }
            self.counted = unhealthy;
        }
    }
}

impl Drop for Unhealthy {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// The tracker (a panic cannot leave one half-changed: take it as it is).
fn lock(t: &Shared) -> std::sync::MutexGuard<'_, Tracker> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Probes one container until aborted: see the module docs.
async fn probe_loop(ctx: Ctx, key: String, target: Target, tracker: Shared) {
    let check = &target.check;
    let interval = Duration::from_millis(check.interval_ms);
    let timeout = Duration::from_millis(check.timeout_ms);
    let mut gauge = Unhealthy {
        gauge: ctx.counters.unhealthy.clone(),
        counted: false,
    };
    gauge.set(!lock(&tracker).healthy());
    tokio::time::sleep(first_probe_after(&key, interval)).await;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut write_failing = false;
    // When the last transition happened (a record written anew without
    // one, after an unreadable record, says since now).
    let mut since_ms = now_ms();
    loop {
        ticks.tick().await;
        let seen = probe(target.addr, &check.probe, timeout).await;
        ctx.counters.probed(seen.ok);
        let step = lock(&tracker).observe(seen.ok, check);
        if let Some(healthy) = step.turned {
            since_ms = now_ms();
            gauge.set(!healthy);
            let (service, container, ifname) = (&target.service, &target.container, &target.ifname);
            let addr = target.addr;
            if healthy {
                tracing::info!(%service, container, ifname, %addr, probe = %check.probe,
                    detail = %seen.detail, "container healthy again");
            } else {
                tracing::warn!(%service, container, ifname, %addr, probe = %check.probe,
                    detail = %seen.detail, "container unhealthy");
            }
        }
        let Some(healthy) = step.write else { continue };
        let record = HealthRecord {
            healthy,
            since_ms,
            detail: seen.detail,
        };
        let written = match serde_json::to_vec(&record) {
            Ok(value) => ctx
                .store
                .put(&key, &value, None)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match written {
            Ok(_) => {
                lock(&tracker).written(healthy);
                if write_failing {
                    tracing::info!(key, "health record written after failures");
                }
                write_failing = false;
            }
            Err(e) => {
                // Logged once per run of failures; the next probe retries.
                if !write_failing {
                    tracing::warn!(key, error = %e, "writing the health record failed; retrying with the next probe");
                }
                write_failing = true;
            }
        }
    }
}

/// Applies a follower's update to `map` (by store key); a value that does
/// not parse is kept as `None` (logged once): an unreadable health record
/// is still deleted when its container has no check.
fn apply_update<T: DeserializeOwned>(map: &mut BTreeMap<String, Option<T>>, u: Update, what: &str) {
    u.apply_with(
        map,
        |k| Some(k.to_owned()),
        |kv| Some(decode_json(kv, what)),
    );
}

/// What the followers have handed over.
#[derive(Default)]
struct Known {
    services: BTreeMap<String, Option<ServiceRecord>>,
    endpoints: BTreeMap<String, Option<EndpointRecord>>,
    health: BTreeMap<String, Option<HealthRecord>>,
    /// Services, endpoints, health: listed once each (until all three are,
    /// nothing is decided: an empty view would delete every record).
    listed: [bool; 3],
}

/// A container's [`Tracker`], shared by its task and the manager (a task
/// restarted for a changed check carries on from it).
type Shared = Arc<Mutex<Tracker>>;

/// A probe task and the target it probes.
struct Running {
    target: Target,
    tracker: Shared,
    task: JoinHandle<()>,
}

/// Runs this host's health checks until `stop` fires: see the module docs.
/// Stopping aborts the probes and leaves the records in place (a restarted
/// netd starts from them).
pub async fn run(
    store: DynStore,
    keys: Keys,
    host: String,
    counters: HealthCounters,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut services = Follower::new(store.clone(), keys.services());
    let mut endpoints = Follower::new(store.clone(), keys.host_endpoints(&host));
    let mut health = Follower::new(store.clone(), keys.host_health(&host));
    let ctx = Ctx { store, counters };
    let mut known = Known::default();
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    let mut retry = false;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            u = services.next() => {
                apply_update(&mut known.services, u, "service record");
                known.listed[0] = true;
            }
            u = endpoints.next() => {
                apply_update(&mut known.endpoints, u, "endpoint record");
                known.listed[1] = true;
            }
            u = health.next() => {
                apply_update(&mut known.health, u, "health record");
                known.listed[2] = true;
            }
            _ = tokio::time::sleep(RETRY_DELETE), if retry => {}
        }
        if known.listed.contains(&false) {
            continue;
        }
        retry = !reconcile(&ctx, &keys, &host, &mut known, &mut running).await;
    }
    for (_, r) in running {
        r.task.abort();
    }
}

/// Starts and stops probe tasks and deletes stale records (from `known`
/// too, so a task started before the follower reports the delete does not
/// start from the old record); false when a delete failed (retried later).
async fn reconcile(
    ctx: &Ctx,
    keys: &Keys,
    host: &str,
    known: &mut Known,
    running: &mut BTreeMap<String, Running>,
) -> bool {
    let wanted = targets(keys, host, &known.endpoints, &known.services);
    let current: BTreeMap<String, Target> = running
        .iter()
        .map(|(k, r)| (k.clone(), r.target.clone()))
        .collect();
    let plan = plan(&current, &wanted, known.health.keys());
    let mut stopped = BTreeMap::new();
    for key in plan.stop {
        if let Some(r) = running.remove(&key) {
            r.task.abort();
            stopped.insert(key, r.tracker);
        }
    }
    for key in plan.start {
        let Some(target) = wanted.get(&key).cloned() else {
            continue;
        };
        let tracker = match stopped.remove(&key) {
            Some(t) => t,
            None => {
                tracing::info!(service = %target.service, container = target.container,
                    ifname = target.ifname, probe = %target.check.probe, "health checks start");
                let stored = known.health.get(&key).map(Option::as_ref);
                Arc::new(Mutex::new(Tracker::new(stored, &target.check)))
            }
        };
        let task = tokio::spawn(probe_loop(
            ctx.clone(),
            key.clone(),
            target.clone(),
            tracker.clone(),
        ));
        running.insert(
            key,
            Running {
                target,
                tracker,
                task,
            },
        );
    }
    let mut ok = true;
    for key in plan.delete {
        match ctx.store.delete(&key).await {
            Ok(_) => {
                known.health.remove(&key);
                tracing::info!(key, "health record deleted: no check for it any more");
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "deleting a health record failed; retrying");
                ok = false;
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests;
