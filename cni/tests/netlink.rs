#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The veth setup (`weft_cni::netlink`) against the real kernel, inside a
//! lab host namespace with a hand-made bridge (`weft0`, 10.42.0.1/24). The
//! library always works on the calling thread's namespace as the "host", so
//! every call runs on a thread that has entered the lab host
//! (`common::in_netns`). Needs root; nothing is made in the root namespace.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use weft_cni::{NetError, Netlink, VethConfig};
use weft_model::{host_veth_name, Mac};
use weft_tests::in_netns;
use weft_tests::{Host, Lab, LabOptions, Netns};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);
const MTU: u32 = 1400;

fn lab_with_bridge() -> Lab {
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let host = lab.host(0);
    host.ip(["link", "add", "weft0", "type", "bridge"]).unwrap();
    host.ip(["addr", "add", "10.42.0.1/24", "dev", "weft0"])
        .unwrap();
    host.ip(["link", "set", "weft0", "up"]).unwrap();
    lab
}

fn veth(id: &str, ifname: &str, last: u8) -> VethConfig {
    VethConfig {
        ifname: ifname.into(),
        host_veth: host_veth_name(id, ifname),
        bridge: "weft0".into(),
        mac: Mac::for_addr(Ipv4Addr::new(10, 42, 0, last)),
        address: format!("10.42.0.{last}/24").parse().unwrap(),
        gateway: GATEWAY,
        mtu: MTU,
    }
}

fn attach_in(host: &Host, netns: &Netns, cfg: &VethConfig) -> Result<weft_cni::Attached, NetError> {
    in_netns(host.path(), || weft_cni::attach(netns.path(), cfg))
}

/// The host's links other than the lab's own (`lo`, `eth0`, `weft0`).
fn extra_host_links(host: &Host) -> Vec<String> {
    host.links()
        .unwrap()
        .into_iter()
        .filter(|l| !["lo", "eth0", "weft0"].contains(&l.as_str()))
        .collect()
}

fn link_line(ns: &Netns, dev: &str) -> String {
    ns.ip(["-o", "link", "show", "dev", dev]).unwrap()
}

#[test]
fn two_containers_attach_talk_and_detach() {
    weft_tests::require_root!();
    let lab = lab_with_bridge();
    let host = lab.host(0);
    let c1 = lab.container(0, "c1").unwrap();
    let c2 = lab.container(0, "c2").unwrap();
    // A runtime's fresh namespace may have lo down: attach brings it up.
    c2.ip(["link", "set", "lo", "down"]).unwrap();

    let v1 = veth("container-one", "eth0", 2);
    let v2 = veth("container-two", "eth0", 3);
    let a1 = attach_in(host, &c1, &v1).unwrap();
    let a2 = attach_in(host, &c2, &v2).unwrap();
    assert_eq!(a1.host_veth, v1.host_veth);
    assert_eq!(a1.ifname, "eth0");

    for (c, a, v) in [(&c1, &a1, &v1), (&c2, &a2, &v2)] {
        // MTU on both ends; host end on the bridge and up.
        assert_eq!(c.link_mtu("eth0").unwrap(), MTU);
        assert_eq!(host.link_mtu(&v.host_veth).unwrap(), MTU);
        let host_line = link_line(host, &v.host_veth);
        assert!(host_line.contains("master weft0"), "{host_line}");
        assert!(host_line.contains(",UP"), "{host_line}");
        // The container end: up, with the MAC reported, the address, routes.
        let line = link_line(c, "eth0");
        assert!(line.contains(",UP"), "{line}");
        let mac = a.container_mac.clone().unwrap();
        assert!(line.contains(&mac), "{mac} not in {line}");
        // The MAC is the one asked for (anti-spoofing allows only it).
        assert_eq!(mac, v.mac.to_string());
        assert!(line.contains(&format!("link/ether {} ", v.mac)), "{line}");
        assert!(
            host_line.contains(a.host_mac.as_deref().unwrap()),
            "{host_line}"
        );
        let addrs = c.ip(["-4", "-o", "addr", "show", "dev", "eth0"]).unwrap();
        assert!(addrs.contains(&v.address.to_string()), "{addrs}");
        let routes = c.ip(["-4", "route", "show"]).unwrap();
        assert!(
            routes.contains("default via 10.42.0.1 dev eth0"),
            "{routes}"
        );
        assert!(
            routes.contains("169.254.169.250 via 10.42.0.1 dev eth0"),
            "{routes}"
        );
        let lo = link_line(c, "lo");
        assert!(lo.contains(",UP"), "{lo}");
        // Nothing named like the container's interface appeared on the host.
        assert!(!host.links().unwrap().contains(&"eth0@".to_string()));
    }

    // Containers reach each other and the gateway.
    c1.exec(["ping", "-c1", "-W2", "10.42.0.3"]).unwrap();
    c2.exec(["ping", "-c1", "-W2", "10.42.0.2"]).unwrap();
    c1.exec(["ping", "-c1", "-W2", "10.42.0.1"]).unwrap();
    c2.exec(["ping", "-c1", "-W2", "10.42.0.1"]).unwrap();
    // Full-MTU packets pass, one byte more does not (DF set).
    let payload = (MTU - 28).to_string();
    c1.exec([
        "ping",
        "-c1",
        "-W2",
        "-M",
        "do",
        "-s",
        &payload,
        "10.42.0.3",
    ])
    .unwrap();
    let too_big = (MTU - 27).to_string();
    assert!(c1
        .exec([
            "ping",
            "-c1",
            "-W1",
            "-M",
            "do",
            "-s",
            &too_big,
            "10.42.0.3"
        ])
        .is_err());

    // What CHECK sees.
    let state = in_netns(host.path(), || {
        let nl = Netlink::new().unwrap();
        let sb = nl.sandbox(c1.path()).unwrap();
        let inside = sb.inspect("eth0").unwrap().unwrap();
        let missing = sb.inspect("eth9").unwrap();
        let host_end = nl.link(&v1.host_veth).unwrap().unwrap();
        let bridge = nl.link("weft0").unwrap().unwrap();
        let mut veths = nl.host_veths().unwrap();
        veths.sort();
        (inside, missing, host_end, bridge, veths)
    });
    let (inside, missing, host_end, bridge, veths) = state;
    assert_eq!(missing, None);
    assert_eq!(inside.link.mtu, Some(MTU));
    assert!(inside.link.up);
    assert_eq!(inside.link.kind.as_deref(), Some("veth"));
    assert_eq!(inside.addresses, vec![v1.address]);
    assert!(inside
        .routes
        .iter()
        .any(|r| r.dst.prefix() == 0 && r.gateway == Some(GATEWAY)));
    assert!(inside
        .routes
        .iter()
        .any(|r| r.dst.ip() == weft_api::DNS_ADDR && r.gateway == Some(GATEWAY)));
    assert_eq!(host_end.master, Some(bridge.index));
    assert_eq!(bridge.kind.as_deref(), Some("bridge"));
    let mut want = vec![v1.host_veth.clone(), v2.host_veth.clone()];
    want.sort();
    assert_eq!(veths, want);

    // Detach removes both ends; a second detach finds nothing.
    for v in [&v1, &v2] {
        assert!(in_netns(host.path(), || weft_cni::detach(&v.host_veth)).unwrap());
        assert!(!in_netns(host.path(), || weft_cni::detach(&v.host_veth)).unwrap());
    }
    assert_eq!(extra_host_links(host), Vec::<String>::new());
    assert_eq!(c1.links().unwrap(), vec!["lo".to_string()]);
    assert_eq!(c2.links().unwrap(), vec!["lo".to_string()]);
}

#[test]
fn failures_leave_nothing_behind() {
    weft_tests::require_root!();
    let lab = lab_with_bridge();
    let host = lab.host(0);
    let c1 = lab.container(0, "c1").unwrap();
    let c2 = lab.container(0, "c2").unwrap();
    let v1 = veth("container-one", "eth0", 2);
    attach_in(host, &c1, &v1).unwrap();
    let before = extra_host_links(host);

    // The same attachment again: the host end exists.
    let e = attach_in(host, &c1, &v1).unwrap_err();
    assert!(matches!(e, NetError::HostVethExists { .. }), "{e}");
    // Another attachment whose interface name is taken in that container.
    let e = attach_in(host, &c1, &veth("container-x", "eth0", 9)).unwrap_err();
    assert!(matches!(e, NetError::IfnameExists { .. }), "{e}");
    assert!(e.is_exists());
    // The first attachment is untouched.
    assert_eq!(extra_host_links(host), before);
    c1.exec(["ping", "-c1", "-W2", "10.42.0.1"]).unwrap();

    // Each of these fails in c2 and must leave c2 and the host as they were.
    let no_bridge = VethConfig {
        bridge: "nobridge0".into(),
        ..veth("container-two", "eth0", 3)
    };
    let bad_mtu = VethConfig {
        mtu: 20,
        ..veth("container-two", "eth0", 3)
    };
    // Fails only after the pair exists (the gateway is unreachable), so the
    // pair must be rolled back.
    let bad_gateway = VethConfig {
        gateway: Ipv4Addr::new(10, 99, 0, 1),
        ..veth("container-two", "eth0", 3)
    };
    let bad_name = VethConfig {
        ifname: "much-too-long-ifname".into(),
        ..veth("container-two", "eth0", 3)
    };
    for (what, cfg) in [
        ("missing bridge", &no_bridge),
        ("bad mtu", &bad_mtu),
        ("unreachable gateway", &bad_gateway),
        ("bad name", &bad_name),
    ] {
        let e = attach_in(host, &c2, cfg).unwrap_err();
        match what {
            "missing bridge" => assert!(matches!(e, NetError::NoBridge { .. }), "{e}"),
            "bad name" => assert!(matches!(e, NetError::InvalidName(_)), "{e}"),
            _ => assert!(matches!(e, NetError::Netlink { .. }), "{what}: {e}"),
        }
        assert_eq!(extra_host_links(host), before, "{what}: {e}");
        assert_eq!(c2.links().unwrap(), vec!["lo".to_string()], "{what}: {e}");
    }
    let e = attach_in(host, &c2, &bad_gateway).unwrap_err();
    assert!(e.to_string().contains("10.99.0.1"), "{e}");

    // After all that, c2 attaches fine.
    attach_in(host, &c2, &veth("container-two", "eth0", 3)).unwrap();
    c2.exec(["ping", "-c1", "-W2", "10.42.0.2"]).unwrap();
}

#[test]
fn namespaces_are_checked() {
    weft_tests::require_root!();
    let lab = lab_with_bridge();
    let host = lab.host(0);
    let v = veth("container-one", "eth0", 2);
    // The host's own namespace is no container.
    let e = attach_in(host, host, &v).unwrap_err();
    assert!(matches!(e, NetError::SameNetns { .. }), "{e}");
    let e = in_netns(host.path(), || {
        weft_cni::attach("/var/run/netns/weft-cni-test-missing", &v)
    })
    .unwrap_err();
    assert!(matches!(e, NetError::NetnsMissing { .. }), "{e}");
    // Another kind of namespace file.
    let e = in_netns(host.path(), || weft_cni::attach("/proc/self/ns/uts", &v)).unwrap_err();
    assert!(matches!(e, NetError::NotNetns { .. }), "{e}");
    assert_eq!(extra_host_links(host), Vec::<String>::new());
}

/// How long ADD's netlink work takes: open the container namespace, the two
/// existence checks the plugin makes, and the attach, per container.
#[test]
fn attach_latency() {
    weft_tests::require_root!();
    let lab = lab_with_bridge();
    let host = lab.host(0);
    const N: u8 = 12;
    let containers: Vec<_> = (0..N)
        .map(|i| lab.container(0, &format!("t{i}")).unwrap())
        .collect();
    let (attach_times, detach_times) = in_netns(host.path(), || {
        let mut attach = Vec::new();
        for (i, c) in containers.iter().enumerate() {
            let id = format!("latency-{i}");
            let cfg = veth(&id, "eth0", 2 + i as u8);
            let start = Instant::now();
            let nl = Netlink::new().unwrap();
            let sb = nl.sandbox(c.path()).unwrap();
            assert!(nl.link(&cfg.host_veth).unwrap().is_none());
            assert!(!sb.has_link("eth0").unwrap());
            sb.attach(&cfg).unwrap();
            attach.push(start.elapsed());
        }
        let mut detach = Vec::new();
        for i in 0..containers.len() {
            let start = Instant::now();
            assert!(weft_cni::detach(&host_veth_name(&format!("latency-{i}"), "eth0")).unwrap());
            detach.push(start.elapsed());
        }
        (attach, detach)
    });
    let summary = |name: &str, mut d: Vec<Duration>| {
        d.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        eprintln!(
            "{name}: n={} min {:.3} ms, median {:.3} ms, max {:.3} ms",
            d.len(),
            ms(d[0]),
            ms(d[d.len() / 2]),
            ms(d[d.len() - 1])
        );
        d[d.len() / 2]
    };
    let median = summary("ADD netlink work (attach)", attach_times);
    summary("DEL netlink work (detach)", detach_times);
    // Generous bound: this is a smoke test for pathological slowness, the
    // numbers above are the measurement.
    assert!(
        median < Duration::from_millis(200),
        "median attach {median:?}"
    );
}
