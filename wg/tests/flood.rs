#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Handshake under load (needs root): two lab hosts A and B run weft's
//! WireGuard device as peers; a third host floods B's port with bogus
//! handshake initiations at 50,000/s (`weft_tests::flood`: half with a valid
//! mac1 from random keys, half garbage). Proves:
//!
//! * bad-mac1 initiations are dropped before any work (counted malformed),
//! * valid-mac1 initiations beyond the rate limit get cookie replies, not a
//!   Diffie-Hellman: B's `cookies_sent` grows and the initiations that reach
//!   the DH (counted `drops_unknown_peer`: their key is no peer) stay within
//!   the limiter's budget,
//! * TCP between A and B keeps flowing during the flood (throughput before
//!   and during printed, only "it flows" asserted),
//! * a new handshake from A to B during the flood completes: A re-adds B,
//!   B answers A's initiation with a cookie reply, A retries with mac2 after
//!   REKEY_TIMEOUT (5 s) and B accepts it.
//!
//! The CPU the device threads spend per flood datagram is printed for each
//! kind of initiation alone.

mod common;

use std::time::{Duration, Instant};

use common::{iperf3, ping, serial, wg_cpu_seconds, Node, UNDERLAY_MTU};
use weft_tests::flood::{self, FloodReport, Flooder};
use weft_tests::{Host, Lab, LabOptions};
use weft_wg::DeviceStats;

/// The flood rate.
const FLOOD_RATE: u64 = 50_000;
/// Distinct initiations of each kind replayed by the flood.
const FLOOD_SET: usize = 1000;
/// Handshake initiations per second weft's device lets through before it
/// demands cookies (`datapath::HANDSHAKE_RATE_LIMIT`), and boringtun resets
/// the count at most once per second.
const LIMIT_PER_SEC: f64 = 100.0;
/// Initiations per second and burst one source may bring to the DH
/// (`source_budget::PER_SECOND`, `BURST`).
const SOURCE_PER_SEC: f64 = 20.0;
const SOURCE_BURST: f64 = 5.0;
/// The DH budget of a flood of `t` seconds is `LIMIT_PER_SEC * (t + this)`:
/// a fresh window at the start, the reset's granularity (the timer resets
/// every 100 ms, boringtun only once a full second has passed) and the
/// backlog the receive thread still drains after the flood stops.
const DH_SLACK_SECS: f64 = 2.0;
/// Initiations carrying a cookie (each costs the test two DH to make).
const COOKIE_SET: usize = 200;
/// Seconds per iperf3 run.
const IPERF_SECS: u32 = 3;

/// One TCP stream from `a` to `b` through the tunnel for `IPERF_SECS`;
/// bits per second received.
fn tcp_bps(a: &Node, b: &Node, port: u16) -> f64 {
    let secs = IPERF_SECS.to_string();
    let v = iperf3(&b.host, &a.host, &b.gw(), &a.gw(), port, &["-t", &secs]);
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("unexpected iperf3 output: {v}"))
}

/// Three pings from `from`'s gateway to `to`'s all answered.
fn ping_ok(from: &Node, to: &Node) -> bool {
    ping(from, to, &[]).status.success()
}

/// Growth of the counters this test reads between two snapshots.
fn delta(before: &DeviceStats, after: &DeviceStats) -> DeviceStats {
    DeviceStats {
        drops_malformed: after.drops_malformed - before.drops_malformed,
        drops_unknown_peer: after.drops_unknown_peer - before.drops_unknown_peer,
        cookies_sent: after.cookies_sent - before.cookies_sent,
        rx_datagrams: after.rx_datagrams - before.rx_datagrams,
        drops_handshake_budget: after.drops_handshake_budget - before.drops_handshake_budget,
        ..DeviceStats::default()
    }
}

/// The counters of a [`delta`], for the test's output.
fn show(d: &DeviceStats) -> String {
    format!(
        "received {}, malformed {}, cookie replies {}, over the source's budget {}, DH done for no peer {}",
        d.rx_datagrams, d.drops_malformed, d.cookies_sent, d.drops_handshake_budget, d.drops_unknown_peer
    )
}

/// Floods `victim` with `packets` alone for `secs`, with no other traffic:
/// what B's counters did and the device threads' CPU per datagram sent.
fn flood_alone(
    flooder: &Host,
    victim: &Node,
    packets: Vec<Vec<u8>>,
    secs: f64,
) -> (FloodReport, DeviceStats, f64) {
    let s0 = victim.dev().device_stats();
    let cpu0 = wg_cpu_seconds();
    let f = Flooder::start(flooder.netns(), victim.endpoint(), packets, FLOOD_RATE).unwrap();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let r = f.stop().unwrap();
    // Let the receive thread drain its socket.
    std::thread::sleep(Duration::from_millis(200));
    let cpu = wg_cpu_seconds() - cpu0;
    let d = delta(&s0, &victim.dev().device_stats());
    (r, d, cpu * 1e6 / r.sent.max(1) as f64)
}

#[test]
fn handshake_flood_leaves_real_peers_working() {
    weft_tests::require_root!();
    let _s = serial();
    let lab = Lab::new(LabOptions::hosts(3).mtu(UNDERLAY_MTU)).unwrap();
    let (a, b) = common::pair(&lab, None);
    let flooder = lab.host(2).clone();
    assert!(ping_ok(&a, &b), "no traffic before the flood");

    let valid = flood::initiations(&b.keys.public_key(), FLOOD_SET).unwrap();
    let garbage = flood::garbage(FLOOD_SET).unwrap();

    // (a) Bad mac1 alone: dropped as malformed, no cookie, no DH.
    let (r, d, us) = flood_alone(&flooder, &b, garbage.clone(), 1.5);
    println!(
        "FLOOD bad mac1 alone: {r}; B: {}; device threads {us:.2} CPU-us per datagram",
        show(&d)
    );
    assert!(r.sent > 0);
    assert_eq!(d.cookies_sent, 0, "no cookie for a bad mac1: {d:?}");
    assert_eq!(d.drops_unknown_peer, 0, "no DH for a bad mac1: {d:?}");
    assert!(d.drops_malformed > 0, "{d:?}");

    // (b) Valid mac1 alone: beyond the limit, cookies instead of DH.
    let (r, d, us) = flood_alone(&flooder, &b, valid.clone(), 1.5);
    println!(
        "FLOOD valid mac1 alone: {r}; B: {}; device threads {us:.2} CPU-us per datagram",
        show(&d)
    );
    assert!(d.cookies_sent > 0, "no cookie replies under load: {d:?}");
    let dh_budget = LIMIT_PER_SEC * (r.secs + DH_SLACK_SECS);
    assert!(
        (d.drops_unknown_peer as f64) <= dh_budget,
        "{} initiations reached the Diffie-Hellman in {:.1} s (budget {dh_budget:.0}): {d:?}",
        d.drops_unknown_peer,
        r.secs
    );

    // (b') Valid mac2 too, from an attacker that receives at its address
    // and so gets a cookie: boringtun's limiter lets everything with a valid
    // mac2 through to the DH, whatever the rate.
    let f = Flooder::start(flooder.netns(), b.endpoint(), valid.clone(), FLOOD_RATE).unwrap();
    let with_cookie = flood::initiations_with_cookie(
        flooder.netns(),
        b.endpoint(),
        &b.keys.public_key(),
        COOKIE_SET,
        Duration::from_secs(10),
    );
    f.stop().unwrap();
    let (r, d, us) = flood_alone(&flooder, &b, with_cookie.unwrap(), 1.5);
    println!(
        "FLOOD valid mac1 and mac2 (one source with its cookie) alone: {r}; B: {}; device threads {us:.2} CPU-us per datagram",
        show(&d)
    );
    assert!(d.drops_handshake_budget > 0, "{}", show(&d));
    let dh_budget = SOURCE_PER_SEC * r.secs + SOURCE_BURST + 10.0;
    assert!(
        (d.drops_unknown_peer as f64) <= dh_budget,
        "one source with a cookie got {} DH in {:.1} s (budget {dh_budget:.0}): {}",
        d.drops_unknown_peer,
        r.secs,
        show(&d)
    );

    // (d) Traffic during the mixed flood, against before.
    let before = tcp_bps(&a, &b, 5201);
    let mut mixed = valid;
    mixed.extend(garbage);
    let s0 = b.dev().device_stats();
    let t0 = Instant::now();
    let f = Flooder::start(flooder.netns(), b.endpoint(), mixed, FLOOD_RATE).unwrap();
    let during = tcp_bps(&a, &b, 5202);
    println!(
        "THROUGHPUT one TCP stream A -> B (iperf3 -t {IPERF_SECS}, debug={}): {:.3} Gbit/s before, \
         {:.3} Gbit/s during a {FLOOD_RATE}/s handshake flood = {:.2}x",
        cfg!(debug_assertions),
        before / 1e9,
        during / 1e9,
        during / before
    );
    assert!(
        during > before * 0.05,
        "traffic between real peers (almost) stopped during the flood: {before} -> {during} bit/s"
    );
    assert!(ping_ok(&a, &b) && ping_ok(&b, &a), "pings during the flood");

    // (c) A new handshake during the flood: A forgets B and adds it again.
    let hs_before = a.stats_for(&b);
    assert!(hs_before.last_handshake.is_some(), "{hs_before:?}");
    a.dev().set_peers(vec![]);
    let readded = Instant::now();
    a.dev().set_peers(vec![b.peer()]);
    let hs = weft_tests::wait_until(Duration::from_secs(20), "A's new handshake with B", || {
        a.stats_for(&b).last_handshake.is_some()
    });
    let took = readded.elapsed();
    let r = f.stop().unwrap();
    let d = delta(&s0, &b.dev().device_stats());
    println!(
        "FLOOD mixed: {r}; B during it: {}; new handshake A -> B completed after {took:.2?} \
         (cookie reply, then A's retry with mac2 after REKEY_TIMEOUT)",
        show(&d)
    );
    hs.unwrap();
    assert!(ping_ok(&a, &b), "traffic over the new session");
    assert!(d.cookies_sent > 0, "{d:?}");
    let dh_budget = LIMIT_PER_SEC * (t0.elapsed().as_secs_f64() + DH_SLACK_SECS);
    assert!(
        (d.drops_unknown_peer as f64) <= dh_budget,
        "{} flood initiations reached the Diffie-Hellman (budget {dh_budget:.0}): {d:?}",
        d.drops_unknown_peer
    );
    assert_eq!(
        b.stats_for(&a).handshake_errors,
        0,
        "B rejected a real handshake message"
    );
}
