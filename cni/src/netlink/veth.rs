//! The pair itself: [`Sandbox::attach`] makes the veth pair and configures
//! the container side, all or nothing; [`Sandbox::inspect`] reads the
//! container interface, its addresses and routes back.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures_util::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};
use netlink_packet_route::AddressFamily;
use nix::errno::Errno;
use rtnetlink::{LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::error::{errno, nl_err};
use super::links::{delete_by_name, link_by_name, link_state};
use super::{
    check_name, Attached, InterfaceState, NetError, RouteState, Sandbox, VethConfig,
    LOOPBACK_IFINDEX,
};

impl Sandbox<'_> {
    /// Creates the veth pair and configures the container side: `lo` up;
    /// `ifname` with its MAC (set when it is made), the address, the MTU, up; a default route and a route to
    /// 169.254.169.250/32, both via the gateway. The host end joins the
    /// bridge, with the MTU, up.
    ///
    /// Fails without touching anything if the bridge is missing, or if the
    /// host end or `ifname` exist already. If a later step fails, the pair
    /// is deleted again before the error is returned: either everything is
    /// made or nothing is.
    pub fn attach(&self, cfg: &VethConfig) -> Result<Attached, NetError> {
        check_name(&cfg.ifname)?;
        check_name(&cfg.host_veth)?;
        check_name(&cfg.bridge)?;
        let host = &self.nl.host;
        self.nl.rt.block_on(async {
            let bridge = link_by_name(host, &cfg.bridge)
                .await
                .map_err(nl_err(format!("looking up bridge {}", cfg.bridge)))?
                .ok_or_else(|| NetError::NoBridge {
                    bridge: cfg.bridge.clone(),
                })?;
            // The peer cannot be created up: veth refuses to open one end
            // before both exist (ENOTCONN). It goes up after its address.
            let peer = LinkUnspec::new_with_name(&cfg.ifname)
                .mtu(cfg.mtu)
                .address(cfg.mac.octets().to_vec())
                .setns_by_fd(self.file.as_raw_fd())
                .build();
            let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
                .name(cfg.host_veth.clone())
                .mtu(cfg.mtu)
                .controller(bridge.header.index)
                .up()
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build();
            if let Err(e) = host.link().add(pair).execute().await {
                if errno(&e) == Some(Errno::EEXIST as i32) {
                    // Which end collided? Nothing was made either way.
                    let host_exists =
                        matches!(link_by_name(host, &cfg.host_veth).await, Ok(Some(_)));
                    return Err(if host_exists {
                        NetError::HostVethExists {
                            name: cfg.host_veth.clone(),
                        }
                    } else {
                        NetError::IfnameExists {
                            ifname: cfg.ifname.clone(),
                        }
                    });
                }
                return Err(nl_err(format!(
                    "creating veth pair {} / {} (mtu {}) on bridge {}",
                    cfg.host_veth, cfg.ifname, cfg.mtu, cfg.bridge
                ))(e));
            }
            // Hairpin on the bridge port: with br_netfilter, a container
            // reaching its own published port through the host address is
            // DNATed back out of the port it came in on.
            let hairpin = async {
                let index = link_by_name(host, &cfg.host_veth)
                    .await
                    .map_err(nl_err(format!("looking up {}", cfg.host_veth)))?
                    .map(|l| l.header.index)
                    .ok_or_else(|| NetError::HostVethExists {
                        name: cfg.host_veth.clone(),
                    })?;
                host.link()
                    .set_port(LinkBridgePort::new(index).hairpin(true).build())
                    .execute()
                    .await
                    .map_err(nl_err(format!("setting hairpin mode on {}", cfg.host_veth)))
            };
            let configured = match hairpin.await {
                Ok(()) => self.configure(cfg).await,
                Err(e) => Err(e),
            };
            match configured {
                Ok(attached) => Ok(attached),
                Err(e) => {
                    // Undo: the host end takes the container end with it.
                    let _ = delete_by_name(host, &cfg.host_veth).await;
                    Err(e)
                }
            }
        })
    }

    async fn configure(&self, cfg: &VethConfig) -> Result<Attached, NetError> {
        let c = &self.handle;
        let ifname = &cfg.ifname;
        let link = link_by_name(c, ifname)
            .await
            .map_err(nl_err(format!("looking up {ifname} in the container")))?
            .ok_or_else(|| NetError::Netlink {
                op: format!("looking up {ifname} in the container"),
                errno: None,
                message: "the new interface is not there".into(),
            })?;
        let index = link.header.index;
        let container_mac = link_state(&link).mac;

        // The rest goes out in one batch: requests on one netlink socket are
        // sent and applied in the order they were issued (join! polls its
        // futures in order, and each enqueues its request on first poll), so
        // the address exists before the link goes up, and the link is up
        // before the routes through it are added. One round trip, not six.
        let route = |dst: Ipv4Addr, prefix: u8| {
            let msg = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst, prefix)
                .gateway(cfg.gateway)
                .output_interface(index)
                .build();
            c.route().add(msg).execute()
        };
        let (lo_up, addr, up, default_route, dns_route, host_link) = futures_util::join!(
            c.link()
                .set(LinkUnspec::new_with_index(LOOPBACK_IFINDEX).up().build())
                .execute(),
            c.address()
                .add(index, IpAddr::V4(cfg.address.ip()), cfg.address.prefix())
                .execute(),
            c.link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute(),
            route(Ipv4Addr::UNSPECIFIED, 0),
            route(weft_api::DNS_ADDR, 32),
            link_by_name(&self.nl.host, &cfg.host_veth),
        );
        lo_up.map_err(nl_err("setting lo up in the container"))?;
        addr.map_err(nl_err(format!(
            "adding address {} to {ifname}",
            cfg.address
        )))?;
        up.map_err(nl_err(format!("setting {ifname} up")))?;
        for (dst, prefix, result) in [
            (Ipv4Addr::UNSPECIFIED, 0, default_route),
            (weft_api::DNS_ADDR, 32, dns_route),
        ] {
            match result {
                Ok(()) => {}
                // The spec: another network may own the default route
                // already; CHECK reports it if it is not ours.
                Err(e) if errno(&e) == Some(Errno::EEXIST as i32) => {}
                Err(e) => {
                    return Err(nl_err(format!(
                        "adding route {dst}/{prefix} via {} dev {ifname}",
                        cfg.gateway
                    ))(e))
                }
            }
        }
        let host_mac = host_link
            .map_err(nl_err(format!("looking up {}", cfg.host_veth)))?
            .and_then(|l| link_state(&l).mac);
        Ok(Attached {
            host_veth: cfg.host_veth.clone(),
            host_mac,
            ifname: cfg.ifname.clone(),
            container_mac,
            container_index: index,
        })
    }

    /// The container interface `ifname` with its IPv4 addresses and its
    /// main-table IPv4 routes; `None` if there is no such interface.
    pub fn inspect(&self, ifname: &str) -> Result<Option<InterfaceState>, NetError> {
        check_name(ifname)?;
        let c = &self.handle;
        self.nl.rt.block_on(async {
            let Some(link) = link_by_name(c, ifname)
                .await
                .map_err(nl_err(format!("looking up {ifname} in the container")))?
            else {
                return Ok(None);
            };
            let link = link_state(&link);
            let mut addresses = Vec::new();
            let mut addrs = c
                .address()
                .get()
                .set_link_index_filter(link.index)
                .execute();
            while let Some(a) = addrs
                .try_next()
                .await
                .map_err(nl_err("listing container addresses"))?
            {
                if a.header.family != AddressFamily::Inet {
                    continue;
                }
                let mut local = None;
                let mut address = None;
                for attr in &a.attributes {
                    match attr {
                        AddressAttribute::Local(IpAddr::V4(ip)) => local = Some(*ip),
                        AddressAttribute::Address(IpAddr::V4(ip)) => address = Some(*ip),
                        _ => {}
                    }
                }
                if let Some(ip) = local.or(address) {
                    if let Ok(net) = Ipv4Network::new(ip, a.header.prefix_len) {
                        addresses.push(net);
                    }
                }
            }
            let mut routes = Vec::new();
            let mut all = c
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute();
            while let Some(r) = all
                .try_next()
                .await
                .map_err(nl_err("listing container routes"))?
            {
                let mut table = u32::from(r.header.table);
                let mut oif = None;
                let mut dst = Ipv4Addr::UNSPECIFIED;
                let mut gateway = None;
                for attr in &r.attributes {
                    match attr {
                        RouteAttribute::Table(t) => table = *t,
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(*a),
                        _ => {}
                    }
                }
                if table != u32::from(RouteHeader::RT_TABLE_MAIN) || oif != Some(link.index) {
                    continue;
                }
                if let Ok(dst) = Ipv4Network::new(dst, r.header.destination_prefix_length) {
                    routes.push(RouteState { dst, gateway });
                }
            }
            Ok(Some(InterfaceState {
                link,
                addresses,
                routes,
            }))
        })
    }
}
