//! Load balancing in the kernel, kept in line with the store: the
//! [`Balancer`] holds the service records, every endpoint record of the
//! cluster and the health records, renders `table ip weft_svc` from them
//! ([`crate::nft::services::compile`], whose docs describe the table) and
//! applies it through the daemon's [`Nft`] handle whenever it changes: a
//! backend joining or leaving rewrites the svc chain of its VIP and the
//! elements that differ, one small transaction
//! ([`crate::nft::Table::update`]). [`follow`] feeds it from
//! `<prefix>services/`, `<prefix>endpoints/` and `<prefix>health/` (list,
//! then watch, with [`weft_store::Follower`]), coalescing bursts of changes
//! into one apply. The daemon writes the table whole again on its 30 s
//! resync ([`Balancer::reapply`]).
//!
//! Nothing is applied until all three prefixes have been listed once: a
//! netd that restarts while the store is down leaves the table it had in
//! the kernel (a partial view would send a VIP's traffic to a subset of its
//! backends, or refuse it).
//!
//! When a backend leaves a VIP (deleted, unhealthy, its service gone), the
//! UDP conntrack entries of flows to that VIP answered by that backend are
//! deleted in the background (one listing, then a netlink delete of each
//! UDP entry to VIP whose reply comes from BACKEND), so the
//! flow's next packet is balanced again instead of going to a dead
//! container (Rancher issue 5853). TCP connections are left alone: they
//! fail by themselves, or finish if the container still lives.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnetwork::Ipv4Network;
use weft_model::{EndpointRecord, HealthRecord, Keys, ServiceRecord};
use weft_store::{DynStore, Follower};

use crate::conntrack::Conntrack;
use crate::nft::services::{compile, removed, Compiled, ServicesInput};
use crate::nft::{ApplyOutcome, Desired, Nft};

/// After a change, further changes within this window join the same apply.
const COALESCE: Duration = Duration::from_millis(20);
/// The longest a change waits for others to join it.
const MAX_COALESCE: Duration = Duration::from_millis(200);

/// What the balancer knows, each by store key.
#[derive(Debug, Default)]
struct Known {
    services: BTreeMap<String, ServiceRecord>,
    endpoints: BTreeMap<String, EndpointRecord>,
    health: BTreeMap<String, HealthRecord>,
    /// Whether services, endpoints and health have been listed.
    listed: [bool; 3],
    /// What was applied last.
    applied: Option<Compiled>,
}

/// A change for the [`Balancer`]: the records of each prefix that changed
/// (whole, by store key); `None` leaves that prefix as it is.
#[derive(Debug, Clone, Default)]
pub struct Records {
    pub services: Option<BTreeMap<String, ServiceRecord>>,
    pub endpoints: Option<BTreeMap<String, EndpointRecord>>,
    pub health: Option<BTreeMap<String, HealthRecord>>,
}

/// The services' table on this host: see the module docs.
#[derive(Debug)]
pub struct Balancer {
    nft: Arc<Nft>,
    conntrack: Conntrack,
    keys: Keys,
    service_range: Ipv4Network,
    known: tokio::sync::Mutex<Known>,
}

impl Balancer {
    /// Applies through `nft` (the daemon's handle, shared with the
    /// enforcer) and deletes UDP flows with `conntrack` (same namespace).
    pub fn new(
        nft: Arc<Nft>,
        conntrack: Conntrack,
        keys: Keys,
        service_range: Ipv4Network,
    ) -> Balancer {
        Balancer {
            nft,
            conntrack,
            keys,
            service_range,
            known: tokio::sync::Mutex::new(Known::default()),
        }
    }

    /// Takes the records that changed, then applies once every prefix is
    /// known; the time it took when the kernel changed.
    pub async fn update(&self, records: Records) -> anyhow::Result<Option<Duration>> {
        let mut known = self.known.lock().await;
        if let Some(s) = records.services {
            known.services = s;
            known.listed[0] = true;
        }
        if let Some(e) = records.endpoints {
            known.endpoints = e;
            known.listed[1] = true;
        }
        if let Some(h) = records.health {
            known.health = h;
            known.listed[2] = true;
        }
        self.apply_locked(&mut known).await
    }

    /// The resync: writes the table again whole only when the kernel no
    /// longer has it (deleted, or the ruleset flushed), and otherwise
    /// applies what changed. Replacing it every 30 s cost 7-38 s of `nft`
    /// at 10,000 services of 10 backends and held every change back
    /// meanwhile; elements someone else changed are repaired when a change
    /// touching them fails (then the table is replaced).
    pub async fn reapply(&self) -> anyhow::Result<Option<Duration>> {
        let nft = self.nft.clone();
        let present =
            tokio::task::spawn_blocking(move || nft.has_table("ip", crate::nft::SERVICES_TABLE))
                .await
                .context("nft task")??;
        if !present {
            self.nft.invalidate_table("ip", crate::nft::SERVICES_TABLE);
        }
        let mut known = self.known.lock().await;
        self.apply_locked(&mut known).await
    }

    /// The backends of each VIP as last applied (VIP -> addresses; empty:
    /// no healthy backend).
    pub async fn backends(&self) -> Option<BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>> {
        let known = self.known.lock().await;
        known.applied.as_ref().map(|c| c.backends.clone())
    }

    async fn apply_locked(&self, known: &mut Known) -> anyhow::Result<Option<Duration>> {
        if known.listed.contains(&false) {
            // Not every prefix is known: the kernel keeps what it has.
            return Ok(None);
        }
        let started = Instant::now();
        let services: Vec<ServiceRecord> = known.services.values().cloned().collect();
        let endpoints: Vec<EndpointRecord> = known.endpoints.values().cloned().collect();
        let compiled = compile(&ServicesInput {
            services: &services,
            endpoints: &endpoints,
            health: &known.health,
            keys: &self.keys,
            service_range: self.service_range,
        });
        let desired = Desired {
            services: Some(compiled.table.clone()),
            ..Desired::default()
        };
        let nft = self.nft.clone();
        let outcome = tokio::task::spawn_blocking(move || nft.apply(&desired))
            .await
            .context("nft task")?
            .context("applying the services' nf_tables table")?;
        let gone = known
            .applied
            .as_ref()
            .map(|old| removed(old, &compiled))
            .unwrap_or_default();
        known.applied = Some(compiled);
        if !gone.is_empty() {
            let conntrack = self.conntrack.clone();
            tokio::spawn(async move {
                let n = gone.len();
                match tokio::task::spawn_blocking(move || drop_udp_flows(&conntrack, &gone)).await {
                    Ok(Ok(deleted)) => {
                        tracing::info!(
                            backends = n,
                            deleted,
                            "backends left their VIPs; their UDP flows were deleted"
                        )
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "deleting the UDP flows of removed backends failed")
                    }
                    Err(e) => tracing::warn!(error = %e, "conntrack task failed"),
                }
            });
        }
        match outcome {
            ApplyOutcome::Unchanged => Ok(None),
            ApplyOutcome::Replaced | ApplyOutcome::Updated => {
                let took = started.elapsed();
                tracing::debug!(
                    took_ms = took.as_millis() as u64,
                    replaced = outcome == ApplyOutcome::Replaced,
                    services = known.services.len(),
                    endpoints = known.endpoints.len(),
                    "services table applied"
                );
                Ok(Some(took))
            }
        }
    }
}

/// Deletes the UDP conntrack entries to each `(vip, backend)` pair's VIP
/// answered by its backend; returns how many went. One listing, then a
/// netlink delete of each entry it shows ([`Conntrack::delete_where`]).
pub fn drop_udp_flows(
    conntrack: &Conntrack,
    pairs: &[(Ipv4Addr, Ipv4Addr)],
) -> Result<usize, crate::conntrack::ConntrackError> {
    if pairs.is_empty() {
        return Ok(0);
    }
    let pairs: HashSet<(Ipv4Addr, Ipv4Addr)> = pairs.iter().copied().collect();
    conntrack.delete_where(|e| {
        e.tuple.proto == libc::IPPROTO_UDP as u8
            && e.reply.is_some_and(|r| pairs.contains(&(e.tuple.dst, r.0)))
    })
}

/// Follows the service, endpoint and health records until `stop` fires,
/// handing each coalesced change to `balancer`; `applied` is told how long
/// each apply that changed the kernel took.
pub async fn follow(
    balancer: Arc<Balancer>,
    store: DynStore,
    keys: Keys,
    mut stop: tokio::sync::watch::Receiver<bool>,
    applied: impl Fn(Duration),
) {
    let mut services_f = Follower::new(store.clone(), keys.services());
    let mut endpoints_f = Follower::new(store.clone(), keys.endpoints());
    let mut health_f = Follower::new(store, keys.health());
    let mut services: BTreeMap<String, ServiceRecord> = BTreeMap::new();
    let mut endpoints: BTreeMap<String, EndpointRecord> = BTreeMap::new();
    let mut health: BTreeMap<String, HealthRecord> = BTreeMap::new();
    loop {
        let mut changed = [false; 3];
        let mut first: Option<Instant> = None;
        // The first update waits; more within COALESCE of each other join
        // it, for at most MAX_COALESCE (steady churn cannot hold it back).
        loop {
            let wait = async {
                match first {
                    None => std::future::pending::<()>().await,
                    Some(t) => {
                        let left = MAX_COALESCE.saturating_sub(t.elapsed());
                        tokio::time::sleep(COALESCE.min(left)).await
                    }
                }
            };
            tokio::select! {
                _ = stop.changed() => return,
                _ = wait => break,
                u = services_f.next() => {
                    u.apply_to(&mut services, "service record");
                    changed[0] = true;
                }
                u = endpoints_f.next() => {
                    u.apply_to(&mut endpoints, "endpoint record");
                    changed[1] = true;
                }
                u = health_f.next() => {
                    u.apply_to(&mut health, "health record");
                    changed[2] = true;
                }
            }
            first.get_or_insert_with(Instant::now);
        }
        let records = Records {
            services: changed[0].then(|| services.clone()),
            endpoints: changed[1].then(|| endpoints.clone()),
            health: changed[2].then(|| health.clone()),
        };
        match balancer.update(records).await {
            Ok(Some(took)) => applied(took),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "applying the services' table failed; the resync retries")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn nothing_is_applied_until_every_prefix_is_listed() {
        // A handle on a namespace that does not exist: any nft run fails,
        // so an Ok(None) proves nothing ran.
        let nft = Arc::new(Nft::new().in_netns("weft-no-such-netns"));
        let b = Balancer::new(
            nft,
            Conntrack::default(),
            Keys::default(),
            "10.43.0.0/16".parse().unwrap(),
        );
        let some = Records {
            services: Some(BTreeMap::new()),
            endpoints: Some(BTreeMap::new()),
            health: None,
        };
        assert_eq!(b.update(some).await.unwrap(), None);
        assert!(b.backends().await.is_none());
        // With the health listed too it tries (and fails: no namespace).
        let health = Records {
            health: Some(BTreeMap::new()),
            ..Records::default()
        };
        assert!(b.update(health).await.is_err());
    }
}
