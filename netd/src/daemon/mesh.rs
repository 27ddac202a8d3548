//! The daemon's mesh wiring: this host's record ([`Daemon::host_record`],
//! kept in the store by [`crate::mesh::register`]), the hosts follower to
//! the tunnel driver ([`Daemon::run_mesh`], [`Daemon::apply_mesh`]), the
//! underlay check, WireGuard key rotation ([`Daemon::rotate_key`]) and the
//! peers for the API and metrics.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use weft_api::ApiError;
use weft_model::WgKey;

use super::Daemon;
use crate::host::Link;
use crate::mesh::{HostRecord, Peer};

/// How long a key rotation waits for the store to take the announcement of
/// the next key before it abandons the rotation.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(5);

impl Daemon {
    /// What this host publishes in the store.
    pub fn host_record(&self) -> HostRecord {
        HostRecord {
            host_id: self.host_id.clone(),
            underlay: self.underlay().1,
            block: self.block.block,
            backend: self.cfg.mesh.backend,
            wg_public_key: self.tunnel.wg_public_key(),
            wg_next_key: self.tunnel.wg_next_key(),
            wg_port: self
                .tunnel
                .wg()
                .map_or(self.cfg.mesh.wg_port, |d| d.listen_port()),
            vtep_mac: crate::mesh::format_mac(&crate::mesh::vtep_mac(&self.host_id)),
            vxlan_port: self.cfg.mesh.vxlan_port,
            vni: self.cfg.mesh.vni,
            mtu: self.mtu,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    pub(super) fn underlay(&self) -> (Link, Ipv4Addr) {
        self.underlay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-detects the underlay address; on a change, updates the published
    /// record and the data plane in place.
    pub(super) async fn check_underlay(&self) -> anyhow::Result<()> {
        let found = self.net.underlay(self.cfg.mesh.underlay_addr).await?;
        let Some((link, addr)) = found else {
            return Ok(());
        };
        let (old_link, old_addr) = self.underlay();
        if addr == old_addr && link.index == old_link.index {
            return Ok(());
        }
        tracing::info!(from = %old_addr, to = %addr, interface = %link.name, "underlay address changed");
        *self.underlay.lock().unwrap_or_else(|p| p.into_inner()) = (link, addr);
        self.record.send_replace(Some(self.host_record()));
        self.apply_mesh(None, true).await
    }

    /// Registers this host and follows the others until `stop` fires.
    pub async fn run_mesh(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        self.record.send_replace(Some(self.host_record()));
        let register = tokio::spawn(crate::mesh::register(
            self.store.clone(),
            self.cfg.keys.host(&self.host_id),
            self.record.subscribe(),
            self.cfg.mesh.host_ttl,
            stop.clone(),
        ));
        let me = self.clone();
        crate::mesh::follow(self.store.clone(), self.cfg.keys.hosts(), stop, move |hosts| {
            let me = me.clone();
            async move {
                match me.apply_mesh(Some(hosts), false).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "updating the tunnel peers failed; retrying, reading the kernel");
                        false
                    }
                }
            }
        })
        .await;
        let _ = register.await;
    }

    /// Brings the tunnel device, its peers and routes in line with the host
    /// records (`None`: with the last ones seen). The kernel's routes and
    /// entries change by the difference from the last apply; with `resync`
    /// (the periodic reconcile, an underlay change) they are read and
    /// compared ([`crate::tunnel::Tunnel::apply`]).
    pub async fn apply_mesh(
        &self,
        hosts: Option<BTreeMap<String, HostRecord>>,
        resync: bool,
    ) -> anyhow::Result<()> {
        let result = self.apply_mesh_once(hosts, resync).await;
        self.counters.reconciled("mesh", result.is_ok());
        result
    }

    async fn apply_mesh_once(
        &self,
        hosts: Option<BTreeMap<String, HostRecord>>,
        resync: bool,
    ) -> anyhow::Result<()> {
        let mut known = self.mesh.lock().await;
        if let Some(h) = hosts {
            *known = Some(h);
        }
        let Some(known) = known.as_ref() else {
            // The hosts were never listed: leave the kernel as it is.
            return Ok(());
        };
        let me = self.host_record();
        let (peers, skipped) = crate::mesh::desired_peers(&me, known);
        self.note_left_out(skipped, me.backend);
        self.tunnel
            .apply(
                &self.net,
                &self.underlay(),
                self.block.gateway,
                &peers,
                resync,
            )
            .await?;
        // What the other hosts send themselves (from their gateway) is not
        // subject to policy.
        let gateways = peers
            .iter()
            .map(|p| weft_ipam::plan::gateway(p.block))
            .collect();
        match self.enforcer.set_hosts(gateways).await {
            Ok(took) => self.counters.policy_applied(took),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "updating the policy's host addresses failed; the resync retries")
            }
        }
        let mut current = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if *current != peers {
            tracing::info!(peers = peers.len(), "tunnel peers updated");
            *current = peers;
        }
        Ok(())
    }

    /// Logs the hosts left out of the mesh when that list changes (not on
    /// every reconcile): at most the first few by name, and how many.
    fn note_left_out(&self, skipped: Vec<String>, backend: crate::mesh::TunnelBackend) {
        let mut last = self.left_out.lock().unwrap_or_else(|p| p.into_inner());
        if *last == skipped {
            return;
        }
        if skipped.is_empty() {
            tracing::info!("no host is left out of the mesh any more");
        } else {
            tracing::warn!(
                count = skipped.len(),
                hosts = ?&skipped[..skipped.len().min(crate::mesh::LOG_EACH)],
                backend = backend.as_str(),
                "hosts left out of the mesh: other backend, same block or unusable record"
            );
        }
        *last = skipped;
    }

    /// Rotates the WireGuard key without dropping traffic (`netd
    /// rotate-key`, and every `wireguard.rotate_interval_secs`): announces
    /// a new key in this host's record, waits `wireguard.rotate_settle_ms`
    /// for the peers to read it, switches the data path to it and publishes
    /// it as the key ([`crate::tunnel::Wireguard`]).
    pub async fn rotate_key(&self) -> Result<weft_api::KeyRotation, ApiError> {
        let Some(wg) = self.tunnel.wireguard() else {
            return Err(ApiError::new(
                weft_api::ErrorKind::InvalidRequest,
                "this host uses the vxlan backend: there is no key to rotate",
            ));
        };
        let Some(_one) = wg.try_begin_rotation() else {
            return Err(ApiError::new(
                weft_api::ErrorKind::Conflict,
                "a key rotation is already under way",
            ));
        };
        let internal = |e: anyhow::Error| {
            tracing::error!(error = %format!("{e:#}"), "rotating the WireGuard key failed");
            ApiError::new(weft_api::ErrorKind::Internal, format!("{e:#}"))
        };
        let next = wg.announce().map_err(internal)?;
        self.record.send_replace(Some(self.host_record()));
        // Switch only once the store has the announcement: a peer that never
        // saw the next key refuses handshakes made with it, so switching
        // during a store outage would cut this host off until the store is
        // back. The settle time counts from the confirmed write.
        if let Err(why) = self.announced_in_store(next).await {
            if let Err(e) = wg.abandon() {
                tracing::warn!(error = %format!("{e:#}"), "abandoning the key rotation");
            }
            self.record.send_replace(Some(self.host_record()));
            tracing::warn!(%why, "key rotation abandoned: the key in use stays");
            return Err(ApiError::new(
                weft_api::ErrorKind::TryAgainLater,
                format!("the next key's announcement did not reach the store ({why}); rotation abandoned, the key in use stays: retry when the store is up"),
            ));
        }
        tokio::time::sleep(self.cfg.rotation.settle).await;
        let (old, new) = wg.switch().map_err(internal)?;
        self.record.send_replace(Some(self.host_record()));
        tracing::info!(%old, %new, "WireGuard key rotated");
        Ok(weft_api::KeyRotation {
            old_public_key: old.to_string(),
            new_public_key: new.to_string(),
        })
    }

    /// Waits until this host's record in the store announces `next` as its
    /// next key (the registration loop writes it), for at most
    /// [`ANNOUNCE_TIMEOUT`].
    async fn announced_in_store(&self, next: WgKey) -> Result<(), String> {
        let key = self.cfg.keys.host(&self.host_id);
        let deadline = tokio::time::Instant::now() + ANNOUNCE_TIMEOUT;
        loop {
            let last = match self.store.get(&key).await {
                Ok(Some(kv)) => match serde_json::from_slice::<HostRecord>(&kv.value) {
                    Ok(r) if r.wg_next_key == Some(next) => return Ok(()),
                    Ok(_) => "not written yet".to_string(),
                    Err(e) => format!("this host's record does not parse: {e}"),
                },
                Ok(None) => "this host's record is missing".to_string(),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("{last} after {} s", ANNOUNCE_TIMEOUT.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Rotates the WireGuard key every `wireguard.rotate_interval_secs`
    /// until `stop` fires (nothing when that is 0, or on VXLAN).
    pub async fn run_key_rotation(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let (Some(every), Some(_)) = (self.cfg.rotation.interval, self.tunnel.wireguard()) else {
            return;
        };
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {
                    if let Err(e) = self.rotate_key().await {
                        tracing::warn!(error = %e.message, "automatic WireGuard key rotation failed; next try in one interval");
                    }
                }
            }
        }
    }

    /// The peers for the API and CLI.
    pub fn peer_info(&self) -> Vec<weft_api::PeerInfo> {
        let stats = self.tunnel.peer_stats();
        let stats = crate::tunnel::stats_by_key(&stats);
        self.peers()
            .into_iter()
            .map(|p| {
                let s = p.wg_public_key.and_then(|k| stats.get(&k).copied());
                weft_api::PeerInfo {
                    host_id: p.host_id,
                    underlay: p.underlay,
                    block: p.block,
                    backend: self.cfg.mesh.backend.as_str().to_owned(),
                    handshake_age_secs: s.and_then(|s| s.last_handshake).map(|d| d.as_secs()),
                    rx_bytes: s.map_or(0, |s| s.rx_bytes),
                    tx_bytes: s.map_or(0, |s| s.tx_bytes),
                }
            })
            .collect()
    }

    /// The peers the data plane has now.
    pub fn peers(&self) -> Vec<Peer> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
