#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The anti-spoofing table ([`weft_netd::nft::spoof::render`]) on a real
//! kernel, without netd: a lab host with a bridge and two containers wired
//! as the CNI plugin wires them (host veth named by
//! `weft_model::host_veth_name`, container MAC `Mac::for_addr`). Their own
//! IPv4 traffic flows; an IP spoof, an ARP spoof and a MAC spoof from one of
//! them fail and are counted on its port; IPv6 is dropped uncounted; without the table the same ARP
//! spoof poisons the host's neighbour table (so the test sees the attack
//! work where nothing stops it). The whole path through netd and the plugin
//! is tests/tests/spoof.rs. Needs root; everything happens in lab
//! namespaces.

use std::net::Ipv4Addr;

use weft_model::{host_veth_name, EndpointRecord, Keys, Mac};
use weft_netd::enforce::Enforcer;
use weft_netd::nft::spoof::{drops_by_container, render};
use weft_netd::nft::{Desired, Nft};
use weft_tests::spoof::{arp_spoof, fdb_ports, ip_spoof, mac, mac_spoof, neighbour_mac, pings};
use weft_tests::{Container, Host, Lab, LabOptions};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);

fn record(id: &str, addr: Ipv4Addr) -> EndpointRecord {
    serde_json::from_value(serde_json::json!({
        "container_id": id, "ifname": "eth0", "netns": "", "host_id": "h0",
        "address": format!("{addr}/24"), "gateway": GATEWAY.to_string(), "mtu": 1400,
        "bridge": "weft0", "dns": {"nameservers": [], "domain": "weft", "search": []},
        "created_at_ms": 0
    }))
    .unwrap()
}

/// A veth pair as the plugin makes it: host end on the bridge, container
/// end with the derived MAC and the address.
fn wire(host: &Host, c: &Container, id: &str, addr: Ipv4Addr) {
    let port = host_veth_name(id, "eth0");
    let mac = Mac::for_addr(addr).to_string();
    host.ip([
        "link",
        "add",
        &port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        c.name(),
    ])
    .unwrap();
    host.ip(["link", "set", &port, "master", "weft0", "up"])
        .unwrap();
    c.ip(["link", "set", "eth0", "address", &mac]).unwrap();
    c.ip(["addr", "add", &format!("{addr}/24"), "dev", "eth0"])
        .unwrap();
    c.ip(["link", "set", "eth0", "up"]).unwrap();
}

fn drops(nft: &Nft, id: &str) -> u64 {
    drops_by_container(&nft.counters().unwrap())
        .get(id)
        .copied()
        .unwrap_or_else(|| panic!("no anti-spoofing counter for {id}"))
}

#[test]
fn spoofing_fails_and_is_counted_own_traffic_flows() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let host = lab.host(0);
    host.ip(["link", "add", "weft0", "type", "bridge"]).unwrap();
    host.ip(["addr", "add", "10.42.0.1/24", "dev", "weft0"])
        .unwrap();
    host.ip(["link", "set", "weft0", "up"]).unwrap();
    let (ip_a, ip_b) = (Ipv4Addr::new(10, 42, 0, 2), Ipv4Addr::new(10, 42, 0, 3));
    let a = lab.container(0, "a").unwrap();
    let b = lab.container(0, "b").unwrap();
    wire(host, &a, "ctr-a", ip_a);
    wire(host, &b, "ctr-b", ip_b);
    let mac_b = Mac::for_addr(ip_b).to_string();
    let port_b = host_veth_name("ctr-b", "eth0");

    // Without the table the ARP spoof works: the host now sends b's
    // traffic to a.
    host.exec(["ping", "-c1", "-W2", &ip_b.to_string()])
        .unwrap();
    assert_eq!(neighbour_mac(host, ip_b).unwrap(), Some(mac_b.clone()));
    arp_spoof(&a, ip_b).unwrap();
    assert_eq!(
        neighbour_mac(host, ip_b).unwrap(),
        Some(mac(&a, "eth0").unwrap()),
        "the ARP spoof should work without anti-spoofing"
    );
    host.ip(["neigh", "flush", "dev", "weft0"]).unwrap();
    // IPv6 between the containers works too (once b's link-local address
    // has passed duplicate address detection).
    let line = b
        .ip(["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"])
        .unwrap();
    let b6 = line
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(|a| format!("{a}%eth0"))
        .unwrap_or_else(|| panic!("no IPv6 link-local address on b: {line:?}"));
    let ping6 = |c: &Container| {
        c.output(["ping", "-6", "-c1", "-W1", &b6])
            .unwrap()
            .status
            .success()
    };
    weft_tests::wait_until(std::time::Duration::from_secs(5), "IPv6 a -> b", || {
        ping6(&a)
    })
    .unwrap();

    let nft = Nft::new().in_netns(host.netns().name());
    let local = [record("ctr-a", ip_a), record("ctr-b", ip_b)];
    nft.apply(&Desired {
        policy: None,
        spoof: Some(render(&local)),
        services: None,
    })
    .unwrap();

    // Own traffic flows: to the neighbour, to the gateway, both ways.
    for (c, to) in [(&a, ip_b), (&a, GATEWAY), (&b, ip_a), (&b, GATEWAY)] {
        assert!(pings(c, to).unwrap(), "{} -> {to}", c.name());
    }
    host.exec(["ping", "-c1", "-W2", &ip_b.to_string()])
        .unwrap();
    assert_eq!(drops(&nft, "ctr-a"), 0);

    // IP spoof: a sends with b's address.
    assert!(!ip_spoof(&a, ip_b, GATEWAY).unwrap(), "IP spoof answered");
    let after_ip = drops(&nft, "ctr-a");
    assert!(after_ip >= 2, "{after_ip}");

    // ARP spoof: a claims b's address; the host keeps b's MAC.
    arp_spoof(&a, ip_b).unwrap();
    assert_eq!(neighbour_mac(host, ip_b).unwrap(), Some(mac_b.clone()));
    let after_arp = drops(&nft, "ctr-a");
    assert!(after_arp >= after_ip + 2, "{after_ip} -> {after_arp}");

    // MAC spoof: a takes b's MAC; nothing passes and the bridge keeps b's
    // MAC on b's port.
    assert!(
        !mac_spoof(&a, &mac_b, GATEWAY).unwrap(),
        "MAC spoof answered"
    );
    assert_eq!(fdb_ports(host, &mac_b).unwrap(), vec![port_b.clone()]);
    let after_mac = drops(&nft, "ctr-a");
    assert!(after_mac >= after_arp + 2, "{after_arp} -> {after_mac}");

    // IPv6 is dropped (weft is IPv4 only), and not counted as a spoof.
    assert!(!ping6(&a), "IPv6 passed");
    assert_eq!(drops(&nft, "ctr-a"), after_mac);

    // a is fine again, b never dropped anything.
    assert!(pings(&a, ip_b).unwrap());
    assert!(pings(&a, GATEWAY).unwrap());
    assert_eq!(drops(&nft, "ctr-b"), 0);

    // Removing a's record removes its port and its counter.
    nft.apply(&Desired {
        policy: None,
        spoof: Some(render(&local[1..])),
        services: None,
    })
    .unwrap();
    let listed = nft.list("bridge").unwrap();
    assert!(
        !listed.contains(&host_veth_name("ctr-a", "eth0")),
        "{listed}"
    );
    assert!(listed.contains(&port_b), "{listed}");
    assert!(!drops_by_container(&nft.counters().unwrap()).contains_key("ctr-a"));
    nft.teardown().unwrap();
}

/// A netd that starts while the store does not answer knows neither the
/// policy nor its endpoints: its resync must leave the anti-spoofing table
/// the previous netd left in the kernel alone (an empty table would let
/// every container spoof). Once it knows this host's records (an endpoint
/// add, or the first listing), it writes the table from them.
#[test]
fn a_netd_that_knows_no_records_keeps_the_table() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let ns = lab.host(0).netns().name().to_owned();
    let (ip_a, ip_b) = (Ipv4Addr::new(10, 42, 0, 2), Ipv4Addr::new(10, 42, 0, 3));
    let local = [record("ctr-a", ip_a), record("ctr-b", ip_b)];
    let (port_a, port_b) = (
        host_veth_name("ctr-a", "eth0"),
        host_veth_name("ctr-b", "eth0"),
    );
    // What the previous netd left.
    Nft::new()
        .in_netns(&ns)
        .apply(&Desired {
            policy: None,
            spoof: Some(render(&local)),
            services: None,
        })
        .unwrap();

    let state = tempfile::tempdir().unwrap();
    let enforcer = Enforcer::new(
        Nft::new().in_netns(&ns),
        "h0",
        "10.42.0.0/16".parse().unwrap(),
        "10.42.0.0/24".parse().unwrap(),
        state.path(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(enforcer.reapply()).unwrap();
    let listed = enforcer.nft().list("bridge").unwrap();
    assert!(
        listed.contains(&port_a) && listed.contains(&port_b),
        "the table was emptied:\n{listed}"
    );

    // An endpoint change tells it this host's records: b is gone.
    rt.block_on(enforcer.set_local(&Keys::new("/weft/"), local[..1].to_vec()))
        .unwrap();
    let listed = enforcer.nft().list("bridge").unwrap();
    assert!(listed.contains(&port_a), "{listed}");
    assert!(!listed.contains(&port_b), "{listed}");
    enforcer.nft().teardown().unwrap();
}
