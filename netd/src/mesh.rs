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
/// and calls `apply` with the full set of host records after every snapshot
/// and every batch of changes. Survives store outages: keeps the last state.
pub async fn follow<F, Fut>(
    store: DynStore,
    hosts_prefix: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut apply: F,
) where
    F: FnMut(BTreeMap<String, HostRecord>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut follower = Follower::new(store, hosts_prefix.clone());
    let mut hosts = BTreeMap::new();
    loop {
        let update = tokio::select! {
            _ = stop.changed() => return,
            update = follower.next() => update,
        };
        match update {
            Update::Snapshot(listed) => {
                hosts.clear();
                for kv in &listed.kvs {
                    insert_record(&mut hosts, &hosts_prefix, &kv.key, &kv.value);
                }
            }
            Update::Changes { events, .. } => {
                for ev in events {
                    match ev.kind {
                        EventKind::Put => {
                            insert_record(&mut hosts, &hosts_prefix, &ev.kv.key, &ev.kv.value)
                        }
                        EventKind::Delete => {
                            if let Some(id) = ev.kv.key.strip_prefix(&hosts_prefix) {
                                if hosts.remove(id).is_some() {
                                    tracing::info!(host = %id, "host left (lease expired or removed)");
                                }
                            }
                        }
                    }
                }
            }
        }
        apply(hosts.clone()).await;
    }
}

fn insert_record(hosts: &mut BTreeMap<String, HostRecord>, prefix: &str, key: &str, value: &[u8]) {
    let Some(id) = key.strip_prefix(prefix) else {
        return;
    };
    match serde_json::from_slice::<HostRecord>(value) {
        Ok(r) if r.host_id == id => {
            if hosts.insert(id.to_owned(), r.clone()).as_ref() != Some(&r) {
                tracing::info!(host = %id, underlay = %r.underlay, block = %r.block, "host joined or changed");
            }
        }
        Ok(r) => {
            tracing::warn!(key, record_host = %r.host_id, "host record under the wrong key; ignored")
        }
        Err(e) => tracing::warn!(key, error = %e, "unreadable host record; ignored"),
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
