//! Membership: every netd registers its host in the store under a lease
//! (`<prefix>hosts/<host id>`, kept alive while netd runs) and watches the
//! hosts prefix; [`desired_peers`] turns the records into the peers the
//! tunnel driver ([`crate::tunnel`]) reconciles the data plane to.
//!
//! Losing the store never touches the data path: peers stay as they are
//! until the store answers again. A clean netd stop does not revoke the
//! lease, so a restart is invisible to the other hosts.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use weft_store::{DynStore, EventKind, Follower, LeaseId, StoreError, Update};

/// The host record and the backend it names are weft-model's (the store
/// format); this module keeps them in the store and follows them.
pub use weft_model::{HostRecord, TunnelBackend};

/// A peer as the data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub host_id: String,
    pub underlay: Ipv4Addr,
    pub block: Ipv4Network,
    pub wg_public_key: Option<[u8; 32]>,
    /// The WireGuard key the host announced it will switch to (key
    /// rotation, [`crate::tunnel::Wireguard::rotate`]).
    pub wg_next_key: Option<[u8; 32]>,
    pub wg_port: u16,
    pub vtep_mac: Option<[u8; 6]>,
}

/// The peers `me` should have: every other host on the same backend, with a
/// block of its own. Hosts on another backend, or whose records are
/// unusable, are left out (and named in the log by the caller).
pub fn desired_peers(
    me: &HostRecord,
    hosts: &BTreeMap<String, HostRecord>,
) -> (Vec<Peer>, Vec<String>) {
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    for h in hosts.values() {
        if h.host_id == me.host_id {
            continue;
        }
        let usable = h.backend == me.backend
            && h.block != me.block
            && match me.backend {
                TunnelBackend::Wireguard => h.wg_public_key.is_some(),
                TunnelBackend::Vxlan => parse_mac(&h.vtep_mac).is_some() && h.vni == me.vni,
            };
        if !usable {
            skipped.push(h.host_id.to_string());
            continue;
        }
        peers.push(Peer {
            host_id: h.host_id.to_string(),
            underlay: h.underlay,
            block: h.block,
            wg_public_key: h.wg_public_key.map(|k| k.to_bytes()),
            wg_next_key: h.wg_next_key.map(|k| k.to_bytes()),
            wg_port: h.wg_port,
            vtep_mac: parse_mac(&h.vtep_mac),
        });
    }
    (peers, skipped)
}

/// A stable, locally administered MAC for the host's VTEP, derived from its
/// host id, so a re-created device keeps its address.
pub fn vtep_mac(host_id: &str) -> [u8; 6] {
    // FNV-1a, stable across Rust versions (unlike DefaultHasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [0x02, b[1], b[2], b[3], b[4], b[5]]
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Keeps this host's record in the store under a lease until `stop` fires,
/// re-writing it whenever `record` changes (roaming). Re-registers when the
/// lease was lost (store outage longer than the TTL); store errors only
/// delay, never stop, the loop.
pub async fn register(
    store: DynStore,
    key: String,
    mut record: tokio::sync::watch::Receiver<Option<HostRecord>>,
    ttl: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let encode = |r: &Option<HostRecord>| r.as_ref().and_then(|r| serde_json::to_vec(r).ok());
    let mut backoff = Duration::from_millis(200);
    loop {
        let current = encode(&record.borrow_and_update());
        let Some(value) = current else {
            tracing::error!("no host record to publish");
            return;
        };
        let lease: Result<LeaseId, StoreError> = async {
            let lease = store.lease_grant(ttl).await?;
            store.put(&key, &value, Some(lease)).await?;
            Ok(lease)
        }
        .await;
        let lease = match lease {
            Ok(l) => {
                tracing::info!(key = %key, ttl_s = ttl.as_secs_f32(), "host registered");
                backoff = Duration::from_millis(200);
                l
            }
            Err(e) => {
                tracing::warn!(error = %e, "registering the host failed; retrying");
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(200)));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                changed = record.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Re-publish under the same lease.
                    let current = encode(&record.borrow_and_update());
                    if let Some(value) = current {
                        if let Err(e) = store.put(&key, &value, Some(lease)).await {
                            tracing::warn!(error = %e, "updating the host record failed; re-registering");
                            break;
                        }
                        tracing::info!(key = %key, "host record updated");
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            match store.lease_keep_alive(lease).await {
                Ok(()) => {}
                Err(StoreError::LeaseNotFound { .. }) => {
                    tracing::warn!(
                        "host lease expired (store was unreachable too long); registering again"
                    );
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "keeping the host lease alive failed; retrying")
                }
            }
        }
    }
}

/// Follows the hosts prefix `hosts_prefix` ([`weft_model::Keys::hosts`]) with
/// a [`Follower`] (list, then watch; relist after an outage or compaction)
/// and calls `apply` with the full set of host records. Survives store
/// outages: keeps the last state.
///
/// Coalesced: the follower keeps reading while `apply` runs, and what
/// arrives meanwhile is folded into the next call, which gets the latest
/// set (never a queue of stale ones). A burst of any number of joins costs
/// one call for the first batch and one for everything after it, not one
/// per batch.
///
/// `apply` returns whether it succeeded; after a failure it is called
/// again with the latest set after [`RETRY_MIN`], doubling up to
/// [`RETRY_MAX`] while it keeps failing, even if nothing changes.
pub async fn follow<F, Fut>(
    store: DynStore,
    hosts_prefix: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut apply: F,
) where
    F: FnMut(BTreeMap<String, HostRecord>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut follower = Follower::new(store, hosts_prefix.clone());
    let mut hosts = BTreeMap::new();
    // Changes not yet handed to `apply`, the call running, and when to
    // call again after a failure.
    let mut dirty = false;
    let mut running: Option<std::pin::Pin<Box<Fut>>> = None;
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        let retry_at = retry.map(|(at, _)| at);
        tokio::select! {
            _ = stop.changed() => return,
            _ = async {
                if let Some(at) = retry_at {
                    tokio::time::sleep_until(at).await
                }
            }, if retry_at.is_some() && running.is_none() => {
                dirty = true;
            }
            // Cancel-safe: a batch interrupted by the apply finishing is
            // handed over by the next call.
            update = follower.next() => {
                fold(&mut hosts, &hosts_prefix, update);
                dirty = true;
            }
            ok = async {
                match running.as_mut() {
                    Some(call) => call.await,
                    None => true,
                }
            }, if running.is_some() => {
                running = None;
                retry = if ok {
                    None
                } else {
                    let wait = retry.map_or(RETRY_MIN, |(_, w)| (w * 2).min(RETRY_MAX));
                    Some((tokio::time::Instant::now() + wait, wait))
                };
            }
        }
        if dirty && running.is_none() {
            dirty = false;
            running = Some(Box::pin(apply(hosts.clone())));
        }
    }
}

/// What a [`Follower`] update does to the hosts: one line per host that
/// joined, changed or left while they are few; a count beyond
/// [`LOG_EACH`] (a cluster starting, a partition healing).
fn fold(hosts: &mut BTreeMap<String, HostRecord>, prefix: &str, update: Update) {
    let listing = matches!(update, Update::Snapshot(_));
    let before = if listing { Some(hosts.clone()) } else { None };
    let mut changed = Vec::new();
    let mut left = Vec::new();
    match update {
        Update::Snapshot(listed) => {
            hosts.clear();
            for kv in &listed.kvs {
                insert_record(hosts, prefix, &kv.key, &kv.value);
            }
        }
        Update::Changes { events, .. } => {
            for ev in events {
                match ev.kind {
                    EventKind::Put => {
                        if let Some(id) = insert_record(hosts, prefix, &ev.kv.key, &ev.kv.value) {
                            changed.push(id);
                        }
                    }
                    EventKind::Delete => {
                        if let Some(id) = ev.kv.key.strip_prefix(prefix) {
                            if hosts.remove(id).is_some() {
                                left.push(id.to_owned());
                            }
                        }
                    }
                }
            }
        }
    }
    if let Some(before) = before {
        changed = hosts
            .iter()
            .filter(|(id, r)| before.get(*id) != Some(r))
            .map(|(id, _)| id.clone())
            .collect();
        left = before
            .keys()
            .filter(|id| !hosts.contains_key(*id))
            .cloned()
            .collect();
    }
    if changed.len() + left.len() <= LOG_EACH {
        for id in &changed {
            if let Some(r) = hosts.get(id) {
                tracing::info!(host = %id, underlay = %r.underlay, block = %r.block, "host joined or changed");
            }
        }
        for id in &left {
            tracing::info!(host = %id, "host left (lease expired or removed)");
        }
    } else {
        tracing::info!(
            joined_or_changed = changed.len(),
            left = left.len(),
            hosts = hosts.len(),
            listing,
            "hosts changed"
        );
    }
}

/// First wait before a failed apply is tried again; doubles up to
/// [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest wait between tries of a failing apply.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// Hosts logged one by one (or named) in a line about many hosts; more are
/// counted.
pub(crate) const LOG_EACH: usize = 8;

/// Sets the record under `key` if it is a host's record; returns the host
/// id when that changed what was there.
fn insert_record(
    hosts: &mut BTreeMap<String, HostRecord>,
    prefix: &str,
    key: &str,
    value: &[u8],
) -> Option<String> {
    let id = key.strip_prefix(prefix)?;
    match serde_json::from_slice::<HostRecord>(value) {
        Ok(r) if r.host_id == id => {
            (hosts.insert(id.to_owned(), r.clone()).as_ref() != Some(&r)).then(|| id.to_owned())
        }
        Ok(r) => {
            tracing::warn!(key, record_host = %r.host_id, "host record under the wrong key; ignored");
            None
        }
        Err(e) => {
            tracing::warn!(key, error = %e, "unreadable host record; ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, third: u8, backend: TunnelBackend) -> HostRecord {
        HostRecord {
            host_id: id.parse().unwrap(),
            underlay: Ipv4Addr::new(192, 168, 77, 10 + third),
            block: Ipv4Network::new(Ipv4Addr::new(10, 42, third, 0), 24).unwrap(),
            backend,
            wg_public_key: Some(weft_model::WgKey::from_bytes([third; 32])),
            wg_next_key: None,
            wg_port: 51820,
            vtep_mac: format_mac(&vtep_mac(id)),
            vxlan_port: 4789,
            vni: 42,
            mtu: 1440,
            version: "test".into(),
        }
    }

    #[test]
    fn peers_are_the_other_hosts_on_the_same_backend() {
        let me = rec("a", 0, TunnelBackend::Vxlan);
        let mut hosts = BTreeMap::new();
        for r in [
            me.clone(),
            rec("b", 1, TunnelBackend::Vxlan),
            rec("c", 2, TunnelBackend::Wireguard),
        ] {
            hosts.insert(r.host_id.to_string(), r);
        }
        let mut bad = rec("d", 3, TunnelBackend::Vxlan);
        bad.vtep_mac = "zz".into();
        hosts.insert("d".into(), bad);
        let (peers, skipped) = desired_peers(&me, &hosts);
        assert_eq!(
            peers.iter().map(|p| p.host_id.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(skipped, ["c", "d"]);
        // Routes and VTEP entries from these peers: tunnel.rs's tests.
        assert_eq!(peers[0].underlay, Ipv4Addr::new(192, 168, 77, 11));
        assert_eq!(peers[0].vtep_mac, Some(vtep_mac("b")));
    }

    #[test]
    fn a_wireguard_peer_carries_its_announced_next_key() {
        let me = rec("a", 0, TunnelBackend::Wireguard);
        let mut b = rec("b", 1, TunnelBackend::Wireguard);
        b.wg_next_key = Some(weft_model::WgKey::from_bytes([9; 32]));
        let hosts = BTreeMap::from([("a".into(), me.clone()), ("b".into(), b)]);
        let (peers, skipped) = desired_peers(&me, &hosts);
        assert!(skipped.is_empty());
        assert_eq!(peers[0].wg_public_key, Some([1; 32]));
        assert_eq!(peers[0].wg_next_key, Some([9; 32]));
    }

    /// A burst of joins while `apply` is slow costs a bounded number of
    /// calls, and the last one has every host.
    #[tokio::test]
    async fn a_burst_of_joins_is_folded_into_few_applies() {
        use std::sync::{Arc, Mutex};
        let ts = weft_store::testing::TestStore::sqlite().await;
        let store = ts.store();
        let prefix = "/t/hosts/".to_string();
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let calls: Arc<Mutex<Vec<usize>>> = Arc::default();
        let seen = calls.clone();
        let follow = tokio::spawn(follow(store.clone(), prefix.clone(), stop, move |hosts| {
            seen.lock().unwrap().push(hosts.len());
            // A slow data-plane update: everything written meanwhile must
            // be folded into the next call.
            async {
                tokio::time::sleep(std::time::Duration::from_millis(150)).await;
                true
            }
        }));
        const HOSTS: usize = 300;
        for i in 0..HOSTS {
            let id = format!("h{i}");
            let mut r = rec(&id, 0, TunnelBackend::Wireguard);
            r.block = Ipv4Network::new(Ipv4Addr::from(0x0a40_0000 + 64 * i as u32), 26).unwrap();
            let value = serde_json::to_vec(&r).unwrap();
            store
                .put(&format!("{prefix}{id}"), &value, None)
                .await
                .unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while calls.lock().unwrap().last() != Some(&HOSTS) {
            assert!(
                std::time::Instant::now() < deadline,
                "never applied all: {:?}",
                calls.lock().unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let n = calls.lock().unwrap().len();
        // The listing, and then a handful however many batches came.
        assert!(
            n <= 12,
            "{n} applies for {HOSTS} joins: {:?}",
            calls.lock().unwrap()
        );
        // Nothing changes: no more calls.
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        assert_eq!(calls.lock().unwrap().len(), n);
        // One leave after the burst: one call without it.
        store.delete(&format!("{prefix}h7")).await.unwrap();
        while calls.lock().unwrap().last() != Some(&(HOSTS - 1)) {
            assert!(
                std::time::Instant::now() < deadline,
                "the leave never reached apply"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        stop_tx.send(true).unwrap();
        follow.await.unwrap();
    }

    #[test]
    fn a_listing_reports_only_what_changed() {
        let mut hosts = BTreeMap::new();
        let a = rec("a", 1, TunnelBackend::Vxlan);
        let kv = |r: &HostRecord| weft_store::KeyValue {
            key: format!("p/{}", r.host_id),
            value: serde_json::to_vec(r).unwrap(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: None,
        };
        let listing = |kvs| Update::Snapshot(weft_store::Range { kvs, revision: 3 });
        fold(&mut hosts, "p/", listing(vec![kv(&a)]));
        assert_eq!(hosts.len(), 1);
        // A relist without `a` and with garbage under a host key: `a` left.
        let mut bad = kv(&rec("b", 2, TunnelBackend::Vxlan));
        bad.value = b"{".to_vec();
        fold(&mut hosts, "p/", listing(vec![bad]));
        assert!(hosts.is_empty());
        assert_eq!(
            insert_record(&mut hosts, "p/", "p/a", &kv(&a).value),
            Some("a".into())
        );
        assert_eq!(
            insert_record(&mut hosts, "p/", "p/a", &kv(&a).value),
            None,
            "unchanged"
        );
        assert_eq!(
            insert_record(&mut hosts, "p/", "p/x", &kv(&a).value),
            None,
            "wrong key"
        );
    }

    #[test]
    fn macs_round_trip() {
        let mac = vtep_mac("host-1");
        assert_eq!(mac[0], 0x02, "locally administered unicast");
        assert_eq!(vtep_mac("host-1"), mac, "stable");
        assert_ne!(vtep_mac("host-2"), mac);
        assert_eq!(parse_mac(&format_mac(&mac)), Some(mac));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
    }

    #[test]
    fn backend_names() {
        assert_eq!("vxlan".parse::<TunnelBackend>(), Ok(TunnelBackend::Vxlan));
    }
}
