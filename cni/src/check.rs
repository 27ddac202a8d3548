//! CHECK: compares what netd, the `prevResult` and the kernel say about an
//! attachment, and lists every difference.

use ipnetwork::{IpNetwork, Ipv4Network};
use weft_api::Endpoint;

use crate::netlink::{InterfaceState, LinkState, RouteState};
use crate::result::CniResult;

/// What CHECK found on the machine.
#[derive(Debug, Clone, Default)]
pub struct Observed<'a> {
    /// The host-side veth, if it exists.
    pub host: Option<&'a LinkState>,
    /// The bridge netd named, if it exists.
    pub bridge: Option<&'a LinkState>,
    /// The interface inside the container, if it exists.
    pub iface: Option<&'a InterfaceState>,
}

/// The attachment being checked.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    pub endpoint: &'a Endpoint,
    pub ifname: &'a str,
    pub netns: &'a str,
    pub host_veth: &'a str,
}

fn routes_text(routes: &[RouteState]) -> String {
    if routes.is_empty() {
        return "none".into();
    }
    routes
        .iter()
        .map(|r| match r.gateway {
            Some(gw) => format!("{} via {gw}", r.dst),
            None => r.dst.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every way in which the attachment differs from what it should be; empty
/// if it is fine.
pub fn diagnose(want: &Expected<'_>, prev: &CniResult, seen: &Observed<'_>) -> Vec<String> {
    let ep = want.endpoint;
    let mut problems = Vec::new();

    // The previous result must describe this attachment.
    let prev_iface = prev
        .interfaces
        .iter()
        .position(|i| i.name == want.ifname && i.sandbox.as_deref() == Some(want.netns));
    if prev_iface.is_none() {
        problems.push(format!(
            "prevResult has no interface {} in sandbox {}",
            want.ifname, want.netns
        ));
    }
    let address = IpNetwork::V4(ep.address);
    if !prev.ips.iter().any(|ip| ip.address == address) {
        problems.push(format!(
            "prevResult does not list address {address} (netd's address for the container)"
        ));
    }

    match seen.host {
        None => problems.push(format!("host interface {} is missing", want.host_veth)),
        Some(h) => {
            if h.kind.as_deref() != Some("veth") {
                problems.push(format!(
                    "host interface {} is a {}, not a veth",
                    want.host_veth,
                    h.kind.as_deref().unwrap_or("device without kind")
                ));
            }
            if !h.up {
                problems.push(format!("host interface {} is down", want.host_veth));
            }
            if h.mtu != Some(ep.mtu) {
                problems.push(format!(
                    "host interface {} has MTU {}, expected {}",
                    want.host_veth,
                    h.mtu.map_or("?".into(), |m| m.to_string()),
                    ep.mtu
                ));
            }
            match seen.bridge {
                None => problems.push(format!("bridge {} is missing", ep.bridge)),
                Some(b) if h.master != Some(b.index) => problems.push(format!(
                    "host interface {} is not on bridge {}",
                    want.host_veth, ep.bridge
                )),
                Some(_) => {}
            }
        }
    }

    let Some(iface) = seen.iface else {
        problems.push(format!(
            "interface {} is missing in {}",
            want.ifname, want.netns
        ));
        return problems;
    };
    if !iface.link.up {
        problems.push(format!("interface {} is down", want.ifname));
    }
    if iface.link.mtu != Some(ep.mtu) {
        problems.push(format!(
            "interface {} has MTU {}, expected {}",
            want.ifname,
            iface.link.mtu.map_or("?".into(), |m| m.to_string()),
            ep.mtu
        ));
    }
    // netd's anti-spoofing drops everything the interface sends with
    // another MAC (an older netd does not say which MAC: nothing to check).
    if let Some(mac) = ep.mac {
        let have = iface.link.mac.as_deref();
        if have.and_then(|m| m.parse::<weft_model::Mac>().ok()) != Some(mac) {
            problems.push(format!(
                "interface {} has MAC {}, expected {mac} (anything else is dropped as spoofed)",
                want.ifname,
                have.unwrap_or("?")
            ));
        }
    }
    if !iface.addresses.contains(&ep.address) {
        problems.push(format!(
            "interface {} has address(es) [{}], expected {}",
            want.ifname,
            iface
                .addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            ep.address
        ));
    }
    let wanted_routes = [
        (
            "default route",
            Ipv4Network::new(std::net::Ipv4Addr::UNSPECIFIED, 0),
        ),
        (
            "route to 169.254.169.250",
            Ipv4Network::new(weft_api::DNS_ADDR, 32),
        ),
    ];
    for (what, dst) in wanted_routes {
        let Ok(dst) = dst else { continue };
        let ok = iface
            .routes
            .iter()
            .any(|r| r.dst == dst && r.gateway == Some(ep.gateway));
        if !ok {
            problems.push(format!(
                "no {what} via {} on {} (routes there: {})",
                ep.gateway,
                want.ifname,
                routes_text(&iface.routes)
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use weft_api::DnsConfig;

    use super::*;
    use crate::result::{Interface, IpConfig};

    fn endpoint() -> Endpoint {
        Endpoint {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/c1".into(),
            host_id: "h0".into(),
            address: "10.42.0.2/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 42, 0, 1),
            mtu: 1400,
            bridge: "weft0".into(),
            mac: Some(weft_model::Mac::for_addr(Ipv4Addr::new(10, 42, 0, 2))),
            name: None,
            service: None,
            stack: None,
            aliases: vec![],
            port_mappings: vec![],
            dns: DnsConfig::default(),
            created_at_ms: 0,
        }
    }

    fn link(name: &str, index: u32, kind: &str, master: Option<u32>) -> LinkState {
        LinkState {
            name: name.into(),
            index,
            kind: Some(kind.into()),
            mac: None,
            mtu: Some(1400),
            up: true,
            master,
        }
    }

    fn good() -> (CniResult, LinkState, LinkState, InterfaceState) {
        let prev = CniResult {
            interfaces: vec![
                Interface {
                    name: "wfabc".into(),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    sandbox: Some("/var/run/netns/c1".into()),
                    ..Default::default()
                },
            ],
            ips: vec![IpConfig {
                address: "10.42.0.2/24".parse().unwrap(),
                gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 42, 0, 1))),
                interface: Some(1),
            }],
            ..Default::default()
        };
        let gw = Some(Ipv4Addr::new(10, 42, 0, 1));
        let iface = InterfaceState {
            link: LinkState {
                mac: Some("0a:58:0a:2a:00:02".into()),
                ..link("eth0", 2, "veth", None)
            },
            addresses: vec!["10.42.0.2/24".parse().unwrap()],
            routes: vec![
                RouteState {
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gateway: gw,
                },
                RouteState {
                    dst: "10.42.0.0/24".parse().unwrap(),
                    gateway: None,
                },
                RouteState {
                    dst: "169.254.169.250/32".parse().unwrap(),
                    gateway: gw,
                },
            ],
        };
        (
            prev,
            link("wfabc", 7, "veth", Some(3)),
            link("weft0", 3, "bridge", None),
            iface,
        )
    }

    #[test]
    fn a_good_attachment_has_no_problems() {
        let ep = endpoint();
        let want = Expected {
            endpoint: &ep,
            ifname: "eth0",
            netns: "/var/run/netns/c1",
            host_veth: "wfabc",
        };
        let (prev, host, bridge, iface) = good();
        let seen = Observed {
            host: Some(&host),
            bridge: Some(&bridge),
            iface: Some(&iface),
        };
        assert_eq!(diagnose(&want, &prev, &seen), Vec::<String>::new());
    }

    #[test]
    fn reports_every_difference() {
        let ep = endpoint();
        let want = Expected {
            endpoint: &ep,
            ifname: "eth0",
            netns: "/var/run/netns/c1",
            host_veth: "wfabc",
        };
        let (mut prev, mut host, bridge, mut iface) = good();
        prev.ips[0].address = "10.42.0.9/24".parse().unwrap();
        host.master = None;
        host.up = false;
        iface.link.mtu = Some(1500);
        iface.link.mac = Some("0a:58:0a:2a:00:03".into());
        iface.addresses.clear();
        iface.routes.retain(|r| r.dst.prefix() != 32);
        let seen = Observed {
            host: Some(&host),
            bridge: Some(&bridge),
            iface: Some(&iface),
        };
        let problems = diagnose(&want, &prev, &seen);
        let text = problems.join("\n");
        assert_eq!(problems.len(), 7, "{text}");
        assert!(
            text.contains("prevResult does not list address 10.42.0.2/24"),
            "{text}"
        );
        assert!(text.contains("host interface wfabc is down"), "{text}");
        assert!(text.contains("not on bridge weft0"), "{text}");
        assert!(text.contains("MTU 1500, expected 1400"), "{text}");
        assert!(
            text.contains("MAC 0a:58:0a:2a:00:03, expected 0a:58:0a:2a:00:02"),
            "{text}"
        );
        assert!(text.contains("expected 10.42.0.2/24"), "{text}");
        assert!(
            text.contains("no route to 169.254.169.250 via 10.42.0.1"),
            "{text}"
        );
    }

    #[test]
    fn missing_pieces() {
        let ep = endpoint();
        let want = Expected {
            endpoint: &ep,
            ifname: "eth0",
            netns: "/var/run/netns/c1",
            host_veth: "wfabc",
        };
        let problems = diagnose(&want, &CniResult::default(), &Observed::default());
        let text = problems.join("\n");
        assert!(text.contains("prevResult has no interface eth0"), "{text}");
        assert!(text.contains("host interface wfabc is missing"), "{text}");
        assert!(
            text.contains("interface eth0 is missing in /var/run/netns/c1"),
            "{text}"
        );
    }
}
