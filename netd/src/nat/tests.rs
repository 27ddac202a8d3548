use super::*;

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn port(
    container: [u8; 4],
    host: u16,
    ctr: u16,
    proto: Protocol,
    ip: Option<[u8; 4]>,
) -> PublishedPort {
    PublishedPort {
        container: Ipv4Addr::from(container),
        mapping: PortMapping {
            host_port: host,
            container_port: ctr,
            protocol: proto,
            host_ip: ip.map(Ipv4Addr::from),
        },
    }
}

fn spec(ports: Vec<PublishedPort>) -> NatSpec {
    NatSpec {
        cluster_range: net("10.42.0.0/16"),
        block: net("10.42.3.0/24"),
        bridge: "weft0".into(),
        dns_addr: Ipv4Addr::new(169, 254, 169, 250),
        service_range: weft_model::DEFAULT_SERVICE_RANGE,
        ports,
    }
}

fn example() -> NatSpec {
    spec(vec![
        port([10, 42, 3, 3], 5353, 53, Protocol::Udp, None),
        port(
            [10, 42, 3, 2],
            8443,
            443,
            Protocol::Tcp,
            Some([192, 168, 77, 10]),
        ),
        port([10, 42, 3, 2], 8080, 80, Protocol::Tcp, None),
    ])
}

const EXAMPLE: &str = "\
*filter
:WEFT-INPUT - [0:0]
:WEFT-FORWARD - [0:0]
-A WEFT-INPUT ! -s 127.0.0.0/8 -d 127.0.0.0/8 -i weft0 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A WEFT-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A WEFT-FORWARD -i weft0 -j ACCEPT
-A WEFT-FORWARD -o weft0 -j ACCEPT
COMMIT
*mangle
:WEFT-MSS - [0:0]
-A WEFT-MSS -s 10.42.0.0/16 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu
-A WEFT-MSS -d 10.42.0.0/16 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu
COMMIT
*nat
:WEFT-PREROUTING - [0:0]
:WEFT-OUTPUT - [0:0]
:WEFT-DNAT - [0:0]
:WEFT-POSTROUTING - [0:0]
-A WEFT-PREROUTING -d 169.254.169.250/32 -j RETURN
-A WEFT-PREROUTING -m addrtype --dst-type LOCAL -j WEFT-DNAT
-A WEFT-OUTPUT -d 169.254.169.250/32 -j RETURN
-A WEFT-OUTPUT -m addrtype --dst-type LOCAL -j WEFT-DNAT
-A WEFT-DNAT -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.42.3.2:80
-A WEFT-DNAT -d 192.168.77.10/32 -p tcp -m tcp --dport 8443 -j DNAT --to-destination 10.42.3.2:443
-A WEFT-DNAT -p udp -m udp --dport 5353 -j DNAT --to-destination 10.42.3.3:53
-A WEFT-POSTROUTING -s 10.42.3.0/24 -d 10.42.3.0/24 -m conntrack --ctstate DNAT ! --ctorigdst 10.43.0.0/16 -j MASQUERADE
-A WEFT-POSTROUTING -s 127.0.0.0/8 -o weft0 -j MASQUERADE
-A WEFT-POSTROUTING -d 169.254.169.250/32 -j RETURN
-A WEFT-POSTROUTING -s 10.42.0.0/16 -d 10.42.0.0/16 -j RETURN
-A WEFT-POSTROUTING -s 10.42.0.0/16 -j MASQUERADE
COMMIT
";

#[test]
fn renders_the_example_exactly() {
    assert_eq!(render(&example()).unwrap(), EXAMPLE);
}

#[test]
fn every_chain_declared_once_and_every_rule_in_a_weft_chain() {
    let out = render(&example()).unwrap();
    for (_, chain) in CHAINS {
        let decl = format!(":{chain} - [0:0]");
        assert_eq!(out.lines().filter(|l| *l == decl).count(), 1, "{chain}");
    }
    for line in out.lines().filter(|l| l.starts_with("-A ")) {
        let chain = line.split_whitespace().nth(1).unwrap();
        assert!(chain.starts_with(CHAIN_PREFIX), "{line}");
    }
    // Nothing that flushes or touches a built-in chain.
    for line in out.lines() {
        let ok = line.starts_with("-A WEFT-")
            || line.starts_with(":WEFT-")
            || line.starts_with('*')
            || line == "COMMIT";
        assert!(ok, "{line}");
    }
    assert_eq!(out.matches("COMMIT").count(), 3);
}

#[test]
fn masquerade_only_for_traffic_leaving_the_cluster() {
    let out = render(&spec(vec![])).unwrap();
    let post: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("-A WEFT-POSTROUTING"))
        .collect();
    // Cluster-internal and DNS traffic return before the catch-all MASQUERADE.
    let internal = post
        .iter()
        .position(|l| *l == "-A WEFT-POSTROUTING -s 10.42.0.0/16 -d 10.42.0.0/16 -j RETURN")
        .unwrap();
    let dns = post
        .iter()
        .position(|l| *l == "-A WEFT-POSTROUTING -d 169.254.169.250/32 -j RETURN")
        .unwrap();
    let masq = post
        .iter()
        .position(|l| *l == "-A WEFT-POSTROUTING -s 10.42.0.0/16 -j MASQUERADE")
        .unwrap();
    assert!(internal < masq && dns < masq);
    assert_eq!(masq, post.len() - 1);
    // The only other MASQUERADEs are the hairpin and localhost ones, both
    // narrow.
    let others: Vec<&&str> = post
        .iter()
        .filter(|l| l.ends_with("MASQUERADE") && !l.contains("-s 10.42.0.0/16 -j"))
        .collect();
    assert_eq!(
        others,
        [
            &"-A WEFT-POSTROUTING -s 10.42.3.0/24 -d 10.42.3.0/24 -m conntrack --ctstate DNAT ! --ctorigdst 10.43.0.0/16 -j MASQUERADE",
            &"-A WEFT-POSTROUTING -s 127.0.0.0/8 -o weft0 -j MASQUERADE",
        ]
    );
}

#[test]
fn dns_address_is_never_dnatted() {
    // Even a container publishing port 53 must not capture the DNS address.
    let s = spec(vec![port([10, 42, 3, 9], 53, 53, Protocol::Udp, None)]);
    let out = render(&s).unwrap();
    for chain in [PREROUTING_CHAIN, OUTPUT_CHAIN] {
        let rules: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with(&format!("-A {chain} ")))
            .collect();
        assert_eq!(
            rules,
            [
                format!("-A {chain} -d 169.254.169.250/32 -j RETURN"),
                format!("-A {chain} -m addrtype --dst-type LOCAL -j WEFT-DNAT"),
            ]
        );
    }
}

#[test]
fn tcp_and_udp_rules_differ() {
    let s = spec(vec![
        port([10, 42, 3, 2], 9000, 9000, Protocol::Tcp, None),
        port([10, 42, 3, 2], 9000, 9000, Protocol::Udp, None),
    ]);
    let out = render(&s).unwrap();
    assert!(out.contains(
        "-A WEFT-DNAT -p tcp -m tcp --dport 9000 -j DNAT --to-destination 10.42.3.2:9000\n"
    ));
    assert!(out.contains(
        "-A WEFT-DNAT -p udp -m udp --dport 9000 -j DNAT --to-destination 10.42.3.2:9000\n"
    ));
}

#[test]
fn host_ip_restricts_and_unspecified_host_ip_does_not() {
    let s = spec(vec![
        port([10, 42, 3, 2], 80, 80, Protocol::Tcp, Some([127, 0, 0, 1])),
        port([10, 42, 3, 3], 81, 80, Protocol::Tcp, Some([0, 0, 0, 0])),
    ]);
    let out = render(&s).unwrap();
    assert!(out.contains(
        "-A WEFT-DNAT -d 127.0.0.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.42.3.2:80\n"
    ));
    assert!(out
        .contains("-A WEFT-DNAT -p tcp -m tcp --dport 81 -j DNAT --to-destination 10.42.3.3:80\n"));
}

#[test]
fn output_is_deterministic_whatever_the_port_order() {
    let mut s = example();
    let a = render(&s).unwrap();
    s.ports.reverse();
    assert_eq!(render(&s).unwrap(), a);
    s.ports.rotate_left(1);
    assert_eq!(render(&s).unwrap(), a);
    // Exact duplicates render once.
    let dup = s.ports[0].clone();
    s.ports.push(dup);
    assert_eq!(render(&s).unwrap(), a);
}

#[test]
fn networks_are_printed_canonically() {
    let mut s = example();
    s.cluster_range = net("10.42.7.7/16");
    s.block = net("10.42.3.99/24");
    assert_eq!(render(&s).unwrap(), EXAMPLE);
}

#[test]
fn other_ranges_and_bridges_flow_through() {
    let s = NatSpec {
        cluster_range: net("172.30.0.0/20"),
        block: net("172.30.4.0/26"),
        bridge: "br-x_1.2".into(),
        dns_addr: Ipv4Addr::new(169, 254, 1, 1),
        service_range: weft_model::DEFAULT_SERVICE_RANGE,
        ports: vec![port([172, 30, 4, 5], 1, 65535, Protocol::Udp, None)],
    };
    let out = render(&s).unwrap();
    assert!(out.contains("-A WEFT-FORWARD -i br-x_1.2 -j ACCEPT\n"));
    assert!(out.contains("-A WEFT-POSTROUTING -s 127.0.0.0/8 -o br-x_1.2 -j MASQUERADE\n"));
    assert!(out.contains("-A WEFT-POSTROUTING -s 172.30.0.0/20 -j MASQUERADE\n"));
    assert!(out.contains(
        "-A WEFT-POSTROUTING -s 172.30.4.0/26 -d 172.30.4.0/26 -m conntrack --ctstate DNAT ! --ctorigdst 10.43.0.0/16 -j MASQUERADE\n"
    ));
    assert!(out.contains("-A WEFT-PREROUTING -d 169.254.1.1/32 -j RETURN\n"));
    assert!(out.contains("--dport 1 -j DNAT --to-destination 172.30.4.5:65535\n"));
    assert!(!out.contains("10.42."));
}

#[test]
fn zero_ports_are_rejected_with_a_typed_error() {
    let s = spec(vec![port([10, 42, 3, 2], 0, 80, Protocol::Tcp, None)]);
    match render(&s) {
        Err(NatError::InvalidPort { port, reason }) => {
            assert_eq!(port, "*:0/tcp -> 10.42.3.2:80");
            assert!(reason.contains("host port is 0"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let s = spec(vec![port([10, 42, 3, 2], 80, 0, Protocol::Udp, None)]);
    let e = render(&s).unwrap_err();
    assert!(matches!(e, NatError::InvalidPort { .. }), "{e}");
    assert!(e.to_string().contains("container port is 0"), "{e}");
}

#[test]
fn container_outside_the_block_is_rejected() {
    let s = spec(vec![port([10, 42, 4, 2], 80, 80, Protocol::Tcp, None)]);
    let e = render(&s).unwrap_err();
    assert!(matches!(e, NatError::InvalidPort { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("not in this host's block 10.42.3.0/24"),
        "{e}"
    );
}

#[test]
fn conflicting_ports_are_rejected() {
    // Same host port and protocol on every address, different containers.
    let s = spec(vec![
        port([10, 42, 3, 2], 80, 80, Protocol::Tcp, None),
        port([10, 42, 3, 3], 80, 80, Protocol::Tcp, None),
    ]);
    let e = render(&s).unwrap_err();
    assert!(matches!(e, NatError::PortConflict { .. }), "{e}");
    // A wildcard overlaps a specific address.
    let s = spec(vec![
        port([10, 42, 3, 2], 80, 80, Protocol::Tcp, None),
        port(
            [10, 42, 3, 3],
            80,
            80,
            Protocol::Tcp,
            Some([192, 168, 77, 10]),
        ),
    ]);
    assert!(matches!(render(&s), Err(NatError::PortConflict { .. })));
    // Different host addresses, or different protocols, do not conflict.
    let s = spec(vec![
        port(
            [10, 42, 3, 2],
            80,
            80,
            Protocol::Tcp,
            Some([192, 168, 77, 10]),
        ),
        port([10, 42, 3, 3], 80, 80, Protocol::Tcp, Some([127, 0, 0, 1])),
        port([10, 42, 3, 4], 80, 80, Protocol::Udp, None),
    ]);
    render(&s).unwrap();
}

#[test]
fn invalid_specs_are_rejected() {
    let mut s = example();
    s.block = net("10.43.0.0/24");
    assert!(matches!(render(&s), Err(NatError::InvalidSpec(_))));
    let mut s = example();
    s.block = net("10.0.0.0/8");
    assert!(matches!(render(&s), Err(NatError::InvalidSpec(_))));
    for bad in [
        "",
        "weft0 -j ACCEPT",
        "a-very-long-bridge-name",
        "we\nft",
        "..",
    ] {
        let mut s = example();
        s.bridge = bad.into();
        assert!(
            matches!(render(&s), Err(NatError::InvalidSpec(_))),
            "{bad:?}"
        );
    }
    let mut s = example();
    s.dns_addr = Ipv4Addr::new(10, 42, 0, 53);
    assert!(matches!(render(&s), Err(NatError::InvalidSpec(_))));
}

#[test]
fn hooks_jump_into_weft_chains_from_builtin_chains() {
    let hooks = hooks();
    assert_eq!(hooks.len(), 6);
    for h in hooks {
        let target = h.rule.last().unwrap();
        assert!(CHAINS.contains(&(h.table, *target)), "{h:?}");
        assert!(!h.chain.starts_with(CHAIN_PREFIX));
    }
    // Every weft chain except WEFT-DNAT (reached from weft chains) is hooked.
    for (table, chain) in CHAINS {
        let hooked = hooks
            .iter()
            .any(|h| h.table == *table && h.rule.contains(chain));
        assert_eq!(hooked, *chain != DNAT_CHAIN, "{table} {chain}");
    }
    assert_eq!(hooks[3].save_line(), "-A PREROUTING -j WEFT-PREROUTING");
}

#[test]
fn sysctls_as_data() {
    assert_eq!(
        required_sysctls(&example()),
        vec![
            ("net/ipv4/ip_forward".to_owned(), "1".to_owned()),
            (
                "net/ipv4/conf/weft0/route_localnet".to_owned(),
                "1".to_owned()
            ),
        ]
    );
}

#[test]
fn published_port_display_and_host_ip() {
    let p = port(
        [10, 42, 3, 2],
        8443,
        443,
        Protocol::Tcp,
        Some([192, 168, 77, 10]),
    );
    assert_eq!(p.to_string(), "192.168.77.10:8443/tcp -> 10.42.3.2:443");
    assert_eq!(p.host_ip(), Some(Ipv4Addr::new(192, 168, 77, 10)));
    let p = port([10, 42, 3, 2], 1, 2, Protocol::Udp, Some([0, 0, 0, 0]));
    assert_eq!(p.host_ip(), None);
}
