//! The tunnel's kernel state over rtnetlink: the VXLAN device, the routes
//! to the peers' blocks through the tunnel device, VXLAN's neighbour and
//! FDB entries.
//!
//! Two ways to bring routes and entries in line with the peers:
//! `sync_*` reads what the kernel has and changes the difference (at start,
//! in the periodic resync, after an error); `change_*` applies a difference
//! the caller already knows ([`crate::tunnel`] keeps what it applied last),
//! reading nothing, so one join in a mesh of thousands costs one request.
//! Requests go [`PIPELINE`] at a time over the one netlink socket instead of
//! one round trip each; dumps interrupted by concurrent changes are retried
//! ([`super::dump_retrying`]).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use futures::{StreamExt, TryStreamExt};
use ipnetwork::Ipv4Network;
use netlink_packet_route::link::{LinkAttribute, LinkInfo};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use super::{errno, nl, HostError, HostNet, Link, Result};

/// Netlink requests in flight at once when many routes or entries change.
pub const PIPELINE: usize = 64;

/// A route to a peer's block through a tunnel device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerRoute {
    pub block: Ipv4Network,
    /// `Some(next hop)` with onlink (VXLAN), `None` for a point-to-point
    /// device (the WireGuard TUN).
    pub via: Option<Ipv4Addr>,
}

/// What the VXLAN device needs for one peer: a permanent neighbour entry
/// (peer's block address -> its VTEP MAC) and an FDB entry (that MAC -> the
/// peer's underlay address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VtepPeer {
    pub addr: Ipv4Addr,
    pub mac: [u8; 6],
    pub underlay: Ipv4Addr,
}

/// VXLAN device settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    pub underlay_index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

impl HostNet {
    /// Creates the VXLAN device if it is missing (or re-creates it when its
    /// VNI/port/local address/MAC changed), and sets MTU and up.
    pub async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<Link> {
        if let Some(link) = self.link(&spec.name).await? {
            if link.kind.as_deref() == Some("vxlan") && self.vxlan_matches(&link, spec).await? {
                if link.mtu != spec.mtu || !link.up {
                    self.handle
                        .link()
                        .set(
                            LinkUnspec::new_with_index(link.index)
                                .mtu(spec.mtu)
                                .up()
                                .build(),
                        )
                        .execute()
                        .await
                        .map_err(nl(format!("setting MTU/up on {}", spec.name)))?;
                }
                return Ok(Link {
                    mtu: spec.mtu,
                    up: true,
                    ..link
                });
            }
            tracing::info!(device = %spec.name, "VXLAN device settings changed: re-creating it");
            self.delete_link(&spec.name).await?;
        }
        tracing::info!(device = %spec.name, vni = spec.vni, port = spec.port, local = %spec.local, "creating VXLAN device");
        let msg = rtnetlink::LinkVxlan::new(&spec.name, spec.vni)
            .dev(spec.underlay_index)
            .port(spec.port)
            .local(spec.local)
            .learning(false)
            .mtu(spec.mtu)
            .address(spec.mac.to_vec())
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl(format!("creating VXLAN device {}", spec.name)))?;
        self.link(&spec.name)
            .await?
            .ok_or_else(|| HostError::NotABridge {
                name: spec.name.clone(),
                kind: "vanished".into(),
            })
    }

    async fn vxlan_matches(&self, link: &Link, spec: &VxlanSpec) -> Result<bool> {
        use netlink_packet_route::link::{InfoData, InfoVxlan};
        let mut msgs = self.handle.link().get().match_index(link.index).execute();
        let Some(m) = msgs.try_next().await.map_err(nl("reading VXLAN device"))? else {
            return Ok(false);
        };
        let (mut vni, mut port, mut local, mut mac) = (None, None, None, None);
        for attr in &m.attributes {
            match attr {
                LinkAttribute::Address(a) => mac = Some(a.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Data(InfoData::Vxlan(items)) = info {
                            for item in items {
                                match item {
                                    InfoVxlan::Id(v) => vni = Some(*v),
                                    InfoVxlan::Port(p) => port = Some(*p),
                                    InfoVxlan::Local(l) => local = Some(*l),
                                    _ => {}
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(vni == Some(spec.vni)
            && port == Some(spec.port)
            && local == Some(spec.local)
            && mac.as_deref() == Some(&spec.mac[..]))
    }

    /// The peer routes through link `index`: IPv4 routes of the main table
    /// leaving through it, as (destination, gateway). Host routes (/32) are
    /// not peer routes and are never touched.
    async fn peer_routes_of(&self, index: u32) -> Result<Vec<(RouteMessage, PeerRoute)>> {
        let routes = self.ipv4_routes().await?;
        let mut out = Vec::new();
        for r in routes {
            let mut oif = None;
            let mut dst = None;
            let mut gw = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    _ => {}
                }
            }
            if oif != Some(index) {
                continue;
            }
            let Some(dst) = dst else { continue };
            match Ipv4Network::new(dst, r.header.destination_prefix_length) {
                Ok(block) if block.prefix() < 32 => out.push((r, PeerRoute { block, via: gw })),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Makes the routes through tunnel device `index` exactly `want` after
    /// reading what the kernel has (see [`HostNet::change_peer_routes`]
    /// for the routes' form). Returns how many were added and removed.
    pub async fn sync_peer_routes(
        &self,
        index: u32,
        src: Ipv4Addr,
        want: &HashSet<PeerRoute>,
    ) -> Result<(usize, usize)> {
        let have = self.peer_routes_of(index).await?;
        let present: HashSet<PeerRoute> = have.iter().map(|(_, r)| *r).collect();
        let stale: Vec<RouteMessage> = have
            .into_iter()
            .filter(|(_, r)| !want.contains(r))
            .map(|(m, _)| m)
            .collect();
        let missing: Vec<PeerRoute> = want.difference(&present).copied().collect();
        let removed = stale.len();
        pipelined(stale.into_iter().map(|m| self.delete_route(m)).collect()).await?;
        self.change_peer_routes(index, src, &missing, &[]).await?;
        Ok((missing.len(), removed))
    }

    /// Adds (or replaces) the routes `add` and removes the routes `remove`
    /// through tunnel device `index`, without reading the kernel first: each
    /// peer block via the device with `src` as preferred source (so traffic
    /// the host itself sends into the overlay carries an address of its own
    /// block), via the block's network address onlink when `via` is set. A
    /// route to remove that is already gone is fine.
    pub async fn change_peer_routes(
        &self,
        index: u32,
        src: Ipv4Addr,
        add: &[PeerRoute],
        remove: &[PeerRoute],
    ) -> Result<()> {
        use netlink_packet_route::route::{RouteProtocol, RouteScope};
        let build = |w: &PeerRoute| {
            let b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(w.block.network(), w.block.prefix())
                .output_interface(index)
                .protocol(RouteProtocol::Static);
            match w.via {
                Some(gw) => b.gateway(gw).onlink(),
                None => b.scope(RouteScope::Link),
            }
        };
        let gone: Vec<RouteMessage> = remove.iter().map(|w| build(w).build()).collect();
        pipelined(gone.into_iter().map(|m| self.delete_route(m)).collect()).await?;
        let new: Vec<(PeerRoute, RouteMessage)> = add
            .iter()
            .map(|w| (*w, build(w).pref_source(src).build()))
            .collect();
        pipelined(
            new.into_iter()
                .map(|(w, m)| async move {
                    tracing::debug!(dest = %w.block, via = ?w.via, "adding peer route");
                    self.handle
                        .route()
                        .add(m)
                        .replace()
                        .execute()
                        .await
                        .map_err(nl(format!("adding route to {}", w.block)))
                })
                .collect::<Vec<_>>(),
        )
        .await
    }

    /// Deletes a route; one that is already gone is fine.
    async fn delete_route(&self, m: RouteMessage) -> Result<()> {
        let dest = route_dest(&m);
        tracing::debug!(dest = %dest, "removing peer route");
        match self.handle.route().del(m).execute().await {
            Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
            r => r.map_err(nl(format!("removing route to {dest}"))),
        }
    }

    /// Makes the permanent neighbour and FDB entries of the VXLAN device
    /// `index` exactly those of `want`, after reading what it has. Returns
    /// how many peers' entries were added and how many stale entries
    /// removed.
    pub async fn sync_vtep_peers(
        &self,
        index: u32,
        want: &HashSet<VtepPeer>,
    ) -> Result<(usize, usize)> {
        let handle = self.handle.clone();
        let msgs: Vec<NeighbourMessage> = super::dump_retrying("listing neighbours", || {
            handle.neighbours().get().execute().try_collect()
        })
        .await?;
        // What `want` needs: (block address, MAC) neighbours and (MAC,
        // underlay) FDB entries; and which of them are present.
        let want_neighbours: HashSet<(Ipv4Addr, [u8; 6])> =
            want.iter().map(|w| (w.addr, w.mac)).collect();
        let want_fdb: HashSet<([u8; 6], Ipv4Addr)> =
            want.iter().map(|w| (w.mac, w.underlay)).collect();
        let mut neighbours = HashSet::new();
        let mut fdb = HashSet::new();
        let mut stale = Vec::new();
        for m in msgs {
            if m.header.ifindex != index || m.header.state != NeighbourState::Permanent {
                continue;
            }
            let mut dst = None;
            let mut lla = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => dst = Some(*d),
                    NeighbourAttribute::LinkLayerAddress(l) => {
                        lla = <[u8; 6]>::try_from(&l[..]).ok()
                    }
                    _ => {}
                }
            }
            match (m.header.family, dst, lla) {
                (AddressFamily::Inet, Some(d), Some(mac))
                    if want_neighbours.contains(&(d, mac)) =>
                {
                    neighbours.insert((d, mac));
                }
                (AddressFamily::Inet, Some(_), _) => stale.push(m),
                // Only unicast FDB entries with a destination are ours.
                (AddressFamily::Bridge, Some(d), Some(mac)) if mac[0] & 1 == 0 => {
                    if want_fdb.contains(&(mac, d)) {
                        fdb.insert((mac, d));
                    } else {
                        stale.push(m);
                    }
                }
                _ => {}
            }
        }
        let removed = stale.len();
        pipelined(
            stale
                .into_iter()
                .map(|m| self.delete_neighbour(m))
                .collect(),
        )
        .await?;
        let missing: Vec<VtepPeer> = want
            .iter()
            .filter(|w| {
                !neighbours.contains(&(w.addr, w.mac)) || !fdb.contains(&(w.mac, w.underlay))
            })
            .copied()
            .collect();
        self.change_vtep_peers(index, &missing, &[]).await?;
        Ok((missing.len(), removed))
    }

    /// Adds (or replaces) the neighbour and FDB entries of the peers `add`
    /// and removes those of `remove` on the VXLAN device `index`, without
    /// reading the kernel first. Entries already gone are fine.
    pub async fn change_vtep_peers(
        &self,
        index: u32,
        add: &[VtepPeer],
        remove: &[VtepPeer],
    ) -> Result<()> {
        let gone: Vec<NeighbourMessage> = remove
            .iter()
            .flat_map(|w| [neighbour_msg(index, w), fdb_msg(index, w)])
            .collect();
        pipelined(gone.into_iter().map(|m| self.delete_neighbour(m)).collect()).await?;
        pipelined(
            add.iter()
                .map(|w| async move {
                    self.handle
                        .neighbours()
                        .add(index, IpAddr::V4(w.addr))
                        .link_layer_address(&w.mac)
                        .state(NeighbourState::Permanent)
                        .replace()
                        .execute()
                        .await
                        .map_err(nl(format!("adding neighbour {}", w.addr)))?;
                    self.handle
                        .neighbours()
                        .add_bridge(index, &w.mac)
                        .destination(IpAddr::V4(w.underlay))
                        .flags(NeighbourFlags::Own)
                        .state(NeighbourState::Permanent)
                        .replace()
                        .execute()
                        .await
                        .map_err(nl(format!("adding FDB entry for {}", w.underlay)))
                })
                .collect(),
        )
        .await
    }

    /// Deletes a neighbour or FDB entry; one already gone is fine.
    async fn delete_neighbour(&self, m: NeighbourMessage) -> Result<()> {
        match self.handle.neighbours().del(m).execute().await {
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(()),
            r => r.map_err(nl("removing a VXLAN neighbour/FDB entry")),
        }
    }
}

/// Runs the requests, [`PIPELINE`] at a time; the first error wins.
/// (Takes the requests made: a lazy iterator held across awaits trips
/// rustc's `Send` check on the spawned task.)
async fn pipelined<F>(requests: Vec<F>) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    futures::stream::iter(requests)
        .buffer_unordered(PIPELINE)
        .try_collect::<()>()
        .await
}

/// The destination of a route message, for logs and errors.
fn route_dest(m: &RouteMessage) -> String {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                Some(format!("{d}/{}", m.header.destination_prefix_length))
            }
            _ => None,
        })
        .unwrap_or_else(|| "?".into())
}

/// The permanent neighbour entry of a VXLAN peer (to delete it).
fn neighbour_msg(index: u32, w: &VtepPeer) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            w.addr,
        )));
    m
}

/// The FDB entry of a VXLAN peer (to delete it): its MAC to its underlay.
fn fdb_msg(index: u32, w: &VtepPeer) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    // The device's own FDB (NTF_SELF), as added; without it the kernel
    // asks a bridge master the VXLAN device does not have.
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(w.mac.to_vec()));
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            w.underlay,
        )));
    m
}
