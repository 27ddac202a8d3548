//! Deleting conntrack entries over netlink ([`weft_netd::conntrack`]) in a
//! lab host's namespace holding 20,000 entries: a policy cut, a flush by
//! address and the balancer's UDP drop take exactly the entries they pick
//! and leave every other one. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::Instant;

use weft_model::Protocol;
use weft_netd::command::Runner;
use weft_netd::conntrack::Conntrack;
use weft_netd::services::lb::drop_udp_flows;
use weft_tests::{Lab, LabOptions, Netns};

/// Entries loaded: sources 10.1.x.y, each with one TCP flow to 10.2.0.1:80
/// or :443 and one UDP flow to 10.2.0.2:53; plus ICMP echoes.
const SOURCES: u32 = 9_000;

fn source(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn load(ns: &Netns) {
    let mut lines = String::new();
    for i in 0..SOURCES {
        let s = source(i);
        let port = if i % 2 == 0 { 80 } else { 443 };
        lines.push_str(&format!(
            "-I -s {s} -d 10.2.0.1 -p tcp --sport {} --dport {port} --state ESTABLISHED -t 600 -u SEEN_REPLY\n",
            20_000 + i % 40_000
        ));
        lines.push_str(&format!(
            "-I -s {s} -d 10.2.0.2 -p udp --sport {} --dport 53 -t 600\n",
            20_000 + i % 40_000
        ));
    }
    for i in 0..2_000u32 {
        lines.push_str(&format!(
            "-I -s {} -d 10.2.0.3 -p icmp --icmp-type 8 --icmp-code 0 --icmp-id {i} -t 30\n",
            source(i)
        ));
    }
    let file = std::env::temp_dir().join(format!("weft-ct-load-{}.txt", ns.name()));
    std::fs::write(&file, lines).unwrap();
    ns.exec(["conntrack", "-R", &file.display().to_string()])
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert_eq!(count(ns), 2 * SOURCES as usize + 2_000);
}

fn count(ns: &Netns) -> usize {
    // `conntrack -C` prints the number of entries.
    ns.exec(["conntrack", "-C"])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn listing(ns: &Netns) -> String {
    ns.exec(["conntrack", "-L", "-f", "ipv4"])
        .unwrap_or_default()
}

#[test]
fn netlink_deletes_take_exactly_the_picked_entries() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let ns = lab.host(0).netns();
    load(ns);
    let ct = Conntrack::new(Runner::new(Some(ns.name())));

    // A policy cut: 300 sources lose 10.2.0.1 on TCP 80 but keep 443, so
    // only the even ones' entries go (150), none of their UDP.
    let pairs: Vec<(Ipv4Addr, Ipv4Addr)> = (0..300)
        .map(|i| (source(i), Ipv4Addr::new(10, 2, 0, 1)))
        .collect();
    let started = Instant::now();
    let cut = ct
        .cut(&pairs, |_, l4| l4 == Some((Protocol::Tcp, 443)))
        .unwrap();
    eprintln!(
        "cut: {cut} entries of 300 pairs from a table of {} in {:.0?}",
        2 * SOURCES + 2_000,
        started.elapsed()
    );
    assert_eq!(cut, 150);
    let all = 2 * SOURCES as usize + 2_000;
    assert_eq!(count(ns), all - 150);
    let left = listing(ns);
    assert!(!left.contains(&format!(
        "src={} dst=10.2.0.1 sport=20000 dport=80 ",
        source(0)
    )));
    assert!(left.contains(&format!(
        "src={} dst=10.2.0.1 sport=20001 dport=443 ",
        source(1)
    )));
    // Again: nothing left to cut, and nothing else goes.
    assert_eq!(
        ct.cut(&pairs, |_, l4| l4 == Some((Protocol::Tcp, 443)))
            .unwrap(),
        0
    );

    // A flush by address: every entry of 10 sources, TCP, UDP and ICMP
    // (the first 10 sources' even TCP entries went above already).
    let addrs: Vec<Ipv4Addr> = (0..10).map(source).collect();
    let flushed = ct.flush_all(&addrs).unwrap();
    assert_eq!(flushed, 5 + 10 + 10);
    assert_eq!(count(ns), all - 150 - 25);

    // The balancer's drop: UDP flows to 10.2.0.2 answered by 10.2.0.2.
    let dropped = drop_udp_flows(
        &ct,
        &[(Ipv4Addr::new(10, 2, 0, 2), Ipv4Addr::new(10, 2, 0, 2))],
    )
    .unwrap();
    assert_eq!(dropped, SOURCES as usize - 10);
    assert_eq!(count(ns), all - 150 - 25 - (SOURCES as usize - 10));
    lab.destroy().unwrap();
}
