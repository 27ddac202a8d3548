//! Anti-spoofing on the container ports: [`render`] turns this host's
//! endpoint records into `table bridge weft`, which lets a frame that a
//! container sends into the bridge through its port pass only with the MAC
//! and IPv4 address weft assigned it.
//!
//! ```text
//! set ports  { type ifname }                                 # every container port
//! set ip_ok  { type ifname . ether_addr . ipv4_addr }        # port . its MAC . its address
//! set arp_ok { type ifname . ether_addr . ipv4_addr }        # the same, for ARP sender fields
//! set mac_ok { type ifname . ether_addr }                    # port . its MAC (DHCP before an address)
//! counter spoof_<port> { comment "<container id>" }          # one per port
//! map spoof_drops { type ifname : counter }                  # port -> its counter
//! chain prerouting { type filter hook prerouting priority -300; policy accept;
//!   iifname != @ports accept                                 # not a container port
//!   ether type ip iifname . ether saddr . ip saddr @ip_ok accept
//!   ether type arp <ethernet/IPv4 ARP> iifname . ether saddr . arp saddr ip @arp_ok
//!                  iifname . arp saddr ether . arp saddr ip @arp_ok accept
//!   ether type ip ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67
//!                 iifname . ether saddr @mac_ok accept       # DHCP discover/request
//!   ether type ip6 drop                                      # weft is IPv4 only; not a spoof
//!   counter name iifname map @spoof_drops drop
//!   drop }                                                   # (a port always has a counter)
//! ```
//!
//! The port is the host end of the container's veth, named by
//! [`weft_model::host_veth_name`]; the MAC is [`Mac::for_addr`] of the
//! address, the one the CNI plugin gives the container end. The chain runs in
//! the bridge's prerouting hook, before the bridge learns the source MAC or
//! forwards the frame, and on the host side of the veth, where nothing in the
//! container can reach it. Per frame it is a few hash lookups whatever the
//! number of containers.
//!
//! The `bridge` family has no conntrack (and needs none: every rule looks at
//! one frame). An ARP frame must carry the port's MAC both as the Ethernet
//! source and as the ARP sender, so a container can neither claim a
//! neighbour's address nor teach the bridge or a neighbour another MAC.
//!
//! The counters are named after the port and carry the container id as
//! their comment (nft allows 128 characters; a longer id is cut there and
//! ends in `...`), which [`drops_by_container`] turns into
//! `weft_spoof_drops_total{container}`.

use std::collections::BTreeMap;

use weft_model::{host_veth_name, EndpointRecord, Mac};

use super::table::{Set, Table};
use super::NamedCounter;

/// Prefix of the per-port drop counters.
pub const COUNTER_PREFIX: &str = "spoof_";
/// nft's longest comment.
const COMMENT_MAX: usize = 128;

/// One container port and what may come out of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Port {
    name: String,
    mac: Mac,
    addr: std::net::Ipv4Addr,
    container: String,
}

fn ports(local: &[EndpointRecord]) -> Vec<Port> {
    let mut out: Vec<Port> = local
        .iter()
        .map(|r| Port {
            name: host_veth_name(r.container_id.as_str(), r.ifname.as_str()),
            mac: Mac::for_addr(r.address.ip()),
            addr: r.address.ip(),
            container: r.container_id.to_string(),
        })
        .collect();
    // One script per set of records, whatever their order (netd applies
    // only when the script changes).
    out.sort();
    out.dedup_by(|a, b| a.name == b.name);
    out
}

/// The counter's comment: the container id, cut to what nft takes.
fn comment(container: &str) -> String {
    if container.len() <= COMMENT_MAX {
        return container.to_owned();
    }
    // Container ids are ASCII (weft_model::ContainerId).
    let mut cut = COMMENT_MAX - 3;
    while !container.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &container[..cut])
}

/// The chain: see the module docs.
const PREROUTING: [&str; 8] = [
    "type filter hook prerouting priority -300; policy accept;",
    "iifname != @ports accept",
    "ether type ip iifname . ether saddr . ip saddr @ip_ok accept",
    "ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 \
     iifname . ether saddr . arp saddr ip @arp_ok \
     iifname . arp saddr ether . arp saddr ip @arp_ok accept",
    "ether type ip ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 \
     iifname . ether saddr @mac_ok accept",
    "ether type ip6 drop",
    "counter name iifname map @spoof_drops drop",
    "drop",
];

/// `table bridge weft` for this host's endpoint records `local` (see the
/// module docs). A pure function of the set of records; a container added
/// or deleted changes only elements and counters, so netd applies it as a
/// few element changes ([`Table::update`]).
pub fn render(local: &[EndpointRecord]) -> Table {
    let ports = ports(local);
    let mut t = Table::new("bridge");
    let mut port_set = Set::new("ports", "ifname");
    let mut ip_ok = Set::new("ip_ok", "ifname . ether_addr . ipv4_addr");
    let mut arp_ok = Set::new("arp_ok", "ifname . ether_addr . ipv4_addr");
    let mut mac_ok = Set::new("mac_ok", "ifname . ether_addr");
    let mut drops = Set::new("spoof_drops", "ifname : counter");
    for p in &ports {
        let (n, mac, addr) = (&p.name, p.mac, p.addr);
        port_set.add(format!("\"{n}\""));
        ip_ok.add(format!("\"{n}\" . {mac} . {addr}"));
        arp_ok.add(format!("\"{n}\" . {mac} . {addr}"));
        mac_ok.add(format!("\"{n}\" . {mac}"));
        drops.map(format!("\"{n}\""), format!("\"{COUNTER_PREFIX}{n}\""));
        t.counters
            .insert(format!("{COUNTER_PREFIX}{n}"), comment(&p.container));
    }
    t.sets = vec![port_set, ip_ok, arp_ok, mac_ok, drops];
    t.chain("prerouting", PREROUTING);
    t
}

/// `weft_spoof_drops_total{container}`: the packets the anti-spoofing
/// counters of `counters` (from [`super::Nft::counters`]) dropped, summed per
/// container id (a container with two interfaces has two ports).
pub fn drops_by_container(counters: &[NamedCounter]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for c in counters {
        if c.family != "bridge" || !c.name.starts_with(COUNTER_PREFIX) {
            continue;
        }
        let container = c
            .comment
            .clone()
            .unwrap_or_else(|| c.name[COUNTER_PREFIX.len()..].to_owned());
        *out.entry(container).or_insert(0) += c.packets;
    }
    out
}

#[cfg(test)]
mod tests {

    use weft_model::{ContainerId, DnsConfig, HostId, IfName};

    use super::*;

    fn record(id: &str, ifname: &str, addr: &str) -> EndpointRecord {
        EndpointRecord {
            container_id: ContainerId::new(id).unwrap(),
            ifname: IfName::new(ifname).unwrap(),
            netns: String::new(),
            host_id: HostId::new("h0").unwrap(),
            address: addr.parse().unwrap(),
            gateway: "10.42.0.1".parse().unwrap(),
            mtu: 1400,
            bridge: IfName::new("weft0").unwrap(),
            name: None,
            service: None,
            stack: None,
            aliases: vec![],
            port_mappings: vec![],
            dns: DnsConfig::default(),
            created_at_ms: 0,
        }
    }

    /// The whole table for two containers, pinned (the root test in
    /// tests/tests/spoof.rs proves what it does in the kernel).
    #[test]
    fn golden_table() {
        let local = [
            record("abc", "eth0", "10.42.0.3/24"),
            record("abc", "net1", "10.42.0.2/24"),
        ];
        assert_eq!(host_veth_name("abc", "eth0"), "wfa4f37b237e2");
        assert_eq!(host_veth_name("abc", "net1"), "wf8cacae54a3b");
        let want = r#"table bridge weft {
	counter spoof_wf8cacae54a3b {
		comment "abc"
	}
	counter spoof_wfa4f37b237e2 {
		comment "abc"
	}
	set ports {
		type ifname
		elements = {
			"wf8cacae54a3b",
			"wfa4f37b237e2"
		}
	}
	set ip_ok {
		type ifname . ether_addr . ipv4_addr
		elements = {
			"wf8cacae54a3b" . 0a:58:0a:2a:00:02 . 10.42.0.2,
			"wfa4f37b237e2" . 0a:58:0a:2a:00:03 . 10.42.0.3
		}
	}
	set arp_ok {
		type ifname . ether_addr . ipv4_addr
		elements = {
			"wf8cacae54a3b" . 0a:58:0a:2a:00:02 . 10.42.0.2,
			"wfa4f37b237e2" . 0a:58:0a:2a:00:03 . 10.42.0.3
		}
	}
	set mac_ok {
		type ifname . ether_addr
		elements = {
			"wf8cacae54a3b" . 0a:58:0a:2a:00:02,
			"wfa4f37b237e2" . 0a:58:0a:2a:00:03
		}
	}
	map spoof_drops {
		type ifname : counter
		elements = {
			"wf8cacae54a3b" : "spoof_wf8cacae54a3b",
			"wfa4f37b237e2" : "spoof_wfa4f37b237e2"
		}
	}
	chain prerouting {
		type filter hook prerouting priority -300; policy accept;
		iifname != @ports accept
		ether type ip iifname . ether saddr . ip saddr @ip_ok accept
		ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . ether saddr . arp saddr ip @arp_ok iifname . arp saddr ether . arp saddr ip @arp_ok accept
		ether type ip ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 iifname . ether saddr @mac_ok accept
		ether type ip6 drop
		counter name iifname map @spoof_drops drop
		drop
	}
}
"#;
        assert_eq!(render(&local).render(), want);
        // The order of the records does not matter.
        let swapped = [local[1].clone(), local[0].clone()];
        assert_eq!(render(&swapped), render(&local));
    }

    /// A container added or deleted is a few element and counter changes of
    /// the table the kernel has, never a new table.
    #[test]
    fn adding_and_deleting_a_container_changes_only_its_elements() {
        let one = [record("abc", "eth0", "10.42.0.3/24")];
        let two = [one[0].clone(), record("def", "eth0", "10.42.0.4/24")];
        let n = host_veth_name("def", "eth0");
        let add = render(&two).update(&render(&one)).unwrap();
        let lines: Vec<&str> = add.lines().collect();
        assert_eq!(lines.len(), 6, "{add}");
        assert_eq!(
            lines[0],
            format!("add counter bridge weft spoof_{n} {{ comment \"def\" ; }}")
        );
        assert!(add.contains(&format!(
            "add element bridge weft ip_ok {{ \"{n}\" . 0a:58:0a:2a:00:04 . 10.42.0.4 }}"
        )));
        let del = render(&one).update(&render(&two)).unwrap();
        let lines: Vec<&str> = del.lines().collect();
        assert_eq!(lines.len(), 6, "{del}");
        assert_eq!(
            lines[0],
            format!("delete element bridge weft ports {{ \"{n}\" }}")
        );
        assert_eq!(lines[5], format!("delete counter bridge weft spoof_{n}"));
        assert_eq!(render(&[]).update(&render(&[])).unwrap(), "");
    }

    #[test]
    fn no_containers_no_elements() {
        let s = render(&[]).render();
        assert!(!s.contains("elements"), "{s}");
        assert!(!s.contains("counter spoof_"), "{s}");
        assert!(s.contains("iifname != @ports accept"), "{s}");
    }

    #[test]
    fn long_container_ids_fit_in_a_comment() {
        let id = "a".repeat(256);
        let s = render(&[record(&id, "eth0", "10.42.0.2/24")]).render();
        let want = format!("comment \"{}...\"", "a".repeat(125));
        assert!(s.contains(&want), "{s}");
        assert_eq!(comment(&"b".repeat(128)), "b".repeat(128));
    }

    #[test]
    fn drops_are_summed_per_container() {
        let c = |family: &str, name: &str, comment: Option<&str>, packets| NamedCounter {
            family: family.into(),
            name: name.into(),
            comment: comment.map(Into::into),
            packets,
            bytes: packets * 60,
        };
        let counters = [
            c("bridge", "spoof_wfa4f37b237e2", Some("abc"), 3),
            c("bridge", "spoof_wf8cacae54a3b", Some("abc"), 4),
            c("bridge", "spoof_wf0123456789a", Some("def"), 0),
            c("bridge", "spoof_wf0123456789b", None, 2),
            // Not anti-spoofing counters.
            c("inet", "spoof_x", Some("zzz"), 9),
            c("bridge", "other", Some("yyy"), 9),
        ];
        let got = drops_by_container(&counters);
        let want: BTreeMap<String, u64> = [
            ("abc".to_string(), 7),
            ("def".to_string(), 0),
            ("wf0123456789b".to_string(), 2),
        ]
        .into();
        assert_eq!(got, want);
    }

    /// `nft -j list counters` as nft 1.0.6 prints it for this table, read
    /// by the one parser in `nft/mod.rs`.
    #[test]
    fn reads_the_counters_nft_prints() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"counter": {"family": "bridge", "name": "spoof_wfa4f37b237e2", "table": "weft", "handle": 2, "comment": "abc", "packets": 5, "bytes": 300}}, {"counter": {"family": "bridge", "name": "spoof_wf8cacae54a3b", "table": "weft", "handle": 3, "comment": "abc", "packets": 1, "bytes": 42}}, {"counter": {"family": "bridge", "name": "spoof_x", "table": "other", "handle": 3, "packets": 8, "bytes": 42}}]}"#;
        let counters = super::super::parse_counters(json).unwrap();
        let got = drops_by_container(&counters);
        assert_eq!(got, [("abc".to_string(), 6)].into());
    }
}
