#![allow(clippy::unwrap_used)]

use super::*;
use crate::soak::timeline::{
    CniFailure, DnsAnswer, DnsQuery, DnsSample, DnsSecond, FlowKind, Gap, HostSample, StoreSample,
    StreamError,
};
use weft_model::host_veth_name;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A life: ADD sent 10 ms before it answered at `added`, DEL sent 10 ms
/// before it answered at `deleted`.
fn life(id: &str, host: usize, addr: &str, added: Ms, deleted: Option<Ms>) -> Life {
    Life {
        id: id.into(),
        host,
        name: format!("n-{id}"),
        service: Some("web".into()),
        stack: None,
        aliases: vec![],
        ports: vec![],
        addr: ip(addr),
        add_sent_ms: added.saturating_sub(10),
        added_ms: added,
        del_sent_ms: deleted.map(|d| d.saturating_sub(10)),
        deleted_ms: deleted,
        probe: false,
    }
}

fn probe(id: &str, host: usize, addr: &str) -> Life {
    Life {
        probe: true,
        service: None,
        ..life(id, host, addr, 100, None)
    }
}

fn host(t_ms: Ms, h: usize, pid: u32) -> HostSample {
    HostSample {
        t_ms,
        host: h,
        netd_pid: Some(pid),
        rss_kib: Some(10_000),
        fds: Some(40),
        sockets: Some(20),
        dnsd_pids: vec![pid + 1_000],
        dnsd_rss_kib: Some(5_000),
        dnsd_fds: Some(30),
        dnsd_sockets: Some(12),
        iptables_rules: 7,
        iptables_jumps_ok: true,
        nft_tables: vec!["inet weft".into()],
        tunnel_routes: 1,
        ..HostSample::default()
    }
}

fn store(t_ms: Ms, addrs: &[(&str, &str)]) -> StoreSample {
    StoreSample {
        t_ms,
        ipam_addrs: addrs.iter().map(|(a, h)| (ip(a), h.to_string())).collect(),
        endpoints: addrs.iter().map(|(a, h)| (h.to_string(), ip(a))).collect(),
        reachable: true,
    }
}

fn fault(kind: FaultKind, host: Option<usize>, start: Ms, end: Ms, healed: Option<Ms>) -> Fault {
    Fault {
        kind,
        host,
        start_ms: start,
        end_ms: end,
        healed_ms: healed,
        detail: String::new(),
    }
}

fn o() -> CheckOptions {
    CheckOptions::default()
}

fn tl(end_ms: Ms) -> Timeline {
    Timeline {
        end_ms,
        ..Timeline::default()
    }
}

#[test]
fn an_address_reused_after_the_del_is_fine() {
    let mut t = tl(100_000);
    t.lives = vec![
        life("a", 0, "10.42.0.5", 1_000, Some(5_000)),
        // ADD answered while a's DEL (sent at 4,990) was still in flight.
        life("b", 0, "10.42.0.5", 4_995, None),
    ];
    let v = unique_addresses(&t, &o());
    assert!(v.held(), "{v:?}");
    assert_eq!(v.checks, Some(2));
}

#[test]
fn an_address_given_twice_is_a_violation() {
    let mut t = tl(100_000);
    t.lives = vec![
        life("a", 0, "10.42.0.5", 1_000, Some(5_000)),
        life("b", 1, "10.42.0.5", 3_000, Some(4_000)),
        life("c", 0, "10.42.0.6", 3_000, None),
    ];
    let v = unique_addresses(&t, &o());
    assert_eq!(v.violations, 1);
    assert!(v.details[0].what.contains("b (h1) while a (h0)"), "{v:?}");
    assert_eq!(v.details[0].t_ms, Some(3_000));
    assert!(v.line().starts_with("VIOLATED: unique addresses"));
}

#[test]
fn two_endpoint_records_with_one_address_are_a_violation() {
    let mut t = tl(100_000);
    t.store = vec![store(2_000, &[("10.42.0.5", "a"), ("10.42.0.5", "b")])];
    assert_eq!(unique_addresses(&t, &o()).violations, 1);
}

#[test]
fn ipam_addresses_within_the_grace_are_owned() {
    let mut t = tl(100_000);
    t.lives = vec![life("a", 0, "10.42.0.5", 1_000, Some(5_000))];
    // In flight before the ADD answered, and 4 s after the DEL answered.
    t.store = vec![
        store(995, &[("10.42.0.5", "a")]),
        store(9_000, &[("10.42.0.5", "a")]),
    ];
    t.store.push(StoreSample {
        t_ms: 100_500,
        reachable: true,
        ..StoreSample::default()
    });
    let v = ipam_owned(&t, &o());
    assert!(v.held(), "{v:?}");
}

#[test]
fn a_leaked_ipam_address_is_one_violation_however_often_seen() {
    let mut t = tl(100_000);
    t.lives = vec![life("a", 0, "10.42.0.5", 1_000, Some(5_000))];
    t.store = vec![
        store(11_000, &[("10.42.0.5", "a")]),
        store(14_000, &[("10.42.0.5", "a"), ("10.42.0.9", "ghost")]),
        store(100_500, &[]),
    ];
    let v = ipam_owned(&t, &o());
    assert_eq!(v.violations, 2, "{v:?}");
    assert!(v.details.iter().any(|d| d.what.contains("(2 samples)")));
    assert!(v.details.iter().any(|d| d.what.contains("ghost")));
}

#[test]
fn a_failed_add_may_leave_its_address_for_the_grace() {
    let mut t = tl(100_000);
    t.cni_failures = vec![CniFailure {
        sent_ms: 1_900,
        t_ms: 2_000,
        host: 0,
        command: "ADD".into(),
        id: "x".into(),
        error: "boom".into(),
    }];
    t.store = vec![store(3_000, &[("10.42.0.7", "x")]), store(100_500, &[])];
    assert!(ipam_owned(&t, &o()).held());
    t.store[0].t_ms = 8_000;
    assert_eq!(ipam_owned(&t, &o()).violations, 1);
}

#[test]
fn after_the_run_ipam_holds_only_the_probes() {
    let mut t = tl(100_000);
    t.lives = vec![
        probe("p", 0, "10.42.0.2"),
        life("a", 0, "10.42.0.5", 1_000, Some(99_000)),
    ];
    // a's DEL answered 1.5 s before: fine during the run, not after it.
    t.store = vec![store(100_500, &[("10.42.0.2", "p"), ("10.42.0.5", "a")])];
    let v = ipam_owned(&t, &o());
    assert_eq!(v.violations, 1, "{v:?}");
    assert!(v.details[0].what.contains("10.42.0.5"));
}

#[test]
fn no_store_sample_after_the_run_is_a_violation() {
    let mut t = tl(100_000);
    t.store = vec![store(50_000, &[])];
    let v = ipam_owned(&t, &o());
    assert_eq!(v.violations, 1);
    // An unreachable store says nothing.
    t.store.push(StoreSample {
        t_ms: 100_500,
        ..StoreSample::default()
    });
    assert_eq!(ipam_owned(&t, &o()).violations, 1);
}

#[test]
fn veths_of_live_containers_only() {
    let mut t = tl(100_000);
    t.lives = vec![
        probe("p", 0, "10.42.0.2"),
        life("a", 0, "10.42.0.5", 1_000, Some(5_000)),
    ];
    let vp = host_veth_name("p", CONTAINER_IFNAME);
    let va = host_veth_name("a", CONTAINER_IFNAME);
    let mut s1 = host(3_000, 0, 9);
    s1.veths = vec![vp.clone(), va.clone()];
    let mut s2 = host(8_000, 0, 9);
    s2.veths = vec![vp.clone(), va.clone()];
    let mut s3 = host(20_000, 0, 9);
    s3.veths = vec![vp.clone(), va.clone()];
    let mut s4 = host(21_000, 0, 9);
    s4.veths = vec![va.clone()];
    // On another host a's veth is never right.
    let mut s5 = host(3_000, 1, 8);
    s5.veths = vec![va.clone()];
    t.hosts = vec![s1, s2, s3, s4, s5];
    let v = veth_leaks(&t, &o());
    assert_eq!(v.violations, 2, "{v:?}");
    assert!(v
        .details
        .iter()
        .any(|d| d.what.contains("on h0") && d.what.contains("(2 samples)")));
    assert!(v.details.iter().any(|d| d.what.contains("on h1")));
}

#[test]
fn routes_after_the_run_are_one_per_other_host() {
    let mut t = tl(100_000);
    let mut a = host(100_500, 0, 9);
    a.tunnel_routes = 1;
    let mut b = host(100_500, 1, 8);
    b.tunnel_routes = 3;
    let mut c = host(50_000, 1, 8);
    c.tunnel_routes = 0;
    t.hosts = vec![a, b, c];
    let v = tunnel_routes(&t, &o());
    assert_eq!(v.violations, 1);
    assert!(v.details[0].what.contains("h1 has 3"));
    assert!(v.notes[0].starts_with("1 of 1 samples"), "{:?}", v.notes);
}

#[test]
fn firewall_rules_come_back_to_the_start() {
    let mut t = tl(100_000);
    let first = host(1_000, 0, 9);
    let mut wiped = host(50_000, 0, 9);
    wiped.iptables_rules = 0;
    wiped.iptables_jumps_ok = false;
    let last = host(100_500, 0, 9);
    t.hosts = vec![first, wiped, last];
    let v = firewall_rules(&t, &o());
    assert!(v.held(), "{v:?}");
    assert!(v.notes[0].starts_with("1 samples"));
    let mut extra = host(100_600, 0, 9);
    extra.iptables_rules = 9;
    extra.nft_tables = vec![];
    t.hosts.push(extra);
    let v = firewall_rules(&t, &o());
    assert_eq!(v.violations, 2, "{v:?}");
}

#[test]
fn stale_conntrack_counts_once_per_host_and_address() {
    let mut t = tl(100_000);
    let mut a = host(1_000, 0, 9);
    a.conntrack_dead = vec![ip("10.42.0.5")];
    let mut b = host(4_000, 0, 9);
    b.conntrack_dead = vec![ip("10.42.0.5"), ip("10.42.0.6")];
    t.hosts = vec![a, b, host(7_000, 0, 9)];
    let v = conntrack_leaks(&t, &o());
    assert_eq!(v.violations, 2);
    assert_eq!(v.checks, Some(3));
}

#[test]
fn segments_split_on_restart() {
    let mut t = tl(100_000);
    let mut gap = host(2_000, 0, 0);
    gap.netd_pid = None;
    t.hosts = vec![
        host(1_000, 0, 9),
        gap,
        host(3_000, 0, 10),
        host(1_500, 1, 9),
    ];
    let s = segments(&t, Process::Netd);
    assert_eq!(s.len(), 3);
    assert_eq!((s[0].host, s[0].pid, s[0].samples.len()), (0, 9, 1));
    assert_eq!((s[1].host, s[1].pid), (0, 10));
    assert_eq!(s[2].host, 1);
}

#[test]
fn fds_grow_past_the_margin_only_is_a_leak() {
    let mut t = tl(100_000);
    // Warm-up ignored: 100 fds at the start do not count.
    let mut s0 = host(0, 0, 9);
    s0.fds = Some(100);
    let a = host(10_000, 0, 9);
    let mut b = host(30_000, 0, 9);
    b.fds = Some(40 + 16);
    t.hosts = vec![s0, a, b];
    assert!(fd_leaks(&t, &o()).held());
    t.hosts[2].fds = Some(40 + 17);
    t.hosts[2].sockets = Some(100);
    let v = fd_leaks(&t, &o());
    assert_eq!(v.violations, 2, "{v:?}");
    // netd's and dnsd's fds and sockets.
    assert_eq!(v.checks, Some(4));
    assert!(v.details.iter().all(|d| d.what.contains("netd 9 on h0")));
}

#[test]
fn slopes_are_reported_and_judged_on_long_processes() {
    let mut t = tl(10_000_000);
    // 20 minutes, RSS growing 1 KiB a second = 3,600 KiB/h; fds flat.
    t.hosts = (0..=1_200)
        .map(|i| {
            let mut s = host(i * 1_000, 0, 9);
            s.rss_kib = Some(10_000 + i);
            s
        })
        .collect();
    let sl = slopes(&t, &o());
    // netd's, then dnsd's (flat).
    assert_eq!(sl.len(), 2);
    assert_eq!(
        (sl[0].process, sl[1].process),
        (Process::Netd, Process::Dnsd)
    );
    assert!(
        (sl[0].rss_kib_per_h.unwrap() - 3_600.0).abs() < 1e-6,
        "{sl:?}"
    );
    assert!(sl[0].fds_per_h.unwrap().abs() < 1e-9);
    assert!(sl[1].rss_kib_per_h.unwrap().abs() < 1e-9);
    assert!(sl[0].judged && sl[1].judged);
    let v = flat_slopes(&t, &o());
    assert!(v.held());
    assert_eq!(v.notes.len(), 2);
    assert!(v.notes[1].starts_with("h0 dnsd 1009 over"), "{:?}", v.notes);
    // 30 KiB a second: 105 MB/h.
    for (i, s) in t.hosts.iter_mut().enumerate() {
        s.rss_kib = Some(10_000 + 30 * i as u64);
    }
    let v = flat_slopes(&t, &o());
    assert_eq!(v.violations, 1, "{v:?}");
    assert!(v.details[0].what.contains("MB/h"));
}

#[test]
fn short_processes_have_no_slope_or_are_not_judged() {
    let mut t = tl(1_000_000);
    t.hosts = (0..30).map(|i| host(i * 1_000, 0, 9)).collect();
    assert!(slopes(&t, &o()).is_empty());
    t.hosts = (0..=120)
        .map(|i| {
            let mut s = host(i * 1_000, 0, 9);
            s.rss_kib = Some(10_000 + 1_000 * i);
            s
        })
        .collect();
    let sl = slopes(&t, &o());
    assert_eq!(sl.len(), 2);
    assert!(!sl[0].judged && !sl[1].judged);
    assert!(flat_slopes(&t, &o()).held());
}

/// Host 0 sampled every second from 0 to 30 s and once after the run
/// (at 100.5 s), with the dnsd pids `dnsd(i)` at second `i`.
fn dnsd_run(dnsd: impl Fn(u64) -> Vec<u32>) -> Timeline {
    let mut t = tl(100_000);
    t.hosts = (0..=30)
        .map(|i| (i * 1_000, dnsd(i)))
        .chain([(100_500, dnsd(100))])
        .map(|(at, pids)| {
            let mut s = host(at, 0, 9);
            s.dnsd_pids = pids;
            s
        })
        .collect();
    t
}

#[test]
fn one_dnsd_per_host_allows_a_short_handover_or_restart() {
    // A replacement overlaps the old one (two samples), a restart leaves
    // one sample with none; 3 processes in all.
    let t = dnsd_run(|i| match i {
        0..=9 => vec![50],
        10..=11 => vec![50, 60],
        20 => vec![],
        12..=19 => vec![60],
        _ => vec![70],
    });
    let v = one_dnsd(&t, &o());
    assert!(v.held(), "{v:?}");
    assert_eq!(v.checks, Some(32));
    assert_eq!(
        v.notes,
        vec!["h0: 3 dnsd processes over the run; 3 of 32 samples saw other than one"]
    );
    // Each dnsd process is a segment of its own; the handover's samples
    // belong to none.
    let s = segments(&t, Process::Dnsd);
    let pids: Vec<(u32, usize)> = s.iter().map(|s| (s.pid, s.samples.len())).collect();
    assert_eq!(pids, vec![(50, 10), (60, 8), (70, 11)]);
}

#[test]
fn no_dnsd_or_two_for_longer_than_the_grace_is_a_violation() {
    // None from 5 to 9 s (4 s seen), two from 20 to 23 s (3 s: within).
    let t = dnsd_run(|i| match i {
        5..=9 => vec![],
        20..=23 => vec![50, 60],
        _ => vec![50],
    });
    let v = one_dnsd(&t, &o());
    assert_eq!(v.violations, 1, "{v:?}");
    assert_eq!(v.details[0].t_ms, Some(5_000));
    assert!(
        v.details[0]
            .what
            .contains("h0 ran 0 dnsd processes until t=9.0 s (4.0 s"),
        "{v:?}"
    );
    // Two for 4 s, then none: one run, both counts named.
    let t = dnsd_run(|i| match i {
        5..=7 => vec![50, 60],
        8..=9 => vec![],
        _ => vec![50],
    });
    let v = one_dnsd(&t, &o());
    assert_eq!(v.violations, 1, "{v:?}");
    assert!(v.details[0].what.contains("ran 0 to 2 dnsd"), "{v:?}");
}

#[test]
fn after_the_run_a_host_has_exactly_one_dnsd() {
    let t = dnsd_run(|i| if i == 100 { vec![50, 60] } else { vec![50] });
    let v = one_dnsd(&t, &o());
    assert_eq!(v.violations, 1, "{v:?}");
    assert!(v.details[0]
        .what
        .contains("runs 2 dnsd processes after the run"));
    let t = dnsd_run(|i| if i == 100 { vec![] } else { vec![50] });
    assert_eq!(one_dnsd(&t, &o()).violations, 1);
    // No sample after the run.
    let mut t = dnsd_run(|_| vec![50]);
    t.hosts.pop();
    let v = one_dnsd(&t, &o());
    assert_eq!(v.violations, 1, "{v:?}");
    assert!(v.details[0].what.contains("no sample after the run"));
}

#[test]
fn dnsd_fds_and_sockets_leak_per_process() {
    // dnsd 50 grows past the margin; its replacement 60 starts higher
    // (a new process: its own warm-up and baseline) and stays flat.
    let mut t = dnsd_run(|i| if i < 15 { vec![50] } else { vec![60] });
    for s in &mut t.hosts {
        let i = s.t_ms / 1_000;
        if i < 15 {
            s.dnsd_fds = Some(30 + 5 * i);
        } else {
            s.dnsd_fds = Some(80);
            s.dnsd_sockets = Some(40);
        }
    }
    let v = fd_leaks(&t, &o());
    assert_eq!(v.violations, 1, "{v:?}");
    assert!(
        v.details[0]
            .what
            .contains("dnsd 50 on h0 has 100 fds, 80 at t=10.0 s"),
        "{v:?}"
    );
    // Below the margin: held.
    for s in &mut t.hosts {
        if s.t_ms < 15_000 {
            s.dnsd_fds = Some(30);
        }
    }
    assert!(fd_leaks(&t, &o()).held());
}

#[test]
fn a_growing_dnsd_is_judged_like_netd() {
    let mut t = tl(10_000_000);
    // 20 minutes; dnsd's fds grow 1 every 20 s = 180/h, netd flat.
    t.hosts = (0..=1_200)
        .map(|i| {
            let mut s = host(i * 1_000, 0, 9);
            s.dnsd_fds = Some(30 + i / 20);
            s
        })
        .collect();
    let v = flat_slopes(&t, &o());
    assert_eq!(v.violations, 1, "{v:?}");
    assert!(
        v.details[0].what.starts_with("h0 dnsd 1009: fds grow"),
        "{v:?}"
    );
    let sl = slopes(&t, &o());
    assert!((sl[1].fds_per_h.unwrap() - 180.0).abs() < 1.0, "{sl:?}");
}

fn q(query: DnsQuery, sent: Ms, answer: DnsAnswer) -> DnsSample {
    DnsSample {
        host: 0,
        name: "x".into(),
        query,
        sent_ms: sent,
        answered_ms: sent + 2,
        answer,
    }
}

fn c(id: &str) -> DnsQuery {
    DnsQuery::Container { id: id.into() }
}

fn addrs(a: &[&str]) -> DnsAnswer {
    DnsAnswer::Addrs(a.iter().map(|s| ip(s)).collect())
}

#[test]
fn dns_must_answer_a_container_a_second_after_its_add() {
    let lives = vec![life("a", 0, "10.42.0.5", 1_000, Some(10_000))];
    // Within the first second: either answer is right.
    assert_eq!(
        judge_dns(&q(c("a"), 1_500, DnsAnswer::NxDomain), &lives),
        None
    );
    assert_eq!(
        judge_dns(&q(c("a"), 1_500, addrs(&["10.42.0.5"])), &lives),
        None
    );
    let w = judge_dns(&q(c("a"), 2_000, DnsAnswer::NxDomain), &lives).unwrap();
    assert!(w.contains("missing 10.42.0.5 (a"), "{w}");
    assert_eq!(
        judge_dns(&q(c("a"), 2_000, addrs(&["10.42.0.5"])), &lives),
        None
    );
}

#[test]
fn dns_must_drop_a_container_a_second_after_its_del() {
    let lives = vec![life("a", 0, "10.42.0.5", 1_000, Some(10_000))];
    // DEL sent at 9,990: from then on missing is fine; stale until 11,000.
    assert_eq!(
        judge_dns(&q(c("a"), 9_989, DnsAnswer::NxDomain), &lives),
        None
    );
    assert_eq!(
        judge_dns(&q(c("a"), 10_500, addrs(&["10.42.0.5"])), &lives),
        None
    );
    let w = judge_dns(&q(c("a"), 11_000, addrs(&["10.42.0.5"])), &lives).unwrap();
    assert!(w.contains("stale 10.42.0.5"), "{w}");
    assert_eq!(
        judge_dns(&q(c("a"), 11_000, DnsAnswer::NxDomain), &lives),
        None
    );
}

#[test]
fn dns_failures_are_always_wrong() {
    let lives = vec![life("a", 0, "10.42.0.5", 1_000, None)];
    assert!(judge_dns(&q(c("a"), 500, DnsAnswer::Timeout), &lives)
        .unwrap()
        .contains("no answer"));
    assert!(judge_dns(&q(c("a"), 500, DnsAnswer::Error(2)), &lives)
        .unwrap()
        .contains("rcode 2"));
    assert!(judge_dns(&q(c("zz"), 5_000, DnsAnswer::NxDomain), &lives).is_some());
}

#[test]
fn dns_absent_names_are_nxdomain() {
    assert_eq!(
        judge_dns(&q(DnsQuery::Absent, 1, DnsAnswer::NxDomain), &[]),
        None
    );
    assert!(judge_dns(&q(DnsQuery::Absent, 1, addrs(&[])), &[]).is_some());
}

#[test]
fn dns_tasks_have_every_member_and_no_stranger() {
    let tasks = || DnsQuery::Tasks {
        service: "web".into(),
        stack: None,
    };
    let mut other = life("o", 0, "10.42.0.9", 1_000, None);
    other.service = Some("db".into());
    let lives = vec![
        life("a", 0, "10.42.0.5", 1_000, None),
        life("b", 1, "10.42.1.5", 1_000, Some(5_000)),
        // Reuses b's address: b's deletion does not make it stale.
        life("c", 1, "10.42.1.5", 6_000, None),
        other,
    ];
    assert_eq!(
        judge_dns(
            &q(tasks(), 3_000, addrs(&["10.42.0.5", "10.42.1.5"])),
            &lives
        ),
        None
    );
    let w = judge_dns(&q(tasks(), 3_000, addrs(&["10.42.0.5"])), &lives).unwrap();
    assert!(w.contains("missing 10.42.1.5 (b"), "{w}");
    // c is within its first second: its address may be there.
    assert_eq!(
        judge_dns(
            &q(tasks(), 6_500, addrs(&["10.42.0.5", "10.42.1.5"])),
            &lives
        ),
        None
    );
    let w = judge_dns(
        &q(tasks(), 8_000, addrs(&["10.42.0.5", "10.42.0.9"])),
        &lives,
    )
    .unwrap();
    assert!(
        w.contains("unexpected 10.42.0.9") && w.contains("missing 10.42.1.5 (c"),
        "{w}"
    );
}

#[test]
fn dns_verdict_counts_the_probes_totals() {
    let mut t = tl(10_000);
    t.lives = vec![life("a", 0, "10.42.0.5", 1_000, None)];
    t.dns_seconds = vec![
        DnsSecond {
            t_s: 1,
            sent: 100,
            right: 97,
            wrong: 1,
            failed: 2,
        },
        DnsSecond {
            t_s: 2,
            sent: 100,
            right: 100,
            ..DnsSecond::default()
        },
    ];
    t.dns_kept = vec![q(c("a"), 2_500, DnsAnswer::Timeout)];
    let v = dns(&t, &o());
    assert_eq!(v.checks, Some(200));
    assert_eq!(v.violations, 3);
    assert_eq!(v.details.len(), 1);
    assert!(v.details[0].what.contains("no answer"));
}

#[test]
fn dns_excuses_a_partitioned_host_and_a_rolled_back_add_but_never_a_timeout() {
    let mut t = tl(60_000);
    t.lives = vec![
        life("a", 0, "10.42.0.5", 1_000, Some(10_000)),
        life("b", 1, "10.42.1.5", 1_000, None),
    ];
    // h0 cut off from the store 9-13 s: a's address still answered at 12 s
    // and 14.5 s (within the catch-up: 4 s more + 2 s), not at 20 s.
    t.faults = vec![fault(
        FaultKind::UnderlayDown,
        Some(0),
        9_000,
        13_000,
        Some(13_010),
    )];
    let stale = |sent| q(c("a"), sent, addrs(&["10.42.0.5"]));
    t.dns_kept = vec![stale(12_000), stale(14_500), stale(20_000)];
    t.dns_seconds = vec![DnsSecond {
        t_s: 12,
        sent: 3,
        wrong: 3,
        ..DnsSecond::default()
    }];
    let across = CheckOptions {
        store_across_underlay: true,
        ..o()
    };
    let v = dns(&t, &across);
    assert_eq!(v.violations, 1, "{v:?}");
    assert!(v.details[0].what.contains("t=20.0 s"), "{v:?}");
    // The embedded store is not across the underlay: nothing excused.
    assert_eq!(dns(&t, &o()).violations, 3);

    // A timeout is never excused, partition or not.
    t.dns_kept = vec![q(c("a"), 12_000, DnsAnswer::Timeout)];
    t.dns_seconds[0].wrong = 0;
    t.dns_seconds[0].failed = 1;
    assert_eq!(dns(&t, &across).violations, 1);

    // An address of host 1's block no container had, while an ADD on host
    // 1 failed: its endpoint was being rolled back.
    let web = DnsQuery::Tasks {
        service: "web".into(),
        stack: None,
    };
    let odd = q(web, 20_000, addrs(&["10.42.1.5", "10.42.1.9"]));
    t.dns_kept = vec![odd.clone()];
    t.dns_seconds[0].failed = 0;
    t.dns_seconds[0].wrong = 1;
    assert_eq!(dns(&t, &o()).violations, 1, "no failed ADD: a violation");
    t.cni_failures = vec![CniFailure {
        sent_ms: 19_000,
        t_ms: 19_500,
        host: 1,
        command: "ADD".into(),
        id: "x".into(),
        error: "netd went away".into(),
    }];
    assert!(dns(&t, &o()).held());
    // ... but not from another host's block.
    t.cni_failures[0].host = 0;
    assert_eq!(dns(&t, &o()).violations, 1);
}

#[test]
fn faults_heal_within_their_limit() {
    let mut t = tl(100_000);
    let lim = FaultKind::NetdKill.heal_limit_ms();
    t.faults = vec![
        fault(
            FaultKind::NetdKill,
            Some(0),
            1_000,
            1_100,
            Some(1_100 + lim),
        ),
        fault(
            FaultKind::NetdKill,
            Some(1),
            5_000,
            5_100,
            Some(5_101 + lim),
        ),
        fault(FaultKind::EtcdStop, None, 10_000, 20_000, None),
        // Still within its limit when the run ended.
        fault(FaultKind::ClockJump, None, 99_000, 99_000, None),
    ];
    let v = faults_heal(&t, &o());
    assert_eq!(v.violations, 2, "{v:?}");
    assert_eq!(v.checks, Some(3));
    assert_eq!(v.notes.len(), 1);
}

#[test]
fn stream_errors_are_violations() {
    let mut t = tl(100_000);
    assert!(streams(&t, &o()).held());
    t.stream_errors = vec![StreamError {
        flow: "tcp h0->h1".into(),
        t_ms: 5_000,
        error: "connection reset".into(),
    }];
    let v = streams(&t, &o());
    assert_eq!(v.violations, 1);
    assert!(v.details[0].what.contains("connection reset"));
}

fn gap(flow: &str, start: Ms, end: Option<Ms>) -> Gap {
    Gap {
        flow: flow.into(),
        kind: FlowKind::Ping,
        start_ms: start,
        end_ms: end,
    }
}

#[test]
fn gaps_outside_faults_longer_than_a_second_are_violations() {
    let mut t = tl(100_000);
    t.faults = vec![fault(
        FaultKind::NetdTerm,
        Some(0),
        10_000,
        10_200,
        Some(12_000),
    )];
    t.gaps = vec![
        // Short, no fault: fine.
        gap("p1", 3_000, Some(3_900)),
        // Long, starts within the margin before the fault: the fault's.
        gap("p1", 9_500, Some(14_000)),
        // Long, after the fault's margin: a violation.
        gap("p2", 13_500, Some(15_000)),
    ];
    let v = gaps(&t, &o());
    assert_eq!(v.violations, 1, "{v:?}");
    assert!(v.details[0].what.contains("p2"));
    let l = longest_gaps(&t, &o());
    assert_eq!(l.len(), 2);
    assert_eq!((l[0].fault, l[0].gaps, l[0].longest_ms), (None, 2, 1_500));
    assert_eq!(l[1].fault, Some(FaultKind::NetdTerm));
    assert_eq!((l[1].gaps, l[1].longest_ms), (1, 4_500));
}

#[test]
fn a_flow_that_never_comes_back_is_a_violation() {
    let mut t = tl(100_000);
    t.faults = vec![fault(
        FaultKind::UnderlayDown,
        Some(1),
        10_000,
        11_000,
        Some(12_000),
    )];
    t.gaps = vec![gap("u1", 10_500, None)];
    let v = gaps(&t, &o());
    assert_eq!(v.violations, 1, "{v:?}");
    assert!(v.details[0].what.contains("never came back"));
    // Open at the end, starting near the end: not judged as never.
    t.gaps = vec![gap("u1", 99_800, None)];
    assert!(gaps(&t, &o()).held());
}

#[test]
fn cni_failures_need_a_fault_on_their_host() {
    let mut t = tl(100_000);
    t.faults = vec![
        fault(FaultKind::NetdKill, Some(0), 10_000, 10_000, Some(12_000)),
        fault(FaultKind::EtcdKill, None, 50_000, 51_000, Some(55_000)),
    ];
    let fail = |t_ms, host| CniFailure {
        sent_ms: t_ms,
        t_ms,
        host,
        command: "ADD".into(),
        id: format!("c{t_ms}"),
        error: "refused".into(),
    };
    t.cni_failures = vec![
        fail(11_000, 0),
        fail(11_000, 1),
        fail(55_500, 2),
        fail(70_000, 0),
    ];
    let v = cni_failures(&t, &o());
    assert_eq!(v.violations, 2, "{v:?}");
    assert!(v.details[0].what.contains("on h1"));
    assert!(v.details[1].what.contains("c70000"));
    // A call sent during the fault that timed out after it: explained.
    t.cni_failures = vec![CniFailure {
        sent_ms: 11_500,
        ..fail(17_000, 0)
    }];
    assert!(cni_failures(&t, &o()).held());
}

#[test]
fn check_gives_one_verdict_per_invariant_and_a_clean_run_holds() {
    let mut t = tl(60_000);
    t.lives = vec![probe("p0", 0, "10.42.0.2"), probe("p1", 1, "10.42.1.2")];
    for h in 0..2 {
        for i in 0..=60 {
            let mut s = host(i * 1_000 + 500 * (i == 60) as u64, h, 9 + h as u32);
            s.veths = vec![host_veth_name(&format!("p{h}"), CONTAINER_IFNAME)];
            t.hosts.push(s);
        }
    }
    t.store = vec![store(60_500, &[("10.42.0.2", "p0"), ("10.42.1.2", "p1")])];
    let v = check(&t, &o());
    assert_eq!(v.len(), 14);
    let names: BTreeSet<&str> = v.iter().map(|v| v.invariant.as_str()).collect();
    assert_eq!(names.len(), 14);
    for x in &v {
        assert!(x.held(), "{}", x.line());
        assert!(x.line().starts_with("held: "));
    }
}
