//! Service-discovery DNS end to end: two lab hosts, a netd on each sharing
//! one SQLite store, each serving DNS in-process on 169.254.169.250:53.
//! Containers attached
//! through the real CNI plugin ask with the real `dig`, through the
//! resolv.conf the CNI result gave them. Names outside the cluster go to a
//! dnsmasq in the underlay namespace. Needs root.
//!
//! The 50-container service is written into the store directly as endpoint
//! records (as netd writes them, under a made-up host id), not attached by
//! 50 CNI ADDs: DNS only sees the records, and this keeps the test fast.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use weft_tests::weft::{CniCall, CniOutput, Netd};
use weft_tests::{Container, Lab, LabOptions, Netns};

const DNS: &str = "169.254.169.250";

fn sqlite_path(lab: &Lab) -> PathBuf {
    lab.dir().join("store.db")
}

/// Waits until the DNS server netd runs in `host` answers on
/// 169.254.169.250:53.
fn wait_dns(netd: &Netd) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = dig(netd.host(), &["@169.254.169.250", "weft.internal", "SOA"]);
        if d.status == "NOERROR" && d.answers.len() == 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "netd's DNS not answering:\n{}",
            netd.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What `dig` printed, parsed.
#[derive(Debug, Default)]
struct Dig {
    status: String,
    flags: Vec<String>,
    /// (owner, type, data) of the answer section.
    answers: Vec<(String, String, String)>,
    authority: Vec<(String, String, String)>,
    size: usize,
    text: String,
}

impl Dig {
    fn addrs(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .answers
            .iter()
            .filter(|a| a.1 == "A")
            .map(|a| a.2.clone())
            .collect();
        v.sort();
        v
    }
}

fn parse_dig(text: &str) -> Dig {
    let mut d = Dig {
        text: text.to_owned(),
        ..Dig::default()
    };
    let mut section = "";
    for line in text.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            d.status = rest.split(',').next().unwrap_or("").to_owned();
        }
        if let Some(rest) = line.strip_prefix(";; flags: ") {
            d.flags = rest
                .split(';')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_owned)
                .collect();
        }
        if let Some(rest) = line.split("MSG SIZE  rcvd: ").nth(1) {
            d.size = rest.trim().parse().unwrap_or(0);
        }
        if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
            continue;
        }
        if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
            continue;
        }
        if line.trim().is_empty() || line.starts_with(';') {
            if line.trim().is_empty() {
                section = "";
            }
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 5 {
            let rr = (f[0].to_owned(), f[3].to_owned(), f[4..].join(" "));
            match section {
                "answer" => d.answers.push(rr),
                "authority" => d.authority.push(rr),
                _ => {}
            }
        }
    }
    d
}

/// Runs `dig` in `ns` (one try, 2 s) and parses what it printed.
fn dig(ns: &Netns, args: &[&str]) -> Dig {
    let mut argv = vec!["dig", "+time=2", "+tries=1", "+nocookie"];
    argv.extend(args);
    let out = ns.output(&argv).unwrap();
    parse_dig(&String::from_utf8_lossy(&out.stdout))
}

/// Makes `ip netns exec <container>` see the container's resolv.conf (the
/// CNI result's DNS settings); removed on drop.
struct ResolvConf(PathBuf);

impl ResolvConf {
    fn install(c: &Container, result: &serde_json::Value) -> ResolvConf {
        let dns = &result["dns"];
        let mut text = String::new();
        for ns in dns["nameservers"].as_array().unwrap() {
            text.push_str(&format!("nameserver {}\n", ns.as_str().unwrap()));
        }
        let search: Vec<&str> = dns["search"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        text.push_str(&format!("search {}\n", search.join(" ")));
        let options: Vec<&str> = dns["options"]
            .as_array()
            .map(|o| o.iter().filter_map(|s| s.as_str()).collect())
            .unwrap_or_default();
        if !options.is_empty() {
            text.push_str(&format!("options {}\n", options.join(" ")));
        }
        let dir = PathBuf::from("/etc/netns").join(c.name());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        ResolvConf(dir)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir("/etc/netns");
    }
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

fn add(
    netd: &Netd,
    c: &Container,
    id: &str,
    args: &str,
    config: &str,
) -> (String, serde_json::Value) {
    let out = cni(netd, "ADD", c, id, args, config);
    assert!(out.ok(), "ADD {id}: {} {}", out.stdout, out.stderr);
    (out.address().unwrap().to_string(), out.json())
}

fn config_with_aliases(netd: &Netd, aliases: &[&str]) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"weft","type":"weft","socket":"{}","capabilities":{{"aliases":true}},"runtimeConfig":{{"aliases":{}}}}}"#,
        netd.socket().display(),
        serde_json::to_string(aliases).unwrap()
    )
}

/// Writes `n` endpoint records of service `big` in stack `shop` straight
/// into the store (host id `host9`, addresses 10.42.200.x).
fn write_big_service(lab: &Lab, n: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = weft_store::SqliteStore::open(sqlite_path(lab)).unwrap();
        use weft_store::Store;
        for i in 0..n {
            let id = format!("big{i}");
            let ep = serde_json::json!({
                "container_id": id, "ifname": "eth0", "netns": "", "host_id": "host9",
                "address": format!("10.42.200.{}/24", 2 + i), "gateway": "10.42.200.1",
                "mtu": 1420, "bridge": "weft0", "name": format!("big-{i}"),
                "service": "big", "stack": "shop", "aliases": [],
                "dns": {"nameservers": [DNS], "domain": "weft.internal", "search": []},
                "created_at_ms": 0
            });
            store
                .put(
                    &weft_model::Keys::default().endpoint("host9", &id, "eth0"),
                    &serde_json::to_vec(&ep).unwrap(),
                    None,
                )
                .await
                .unwrap();
        }
    });
}

/// Polls `cond` until it holds; panics after `limit`. Returns how long it took.
fn within(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    loop {
        if cond() {
            return t.elapsed();
        }
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn containers_resolve_names_across_hosts() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let store = format!("sqlite:{}", sqlite_path(&lab).display());

    // The upstream for names outside the cluster: dnsmasq in the underlay
    // namespace on 192.168.77.1, knowing only example.test.
    let upstream = lab
        .underlay()
        .spawn([
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=192.168.77.1",
            "--port=53",
            "--pid-file=",
            "--address=/example.test/192.0.2.1",
        ])
        .unwrap();
    let resolv = lab.dir().join("host-resolv.conf");
    // Its own address must be skipped; the dead one first shows failover.
    std::fs::write(
        &resolv,
        format!("# host resolv.conf\nnameserver {DNS}\nnameserver 192.168.77.254\nnameserver 192.168.77.1\noptions edns0\n"),
    )
    .unwrap();
    let flags = [
        format!("--dns-resolv-conf={}", resolv.display()),
        "--dns-upstream-timeout-ms=500".to_owned(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let netd_a = Netd::start(&lab, 0, &store, &flags).unwrap();
    let netd_b = Netd::start(&lab, 1, &store, &flags).unwrap();
    wait_dns(&netd_a);
    wait_dns(&netd_b);

    // web-1 on host A (alias www), web-2 on host B, both service web of stack
    // shop, in `dnsrr` mode: this test is about names answering containers
    // (a service in the default `vip` mode answers its VIP; tests/services.rs).
    let a = lab.container(0, "a").unwrap();
    let b = lab.container(1, "b").unwrap();
    let (ip_a, result_a) = add(
        &netd_a,
        &a,
        "ctr-a",
        "IgnoreUnknown=1;K8S_POD_NAME=web-1;WEFT_SERVICE=web;WEFT_STACK=shop;WEFT_SERVICE_MODE=dnsrr",
        &config_with_aliases(&netd_a, &["www"]),
    );
    let (ip_b, result_b) = add(
        &netd_b,
        &b,
        "ctr-b",
        "IgnoreUnknown=1;K8S_POD_NAME=web-2;WEFT_SERVICE=web;WEFT_STACK=shop;WEFT_SERVICE_MODE=dnsrr",
        &netd_b.cni_config("1.0.0"),
    );
    let _rc_a = ResolvConf::install(&a, &result_a);
    let _rc_b = ResolvConf::install(&b, &result_b);
    write_big_service(&lab, 50);
    let mut both = vec![ip_a.clone(), ip_b.clone()];
    both.sort();

    // Wait until host A's dnsd has seen all of it.
    within(Duration::from_secs(5), "records reach dnsd", || {
        dig(&a, &["big.shop.weft.internal", "+tcp"]).answers.len() == 50
            && dig(&a, &["web.shop.weft.internal"]).addrs() == both
    });

    // `dig web` with the search list of the container's resolv.conf.
    let d = dig(&a, &["+search", "web"]);
    assert_eq!(d.status, "NOERROR", "{}", d.text);
    assert_eq!(d.addrs(), both, "{}", d.text);
    assert_eq!(d.answers[0].0, "web.shop.weft.internal.", "{}", d.text);
    // A bare name without the search list: the client's stack.
    assert_eq!(dig(&a, &["+nosearch", "web"]).addrs(), both);
    assert_eq!(dig(&a, &["web.shop"]).addrs(), both);
    let d = dig(&a, &["WEB.Shop.weft.INTERNAL"]);
    assert_eq!(d.addrs(), both, "case-insensitive: {}", d.text);
    assert!(d.flags.contains(&"aa".to_string()), "{}", d.text);
    // Container names, across hosts.
    assert_eq!(dig(&a, &["+search", "web-2"]).addrs(), vec![ip_b.clone()]);
    assert_eq!(dig(&a, &["web-2"]).addrs(), vec![ip_b.clone()]);
    assert_eq!(
        dig(&a, &["web-2.shop.weft.internal"]).addrs(),
        vec![ip_b.clone()]
    );
    assert_eq!(dig(&b, &["+search", "web-1"]).addrs(), vec![ip_a.clone()]);
    // The alias.
    assert_eq!(dig(&a, &["www.shop"]).addrs(), vec![ip_a.clone()]);
    assert_eq!(dig(&b, &["+search", "www"]).addrs(), vec![ip_a.clone()]);
    // PTR.
    let d = dig(&a, &["-x", &ip_b]);
    assert_eq!(d.answers.len(), 1, "{}", d.text);
    assert_eq!(d.answers[0].1, "PTR");
    assert_eq!(d.answers[0].2, "web-2.shop.weft.internal.");
    // AAAA of a known name: NOERROR, nothing.
    let d = dig(&a, &["web.shop.weft.internal", "AAAA"]);
    assert_eq!(d.status, "NOERROR", "{}", d.text);
    assert!(d.answers.is_empty(), "{}", d.text);
    // Unknown name in the domain: NXDOMAIN with the SOA.
    let d = dig(&a, &["nothing.shop.weft.internal"]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
    assert_eq!(d.authority.len(), 1, "{}", d.text);
    assert_eq!(d.authority[0].0, "weft.internal.");
    assert_eq!(d.authority[0].1, "SOA");
    // Round robin: the first address alternates.
    let firsts: Vec<String> = (0..4)
        .map(|_| dig(&a, &["web.shop.weft.internal"]).answers[0].2.clone())
        .collect();
    assert_ne!(firsts[0], firsts[1], "{firsts:?}");
    assert_eq!(firsts[0], firsts[2], "{firsts:?}");
    // Outside the cluster: forwarded to the upstream (after the dead one).
    let d = dig(&a, &["www.example.test"]);
    assert_eq!(d.status, "NOERROR", "{}\n{}", d.text, netd_a.log());
    assert_eq!(d.addrs(), vec!["192.0.2.1"], "{}", d.text);
    let d = dig(&b, &["nothing.example.test", "+tcp"]);
    assert_eq!(d.addrs(), vec!["192.0.2.1"], "{}", d.text);

    // 50 addresses: over UDP without EDNS, as many as fit in 512 bytes and TC.
    let d = dig(&a, &["big.shop.weft.internal", "+noedns", "+ignore"]);
    assert!(d.flags.contains(&"tc".to_string()), "{}", d.text);
    assert!(d.size <= 512 && d.size > 512 - 16, "{}", d.text);
    assert!(!d.answers.is_empty() && d.answers.len() < 50, "{}", d.text);
    // With EDNS (1232): more, still truncated; over TCP: all 50.
    let d = dig(&a, &["big.shop.weft.internal", "+ignore", "+bufsize=4096"]);
    assert!(d.size <= 1232, "{}", d.text);
    assert!(d.text.contains("udp: 1232"), "advertises 1232: {}", d.text);
    let d = dig(&a, &["big.shop.weft.internal", "+tcp"]);
    assert_eq!(d.answers.len(), 50, "{}", d.text);
    assert!(!d.flags.contains(&"tc".to_string()));

    // A container added on host B resolves from host A within 1 s; deleted,
    // it is NXDOMAIN within 1 s.
    let c = lab.container(1, "c").unwrap();
    let (ip_c, _) = add(
        &netd_b,
        &c,
        "ctr-c",
        "IgnoreUnknown=1;K8S_POD_NAME=late-1;WEFT_SERVICE=late;WEFT_STACK=shop;WEFT_SERVICE_MODE=dnsrr",
        &netd_b.cni_config("1.0.0"),
    );
    let took = within(
        Duration::from_secs(1),
        "added container resolvable from host A",
        || dig(&a, &["late.shop.weft.internal"]).addrs() == vec![ip_c.clone()],
    );
    eprintln!("container added on host B resolvable from host A after {took:?}");
    let del = cni(
        &netd_b,
        "DEL",
        &c,
        "ctr-c",
        "IgnoreUnknown=1",
        &netd_b.cni_config("1.0.0"),
    );
    assert!(del.ok(), "{} {}", del.stdout, del.stderr);
    let took = within(
        Duration::from_secs(1),
        "deleted container gone from host A",
        || dig(&a, &["late.shop.weft.internal"]).status == "NXDOMAIN",
    );
    eprintln!("container deleted on host B NXDOMAIN on host A after {took:?}");

    drop(upstream);
}
