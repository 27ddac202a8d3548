//! Anti-spoofing end to end: netd on two lab hosts (each backend), containers
//! attached by the CNI plugin. A container on host 0 that takes its
//! neighbour's address (the issue's `ip addr add <neighbour>/32 dev eth0;
//! ping -I <neighbour> <container on host 1>`), claims it by gratuitous ARP,
//! or takes its neighbour's MAC gets nothing through; its own traffic, on
//! the host and across hosts, still flows; netd's
//! `weft_spoof_drops_total{container}` counts the drops; a DEL takes the
//! port out of the table. Needs root, busybox (arping) and python3 (the
//! metrics GET).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use weft_model::{host_veth_name, Mac};
use weft_tests::spoof::{arp_spoof, fdb_ports, ip_spoof, mac, mac_spoof, neighbour_mac, pings};
use weft_tests::weft::{CniCall, Netd};
use weft_tests::{Container, Lab, LabOptions, Netns};

const METRICS: &str = "127.0.0.1:9311";

fn sqlite(lab: &Lab) -> String {
    format!("sqlite:{}", lab.dir().join("store.db").display())
}

fn attach(netd: &Netd, c: &Container, id: &str) -> Ipv4Addr {
    netd.attach(c, id).unwrap().parse().unwrap()
}

/// Pings until `to` answers (the mesh may still be forming).
fn reach(from: &Container, to: Ipv4Addr) {
    let t = Instant::now();
    while !pings(from, to).unwrap() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{to} not reachable from {}",
            from.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `weft_spoof_drops_total{container="<id>"}` from netd's /metrics in `ns`
/// (`None` if the container has no series).
fn spoof_drops(ns: &Netns, id: &str) -> Option<u64> {
    let script = "import sys, urllib.request\n\
                  print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())";
    let body = ns
        .exec([
            "python3",
            "-c",
            script,
            &format!("http://{METRICS}/metrics"),
        ])
        .unwrap();
    let series = format!("weft_spoof_drops_total{{container=\"{id}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
}

fn spoofing(backend: &str) {
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let store = sqlite(&lab);
    let flags = [
        format!("--backend={backend}"),
        format!("--metrics-addr={METRICS}"),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let netd0 = Netd::start(&lab, 0, &store, &flags).unwrap();
    let netd1 = Netd::start(&lab, 1, &store, &flags).unwrap();
    let host0 = lab.host(0);
    let a = lab.container(0, "a").unwrap();
    let b = lab.container(0, "b").unwrap();
    let c = lab.container(1, "c").unwrap();
    let ip_a = attach(&netd0, &a, "ctr-a");
    let ip_b = attach(&netd0, &b, "ctr-b");
    let ip_c = attach(&netd1, &c, "ctr-c");
    let status = netd0.cli(&["status", "--json"]).unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let gateway: Ipv4Addr = status["gateway"].as_str().unwrap().parse().unwrap();

    // The plugin gave each container the MAC netd allows.
    for (ctr, ip) in [(&a, ip_a), (&b, ip_b), (&c, ip_c)] {
        assert_eq!(mac(ctr, "eth0").unwrap(), Mac::for_addr(ip).to_string());
    }
    let mac_b = Mac::for_addr(ip_b).to_string();
    let port_a = host_veth_name("ctr-a", "eth0");
    let port_b = host_veth_name("ctr-b", "eth0");
    let table = host0
        .exec(["nft", "list", "table", "bridge", "weft"])
        .unwrap();
    for want in [&port_a, &port_b] {
        assert!(table.contains(want.as_str()), "{want} not in\n{table}");
    }

    // Own traffic flows: on the host and across hosts.
    reach(&a, ip_c);
    reach(&c, ip_a);
    for to in [ip_b, gateway, ip_c] {
        assert!(pings(&a, to).unwrap(), "a -> {to}");
    }
    host0
        .exec(["ping", "-c1", "-W2", &ip_b.to_string()])
        .unwrap();
    assert_eq!(spoof_drops(host0, "ctr-a"), Some(0));

    // IP spoof, the example: a uses b's address towards c on the
    // other host, and towards the gateway.
    assert!(
        !ip_spoof(&a, ip_b, ip_c).unwrap(),
        "IP spoof to {ip_c} answered"
    );
    assert!(
        !ip_spoof(&a, ip_b, gateway).unwrap(),
        "IP spoof to the gateway answered"
    );
    let after_ip = spoof_drops(host0, "ctr-a").unwrap();
    assert!(after_ip >= 4, "{after_ip}");

    // ARP spoof: a claims b's address; the host keeps b's MAC for it.
    assert_eq!(neighbour_mac(host0, ip_b).unwrap(), Some(mac_b.clone()));
    arp_spoof(&a, ip_b).unwrap();
    assert_eq!(neighbour_mac(host0, ip_b).unwrap(), Some(mac_b.clone()));
    let after_arp = spoof_drops(host0, "ctr-a").unwrap();
    assert!(after_arp >= after_ip + 2, "{after_ip} -> {after_arp}");

    // MAC spoof: a takes b's MAC; nothing passes, the bridge keeps b's MAC
    // on b's port.
    assert!(!mac_spoof(&a, &mac_b, ip_c).unwrap(), "MAC spoof answered");
    assert_eq!(fdb_ports(host0, &mac_b).unwrap(), vec![port_b.clone()]);
    let after_mac = spoof_drops(host0, "ctr-a").unwrap();
    assert!(after_mac >= after_arp + 2, "{after_arp} -> {after_mac}");

    // a's own traffic is fine again; b and c never sent anything spoofed.
    for to in [ip_b, gateway, ip_c] {
        assert!(pings(&a, to).unwrap(), "a -> {to} after the attacks");
    }
    assert!(pings(&b, ip_c).unwrap());
    assert_eq!(spoof_drops(host0, "ctr-b"), Some(0));
    assert_eq!(spoof_drops(lab.host(1), "ctr-c"), Some(0));

    // DEL takes a's port out of the table.
    let del = CniCall {
        host: netd0.host(),
        command: "DEL",
        container_id: "ctr-a",
        netns: &a.path().display().to_string(),
        ifname: "eth0",
        args: "IgnoreUnknown=1",
        config: &netd0.cni_config("1.0.0"),
    }
    .run()
    .unwrap();
    assert!(del.ok(), "{} {}", del.stdout, del.stderr);
    // netd answers a DEL before the nf_tables step and batches that step
    // over a burst of DELs (the veth is gone already; a stale entry only
    // restricts a port that no longer exists): the port leaves the table
    // within the batcher's linger, well under a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let table = loop {
        let table = host0
            .exec(["nft", "list", "table", "bridge", "weft"])
            .unwrap();
        if !table.contains(&port_a) || std::time::Instant::now() > deadline {
            break table;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(!table.contains(&port_a), "{port_a} still in\n{table}");
    assert!(table.contains(&port_b), "{table}");
    // b's traffic out of the host still flows: removing a's port from
    // the bridge did not change the gateway's MAC under b's ARP entry.
    assert!(pings(&b, ip_c).unwrap(), "b -> {ip_c} after a's DEL");
}

#[test]
fn wireguard_container_cannot_pose_as_another() {
    weft_tests::require_root!();
    spoofing("wireguard");
}

#[test]
fn vxlan_container_cannot_pose_as_another() {
    weft_tests::require_root!();
    spoofing("vxlan");
}
