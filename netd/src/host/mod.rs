//! Host network setup over rtnetlink: the bridge, its addresses, sysctls.
//! This module is the only owner of netlink in netd. It reconciles: it
//! reads what the kernel has, compares it with what is wanted, and changes
//! only the difference, so a restart touches nothing that is already right.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};

mod tunnel;
pub use tunnel::{PeerRoute, VtepPeer, VxlanSpec, PIPELINE};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot open a netlink socket: {0} (netd needs CAP_NET_ADMIN)")]
    Connect(#[source] std::io::Error),
    #[error("netlink: {what} failed: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{name} exists but is a {kind} device, not a bridge: remove it or choose another bridge name")]
    NotABridge { name: String, kind: String },
    #[error("cannot set {path} to {value}: {source}")]
    Sysctl {
        path: String,
        value: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = HostError> = std::result::Result<T, E>;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> HostError {
    let what = what.into();
    move |source| HostError::Netlink { what, source }
}

/// The errno a netlink request failed with (positive), if the kernel
/// answered with one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()).filter(|&c| c != 0),
        _ => None,
    }
}

/// Attempts of a dump the kernel interrupted before it gives up.
const DUMP_ATTEMPTS: u32 = 5;

/// Runs a dump, again when the kernel interrupted it because the table
/// changed meanwhile (`EBUSY`; routes change while thousands of peers join),
/// up to [`DUMP_ATTEMPTS`] times with a short pause.
async fn dump_retrying<T, F, Fut>(what: &str, mut dump: F) -> Result<Vec<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Vec<T>, rtnetlink::Error>>,
{
    let mut attempt = 1;
    loop {
        match dump().await {
            Err(e) if errno(&e) == Some(libc::EBUSY) && attempt < DUMP_ATTEMPTS => {
                tracing::debug!(what, attempt, "netlink dump interrupted by a change; again");
                tokio::time::sleep(std::time::Duration::from_millis(5 << attempt)).await;
                attempt += 1;
            }
            r => return r.map_err(nl(what)),
        }
    }
}

/// What netd knows about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
    pub kind: Option<String>,
    pub controller: Option<u32>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mtu: 0,
            up: m.header.flags.contains(LinkFlags::Up),
            kind: None,
            controller: None,
        };
        for attr in &m.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind_name(kind));
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Vxlan => "vxlan".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Dummy => "dummy".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A link's traffic counters (the kernel's 64-bit statistics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

/// Which addresses to add and which to remove on the bridge. Only addresses
/// inside `owned` (the cluster range and the DNS address) are weft's to
/// remove; anything else an operator put there stays.
pub fn address_diff(
    have: &[Ipv4Network],
    want: &[Ipv4Network],
    owned: &[Ipv4Network],
) -> (Vec<Ipv4Network>, Vec<Ipv4Network>) {
    let add = want.iter().filter(|w| !have.contains(w)).copied().collect();
    let remove = have
        .iter()
        .filter(|h| !want.contains(h) && owned.iter().any(|o| o.contains(h.ip())))
        .copied()
        .collect();
    (add, remove)
}

/// A netlink handle in the network namespace netd runs in.
#[derive(Clone)]
pub struct HostNet {
    handle: Handle,
}

impl HostNet {
    /// Opens a netlink connection (must be called inside a tokio runtime).
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(HostError::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The link message of the link named `name`, if it exists; `what`
    /// names the lookup in an error.
    async fn link_message(&self, name: &str, what: &str) -> Result<Option<LinkMessage>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(m) => Ok(m),
            // The kernel answers ENODEV for a missing name.
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl(format!("{what} {name}"))(e)),
        }
    }

    /// The link named `name`, if it exists.
    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let m = self.link_message(name, "looking up link").await?;
        Ok(m.as_ref().map(Link::from_message))
    }

    /// The 64-bit counters of the link named `name`, if it exists.
    pub async fn link_stats(&self, name: &str) -> Result<Option<LinkStats>> {
        let Some(msg) = self.link_message(name, "reading the counters of").await? else {
            return Ok(None);
        };
        let stats = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Stats64(s) => Some(LinkStats {
                rx_bytes: s.rx_bytes,
                rx_packets: s.rx_packets,
                rx_dropped: s.rx_dropped,
                tx_bytes: s.tx_bytes,
                tx_packets: s.tx_packets,
                tx_dropped: s.tx_dropped,
            }),
            _ => None,
        });
        Ok(Some(stats.unwrap_or_default()))
    }

    /// Every link.
    pub async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing links"))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// Makes sure the bridge exists, has `mtu` and is up. Returns its index.
    pub async fn ensure_bridge(&self, name: &str, mtu: u32) -> Result<Link> {
        let link = match self.link(name).await? {
            Some(link) => link,
            None => {
                tracing::info!(bridge = %name, mtu, "creating bridge");
                self.handle
                    .link()
                    .add(LinkBridge::new(name).mtu(mtu).build())
                    .execute()
                    .await
                    .map_err(nl(format!("creating bridge {name}")))?;
                self.link(name)
                    .await?
                    .ok_or_else(|| HostError::NotABridge {
                        name: name.into(),
                        kind: "vanished".into(),
                    })?
            }
        };
        if link.kind.as_deref() != Some("bridge") {
            return Err(HostError::NotABridge {
                name: name.into(),
                kind: link.kind.unwrap_or_else(|| "unknown".into()),
            });
        }
        self.pin_mac(&link).await?;
        if link.mtu != mtu || !link.up {
            tracing::info!(bridge = %name, from = link.mtu, to = mtu, "setting bridge MTU and up");
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(link.index).mtu(mtu).up().build())
                .execute()
                .await
                .map_err(nl(format!("setting MTU/up on {name}")))?;
        }
        Ok(Link {
            mtu,
            up: true,
            ..link
        })
    }

    /// Sets the bridge's MAC to the one it has. A bridge whose MAC was never
    /// set takes the lowest MAC of its ports and changes when that port
    /// leaves (a container deleted): every other container's ARP entry for
    /// the gateway then names a MAC nobody answers for, and their traffic
    /// out of the host stops until the entry expires (tens of seconds). Set
    /// once, the kernel keeps it. Idempotent; the MAC does not change.
    async fn pin_mac(&self, link: &Link) -> Result<()> {
        let what = || format!("pinning the MAC of bridge {}", link.name);
        let mut links = self.handle.link().get().match_index(link.index).execute();
        let Some(m) = links.try_next().await.map_err(nl(what()))? else {
            return Ok(());
        };
        let Some(mac) = m.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(mac.clone()),
            _ => None,
        }) else {
            return Ok(());
        };
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(link.index).address(mac).build())
            .execute()
            .await
            .map_err(nl(what()))
    }

    /// The IPv4 addresses on a link.
    pub async fn addresses(&self, index: u32) -> Result<Vec<Ipv4Network>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing addresses"))?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.index != index {
                continue;
            }
            for attr in &m.attributes {
                if let AddressAttribute::Local(IpAddr::V4(ip)) = attr {
                    if let Ok(n) = Ipv4Network::new(*ip, m.header.prefix_len) {
                        out.push(n);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Puts exactly `want` of the `owned` addresses on the link.
    pub async fn ensure_addresses(
        &self,
        link: &Link,
        want: &[Ipv4Network],
        owned: &[Ipv4Network],
    ) -> Result<()> {
        let have = self.addresses(link.index).await?;
        let (add, remove) = address_diff(&have, want, owned);
        for addr in remove {
            tracing::info!(link = %link.name, %addr, "removing stale address");
            let msgs: Vec<_> = self
                .handle
                .address()
                .get()
                .set_link_index_filter(link.index)
                .set_address_filter(IpAddr::V4(addr.ip()))
                .execute()
                .try_collect()
                .await
                .map_err(nl("finding address"))?;
            for m in msgs {
                self.handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(nl(format!("removing {addr} from {}", link.name)))?;
            }
        }
        for addr in add {
            tracing::info!(link = %link.name, %addr, "adding address");
            self.handle
                .address()
                .add(link.index, IpAddr::V4(addr.ip()), addr.prefix())
                .execute()
                .await
                .map_err(nl(format!("adding {addr} to {}", link.name)))?;
        }
        Ok(())
    }

    /// Every IPv4 route of the main dump.
    async fn ipv4_routes(&self) -> Result<Vec<RouteMessage>> {
        dump_retrying("listing routes", || {
            self.handle
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
                .try_collect()
        })
        .await
    }

    /// The link the IPv4 default route leaves through, if there is one.
    pub async fn default_route_link(&self) -> Result<Option<Link>> {
        let routes = self.ipv4_routes().await?;
        let oif = routes
            .iter()
            .filter(|r| r.header.destination_prefix_length == 0)
            .find_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            });
        let Some(oif) = oif else { return Ok(None) };
        Ok(self.links().await?.into_iter().find(|l| l.index == oif))
    }

    /// Deletes a link by name. Returns whether it existed.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        self.handle
            .link()
            .del(link.index)
            .execute()
            .await
            .map_err(nl(format!("deleting {name}")))?;
        Ok(true)
    }
}

/// Writes a sysctl if it does not have the value already. `path` is
/// relative to /proc/sys with slashes (`net/ipv4/ip_forward`), so interface
/// names with dots stay intact.
pub fn ensure_sysctl(path: &str, value: &str) -> Result<()> {
    let full = format!("/proc/sys/{}", path.trim_start_matches('/'));
    let err = |source| HostError::Sysctl {
        path: full.clone(),
        value: value.to_owned(),
        source,
    };
    match std::fs::read_to_string(&full) {
        Ok(current) if current.trim() == value => Ok(()),
        _ => {
            tracing::info!(sysctl = %full, %value, "setting sysctl");
            std::fs::write(&full, value).map_err(err)
        }
    }
}

impl HostNet {
    /// The first IPv4 address of a link.
    pub async fn first_ipv4(&self, index: u32) -> Result<Option<Ipv4Addr>> {
        Ok(self.addresses(index).await?.first().map(|n| n.ip()))
    }
}

impl HostNet {
    /// The underlay: the link holding `addr` when given, else the link of
    /// the default route and its first IPv4 address.
    pub async fn underlay(&self, addr: Option<Ipv4Addr>) -> Result<Option<(Link, Ipv4Addr)>> {
        match addr {
            Some(addr) => {
                for link in self.links().await? {
                    if self
                        .addresses(link.index)
                        .await?
                        .iter()
                        .any(|n| n.ip() == addr)
                    {
                        return Ok(Some((link, addr)));
                    }
                }
                Ok(None)
            }
            None => {
                let Some(link) = self.default_route_link().await? else {
                    return Ok(None);
                };
                Ok(self.first_ipv4(link.index).await?.map(|a| (link, a)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn diff_adds_missing_and_removes_only_owned_stale() {
        let owned = [n("10.42.0.0/16"), n("169.254.169.250/32")];
        let have = [
            n("10.42.7.1/24"),
            n("192.168.1.5/24"),
            n("169.254.169.250/32"),
        ];
        let want = [n("10.42.3.1/24"), n("169.254.169.250/32")];
        let (add, remove) = address_diff(&have, &want, &owned);
        assert_eq!(add, [n("10.42.3.1/24")]);
        assert_eq!(
            remove,
            [n("10.42.7.1/24")],
            "the operator's 192.168.1.5 stays"
        );
    }

    #[test]
    fn diff_is_empty_when_converged() {
        let owned = [n("10.42.0.0/16")];
        let want = [n("10.42.3.1/24"), n("169.254.169.250/32")];
        let (add, remove) = address_diff(&want, &want, &owned);
        assert!(add.is_empty() && remove.is_empty());
    }
}
