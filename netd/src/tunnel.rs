//! The tunnel between hosts: one driver per backend.
//!
//! * [`Wireguard`]: weft's userspace WireGuard ([`weft_wg`]) on the TUN
//!   device [`WG_DEVICE`]; encrypted. Peers by public key; routes to the peer
//!   blocks go straight into the TUN.
//! * [`Vxlan`]: the kernel's VXLAN device [`VXLAN_DEVICE`]; plain, for
//!   trusted networks. Per peer a permanent neighbour and FDB entry; routes
//!   go via the peer block's network address (onlink).
//!
//! Each driver owns its device name and its encapsulation overhead, and with
//! it the overlay MTU ([`overlay_mtu`], on the one rule in
//! [`weft_model::mtu`]). [`Tunnel::apply`] brings the device, its peers and
//! the routes in line with the peers the membership ([`crate::mesh`]) found.
//!
//! WireGuard's key rotates in two steps the daemon publishes between
//! ([`Wireguard::announce`], then [`Wireguard::switch`];
//! `Daemon::rotate_key` runs them): peers learn the next key from the host
//! record before this host switches to it, so no handshake is refused.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use weft_model::mtu::MtuError;
use weft_model::WgKey;
use weft_wg::{KeyPair, PeerStats, WgDevice};

use crate::host::{HostNet, Link, PeerRoute, VtepPeer, VxlanSpec};
use crate::mesh::{Peer, TunnelBackend};

/// The WireGuard TUN device.
pub const WG_DEVICE: &str = "weft-wg";
/// Persistent keepalive towards every WireGuard peer (keeps NAT mappings
/// open).
pub const WG_KEEPALIVE_SECS: u16 = 25;
/// WireGuard's encapsulation on an IPv4 underlay (weft-wg's wire format
/// is checked against it).
pub const WIREGUARD_OVERHEAD: u32 = weft_model::mtu::WIREGUARD_OVERHEAD;
/// A WireGuard peer without a handshake for this long is down (the
/// protocol's REJECT_AFTER_TIME: its session no longer carries data).
pub const PEER_DOWN_AFTER: Duration = Duration::from_secs(180);

/// The VXLAN device.
pub const VXLAN_DEVICE: &str = "weft-vxlan";
/// VXLAN's encapsulation on an IPv4 underlay.
pub const VXLAN_OVERHEAD: u32 = weft_model::mtu::VXLAN_OVERHEAD;

/// Bytes of encapsulation the backend adds on an IPv4 underlay.
pub fn overhead(backend: TunnelBackend) -> u32 {
    match backend {
        TunnelBackend::Wireguard => WIREGUARD_OVERHEAD,
        TunnelBackend::Vxlan => VXLAN_OVERHEAD,
    }
}

/// The backend's tunnel device.
pub fn device(backend: TunnelBackend) -> &'static str {
    match backend {
        TunnelBackend::Wireguard => WG_DEVICE,
        TunnelBackend::Vxlan => VXLAN_DEVICE,
    }
}

/// The overlay MTU on an underlay of `underlay_mtu` (the one computation:
/// bridge, container interfaces and tunnel device all follow it unless an
/// MTU is configured).
pub fn overlay_mtu(backend: TunnelBackend, underlay_mtu: u32) -> u32 {
    weft_model::mtu::overlay_mtu(underlay_mtu, overhead(backend))
}

/// Checks a configured overlay MTU against what the backend can carry.
pub fn check_mtu(backend: TunnelBackend, mtu: u32) -> Result<(), MtuError> {
    weft_model::mtu::check_mtu(mtu, overhead(backend))
}

/// What starting a tunnel needs (plain settings, from the configuration).
#[derive(Debug, Clone)]
pub struct TunnelSpec<'a> {
    pub backend: TunnelBackend,
    /// Where the WireGuard key is kept.
    pub state_dir: &'a Path,
    /// WireGuard's UDP port (0: any free port).
    pub wg_port: u16,
    /// WireGuard data-path workers per direction (0: one per CPU, at most 4).
    pub wg_queues: usize,
    pub vxlan_port: u16,
    pub vni: u32,
    /// This host's VTEP MAC ([`crate::mesh::vtep_mac`]).
    pub vtep_mac: [u8; 6],
    /// The overlay MTU.
    pub mtu: u32,
}

/// The running tunnel of this host.
#[derive(Debug)]
// One per process: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Tunnel {
    Wireguard(Wireguard),
    Vxlan(Vxlan),
}

/// The WireGuard driver: the data path runs from start.
#[derive(Debug)]
pub struct Wireguard {
    device: WgDevice,
    /// Where the key files are.
    state_dir: PathBuf,
    /// The announced next key while a rotation is under way.
    next: Mutex<Option<KeyPair>>,
    /// One rotation at a time.
    rotating: tokio::sync::Mutex<()>,
    applied: Mutex<Option<Applied>>,
    /// The peers last handed to the data path (the periodic reconcile
    /// does not rebuild its table when nothing changed).
    peers: Mutex<Vec<(weft_wg::WgPeer, Option<[u8; 32]>)>>,
}

/// The VXLAN driver: the kernel device is made (and re-made when the
/// underlay changes) by [`Tunnel::apply`].
#[derive(Debug)]
pub struct Vxlan {
    vni: u32,
    port: u16,
    mac: [u8; 6],
    applied: Mutex<Option<Applied>>,
}

impl Tunnel {
    /// Starts the backend's data path: WireGuard loads (or makes) the key
    /// and starts the device; VXLAN waits for [`Tunnel::apply`].
    pub fn start(spec: &TunnelSpec<'_>) -> anyhow::Result<Tunnel> {
        match spec.backend {
            TunnelBackend::Wireguard => Wireguard::start(spec).map(Tunnel::Wireguard),
            TunnelBackend::Vxlan => Ok(Tunnel::Vxlan(Vxlan {
                vni: spec.vni,
                port: spec.vxlan_port,
                mac: spec.vtep_mac,
                applied: Mutex::new(None),
            })),
        }
    }

    pub fn backend(&self) -> TunnelBackend {
        match self {
            Tunnel::Wireguard(_) => TunnelBackend::Wireguard,
            Tunnel::Vxlan(_) => TunnelBackend::Vxlan,
        }
    }

    /// The tunnel device's name.
    pub fn device(&self) -> &'static str {
        device(self.backend())
    }

    /// The WireGuard data path (wireguard backend only).
    pub fn wg(&self) -> Option<&WgDevice> {
        match self {
            Tunnel::Wireguard(w) => Some(&w.device),
            Tunnel::Vxlan(_) => None,
        }
    }

    /// The WireGuard driver (wireguard backend only).
    pub fn wireguard(&self) -> Option<&Wireguard> {
        match self {
            Tunnel::Wireguard(w) => Some(w),
            Tunnel::Vxlan(_) => None,
        }
    }

    /// The WireGuard public key in use (wireguard backend only; published
    /// in the host record).
    pub fn wg_public_key(&self) -> Option<WgKey> {
        self.wireguard().map(Wireguard::public_key)
    }

    /// The announced next WireGuard key, during a rotation.
    pub fn wg_next_key(&self) -> Option<WgKey> {
        self.wireguard().and_then(Wireguard::next_key)
    }

    /// The per-peer counters of the data path (empty for VXLAN: the kernel
    /// keeps none per peer).
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.wg().map(WgDevice::stats).unwrap_or_default()
    }

    /// Whether the tunnel to a peer is up, given its counters. VXLAN has no
    /// liveness of its own: a peer is up while its host record is alive in
    /// the store. WireGuard: a handshake within [`PEER_DOWN_AFTER`].
    pub fn peer_up(&self, stats: Option<&PeerStats>) -> bool {
        match self {
            Tunnel::Vxlan(_) => true,
            Tunnel::Wireguard(_) => handshake_recent(stats),
        }
    }

    /// Brings the device, its peers and the routes to the peer blocks in
    /// line with `peers`. `underlay` is the current underlay interface and
    /// address; `gateway` this host's block gateway (the routes' source).
    ///
    /// Routes and VXLAN entries change by the difference from what the last
    /// successful apply left ([`Plan`]); with `resync`, after an error or
    /// before anything was applied, the kernel is read and compared
    /// instead, which also undoes other tools' changes.
    pub async fn apply(
        &self,
        net: &HostNet,
        underlay: &(Link, Ipv4Addr),
        gateway: Ipv4Addr,
        peers: &[Peer],
        resync: bool,
    ) -> anyhow::Result<()> {
        match self {
            Tunnel::Wireguard(w) => w.apply(net, gateway, peers, resync).await,
            Tunnel::Vxlan(v) => v.apply(net, underlay, gateway, peers, resync).await,
        }
    }
}

impl Wireguard {
    fn start(spec: &TunnelSpec<'_>) -> anyhow::Result<Wireguard> {
        let keys =
            weft_wg::load_or_create_key(spec.state_dir).context("loading the WireGuard key")?;
        let device = WgDevice::start(weft_wg::WgConfig {
            keepalive: Some(WG_KEEPALIVE_SECS),
            queues: spec.wg_queues,
            ..weft_wg::WgConfig::new(WG_DEVICE, spec.wg_port, spec.mtu, keys.private_key())
        })
        .context("starting the WireGuard data path")?;
        let public_key = WgKey::from(keys.public_key());
        tracing::info!(device = WG_DEVICE, port = device.listen_port(), public_key = %public_key, "WireGuard up");
        Ok(Wireguard {
            device,
            state_dir: spec.state_dir.to_path_buf(),
            next: Mutex::new(None),
            rotating: tokio::sync::Mutex::new(()),
            applied: Mutex::new(None),
            peers: Mutex::new(Vec::new()),
        })
    }

    /// The public key in use.
    pub fn public_key(&self) -> WgKey {
        WgKey::from(self.device.public_key())
    }

    /// The announced next key, during a rotation.
    pub fn next_key(&self) -> Option<WgKey> {
        let next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        next.as_ref().map(|k| WgKey::from(k.public_key()))
    }

    /// Holds off another rotation while the guard lives; `None` while one
    /// is under way.
    pub fn try_begin_rotation(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.rotating.try_lock().ok()
    }

    /// A rotation's first step: makes a new key, keeps it on disk as the
    /// next key (a restart completes the rotation with it,
    /// [`weft_wg::load_or_create_key`]) and returns its public key, to be
    /// published as [`Tunnel::wg_next_key`]. The key in use does not change.
    pub fn announce(&self) -> anyhow::Result<WgKey> {
        let key =
            weft_wg::write_next_key(&self.state_dir).context("writing the next WireGuard key")?;
        let public = WgKey::from(key.public_key());
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
        tracing::info!(current = %self.public_key(), next = %public, "announcing the next WireGuard key");
        Ok(public)
    }

    /// Abandons an announced rotation (the announcement never reached the
    /// store): forgets the next key and removes its file, so the key in use
    /// stays, also across a restart.
    pub fn abandon(&self) -> anyhow::Result<()> {
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = None;
        weft_wg::remove_next_key(&self.state_dir).context("removing the next WireGuard key")
    }

    /// A rotation's second step, once the peers have seen the announcement:
    /// the data path switches to the next key (every peer's handshake is
    /// redone at once) and the key file becomes the next key. Returns the
    /// old and the new public key.
    pub fn switch(&self) -> anyhow::Result<(WgKey, WgKey)> {
        let Some(next) = self.next.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            anyhow::bail!("no next WireGuard key was announced");
        };
        let old = WgKey::from(self.device.switch_key(&next));
        let new = WgKey::from(next.public_key());
        match weft_wg::promote_next_key(&self.state_dir) {
            Ok(Some(k)) if k == next => {}
            Ok(_) => tracing::warn!(
                "the next WireGuard key file changed under netd; the data path uses the announced key"
            ),
            // The next key file stays: a restart promotes it.
            Err(e) => tracing::warn!(error = %e, "replacing the WireGuard key file failed; a restart completes it"),
        }
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok((old, new))
    }

    async fn apply(
        &self,
        net: &HostNet,
        gateway: Ipv4Addr,
        peers: &[Peer],
        resync: bool,
    ) -> anyhow::Result<()> {
        let wanted = wg_peers(peers);
        {
            let mut last = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            if *last != wanted {
                self.device.set_peers_with_next_keys(wanted.clone());
                *last = wanted;
            }
        }
        let want = Applied {
            index: self.device.ifindex(),
            src: gateway,
            routes: peer_routes(false, peers),
            vteps: None,
        };
        apply_kernel(net, &self.applied, want, resync).await
    }
}

impl Vxlan {
    async fn apply(
        &self,
        net: &HostNet,
        (underlay_link, underlay): &(Link, Ipv4Addr),
        gateway: Ipv4Addr,
        peers: &[Peer],
        resync: bool,
    ) -> anyhow::Result<()> {
        let link = net
            .ensure_vxlan(&VxlanSpec {
                name: VXLAN_DEVICE.into(),
                vni: self.vni,
                port: self.port,
                local: *underlay,
                underlay_index: underlay_link.index,
                mac: self.mac,
                mtu: overlay_mtu(TunnelBackend::Vxlan, underlay_link.mtu),
            })
            .await?;
        let want = Applied {
            index: link.index,
            src: gateway,
            routes: peer_routes(true, peers),
            vteps: Some(vtep_peers(peers)),
        };
        apply_kernel(net, &self.applied, want, resync).await
    }
}

/// What a successful apply left in the kernel: the peer routes through
/// the device `index` (source `src`) and, for VXLAN (`Some`), the peers'
/// neighbour and FDB entries.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Applied {
    index: u32,
    src: Ipv4Addr,
    routes: HashSet<PeerRoute>,
    vteps: Option<HashSet<VtepPeer>>,
}

/// How an apply reaches the kernel.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// Read what the kernel has and change the difference.
    Resync,
    /// Change exactly this: the kernel is as the last apply left it.
    Change {
        add_routes: Vec<PeerRoute>,
        remove_routes: Vec<PeerRoute>,
        add_vteps: Vec<VtepPeer>,
        remove_vteps: Vec<VtepPeer>,
    },
}

/// The plan from `last` (what the last successful apply left, if it is
/// known) to `want`: a resync when asked, when nothing is known, or when
/// the device or the source address changed; else the difference.
fn plan(last: Option<&Applied>, want: &Applied, resync: bool) -> Plan {
    let Some(last) = last.filter(|l| !resync && l.index == want.index && l.src == want.src) else {
        return Plan::Resync;
    };
    let none = HashSet::new();
    let (want_vteps, last_vteps) = (
        want.vteps.as_ref().unwrap_or(&none),
        last.vteps.as_ref().unwrap_or(&none),
    );
    Plan::Change {
        add_routes: sorted(&want.routes, &last.routes),
        remove_routes: sorted(&last.routes, &want.routes),
        add_vteps: sorted(want_vteps, last_vteps),
        remove_vteps: sorted(last_vteps, want_vteps),
    }
}

/// What `a` has and `b` has not, in order (requests and logs follow it).
fn sorted<T: Copy + Ord + std::hash::Hash>(a: &HashSet<T>, b: &HashSet<T>) -> Vec<T> {
    let mut v: Vec<T> = a.difference(b).copied().collect();
    v.sort();
    v
}

/// Brings routes and VXLAN entries to `want` by [`plan`], and keeps `want`
/// in `slot` when that succeeded (an error leaves nothing there, so the
/// next apply resyncs). Logs one line when something changed.
async fn apply_kernel(
    net: &HostNet,
    slot: &Mutex<Option<Applied>>,
    want: Applied,
    resync: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let last = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (index, src) = (want.index, want.src);
    let (added, removed) = match plan(last.as_ref(), &want, resync) {
        Plan::Resync => {
            let (vteps_added, vteps_removed) = match &want.vteps {
                Some(vteps) => net.sync_vtep_peers(index, vteps).await?,
                None => (0, 0),
            };
            let (added, removed) = net.sync_peer_routes(index, src, &want.routes).await?;
            (added.max(vteps_added), removed.max(vteps_removed))
        }
        Plan::Change {
            add_routes,
            remove_routes,
            add_vteps,
            remove_vteps,
        } => {
            // Removals first: a roaming VXLAN peer's entry is removed and
            // added again with its new underlay (same neighbour address),
            // and a block that moved to another peer is re-added. Routes go
            // before their entries and come after them.
            net.change_peer_routes(index, src, &[], &remove_routes)
                .await?;
            net.change_vtep_peers(index, &[], &remove_vteps).await?;
            net.change_vtep_peers(index, &add_vteps, &[]).await?;
            net.change_peer_routes(index, src, &add_routes, &[]).await?;
            (
                add_routes.len().max(add_vteps.len()),
                remove_routes.len().max(remove_vteps.len()),
            )
        }
    };
    if added + removed > 0 {
        tracing::info!(
            added,
            removed,
            peers = want.routes.len(),
            read_kernel = last.is_none() || resync,
            took_ms = started.elapsed().as_millis() as u64,
            "peer routes updated"
        );
    }
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(want);
    Ok(())
}

/// The counters by peer public key (thousands of peers: no linear search
/// per peer).
pub fn stats_by_key(stats: &[PeerStats]) -> std::collections::HashMap<[u8; 32], &PeerStats> {
    stats.iter().map(|s| (s.public_key, s)).collect()
}

/// Whether a WireGuard peer had a handshake within [`PEER_DOWN_AFTER`].
fn handshake_recent(stats: Option<&PeerStats>) -> bool {
    stats
        .and_then(|s| s.last_handshake)
        .is_some_and(|age| age < PEER_DOWN_AFTER)
}

/// The WireGuard peers: those with a key, reached at their underlay
/// address, allowed their block; with the next key each announced.
fn wg_peers(peers: &[Peer]) -> Vec<(weft_wg::WgPeer, Option<[u8; 32]>)> {
    peers
        .iter()
        .filter_map(|p| {
            let peer = weft_wg::WgPeer {
                public_key: p.wg_public_key?,
                endpoint: SocketAddr::from((p.underlay, p.wg_port)),
                allowed: p.block,
            };
            Some((peer, p.wg_next_key))
        })
        .collect()
}

/// Routes for the peers' blocks: via the block's network address (onlink;
/// `via_block`, VXLAN), or straight into the device (the point-to-point
/// WireGuard TUN).
fn peer_routes(via_block: bool, peers: &[Peer]) -> HashSet<PeerRoute> {
    peers
        .iter()
        .map(|p| PeerRoute {
            block: p.block,
            via: via_block.then(|| p.block.network()),
        })
        .collect()
}

/// Neighbour and FDB entries for the VXLAN peers.
fn vtep_peers(peers: &[Peer]) -> HashSet<VtepPeer> {
    peers
        .iter()
        .filter_map(|p| {
            Some(VtepPeer {
                addr: p.block.network(),
                mac: p.vtep_mac?,
                underlay: p.underlay,
            })
        })
        .collect()
}

/// Removes both backends' devices (teardown).
pub async fn remove_devices(net: &HostNet) -> anyhow::Result<()> {
    if net.delete_link(VXLAN_DEVICE).await? {
        tracing::info!(device = VXLAN_DEVICE, "deleted the VXLAN device");
    }
    if net.link(WG_DEVICE).await?.is_some() {
        weft_wg::destroy(WG_DEVICE)?;
        tracing::info!(device = WG_DEVICE, "deleted the WireGuard device");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ipnetwork::Ipv4Network;

    use super::*;

    fn peer(id: &str, third: u8, mac: Option<[u8; 6]>) -> Peer {
        Peer {
            host_id: id.into(),
            underlay: Ipv4Addr::new(192, 168, 77, 10 + third),
            block: Ipv4Network::new(Ipv4Addr::new(10, 42, third, 0), 24).unwrap(),
            wg_public_key: Some([third; 32]),
            wg_next_key: (third == 2).then_some([9; 32]),
            wg_port: 51820,
            vtep_mac: mac,
        }
    }

    #[test]
    fn overheads_and_mtu() {
        assert_eq!(overhead(TunnelBackend::Wireguard), 60);
        assert_eq!(overhead(TunnelBackend::Vxlan), 50);
        assert_eq!(overlay_mtu(TunnelBackend::Wireguard, 1500), 1440);
        assert_eq!(overlay_mtu(TunnelBackend::Vxlan, 1500), 1450);
        assert_eq!(overlay_mtu(TunnelBackend::Vxlan, 9000), 8950);
        assert_eq!(
            overlay_mtu(TunnelBackend::Wireguard, 600),
            weft_model::mtu::MIN_MTU
        );
        assert!(check_mtu(TunnelBackend::Vxlan, 65_485).is_ok());
        assert!(check_mtu(TunnelBackend::Wireguard, 65_485).is_err());
        assert!(check_mtu(TunnelBackend::Wireguard, 575).is_err());
        assert_eq!(device(TunnelBackend::Vxlan), VXLAN_DEVICE);
        assert_eq!(device(TunnelBackend::Wireguard), WG_DEVICE);
    }

    #[test]
    fn vxlan_routes_go_via_the_block_wireguard_routes_into_the_device() {
        let peers = [peer("b", 1, Some([2, 0, 0, 0, 0, 1])), peer("c", 2, None)];
        let routes: Vec<PeerRoute> = super::sorted(&peer_routes(true, &peers), &HashSet::new());
        assert_eq!(routes[0].via, Some(Ipv4Addr::new(10, 42, 1, 0)));
        assert!(peer_routes(false, &peers).iter().all(|r| r.via.is_none()));
        let vteps: Vec<VtepPeer> = super::sorted(&vtep_peers(&peers), &HashSet::new());
        assert_eq!(vteps.len(), 1, "a peer without a MAC has no VTEP entry");
        assert_eq!(vteps[0].underlay, Ipv4Addr::new(192, 168, 77, 11));
        assert_eq!(vteps[0].mac, [2, 0, 0, 0, 0, 1]);
        let wg = wg_peers(&peers);
        assert_eq!(wg.len(), 2);
        assert_eq!(wg[1].0.endpoint, "192.168.77.12:51820".parse().unwrap());
        assert_eq!(wg[1].0.allowed, peers[1].block);
        assert_eq!((wg[0].1, wg[1].1), (None, Some([9; 32])));
    }

    fn applied(index: u32, routes: &[&Peer], vxlan: bool) -> Applied {
        let peers: Vec<Peer> = routes.iter().map(|p| (*p).clone()).collect();
        Applied {
            index,
            src: Ipv4Addr::new(10, 42, 0, 1),
            routes: peer_routes(vxlan, &peers),
            vteps: vxlan.then(|| vtep_peers(&peers)),
        }
    }

    #[test]
    fn an_apply_changes_only_the_difference_from_the_last() {
        let m = Some([2, 0, 0, 0, 0, 1]);
        let (b, c, d) = (peer("b", 1, m), peer("c", 2, m), peer("d", 3, m));
        let last = applied(7, &[&b, &c], true);
        let want = applied(7, &[&c, &d], true);
        let Plan::Change {
            add_routes,
            remove_routes,
            add_vteps,
            remove_vteps,
        } = plan(Some(&last), &want, false)
        else {
            panic!("a known last state is changed, not read again");
        };
        assert_eq!(
            add_routes,
            [PeerRoute {
                block: d.block,
                via: Some(d.block.network())
            }]
        );
        assert_eq!(
            remove_routes,
            [PeerRoute {
                block: b.block,
                via: Some(b.block.network())
            }]
        );
        assert_eq!(add_vteps.len(), 1);
        assert_eq!(add_vteps[0].underlay, d.underlay);
        assert_eq!(remove_vteps[0].underlay, b.underlay);
        // Nothing to do when converged.
        assert_eq!(
            plan(Some(&want), &want, false),
            Plan::Change {
                add_routes: vec![],
                remove_routes: vec![],
                add_vteps: vec![],
                remove_vteps: vec![],
            }
        );
        // WireGuard: routes only.
        let wg = plan(
            Some(&applied(7, &[&b], false)),
            &applied(7, &[&b, &c], false),
            false,
        );
        assert!(
            matches!(wg, Plan::Change { ref add_routes, ref add_vteps, .. } if add_routes.len() == 1 && add_vteps.is_empty())
        );
    }

    #[test]
    fn the_kernel_is_read_when_asked_unknown_or_the_device_changed() {
        let b = peer("b", 1, None);
        let want = applied(7, &[&b], false);
        assert_eq!(plan(None, &want, false), Plan::Resync);
        assert_eq!(plan(Some(&want), &want, true), Plan::Resync);
        assert_eq!(
            plan(Some(&applied(8, &[&b], false)), &want, false),
            Plan::Resync
        );
        let mut moved = want.clone();
        moved.src = Ipv4Addr::new(10, 42, 9, 1);
        assert_eq!(plan(Some(&moved), &want, false), Plan::Resync);
    }

    #[test]
    fn a_vxlan_peer_is_up_while_in_the_mesh() {
        let t = Tunnel::Vxlan(Vxlan {
            vni: 42,
            port: 4789,
            mac: [2, 0, 0, 0, 0, 1],
            applied: Mutex::new(None),
        });
        assert!(t.peer_up(None));
        assert_eq!(t.device(), VXLAN_DEVICE);
        assert!(t.wg().is_none() && t.wg_public_key().is_none());
        assert!(t.wireguard().is_none() && t.wg_next_key().is_none());
        assert!(t.peer_stats().is_empty());
    }

    #[test]
    fn a_wireguard_peer_is_up_within_the_reject_time_after_a_handshake() {
        let p = peer("b", 1, None);
        let mut s = PeerStats {
            public_key: [1; 32],
            endpoint: SocketAddr::from((p.underlay, p.wg_port)),
            allowed: p.block,
            index: 1,
            rx_bytes: 0,
            rx_packets: 0,
            tx_bytes: 0,
            tx_packets: 0,
            last_handshake: None,
            drops_bad_source: 0,
            drops_decrypt: 0,
            drops_oversize: 0,
            handshake_errors: 0,
            key_switches: 0,
            drops_tun_write: 0,
            handshake_failures: 0,
        };
        assert!(!handshake_recent(None));
        assert!(!handshake_recent(Some(&s)), "no session yet");
        s.last_handshake = Some(Duration::from_secs(179));
        assert!(handshake_recent(Some(&s)));
        s.last_handshake = Some(PEER_DOWN_AFTER);
        assert!(!handshake_recent(Some(&s)));
    }
}
