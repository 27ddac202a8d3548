//! Isolation in the kernel (policy and anti-spoofing), kept in line with
//! the store: the [`Enforcer`] holds the last policy and endpoint records it
//! saw, renders weft's nf_tables tables from them ([`crate::nft`]) and
//! applies them as one transaction whenever they change (only the elements
//! and counters that differ when the tables keep their shape, as they do
//! when a container comes or goes: [`crate::nft::Table::update`]); [`follow`] feeds it
//! from `<prefix>policy/` and `<prefix>endpoints/` (list, then watch, with
//! [`weft_store::Follower`]), coalescing bursts of changes into one apply.
//! The daemon replaces both tables on its 30 s resync (someone may have
//! changed or deleted them) and applies after every change of this host's endpoints
//! ([`crate::daemon::Daemon::enforce_local`], before the plugin's add is
//! answered).
//!
//! Anti-spoofing needs only this host's records and is applied from the
//! first change on. The policy table needs the policy and a listing of
//! every endpoint of the cluster (the sources); until both are known the
//! inet table is left as the kernel has it (a stopped netd leaves its
//! tables in place, so a restart has no window).
//!
//! Fail closed: the last policy is kept in `<state dir>/policy.json` and is
//! the one enforced after a start until the first read of the store's
//! policy (a `deny` stays a `deny`). netd cannot start while the store is
//! down; the tables a stopped netd left stay in the kernel meanwhile. A
//! document in the store that does not parse or validate is
//! logged and the last good one stays.
//!
//! After a change, the conntrack entries of address pairs that lost reach
//! are deleted ([`crate::nft::policy::lost_reach`]; one listing, then
//! netlink deletes), before the next change is applied, only
//! those on what the pair may no longer reach (its connections on a port
//! still allowed stay); their packets are already refused by the new rules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnetwork::Ipv4Network;
use weft_model::{EndpointRecord, Keys, Policy};
use weft_store::{DynStore, EventKind, Follower, Update};

use crate::nft::policy::{compile, lost_reach, Compiled, PolicyInput};
use crate::nft::{ApplyOutcome, Desired, Nft};

/// The kernel setting the policy relies on: bridged IPv4 between two
/// containers of one host passes the inet `forward` hook only with it.
pub const BRIDGE_NF_SYSCTL: (&str, &str) = ("net/bridge/bridge-nf-call-iptables", "1");

/// Loads `br_netfilter` when its sysctls ([`BRIDGE_NF_SYSCTL`]) are
/// missing (a module on most distributions, built in on others).
pub fn load_bridge_netfilter() -> anyhow::Result<()> {
    let dir = Path::new("/proc/sys/net/bridge");
    if dir.exists() {
        return Ok(());
    }
    let modprobe = crate::command::resolve("modprobe");
    let outcome = std::process::Command::new(&modprobe)
        .arg("br_netfilter")
        .output();
    if dir.exists() {
        tracing::info!("loaded br_netfilter");
        return Ok(());
    }
    let why = match outcome {
        Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        Err(e) => e.to_string(),
    };
    anyhow::bail!(
        "{} is missing and `modprobe br_netfilter` failed ({why}): load the br_netfilter \
         module; weft's policy needs bridged IPv4 to pass the forward hook",
        dir.display()
    )
}

/// After a change, further changes within this window join the same apply.
const COALESCE: Duration = Duration::from_millis(20);
/// The longest a change waits for others to join it.
const MAX_COALESCE: Duration = Duration::from_millis(200);

/// The file the last policy is kept in, under the state dir.
pub const POLICY_FILE: &str = "policy.json";

/// What the enforcer knows.
#[derive(Debug, Default)]
struct Known {
    /// `None`: no policy known yet (the inet table is left as it is).
    policy: Option<Policy>,
    /// Every endpoint record of the cluster, by store key.
    endpoints: BTreeMap<String, EndpointRecord>,
    /// Whether `endpoints` came from a listing of the store (until then it
    /// holds only this host's records, and the inet table is left as it
    /// is: the sources are not known).
    listed: bool,
    /// Whether this host's records are known (a listing, or
    /// [`Enforcer::set_local`]). Until then the bridge table is left as it
    /// is too: after a restart while the store is down, the anti-spoofing
    /// netd left in the kernel stays (an empty table would let every
    /// container spoof).
    local_known: bool,
    /// This host's records as the daemon's endpoint operations last gave
    /// them ([`Enforcer::set_local`] and its callers), by store
    /// key: authoritative for this host, whatever an older listing from the
    /// follower says (a snapshot taken before an add must not take the new
    /// port out again).
    own: Option<BTreeMap<String, EndpointRecord>>,
    /// The other hosts' gateway addresses ([`PolicyInput::hosts`]).
    hosts: Vec<std::net::Ipv4Addr>,
    /// What was applied last.
    applied: Option<Compiled>,
}

/// Policy enforcement on this host: see the module docs.
#[derive(Debug)]
pub struct Enforcer {
    nft: Arc<Nft>,
    host_id: String,
    cluster_range: Ipv4Network,
    /// This host's block.
    block: Ipv4Network,
    state_file: PathBuf,
    known: tokio::sync::Mutex<Known>,
}

impl Enforcer {
    /// Starts with the policy kept in `state_dir` (if any).
    pub fn new(
        nft: Nft,
        host_id: &str,
        cluster_range: Ipv4Network,
        block: Ipv4Network,
        state_dir: &Path,
    ) -> Enforcer {
        let state_file = state_dir.join(POLICY_FILE);
        let policy = match read_saved(&state_file) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "ignoring the saved policy");
                None
            }
        };
        Enforcer {
            nft: Arc::new(nft),
            host_id: host_id.to_owned(),
            cluster_range,
            block,
            state_file,
            known: tokio::sync::Mutex::new(Known {
                policy,
                ..Known::default()
            }),
        }
    }

    /// The nf_tables handle (for counters and teardown).
    pub fn nft(&self) -> &Arc<Nft> {
        &self.nft
    }

    /// Takes a new policy (saved in the state dir) and/or every endpoint
    /// record of the cluster (by store key), then applies.
    pub async fn update(
        &self,
        policy: Option<Policy>,
        endpoints: Option<BTreeMap<String, EndpointRecord>>,
    ) -> anyhow::Result<Option<Duration>> {
        let mut known = self.known.lock().await;
        if let Some(policy) = policy {
            if known.policy.as_ref() != Some(&policy) {
                if let Err(e) = save(&self.state_file, &policy) {
                    tracing::warn!(error = %format!("{e:#}"), "keeping the policy in the state dir failed");
                }
                known.policy = Some(policy);
            }
        }
        if let Some(endpoints) = endpoints {
            known.endpoints = endpoints;
            known.listed = true;
        }
        self.apply_locked(&mut known).await
    }

    /// Replaces this host's records with `local` (read from the store just
    /// now, e.g. after an endpoint was added) and applies; the watch brings
    /// the same a moment later.
    pub async fn set_local(
        &self,
        keys: &Keys,
        local: Vec<EndpointRecord>,
    ) -> anyhow::Result<Option<Duration>> {
        let mut known = self.known.lock().await;
        known.local_known = true;
        let eps = &mut known.endpoints;
        eps.retain(|_, r| r.host_id.as_str() != self.host_id);
        let mut own = BTreeMap::new();
        for r in local {
            let key = keys.endpoint(&self.host_id, r.container_id.as_str(), r.ifname.as_str());
            eps.insert(key.clone(), r.clone());
            own.insert(key, r);
        }
        known.own = Some(own);
        self.apply_locked(&mut known).await
    }

    /// Takes the other hosts' gateway addresses (from the mesh); applies
    /// when they changed.
    pub async fn set_hosts(
        &self,
        mut hosts: Vec<std::net::Ipv4Addr>,
    ) -> anyhow::Result<Option<Duration>> {
        hosts.sort();
        hosts.dedup();
        let mut known = self.known.lock().await;
        if known.hosts == hosts {
            return Ok(None);
        }
        known.hosts = hosts;
        self.apply_locked(&mut known).await
    }

    /// Writes both tables again whole, even if unchanged (the resync: they
    /// are small, and someone may have changed or deleted them).
    pub async fn reapply(&self) -> anyhow::Result<Option<Duration>> {
        for family in crate::nft::FAMILIES {
            self.nft.invalidate_table(family, crate::nft::TABLE);
        }
        let mut known = self.known.lock().await;
        self.apply_locked(&mut known).await
    }

    /// Renders and applies; the time it took when something was applied.
    /// Anti-spoofing needs only this host's records; the policy also needs
    /// the policy and the listing of every source.
    async fn apply_locked(&self, known: &mut Known) -> anyhow::Result<Option<Duration>> {
        let started = Instant::now();
        // This host's records: the daemon's own view when it gave one (the
        // follower's listing may be older), else the follower's.
        let mut view = known.endpoints.clone();
        if let Some(own) = &known.own {
            view.retain(|_, r| r.host_id.as_str() != self.host_id);
            view.extend(own.iter().map(|(k, r)| (k.clone(), r.clone())));
        }
        let cluster: Vec<EndpointRecord> = view.into_values().collect();
        let local: Vec<EndpointRecord> = cluster
            .iter()
            .filter(|r| r.host_id.as_str() == self.host_id)
            .cloned()
            .collect();
        let compiled = match &known.policy {
            Some(policy) if known.listed => Some(compile(&PolicyInput {
                policy,
                cluster: &cluster,
                local: &local,
                cluster_range: self.cluster_range,
                block: self.block,
                hosts: &known.hosts,
            })),
            _ => None,
        };
        let desired = Desired {
            policy: compiled.as_ref().map(|c| c.table.clone()),
            // Anti-spoofing on this host's container ports, in the same
            // transaction, once they are known.
            spoof: (known.listed || known.local_known).then(|| crate::nft::spoof::render(&local)),
            services: None,
        };
        if desired == Desired::default() {
            // Neither table is known yet: the kernel keeps what it has.
            return Ok(None);
        }
        let nft = self.nft.clone();
        let outcome = tokio::task::spawn_blocking(move || nft.apply(&desired))
            .await
            .context("nft task")?
            .context("applying weft's nf_tables rules")?;
        let cut = match (&known.applied, &compiled) {
            (Some(old), Some(new)) => lost_reach(old, new),
            _ => Vec::new(),
        };
        if compiled.is_some() {
            known.applied = compiled;
        }
        if !cut.is_empty() {
            // Under the lock, before any later change is applied: a cut
            // that ran after a change allowing the pair again would delete
            // connections the policy allows (and a connection of a one-way
            // policy between two containers of this host, picked up again
            // in the other direction, would then be refused).
            let nft = self.nft.clone();
            let n = cut.len();
            match tokio::task::spawn_blocking(move || nft.cut(&cut)).await {
                Ok(Ok(deleted)) => {
                    tracing::info!(
                        pairs = n,
                        deleted,
                        "cut connections the policy no longer allows"
                    )
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "deleting conntrack entries failed"),
                Err(e) => tracing::warn!(error = %e, "conntrack task failed"),
            }
        }
        match outcome {
            ApplyOutcome::Unchanged => Ok(None),
            ApplyOutcome::Replaced | ApplyOutcome::Updated => {
                let took = started.elapsed();
                tracing::debug!(
                    took_ms = took.as_millis() as u64,
                    replaced = outcome == ApplyOutcome::Replaced,
                    endpoints = cluster.len(),
                    local = local.len(),
                    "policy applied"
                );
                Ok(Some(took))
            }
        }
    }
}

fn read_saved(path: &Path) -> anyhow::Result<Option<Policy>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let policy = crate::policy::decode(&path.display().to_string(), &bytes)?;
    Ok(Some(policy))
}

/// Writes `policy` to `path` atomically (temporary file, then rename).
fn save(path: &Path, policy: &Policy) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(policy)?;
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Follows the policy document and every endpoint record until `stop`
/// fires, handing each coalesced change to `enforcer`; `applied` is told
/// how long each apply that changed the kernel took.
pub async fn follow(
    enforcer: Arc<Enforcer>,
    store: DynStore,
    keys: Keys,
    mut stop: tokio::sync::watch::Receiver<bool>,
    applied: impl Fn(Duration),
) {
    let mut policies = Follower::new(store.clone(), keys.policy());
    let mut endpoints = Follower::new(store, keys.endpoints());
    let mut records: BTreeMap<String, EndpointRecord> = BTreeMap::new();
    let doc = keys.policy_doc();
    loop {
        let (mut new_policy, mut eps_changed) = (None, false);
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
                u = policies.next() => {
                    if let Some(p) = policy_update(&doc, u) {
                        new_policy = Some(p);
                    }
                }
                u = endpoints.next() => {
                    u.apply_to(&mut records, "endpoint record");
                    eps_changed = true;
                }
            }
            first.get_or_insert_with(Instant::now);
        }
        if new_policy.is_none() && !eps_changed {
            continue;
        }
        let eps = eps_changed.then(|| records.clone());
        let result = enforcer.update(new_policy, eps).await;
        match result {
            Ok(Some(took)) => applied(took),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "enforcing the policy failed; the resync retries")
            }
        }
    }
}

/// The policy after `u`: `Some` when the document changed (a deleted
/// document is the default policy); a bad document keeps the last one.
fn policy_update(doc: &str, u: Update) -> Option<Policy> {
    // Some(None): the document is gone (or was never stored).
    let latest: Option<Option<Vec<u8>>> = match u {
        Update::Snapshot(range) => Some(
            range
                .kvs
                .into_iter()
                .find(|kv| kv.key == doc)
                .map(|kv| kv.value),
        ),
        Update::Changes { events, .. } => {
            events
                .into_iter()
                .rfind(|ev| ev.kv.key == doc)
                .map(|ev| match ev.kind {
                    EventKind::Put => Some(ev.kv.value),
                    EventKind::Delete => None,
                })
        }
    };
    let value = latest?;
    match value {
        None => Some(Policy::default()),
        Some(bytes) => match crate::policy::decode(doc, &bytes) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "the stored policy is unusable; keeping the last one");
                None
            }
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use weft_model::Action;
    use weft_store::{Event, KeyValue, Range};

    fn kv(key: &str, value: &[u8]) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.to_vec(),
            create_revision: 1,
            mod_revision: 2,
            version: 1,
            lease: None,
        }
    }

    fn changes(events: Vec<(EventKind, KeyValue)>) -> Update {
        Update::Changes {
            events: events
                .into_iter()
                .map(|(kind, kv)| Event { kind, kv })
                .collect(),
            revision: 2,
        }
    }

    #[test]
    fn policy_updates_fail_closed() {
        let keys = Keys::default();
        let doc = keys.policy_doc();
        let deny = serde_json::to_vec(&Policy {
            default: Action::Deny,
            ..Policy::default()
        })
        .unwrap();
        let snap = |kvs| Update::Snapshot(Range { kvs, revision: 2 });
        // Listed without a document: none stored, the default applies.
        assert_eq!(policy_update(&doc, snap(vec![])), Some(Policy::default()));
        let got = policy_update(&doc, snap(vec![kv(&doc, &deny)])).unwrap();
        assert_eq!(got.default, Action::Deny);
        // Changes of other keys change nothing; a delete is the default.
        let other = format!("{}other", keys.policy());
        assert_eq!(
            policy_update(&doc, changes(vec![(EventKind::Put, kv(&other, b"x"))])),
            None
        );
        assert_eq!(
            policy_update(&doc, changes(vec![(EventKind::Delete, kv(&doc, b""))])),
            Some(Policy::default())
        );
        // The last change of the document wins; a bad document keeps the last
        // good one (None: no change).
        let last = changes(vec![
            (EventKind::Delete, kv(&doc, b"")),
            (EventKind::Put, kv(&doc, &deny)),
        ]);
        assert_eq!(policy_update(&doc, last).unwrap().default, Action::Deny);
        assert_eq!(
            policy_update(&doc, changes(vec![(EventKind::Put, kv(&doc, b"{nope"))])),
            None
        );
    }

    #[test]
    fn the_last_policy_survives_in_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(POLICY_FILE);
        assert!(read_saved(&path).unwrap().is_none());
        let p = Policy {
            default: Action::Deny,
            ..Policy::default()
        };
        save(&path, &p).unwrap();
        assert_eq!(read_saved(&path).unwrap(), Some(p));
        std::fs::write(&path, b"{broken").unwrap();
        assert!(read_saved(&path).is_err());
        // An enforcer started on a broken file knows no policy (and leaves the
        // kernel's table as it is) rather than failing or opening up.
        let e = Enforcer::new(
            Nft::new(),
            "h0",
            "10.42.0.0/16".parse().unwrap(),
            "10.42.0.0/24".parse().unwrap(),
            dir.path(),
        );
        assert!(e.known.try_lock().unwrap().policy.is_none());
    }
}
