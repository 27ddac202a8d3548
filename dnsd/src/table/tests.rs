//! The table's golden answers.

use super::*;
use crate::wire::parse_query;

pub(crate) fn endpoint(
    id: &str,
    ip: &str,
    name: Option<&str>,
    service: Option<&str>,
    stack: Option<&str>,
    aliases: &[&str],
) -> EndpointRecord {
    let v = serde_json::json!({
        "container_id": id,
        "ifname": "eth0",
        "netns": "",
        "host_id": "h0",
        "address": format!("{ip}/24"),
        "gateway": "10.42.0.1",
        "mtu": 1420,
        "bridge": "weft0",
        "name": name,
        "service": service,
        "stack": stack,
        "aliases": aliases,
        "dns": {"nameservers": ["169.254.169.250"], "domain": "weft.internal", "search": []},
        "created_at_ms": 0
    });
    match serde_json::from_value(v) {
        Ok(e) => e,
        Err(e) => panic!("bad test endpoint: {e}"),
    }
}

pub(crate) fn cfg() -> TableConfig {
    TableConfig {
        domain: "weft.internal".into(),
        ttl: 1,
        cluster_range: "10.42.0.0/16".parse().unwrap(),
        service_range: "10.43.0.0/16".parse().unwrap(),
    }
}

pub(crate) fn sample() -> Vec<EndpointRecord> {
    vec![
        endpoint(
            "c1",
            "10.42.0.2",
            Some("web-1"),
            Some("web"),
            Some("shop"),
            &["www"],
        ),
        endpoint(
            "c2",
            "10.42.1.2",
            Some("web-2"),
            Some("Web"),
            Some("SHOP"),
            &[],
        ),
        endpoint(
            "c3",
            "10.42.0.3",
            Some("db-1"),
            Some("db"),
            Some("shop"),
            &[],
        ),
        endpoint(
            "c4",
            "10.42.1.3",
            Some("web-1"),
            Some("web"),
            Some("blog"),
            &[],
        ),
        endpoint("0123456789abcdef", "10.42.0.9", None, None, None, &[]),
    ]
}

fn q(name: &str) -> Name {
    let mut p = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        p.push(label.len() as u8);
        p.extend(label.as_bytes());
    }
    p.extend([0, 0, 1, 0, 1]);
    parse_query(&p).unwrap().name
}

fn addrs(t: &Table, name: &str, client: &str) -> Option<Vec<String>> {
    match t.resolve(&q(name), client.parse().unwrap()) {
        Resolution::Addrs(e) => Some(e.addrs().iter().map(|a| a.to_string()).collect()),
        _ => None,
    }
}

const OUTSIDE: &str = "127.0.0.1";

#[test]
fn names_services_stacks_aliases_and_case() {
    let eps = sample();
    let t = Table::build(&cfg(), &eps, 7);
    assert_eq!(t.endpoints(), 5);
    assert_eq!(t.revision(), 7);
    let both = Some(vec!["10.42.0.2".to_string(), "10.42.1.2".to_string()]);
    assert_eq!(addrs(&t, "web.shop.weft.internal", OUTSIDE), both);
    assert_eq!(addrs(&t, "WEB.Shop.Weft.Internal", OUTSIDE), both);
    assert_eq!(addrs(&t, "web.shop", OUTSIDE), both);
    assert_eq!(
        addrs(&t, "web-1.shop.weft.internal", OUTSIDE),
        Some(vec!["10.42.0.2".into()])
    );
    assert_eq!(
        addrs(&t, "web-1.blog", OUTSIDE),
        Some(vec!["10.42.1.3".into()])
    );
    // The alias resolves like the service name.
    assert_eq!(
        addrs(&t, "www.shop.weft.internal", OUTSIDE),
        Some(vec!["10.42.0.2".into()])
    );
    assert_eq!(
        addrs(&t, "www.shop", OUTSIDE),
        Some(vec!["10.42.0.2".into()])
    );
    // Bare container names are global (both web-1s).
    assert_eq!(
        addrs(&t, "web-1", OUTSIDE),
        Some(vec!["10.42.0.2".into(), "10.42.1.3".into()])
    );
    assert_eq!(
        addrs(&t, "web-1.weft.internal", OUTSIDE),
        addrs(&t, "web-1", OUTSIDE)
    );
    // A bare service name from a container of stack shop: its stack.
    assert_eq!(addrs(&t, "web", "10.42.0.3"), both);
    assert_eq!(addrs(&t, "db", "10.42.1.2"), Some(vec!["10.42.0.3".into()]));
    // ... and from stack blog, blog's.
    assert_eq!(
        addrs(&t, "web", "10.42.1.3"),
        Some(vec!["10.42.1.3".into()])
    );
    // A bare container name from a stack prefers the client's stack.
    assert_eq!(
        addrs(&t, "web-1", "10.42.1.3"),
        Some(vec!["10.42.1.3".into()])
    );
    // From outside any stack, a bare service name is not ours.
    assert!(matches!(
        t.resolve(&q("web"), OUTSIDE.parse().unwrap()),
        Resolution::External
    ));
    // Without a name: the short container id; without a stack: <name>.<domain>.
    assert_eq!(
        addrs(&t, "0123456789ab.weft.internal", OUTSIDE),
        Some(vec!["10.42.0.9".into()])
    );
    assert_eq!(
        t.lookup("db.shop.weft.internal"),
        Some(&["10.42.0.3".parse().unwrap()][..])
    );
}

#[test]
fn nxdomain_nodata_apex_and_external() {
    let eps = sample();
    let t = Table::build(&cfg(), &eps, 1);
    let c: IpAddr = OUTSIDE.parse().unwrap();
    assert!(matches!(
        t.resolve(&q("nope.shop.weft.internal"), c),
        Resolution::NxDomain(Zone::Domain)
    ));
    assert!(matches!(
        t.resolve(&q("nope.weft.internal"), c),
        Resolution::NxDomain(Zone::Domain)
    ));
    assert!(matches!(
        t.resolve(&q("shop.weft.internal"), c),
        Resolution::NoData(Zone::Domain)
    ));
    assert!(matches!(
        t.resolve(&q("weft.internal"), c),
        Resolution::Apex(Zone::Domain)
    ));
    assert!(matches!(
        t.resolve(&q("example.com"), c),
        Resolution::External
    ));
    assert!(matches!(t.resolve(&q("internal"), c), Resolution::External));
    // Under the short form of a known stack: ours, answered at once.
    assert!(matches!(
        t.resolve(&q("nosuch.shop"), c),
        Resolution::NxDomain(Zone::Domain)
    ));
    assert!(matches!(
        t.resolve(&q("a.b.shop"), c),
        Resolution::NxDomain(Zone::Domain)
    ));
    assert!(matches!(t.resolve(&q("web.shop"), c), Resolution::Addrs(_)));
    // The stack's bare name and unknown stacks stay external.
    assert!(matches!(t.resolve(&q("shop"), c), Resolution::External));
    let mut odd = sample();
    odd[0].stack = Some("internal".parse().unwrap());
    odd[1].stack = Some("arpa".parse().unwrap());
    let t = Table::build(&cfg(), &odd, 1);
    assert!(matches!(
        t.resolve(&q("nosuch.internal"), c),
        Resolution::External
    ));
    assert!(matches!(
        t.resolve(&q("9.9.in-addr.arpa"), c),
        Resolution::External
    ));
    assert!(matches!(
        t.resolve(&q("nosuch.nostack"), c),
        Resolution::External
    ));
}

#[test]
fn ptr_for_cluster_addresses() {
    let eps = sample();
    let t = Table::build(&cfg(), &eps, 1);
    let c: IpAddr = OUTSIDE.parse().unwrap();
    match t.resolve(&q("2.0.42.10.in-addr.arpa"), c) {
        Resolution::Ptr(rec, Zone::Reverse) => {
            assert!(rec.ends_with(b"\x05web-1\x04shop\x04weft\x08internal\x00"))
        }
        _ => panic!("no PTR"),
    }
    match t.resolve(&q("9.0.42.10.IN-ADDR.ARPA"), c) {
        Resolution::Ptr(rec, Zone::Reverse) => {
            assert!(rec.ends_with(b"\x0c0123456789ab\x04weft\x08internal\x00"))
        }
        _ => panic!("no PTR"),
    }
    assert!(matches!(
        t.resolve(&q("77.0.42.10.in-addr.arpa"), c),
        Resolution::NxDomain(Zone::Reverse)
    ));
    assert!(matches!(
        t.resolve(&q("0.42.10.in-addr.arpa"), c),
        Resolution::NoData(Zone::Reverse)
    ));
    assert!(matches!(
        t.resolve(&q("42.10.in-addr.arpa"), c),
        Resolution::Apex(Zone::Reverse)
    ));
    assert!(matches!(
        t.resolve(&q("x.2.0.42.10.in-addr.arpa"), c),
        Resolution::NxDomain(Zone::Reverse)
    ));
    // Outside the cluster range: forwarded.
    assert!(matches!(
        t.resolve(&q("1.1.168.192.in-addr.arpa"), c),
        Resolution::External
    ));
    assert!(matches!(
        t.resolve(&q("1.0.44.10.in-addr.arpa"), c),
        Resolution::External
    ));
    // The service range is ours too (no VIPs in this table).
    assert!(matches!(
        t.resolve(&q("1.0.43.10.in-addr.arpa"), c),
        Resolution::NxDomain(Zone::ServiceReverse)
    ));
}

#[test]
fn non_octet_cluster_range() {
    let cfg = TableConfig {
        cluster_range: "10.40.0.0/13".parse().unwrap(),
        ..cfg()
    };
    let eps = sample();
    let t = Table::build(&cfg, &eps, 1);
    let c: IpAddr = OUTSIDE.parse().unwrap();
    assert!(matches!(
        t.resolve(&q("2.0.42.10.in-addr.arpa"), c),
        Resolution::Ptr(_, Zone::Reverse)
    ));
    assert!(matches!(
        t.resolve(&q("2.0.41.10.in-addr.arpa"), c),
        Resolution::NxDomain(Zone::Reverse)
    ));
    // 10.50.x is outside 10.40.0.0/13 though inside 10.in-addr.arpa.
    assert!(matches!(
        t.resolve(&q("2.0.50.10.in-addr.arpa"), c),
        Resolution::External
    ));
    assert!(matches!(
        t.resolve(&q("42.10.in-addr.arpa"), c),
        Resolution::External
    ));
    assert!(t
        .soa(Zone::Reverse)
        .starts_with(b"\x0210\x07in-addr\x04arpa\x00"));
}

#[test]
fn round_robin_rotates_every_query() {
    let eps: Vec<EndpointRecord> = (2..6)
        .map(|i| {
            endpoint(
                &format!("c{i}"),
                &format!("10.42.0.{i}"),
                None,
                Some("s"),
                Some("k"),
                &[],
            )
        })
        .collect();
    let t = Table::build(&cfg(), &eps, 1);
    let c: IpAddr = OUTSIDE.parse().unwrap();
    let Resolution::Addrs(e) = t.resolve(&q("s.k"), c) else {
        panic!("s.k unknown");
    };
    let mut firsts = Vec::new();
    for _ in 0..8 {
        let recs = e.rotated_records();
        assert_eq!(recs.len(), 4 * A_RECORD_LEN);
        firsts.push(recs[A_RECORD_LEN - 1]);
        // Every rotation holds every address once.
        let mut last: Vec<u8> = recs.chunks(A_RECORD_LEN).map(|r| r[15]).collect();
        last.sort();
        assert_eq!(last, vec![2, 3, 4, 5]);
    }
    assert_eq!(firsts, vec![2, 3, 4, 5, 2, 3, 4, 5]);
}

#[test]
fn invalid_names_are_skipped() {
    // A record with a name that breaks the DNS name rule does not even
    // parse (sync ignores it, with a warning).
    let bad = serde_json::json!({
        "container_id": "c0", "ifname": "eth0", "netns": "", "host_id": "h0",
        "address": "10.42.0.9/24", "gateway": "10.42.0.1", "mtu": 1420,
        "bridge": "weft0", "name": "bad name",
        "dns": {"nameservers": [], "domain": "weft.internal", "search": []},
        "created_at_ms": 0
    });
    assert!(serde_json::from_value::<EndpointRecord>(bad).is_err());
    // Names that are valid alone but too long together with the stack
    // and the domain (over 253 bytes) leave the endpoint out.
    let long_stack = format!("{}.{}.{}", "b".repeat(63), "c".repeat(63), "d".repeat(63));
    let eps = vec![
        endpoint(
            "c1",
            "10.42.0.2",
            Some(&"a".repeat(63)),
            Some("web"),
            Some(&long_stack),
            &[],
        ),
        endpoint(
            "c2",
            "10.42.0.3",
            Some("ok"),
            Some("web"),
            Some("shop"),
            &[],
        ),
    ];
    let t = Table::build(&cfg(), &eps, 1);
    assert_eq!(t.endpoints(), 1);
    assert_eq!(
        t.lookup("web.shop"),
        Some(&["10.42.0.3".parse().unwrap()][..])
    );
}

fn service(name: &str, vip: Option<&str>, mode: &str) -> ServiceRecord {
    let v = serde_json::json!({"name": name, "vip": vip, "spec": {"mode": mode}});
    match serde_json::from_value(v) {
        Ok(r) => r,
        Err(e) => panic!("bad test service: {e}"),
    }
}

/// sample() plus a stack-less `solo` and a container named like its
/// service; `web.shop` and `solo` in vip mode, `db.shop` dnsrr, `web.blog`
/// in vip mode without a VIP (range full), `gone.shop` with a VIP and no
/// container; `web-2` (10.42.1.2) unhealthy.
fn services_table() -> Table {
    let mut eps = sample();
    eps.push(endpoint(
        "c6",
        "10.42.0.6",
        Some("solo-1"),
        Some("solo"),
        None,
        &[],
    ));
    eps.push(endpoint(
        "c7",
        "10.42.0.7",
        Some("web"),
        Some("web"),
        Some("shop"),
        &[],
    ));
    let records = [
        service("web.shop", Some("10.43.0.5"), "vip"),
        service("db.shop", None, "dnsrr"),
        service("web.blog", None, "vip"),
        service("solo", Some("10.43.0.6"), "vip"),
        service("gone.shop", Some("10.43.0.9"), "vip"),
    ];
    let unhealthy = "10.42.1.2".parse::<Ipv4Addr>().unwrap();
    Table::build_with(
        &cfg(),
        eps.iter().map(|ep| (ep, ep.address.ip() != unhealthy)),
        &records,
        4,
    )
}

fn ptr_target(t: &Table, name: &str) -> Option<(Vec<u8>, Zone)> {
    match t.resolve(&q(name), OUTSIDE.parse().unwrap()) {
        Resolution::Ptr(rec, zone) => Some((rec[12..].to_vec(), zone)),
        _ => None,
    }
}

fn one(a: &str) -> Option<Vec<String>> {
    Some(vec![a.to_string()])
}

#[test]
fn vip_mode_names_answer_the_vip() {
    let t = services_table();
    assert_eq!(t.vips(), 2, "web.shop and solo; gone.shop has no container");
    let vip = one("10.43.0.5");
    for name in [
        "web.shop.weft.internal",
        "WEB.Shop.weft.internal",
        "web.shop",
    ] {
        assert_eq!(addrs(&t, name, OUTSIDE), vip, "{name}");
    }
    // The short form from a container of the stack (one A record).
    assert_eq!(addrs(&t, "web", "10.42.0.3"), vip);
    let Resolution::Addrs(e) = t.resolve(&q("web.shop"), OUTSIDE.parse().unwrap()) else {
        panic!("web.shop unknown");
    };
    assert_eq!(e.rotated_records().len(), A_RECORD_LEN);
    assert_eq!(&e.rotated_records()[12..], &[10, 43, 0, 5]);
    // A container named like the service keeps its other names (the
    // service name answers the VIP alone).
    assert_eq!(addrs(&t, "web", OUTSIDE), one("10.42.0.7"));
    assert_eq!(addrs(&t, "web.weft.internal", OUTSIDE), one("10.42.0.7"));
    assert_eq!(
        ptr_target(&t, "7.0.42.10.in-addr.arpa").map(|p| p.0),
        Some(b"\x03web\x04shop\x04weft\x08internal\x00".to_vec())
    );
    // Stack-less: `solo`, `solo.<domain>`.
    assert_eq!(addrs(&t, "solo", OUTSIDE), one("10.43.0.6"));
    assert_eq!(addrs(&t, "solo.weft.internal", OUTSIDE), one("10.43.0.6"));
    assert_eq!(addrs(&t, "solo-1", OUTSIDE), one("10.42.0.6"));
    // A record without a container answers nothing.
    assert!(matches!(
        t.resolve(&q("gone.shop"), OUTSIDE.parse().unwrap()),
        Resolution::NxDomain(Zone::Domain)
    ));
}

#[test]
fn tasks_names_answer_the_healthy_containers_in_both_modes() {
    let t = services_table();
    // vip mode: web-1 and the container named `web`; web-2 is unhealthy.
    let web = Some(vec!["10.42.0.2".to_string(), "10.42.0.7".to_string()]);
    assert_eq!(addrs(&t, "tasks.web.shop.weft.internal", OUTSIDE), web);
    assert_eq!(addrs(&t, "Tasks.Web.Shop", OUTSIDE), web);
    // dnsrr mode.
    assert_eq!(addrs(&t, "tasks.db.shop", OUTSIDE), one("10.42.0.3"));
    assert_eq!(addrs(&t, "db.shop", OUTSIDE), one("10.42.0.3"));
    // Stack-less.
    assert_eq!(addrs(&t, "tasks.solo", OUTSIDE), one("10.42.0.6"));
    assert_eq!(
        addrs(&t, "tasks.solo.weft.internal", OUTSIDE),
        one("10.42.0.6")
    );
    // vip mode without a VIP (the range was full): round robin, as before.
    assert_eq!(addrs(&t, "web.blog", OUTSIDE), one("10.42.1.3"));
    assert_eq!(addrs(&t, "web", "10.42.1.3"), one("10.42.1.3"));
    assert_eq!(addrs(&t, "tasks.web.blog", OUTSIDE), one("10.42.1.3"));
    // Names below the service name's FQDN make no name exist that did not.
    assert!(matches!(
        t.resolve(&q("nope.web.shop.weft.internal"), OUTSIDE.parse().unwrap()),
        Resolution::NxDomain(Zone::Domain)
    ));
}

#[test]
fn unhealthy_containers_leave_service_answers_and_keep_their_names() {
    let t = services_table();
    let c: IpAddr = OUTSIDE.parse().unwrap();
    // web-2 (10.42.1.2, service web.shop) is unhealthy: out of tasks ...
    assert!(!addrs(&t, "tasks.web.shop", OUTSIDE)
        .unwrap()
        .contains(&"10.42.1.2".to_string()));
    // ... but its own names and PTR answer.
    assert_eq!(addrs(&t, "web-2.shop", OUTSIDE), one("10.42.1.2"));
    assert_eq!(
        addrs(&t, "web-2.shop.weft.internal", OUTSIDE),
        one("10.42.1.2")
    );
    assert!(ptr_target(&t, "2.1.42.10.in-addr.arpa").is_some());
    // In dnsrr mode (and without a record) it leaves the round robin too;
    // a service whose containers are all unhealthy exists without records.
    let eps = sample();
    let records = [service("db.shop", None, "dnsrr")];
    let sick = |ip: &str| ip == "10.42.0.3" || ip == "10.42.1.2";
    let t = Table::build_with(
        &cfg(),
        eps.iter()
            .map(|ep| (ep, !sick(&ep.address.ip().to_string()))),
        &records,
        1,
    );
    assert_eq!(addrs(&t, "web.shop", OUTSIDE), one("10.42.0.2"));
    assert_eq!(addrs(&t, "web", "10.42.0.2"), one("10.42.0.2"));
    for name in ["db.shop", "db.shop.weft.internal", "tasks.db.shop"] {
        assert!(
            matches!(t.resolve(&q(name), c), Resolution::NoData(Zone::Domain)),
            "{name}"
        );
    }
    assert_eq!(addrs(&t, "db-1.shop", OUTSIDE), one("10.42.0.3"));
    // An alias is a service answer: web-1 (healthy) keeps `www`; an
    // unhealthy container's alias leaves.
    assert_eq!(addrs(&t, "www.shop", OUTSIDE), one("10.42.0.2"));
    let t = Table::build_with(
        &cfg(),
        eps.iter()
            .map(|ep| (ep, ep.address.ip().to_string() != "10.42.0.2")),
        &[],
        1,
    );
    assert!(matches!(
        t.resolve(&q("www.shop"), c),
        Resolution::NoData(Zone::Domain)
    ));
    assert_eq!(addrs(&t, "web-1.shop", OUTSIDE), one("10.42.0.2"));
}

#[test]
fn ptr_for_vips_names_the_service() {
    let t = services_table();
    assert_eq!(
        ptr_target(&t, "5.0.43.10.in-addr.arpa"),
        Some((
            b"\x03web\x04shop\x04weft\x08internal\x00".to_vec(),
            Zone::ServiceReverse
        ))
    );
    assert_eq!(
        ptr_target(&t, "6.0.43.10.IN-ADDR.ARPA"),
        Some((
            b"\x04solo\x04weft\x08internal\x00".to_vec(),
            Zone::ServiceReverse
        ))
    );
    let c: IpAddr = OUTSIDE.parse().unwrap();
    // gone.shop's VIP has no container: no PTR; nor has an unclaimed address.
    for name in ["9.0.43.10.in-addr.arpa", "77.7.43.10.in-addr.arpa"] {
        assert!(
            matches!(
                t.resolve(&q(name), c),
                Resolution::NxDomain(Zone::ServiceReverse)
            ),
            "{name}"
        );
    }
    assert!(matches!(
        t.resolve(&q("43.10.in-addr.arpa"), c),
        Resolution::Apex(Zone::ServiceReverse)
    ));
    assert!(matches!(
        t.resolve(&q("0.43.10.in-addr.arpa"), c),
        Resolution::NoData(Zone::ServiceReverse)
    ));
    assert!(t
        .soa(Zone::ServiceReverse)
        .starts_with(b"\x0243\x0210\x07in-addr\x04arpa\x00"));
    // Container PTRs are unchanged.
    assert_eq!(
        ptr_target(&t, "2.0.42.10.in-addr.arpa"),
        Some((
            b"\x05web-1\x04shop\x04weft\x08internal\x00".to_vec(),
            Zone::Reverse
        ))
    );
}

/// Every name and its addresses.
fn all_names(t: &Table) -> Vec<(Vec<u8>, Vec<Ipv4Addr>)> {
    let mut v: Vec<_> = t
        .names
        .iter()
        .map(|(k, e)| (k.to_vec(), e.addrs().to_vec()))
        .collect();
    v.sort();
    v
}

#[test]
fn without_vip_records_every_answer_is_as_before() {
    // dnsrr records, vip mode without a VIP, and a VIP record of a service
    // with no container change no answer of a table built from the
    // endpoints alone.
    let eps = sample();
    let before = Table::build(&cfg(), &eps, 1);
    let records = [
        service("web.shop", None, "dnsrr"),
        service("db.shop", None, "vip"),
        service("other.shop", Some("10.43.0.3"), "vip"),
        service("web.blog", Some("10.43.0.4"), "dnsrr"),
    ];
    let after = Table::build_with(&cfg(), eps.iter().map(|ep| (ep, true)), &records, 1);
    assert_eq!(all_names(&before), all_names(&after));
    assert_eq!(after.vips(), 0);
    assert_eq!(before.ptr.len(), after.ptr.len());
    // `tasks.` names the same containers as the service name.
    assert_eq!(after.lookup("tasks.web.shop"), before.lookup("web.shop"));
}
