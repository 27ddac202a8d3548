//! Policy enforcement on one host, end to end: netd in a lab host, two
//! stacks attached through the real CNI plugin, the policy set with
//! `netd policy apply`. Default deny blocks TCP between the stacks, an
//! allow rule opens exactly its port, a change cuts an established
//! connection, the audit counters move, and a netd restart keeps the rules
//! (no window where a deny opens). The 3-host matrix and the property test
//! are in policy_matrix.rs. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use weft_model::Protocol;
use weft_tests::probe::{probe, HeldConnection, ProbeServer, Target};
use weft_tests::weft::{CniCall, Netd};
use weft_tests::{in_netns, Container, Lab, LabOptions};

/// How long a change may take to be enforced (the issue's bound).
const CONVERGE: Duration = Duration::from_secs(1);

fn attach(netd: &Netd, c: &Container, id: &str, stack: &str, service: &str) -> String {
    let out = CniCall {
        host: netd.host(),
        command: "ADD",
        container_id: id,
        netns: &c.path().display().to_string(),
        ifname: "eth0",
        args: &format!("IgnoreUnknown=1;WEFT_SERVICE={service};WEFT_STACK={stack}"),
        config: &netd.cni_config("1.0.0"),
    }
    .run()
    .unwrap();
    assert!(out.ok(), "ADD {id}: {}{}", out.stdout, out.stderr);
    out.address().unwrap().to_string()
}

fn apply(netd: &Netd, policy: &str) {
    let file = netd.dir().join("test-policy.toml");
    std::fs::write(&file, policy).unwrap();
    let out = netd
        .cli(&["policy", "apply", &file.display().to_string()])
        .unwrap();
    assert!(
        out.status.success(),
        "policy apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn reaches(from: &Container, addr: &str, port: u16) -> bool {
    let t = Target {
        proto: Protocol::Tcp,
        addr: addr.parse().unwrap(),
        port,
    };
    in_netns(from.path(), || probe(&t, Duration::from_millis(300))).answered()
}

/// Waits (up to [`CONVERGE`] plus the probe's own timeout) until `from`
/// reaching `addr:port` is `want`.
fn converges(from: &Container, addr: &str, port: u16, want: bool) {
    let start = Instant::now();
    loop {
        let got = reaches(from, addr, port);
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < CONVERGE + Duration::from_millis(400),
            "{} -> {addr}:{port}: reach {got}, want {want} after {:?}",
            from.container_name(),
            start.elapsed()
        );
    }
}

fn metric(netd: &Netd, name: &str) -> f64 {
    let out = netd
        .host()
        .exec(["curl", "-sf", "http://127.0.0.1:9419/metrics"])
        .unwrap();
    out.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or_else(|| panic!("{name} not in\n{out}"))
}

const DENY: &str = r#"
default = "deny"
"#;

const WEB_TO_API: &str = r#"
default = "deny"

[[rules]]
name = "web-to-api"
from = "shop/web"
to = "api"
ports = ["tcp/80"]
"#;

#[test]
fn deny_allow_cut_and_restart() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let store = format!("sqlite:{}", lab.dir().join("store.db").display());
    let mut netd = Netd::start(&lab, 0, &store, &["--metrics-addr=127.0.0.1:9419"]).unwrap();
    let web = lab.container(0, "web").unwrap();
    let api = lab.container(0, "api").unwrap();
    let _web_ip = attach(&netd, &web, "ctr-web", "shop", "web");
    let api_ip = attach(&netd, &api, "ctr-api", "api", "api");
    let _server = ProbeServer::start(Some(&api.path()), "api", &[80, 81], &[]).unwrap();

    // No policy stored: everything flows, as before policy existed.
    converges(&web, &api_ip, 80, true);
    converges(&web, &api_ip, 81, true);

    // Default deny: TCP between the two stacks is blocked.
    apply(&netd, DENY);
    converges(&web, &api_ip, 80, false);
    assert!(!reaches(&web, &api_ip, 81));
    assert!(!reaches(&api, &_web_ip, 80));

    // The rule opens exactly tcp/80 from shop/web to api.
    apply(&netd, WEB_TO_API);
    converges(&web, &api_ip, 80, true);
    assert!(!reaches(&web, &api_ip, 81), "only the rule's port opens");
    assert!(metric(&netd, "weft_policy_rule_hits_total{rule=\"web-to-api\"}") >= 1.0);
    assert!(metric(&netd, "weft_policy_drops_total") >= 1.0);

    // An established connection is cut by a change that no longer allows it.
    let mut held = HeldConnection::open(
        Some(&web.path()),
        api_ip.parse().unwrap(),
        80,
        Duration::from_secs(2),
    )
    .unwrap();
    held.echo("before", Duration::from_secs(2)).unwrap();
    apply(&netd, DENY);
    converges(&web, &api_ip, 80, false);
    assert!(
        held.echo("after", Duration::from_millis(500)).is_err(),
        "the held connection still answers"
    );

    // A restart keeps enforcement: the tables stay while netd is down and
    // after it is back.
    apply(&netd, WEB_TO_API);
    converges(&web, &api_ip, 80, true);
    netd.stop().unwrap();
    assert!(
        !reaches(&web, &api_ip, 81),
        "deny opened while netd was down"
    );
    assert!(reaches(&web, &api_ip, 80));
    netd.start_again().unwrap();
    for _ in 0..5 {
        assert!(!reaches(&web, &api_ip, 81), "deny opened after the restart");
        assert!(reaches(&web, &api_ip, 80));
    }
    assert!(netd.dir().join("policy.json").exists());
    netd.stop().unwrap();

    // Teardown removes weft's tables (and nothing keeps enforcing).
    let host = lab.host(0);
    let tables = host.exec(["nft", "list", "tables"]).unwrap();
    assert!(tables.contains("table inet weft"), "{tables}");
    let bin = weft_tests::weft::bin("netd").unwrap();
    host.exec([
        bin.to_str().unwrap(),
        "teardown",
        &format!("--state-dir={}", netd.dir().display()),
        &format!("--socket={}", netd.socket().display()),
        &format!("--store={store}"),
        "--host-id=host0",
    ])
    .unwrap();
    let tables = host.exec(["nft", "list", "tables"]).unwrap();
    assert!(!tables.contains("weft"), "{tables}");
}

/// Across hosts (WireGuard): the policy of the destination's host decides
/// for a container elsewhere, while what the other host sends itself (from
/// its block's gateway) is not subject to policy, as README says.
#[test]
fn across_hosts_containers_are_checked_and_hosts_are_not() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let store = format!("sqlite:{}", lab.dir().join("store.db").display());
    let netd0 = Netd::start(&lab, 0, &store, &[]).unwrap();
    let netd1 = Netd::start(&lab, 1, &store, &[]).unwrap();
    let api = lab.container(0, "api").unwrap();
    let web = lab.container(1, "web").unwrap();
    let other = lab.container(1, "other").unwrap();
    let api_ip = attach(&netd0, &api, "ctr-api", "api", "api");
    attach(&netd1, &web, "ctr-web", "shop", "web");
    attach(&netd1, &other, "ctr-other", "other", "x");
    let _server = ProbeServer::start(Some(&api.path()), "api", &[80], &[]).unwrap();
    converges(&web, &api_ip, 80, true);

    apply(&netd0, WEB_TO_API);
    converges(&other, &api_ip, 80, false);
    converges(&web, &api_ip, 80, true);
    // Host 1 itself reaches the container on host 0 (from its gateway).
    let from_host = Target {
        proto: Protocol::Tcp,
        addr: api_ip.parse().unwrap(),
        port: 80,
    };
    let out = in_netns(lab.host(1).path(), || {
        probe(&from_host, Duration::from_millis(500))
    });
    assert!(out.answered(), "host 1 -> {api_ip}:80: {out}");
}
