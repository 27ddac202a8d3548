#![allow(clippy::unwrap_used)]
use super::*;
use weft_model::ServiceSpec;

fn ep(addr: &str, host: &str, stack: Option<&str>, service: Option<&str>) -> EndpointRecord {
    let id = addr.replace('.', "-");
    let mut v = serde_json::json!({
        "container_id": format!("c-{id}"), "ifname": "eth0", "netns": "/proc/1/ns/net",
        "host_id": host, "address": format!("{addr}/24"), "gateway": "10.42.0.1",
        "mtu": 1400, "bridge": "weft0",
        "dns": {"nameservers": [], "domain": "weft", "search": []}, "created_at_ms": 0
    });
    if let Some(s) = stack {
        v["stack"] = s.into();
    }
    if let Some(s) = service {
        v["service"] = s.into();
    }
    serde_json::from_value(v).unwrap()
}

fn svc(name: &str, vip: Option<&str>, spec: ServiceSpec) -> ServiceRecord {
    ServiceRecord {
        name: name.parse().unwrap(),
        vip: vip.map(|v| v.parse().unwrap()),
        spec,
        empty_since_ms: None,
    }
}

fn hash() -> ServiceSpec {
    ServiceSpec {
        balance: Balance::Hash,
        ..ServiceSpec::default()
    }
}

fn affinity() -> ServiceSpec {
    ServiceSpec {
        affinity: true,
        ..ServiceSpec::default()
    }
}

fn dnsrr() -> ServiceSpec {
    ServiceSpec {
        mode: Mode::Dnsrr,
        ..ServiceSpec::default()
    }
}

fn health(keys: &Keys, r: &EndpointRecord, healthy: bool) -> (String, HealthRecord) {
    (
        keys.health_of(
            r.host_id.as_str(),
            r.container_id.as_str(),
            r.ifname.as_str(),
        ),
        HealthRecord {
            healthy,
            since_ms: 1,
            detail: String::new(),
        },
    )
}

/// web.shop: three containers on two hosts, one unhealthy, one healthy by
/// record; api.shop: no container (dead); db: one container, affinity;
/// cache.shop: hash; dns.shop: dnsrr (no VIP, nothing); a container without
/// a service; a record whose service has no record yet.
struct Cluster {
    services: Vec<ServiceRecord>,
    endpoints: Vec<EndpointRecord>,
    health: BTreeMap<String, HealthRecord>,
    keys: Keys,
}

impl Cluster {
    fn new() -> Cluster {
        let keys = Keys::default();
        let endpoints = vec![
            ep("10.42.0.2", "h0", Some("shop"), Some("web")),
            ep("10.42.1.2", "h1", Some("shop"), Some("web")),
            ep("10.42.1.3", "h1", Some("shop"), Some("web")),
            ep("10.42.0.4", "h0", None, Some("db")),
            ep("10.42.0.5", "h0", Some("shop"), Some("cache")),
            ep("10.42.1.5", "h1", Some("shop"), Some("cache")),
            ep("10.42.0.6", "h0", Some("shop"), Some("dns")),
            ep("10.42.0.7", "h0", None, None),
            ep("10.42.0.8", "h0", Some("shop"), Some("new")),
        ];
        let health = BTreeMap::from([
            health(&keys, &endpoints[1], false),
            health(&keys, &endpoints[2], true),
        ]);
        let services = vec![
            svc("web.shop", Some("10.43.0.2"), ServiceSpec::default()),
            svc("api.shop", Some("10.43.0.3"), hash()),
            svc("db", Some("10.43.0.4"), affinity()),
            svc("cache.shop", Some("10.43.0.5"), hash()),
            svc("dns.shop", Some("10.43.0.6"), dnsrr()),
        ];
        Cluster {
            services,
            endpoints,
            health,
            keys,
        }
    }

    fn compile(&self) -> Compiled {
        compile(&ServicesInput {
            services: &self.services,
            endpoints: &self.endpoints,
            health: &self.health,
            keys: &self.keys,
            service_range: "10.43.0.0/16".parse().unwrap(),
        })
    }
}

fn a(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// The slots of `vip` in `c`, in slot order: the backend of each.
fn slots_of(c: &Compiled, vip: &str) -> Vec<String> {
    let map = &c.table.set("slots").unwrap().elements;
    (0..SLOTS)
        .map(|i| {
            map.get(&format!("{vip} . {i}"))
                .cloned()
                .flatten()
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn golden() {
    let c = Cluster::new().compile();
    let text = c.table.render();
    // The fixed part: chains and declarations, whatever the services.
    let head = "table ip weft_svc {
	map vips {
		type ipv4_addr : verdict
		elements = {
			10.43.0.2 : goto pick-random,
			10.43.0.4 : goto pick-affinity,
			10.43.0.5 : goto pick-hash
		}
	}
	map slots {
		typeof ip daddr . numgen random mod 60 : ip daddr
		elements = {
			10.43.0.2 . 0 : 10.42.0.2,
			10.43.0.2 . 1 : 10.42.1.3,
			10.43.0.2 . 10 : 10.42.0.2,
";
    assert!(text.starts_with(head), "got:\n{text}");
    let tail = "	set hairpin {
		type ipv4_addr . ipv4_addr
		elements = {
			10.42.0.2 . 10.42.0.2,
			10.42.0.4 . 10.42.0.4,
			10.42.0.5 . 10.42.0.5,
			10.42.1.3 . 10.42.1.3,
			10.42.1.5 . 10.42.1.5
		}
	}
	set dead {
		type ipv4_addr
		elements = {
			10.43.0.3
		}
	}
	chain pick-random {
		dnat to ip daddr . numgen random mod 60 map @slots
	}
	chain pick-hash {
		dnat to ip daddr . symhash mod 60 map @slots
	}
	chain pick-affinity {
		dnat to ip daddr . jhash ip saddr mod 60 seed 0x77656674 map @slots
	}
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr vmap @vips
	}
	chain output {
		type nat hook output priority -100; policy accept;
		ip daddr vmap @vips
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ct status dnat ip saddr . ip daddr @hairpin masquerade
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		ip daddr 10.43.0.0/16 meta l4proto tcp reject with tcp reset
		ip daddr @dead reject
		ip daddr 10.43.0.0/16 reject with icmp type admin-prohibited
	}
	chain output_filter {
		type filter hook output priority filter; policy accept;
		ip daddr 10.43.0.0/16 meta l4proto tcp reject with tcp reset
		ip daddr @dead reject
		ip daddr 10.43.0.0/16 reject with icmp type admin-prohibited
	}
}
";
    assert!(text.ends_with(tail), "got:\n{text}");
    // Every live VIP has all its slots, backend i mod n in slot i: the two
    // web backends take 30 slots each, db's one backend all 60.
    assert_eq!(c.table.set("slots").unwrap().elements.len(), 3 * 60);
    let web = slots_of(&c, "10.43.0.2");
    assert_eq!(web.iter().filter(|b| *b == "10.42.0.2").count(), 30);
    assert_eq!(web.iter().filter(|b| *b == "10.42.1.3").count(), 30);
    assert!(slots_of(&c, "10.43.0.4").iter().all(|b| b == "10.42.0.4"));
    assert_eq!(
        c.backends,
        BTreeMap::from([
            (a("10.43.0.2"), vec![a("10.42.0.2"), a("10.42.1.3")]),
            (a("10.43.0.3"), vec![]),
            (a("10.43.0.4"), vec![a("10.42.0.4")]),
            (a("10.43.0.5"), vec![a("10.42.0.5"), a("10.42.1.5")]),
        ])
    );
    // What the kernel lists back names the backends.
    assert_eq!(
        backends_listed("elements = { 10.43.0.2 . 0 : 10.42.0.2, 10.43.0.2 . 1 : 10.42.1.3 }"),
        BTreeSet::from([a("10.42.0.2"), a("10.42.1.3")])
    );
    assert!(slot_query(a("10.43.0.2")).starts_with("{ 10.43.0.2 . 0, 10.43.0.2 . 1, "));
}

/// Seven backends cannot share 60 slots evenly: 9 or 8 each.
#[test]
fn slots_spread_backends_within_one_slot() {
    let mut cl = Cluster::new();
    for i in 0..5 {
        cl.endpoints.push(ep(
            &format!("10.42.3.{}", 10 + i),
            "h3",
            Some("shop"),
            Some("web"),
        ));
    }
    let c = cl.compile();
    let web = slots_of(&c, "10.43.0.2");
    let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
    for b in &web {
        *counts.entry(b).or_default() += 1;
    }
    assert_eq!(counts.len(), 7, "{counts:?}");
    assert!(counts.values().all(|n| *n == 8 || *n == 9), "{counts:?}");
}

#[test]
fn health_decides_who_is_a_backend() {
    let mut cl = Cluster::new();
    // No record, or a healthy one: a backend; an unhealthy one: not.
    let keys = cl.keys.clone();
    assert!(healthy(&cl.endpoints[0], &cl.health, &keys));
    assert!(!healthy(&cl.endpoints[1], &cl.health, &keys));
    assert!(healthy(&cl.endpoints[2], &cl.health, &keys));
    // Every container of web.shop unhealthy: the VIP is dead, its slots
    // and its backends' hairpin elements go.
    let (k, h) = health(&keys, &cl.endpoints[0], false);
    cl.health.insert(k, h);
    let (k, h) = health(&keys, &cl.endpoints[2], false);
    cl.health.insert(k, h);
    let c = cl.compile();
    assert_eq!(c.backends[&a("10.43.0.2")], Vec::<Ipv4Addr>::new());
    assert!(c
        .table
        .set("dead")
        .unwrap()
        .elements
        .contains_key("10.43.0.2"));
    assert!(!c
        .table
        .set("vips")
        .unwrap()
        .elements
        .contains_key("10.43.0.2"));
    assert!(slots_of(&c, "10.43.0.2").iter().all(String::is_empty));
    assert!(!c
        .table
        .set("hairpin")
        .unwrap()
        .elements
        .contains_key("10.42.0.2 . 10.42.0.2"));
}

#[test]
fn dnsrr_and_vipless_services_get_nothing() {
    let mut cl = Cluster::new();
    cl.services = vec![
        svc("dns.shop", Some("10.43.0.6"), dnsrr()),
        svc("web.shop", None, ServiceSpec::default()),
    ];
    let c = cl.compile();
    assert!(c.backends.is_empty());
    assert!(c.table.set("vips").unwrap().elements.is_empty());
    assert!(c.table.set("dead").unwrap().elements.is_empty());
    // Still refuses the whole range (no VIP there answers).
    assert!(c
        .table
        .render()
        .contains("ip daddr 10.43.0.0/16 reject with icmp type admin-prohibited"));
    assert!(c.table.set("slots").unwrap().elements.is_empty());
}

#[test]
fn a_backend_change_is_a_small_update() {
    let cl = Cluster::new();
    let before = cl.compile();
    // A fourth web container on h2; 10.42.0.2 leaves.
    let mut after = Cluster::new();
    after.endpoints.remove(0);
    after
        .endpoints
        .push(ep("10.42.2.9", "h2", Some("shop"), Some("web")));
    let after = after.compile();
    let script = after.table.update(&before.table).unwrap();
    assert!(!script.contains("delete table"), "{script}");
    assert!(!script.contains("chain"), "only elements change: {script}");
    assert!(
        script.contains("delete element ip weft_svc hairpin { 10.42.0.2 . 10.42.0.2 }\n"),
        "{script}"
    );
    assert!(
        script.contains("add element ip weft_svc hairpin { 10.42.2.9 . 10.42.2.9 }\n"),
        "{script}"
    );
    assert!(script.contains("10.43.0.2 . 0 : 10.42.1.3"), "{script}");
    assert!(script.contains("10.43.0.2 . 1 : 10.42.2.9"), "{script}");
    // The other services' slots are untouched.
    for other in ["10.43.0.4 .", "10.43.0.5 .", "prerouting"] {
        assert!(!script.contains(other), "{other} in {script}");
    }
    // The same inputs make the same table: nothing to do (the affinity
    // hash's seed is fixed, so clients keep their backend on a rewrite).
    assert_eq!(cl.compile(), before);
    assert_eq!(before.table.update(&before.table).unwrap(), "");
}

#[test]
fn removed_pairs_are_the_backends_that_left() {
    let cl = Cluster::new();
    let before = cl.compile();
    assert!(removed(&before, &before).is_empty());
    let mut next = Cluster::new();
    // 10.42.1.3 turns unhealthy; db loses its VIP record altogether.
    let (k, h) = health(&next.keys, &next.endpoints[2], false);
    next.health.insert(k, h);
    next.services.retain(|s| s.name.to_string() != "db");
    // cache.shop gains a backend: nothing to delete for it.
    next.endpoints
        .push(ep("10.42.2.5", "h2", Some("shop"), Some("cache")));
    let after = next.compile();
    assert_eq!(
        removed(&before, &after),
        vec![
            (a("10.43.0.2"), a("10.42.1.3")),
            (a("10.43.0.4"), a("10.42.0.4")),
        ]
    );
    assert!(removed(&after, &before).contains(&(a("10.43.0.5"), a("10.42.2.5"))));
}

#[test]
fn an_address_in_two_records_is_one_backend() {
    let mut cl = Cluster::new();
    // A stale record with the same address (a container re-created).
    let mut dup = cl.endpoints[0].clone();
    dup.container_id = serde_json::from_value(serde_json::json!("c-again")).unwrap();
    cl.endpoints.push(dup);
    let c = cl.compile();
    assert_eq!(
        c.backends[&a("10.43.0.2")],
        vec![a("10.42.0.2"), a("10.42.1.3")]
    );
}
