//! Service records and their virtual IPs in the store.
//!
//! A [`ServiceRecord`] lives at [`Keys::service`]; its VIP is claimed first
//! at [`Keys::vip`] by compare-and-swap (`Expect::Absent`, the value is the
//! service's name), so two hosts can never hand out one address twice. The
//! record is then created by compare-and-swap too: a host that loses that
//! race takes the winner's record and gives its own claim back.
//!
//! Pure decisions: [`free_vips`] (lowest free address of the service range,
//! without its network and broadcast addresses), [`vip_capacity`],
//! [`lifecycle`] (when a service becomes empty, is in use again, or has
//! been empty for longer than the grace) and [`orphan_claims`] (claims no
//! record points at). [`Registry`] does the store I/O with them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use weft_model::{Keys, Mode, ServiceError, ServiceName, ServiceRecord, ServiceSpec};
use weft_store::{CasOutcome, DynStore, Expect, Revision, StoreError};

/// What can go wrong with a service record or its VIP.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the service record at {key} does not parse: {detail}; set the service again with `netd service set`")]
    Corrupt { key: String, detail: String },
    #[error("no VIP: service range {range} is full (use dnsrr mode for some services, or a larger ipam.service_range)")]
    Full { range: Ipv4Network },
    #[error(transparent)]
    Invalid(#[from] ServiceError),
    #[error("{what} kept changing while netd wrote it; try again")]
    Contention { what: String },
}

/// The addresses of `range` a VIP may have (every address but the network
/// and broadcast ones, for ranges of 4 addresses and more) that `taken`
/// does not hold, lowest first.
pub fn free_vips(
    range: Ipv4Network,
    taken: impl Fn(Ipv4Addr) -> bool,
) -> impl Iterator<Item = Ipv4Addr> {
    let ends = range.prefix() <= 30;
    range
        .iter()
        .filter(move |ip| !(ends && (*ip == range.network() || *ip == range.broadcast())))
        .filter(move |ip| !taken(*ip))
}

/// How many VIPs `range` holds.
pub fn vip_capacity(range: Ipv4Network) -> u64 {
    let size = 1u64 << (32 - u32::from(range.prefix()));
    if range.prefix() <= 30 {
        size - 2
    } else {
        size
    }
}

/// What a service's containers say about its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Nothing to change.
    Keep,
    /// It has no container now: note since when (`empty_since_ms`).
    MarkEmpty,
    /// It has containers again: clear `empty_since_ms`.
    Clear,
    /// It has had no container for the grace: delete it and its claim.
    Expire,
}

/// The one rule of a record's life: empty since `empty_since_ms`, kept for
/// `grace` after that, in use again as soon as a container shows up.
pub fn lifecycle(
    record: &ServiceRecord,
    containers: usize,
    now_ms: u64,
    grace: Duration,
) -> Lifecycle {
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    match (containers > 0, record.empty_since_ms) {
        (true, None) => Lifecycle::Keep,
        (true, Some(_)) => Lifecycle::Clear,
        (false, None) => Lifecycle::MarkEmpty,
        (false, Some(since)) if now_ms.saturating_sub(since) >= grace_ms => Lifecycle::Expire,
        (false, Some(_)) => Lifecycle::Keep,
    }
}

/// The claims (address -> the service name they hold) that no record uses:
/// left by a host that died between claiming and creating the record, or
/// between deleting a record and its claim. A claim is also briefly
/// "orphaned" while a host switches a service to `vip` mode, so callers
/// delete one only after it stayed so for a while.
pub fn orphan_claims(
    claims: &BTreeMap<Ipv4Addr, String>,
    records: &BTreeMap<ServiceName, ServiceRecord>,
) -> Vec<Ipv4Addr> {
    claims
        .iter()
        .filter(|(ip, name)| {
            let used = name
                .parse::<ServiceName>()
                .ok()
                .and_then(|n| records.get(&n))
                .is_some_and(|r| r.vip == Some(**ip));
            !used
        })
        .map(|(ip, _)| *ip)
        .collect()
}

/// A record as stored, with the revision of its last write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub record: ServiceRecord,
    pub revision: Revision,
}

/// What [`Registry::ensure`] found or made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    pub stored: Stored,
    /// This call created the record.
    pub created: bool,
    /// It wanted a VIP and the range had none left.
    pub full: bool,
}

/// A stored record's value, parsed.
pub fn decode(key: &str, value: &[u8]) -> Result<ServiceRecord, RecordsError> {
    serde_json::from_slice(value).map_err(|e| RecordsError::Corrupt {
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

fn encode(record: &ServiceRecord) -> Vec<u8> {
    // A record is names, addresses, numbers and strings: it always encodes.
    serde_json::to_vec(record).unwrap_or_default()
}

/// The claims under `vips/` as address -> (service name, revision).
pub fn parse_claims(
    keys: &Keys,
    kvs: impl IntoIterator<Item = weft_store::KeyValue>,
) -> BTreeMap<Ipv4Addr, (String, Revision)> {
    kvs.into_iter()
        .filter_map(|kv| Some((claim_ip(keys, &kv.key)?, claim(&kv)?)))
        .collect()
}

/// The VIP a claim's key `<prefix>vips/<ip>` claims.
pub fn claim_ip(keys: &Keys, key: &str) -> Option<Ipv4Addr> {
    key.strip_prefix(&keys.vips())?.parse().ok()
}

/// A claim's service name and revision (`None`: not a name).
pub fn claim(kv: &weft_store::KeyValue) -> Option<(String, Revision)> {
    let name = String::from_utf8(kv.value.clone()).ok()?;
    Some((name, kv.mod_revision))
}

/// Service records and VIP claims in one store.
#[derive(Clone)]
pub struct Registry {
    store: DynStore,
    keys: Keys,
    range: Ipv4Network,
}

/// After this many claims in a row were taken by others, list the claims
/// again instead of trying the next address.
const RELIST_AFTER: usize = 16;

impl Registry {
    pub fn new(store: DynStore, keys: Keys, range: Ipv4Network) -> Registry {
        Registry { store, keys, range }
    }

    /// The service range VIPs come from.
    pub fn range(&self) -> Ipv4Network {
        self.range
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The record of `name`, if there is one.
    pub async fn get(&self, name: &ServiceName) -> Result<Option<Stored>, RecordsError> {
        let key = self.keys.service(name);
        match self.store.get(&key).await? {
            None => Ok(None),
            Some(kv) => Ok(Some(Stored {
                record: decode(&key, &kv.value)?,
                revision: kv.mod_revision,
            })),
        }
    }

    /// Every record (those that do not parse are skipped with a warning).
    pub async fn list(&self) -> Result<Vec<Stored>, RecordsError> {
        let range = self.store.get_prefix(&self.keys.services()).await?;
        let mut out = Vec::with_capacity(range.kvs.len());
        for kv in range.kvs {
            match decode(&kv.key, &kv.value) {
                Ok(record) => out.push(Stored {
                    record,
                    revision: kv.mod_revision,
                }),
                Err(e) => tracing::warn!(error = %e, "skipping a service record"),
            }
        }
        Ok(out)
    }

    /// Every VIP claim: address -> (service name, revision).
    pub async fn claims(&self) -> Result<BTreeMap<Ipv4Addr, (String, Revision)>, RecordsError> {
        let range = self.store.get_prefix(&self.keys.vips()).await?;
        Ok(parse_claims(&self.keys, range.kvs))
    }

    /// Claims the lowest free VIP for `name`; `None` when the range is
    /// full. `taken`: the claims the caller knows of (`None`: list them).
    pub async fn claim(
        &self,
        name: &ServiceName,
        taken: Option<&BTreeSet<Ipv4Addr>>,
    ) -> Result<Option<Ipv4Addr>, RecordsError> {
        let mut listed: BTreeSet<Ipv4Addr> = match taken {
            Some(_) => BTreeSet::new(),
            None => self.claims().await?.into_keys().collect(),
        };
        let known = taken.unwrap_or(&BTreeSet::new()).clone();
        let value = name.to_string();
        let mut lost = 0;
        loop {
            let next =
                free_vips(self.range, |ip| known.contains(&ip) || listed.contains(&ip)).next();
            let Some(ip) = next else {
                return Ok(None);
            };
            let key = self.keys.vip(ip);
            match self
                .store
                .compare_and_swap(&key, Expect::Absent, value.as_bytes(), None)
                .await?
            {
                CasOutcome::Done(_) => return Ok(Some(ip)),
                CasOutcome::Conflict(_) => {
                    listed.insert(ip);
                    lost += 1;
                    if lost % RELIST_AFTER == 0 {
                        listed.extend(self.claims().await?.into_keys());
                    }
                }
            }
        }
    }

    /// Gives `ip` back if `name` holds it. Returns whether it did.
    pub async fn release(&self, ip: Ipv4Addr, name: &ServiceName) -> Result<bool, RecordsError> {
        let key = self.keys.vip(ip);
        let Some(kv) = self.store.get(&key).await? else {
            return Ok(false);
        };
        if kv.value != name.to_string().as_bytes() {
            return Ok(false);
        }
        Ok(self
            .store
            .compare_and_delete(&key, kv.mod_revision)
            .await?
            .is_done())
    }

    /// Like [`Registry::release`], logging a failure (the claim is then an
    /// orphan, which the reconciler deletes later).
    async fn release_or_warn(&self, ip: Ipv4Addr, name: &ServiceName) {
        if let Err(e) = self.release(ip, name).await {
            tracing::warn!(service = %name, vip = %ip, error = %e, "giving a VIP claim back failed; the reconciler deletes it later");
        }
    }

    /// The record of `name`, created when there is none: in `mode`, with the
    /// lowest free VIP in `vip` mode (none if the range is full: the service
    /// then works by DNS round robin). A record that exists is returned as
    /// it is (the mode is only for a new one).
    pub async fn ensure(
        &self,
        name: &ServiceName,
        mode: Mode,
        taken: Option<&BTreeSet<Ipv4Addr>>,
    ) -> Result<Ensured, RecordsError> {
        let key = self.keys.service(name);
        for _ in 0..4 {
            if let Some(stored) = self.get(name).await? {
                return Ok(Ensured {
                    stored,
                    created: false,
                    full: false,
                });
            }
            let vip = match mode {
                Mode::Vip => self.claim(name, taken).await?,
                Mode::Dnsrr => None,
            };
            let record = ServiceRecord {
                name: name.clone(),
                vip,
                spec: ServiceSpec {
                    mode,
                    ..ServiceSpec::default()
                },
                empty_since_ms: None,
            };
            match self
                .store
                .compare_and_swap(&key, Expect::Absent, &encode(&record), None)
                .await?
            {
                CasOutcome::Done(revision) => {
                    return Ok(Ensured {
                        stored: Stored { record, revision },
                        created: true,
                        full: mode == Mode::Vip && vip.is_none(),
                    })
                }
                CasOutcome::Conflict(current) => {
                    let theirs = current
                        .map(|kv| {
                            decode(&key, &kv.value).map(|record| Stored {
                                record,
                                revision: kv.mod_revision,
                            })
                        })
                        .transpose()?;
                    if let Some(ip) = vip {
                        if theirs.as_ref().and_then(|t| t.record.vip) != Some(ip) {
                            self.release_or_warn(ip, name).await;
                        }
                    }
                    if let Some(stored) = theirs {
                        return Ok(Ensured {
                            stored,
                            created: false,
                            full: false,
                        });
                    }
                    // Made and deleted meanwhile: once more.
                }
            }
        }
        Err(RecordsError::Contention { what: key })
    }

    /// Sets the spec of `name`, creating the record if needed: switching
    /// to `dnsrr` gives the VIP back, switching to `vip` claims one
    /// ([`RecordsError::Full`] when none is left; nothing is written then).
    pub async fn put_spec(
        &self,
        name: &ServiceName,
        spec: &ServiceSpec,
        taken: Option<&BTreeSet<Ipv4Addr>>,
    ) -> Result<Stored, RecordsError> {
        spec.validate()?;
        let key = self.keys.service(name);
        for _ in 0..8 {
            let current = self.get(name).await?;
            let old_vip = current.as_ref().and_then(|c| c.record.vip);
            let mut claimed = None;
            let vip = match (spec.mode, old_vip) {
                (Mode::Vip, Some(ip)) => Some(ip),
                (Mode::Vip, None) => {
                    let ip = self
                        .claim(name, taken)
                        .await?
                        .ok_or(RecordsError::Full { range: self.range })?;
                    claimed = Some(ip);
                    Some(ip)
                }
                (Mode::Dnsrr, _) => None,
            };
            let record = ServiceRecord {
                name: name.clone(),
                vip,
                spec: spec.clone(),
                empty_since_ms: current.as_ref().and_then(|c| c.record.empty_since_ms),
            };
            let expect = current
                .as_ref()
                .map_or(Expect::Absent, |c| Expect::ModRevision(c.revision));
            match self
                .store
                .compare_and_swap(&key, expect, &encode(&record), None)
                .await?
            {
                CasOutcome::Done(revision) => {
                    if let (Some(ip), None) = (old_vip, vip) {
                        self.release_or_warn(ip, name).await;
                    }
                    return Ok(Stored { record, revision });
                }
                CasOutcome::Conflict(_) => {
                    if let Some(ip) = claimed {
                        self.release_or_warn(ip, name).await;
                    }
                }
            }
        }
        Err(RecordsError::Contention { what: key })
    }

    /// Gives a `vip`-mode record without a VIP (the range was full) the
    /// lowest free one. `Ok(false)`: still full, or the record changed
    /// meanwhile (the reconciler looks again at its next pass).
    pub async fn assign_vip(
        &self,
        stored: &Stored,
        taken: Option<&BTreeSet<Ipv4Addr>>,
    ) -> Result<bool, RecordsError> {
        let name = &stored.record.name;
        let Some(ip) = self.claim(name, taken).await? else {
            return Ok(false);
        };
        let record = ServiceRecord {
            vip: Some(ip),
            ..stored.record.clone()
        };
        let done = self
            .store
            .compare_and_swap(
                &self.keys.service(name),
                Expect::ModRevision(stored.revision),
                &encode(&record),
                None,
            )
            .await?
            .is_done();
        if !done {
            self.release_or_warn(ip, name).await;
        }
        Ok(done)
    }

    /// Sets or clears `empty_since_ms` if the record is still at its
    /// revision. Returns whether it wrote.
    pub async fn set_empty_since(
        &self,
        stored: &Stored,
        since_ms: Option<u64>,
    ) -> Result<bool, RecordsError> {
        let record = ServiceRecord {
            empty_since_ms: since_ms,
            ..stored.record.clone()
        };
        Ok(self
            .store
            .compare_and_swap(
                &self.keys.service(&record.name),
                Expect::ModRevision(stored.revision),
                &encode(&record),
                None,
            )
            .await?
            .is_done())
    }

    /// Deletes the record if it is still at its revision, then its claim.
    /// Returns whether it deleted.
    pub async fn expire(&self, stored: &Stored) -> Result<bool, RecordsError> {
        let name = &stored.record.name;
        let done = self
            .store
            .compare_and_delete(&self.keys.service(name), stored.revision)
            .await?
            .is_done();
        if done {
            if let Some(ip) = stored.record.vip {
                self.release_or_warn(ip, name).await;
            }
        }
        Ok(done)
    }

    /// Deletes an orphaned claim if it is still at `revision`.
    pub async fn drop_claim(&self, ip: Ipv4Addr, revision: Revision) -> Result<bool, RecordsError> {
        Ok(self
            .store
            .compare_and_delete(&self.keys.vip(ip), revision)
            .await?
            .is_done())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use weft_store::testing::TestStore;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn name(s: &str) -> ServiceName {
        s.parse().unwrap()
    }

    fn record(n: &str, vip: Option<&str>, empty_since_ms: Option<u64>) -> ServiceRecord {
        ServiceRecord {
            name: name(n),
            vip: vip.map(ip),
            spec: ServiceSpec::default(),
            empty_since_ms,
        }
    }

    #[test]
    fn vips_are_the_lowest_free_without_network_and_broadcast() {
        let range = net("10.43.0.0/16");
        let first: Vec<_> = free_vips(range, |_| false).take(2).collect();
        assert_eq!(first, [ip("10.43.0.1"), ip("10.43.0.2")]);
        let taken: BTreeSet<_> = [ip("10.43.0.1"), ip("10.43.0.3")].into();
        let next: Vec<_> = free_vips(range, |a| taken.contains(&a)).take(2).collect();
        assert_eq!(next, [ip("10.43.0.2"), ip("10.43.0.4")]);
        let small = net("10.43.0.0/30");
        let all: Vec<_> = free_vips(small, |_| false).collect();
        assert_eq!(all, [ip("10.43.0.1"), ip("10.43.0.2")], "not .0 nor .3");
        assert_eq!(vip_capacity(small), 2);
        assert_eq!(vip_capacity(range), 65_534);
        assert_eq!(vip_capacity(net("10.43.0.7/32")), 1);
        let full: BTreeSet<_> = all.into_iter().collect();
        assert_eq!(free_vips(small, |a| full.contains(&a)).next(), None);
    }

    #[test]
    fn a_record_is_marked_empty_cleared_and_expired_after_the_grace() {
        let grace = Duration::from_secs(600);
        let busy = record("web.shop", Some("10.43.0.1"), None);
        assert_eq!(lifecycle(&busy, 3, 1_000, grace), Lifecycle::Keep);
        assert_eq!(lifecycle(&busy, 0, 1_000, grace), Lifecycle::MarkEmpty);
        let empty = record("web.shop", Some("10.43.0.1"), Some(1_000));
        assert_eq!(lifecycle(&empty, 1, 2_000, grace), Lifecycle::Clear);
        assert_eq!(lifecycle(&empty, 0, 2_000, grace), Lifecycle::Keep);
        assert_eq!(lifecycle(&empty, 0, 600_999, grace), Lifecycle::Keep);
        assert_eq!(lifecycle(&empty, 0, 601_000, grace), Lifecycle::Expire);
        // A clock behind the one that marked it: not expired.
        assert_eq!(lifecycle(&empty, 0, 10, grace), Lifecycle::Keep);
        assert_eq!(
            lifecycle(&empty, 0, 1_000, Duration::ZERO),
            Lifecycle::Expire
        );
    }

    #[test]
    fn orphan_claims_are_those_no_record_uses() {
        let records: BTreeMap<_, _> = [
            record("web.shop", Some("10.43.0.1"), None),
            record("db.shop", None, None),
        ]
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
        let claims: BTreeMap<_, _> = [
            (ip("10.43.0.1"), "web.shop".to_owned()),
            (ip("10.43.0.2"), "web.shop".to_owned()),
            (ip("10.43.0.3"), "db.shop".to_owned()),
            (ip("10.43.0.4"), "gone".to_owned()),
            (ip("10.43.0.5"), "not a name".to_owned()),
        ]
        .into();
        assert_eq!(
            orphan_claims(&claims, &records),
            [
                ip("10.43.0.2"),
                ip("10.43.0.3"),
                ip("10.43.0.4"),
                ip("10.43.0.5")
            ]
        );
    }

    fn registry(t: &TestStore, range: &str) -> Registry {
        Registry::new(t.store(), Keys::new("/weft/"), net(range))
    }

    async fn claim_owner(r: &Registry, vip: &str) -> Option<String> {
        r.claims().await.unwrap().remove(&ip(vip)).map(|(n, _)| n)
    }

    async fn ensure_allocates_once_and_stays(t: TestStore) {
        let r = registry(&t, "10.43.0.0/16");
        let web = r.ensure(&name("web.shop"), Mode::Vip, None).await.unwrap();
        assert!(web.created && !web.full);
        assert_eq!(web.stored.record.vip, Some(ip("10.43.0.1")));
        assert_eq!(web.stored.record.spec.mode, Mode::Vip);
        assert_eq!(
            claim_owner(&r, "10.43.0.1").await.as_deref(),
            Some("web.shop")
        );
        let db = r.ensure(&name("db"), Mode::Vip, None).await.unwrap();
        assert_eq!(db.stored.record.vip, Some(ip("10.43.0.2")));
        // Again (another container, a restarted netd): the same record,
        // whatever the mode asked.
        let again = Registry::new(t.another_handle().await, Keys::new("/weft/"), r.range());
        let w2 = again
            .ensure(&name("web.shop"), Mode::Dnsrr, None)
            .await
            .unwrap();
        assert!(!w2.created);
        assert_eq!(w2.stored, web.stored);
        // dnsrr keeps no VIP.
        let rr = r.ensure(&name("rr.shop"), Mode::Dnsrr, None).await.unwrap();
        assert_eq!(rr.stored.record.vip, None);
        assert!(!rr.full);
        assert_eq!(r.claims().await.unwrap().len(), 2);
        // A stale view of the claims only costs retries.
        let stale = BTreeSet::new();
        let api = r
            .ensure(&name("api"), Mode::Vip, Some(&stale))
            .await
            .unwrap();
        assert_eq!(api.stored.record.vip, Some(ip("10.43.0.3")));
        assert_eq!(r.list().await.unwrap().len(), 4);
    }

    async fn racing_hosts_agree_on_one_record_and_one_claim(t: TestStore) {
        let keys = Keys::new("/weft/");
        let mut hosts = Vec::new();
        for _ in 0..4 {
            hosts.push(Registry::new(
                t.another_handle().await,
                keys.clone(),
                net("10.43.0.0/24"),
            ));
        }
        let tasks: Vec<_> = hosts
            .into_iter()
            .map(|r| {
                tokio::spawn(async move { r.ensure(&name("web.shop"), Mode::Vip, None).await })
            })
            .collect();
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap().unwrap());
        }
        assert_eq!(got.iter().filter(|e| e.created).count(), 1);
        assert!(got.iter().all(|e| e.stored == got[0].stored));
        let r = registry(&t, "10.43.0.0/24");
        let claims = r.claims().await.unwrap();
        assert_eq!(
            claims.len(),
            1,
            "the losers gave their claims back: {claims:?}"
        );
        assert_eq!(
            claims.keys().next().copied(),
            got[0].stored.record.vip,
            "the one claim is the record's"
        );
    }

    async fn a_full_range_leaves_the_service_without_vip(t: TestStore) {
        let r = registry(&t, "10.43.0.0/30");
        for n in ["a", "b"] {
            assert!(!r.ensure(&name(n), Mode::Vip, None).await.unwrap().full);
        }
        let c = r.ensure(&name("c"), Mode::Vip, None).await.unwrap();
        assert!(c.created && c.full);
        assert_eq!(c.stored.record.vip, None);
        assert_eq!(c.stored.record.spec.mode, Mode::Vip);
        // Setting vip mode says so, and writes nothing.
        let d = ServiceSpec::default();
        let e = r.put_spec(&name("d"), &d, None).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("no VIP: service range 10.43.0.0/30 is full"),
            "{e}"
        );
        assert_eq!(r.get(&name("d")).await.unwrap(), None);
        assert!(!r.assign_vip(&c.stored, None).await.unwrap());
        // b switches to dnsrr: its VIP is free, and c can have it.
        let rr = ServiceSpec {
            mode: Mode::Dnsrr,
            ..ServiceSpec::default()
        };
        let b = r.put_spec(&name("b"), &rr, None).await.unwrap();
        assert_eq!(b.record.vip, None);
        assert_eq!(claim_owner(&r, "10.43.0.2").await, None);
        assert!(r.assign_vip(&c.stored, None).await.unwrap());
        let c = r.get(&name("c")).await.unwrap().unwrap();
        assert_eq!(c.record.vip, Some(ip("10.43.0.2")));
        assert_eq!(claim_owner(&r, "10.43.0.2").await.as_deref(), Some("c"));
    }

    async fn put_spec_switches_modes_and_keeps_the_vip(t: TestStore) {
        let r = registry(&t, "10.43.0.0/16");
        let web = name("web.shop");
        let hashed = ServiceSpec {
            balance: weft_model::Balance::Hash,
            affinity: true,
            health: Some(weft_model::HealthCheck::new("tcp:80".parse().unwrap())),
            ..ServiceSpec::default()
        };
        let s = r.put_spec(&web, &hashed, None).await.unwrap();
        assert_eq!(s.record.vip, Some(ip("10.43.0.1")));
        assert_eq!(s.record.spec, hashed);
        let plain = r
            .put_spec(&web, &ServiceSpec::default(), None)
            .await
            .unwrap();
        assert_eq!(
            plain.record.vip,
            Some(ip("10.43.0.1")),
            "a spec change keeps the VIP"
        );
        let rr = ServiceSpec {
            mode: Mode::Dnsrr,
            ..ServiceSpec::default()
        };
        assert_eq!(r.put_spec(&web, &rr, None).await.unwrap().record.vip, None);
        assert!(r.claims().await.unwrap().is_empty());
        let back = r
            .put_spec(&web, &ServiceSpec::default(), None)
            .await
            .unwrap();
        assert_eq!(back.record.vip, Some(ip("10.43.0.1")));
        // An invalid spec is refused before anything is written.
        let bad = ServiceSpec {
            health: Some(weft_model::HealthCheck {
                interval_ms: 1,
                ..weft_model::HealthCheck::new("tcp:80".parse().unwrap())
            }),
            ..ServiceSpec::default()
        };
        let e = r.put_spec(&name("x"), &bad, None).await.unwrap_err();
        assert!(matches!(e, RecordsError::Invalid(_)), "{e}");
        assert_eq!(r.get(&name("x")).await.unwrap(), None);
    }

    async fn empty_records_expire_with_their_claim(t: TestStore) {
        let r = registry(&t, "10.43.0.0/16");
        let web = r
            .ensure(&name("web"), Mode::Vip, None)
            .await
            .unwrap()
            .stored;
        assert!(r.set_empty_since(&web, Some(5)).await.unwrap());
        // A stale revision writes nothing.
        assert!(!r.set_empty_since(&web, None).await.unwrap());
        assert!(!r.expire(&web).await.unwrap());
        let marked = r.get(&name("web")).await.unwrap().unwrap();
        assert_eq!(marked.record.empty_since_ms, Some(5));
        assert_eq!(marked.record.vip, web.record.vip);
        assert!(r.expire(&marked).await.unwrap());
        assert_eq!(r.get(&name("web")).await.unwrap(), None);
        assert!(r.claims().await.unwrap().is_empty());
        // A claim nobody uses goes only at its revision.
        let orphan = r.claim(&name("db"), None).await.unwrap().unwrap();
        let (_, rev) = r.claims().await.unwrap()[&orphan].clone();
        assert!(!r.drop_claim(orphan, rev + 100).await.unwrap());
        assert!(r.drop_claim(orphan, rev).await.unwrap());
        // release gives back only the named service's claim.
        let vip = r.claim(&name("db"), None).await.unwrap().unwrap();
        assert!(!r.release(vip, &name("web")).await.unwrap());
        assert!(r.release(vip, &name("db")).await.unwrap());
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

    on_both_backends!(
        ensure_allocates_once_and_stays,
        racing_hosts_agree_on_one_record_and_one_claim,
        a_full_range_leaves_the_service_without_vip,
        put_spec_switches_modes_and_keeps_the_vip,
        empty_records_expire_with_their_claim,
    );
}
