//! The multi-host mesh: several netds on one store, containers on every
//! host reaching each other through the tunnels. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use weft_store::testing::EtcdServer;
use weft_tests::weft::{CniCall, Netd};
use weft_tests::{Container, Lab, LabOptions};

/// A container attached through the CNI plugin, with its address.
struct Ctr {
    c: Container,
    ip: String,
}

fn attach(netd: &Netd, c: Container, id: &str) -> Ctr {
    let out = CniCall {
        host: netd.host(),
        command: "ADD",
        container_id: id,
        netns: &c.path().display().to_string(),
        ifname: "eth0",
        args: "IgnoreUnknown=1",
        config: &netd.cni_config("1.0.0"),
    }
    .run()
    .unwrap();
    assert!(out.ok(), "ADD {id}: {} {}", out.stdout, out.stderr);
    let ip = out.json()["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    Ctr { c, ip }
}

/// Pings until it answers (a peer appears within `within`).
fn ping_within(from: &Container, to: &str, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        if from
            .output(["ping", "-c1", "-W1", to])
            .unwrap()
            .status
            .success()
        {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "{to} not reachable from {} within {within:?}",
            from.name()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP transfer of `mb` megabytes with iperf3 from `from` to `to`.
fn transfer(from: &Ctr, to: &Ctr, mb: u32) -> f64 {
    let mut server = to.c.spawn(["iperf3", "-s", "-1"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = from
        .c
        .exec(["iperf3", "-c", &to.ip, "-n", &format!("{mb}M"), "-J"])
        .unwrap();
    let _ = server.wait_timeout(Duration::from_secs(5));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // iperf3 stops counting at the server when the client is done, so the
    // last in-flight bytes may be missing from sum_received.
    let sent = v["end"]["sum_sent"]["bytes"].as_f64().unwrap();
    let received = v["end"]["sum_received"]["bytes"].as_f64().unwrap();
    assert!(sent >= f64::from(mb) * 1_048_576.0, "sent only {sent} bytes");
    assert!(received >= sent * 0.8, "received {received} of {sent} bytes");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
        / 1e9
}

fn full_mesh(lab: &Lab, store: &str, backend: &str) {
    let ttl = "--host-ttl-secs=3";
    let backend_flag = format!("--backend={backend}");
    let mut netds: Vec<Netd> = (0..3)
        .map(|i| Netd::start(lab, i, store, &[&backend_flag, ttl]).unwrap())
        .collect();
    let mut ctrs: Vec<Vec<Ctr>> = Vec::new();
    for (h, netd) in netds.iter().enumerate() {
        ctrs.push(
            (0..2)
                .map(|j| {
                    attach(
                        netd,
                        lab.container(h, &format!("c{j}")).unwrap(),
                        &format!("h{h}c{j}"),
                    )
                })
                .collect(),
        );
    }
    // Every container reaches every other (the first ping may wait for the
    // peers to appear: within 1 s of a host joining).
    for (h, row) in ctrs.iter().enumerate() {
        for from in row {
            for (h2, row2) in ctrs.iter().enumerate() {
                for to in row2 {
                    if from.ip != to.ip {
                        let took = ping_within(&from.c, &to.ip, Duration::from_secs(3));
                        assert!(h == h2 || took < Duration::from_secs(2), "{took:?}");
                    }
                }
            }
        }
    }
    // A TCP transfer across hosts.
    let gbps = transfer(&ctrs[0][0], &ctrs[1][0], 20);
    eprintln!("{backend}: 20 MB host0 -> host1 at {gbps:.2} Gbit/s");

    // A host killed: the others drop it after the lease TTL.
    netds[2].kill();
    let t = Instant::now();
    loop {
        let routes = lab.host(0).exec(["ip", "route"]).unwrap();
        if !routes.contains("10.42.2.0/24") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "host 2 still routed after {:?}:\n{routes}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "{backend}: killed host removed after {:?} (ttl 3 s)",
        t.elapsed()
    );
    // Traffic between the others never stopped.
    ctrs[0][0]
        .c
        .exec(["ping", "-c3", "-i0.2", "-W1", &ctrs[1][1].ip])
        .unwrap();

    // Restarted, it comes back with the same block and everyone reaches it.
    netds[2].start_again().unwrap();
    let ip = &ctrs[2][0].ip;
    assert!(ip.starts_with("10.42.2."), "{ip}");
    let took = ping_within(&ctrs[0][0].c, ip, Duration::from_secs(3));
    eprintln!("{backend}: restarted host reachable again after {took:?}");
    let status = netds[2].cli(&["status", "--json"]).unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["block"], "10.42.2.0/24", "same block after restart");
}

#[test]
fn vxlan_mesh_sqlite() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(3)).unwrap();
    full_mesh(
        &lab,
        &format!("sqlite:{}", lab.dir().join("store.db").display()),
        "vxlan",
    );
}

#[test]
fn vxlan_mesh_etcd() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(3)).unwrap();
    // etcd on the underlay switch's address, reachable from every host.
    let etcd = EtcdServer::start_in_netns(lab.underlay().name(), lab.host(0).gateway()).unwrap();
    full_mesh(&lab, &format!("etcd:{}", etcd.endpoint()), "vxlan");
}

/// The overlay MTU netd chose, from `netd status --json`.
fn overlay_mtu(netd: &Netd) -> u32 {
    let out = netd.cli(&["status", "--json"]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    u32::try_from(v["mtu"].as_u64().unwrap()).unwrap()
}

/// DF pings at the overlay MTU pass and one byte more fails loudly (never a
/// silent drop); a 50 MB transfer completes both ways.
fn mtu_case(opts: LabOptions, backend: &str, underlay_mtu: u32) {
    let lab = Lab::new(opts).unwrap();
    let store = format!("sqlite:{}", lab.dir().join("store.db").display());
    let flag = format!("--backend={backend}");
    let netds: Vec<Netd> = (0..2)
        .map(|i| Netd::start(&lab, i, &store, &[&flag]).unwrap())
        .collect();
    let overhead = if backend == "vxlan" { 50 } else { 60 };
    let mtu0 = overlay_mtu(&netds[0]);
    assert_eq!(
        mtu0,
        underlay_mtu - overhead,
        "overlay MTU = underlay MTU - overhead"
    );
    let a = attach(&netds[0], lab.container(0, "a").unwrap(), "a");
    let b = attach(&netds[1], lab.container(1, "b").unwrap(), "b");
    assert_eq!(
        a.c.link_mtu("eth0").unwrap(),
        mtu0,
        "the container veth gets the overlay MTU"
    );
    ping_within(&a.c, &b.ip, Duration::from_secs(3));
    // The path MTU between the two containers is the smaller overlay MTU.
    let path = mtu0.min(overlay_mtu(&netds[1]));
    let fits = (path - 28).to_string();
    let too_big = (path - 27).to_string();
    for (from, to) in [(&a, &b), (&b, &a)] {
        let ok = from
            .c
            .output(["ping", "-M", "do", "-c2", "-W2", "-s", &fits, &to.ip])
            .unwrap();
        assert!(
            ok.status.success(),
            "DF ping of {fits} bytes must pass: {}",
            String::from_utf8_lossy(&ok.stdout)
        );
        let big = from
            .c
            .output(["ping", "-M", "do", "-c2", "-W2", "-s", &too_big, &to.ip])
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&big.stdout),
            String::from_utf8_lossy(&big.stderr)
        );
        assert!(
            !big.status.success(),
            "DF ping of {too_big} bytes must fail"
        );
        assert!(
            text.contains("message too long")
                || text.contains("Frag needed")
                || text.contains("mtu"),
            "an oversize DF packet must be refused loudly, not dropped:\n{text}"
        );
    }
    // From the host itself (its own MTU is larger): the tunnel device's MTU
    // makes the kernel answer frag-needed.
    let host_big = (underlay_mtu - 28).to_string();
    let out = lab
        .host(0)
        .output(["ping", "-M", "do", "-c1", "-W2", "-s", &host_big, &b.ip])
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && (text.contains("message too long") || text.contains("mtu")),
        "{text}"
    );
    let g1 = transfer(&a, &b, 50);
    let g2 = transfer(&b, &a, 50);
    eprintln!("{backend} underlay {underlay_mtu}: overlay MTU {mtu0}, 50 MB a->b {g1:.2} Gbit/s, b->a {g2:.2} Gbit/s");
}

#[test]
fn vxlan_mtu_1500() {
    weft_tests::require_root!();
    mtu_case(LabOptions::hosts(2), "vxlan", 1500);
}

#[test]
fn vxlan_mtu_9000() {
    weft_tests::require_root!();
    mtu_case(LabOptions::hosts(2).mtu(9000), "vxlan", 9000);
}

#[test]
fn vxlan_mtu_1400_nested() {
    weft_tests::require_root!();
    mtu_case(LabOptions::hosts(2).mtu(1400), "vxlan", 1400);
}

#[test]
fn vxlan_mtu_smaller_hop_in_the_path() {
    weft_tests::require_root!();
    // Host 0's link is 1500, but the path to host 1 crosses a 1400 hop.
    let opts = LabOptions::hosts(2).router(weft_tests::RouterOptions {
        near_hosts: 1,
        far_mtu: 1400,
    });
    mtu_case(opts, "vxlan", 1500);
}
