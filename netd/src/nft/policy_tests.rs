#![allow(clippy::unwrap_used)]
use super::*;

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

fn policy(toml_text: &str) -> Policy {
    let p: Policy = toml::from_str(toml_text).unwrap();
    p.validate().unwrap();
    p
}

const SMALL: &str = r#"
default = "deny"
[stacks.shop]
within_stack = "allow"
[[rules]]
name = "web-to-api"
from = "shop/web"
to = "api"
ports = ["tcp/80"]
"#;

fn cluster() -> Vec<EndpointRecord> {
    vec![
        ep("10.42.0.2", "h0", Some("shop"), Some("web")),
        ep("10.42.0.3", "h0", Some("api"), Some("api")),
        ep("10.42.1.2", "h1", Some("shop"), Some("db")),
        ep("10.42.1.3", "h1", None, None),
    ]
}

fn compile_on_h0(p: &Policy, cluster: &[EndpointRecord]) -> Compiled {
    let local: Vec<_> = cluster
        .iter()
        .filter(|e| &*e.host_id == "h0")
        .cloned()
        .collect();
    compile(&PolicyInput {
        policy: p,
        cluster,
        local: &local,
        cluster_range: "10.42.0.0/16".parse().unwrap(),
        block: "10.42.0.0/24".parse().unwrap(),
        hosts: &[],
    })
}

#[test]
fn small_case_golden() {
    let c = compile_on_h0(&policy(SMALL), &cluster());
    let want = "table inet weft {
	counter allow-web-to-api {
		comment \"web-to-api\"
	}
	counter allow-within_stack {
		comment \"within_stack\"
	}
	counter drops {
		comment \"flows the policy dropped\"
	}
	map to_identity {
		type ipv4_addr : verdict
		elements = {
			10.42.0.2 : goto id-2,
			10.42.0.3 : goto id-1
		}
	}
	map ports-1 {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = {
			10.42.0.2 . tcp . 80 : jump allow-web-to-api
		}
	}
	set known-1 {
		type ipv4_addr
		elements = {
			10.42.0.2
		}
	}
	map all-2 {
		type ipv4_addr : verdict
		elements = {
			10.42.0.2 : jump allow-within_stack,
			10.42.1.2 : jump allow-within_stack
		}
	}
	set known-2 {
		type ipv4_addr
		elements = {
			10.42.0.2,
			10.42.1.2
		}
	}
	chain drop-flow {
		counter name \"drops\" drop
	}
	chain allow-web-to-api {
		counter name \"allow-web-to-api\" accept
	}
	chain allow-within_stack {
		counter name \"allow-within_stack\" accept
	}
	chain id-0 {
		comment \"-\"
		goto drop-flow
	}
	chain id-1 {
		comment \"api/api\"
		ip saddr . meta l4proto . th dport vmap @ports-1
		ip saddr @known-1 goto drop-flow
		goto drop-flow
	}
	chain id-2 {
		comment \"shop/web\"
		ip saddr vmap @all-2
		ip saddr @known-2 goto drop-flow
		goto drop-flow
	}
	chain forward_in {
		type filter hook forward priority filter; policy accept;
		ct direction reply accept
		ip saddr != 10.42.0.0/16 accept
		ip daddr vmap @to_identity
		ip daddr 10.42.0.0/24 goto id-0
	}
}
";
    assert_eq!(c.table.render(), want, "got:\n{}", c.table.render());
}

#[test]
fn default_allow_has_empty_maps_whatever_the_size() {
    let mut eps = cluster();
    for i in 0..200u32 {
        let addr = format!("10.42.{}.{}", 2 + i / 200, 10 + i % 200);
        eps.push(ep(&addr, "h9", Some(&format!("s{}", i % 7)), Some("x")));
    }
    let c = compile_on_h0(&Policy::default(), &eps);
    assert!(
        !c.table.render().contains("elements = {\n\t\t\t10.42.2"),
        "{}",
        c.table.render()
    );
    assert!(
        c.table
            .render()
            .contains("\t\tjump allow-cluster_default\n"),
        "{}",
        c.table.render()
    );
    assert!(!c.table.render().contains("known-"), "{}", c.table.render());
}

#[test]
fn unknown_sources_get_what_stackless_containers_get() {
    let p = policy(
        r#"
default = "deny"
[[rules]]
name = "dns-ish"
from = "*"
to = "shop"
ports = ["udp/53", "tcp/53"]
"#,
    );
    let c = compile_on_h0(&p, &cluster());
    // shop/web: every source, known or not, gets the two ports inline.
    assert!(
        c.table.render().contains(
            "meta l4proto . th dport vmap { tcp . 53 : jump allow-dns-ish, udp . 53 : jump allow-dns-ish }"
        ) || c.table.render().contains(
            "meta l4proto . th dport vmap { udp . 53 : jump allow-dns-ish, tcp . 53 : jump allow-dns-ish }"
        ),
        "{}",
        c.table.render()
    );
}

#[test]
fn lost_reach_names_the_pairs_to_cut() {
    let lost_reach = |old: &Compiled, new: &Compiled| -> Vec<(Ipv4Addr, Ipv4Addr)> {
        super::lost_reach(old, new)
            .into_iter()
            .map(|l| (l.src, l.dst))
            .collect()
    };
    let eps = cluster();
    let before = compile_on_h0(&policy(SMALL), &eps);
    // Nothing changed: nothing to cut.
    assert!(lost_reach(&before, &before).is_empty());
    // shop no longer allows itself; web-to-api keeps its port.
    let after = compile_on_h0(
        &policy(&SMALL.replace("within_stack = \"allow\"", "")),
        &eps,
    );
    let web: Ipv4Addr = "10.42.0.2".parse().unwrap();
    let db: Ipv4Addr = "10.42.1.2".parse().unwrap();
    assert_eq!(lost_reach(&before, &after), vec![(web, web), (db, web)]);
    // Opening more cuts nothing.
    assert!(lost_reach(&after, &before).is_empty());
    // The rule narrows from every port to one: web -> api is cut.
    let wide = compile_on_h0(&policy(&SMALL.replace("ports = [\"tcp/80\"]", "")), &eps);
    let api: Ipv4Addr = "10.42.0.3".parse().unwrap();
    assert!(lost_reach(&wide, &before).contains(&(web, api)));
    // From allow-all to SMALL: what unknown sources get shrank, so every
    // source is checked (api -> web was allowed by the default, now is not;
    // db -> web keeps within_stack).
    let open = compile_on_h0(&Policy::default(), &eps);
    let cut = lost_reach(&open, &before);
    let stackless: Ipv4Addr = "10.42.1.3".parse().unwrap();
    assert!(
        cut.contains(&(api, web)) && cut.contains(&(stackless, web)),
        "{cut:?}"
    );
    assert!(
        !cut.contains(&(db, web)) && !cut.contains(&(web, web)),
        "{cut:?}"
    );
    // A source whose record is gone is unknown: it loses what it had.
    let fewer: Vec<_> = eps
        .iter()
        .filter(|e| e.address.ip() != db)
        .cloned()
        .collect();
    let gone = compile_on_h0(&policy(SMALL), &fewer);
    assert_eq!(lost_reach(&before, &gone), vec![(db, web)]);
}

#[test]
fn covers_compares_ports_and_all() {
    let by = DecidedBy::ClusterDefault;
    let tcp80 = "tcp/80".parse().unwrap();
    let all = Reach {
        all: Some(by.clone()),
        ports: vec![],
    };
    let one = Reach {
        all: None,
        ports: vec![(tcp80, by.clone())],
    };
    let none = Reach::default();
    assert!(covers(&all, &one));
    assert!(!covers(&one, &all));
    assert!(covers(&one, &one));
    assert!(!covers(&none, &one));
    assert!(covers(&none, &none));
}

#[test]
fn restricting_rules_to_a_destination_changes_no_reach() {
    let p = policy(
        r#"
default = "deny"
[stacks.shop]
within_service = "allow"
linked = ["api"]
[stacks.api]
ingress = "deny"
[[rules]]
name = "any-to-api-80"
from = "*"
to = "api"
ports = ["tcp/80"]
[[rules]]
name = "web-to-db"
from = "shop/web"
to = "shop/db"
[[rules]]
name = "to-all-53"
from = "shop"
to = "*"
ports = ["udp/53", "tcp/80"]
[[rules]]
name = "api-to-web"
from = "api"
to = "shop/web"
ports = ["tcp/8080"]
"#,
    );
    let parties: Vec<Party> = [
        "-", "shop", "shop/web", "shop/db", "api", "api/api", "-/web", "other/x",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    for to in &parties {
        let (restricted, index) = restrict(&p, to);
        assert!(restricted.rules.len() < p.rules.len() || to.stack.is_none());
        for from in &parties {
            assert_eq!(
                renumber(restricted.reach(from, to), &index),
                p.reach(from, to),
                "{from} -> {to}"
            );
        }
    }
}

#[test]
fn other_hosts_are_not_subject_to_policy() {
    let eps = cluster();
    let local: Vec<_> = eps
        .iter()
        .filter(|e| &*e.host_id == "h0")
        .cloned()
        .collect();
    let gw: Ipv4Addr = "10.42.1.1".parse().unwrap();
    let c = compile(&PolicyInput {
        policy: &policy(SMALL),
        cluster: &eps,
        local: &local,
        cluster_range: "10.42.0.0/16".parse().unwrap(),
        block: "10.42.0.0/24".parse().unwrap(),
        hosts: &[gw, gw],
    });
    assert!(
        c.table.render().contains(
            "\tset hosts {\n\t\ttype ipv4_addr\n\t\telements = {\n\t\t\t10.42.1.1\n\t\t}\n\t}\n"
        ),
        "{}",
        c.table.render()
    );
    assert!(
        c.table.render().contains(
            "\t\tip saddr != 10.42.0.0/16 accept\n\t\tip saddr @hosts accept\n\t\tip daddr vmap @to_identity\n"
        ),
        "{}",
        c.table.render()
    );
}

/// A pair that loses some ports keeps its connections on the others.
#[test]
fn lost_reach_says_what_each_pair_keeps() {
    let eps = cluster();
    let wide = compile_on_h0(&policy(&SMALL.replace("ports = [\"tcp/80\"]", "")), &eps);
    let narrow = compile_on_h0(&policy(SMALL), &eps);
    let web: Ipv4Addr = "10.42.0.2".parse().unwrap();
    let api: Ipv4Addr = "10.42.0.3".parse().unwrap();
    let lost = super::lost_reach(&wide, &narrow);
    let l = lost
        .iter()
        .find(|l| (l.src, l.dst) == (web, api))
        .unwrap_or_else(|| panic!("{lost:?}"));
    assert!(l.keep.allows(Some((Protocol::Tcp, 80))).is_some());
    assert!(l.keep.allows(Some((Protocol::Tcp, 81))).is_none());
    assert!(l.keep.allows(None).is_none());
}
