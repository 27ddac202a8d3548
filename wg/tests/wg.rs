#![allow(clippy::unwrap_used, clippy::expect_used)]
//! weft's WireGuard data path between lab hosts (needs root). Each host gets
//! (`common::pair`) a block 10.42.H.0/24 with 10.42.H.1 on a bridge `weft0`,
//! a `WgDevice` on TUN `weft-wg` (created inside the host's namespace by a
//! thread that joined it) and a route for the other host's block via the
//! TUN. Proves: handshake and pings both ways, a TCP transfer (throughput
//! printed next to the raw underlay), nothing in clear on the underlay,
//! crypto-key routing, the TUN MTU with DF, and restart/reattach of the
//! persistent TUN plus `destroy`.

mod common;

use std::time::{Duration, Instant};

use common::{
    config, iperf3, pair, ping, serial, text, wg_cpu_seconds, MTU, PORT, TUN, UNDERLAY_MTU,
};
use weft_tests::{in_netns, signal, wait_until, Host, Lab, LabOptions};
use weft_wg::{self as wg, KeyPair, WgDevice};

/// Runs an iperf3 transfer of `bytes` from `client` to `server_addr` (bound to
/// `client_addr`); returns (bytes received, bits per second).
fn iperf(
    server: &Host,
    client: &Host,
    server_addr: &str,
    client_addr: &str,
    port: u16,
    bytes: &str,
) -> (f64, f64) {
    let v = iperf3(
        server,
        client,
        server_addr,
        client_addr,
        port,
        &["-n", bytes],
    );
    let recv = &v["end"]["sum_received"];
    match (recv["bytes"].as_f64(), recv["bits_per_second"].as_f64()) {
        (Some(b), Some(bps)) => (b, bps),
        _ => panic!("unexpected iperf3 output: {v}"),
    }
}

#[test]
fn handshake_ping_both_ways_and_tcp_throughput() {
    weft_tests::require_root!();
    let _s = serial();
    let lab = Lab::new(LabOptions::hosts(2).mtu(UNDERLAY_MTU)).unwrap();
    let (a, b) = pair(&lab, None);

    let o = ping(&a, &b, &[]);
    assert!(o.status.success(), "a -> b: {}", text(&o));
    let o = ping(&b, &a, &[]);
    assert!(o.status.success(), "b -> a: {}", text(&o));
    for (x, y) in [(&a, &b), (&b, &a)] {
        let s = x.stats_for(y);
        assert!(s.last_handshake.is_some(), "{s:?}");
        assert!(s.rx_packets >= 3 && s.tx_packets >= 3, "{s:?}");
        assert_eq!(s.drops_bad_source, 0);
    }

    let cpu0 = wg_cpu_seconds();
    let t0 = Instant::now();
    let (bytes, wg_bps) = iperf(&b.host, &a.host, &b.gw(), &a.gw(), 5201, "200M");
    let secs = t0.elapsed().as_secs_f64();
    let cpu = wg_cpu_seconds() - cpu0;
    assert!(bytes >= 50e6, "only {bytes} bytes arrived");
    let (_, raw_bps) = iperf(
        &b.host,
        &a.host,
        &b.host.addr().to_string(),
        &a.host.addr().to_string(),
        5202,
        "200M",
    );
    let gb = bytes / 1e9;
    println!(
        "THROUGHPUT (one TCP stream, iperf3 -n 200M, debug={}): weft wg {:.2} Gbit/s, raw underlay {:.2} Gbit/s; \
         wg threads (both ends) used {:.2} CPU-s in {:.2} s = {:.2} CPU-s per GB",
        cfg!(debug_assertions),
        wg_bps / 1e9,
        raw_bps / 1e9,
        cpu,
        secs,
        cpu / gb
    );
    println!("a device stats: {:?}", a.dev().device_stats());
    println!("b device stats: {:?}", b.dev().device_stats());
    println!("a's view of b: {:?}", a.stats_for(&b));
}

#[test]
fn nothing_in_clear_on_the_underlay() {
    weft_tests::require_root!();
    let _s = serial();
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let (a, b) = pair(&lab, None);
    // "weft-marker-pls!" in hex: ping repeats it through the payload.
    let marker = b"weft-marker-pls!";
    let hex: String = marker.iter().map(|c| format!("{c:02x}")).collect();
    let under = lab.dir().join("underlay.pcap");
    let clear = lab.dir().join("tun.pcap");
    let port = lab.host(0).underlay_port().to_string();
    let cap_under = lab
        .underlay()
        .spawn([
            "tcpdump",
            "-n",
            "-U",
            "--immediate-mode",
            "-i",
            &port,
            "-w",
            under.to_str().unwrap(),
        ])
        .unwrap();
    let cap_tun = a
        .host
        .spawn([
            "tcpdump",
            "-n",
            "-U",
            "--immediate-mode",
            "-i",
            TUN,
            "-w",
            clear.to_str().unwrap(),
        ])
        .unwrap();
    for c in [&cap_under, &cap_tun] {
        wait_until(Duration::from_secs(10), "tcpdump listening", || {
            c.stderr().contains("listening on")
        })
        .unwrap();
    }
    let o = ping(&a, &b, &["-p", &hex, "-s", "200"]);
    assert!(o.status.success(), "{}", text(&o));
    // Some TCP too: the marker in a TCP payload (the route's src makes
    // 10.42.0.1 the source).
    let listener = in_netns(b.host.netns().path(), || {
        std::net::TcpListener::bind((b.gw().as_str(), 7000)).unwrap()
    });
    let mut conn = in_netns(a.host.netns().path(), || {
        std::net::TcpStream::connect((b.gw().as_str(), 7000)).unwrap()
    });
    let (mut served, _) = listener.accept().unwrap();
    std::io::Write::write_all(&mut conn, &marker.repeat(3)).unwrap();
    drop(conn);
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut served, &mut got).unwrap();
    assert_eq!(got, marker.repeat(3));
    std::thread::sleep(Duration::from_millis(300));
    let u = cap_under
        .stop_with(signal::SIGINT, Duration::from_secs(5))
        .unwrap();
    let t = cap_tun
        .stop_with(signal::SIGINT, Duration::from_secs(5))
        .unwrap();
    println!("tcpdump underlay: {}tcpdump tun: {}", u.stderr, t.stderr);

    let contains = |hay: &[u8]| hay.windows(marker.len()).any(|w| w == marker);
    let clear_bytes = std::fs::read(&clear).unwrap();
    assert!(
        contains(&clear_bytes),
        "control: the marker must be visible on the TUN (else this test proves nothing):\n{}",
        text(
            &a.host
                .output(["tcpdump", "-n", "-X", "-r", clear.to_str().unwrap()])
                .unwrap()
        )
    );
    let under_bytes = std::fs::read(&under).unwrap();
    assert!(
        !contains(&under_bytes),
        "the marker crossed the underlay in clear"
    );

    let listing = lab
        .underlay()
        .exec(["tcpdump", "-n", "-r", under.to_str().unwrap()])
        .unwrap();
    let mut udp = 0;
    let ours = [a.host.addr().to_string(), b.host.addr().to_string()];
    for line in listing.lines() {
        assert!(
            !line.contains("10.42."),
            "overlay address in clear on the underlay: {line}"
        );
        // Only the hosts' own traffic counts (the switch itself sends IGMP).
        let involves = |o: &String| {
            line.split_whitespace()
                .map(|t| t.trim_end_matches([':', ',']))
                .any(|t| t == o || t.starts_with(&format!("{o}.")))
        };
        if !line.contains(" IP ") || !ours.iter().any(involves) {
            continue;
        }
        assert!(
            line.contains(&format!(".{PORT}: UDP")),
            "non-WireGuard packet on the underlay: {line}"
        );
        udp += 1;
    }
    assert!(udp >= 6, "too few WireGuard datagrams captured:\n{listing}");
    println!("underlay capture: {udp} WireGuard datagrams, marker absent");
}

#[test]
fn crypto_key_routing_drops_foreign_sources() {
    weft_tests::require_root!();
    let _s = serial();
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let (a, b) = pair(&lab, None);
    let o = ping(&b, &a, &[]);
    assert!(o.status.success(), "{}", text(&o));
    // B owns 10.42.1.0/24 only; 10.42.99.1 is routed into the tunnel anyway.
    b.host
        .ip(["addr", "add", "10.42.99.1/32", "dev", "weft0"])
        .unwrap();
    let before = a.stats_for(&b);
    let o = b
        .host
        .output([
            "ping",
            "-n",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            "10.42.99.1",
            &a.gw(),
        ])
        .unwrap();
    assert!(
        !o.status.success(),
        "spoofed ping got through: {}",
        text(&o)
    );
    let after = a.stats_for(&b);
    assert!(
        after.drops_bad_source >= before.drops_bad_source + 3,
        "{before:?}\n{after:?}"
    );
    assert_eq!(
        after.rx_packets, before.rx_packets,
        "nothing written to the TUN"
    );
    // B's own block still works.
    let o = ping(&b, &a, &[]);
    assert!(o.status.success(), "{}", text(&o));
    println!("drops_bad_source = {}", after.drops_bad_source);
}

#[test]
fn df_packets_respect_the_tun_mtu() {
    weft_tests::require_root!();
    let _s = serial();
    let lab = Lab::new(LabOptions::hosts(2).mtu(UNDERLAY_MTU)).unwrap();
    let (a, b) = pair(&lab, None);
    assert_eq!(a.host.link_mtu(TUN).unwrap(), MTU);
    let fits = (MTU - 28).to_string();
    let over = (MTU - 27).to_string();

    // From the host itself: the kernel refuses locally.
    let o = ping(&a, &b, &["-M", "do", "-s", &fits]);
    assert!(o.status.success(), "{}", text(&o));
    let o = ping(&a, &b, &["-M", "do", "-s", &over]);
    assert!(!o.status.success());
    assert!(text(&o).contains("message too long"), "{}", text(&o));

    // From a container behind the host (veth MTU 1500): the host answers with
    // ICMP fragmentation needed, mtu = TUN MTU.
    let c = lab.container(0, "c0").unwrap();
    a.host
        .ip([
            "link",
            "add",
            "c0h",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            c.name(),
        ])
        .unwrap();
    a.host
        .ip(["link", "set", "c0h", "master", "weft0", "up"])
        .unwrap();
    c.ip(["addr", "add", "10.42.0.2/24", "dev", "eth0"])
        .unwrap();
    c.ip(["link", "set", "eth0", "up"]).unwrap();
    c.ip(["route", "add", "default", "via", "10.42.0.1"])
        .unwrap();
    let ping_c = |size: &str| {
        c.output([
            "ping",
            "-n",
            "-c",
            "2",
            "-i",
            "0.3",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            size,
            &b.gw(),
        ])
        .unwrap()
    };
    let o = ping_c(&fits);
    assert!(o.status.success(), "container, fits: {}", text(&o));
    let o = ping_c(&over);
    assert!(!o.status.success(), "container, too big: {}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(&format!("Frag needed and DF set (mtu = {MTU})"))
            || t.contains(&format!("message too long, mtu={MTU}")),
        "{t}"
    );
    println!(
        "container DF ping of {over} bytes: {}",
        t.lines().nth(1).unwrap_or("")
    );
    // Nothing oversize reached the peer.
    assert_eq!(b.stats_for(&a).drops_oversize, 0);
}

#[test]
fn restart_reattaches_the_persistent_tun_and_destroy_removes_it() {
    weft_tests::require_root!();
    let _s = serial();
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let (a, mut b) = pair(&lab, None);
    let o = ping(&a, &b, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let ifindex = b.dev().ifindex();

    // A pings B's block every 20 ms for 6 s while B's device restarts.
    let interval_ms = 20.0;
    let pinger = a
        .host
        .spawn([
            "ping",
            "-n",
            "-i",
            "0.02",
            "-w",
            "6",
            "-W",
            "1",
            "-I",
            &a.gw(),
            &b.gw(),
        ])
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    b.dev.take().unwrap().stop();
    // The TUN, its address and route outlive the device.
    let link = b.host.ip(["-o", "link", "show", TUN]).unwrap();
    assert!(link.contains(TUN), "{link}");
    let routes = b.host.ip(["route", "show", "dev", TUN]).unwrap();
    assert!(routes.contains(&a.block()), "{routes}");
    std::thread::sleep(Duration::from_millis(500));
    let restarted = Instant::now();
    b.start();
    b.dev().set_peers(vec![a.peer()]);
    assert_eq!(b.dev().ifindex(), ifindex, "reattached to the same device");
    let out = pinger.wait().unwrap();
    let summary = out
        .stdout
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("")
        .to_string();
    let num = |word: &str| -> u64 {
        let i = summary
            .find(word)
            .unwrap_or_else(|| panic!("{}", out.stdout));
        summary[..i]
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (sent, got) = (num(" packets transmitted"), num(" received"));
    let last_seq: u64 = out
        .stdout
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0);
    let lost = sent - got;
    println!(
        "restart: {sent} pings sent, {got} answered, {lost} lost = ~{:.0} ms gap \
         (device down ~500 ms; {:?} since restart when ping ended)",
        lost as f64 * interval_ms,
        restarted.elapsed()
    );
    assert!(got > 0 && lost > 0, "{}", out.stdout);
    assert!(
        last_seq + 10 >= sent,
        "traffic did not resume after the restart:\n{}",
        out.stdout
    );
    assert!(
        (lost as f64) * interval_ms < 3000.0,
        "gap too long:\n{}",
        out.stdout
    );

    // destroy: refused while a device is attached, then removes the TUN.
    let busy = in_netns(b.host.netns().path(), || wg::destroy(TUN));
    let err = busy.expect_err("destroy while attached");
    assert!(err.to_string().contains("stop the other netd"), "{err}");
    b.dev.take().unwrap().stop();
    in_netns(b.host.netns().path(), || wg::destroy(TUN)).unwrap();
    assert!(!b.host.links().unwrap().iter().any(|l| l == TUN));
    // Idempotent.
    in_netns(b.host.netns().path(), || wg::destroy(TUN)).unwrap();
    drop(a);
}

/// A TUN left by an earlier version (single-queue, persistent, with a route
/// on it) is re-created with one queue per worker; the device then carries
/// traffic with several workers, and each flow on one queue. A second
/// device on the same TUN is refused while the first runs.
#[test]
fn a_single_queue_tun_is_recreated_with_queues() {
    weft_tests::require_root!();
    let _serial = serial();
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let h = lab.host(0).clone();
    h.ip(["tuntap", "add", "dev", TUN, "mode", "tun", "vnet_hdr"])
        .unwrap();
    let cfg = |queues| config(KeyPair::generate().unwrap().private_key(), None, queues);
    let dev = in_netns(h.netns().path(), || WgDevice::start(cfg(3))).unwrap();
    let details = h.exec(["ip", "-d", "link", "show", TUN]).unwrap();
    assert!(details.contains("multi_queue"), "{details}");
    // Three queues attached: the kernel shows as many tx queues.
    let txq = h
        .exec([
            "sh",
            "-c",
            &format!("ls /sys/class/net/{TUN}/queues | grep -c tx-"),
        ])
        .unwrap();
    assert_eq!(txq.trim(), "3", "tx queues of a 3-queue device");
    // A second device (another netd) is refused, the first is untouched.
    let second = in_netns(h.netns().path(), || WgDevice::start(cfg(1)));
    let err = second.expect_err("a second device on a TUN in use");
    assert!(err.to_string().contains("stop the other netd"), "{err}");
    dev.stop();
    // Detached, it reattaches (persistent), with a different queue count.
    let dev = in_netns(h.netns().path(), || WgDevice::start(cfg(2))).unwrap();
    dev.stop();
    in_netns(h.netns().path(), || wg::destroy(TUN)).unwrap();
    assert!(!h.links().unwrap().iter().any(|l| l == TUN));
}
