#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The services' table (`table ip weft_svc`, [`weft_netd::nft::services`])
//! on a real kernel, applied by the [`Balancer`] without netd or a store: a
//! lab host with a bridge and four containers wired as the CNI plugin wires
//! them (default route via the gateway, hairpin mode on the host veth,
//! bridged IPv4 through netfilter as netd sets it), three of them backends
//! of `web.shop` (a probe server on TCP and UDP), one a client. Proves:
//! connections to the VIP spread over every backend (chi-square), TCP and
//! UDP; a backend reaching its own VIP is answered, by itself too
//! (hairpin); a VIP without a healthy backend refuses at once (TCP reset,
//! ICMP) and so does an address of the range that is no VIP; affinity keeps
//! a client on one backend; an unhealthy backend leaves, its UDP flow moves
//! to another backend at once while a TCP connection to it is left alone.
//! Needs root; everything happens in lab namespaces.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use weft_model::{
    Balance, EndpointRecord, HealthRecord, Keys, Protocol, ServiceRecord, ServiceSpec,
};
use weft_netd::command::Runner;
use weft_netd::conntrack::Conntrack;
use weft_netd::nft::Nft;
use weft_netd::services::lb::{Balancer, Records};
use weft_tests::probe::{probe_all, HeldConnection, Outcome, ProbeServer, Target};
use weft_tests::{Container, Host, Lab, LabOptions};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 2);
const DEAD_VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 3);
const NO_VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 99);
const TCP: u16 = 8080;
const UDP: u16 = 5353;
const BACKENDS: [&str; 3] = ["b0", "b1", "b2"];
/// The chi-square value for 2 degrees of freedom that a fair spread exceeds
/// with probability 0.001.
const CHI2_2DF_P001: f64 = 13.82;

fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 42, 0, 2 + i as u8)
}

fn record(id: &str, addr: Ipv4Addr, service: Option<&str>) -> EndpointRecord {
    let mut v = serde_json::json!({
        "container_id": id, "ifname": "eth0", "netns": "", "host_id": "h0",
        "address": format!("{addr}/24"), "gateway": GATEWAY.to_string(), "mtu": 1400,
        "bridge": "weft0", "stack": "shop",
        "dns": {"nameservers": [], "domain": "weft", "search": []}, "created_at_ms": 0
    });
    if let Some(s) = service {
        v["service"] = s.into();
    }
    serde_json::from_value(v).unwrap()
}

/// A veth pair as the plugin makes it: host end on the bridge in hairpin
/// mode, container end with the address and a default route.
fn wire(host: &Host, c: &Container, port: &str, addr: Ipv4Addr) {
    host.ip([
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        c.name(),
    ])
    .unwrap();
    host.ip(["link", "set", port, "master", "weft0", "up"])
        .unwrap();
    host.ip(["link", "set", port, "type", "bridge_slave", "hairpin", "on"])
        .unwrap();
    c.ip(["addr", "add", &format!("{addr}/24"), "dev", "eth0"])
        .unwrap();
    c.ip(["link", "set", "eth0", "up"]).unwrap();
    c.ip(["route", "add", "default", "via", &GATEWAY.to_string()])
        .unwrap();
}

fn spec(balance: Balance, affinity: bool) -> ServiceSpec {
    ServiceSpec {
        balance,
        affinity,
        ..ServiceSpec::default()
    }
}

fn services(web: ServiceSpec) -> BTreeMap<String, ServiceRecord> {
    let keys = Keys::default();
    let mut out = BTreeMap::new();
    for (name, vip, spec) in [
        ("web.shop", VIP, web),
        ("api.shop", DEAD_VIP, ServiceSpec::default()),
    ] {
        let name: weft_model::ServiceName = name.parse().unwrap();
        out.insert(
            keys.service(&name),
            ServiceRecord {
                name,
                vip: Some(vip),
                spec,
                empty_since_ms: None,
            },
        );
    }
    out
}

/// The backend (tag) and peer address of an answer line
/// `<tag> <proto>/<port> <peer>`.
fn answer(o: &Outcome) -> (String, Ipv4Addr) {
    let Outcome::Answered(line) = o else {
        panic!("not answered: {o}");
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    (words[0].to_owned(), words.last().unwrap().parse().unwrap())
}

/// `n` new connections (or UDP flows, each from a new port) from `from`
/// to `addr`: how many each backend answered.
fn spread(from: &Container, proto: Protocol, addr: Ipv4Addr, n: usize) -> BTreeMap<String, usize> {
    let port = if proto == Protocol::Tcp { TCP } else { UDP };
    let target = Target { proto, addr, port };
    let mut counts = BTreeMap::new();
    for batch in 0..n.div_ceil(50) {
        let k = (n - batch * 50).min(50);
        let got = probe_all(Some(&from.path()), &vec![target; k], Duration::from_secs(3));
        for o in &got {
            *counts.entry(answer(o).0).or_default() += 1;
        }
    }
    counts
}

fn chi_square(counts: &BTreeMap<String, usize>, cells: usize) -> f64 {
    let n: usize = counts.values().sum();
    let e = n as f64 / cells as f64;
    let seen: f64 = counts.values().map(|&o| (o as f64 - e).powi(2) / e).sum();
    // Cells never answered count too.
    seen + (cells - counts.len()) as f64 * e
}

/// Sends one datagram from `socket` and reads the answering backend.
fn ask(socket: &UdpSocket) -> Option<String> {
    let mut buf = [0u8; 1500];
    for _ in 0..3 {
        socket.send(b"x").ok()?;
        if let Ok(n) = socket.recv(&mut buf) {
            let line = String::from_utf8_lossy(&buf[..n]).into_owned();
            return line.split_whitespace().next().map(str::to_owned);
        }
    }
    None
}

#[test]
fn vips_balance_hairpin_refuse_and_follow_health() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let host = lab.host(0);
    for (path, value) in [
        ("net/ipv4/ip_forward", "1"),
        ("net/bridge/bridge-nf-call-iptables", "1"),
    ] {
        let file = format!("/proc/sys/{path}");
        if path.starts_with("net/bridge") && host.exec(["test", "-e", &file]).is_err() {
            eprintln!("br_netfilter is not loaded: testing without it");
            continue;
        }
        host.exec(["sh", "-c", &format!("echo {value} > {file}")])
            .unwrap();
    }
    host.ip(["link", "add", "weft0", "type", "bridge"]).unwrap();
    host.ip(["addr", "add", "10.42.0.1/24", "dev", "weft0"])
        .unwrap();
    host.ip(["link", "set", "weft0", "up"]).unwrap();
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    let mut endpoints = BTreeMap::new();
    let keys = Keys::default();
    for (i, name) in BACKENDS.iter().enumerate() {
        let c = lab.container(0, name).unwrap();
        wire(host, &c, &format!("v{name}"), backend_addr(i));
        servers.push(ProbeServer::start(Some(&c.path()), name, &[TCP], &[UDP]).unwrap());
        let r = record(name, backend_addr(i), Some("web"));
        endpoints.insert(keys.endpoint("h0", name, "eth0"), r);
        backends.push(c);
    }
    let client = lab.container(0, "client").unwrap();
    let client_addr = Ipv4Addr::new(10, 42, 0, 10);
    wire(host, &client, "vclient", client_addr);
    endpoints.insert(
        keys.endpoint("h0", "client", "eth0"),
        record("client", client_addr, None),
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let nft = Arc::new(Nft::new().in_netns(host.name()));
    let balancer = Balancer::new(
        nft.clone(),
        Conntrack::new(Runner::new(Some(host.name()))),
        keys.clone(),
        "10.43.0.0/16".parse().unwrap(),
    );
    let apply = |records: Records| rt.block_on(balancer.update(records)).unwrap();
    // Nothing before the health records are listed too.
    assert_eq!(
        apply(Records {
            services: Some(services(ServiceSpec::default())),
            endpoints: Some(endpoints.clone()),
            health: None,
        }),
        None
    );
    assert_eq!(nft.list_table("ip", "weft_svc").unwrap(), "");
    assert!(apply(Records {
        health: Some(BTreeMap::new()),
        ..Records::default()
    })
    .is_some());
    let listed = nft.list_table("ip", "weft_svc").unwrap();
    assert!(listed.contains("goto pick-random"), "{listed}");
    assert_eq!(
        weft_netd::nft::services::backends_listed(&listed).len(),
        3,
        "{listed}"
    );

    // Spread: 300 new connections, then 300 UDP flows, over all three.
    for proto in [Protocol::Tcp, Protocol::Udp] {
        let counts = spread(&client, proto, VIP, 300);
        let chi2 = chi_square(&counts, 3);
        eprintln!("{proto:?} over the VIP: {counts:?}, chi-square {chi2:.2} (2 df)");
        assert_eq!(counts.len(), 3, "{proto:?}: {counts:?}");
        assert!(
            chi2 < CHI2_2DF_P001,
            "{proto:?}: {counts:?}, chi-square {chi2:.2}"
        );
    }
    // The client's address is kept (DNAT only, no masquerade).
    let got = probe_all(
        Some(&client.path()),
        &[Target {
            proto: Protocol::Tcp,
            addr: VIP,
            port: TCP,
        }],
        Duration::from_secs(3),
    );
    assert_eq!(answer(&got[0]).1, client_addr);

    // Hairpin: b0 reaches its own VIP every time; when it lands on itself
    // the answer goes to the gateway (masqueraded), elsewhere to b0.
    let target = Target {
        proto: Protocol::Tcp,
        addr: VIP,
        port: TCP,
    };
    let got = probe_all(
        Some(&backends[0].path()),
        &vec![target; 40],
        Duration::from_secs(3),
    );
    let mut itself = 0;
    for o in &got {
        let (tag, peer) = answer(o);
        if tag == "b0" {
            assert_eq!(peer, GATEWAY, "{o}");
            itself += 1;
        } else {
            assert_eq!(peer, backend_addr(0), "{o}");
        }
    }
    assert!(itself > 0, "b0 never landed on itself in 40 connections");
    // From the host itself (the output hook) too.
    let got = probe_all(Some(&host.path()), &[target], Duration::from_secs(3));
    assert!(got[0].answered(), "{}", got[0]);

    // No healthy backend (api.shop has no container): refused at once,
    // TCP and UDP; an address of the range that is no VIP too.
    let refused: Vec<Target> = [DEAD_VIP, NO_VIP]
        .into_iter()
        .flat_map(|addr| {
            [
                Target {
                    proto: Protocol::Tcp,
                    addr,
                    port: TCP,
                },
                Target {
                    proto: Protocol::Udp,
                    addr,
                    port: UDP,
                },
            ]
        })
        .collect();
    for (from, local) in [(client.path(), false), (host.path(), true)] {
        let got = probe_all(Some(&from), &refused, Duration::from_secs(2));
        for (t, o) in refused.iter().zip(&got) {
            // TCP: a reset; UDP: port unreachable (dead VIP) or
            // administratively prohibited (no VIP), both final; the host's
            // own datagram fails to send (the output hook dropped it).
            let at_once = match o {
                Outcome::Refused => true,
                Outcome::Failed(e) => {
                    local && t.proto == Protocol::Udp && e.contains("not permitted")
                }
                _ => false,
            };
            assert!(at_once, "{t} from {}: {o}", from.display());
        }
    }

    // Affinity: every connection of the client lands on one backend; the
    // table written again (the resync) keeps it there.
    apply(Records {
        services: Some(services(spec(Balance::Random, true))),
        ..Records::default()
    });
    let counts = spread(&client, Protocol::Tcp, VIP, 60);
    assert_eq!(counts.len(), 1, "affinity: {counts:?}");
    nft.invalidate();
    rt.block_on(balancer.reapply()).unwrap();
    assert_eq!(
        spread(&client, Protocol::Tcp, VIP, 20)
            .keys()
            .collect::<Vec<_>>(),
        counts.keys().collect::<Vec<_>>()
    );
    // Hash of the flow: new source ports spread again.
    apply(Records {
        services: Some(services(spec(Balance::Hash, false))),
        ..Records::default()
    });
    let counts = spread(&client, Protocol::Tcp, VIP, 90);
    assert_eq!(counts.len(), 3, "hash: {counts:?}");
    apply(Records {
        services: Some(services(ServiceSpec::default())),
        ..Records::default()
    });

    // A backend turns unhealthy: a UDP flow it answered moves at once (it
    // still listens, so only the deleted conntrack entry moves it); a TCP
    // connection to it is left alone.
    let socket = weft_tests::in_netns(client.path(), || {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.connect(SocketAddr::from((VIP, UDP))).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s
    });
    let first = ask(&socket).expect("the UDP flow is answered");
    for _ in 0..5 {
        assert_eq!(
            ask(&socket).as_deref(),
            Some(first.as_str()),
            "conntrack keeps a flow on its backend"
        );
    }
    let mut held = (0..20)
        .map(|_| {
            HeldConnection::open(Some(&client.path()), VIP, TCP, Duration::from_secs(3)).unwrap()
        })
        .find(|h| h.greeting.starts_with(&format!("{first} ")))
        .expect("a TCP connection to the UDP flow's backend");
    let i = BACKENDS.iter().position(|b| *b == first).unwrap();
    let unhealthy = HealthRecord {
        healthy: false,
        since_ms: 1,
        detail: "test".into(),
    };
    apply(Records {
        health: Some(BTreeMap::from([(
            keys.health_of("h0", BACKENDS[i], "eth0"),
            unhealthy,
        )])),
        ..Records::default()
    });
    let backends_now = rt.block_on(balancer.backends()).unwrap();
    assert!(
        !backends_now[&VIP].contains(&backend_addr(i)),
        "{backends_now:?}"
    );
    let mut moved = None;
    weft_tests::wait_until(Duration::from_secs(2), "the UDP flow moves", || {
        moved = ask(&socket).filter(|b| *b != first);
        moved.is_some()
    })
    .unwrap();
    eprintln!("UDP flow moved from {first} to {moved:?}");
    held.echo("still here", Duration::from_secs(2))
        .expect("the TCP connection to the unhealthy backend is left alone");
    // New connections avoid it.
    let counts = spread(&client, Protocol::Tcp, VIP, 60);
    assert!(!counts.contains_key(&first), "{counts:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");

    drop(servers);
    nft.teardown().unwrap();
    assert_eq!(nft.list_table("ip", "weft_svc").unwrap(), "");
}
