//! One host end to end: netd in a lab host, containers attached by the CNI
//! plugin as a runtime would, NAT, published ports, restarts, concurrency
//! and crashes. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_tests::weft::{tcp_probe, tcp_server, CniCall, CniOutput, Netd};
use weft_tests::{Container, Lab, LabOptions};

fn sqlite(lab: &Lab) -> String {
    format!("sqlite:{}", lab.dir().join("store.db").display())
}

fn config_with_ports(netd: &Netd, ports: &str) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"weft","type":"weft","socket":"{}","runtimeConfig":{{"portMappings":[{ports}]}}}}"#,
        netd.socket().display()
    )
}

fn cni(netd: &Netd, command: &str, c: &Container, id: &str, args: &str, config: &str) -> CniOutput {
    CniCall {
        host: netd.host(),
        command,
        container_id: id,
        netns: &c.path().display().to_string(),
        ifname: "eth0",
        args,
        config,
    }
    .run()
    .unwrap()
}

fn add(netd: &Netd, c: &Container, id: &str, args: &str, config: &str) -> String {
    let out = cni(netd, "ADD", c, id, args, config);
    assert!(
        out.ok(),
        "ADD {id} failed ({}): {}{}",
        out.code,
        out.stdout,
        out.stderr
    );
    out.address().unwrap().to_string()
}

/// Each `-A WEFT...` rule and each hook into weft's chains appears once.
fn assert_weft_rules_once(host: &weft_tests::Netns) {
    let save = host.exec(["iptables-save"]).unwrap();
    let rules: Vec<&str> = save
        .lines()
        .filter(|l| l.starts_with("-A") && l.contains("WEFT"))
        .collect();
    assert!(!rules.is_empty(), "no weft rules at all:\n{save}");
    let unique: BTreeSet<&str> = rules.iter().copied().collect();
    assert_eq!(unique.len(), rules.len(), "duplicated weft rules:\n{save}");
}

#[test]
fn containers_ping_reach_outside_and_publish_ports() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let (host, outside) = (lab.host(0), lab.host(1));
    let netd = Netd::start(&lab, 0, &sqlite(&lab), &[]).unwrap();
    let a = lab.container(0, "a").unwrap();
    let b = lab.container(0, "b").unwrap();
    let args = "IgnoreUnknown=1;K8S_POD_NAME=web-1;WEFT_SERVICE=web;WEFT_STACK=shop";
    let out = cni(
        &netd,
        "ADD",
        &a,
        "ctr-a",
        args,
        &config_with_ports(
            &netd,
            r#"{"hostPort":8080,"containerPort":80,"protocol":"tcp"}"#,
        ),
    );
    assert!(out.ok(), "{} {}", out.stdout, out.stderr);
    let result = out.json();
    let ip_a = out.address().unwrap().to_string();
    assert_eq!(result["dns"]["nameservers"][0], "169.254.169.250");
    let search: Vec<&str> = result["dns"]["search"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(search[0], "shop.weft.internal", "{result}");
    let ip_b = add(
        &netd,
        &b,
        "ctr-b",
        "IgnoreUnknown=1;K8S_POD_NAME=db-1",
        &netd.cni_config("1.0.0"),
    );
    assert_ne!(ip_a, ip_b);
    assert!(
        ip_a.starts_with("10.42.") && ip_b.starts_with("10.42."),
        "{ip_a} {ip_b}"
    );

    // The interface inside the container.
    let addr = a.exec(["ip", "-4", "-o", "addr", "show", "eth0"]).unwrap();
    assert!(addr.contains(&ip_a), "{addr}");
    let routes = a.exec(["ip", "route"]).unwrap();
    assert!(routes.contains("default via 10.42.0.1"), "{routes}");
    assert!(routes.contains("169.254.169.250 via 10.42.0.1"), "{routes}");

    // Containers reach each other and the gateway.
    a.exec(["ping", "-c2", "-W2", &ip_b]).unwrap();
    b.exec(["ping", "-c1", "-W2", "10.42.0.1"]).unwrap();

    // Outside: MASQUERADE, the outside sees the host's underlay address.
    let _srv = tcp_server(outside, 9000, "outside").unwrap();
    let seen = tcp_probe(&a, &outside.addr().to_string(), 9000).unwrap();
    assert_eq!(
        seen,
        format!("outside {}", host.addr()),
        "source must be the host's underlay address"
    );
    // Container to container: not NATed.
    let _srv_b = tcp_server(&b, 7000, "b").unwrap();
    assert_eq!(tcp_probe(&a, &ip_b, 7000).unwrap(), format!("b {ip_a}"));

    // The published port: from outside, from the host itself, and hairpin.
    let _web = tcp_server(&a, 80, "web").unwrap();
    let from_outside = tcp_probe(outside, &host.addr().to_string(), 8080).unwrap();
    assert!(from_outside.starts_with("web "), "{from_outside}");
    let from_host = tcp_probe(host, &host.addr().to_string(), 8080).unwrap();
    assert!(from_host.starts_with("web "), "{from_host}");
    let from_localhost = tcp_probe(host, "127.0.0.1", 8080).unwrap();
    assert!(from_localhost.starts_with("web "), "{from_localhost}");
    let hairpin = tcp_probe(&a, &host.addr().to_string(), 8080).unwrap();
    assert!(hairpin.starts_with("web "), "{hairpin}");
    let from_b = tcp_probe(&b, &host.addr().to_string(), 8080).unwrap();
    assert!(from_b.starts_with("web "), "{from_b}");

    // CHECK passes on a healthy container.
    let prev = result.to_string();
    let check_cfg = format!(
        r#"{{"cniVersion":"1.0.0","name":"weft","type":"weft","socket":"{}","prevResult":{prev}}}"#,
        netd.socket().display()
    );
    let check = cni(&netd, "CHECK", &a, "ctr-a", args, &check_cfg);
    assert!(check.ok(), "CHECK: {} {}", check.stdout, check.stderr);

    // The CLI lists both.
    let table = netd.cli(&["endpoints"]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&ip_a) && table.contains("web.shop") && table.contains("8080->80/tcp"),
        "{table}"
    );

    // DEL removes the interface, the port and the address; twice is fine.
    for _ in 0..2 {
        let del = cni(&netd, "DEL", &a, "ctr-a", args, &netd.cni_config("1.0.0"));
        assert!(del.ok(), "DEL: {} {}", del.stdout, del.stderr);
    }
    assert!(
        a.exec(["ip", "link", "show", "eth0"]).is_err(),
        "eth0 must be gone"
    );
    assert!(
        tcp_probe(outside, &host.addr().to_string(), 8080).is_err(),
        "port unpublished"
    );
    let eps = netd.cli(&["endpoints", "--json"]).unwrap();
    let eps: serde_json::Value = serde_json::from_slice(&eps.stdout).unwrap();
    assert_eq!(eps.as_array().unwrap().len(), 1);
    assert_weft_rules_once(host.netns());
}

#[test]
fn netd_restarts_twenty_times_without_dropping_traffic() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let mut netd = Netd::start(&lab, 0, &sqlite(&lab), &[]).unwrap();
    let a = lab.container(0, "a").unwrap();
    let b = lab.container(0, "b").unwrap();
    let cfg = config_with_ports(
        &netd,
        r#"{"hostPort":8080,"containerPort":80,"protocol":"tcp"}"#,
    );
    add(&netd, &a, "ctr-a", "IgnoreUnknown=1", &cfg);
    let ip_b = add(
        &netd,
        &b,
        "ctr-b",
        "IgnoreUnknown=1",
        &netd.cni_config("1.0.0"),
    );

    let interval = 0.05;
    let ping = a
        .spawn(["ping", "-i", &interval.to_string(), "-W", "1", &ip_b])
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let r = Instant::now();
        netd.restart().unwrap();
        slowest = slowest.max(r.elapsed());
    }
    let took = t.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    ping.signal(weft_tests::signal::SIGINT).unwrap();
    let out = ping.wait().unwrap();
    let summary = out
        .stdout
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_default()
        .to_owned();
    let nums: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    let (sent, received) = (nums[0], nums[1]);
    eprintln!("20 restarts in {took:?} (slowest {slowest:?}); ping: {summary}");
    assert!(sent > 20, "{summary}");
    // The kernel state stays while netd restarts: no ping may be lost.
    assert!(
        sent - received <= 1,
        "lost {} pings during restarts: {summary}",
        sent - received
    );
    assert_weft_rules_once(lab.host(0).netns());
    // And the restarted netd still serves: a new container works.
    let c = lab.container(0, "c").unwrap();
    let ip_c = add(
        &netd,
        &c,
        "ctr-c",
        "IgnoreUnknown=1",
        &netd.cni_config("1.0.0"),
    );
    c.exec(["ping", "-c1", "-W2", &ip_b]).unwrap();
    assert_ne!(ip_c, ip_b);
}

#[test]
fn sixteen_concurrent_adds_get_distinct_addresses() {
    weft_tests::require_root!();
    let lab = Arc::new(Lab::new(LabOptions::hosts(1)).unwrap());
    let netd = Arc::new(Netd::start(&lab, 0, &sqlite(&lab), &[]).unwrap());
    let containers: Vec<Container> = (0..16)
        .map(|i| lab.container(0, &format!("c{i}")).unwrap())
        .collect();
    let threads: Vec<_> = containers
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let netd = netd.clone();
            std::thread::spawn(move || {
                let ip = add(
                    &netd,
                    &c,
                    &format!("ctr{i}"),
                    "IgnoreUnknown=1",
                    &netd.cni_config("1.1.0"),
                );
                (c, ip)
            })
        })
        .collect();
    let results: Vec<(Container, String)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ips: BTreeSet<&str> = results.iter().map(|(_, ip)| ip.as_str()).collect();
    assert_eq!(ips.len(), 16, "{ips:?}");
    // Every one of them works.
    let (first, _) = &results[0];
    for (_, ip) in &results[1..] {
        first.exec(["ping", "-c1", "-W2", ip]).unwrap();
    }
}

/// kill -9 netd while ADDs are flowing: each ADD either succeeds or fails
/// with code 11 and leaves nothing in the container; after netd returns,
/// retried ADDs succeed, and GC finds nothing leaked.
#[test]
fn netd_killed_mid_add_then_retry_leaks_nothing() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let mut netd = Netd::start(&lab, 0, &sqlite(&lab), &[]).unwrap();
    let containers: Vec<Container> = (0..24)
        .map(|i| lab.container(0, &format!("k{i}")).unwrap())
        .collect();
    let cfg = netd.cni_config("1.0.0");
    let socket = netd.socket();
    let host = netd.host().clone();
    let adder = {
        let containers = containers.clone();
        let cfg = cfg.clone();
        std::thread::spawn(move || {
            containers
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    CniCall {
                        host: &host,
                        command: "ADD",
                        container_id: &format!("ctr{i}"),
                        netns: &c.path().display().to_string(),
                        ifname: "eth0",
                        args: "IgnoreUnknown=1",
                        config: &cfg,
                    }
                    .run()
                    .unwrap()
                })
                .collect::<Vec<_>>()
        })
    };
    // Let a few succeed, then crash netd while the next ones are under way.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let n = weft_api::client::Client::new(&socket)
            .list_endpoints()
            .map(|e| e.len())
            .unwrap_or(0);
        if n >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    netd.kill();
    let results = adder.join().unwrap();
    let mut failed = Vec::new();
    for (i, r) in results.iter().enumerate() {
        if r.ok() {
            continue;
        }
        assert_eq!(
            r.json()["code"],
            11,
            "ADD ctr{i} must fail with 11 (try again later): {} {}",
            r.stdout,
            r.stderr
        );
        // Nothing half-made in the container.
        let links = containers[i].exec(["ip", "-o", "link"]).unwrap();
        assert!(
            !links.contains("eth0"),
            "ctr{i} left an eth0 behind: {links}"
        );
        failed.push(i);
    }
    assert!(
        !failed.is_empty(),
        "netd was killed, some ADD must have failed"
    );
    eprintln!(
        "{} of {} ADDs failed with code 11 while netd was down",
        failed.len(),
        results.len()
    );

    netd.start_again().unwrap();
    for &i in &failed {
        add(
            &netd,
            &containers[i],
            &format!("ctr{i}"),
            "IgnoreUnknown=1",
            &cfg,
        );
    }
    // GC with every container as valid must find nothing to free, and the
    // store must hold exactly one address per container.
    let valid: Vec<String> = (0..containers.len())
        .map(|i| format!(r#"{{"containerID":"ctr{i}","ifname":"eth0"}}"#))
        .collect();
    let gc_cfg = format!(
        r#"{{"cniVersion":"1.1.0","name":"weft","type":"weft","socket":"{}","cni.dev/valid-attachments":[{}]}}"#,
        netd.socket().display(),
        valid.join(",")
    );
    let gc = CniCall {
        host: netd.host(),
        command: "GC",
        container_id: "",
        netns: "",
        ifname: "",
        args: "",
        config: &gc_cfg,
    }
    .run()
    .unwrap();
    assert!(gc.ok(), "GC: {} {}", gc.stdout, gc.stderr);
    let eps = weft_api::client::Client::new(netd.socket())
        .list_endpoints()
        .unwrap();
    assert_eq!(eps.len(), containers.len());
    let ips: BTreeSet<_> = eps.iter().map(|e| e.address.ip()).collect();
    assert_eq!(ips.len(), containers.len());
    let status = weft_api::client::Client::new(netd.socket())
        .status()
        .unwrap();
    assert_eq!(status.endpoints, containers.len());
    // IPAM itself holds exactly these addresses (nothing allocated and lost).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let allocated = rt.block_on(async {
        let store: weft_store::DynStore =
            Arc::new(weft_store::SqliteStore::open(lab.dir().join("store.db")).unwrap());
        let ipam = weft_ipam::Ipam::new(
            store,
            weft_ipam::IpamConfig::default(),
            weft_model::DEFAULT_PREFIX,
        )
        .await
        .unwrap();
        let block = ipam.lease_block("host0").await.unwrap();
        ipam.list(&block).await.unwrap()
    });
    let allocated: BTreeSet<_> = allocated.iter().map(|a| a.addr).collect();
    assert_eq!(allocated, ips, "IPAM and endpoints agree: nothing leaked");

    // GC with a smaller valid set frees the rest.
    let gc_cfg = format!(
        r#"{{"cniVersion":"1.1.0","name":"weft","type":"weft","socket":"{}","cni.dev/valid-attachments":[{}]}}"#,
        netd.socket().display(),
        valid[..4].join(",")
    );
    let gc = CniCall {
        host: netd.host(),
        command: "GC",
        container_id: "",
        netns: "",
        ifname: "",
        args: "",
        config: &gc_cfg,
    }
    .run()
    .unwrap();
    assert!(gc.ok(), "GC: {} {}", gc.stdout, gc.stderr);
    assert_eq!(
        weft_api::client::Client::new(netd.socket())
            .list_endpoints()
            .unwrap()
            .len(),
        4
    );
}

#[test]
fn exhausted_pool_and_status_errors() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    // A /29 block: 5 container addresses.
    let mut netd = Netd::start(&lab, 0, &sqlite(&lab), &["--block-prefix=29"]).unwrap();
    let cfg = netd.cni_config("1.0.0");
    for i in 0..5 {
        let c = lab.container(0, &format!("p{i}")).unwrap();
        add(&netd, &c, &format!("ctr{i}"), "IgnoreUnknown=1", &cfg);
    }
    let c = lab.container(0, "p5").unwrap();
    let out = cni(&netd, "ADD", &c, "ctr5", "IgnoreUnknown=1", &cfg);
    assert!(!out.ok());
    let err = out.json();
    assert!(
        err["code"].as_u64().unwrap() >= 100,
        "pool exhausted is plugin-specific: {err}"
    );
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains("10.42.0.0/29 is full"),
        "the error names the full block: {err}"
    );
    assert!(
        !c.exec(["ip", "-o", "link"]).unwrap().contains("eth0"),
        "nothing half-made"
    );

    // STATUS: ok while netd runs, 50 when it is down.
    let status_cfg = netd.cni_config("1.1.0");
    let st = cni(&netd, "STATUS", &c, "", "", &status_cfg);
    assert!(st.ok(), "{} {}", st.stdout, st.stderr);
    netd.stop().unwrap();
    let st = cni(&netd, "STATUS", &c, "", "", &status_cfg);
    assert_eq!(st.json()["code"], 50, "{} {}", st.stdout, st.stderr);
    let out = cni(&netd, "ADD", &c, "ctr5", "IgnoreUnknown=1", &cfg);
    assert_eq!(out.json()["code"], 11, "{} {}", out.stdout, out.stderr);
}

/// Sends a raw HTTP request to netd's socket; returns status line and body.
fn raw_request(socket: &std::path::Path, request: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer.lines().next().unwrap_or_default().to_owned();
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

#[test]
fn api_rejects_bad_requests_with_clear_errors_and_teardown_cleans_up() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let mut netd = Netd::start(&lab, 0, &sqlite(&lab), &[]).unwrap();
    let sock = netd.socket();
    let mode = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let post = |body: &str| {
        raw_request(
            &sock,
            &format!(
                "POST /v1/endpoints HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let (status, body) = post("{not json");
    assert!(status.contains("400"), "{status}");
    assert!(
        body.contains("invalid_request") && body.contains("invalid request body"),
        "{body}"
    );
    let (status, body) = post(r#"{"container_id":"../etc","ifname":"eth0"}"#);
    assert!(
        status.contains("400") && body.contains("invalid container id"),
        "{status} {body}"
    );
    let (status, body) = post(
        r#"{"container_id":"c1","ifname":"eth0","port_mappings":[{"host_port":0,"container_port":80,"protocol":"tcp"}]}"#,
    );
    assert!(
        status.contains("400") && body.contains("ports must be 1-65535"),
        "{status} {body}"
    );
    let (status, body) = post(
        r#"{"container_id":"c1","ifname":"eth0","port_mappings":[{"host_port":80,"container_port":80,"protocol":"sctp"}]}"#,
    );
    assert!(status.contains("400"), "{status} {body}");
    let (status, _) = raw_request(
        &sock,
        "GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(status.contains("404"), "{status}");
    // Two containers cannot publish the same host port.
    let a = lab.container(0, "a").unwrap();
    let b = lab.container(0, "b").unwrap();
    let cfg = config_with_ports(
        &netd,
        r#"{"hostPort":8080,"containerPort":80,"protocol":"tcp"}"#,
    );
    add(&netd, &a, "ctr-a", "IgnoreUnknown=1", &cfg);
    let clash = cni(&netd, "ADD", &b, "ctr-b", "IgnoreUnknown=1", &cfg);
    assert!(
        !clash.ok() && clash.stdout.contains("already published"),
        "{} {}",
        clash.stdout,
        clash.stderr
    );
    assert!(
        !b.exec(["ip", "-o", "link"]).unwrap().contains("eth0"),
        "nothing half-made"
    );

    // Teardown (after a clean stop) removes everything weft made.
    netd.stop().unwrap();
    let host = lab.host(0);
    assert!(
        host.exec(["iptables-save"]).unwrap().contains("WEFT"),
        "rules stay while netd is stopped"
    );
    a.exec(["ping", "-c1", "-W2", "10.42.0.1"]).unwrap();
    let bin = weft_tests::weft::bin("netd").unwrap();
    host.exec([
        bin.to_str().unwrap(),
        "teardown",
        &format!("--state-dir={}", netd.dir().display()),
        &format!("--socket={}", sock.display()),
        &format!("--store={}", sqlite(&lab)),
        "--host-id=host0",
        "--release-block",
    ])
    .unwrap();
    assert!(!host.exec(["iptables-save"]).unwrap().contains("WEFT"));
    let links = host.exec(["ip", "-o", "link"]).unwrap();
    assert!(
        !links.contains("weft0") && !links.contains("master"),
        "{links}"
    );
    assert!(
        !a.exec(["ip", "-o", "link"]).unwrap().contains("eth0"),
        "the container's veth went with its host side"
    );
    assert!(!sock.exists());
}

/// `--store-prefix /x` (no trailing slash) puts every key under `/x/`: IPAM,
/// endpoints and the host record alike (endpoints once went to
/// `/xendpoints/…` and hosts to `/xhosts/…`), and dnsd, which reads the
/// endpoints under the same prefix, answers the container's name.
#[test]
fn store_prefix_without_slash_keeps_every_key_under_it() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let netd = Netd::start(&lab, 0, &sqlite(&lab), &["--store-prefix", "/x"]).unwrap();
    let c = lab.container(0, "web").unwrap();
    let addr = add(
        &netd,
        &c,
        "prefixed",
        "IgnoreUnknown=1;WEFT_NAME=web-0;WEFT_STACK=shop",
        &netd.cni_config("1.0.0"),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let keys: Vec<String> = rt.block_on(async {
        let store = weft_store::SqliteStore::open(lab.dir().join("store.db")).unwrap();
        let all = weft_store::Store::get_prefix(&store, "").await.unwrap();
        all.kvs.into_iter().map(|kv| kv.key).collect()
    });
    assert!(!keys.is_empty());
    let outside: Vec<_> = keys.iter().filter(|k| !k.starts_with("/x/")).collect();
    assert!(
        outside.is_empty(),
        "keys outside /x/: {outside:?} (all: {keys:?})"
    );
    let layout = weft_model::Keys::new("/x");
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&layout.host_endpoints("host0"))),
        "no endpoint record under {}: {keys:?}",
        layout.host_endpoints("host0")
    );
    assert!(
        keys.contains(&layout.host("host0")),
        "no host record: {keys:?}"
    );
    assert!(
        keys.contains(&layout.ipam_config()),
        "no IPAM plan: {keys:?}"
    );
    // dnsd reads the endpoints under the same prefix.
    let mut answer = String::new();
    let found = weft_tests::wait_until(Duration::from_secs(5), "dnsd answers web-0", || {
        answer = c
            .output([
                "dig",
                "+short",
                "@169.254.169.250",
                "web-0.shop.weft.internal",
                "A",
            ])
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        answer == addr
    });
    assert!(
        found.is_ok(),
        "dnsd answered {answer:?} for web-0, want {addr}"
    );
}
