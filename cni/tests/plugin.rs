#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The plugin binary end to end against the fake netd of `common`, run
//! inside a lab host namespace with a hand-made bridge (the binary is
//! spawned from a thread that has entered that namespace, so it inherits
//! it). Needs root; nothing is made in the root namespace.

mod common;

use std::time::{Duration, Instant};

use common::{conf, FakeNetd, Invocation, Mode, Run};
use serde_json::{json, Value};
use weft_model::host_veth_name;
use weft_tests::in_netns;
use weft_tests::{Container, Host, Lab, LabOptions, Netns};

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const META_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAME=web-1;WEFT_SERVICE=web;WEFT_STACK=shop";

fn lab_with_bridge() -> Lab {
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let host = lab.host(0);
    host.ip(["link", "add", "weft0", "type", "bridge"]).unwrap();
    host.ip(["addr", "add", "10.42.0.1/24", "dev", "weft0"])
        .unwrap();
    host.ip(["link", "set", "weft0", "up"]).unwrap();
    lab
}

fn run_in(host: &Host, inv: &Invocation) -> Run {
    in_netns(host.path(), || inv.run())
}

fn add(version: &str, netd: &FakeNetd, id: &str, c: &Netns) -> Invocation {
    let mut config = conf(version, &netd.socket);
    config["capabilities"] = json!({"portMappings": true, "aliases": true});
    config["runtimeConfig"] = json!({
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}],
        "aliases": {"weft": ["www"]}
    });
    Invocation::new("ADD", config.to_string())
        .container(id, "eth0")
        .netns(c.path())
        .args(META_ARGS)
}

fn with_prev(
    command: &str,
    version: &str,
    netd: &FakeNetd,
    id: &str,
    c: &Netns,
    prev: &Value,
) -> Invocation {
    let mut config = conf(version, &netd.socket);
    config["prevResult"] = prev.clone();
    Invocation::new(command, config.to_string())
        .container(id, "eth0")
        .netns(c.path())
}

fn extra_host_links(host: &Host) -> Vec<String> {
    host.links()
        .unwrap()
        .into_iter()
        .filter(|l| !["lo", "eth0", "weft0"].contains(&l.as_str()))
        .collect()
}

fn mac_of(ns: &Netns, dev: &str) -> String {
    let out = ns.ip(["-o", "link", "show", "dev", dev]).unwrap();
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "link/ether" {
            return words.next().unwrap().to_string();
        }
    }
    panic!("no MAC in {out}")
}

/// The exact result the plugin must print for a container that got
/// `address` (fake netd: gateway 10.42.0.1, MTU 1400, DNS as below).
fn expected_result(version: &str, id: &str, host: &Host, c: &Container, address: &str) -> Value {
    let host_veth = host_veth_name(id, "eth0");
    let mut host_iface = json!({"name": host_veth, "mac": mac_of(host, &host_veth)});
    let mut cont_iface = json!({
        "name": "eth0",
        "mac": mac_of(c, "eth0"),
        "sandbox": c.path().to_string_lossy(),
    });
    if version == "1.1.0" {
        host_iface["mtu"] = json!(1400);
        cont_iface["mtu"] = json!(1400);
    }
    let mut ip = json!({"address": address, "gateway": "10.42.0.1", "interface": 1});
    if version.starts_with("0.") {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "interfaces": [host_iface, cont_iface],
        "ips": [ip],
        "routes": [
            {"dst": "0.0.0.0/0", "gw": "10.42.0.1"},
            {"dst": "169.254.169.250/32", "gw": "10.42.0.1"}
        ],
        "dns": {
            "nameservers": ["169.254.169.250"],
            "domain": "weft.local",
            "search": ["shop.weft.local", "weft.local"],
            "options": ["ndots:2"]
        }
    })
}

#[test]
fn add_check_del_in_every_version() {
    weft_tests::require_root!();
    let lab = lab_with_bridge();
    let host = lab.host(0);
    let netd = FakeNetd::start();
    for (i, v) in VERSIONS.iter().enumerate() {
        let c = lab.container(0, &format!("c{i}")).unwrap();
        let id = format!("ctr-{v}");
        let run = run_in(host, &add(v, &netd, &id, &c));
        run.ok();
        let result = run.json();
        let address = format!("10.42.0.{}/24", 2 + i);
        assert_eq!(result, expected_result(v, &id, host, &c, &address), "{v}");
        // The container's eth0 has the MAC derived from its address (the
        // one netd's anti-spoofing allows).
        let ip: std::net::Ipv4Addr = address.trim_end_matches("/24").parse().unwrap();
        assert_eq!(
            mac_of(&c, "eth0"),
            weft_model::Mac::for_addr(ip).to_string(),
            "{v}"
        );
        if *v == "1.0.0" || *v == "0.4.0" {
            eprintln!("ADD result in {v}:\n{}", run.stdout);
        }
        c.exec(["ping", "-c1", "-W2", "10.42.0.1"]).unwrap();

        // netd was told who the container is.
        let ep = netd
            .endpoints()
            .into_iter()
            .find(|e| e.container_id == id)
            .unwrap();
        assert_eq!(ep.name.as_deref(), Some("web-1"));
        assert_eq!(ep.service.as_deref(), Some("web"));
        assert_eq!(ep.stack.as_deref(), Some("shop"));
        assert_eq!(ep.aliases, vec!["www".to_string()]);
        assert_eq!(ep.port_mappings.len(), 1);
        assert_eq!(ep.port_mappings[0].host_port, 8080);
        assert_eq!(ep.netns, c.path().to_string_lossy());

        if v.starts_with("0.3") {
            // CHECK does not exist before 0.4.0.
            let run = run_in(host, &with_prev("CHECK", v, &netd, &id, &c, &result));
            assert_eq!(run.error_code(), 1, "{run:?}");
        } else {
            let run = run_in(host, &with_prev("CHECK", v, &netd, &id, &c, &result));
            run.ok();
            assert_eq!(run.stdout, "");
        }

        for _ in 0..2 {
            let run = run_in(host, &with_prev("DEL", v, &netd, &id, &c, &result));
            run.ok();
            assert_eq!(run.stdout, "");
        }
        assert_eq!(extra_host_links(host), Vec::<String>::new());
        assert_eq!(c.links().unwrap(), vec!["lo".to_string()]);
        assert!(netd.endpoints().iter().all(|e| e.container_id != id));
    }
}

#[test]
fn check_reports_what_differs() {
    weft_tests::require_root!();
    let lab = lab_with_bridge();
    let host = lab.host(0);
    let netd = FakeNetd::start();
    let c = lab.container(0, "c").unwrap();
    let id = "check-me";
    let result = run_in(host, &add("1.0.0", &netd, id, &c)).ok().json();
    c.ip(["route", "del", "169.254.169.250/32"]).unwrap();
    c.ip(["link", "set", "eth0", "mtu", "1300"]).unwrap();
    let run = run_in(host, &with_prev("CHECK", "1.0.0", &netd, id, &c, &result));
    assert_eq!(run.error_code(), 104, "{run:?}");
    let msg = run.msg();
    assert!(
        msg.contains("no route to 169.254.169.250 via 10.42.0.1"),
        "{msg}"
    );
    assert!(msg.contains("MTU 1300, expected 1400"), "{msg}");
    eprintln!("CHECK error: {}", run.stdout);

    // A prevResult that does not describe this attachment.
    let mut wrong = result.clone();
    wrong["ips"][0]["address"] = json!("10.42.0.99/24");
    let run = run_in(host, &with_prev("CHECK", "1.0.0", &netd, id, &c, &wrong));
    assert_eq!(run.error_code(), 104, "{run:?}");
    assert!(
        run.msg()
            .contains("prevResult does not list address 10.42.0.2/24"),
        "{run:?}"
    );

    // The container is gone entirely.
    let host_veth = host_veth_name(id, "eth0");
    host.ip(["link", "del", &host_veth]).unwrap();
    let run = run_in(host, &with_prev("CHECK", "1.0.0", &netd, id, &c, &result));
    assert_eq!(run.error_code(), 104, "{run:?}");
    assert!(
        run.msg()
            .contains(&format!("host interface {host_veth} is missing")),
        "{run:?}"
    );
    assert!(run.msg().contains("interface eth0 is missing"), "{run:?}");
}

#[test]
fn failed_adds_leave_nothing_behind() {
    weft_tests::require_root!();
    let lab = lab_with_bridge();
    let host = lab.host(0);
    let c = lab.container(0, "c").unwrap();
    let id = "will-fail";
    let nothing_made = |what: &str, netd: Option<&FakeNetd>| {
        assert_eq!(extra_host_links(host), Vec::<String>::new(), "{what}");
        assert_eq!(c.links().unwrap(), vec!["lo".to_string()], "{what}");
        if let Some(netd) = netd {
            assert!(
                netd.endpoints().is_empty(),
                "{what}: {:?}",
                netd.endpoints()
            );
        }
    };

    // netd down.
    let down = Invocation::new(
        "ADD",
        conf("1.0.0", "/nonexistent/weft/netd.sock").to_string(),
    )
    .container(id, "eth0")
    .netns(c.path());
    let run = run_in(host, &down);
    assert_eq!(run.error_code(), 11, "{run:?}");
    assert!(run.msg().contains("try again later"), "{run:?}");
    nothing_made("netd down", None);

    let netd = FakeNetd::start();
    // netd up but unable right now.
    netd.set_mode(Mode::TryAgain);
    let run = run_in(host, &add("1.0.0", &netd, id, &c));
    assert_eq!(run.error_code(), 11, "{run:?}");
    nothing_made("netd busy", Some(&netd));

    // No address left.
    netd.set_mode(Mode::PoolExhausted);
    let run = run_in(host, &add("0.4.0", &netd, id, &c));
    assert_eq!(run.error_code(), 100, "{run:?}");
    assert!(run.msg().contains("no free container address"), "{run:?}");
    assert_eq!(run.json()["cniVersion"], "0.4.0");
    nothing_made("pool exhausted", Some(&netd));
    netd.set_mode(Mode::Normal);

    // netd names a bridge that is not here: the address is given back.
    netd.state.lock().unwrap().bridge = "nobr0".into();
    let run = run_in(host, &add("1.0.0", &netd, id, &c));
    assert_eq!(run.error_code(), 105, "{run:?}");
    assert!(run.msg().contains("nobr0"), "{run:?}");
    nothing_made("missing bridge", Some(&netd));
    let reqs = netd.requests();
    let last = reqs.last().unwrap();
    assert_eq!(
        (last.0.as_str(), last.1.as_str()),
        ("DELETE", "/v1/endpoints/will-fail/eth0")
    );
    netd.state.lock().unwrap().bridge = "weft0".into();

    // The kernel refuses the MTU: rolled back the same way.
    netd.state.lock().unwrap().mtu = 20;
    let run = run_in(host, &add("1.0.0", &netd, id, &c));
    assert_eq!(run.error_code(), 102, "{run:?}");
    nothing_made("bad mtu", Some(&netd));
    netd.state.lock().unwrap().mtu = 1400;

    // The interface name is taken inside the container: netd is not asked.
    c.ip(["link", "add", "eth0", "type", "bridge"]).unwrap();
    let asked = netd.requests().len();
    let run = run_in(host, &add("1.0.0", &netd, id, &c));
    assert_eq!(run.error_code(), 101, "{run:?}");
    assert!(run.msg().contains("eth0 exists already"), "{run:?}");
    assert_eq!(netd.requests().len(), asked);
    c.ip(["link", "del", "eth0"]).unwrap();
    nothing_made("ifname taken", Some(&netd));

    // After all that, the same container attaches fine.
    run_in(host, &add("1.0.0", &netd, id, &c)).ok();
    c.exec(["ping", "-c1", "-W2", "10.42.0.1"]).unwrap();
}

#[test]
fn add_twice_is_refused_and_keeps_the_first() {
    weft_tests::require_root!();
    let lab = lab_with_bridge();
    let host = lab.host(0);
    let netd = FakeNetd::start();
    let c = lab.container(0, "c").unwrap();
    run_in(host, &add("1.0.0", &netd, "twice", &c)).ok();
    let asked = netd.requests().len();
    let run = run_in(host, &add("1.0.0", &netd, "twice", &c));
    assert_eq!(run.error_code(), 101, "{run:?}");
    assert!(run.msg().contains("attached already"), "{run:?}");
    // netd was not asked (so nothing could release the live address).
    assert_eq!(netd.requests().len(), asked);
    assert_eq!(netd.endpoints().len(), 1);
    c.exec(["ping", "-c1", "-W2", "10.42.0.1"]).unwrap();
}

#[test]
fn del_copes_with_half_built_and_vanished_containers() {
    weft_tests::require_root!();
    let lab = lab_with_bridge();
    let host = lab.host(0);
    let netd = FakeNetd::start();

    // The container namespace was deleted before DEL (its veth went with it).
    let c = lab.container(0, "gone").unwrap();
    let result = run_in(host, &add("1.0.0", &netd, "gone", &c)).ok().json();
    let path = c.path();
    lab.remove_container(&c).unwrap();
    let run = run_in(host, &with_prev("DEL", "1.0.0", &netd, "gone", &c, &result));
    run.ok();
    assert!(!path.exists());
    assert!(netd.endpoints().is_empty());

    // Only a host end is left (half-made by someone): DEL removes it.
    let host_veth = host_veth_name("half", "eth0");
    host.ip([
        "link", "add", &host_veth, "type", "veth", "peer", "name", "halfpeer",
    ])
    .unwrap();
    let c2 = lab.container(0, "half").unwrap();
    let run = run_in(
        host,
        &Invocation::new("DEL", conf("0.3.1", &netd.socket).to_string())
            .container("half", "eth0")
            .netns(c2.path()),
    );
    run.ok();
    assert_eq!(extra_host_links(host), Vec::<String>::new());

    // netd down: the veth still goes, but DEL reports "try again".
    let c3 = lab.container(0, "down").unwrap();
    run_in(host, &add("1.0.0", &netd, "down", &c3)).ok();
    let run = run_in(
        host,
        &Invocation::new("DEL", conf("1.0.0", "/nonexistent/netd.sock").to_string())
            .container("down", "eth0")
            .netns(c3.path()),
    );
    assert_eq!(run.error_code(), 11, "{run:?}");
    assert_eq!(extra_host_links(host), Vec::<String>::new());
    assert_eq!(c3.links().unwrap(), vec!["lo".to_string()]);
}

#[test]
fn gc_releases_everything_not_valid() {
    weft_tests::require_root!();
    let lab = lab_with_bridge();
    let host = lab.host(0);
    let netd = FakeNetd::start();
    let keep = lab.container(0, "keep").unwrap();
    let stale = lab.container(0, "stale").unwrap();
    run_in(host, &add("1.1.0", &netd, "keep", &keep)).ok();
    run_in(host, &add("1.1.0", &netd, "stale", &stale)).ok();
    // Not a veth, so not ours even though the name fits the scheme.
    host.ip(["link", "add", "wf0123456789a", "type", "bridge"])
        .unwrap();

    let mut config = conf("1.1.0", &netd.socket);
    config["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let run = run_in(host, &Invocation::new("GC", config.to_string()));
    run.ok();
    assert_eq!(run.stdout, "");
    let mut links = extra_host_links(host);
    links.sort();
    let mut want = vec![host_veth_name("keep", "eth0"), "wf0123456789a".to_string()];
    want.sort();
    assert_eq!(links, want);
    assert_eq!(stale.links().unwrap(), vec!["lo".to_string()]);
    let eps = netd.endpoints();
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].container_id, "keep");
    keep.exec(["ping", "-c1", "-W2", "10.42.0.1"]).unwrap();

    // netd down: GC cannot release addresses, so it fails with 11.
    config["socket"] = json!("/nonexistent/netd.sock");
    let run = run_in(host, &Invocation::new("GC", config.to_string()));
    assert_eq!(run.error_code(), 11, "{run:?}");
}

#[test]
fn chained_add_keeps_the_previous_result() {
    weft_tests::require_root!();
    let lab = lab_with_bridge();
    let host = lab.host(0);
    let netd = FakeNetd::start();
    let c = lab.container(0, "c").unwrap();
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "dummy0"}],
        "ips": [{"address": "192.168.9.9/24", "interface": 0}],
        "dns": {"nameservers": ["192.168.9.1"]}
    });
    let mut inv = add("1.0.0", &netd, "chained", &c);
    let mut config: Value = serde_json::from_str(&inv.stdin).unwrap();
    config["prevResult"] = prev;
    inv.stdin = config.to_string();
    let r = run_in(host, &inv).ok().json();
    assert_eq!(r["interfaces"][0]["name"], "dummy0");
    assert_eq!(r["interfaces"][2]["name"], "eth0");
    assert_eq!(r["ips"][0]["address"], "192.168.9.9/24");
    assert_eq!(r["ips"][1]["address"], "10.42.0.2/24");
    assert_eq!(r["ips"][1]["interface"], 2);
    assert_eq!(r["dns"]["nameservers"], json!(["169.254.169.250"]));
}

/// ADD and DEL through the binary, with the plugin's own step timings.
#[test]
fn add_latency_through_the_binary() {
    weft_tests::require_root!();
    let lab = lab_with_bridge();
    let host = lab.host(0);
    let netd = FakeNetd::start();
    const N: usize = 10;
    let containers: Vec<_> = (0..N)
        .map(|i| lab.container(0, &format!("t{i}")).unwrap())
        .collect();
    let mut add_wall = Vec::new();
    let mut add_inner = Vec::new();
    let mut del_wall = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        let inv = add("1.0.0", &netd, &format!("lat-{i}"), c).timing();
        let start = Instant::now();
        let run = run_in(host, &inv);
        add_wall.push(start.elapsed());
        run.ok();
        if i == 0 {
            eprintln!("{}", run.stderr.trim());
        }
        let total: f64 = run
            .stderr
            .split("total ")
            .nth(1)
            .and_then(|s| s.split(" ms").next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        add_inner.push(Duration::from_secs_f64(total / 1e3));
    }
    for (i, c) in containers.iter().enumerate() {
        let inv = Invocation::new("DEL", conf("1.0.0", &netd.socket).to_string())
            .container(&format!("lat-{i}"), "eth0")
            .netns(c.path());
        let start = Instant::now();
        run_in(host, &inv).ok();
        del_wall.push(start.elapsed());
    }
    let show = |name: &str, mut d: Vec<Duration>| {
        d.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        eprintln!(
            "{name}: n={} min {:.2} ms, median {:.2} ms, max {:.2} ms",
            d.len(),
            ms(d[0]),
            ms(d[d.len() / 2]),
            ms(d[d.len() - 1])
        );
        d[d.len() / 2]
    };
    show("ADD inside the plugin", add_inner);
    let median = show("ADD wall clock (spawn to exit)", add_wall);
    show("DEL wall clock (spawn to exit)", del_wall);
    assert!(median < Duration::from_millis(500), "{median:?}");
}
