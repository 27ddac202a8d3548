//! A short fuzz run of the request path that `cargo test` runs (so CI does):
//! random bytes and random well-framed queries through the parser, the
//! answer path and the upstream-answer scanner. Nothing may panic, and every
//! answer dnsd writes must be a DNS message an independent parser
//! (hickory-proto) accepts, with the query's id, within the size limit.
//! The longer, coverage-guided run is `dnsd/fuzz` (cargo-fuzz, nightly).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use hickory_proto::op::Message;
use proptest::prelude::*;
use weft_dnsd::answer::{handle, Acl, Action};
use weft_dnsd::forward::cache_ttl;
use weft_dnsd::table::{Table, TableConfig};
use weft_dnsd::wire::parse_query;

fn endpoint(i: usize, service: &str, stack: &str) -> weft_model::EndpointRecord {
    serde_json::from_value(serde_json::json!({
        "container_id": format!("c{i}"), "ifname": "eth0", "netns": "", "host_id": "h0",
        "address": format!("10.42.{}.{}/24", i / 200, 2 + i % 200), "gateway": "10.42.0.1",
        "mtu": 1420, "bridge": "weft0", "name": format!("{service}-{i}"),
        "service": service, "stack": stack, "aliases": ["alias"],
        "dns": {"nameservers": [], "domain": "", "search": []}, "created_at_ms": 0
    }))
    .unwrap()
}

/// What the forwarder does with an upstream answer before caching it.
fn scan_answer(bytes: &[u8]) {
    if let Ok(m) = Message::from_vec(bytes) {
        let _ = cache_ttl(&m);
        let _ = m.to_vec();
    }
}

fn table() -> &'static Table {
    static TABLE: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
    TABLE.get_or_init(build_table)
}

fn build_table() -> Table {
    let mut eps: Vec<_> = (0..120).map(|i| endpoint(i, "big", "shop")).collect();
    eps.push(endpoint(500, "web", "shop"));
    eps.push(endpoint(501, "db", "blog"));
    let cfg = TableConfig {
        domain: "weft.internal".into(),
        ttl: 1,
        cluster_range: "10.42.0.0/16".parse().unwrap(),
        service_range: "10.43.0.0/16".parse().unwrap(),
    };
    // `web.shop` answers its VIP; every third `big` is unhealthy.
    let web: weft_model::ServiceRecord = serde_json::from_value(serde_json::json!({
        "name": "web.shop", "vip": "10.43.0.7", "spec": {"mode": "vip"}
    }))
    .unwrap();
    Table::build_with(
        &cfg,
        eps.iter().enumerate().map(|(i, ep)| (ep, i % 3 != 0)),
        [&web],
        1,
    )
}

fn acl() -> Acl {
    Acl::new(vec![
        "10.42.0.0/16".parse().unwrap(),
        "127.0.0.0/8".parse().unwrap(),
    ])
}

/// Runs one packet through the answer path and checks the answer.
fn check(t: &Table, packet: &[u8], client: IpAddr, tcp: bool) {
    let mut out = vec![0u8; if tcp { 65535 } else { 1232 }];
    let action = handle(t, &acl(), packet, client, tcp, &mut out);
    if let Action::Reply(n) = action {
        assert!(n >= 12 && n <= out.len());
        if !tcp {
            let limit = parse_query(packet).map(|q| q.udp_limit()).unwrap_or(512);
            assert!(n <= limit, "{n} > {limit}");
        }
        assert_eq!(&out[..2], &packet[..2], "the id comes back");
        assert!(out[2] & 0x80 != 0, "QR set");
        if let Err(e) = Message::from_vec(&out[..n]) {
            panic!(
                "dnsd wrote an unparsable answer ({e}) to {packet:?}: {:?}",
                &out[..n]
            );
        }
    }
}

/// A well-framed query: header, one question of random labels, optional OPT.
fn framed_query() -> impl Strategy<Value = Vec<u8>> {
    let names = prop_oneof![
        Just(vec![
            "big".to_string(),
            "shop".into(),
            "weft".into(),
            "internal".into()
        ]),
        Just(vec!["big".to_string(), "shop".into()]),
        Just(vec!["tasks".to_string(), "web".into(), "shop".into()]),
        Just(vec![
            "7".to_string(),
            "0".into(),
            "43".into(),
            "10".into(),
            "in-addr".into(),
            "arpa".into()
        ]),
        Just(vec!["web".to_string()]),
        Just(vec![
            "2".to_string(),
            "0".into(),
            "42".into(),
            "10".into(),
            "in-addr".into(),
            "arpa".into()
        ]),
        Just(vec!["weft".to_string(), "internal".into()]),
        prop::collection::vec("[a-zA-Z0-9-]{1,20}", 0..6),
        prop::collection::vec("[a-z]{1,63}", 0..5),
    ];
    (
        any::<u16>(),
        any::<u16>(),
        names,
        prop_oneof![
            Just(1u16),
            Just(28),
            Just(12),
            Just(6),
            Just(255),
            any::<u16>()
        ],
        prop_oneof![Just(1u16), Just(255), any::<u16>()],
        prop::option::of((any::<u16>(), any::<u8>(), any::<u8>(), any::<u16>())),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(id, flags, labels, qtype, qclass, opt, tail)| {
            let mut p = id.to_be_bytes().to_vec();
            p.extend((flags & 0x7fff).to_be_bytes());
            p.extend([0, 1, 0, 0, 0, 0, 0, u8::from(opt.is_some())]);
            for l in &labels {
                p.push(l.len() as u8);
                p.extend(l.as_bytes());
            }
            p.push(0);
            p.extend(qtype.to_be_bytes());
            p.extend(qclass.to_be_bytes());
            if let Some((size, ext, version, eflags)) = opt {
                p.extend([0, 0, 41]);
                p.extend(size.to_be_bytes());
                p.extend([ext, version]);
                p.extend(eflags.to_be_bytes());
                p.extend([0, 0]);
            }
            p.extend(tail);
            p
        })
}

fn client() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        Just("10.42.0.2".parse().unwrap()),
        Just("10.42.0.121".parse().unwrap()),
        Just("127.0.0.1".parse().unwrap()),
        Just("192.0.2.1".parse().unwrap()),
        Just("::ffff:10.42.0.2".parse().unwrap()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..700), c in client(), tcp in any::<bool>()) {
        let t = table();
        let _ = parse_query(&bytes);
        scan_answer(&bytes);
        check(t, &bytes, c, tcp);
    }

    #[test]
    fn framed_queries_get_well_formed_answers(p in framed_query(), c in client(), tcp in any::<bool>()) {
        let t = table();
        check(t, &p, c, tcp);
    }

    #[test]
    fn mutated_queries_never_panic(p in framed_query(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), c in client()) {
        let t = table();
        let mut p = p;
        for (i, v) in flips {
            let i = i.index(p.len());
            p[i] = v;
        }
        check(t, &p, c, false);
        scan_answer(&p);
    }
}
