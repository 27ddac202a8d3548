#![allow(clippy::unwrap_used, clippy::expect_used)]
//! weft's nf_tables tables on a real kernel: the rendered policy applies as
//! one transaction and lists back, re-applying is a no-op, a bad script
//! leaves the old table in place, counters are read and survive re-creation,
//! teardown removes the tables. Traffic through the rules is tested end to
//! end in tests/tests/policy_enforce.rs. Needs root; everything happens in
//! a lab namespace.

use weft_model::{EndpointRecord, Policy};
use weft_netd::nft::policy::{compile, PolicyInput};
use weft_netd::nft::{ApplyOutcome, Desired, Nft};
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
    desired_with(policy, &[])
}

/// [`desired`] with more local endpoints `(address, stack, service)`.
fn desired_with(policy: &str, more: &[(&str, &str, &str)]) -> Desired {
    let p: Policy = toml::from_str(policy).unwrap();
    let mut cluster = vec![
        ep("10.42.0.2", "h0", "shop", "web"),
        ep("10.42.0.3", "h0", "api", "api"),
    ];
    for (addr, stack, service) in more {
        cluster.push(ep(addr, "h0", stack, service));
    }
    let local = cluster.clone();
    cluster.push(ep("10.42.1.2", "h1", "shop", "db"));
    let c = compile(&PolicyInput {
        policy: &p,
        cluster: &cluster,
        local: &local,
        cluster_range: "10.42.0.0/16".parse().unwrap(),
        block: "10.42.0.0/24".parse().unwrap(),
        hosts: &["10.42.1.1".parse().unwrap()],
    });
    Desired {
        policy: Some(c.table),
        spoof: None,
        services: None,
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
    let d = desired(DENY);
    assert_eq!(nft.apply(&d).unwrap(), ApplyOutcome::Replaced);
    assert_eq!(nft.apply(&d).unwrap(), ApplyOutcome::Unchanged);
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

    // A bad table fails with nft's message and leaves the table as it was.
    let mut bad = d.clone();
    if let Some(t) = bad.policy.as_mut() {
        t.chain("x", ["nonsense"]);
    }
    let e = nft.apply(&bad).unwrap_err().to_string();
    assert!(e.contains("nft -f -"), "{e}");
    assert_eq!(nft.list("inet").unwrap(), listed);
    assert_eq!(nft.apply(&d).unwrap(), ApplyOutcome::Replaced);

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
    let open = desired(&DENY.replace("default = \"deny\"", "default = \"allow\""));
    assert_eq!(nft.apply(&open).unwrap(), ApplyOutcome::Replaced);
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

/// A container added or deleted changes only elements: the table is not
/// re-created (its counters keep counting in the kernel), and an element
/// someone else deleted makes netd replace the table instead of failing.
#[test]
fn element_changes_update_the_table_in_place() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let ns = lab.host(0).netns();
    let nft = Nft::new().in_netns(ns.name());
    let one = desired(DENY);
    let two = desired_with(DENY, &[("10.42.0.4", "shop", "web")]);
    assert_eq!(nft.apply(&one).unwrap(), ApplyOutcome::Replaced);
    // A re-created table gets a new handle.
    let table_handle = || {
        let out = ns.exec(["nft", "-j", "list", "tables"]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i.get("table"))
            .find(|t| t["family"] == "inet" && t["name"] == "weft")
            .map(|t| t["handle"].as_u64().unwrap())
    };
    let before = table_handle();
    assert!(before.is_some());
    assert_eq!(nft.apply(&two).unwrap(), ApplyOutcome::Updated);
    let listed = nft.list("inet").unwrap();
    assert!(listed.contains("10.42.0.4 : goto id-"), "{listed}");
    assert!(
        listed.contains("10.42.0.4 . tcp . 80 : jump allow-web-to-api"),
        "{listed}"
    );
    assert_eq!(nft.apply(&one).unwrap(), ApplyOutcome::Updated);
    assert!(!nft.list("inet").unwrap().contains("10.42.0.4"));
    assert_eq!(table_handle(), before, "the table was re-created");

    // Someone deletes an element netd put there: the next change cannot
    // delete it again, so netd replaces the table.
    assert_eq!(nft.apply(&two).unwrap(), ApplyOutcome::Updated);
    ns.exec(["nft", "delete element inet weft to_identity { 10.42.0.4 }"])
        .unwrap();
    assert_eq!(nft.apply(&one).unwrap(), ApplyOutcome::Replaced);
    assert_eq!(nft.list("inet").unwrap(), {
        nft.invalidate();
        nft.apply(&one).unwrap();
        nft.list("inet").unwrap()
    });
    // Forgetting one table replaces only that one.
    assert!(nft.has_table("inet", "weft").unwrap());
    assert!(!nft.has_table("ip", "weft_svc").unwrap());
    nft.invalidate_table("bridge", "weft");
    assert_eq!(nft.apply(&two).unwrap(), ApplyOutcome::Updated);
    nft.invalidate_table("inet", "weft");
    assert_eq!(nft.apply(&one).unwrap(), ApplyOutcome::Replaced);
    nft.teardown().unwrap();
    assert!(!nft.has_table("inet", "weft").unwrap());
}
