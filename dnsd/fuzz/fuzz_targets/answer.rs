//! Any bytes, as a UDP or TCP query from a cluster or an outside client:
//! the answer path must not panic, and an answer must carry the query's id
//! and fit the transport's limit. Upstream answers go through the cache
//! scanner as well.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weft_dnsd::answer::{handle, Acl, Action};
use weft_dnsd::forward::cache_ttl;
use weft_dnsd::table::{Table, TableConfig};

fn table() -> &'static Table {
    static T: OnceLock<Table> = OnceLock::new();
    T.get_or_init(|| {
        let eps: Vec<weft_model::EndpointRecord> = (0..60)
            .filter_map(|i| {
                serde_json::from_value(serde_json::json!({
                    "container_id": format!("c{i}"), "ifname": "eth0", "netns": "",
                    "host_id": "h0", "address": format!("10.42.0.{}/24", 2 + i),
                    "gateway": "10.42.0.1", "mtu": 1420, "bridge": "weft0",
                    "name": format!("web-{i}"), "service": "web", "stack": "shop",
                    "aliases": ["www"], "dns": {"nameservers": [], "domain": "", "search": []},
                    "created_at_ms": 0
                }))
                .ok()
            })
            .collect();
        let cfg = TableConfig {
            domain: "weft.internal".into(),
            ttl: 1,
            cluster_range: ipnetwork::Ipv4Network::new([10, 42, 0, 0].into(), 16)
                .unwrap_or_else(|_| unreachable!()),
            service_range: ipnetwork::Ipv4Network::new([10, 43, 0, 0].into(), 16)
                .unwrap_or_else(|_| unreachable!()),
        };
        // `web.shop` answers its VIP; every third container is unhealthy.
        let web: Option<weft_model::ServiceRecord> = serde_json::from_value(serde_json::json!({
            "name": "web.shop", "vip": "10.43.0.7", "spec": {"mode": "vip"}
        }))
        .ok();
        Table::build_with(
            &cfg,
            eps.iter().enumerate().map(|(i, ep)| (ep, i % 3 != 0)),
            web.iter(),
            1,
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, packet)) = data.split_first() else {
        return;
    };
    let client: IpAddr = if sel & 1 == 0 {
        IpAddr::from([10, 42, 0, 2])
    } else {
        IpAddr::from([192, 0, 2, 1])
    };
    let tcp = sel & 2 != 0;
    let acl = Acl::new(vec![]);
    let mut out = vec![0u8; if tcp { 65535 } else { 1232 }];
    if let Action::Reply(n) = handle(table(), &acl, packet, client, tcp, &mut out) {
        assert!(n >= 12 && n <= out.len());
        assert_eq!(&out[..2], &packet[..2]);
    }
    // What the forwarder does with an upstream answer before caching it.
    if let Ok(m) = hickory_proto::op::Message::from_vec(packet) {
        let _ = cache_ttl(&m);
        let _ = m.to_vec();
    }
});
