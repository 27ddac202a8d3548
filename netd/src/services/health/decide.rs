//! The pure decisions of the health checks: which containers to probe
//! ([`targets`]), what to start, stop and delete ([`plan`]), when each
//! container's first probe runs ([`first_probe_after`]), and when a result
//! is written ([`Tracker`]).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use weft_model::{
    EndpointRecord, HealthCheck, HealthRecord, HealthState, Keys, ServiceName, ServiceRecord,
};

/// One container interface to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub service: ServiceName,
    pub container: String,
    pub ifname: String,
    pub addr: Ipv4Addr,
    pub check: HealthCheck,
}

/// What should be probed on `host`, by health record key: every endpoint
/// of `host` whose service (by its store key) has a valid check. Records
/// that did not parse are `None` and skipped.
pub fn targets(
    keys: &Keys,
    host: &str,
    endpoints: &BTreeMap<String, Option<EndpointRecord>>,
    services: &BTreeMap<String, Option<ServiceRecord>>,
) -> BTreeMap<String, Target> {
    let checks: BTreeMap<ServiceName, &HealthCheck> = services
        .iter()
        .filter_map(|(key, rec)| {
            let check = rec.as_ref()?.spec.health.as_ref()?;
            check.validate().ok()?;
            Some((keys.service_of_key(key)?, check))
        })
        .collect();
    endpoints
        .values()
        .flatten()
        .filter(|r| r.host_id.as_str() == host)
        .filter_map(|r| {
            let service = ServiceName::of(r)?;
            let check = (*checks.get(&service)?).clone();
            let (container, ifname) = (r.container_id.as_str(), r.ifname.as_str());
            let target = Target {
                service,
                container: container.to_owned(),
                ifname: ifname.to_owned(),
                addr: r.address.ip(),
                check,
            };
            Some((keys.health_of(host, container, ifname), target))
        })
        .collect()
}

/// What to change, by health record key.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Tasks to stop: their target went or changed.
    pub stop: Vec<String>,
    /// Tasks to start: new or changed targets.
    pub start: Vec<String>,
    /// Stored records with no target: the endpoint went or its service has
    /// no check any more.
    pub delete: Vec<String>,
}

/// From the `running` tasks' targets and the `stored` record keys to
/// `wanted`. A changed target (address, check) restarts its task and keeps
/// its record (the new task starts from it).
pub fn plan<'a>(
    running: &BTreeMap<String, Target>,
    wanted: &BTreeMap<String, Target>,
    stored: impl IntoIterator<Item = &'a String>,
) -> Plan {
    let changed = |k: &String| wanted.get(k) != running.get(k);
    Plan {
        stop: running.keys().filter(|k| changed(k)).cloned().collect(),
        start: wanted.keys().filter(|k| changed(k)).cloned().collect(),
        delete: stored
            .into_iter()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect(),
    }
}

/// When a container's first probe runs after its task starts: an offset in
/// `[0, interval)` taken from its key (FNV-1a), so a host's probes spread
/// over the interval instead of all firing at once, and a restarted task
/// keeps its place.
pub fn first_probe_after(key: &str, interval: Duration) -> Duration {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let ms = u64::try_from(interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_millis(hash % ms)
}

/// One container's checks and what the store says about it.
#[derive(Debug, Clone)]
pub struct Tracker {
    state: HealthState,
    /// The health the store holds (no record: healthy); `None` when a
    /// record is there but unreadable (the next probe writes it anew).
    stored: Option<bool>,
}

/// What a probe result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// `Some(new health)` when the container just turned.
    pub turned: Option<bool>,
    /// `Some(health)` to write to the store.
    pub write: Option<bool>,
}

impl Tracker {
    /// Starts from the stored record (`None`: no record, healthy;
    /// `Some(None)`: a record that does not parse).
    pub fn new(stored: Option<Option<&HealthRecord>>, check: &HealthCheck) -> Tracker {
        let stored = match stored {
            None => Some(true),
            Some(r) => r.map(|r| r.healthy),
        };
        let mut state = HealthState::default();
        if stored == Some(false) {
            // HealthState starts healthy: `fall` failures turn it.
            while state.healthy() {
                state.observe(false, check);
            }
        }
        Tracker { state, stored }
    }

    pub fn healthy(&self) -> bool {
        self.state.healthy()
    }

    /// Takes one probe's result.
    pub fn observe(&mut self, ok: bool, check: &HealthCheck) -> Step {
        let turned = self.state.observe(ok, check);
        let healthy = self.state.healthy();
        let write = (self.stored != Some(healthy)).then_some(healthy);
        Step { turned, write }
    }

    /// The store now holds `healthy`.
    pub fn written(&mut self, healthy: bool) {
        self.stored = Some(healthy);
    }
}
