//! Services (issue 12): every `service.stack` gets a record with a stable
//! virtual IP from the service range.
//!
//! * [`records`]: the records and VIP claims in the store, and the pure
//!   rules (which address, when a service is empty or expired).
//! * [`lb`]: the VIPs balanced in the kernel (`table ip weft_svc`).
//! * [`health`]: the health checks of this host's containers.
//! * Here: [`Services`], what this netd knows of every service, kept by a
//!   reconciler ([`Services::run`]: `Follower`s on `services/`, `vips/` and
//!   `endpoints/`) that every netd runs: a service with no container
//!   anywhere gets `empty_since_ms`, one with containers again has it
//!   cleared, one empty for longer than the grace is deleted with its claim
//!   (compare-and-swap on the record's revision: any netd may do it); a
//!   service with a container on this host and no record gets one, and a
//!   `vip`-mode record without VIP (the range was full) gets one once an
//!   address is free; a claim no record uses is deleted after
//!   [`ORPHAN_AGE`].
//! * The endpoint add's hook ([`Services::ensure_for`]): the first
//!   container of a service creates its record; for a known service it
//!   costs a map lookup.
//! * The control API's service routes ([`Daemon::list_services`],
//!   [`Daemon::put_service`]) and the CLI's `service set` flags
//!   ([`SpecEdit`]).

pub mod health;
pub mod lb;
pub mod records;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use weft_api::{ApiError, Backend, ErrorKind, ServiceInfo};
use weft_model::{
    Balance, EndpointRecord, HealthCheck, HealthRecord, Mode, Probe, ServiceError, ServiceName,
    ServiceSpec,
};
use weft_store::{DynStore, Follower, Revision, Update};
use weft_sys::time::now_ms;

use crate::daemon::Daemon;
use crate::endpoints::store_error;
pub use records::{Ensured, Lifecycle, RecordsError, Registry, Stored};

/// A VIP claim no record uses is deleted once it has stayed so this long
/// (a host switching a service to `vip` mode holds a claim briefly before
/// its record points at it).
pub const ORPHAN_AGE: Duration = Duration::from_secs(60);

/// How often the reconciler looks at what it knows.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

impl From<RecordsError> for ApiError {
    fn from(e: RecordsError) -> ApiError {
        let kind = match &e {
            RecordsError::Store(s) if s.is_transient() => ErrorKind::TryAgainLater,
            RecordsError::Store(_) | RecordsError::Corrupt { .. } => ErrorKind::Internal,
            RecordsError::Full { .. } => ErrorKind::PoolExhausted,
            RecordsError::Invalid(_) => ErrorKind::InvalidRequest,
            RecordsError::Contention { .. } => ErrorKind::TryAgainLater,
        };
        ApiError::new(kind, e.to_string())
    }
}

/// What the reconciler does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    MarkEmpty(Stored),
    Clear(Stored),
    Expire(Stored),
    /// A service with a container here and no record.
    Create(ServiceName),
    /// A `vip`-mode record without VIP, now that one is free.
    AssignVip(Stored),
    DropClaim(Ipv4Addr, Revision),
}

/// What the followers have seen.
#[derive(Debug, Default)]
pub struct Known {
    pub records: BTreeMap<ServiceName, Stored>,
    /// VIP -> (service name, revision).
    pub claims: BTreeMap<Ipv4Addr, (String, Revision)>,
    /// Endpoint key -> (its service, whether it is on this host).
    pub endpoints: BTreeMap<String, (ServiceName, bool)>,
    /// Snapshots received: services, vips, endpoints.
    pub synced: [bool; 3],
    /// Orphaned claims and since when (at that revision).
    orphans: HashMap<Ipv4Addr, (Revision, u64)>,
}

impl Known {
    /// The reconciler's decisions (pure): see the module docs. Nothing
    /// before every follower has listed once.
    pub fn plan(&mut self, now_ms: u64, grace: Duration, capacity: u64) -> Vec<Action> {
        if self.synced.contains(&false) {
            return Vec::new();
        }
        let mut counts: HashMap<&ServiceName, (usize, usize)> = HashMap::new();
        for (name, local) in self.endpoints.values() {
            let c = counts.entry(name).or_default();
            c.0 += 1;
            c.1 += usize::from(*local);
        }
        let mut actions = Vec::new();
        let mut free = capacity.saturating_sub(self.claims.len() as u64);
        for (name, stored) in &self.records {
            let (all, local) = counts.get(name).copied().unwrap_or_default();
            match records::lifecycle(&stored.record, all, now_ms, grace) {
                Lifecycle::MarkEmpty => actions.push(Action::MarkEmpty(stored.clone())),
                Lifecycle::Clear => actions.push(Action::Clear(stored.clone())),
                Lifecycle::Expire => actions.push(Action::Expire(stored.clone())),
                Lifecycle::Keep => {
                    let r = &stored.record;
                    if r.spec.mode == Mode::Vip && r.vip.is_none() && local > 0 && free > 0 {
                        free -= 1;
                        actions.push(Action::AssignVip(stored.clone()));
                    }
                }
            }
        }
        for (name, (_, local)) in &counts {
            if *local > 0 && !self.records.contains_key(*name) {
                actions.push(Action::Create((*name).clone()));
            }
        }
        let claims = self
            .claims
            .iter()
            .map(|(ip, (n, _))| (*ip, n.clone()))
            .collect();
        let records = self
            .records
            .iter()
            .map(|(n, s)| (n.clone(), s.record.clone()))
            .collect();
        let orphans = records::orphan_claims(&claims, &records);
        let age = u64::try_from(ORPHAN_AGE.as_millis()).unwrap_or(u64::MAX);
        let mut seen = HashMap::new();
        for ip in orphans {
            let rev = self.claims[&ip].1;
            let since = match self.orphans.get(&ip) {
                Some((r, since)) if *r == rev => *since,
                _ => now_ms,
            };
            if now_ms.saturating_sub(since) >= age {
                actions.push(Action::DropClaim(ip, rev));
            }
            seen.insert(ip, (rev, since));
        }
        self.orphans = seen;
        actions
    }

    fn apply_services(&mut self, keys: &weft_model::Keys, update: Update) {
        self.synced[0] |= matches!(update, Update::Snapshot(_));
        let stored = |kv: &weft_store::KeyValue| match records::decode(&kv.key, &kv.value) {
            Ok(record) => Some(Stored {
                record,
                revision: kv.mod_revision,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "skipping a service record");
                None
            }
        };
        update.apply_with(&mut self.records, |k| keys.service_of_key(k), stored);
    }

    fn apply_claims(&mut self, keys: &weft_model::Keys, update: Update) {
        self.synced[1] |= matches!(update, Update::Snapshot(_));
        update.apply_with(
            &mut self.claims,
            |k| records::claim_ip(keys, k),
            records::claim,
        );
    }

    fn apply_endpoints(&mut self, host: &str, update: Update) {
        self.synced[2] |= matches!(update, Update::Snapshot(_));
        let entry = |kv: &weft_store::KeyValue| {
            let ep: EndpointRecord = serde_json::from_slice(&kv.value).ok()?;
            let name = ServiceName::of(&ep)?;
            Some((name, ep.host_id.as_str() == host))
        };
        update.apply_with(&mut self.endpoints, |k| Some(k.to_owned()), entry);
    }
}

/// This netd's part in services: see the module docs.
pub struct Services {
    registry: Registry,
    host_id: String,
    grace: Duration,
    known: std::sync::Mutex<Known>,
}

impl Services {
    pub fn new(registry: Registry, host_id: impl Into<String>, grace: Duration) -> Services {
        Services {
            registry,
            host_id: host_id.into(),
            grace,
            known: std::sync::Mutex::new(Known::default()),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The claims the followers know of (`None` before their first listing).
    fn taken(&self) -> Option<BTreeSet<Ipv4Addr>> {
        let k = self.known();
        k.synced[1].then(|| k.claims.keys().copied().collect())
    }

    /// The endpoint add's hook: makes sure the service of `ep` has a record
    /// (`mode` only for a new one). Costs a map lookup when the service is
    /// known; a failure is logged, never the add's (the container works by
    /// DNS round robin, and the reconciler creates the record later).
    pub async fn ensure_for(&self, ep: &EndpointRecord, mode: Option<Mode>) {
        let Some(name) = ServiceName::of(ep) else {
            return;
        };
        if self.known().records.contains_key(&name) {
            return;
        }
        self.ensure(&name, mode.unwrap_or_default()).await;
    }

    async fn ensure(&self, name: &ServiceName, mode: Mode) {
        let taken = self.taken();
        match self.registry.ensure(name, mode, taken.as_ref()).await {
            Ok(e) => {
                if e.created {
                    match e.stored.record.vip {
                        Some(vip) => {
                            tracing::info!(service = %name, %vip, "service record created")
                        }
                        None if e.full => tracing::warn!(
                            service = %name, range = %self.registry.range(),
                            "no VIP: service range {} is full; the service works by DNS round robin until an address is free",
                            self.registry.range()
                        ),
                        None => {
                            tracing::info!(service = %name, mode = %mode, "service record created")
                        }
                    }
                }
                self.known().records.insert(name.clone(), e.stored);
            }
            Err(e) => {
                tracing::warn!(service = %name, error = %e, "creating the service record failed; the reconciler retries")
            }
        }
    }

    /// Follows services, claims and endpoints and reconciles every second
    /// until `stop` fires.
    pub async fn run(
        self: Arc<Self>,
        store: DynStore,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let keys = self.registry.keys().clone();
        let mut services = Follower::new(store.clone(), keys.services());
        let mut vips = Follower::new(store.clone(), keys.vips());
        let mut endpoints = Follower::new(store, keys.endpoints());
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                u = services.next() => self.known().apply_services(&keys, u),
                u = vips.next() => self.known().apply_claims(&keys, u),
                u = endpoints.next() => self.known().apply_endpoints(&self.host_id, u),
                _ = tick.tick() => self.reconcile().await,
            }
        }
    }

    /// One pass: plan from what the followers saw, then act.
    pub async fn reconcile(&self) {
        let capacity = records::vip_capacity(self.registry.range());
        let actions = self.known().plan(now_ms(), self.grace, capacity);
        let mut failed = 0;
        let mut first = None;
        for action in actions {
            if let Err(e) = self.act(action).await {
                failed += 1;
                first.get_or_insert(e);
            }
        }
        if let Some(e) = first {
            tracing::warn!(failed, error = %e, "reconciling service records failed; retrying in a second");
        }
    }

    async fn act(&self, action: Action) -> Result<(), RecordsError> {
        let r = &self.registry;
        match action {
            Action::MarkEmpty(s) => {
                r.set_empty_since(&s, Some(now_ms())).await?;
            }
            Action::Clear(s) => {
                r.set_empty_since(&s, None).await?;
            }
            Action::Expire(s) => {
                if r.expire(&s).await? {
                    tracing::info!(service = %s.record.name, vip = ?s.record.vip, grace_secs = self.grace.as_secs(), "service had no container for the grace: record and VIP freed");
                }
            }
            Action::Create(name) => self.ensure(&name, Mode::default()).await,
            Action::AssignVip(s) => {
                if r.assign_vip(&s, self.taken().as_ref()).await? {
                    tracing::info!(service = %s.record.name, "service got a VIP now that the range has room");
                }
            }
            Action::DropClaim(ip, rev) => {
                if r.drop_claim(ip, rev).await? {
                    tracing::info!(vip = %ip, "deleted a VIP claim no service record uses");
                }
            }
        }
        Ok(())
    }
}

/// The API's view of every service in `records`, with the containers of
/// `endpoints` and the health of `health` (key -> record; no record:
/// healthy). Services with containers and no record are listed too.
pub fn describe(
    keys: &weft_model::Keys,
    records: Vec<ServiceRecordView>,
    endpoints: &[EndpointRecord],
    health: &HashMap<String, HealthRecord>,
    range: ipnetwork::Ipv4Network,
    claims: usize,
) -> Vec<ServiceInfo> {
    let mut out: BTreeMap<ServiceName, ServiceInfo> = records
        .into_iter()
        .map(|r| {
            let problem = (r.spec.mode == Mode::Vip && r.vip.is_none()).then(|| {
                if claims as u64 >= records::vip_capacity(range) {
                    format!("no VIP: service range {range} is full")
                } else {
                    "no VIP yet: one is assigned within a second".to_owned()
                }
            });
            let info = ServiceInfo {
                name: r.name.clone(),
                vip: r.vip,
                spec: r.spec,
                backends: Vec::new(),
                empty_since_ms: r.empty_since_ms,
                problem,
            };
            (r.name, info)
        })
        .collect();
    for ep in endpoints {
        let Some(name) = ServiceName::of(ep) else {
            continue;
        };
        let key = keys.health_of(&ep.host_id, &ep.container_id, &ep.ifname);
        let h = health.get(&key);
        let info = out.entry(name.clone()).or_insert_with(|| ServiceInfo {
            name,
            vip: None,
            spec: ServiceSpec::default(),
            backends: Vec::new(),
            empty_since_ms: None,
            problem: Some("no service record yet: netd creates it within a second".to_owned()),
        });
        info.backends.push(Backend {
            address: ep.address.ip(),
            host_id: ep.host_id.to_string(),
            container_id: ep.container_id.to_string(),
            ifname: ep.ifname.to_string(),
            name: ep.name.as_ref().map(|n| n.to_string()),
            healthy: HealthRecord::is_healthy(h),
            detail: h.map(|h| h.detail.clone()).unwrap_or_default(),
        });
    }
    for info in out.values_mut() {
        info.backends.sort_by_key(|b| b.address);
    }
    out.into_values().collect()
}

/// A record as [`describe`] takes it.
pub type ServiceRecordView = weft_model::ServiceRecord;

impl Daemon {
    /// Runs the services reconciler ([`Services::run`]) until `stop` fires.
    pub async fn run_services(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        self.services()
            .clone()
            .run(self.store().clone(), stop)
            .await;
    }

    /// `GET /v1/services`.
    pub async fn list_services(&self) -> Result<Vec<ServiceInfo>, ApiError> {
        let store = self.store();
        let keys = &self.config().keys;
        let registry = self.services().registry();
        let records = self.note_records(registry.list().await)?;
        let claims = self.note_records(registry.claims().await)?.len();
        let eps = self
            .note_store(store.get_prefix(&keys.endpoints()).await)
            .map_err(store_error)?;
        let endpoints: Vec<EndpointRecord> = eps
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect();
        let hs = self
            .note_store(store.get_prefix(&keys.health()).await)
            .map_err(store_error)?;
        let health = hs
            .kvs
            .into_iter()
            .filter_map(|kv| Some((kv.key, serde_json::from_slice(&kv.value).ok()?)))
            .collect();
        Ok(describe(
            keys,
            records.into_iter().map(|s| s.record).collect(),
            &endpoints,
            &health,
            registry.range(),
            claims,
        ))
    }

    /// `GET /v1/services/{name}`.
    pub async fn get_service(&self, name: &str) -> Result<ServiceInfo, ApiError> {
        let name = parse_name(name)?;
        self.list_services()
            .await?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("no service {name}")))
    }

    /// `PUT /v1/services/{name}`: sets the spec, creating the record if
    /// needed.
    pub async fn put_service(
        &self,
        name: &str,
        spec: ServiceSpec,
    ) -> Result<ServiceInfo, ApiError> {
        let name = parse_name(name)?;
        let services = self.services();
        let taken = services.taken();
        let stored = services
            .registry()
            .put_spec(&name, &spec, taken.as_ref())
            .await;
        let stored = self.note_records(stored)?;
        tracing::info!(service = %name, mode = %spec.mode, vip = ?stored.record.vip, "service set through the control API");
        services.known().records.insert(name.clone(), stored);
        self.get_service(name.to_string().as_str()).await
    }

    /// Reports the store's part of an outcome to the health tracker.
    fn note_records<T>(&self, r: Result<T, RecordsError>) -> Result<T, ApiError> {
        match &r {
            Err(RecordsError::Store(e)) => self.health().failed(e.is_transient(), e),
            Err(RecordsError::Invalid(_) | RecordsError::Full { .. }) => {}
            _ => self.health().answered(),
        }
        r.map_err(ApiError::from)
    }
}

fn parse_name(name: &str) -> Result<ServiceName, ApiError> {
    name.parse()
        .map_err(|e: ServiceError| ApiError::new(ErrorKind::InvalidRequest, e.to_string()))
}

/// `netd service set`'s flags: each changes one part of the spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct SpecEdit {
    /// `vip` (a virtual IP balanced in the kernel) or `dnsrr` (DNS round
    /// robin, no VIP).
    #[arg(long)]
    pub mode: Option<Mode>,
    /// How a new connection picks its backend: `random` or `hash` (of the
    /// flow).
    #[arg(long)]
    pub balance: Option<Balance>,
    /// Keep a client (by source address) on one backend.
    #[arg(long, conflicts_with = "no_affinity")]
    pub affinity: bool,
    /// Turn source-address affinity off.
    #[arg(long)]
    pub no_affinity: bool,
    /// Health check: `tcp:PORT`, `http:PORT/PATH` or `none`.
    #[arg(long, value_name = "CHECK")]
    pub health: Option<String>,
    /// Milliseconds between two checks of one container.
    #[arg(long)]
    pub interval_ms: Option<u64>,
    /// A check that takes longer fails.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Consecutive successes that make a container healthy again.
    #[arg(long)]
    pub rise: Option<u32>,
    /// Consecutive failures that make a container unhealthy.
    #[arg(long)]
    pub fall: Option<u32>,
}

/// What is wrong with a [`SpecEdit`].
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("--interval-ms, --timeout-ms, --rise and --fall need a health check: add --health tcp:PORT or http:PORT/PATH")]
    NoCheck,
}

impl SpecEdit {
    /// Applies the flags given to `spec` (a new check keeps the timing of
    /// the one it replaces) and checks the result.
    pub fn apply(&self, spec: &mut ServiceSpec) -> Result<(), EditError> {
        if let Some(m) = self.mode {
            spec.mode = m;
        }
        if let Some(b) = self.balance {
            spec.balance = b;
        }
        if self.affinity {
            spec.affinity = true;
        }
        if self.no_affinity {
            spec.affinity = false;
        }
        match self.health.as_deref().map(str::trim) {
            None => {}
            Some("none" | "off") => spec.health = None,
            Some(text) => {
                let probe: Probe = text.parse()?;
                match &mut spec.health {
                    Some(h) => h.probe = probe,
                    None => spec.health = Some(HealthCheck::new(probe)),
                }
            }
        }
        let timing = [
            self.interval_ms.is_some(),
            self.timeout_ms.is_some(),
            self.rise.is_some(),
            self.fall.is_some(),
        ];
        if timing.contains(&true) {
            let h = spec.health.as_mut().ok_or(EditError::NoCheck)?;
            h.interval_ms = self.interval_ms.unwrap_or(h.interval_ms);
            h.timeout_ms = self.timeout_ms.unwrap_or(h.timeout_ms);
            h.rise = self.rise.unwrap_or(h.rise);
            h.fall = self.fall.unwrap_or(h.fall);
        }
        spec.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use weft_model::{Keys, ServiceRecord};
    use weft_store::testing::TestStore;

    fn name(s: &str) -> ServiceName {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn stored(n: &str, vip: Option<&str>, mode: Mode, empty: Option<u64>) -> Stored {
        Stored {
            record: ServiceRecord {
                name: name(n),
                vip: vip.map(ip),
                spec: ServiceSpec {
                    mode,
                    ..ServiceSpec::default()
                },
                empty_since_ms: empty,
            },
            revision: 7,
        }
    }

    fn known(records: &[Stored], endpoints: &[(&str, &str, bool)]) -> Known {
        let mut k = Known {
            synced: [true; 3],
            ..Known::default()
        };
        for s in records {
            k.records.insert(s.record.name.clone(), s.clone());
            if let Some(vip) = s.record.vip {
                k.claims.insert(vip, (s.record.name.to_string(), 3));
            }
        }
        for (key, service, local) in endpoints {
            k.endpoints
                .insert((*key).to_owned(), (name(service), *local));
        }
        k
    }

    const GRACE: Duration = Duration::from_secs(600);

    #[test]
    fn the_plan_follows_the_containers() {
        let web = stored("web.shop", Some("10.43.0.1"), Mode::Vip, None);
        let old = stored("old", Some("10.43.0.2"), Mode::Vip, Some(1_000));
        let idle = stored("idle", None, Mode::Dnsrr, Some(500_000));
        let back = stored("back", Some("10.43.0.3"), Mode::Vip, Some(1_000));
        let mut k = known(
            &[web.clone(), old.clone(), idle, back.clone()],
            &[
                ("e1", "back", false),
                ("e2", "new.shop", true),
                ("e3", "far", false),
            ],
        );
        let mut plan = k.plan(700_000, GRACE, 100);
        plan.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(
            plan,
            [
                Action::Clear(back),
                Action::Create(name("new.shop")),
                Action::Expire(old),
                Action::MarkEmpty(web),
            ],
            "idle is within its grace; far has no container here"
        );
        // Nothing before every follower has listed.
        k.synced[2] = false;
        assert!(k.plan(700_000, GRACE, 100).is_empty());
    }

    #[test]
    fn a_vip_service_without_vip_gets_one_when_there_is_room() {
        let waiting = stored("web", None, Mode::Vip, None);
        let elsewhere = stored("db", None, Mode::Vip, None);
        let mut k = known(
            &[waiting.clone(), elsewhere],
            &[("e1", "web", true), ("e2", "db", false)],
        );
        assert_eq!(
            k.plan(0, GRACE, 1),
            [Action::AssignVip(waiting)],
            "only where a container lives"
        );
        k.claims.insert(ip("10.43.0.1"), ("x".into(), 1));
        k.records
            .insert(name("x"), stored("x", Some("10.43.0.1"), Mode::Vip, None));
        k.endpoints.insert("e3".into(), (name("x"), true));
        assert!(k.plan(0, GRACE, 1).is_empty(), "the range is full");
    }

    #[test]
    fn orphaned_claims_go_after_a_while_at_the_same_revision() {
        let mut k = known(&[], &[]);
        k.claims.insert(ip("10.43.0.9"), ("gone".into(), 5));
        assert!(k.plan(1_000, GRACE, 100).is_empty());
        let age = ORPHAN_AGE.as_millis() as u64;
        assert!(k.plan(1_000 + age - 1, GRACE, 100).is_empty());
        assert_eq!(
            k.plan(1_000 + age, GRACE, 100),
            [Action::DropClaim(ip("10.43.0.9"), 5)]
        );
        // Rewritten: the clock starts again.
        k.claims.insert(ip("10.43.0.9"), ("gone".into(), 6));
        assert!(k.plan(2_000 + age, GRACE, 100).is_empty());
        // Used by its record: never.
        k.records.insert(
            name("gone"),
            stored("gone", Some("10.43.0.9"), Mode::Vip, None),
        );
        k.endpoints.insert("e".into(), (name("gone"), false));
        assert!(k.plan(10 * age, GRACE, 100).is_empty());
    }

    #[test]
    fn spec_edits_change_what_is_given() {
        let mut spec = ServiceSpec::default();
        let edit = SpecEdit {
            mode: Some(Mode::Dnsrr),
            balance: Some(Balance::Hash),
            affinity: true,
            health: Some("http:8080/ok".into()),
            interval_ms: Some(1000),
            ..SpecEdit::default()
        };
        edit.apply(&mut spec).unwrap();
        assert_eq!(spec.mode, Mode::Dnsrr);
        assert_eq!(spec.balance, Balance::Hash);
        assert!(spec.affinity);
        let h = spec.health.clone().unwrap();
        assert_eq!(h.probe.to_string(), "http:8080/ok");
        assert_eq!((h.interval_ms, h.timeout_ms), (1000, 400));
        // Another probe keeps the timing; no-affinity turns it off.
        SpecEdit {
            health: Some("tcp:80".into()),
            no_affinity: true,
            ..SpecEdit::default()
        }
        .apply(&mut spec)
        .unwrap();
        assert_eq!(spec.health.as_ref().unwrap().interval_ms, 1000);
        assert!(!spec.affinity);
        assert_eq!(spec.mode, Mode::Dnsrr, "not given: kept");
        SpecEdit {
            health: Some("none".into()),
            ..SpecEdit::default()
        }
        .apply(&mut spec)
        .unwrap();
        assert_eq!(spec.health, None);
        let e = SpecEdit {
            rise: Some(3),
            ..SpecEdit::default()
        }
        .apply(&mut spec)
        .unwrap_err();
        assert!(e.to_string().contains("--health"), "{e}");
        let e = SpecEdit {
            health: Some("tcp:80".into()),
            timeout_ms: Some(5_000),
            ..SpecEdit::default()
        }
        .apply(&mut ServiceSpec::default())
        .unwrap_err();
        assert!(e.to_string().contains("timeout_ms"), "{e}");
        assert!(SpecEdit {
            health: Some("udp:53".into()),
            ..SpecEdit::default()
        }
        .apply(&mut ServiceSpec::default())
        .is_err());
    }

    fn endpoint(id: &str, host: &str, addr: &str, service: Option<&str>) -> EndpointRecord {
        let mut v = serde_json::json!({
            "container_id": id, "ifname": "eth0", "netns": "", "host_id": host,
            "address": format!("{addr}/24"), "gateway": "10.42.0.1", "mtu": 1420,
            "bridge": "weft0", "stack": "shop",
            "dns": {"nameservers": [], "domain": "weft.internal", "search": []},
            "created_at_ms": 0
        });
        if let Some(s) = service {
            v["service"] = s.into();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_api_view_lists_backends_with_health_and_problems() {
        let keys = Keys::new("/weft/");
        let range: ipnetwork::Ipv4Network = "10.43.0.0/30".parse().unwrap();
        let records = vec![
            stored("web.shop", Some("10.43.0.1"), Mode::Vip, None).record,
            stored("db.shop", None, Mode::Vip, None).record,
        ];
        let eps = [
            endpoint("b", "h2", "10.42.1.2", Some("web")),
            endpoint("a", "h1", "10.42.0.2", Some("web")),
            endpoint("c", "h1", "10.42.0.3", Some("api")),
            endpoint("d", "h1", "10.42.0.4", None),
        ];
        let health = [(
            keys.health_of("h2", "b", "eth0"),
            HealthRecord {
                healthy: false,
                since_ms: 1,
                detail: "connection refused".into(),
            },
        )]
        .into();
        let view = describe(&keys, records.clone(), &eps, &health, range, 1);
        let names: Vec<_> = view.iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, ["api.shop", "db.shop", "web.shop"]);
        let web = &view[2];
        assert_eq!(web.vip, Some(ip("10.43.0.1")));
        let b: Vec<_> = web
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.healthy, b.detail.as_str()))
            .collect();
        assert_eq!(
            b,
            [
                ("10.42.0.2".into(), true, ""),
                ("10.42.1.2".into(), false, "connection refused")
            ]
        );
        assert!(view[0]
            .problem
            .as_deref()
            .unwrap()
            .contains("no service record"));
        assert!(view[1].problem.as_deref().unwrap().contains("no VIP yet"));
        let full = describe(&keys, records, &[], &HashMap::new(), range, 2);
        assert_eq!(
            full[0].problem.as_deref(),
            Some("no VIP: service range 10.43.0.0/30 is full")
        );
        assert_eq!(full[1].problem, None);
    }

    /// Waits up to 10 s for `f` to hold on the record of `n`.
    async fn wait_for(
        r: &Registry,
        n: &str,
        what: &str,
        f: impl Fn(Option<&ServiceRecord>) -> bool,
    ) -> Option<ServiceRecord> {
        for _ in 0..200 {
            let got = r.get(&name(n)).await.unwrap().map(|s| s.record);
            if f(got.as_ref()) {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{n}: {what} did not happen within 10 s");
    }

    /// Two hosts' reconcilers against one store: the add hook creates the
    /// record once, an empty service is marked, refilled, emptied again
    /// and freed with its VIP after the grace.
    async fn reconcilers_keep_records_in_step_with_containers(t: TestStore) {
        let keys = Keys::new("/weft/");
        let range = "10.43.0.0/24".parse().unwrap();
        let grace = Duration::from_millis(1500);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let mut hosts = Vec::new();
        for h in ["h1", "h2"] {
            let store = t.another_handle().await;
            let s = Arc::new(Services::new(
                Registry::new(store.clone(), keys.clone(), range),
                h,
                grace,
            ));
            tokio::spawn(s.clone().run(store, stop.clone()));
            hosts.push(s);
        }
        let store = t.store();
        let put = |ep: EndpointRecord| {
            let store = store.clone();
            let key = keys.endpoint(&ep.host_id, &ep.container_id, &ep.ifname);
            async move {
                store
                    .put(&key, &serde_json::to_vec(&ep).unwrap(), None)
                    .await
                    .unwrap();
                (key, ep)
            }
        };
        // The first container: its host's add hook makes the record.
        let (k1, e1) = put(endpoint("a", "h1", "10.42.0.2", Some("web"))).await;
        hosts[0].ensure_for(&e1, Some(Mode::Vip)).await;
        let r = hosts[0].registry();
        let web = r.get(&name("web.shop")).await.unwrap().unwrap().record;
        assert_eq!(web.vip, Some(ip("10.43.0.1")));
        // A container of another service, added while its host's hook did
        // not run (say, the store hiccuped): its host's reconciler makes it.
        put(endpoint("b", "h2", "10.42.1.2", Some("db"))).await;
        let db = wait_for(r, "db.shop", "creation", |r| r.is_some()).await;
        assert_eq!(db.unwrap().vip, Some(ip("10.43.0.2")));
        // The last container of web goes: marked empty, then freed.
        store.delete(&k1).await.unwrap();
        let marked = wait_for(r, "web.shop", "marking", |r| {
            r.is_some_and(|r| r.empty_since_ms.is_some())
        })
        .await
        .unwrap();
        assert_eq!(marked.vip, web.vip, "the VIP stays during the grace");
        // Back within the grace: cleared, same VIP.
        let (k1, _) = put(endpoint("a2", "h2", "10.42.1.3", Some("web"))).await;
        let cleared = wait_for(r, "web.shop", "clearing", |r| {
            r.is_some_and(|r| r.empty_since_ms.is_none())
        })
        .await
        .unwrap();
        assert_eq!(cleared.vip, web.vip);
        store.delete(&k1).await.unwrap();
        wait_for(r, "web.shop", "expiry", |r| r.is_none()).await;
        // The claim goes in the store call after the record's
        // (`Registry::expire`): seen gone a moment later, not always at
        // once.
        let mut vips = Vec::new();
        for _ in 0..100 {
            vips = r.claims().await.unwrap().keys().copied().collect();
            if vips == [ip("10.43.0.2")] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(vips, [ip("10.43.0.2")], "web's claim went with it");
        let _ = stop_tx.send(true);
    }

    macro_rules! on_both_backends {
        ($($test:ident),* $(,)?) => {
            mod sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $test() {
                        super::$test(weft_store::testing::TestStore::sqlite().await).await
                    }
                )*
            }
            mod etcd {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $test() {
                        super::$test(weft_store::testing::TestStore::etcd().await).await
                    }
                )*
            }
        };
    }

    on_both_backends!(reconcilers_keep_records_in_step_with_containers);
}
