#![allow(clippy::unwrap_used, clippy::expect_used)]
//! weft's nf_tables tables on a real kernel: the rendered policy applies as
//! one transaction and lists back, re-applying is a no-op, a bad script
//! leaves the old table in place, counters are read and survive re-creation,
//! teardown removes the tables. Traffic through the rules is tested end to
//! end in tests/tests/policy_enforce.rs. Needs root; everything happens in
//! a lab namespace.

use weft_model::{EndpointRecord, Policy};
use weft_netd::nft::policy::{compile, PolicyInput};
use weft_netd::nft::{script, ApplyOutcome, Desired, Nft};
use weft_tests::{Lab, LabOptions};

fn ep(addr: &str, host: &str, stack: &str, service: &str) -> EndpointRecord {
    serde_json::from_value(serde_json::json!({
        "container_id": format!("c-{}", addr.replace('.', "-")), "ifname": "eth0",
        "netns": "/proc/1/ns/net", "host_id": host, "address": format!("{addr}/24"),
        "gateway": "10.42.0.1", "mtu": 1400, "bridge": "weft0", "stack": stack,
        "service": service, "dns": {"nameservers": [], "domain": "weft", "search": []},
        "created_at_ms": 0
    }))
    .unwrap()
}

fn desired(policy: &str) -> Desired {
    let p: Policy = toml::from_str(policy).unwrap();
    let cluster = vec![
        ep("10.42.0.2", "h0", "shop", "web"),
        ep("10.42.0.3", "h0", "api", "api"),
        ep("10.42.1.2", "h1", "shop", "db"),
    ];
    let local = cluster[..2].to_vec();
    let c = compile(&PolicyInput {
        policy: &p,
        cluster: &cluster,
        local: &local,
        cluster_range: "10.42.0.0/16".parse().unwrap(),
        block: "10.42.0.0/24".parse().unwrap(),
        hosts: &["10.42.1.1".parse().unwrap()],
    });
    Desired {
        policy: c.table,
        spoof: None,
    }
}

const DENY: &str = r#"
default = "deny"
[stacks.shop]
within_stack = "allow"
[[rules]]
name = "web-to-api"
from = "shop/web"
to = "api"
ports = ["tcp/80"]
"#;

#[test]
fn apply_list_counters_teardown() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let nft = Nft::new().in_netns(lab.host(0).netns().name());
    let s = script(&desired(DENY));
    assert_eq!(nft.apply(&s).unwrap(), ApplyOutcome::Applied);
    assert_eq!(nft.apply(&s).unwrap(), ApplyOutcome::Unchanged);
    let listed = nft.list("inet").unwrap();
    for want in [
        "chain forward_in {",
        "10.42.0.2 . tcp . 80 : jump allow-web-to-api",
        "ip daddr vmap @to_identity",
        "counter allow-within_stack {",
        "ip saddr @hosts accept",
    ] {
        assert!(listed.contains(want), "{want:?} not in\n{listed}");
    }
    // The bridge table is left alone while there is no spoof fragment.
    assert_eq!(nft.list("bridge").unwrap(), "");

    let counters = nft.counters().unwrap();
    let names: Vec<_> = counters.iter().map(|c| c.name.as_str()).collect();
    assert!(
        names.contains(&"drops") && names.contains(&"allow-web-to-api"),
        "{names:?}"
    );
    let rule = counters
        .iter()
        .find(|c| c.name == "allow-web-to-api")
        .unwrap();
    assert_eq!(rule.comment.as_deref(), Some("web-to-api"));

    // A bad script fails with nft's message and leaves the table as it was.
    let bad = format!("{s}table inet weft {{ chain x {{ nonsense; }} }}\n");
    let e = nft.apply(&bad).unwrap_err().to_string();
    assert!(e.contains("nft -f -"), "{e}");
    assert_eq!(nft.list("inet").unwrap(), listed);

    // Counting survives the re-creation of the table by the next apply:
    // count the host's own pings as "drops" (in a chain of our own; the
    // packets pass), then replace the table.
    let ns = lab.host(0).netns();
    ns.exec(["ip", "link", "set", "lo", "up"]).unwrap();
    ns.exec([
        "nft",
        "add chain inet weft out { type filter hook output priority 0; }",
    ])
    .unwrap();
    ns.exec(["nft", "add rule inet weft out counter name drops"])
        .unwrap();
    ns.exec(["ping", "-c", "3", "-i", "0.2", "127.0.0.1"])
        .unwrap();
    let drops = |nft: &Nft| {
        nft.counters()
            .unwrap()
            .into_iter()
            .find(|c| c.name == "drops")
            .unwrap()
            .packets
    };
    let counted = drops(&nft);
    assert!(counted >= 3, "{counted}");
    let open = script(&desired(
        &DENY.replace("default = \"deny\"", "default = \"allow\""),
    ));
    assert_eq!(nft.apply(&open).unwrap(), ApplyOutcome::Applied);
    assert!(nft
        .list("inet")
        .unwrap()
        .contains("jump allow-cluster_default"));
    assert!(!nft.list("inet").unwrap().contains("chain out"));
    // (Not equal: the host may send another packet meanwhile; a reset
    // would show 0, as nothing passes the new table.)
    assert!(drops(&nft) >= counted, "{} < {counted}", drops(&nft));

    nft.teardown().unwrap();
    assert_eq!(nft.list("inet").unwrap(), "");
    nft.teardown().unwrap();
}
