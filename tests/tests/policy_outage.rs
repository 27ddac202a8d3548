//! Policy through a store outage (issue 11, "store down keeps the last
//! policy"), with the real etcd the other multi-host tests use. Needs root.
//!
//! * The cluster: 2 hosts (netd each), one etcd on the underlay switch, 5
//!   containers in two stacks (`shop` with services web and db, `api`)
//!   spread over both hosts; each answers on 2 TCP ports and 1 UDP port
//!   ([`weft_tests::probe`]). The matrix is every ordered pair of different
//!   containers × every port (5 × 4 × 3 = 60 cells), compared with
//!   `Policy::decide` cell by cell. On both backends.
//! * A `deny` policy with exceptions is enforced (and the conntrack cut
//!   it causes, which runs in the background, is done on both hosts), an
//!   allowed connection between the hosts is held open, then etcd is
//!   killed, and:
//!   1. for [`OUTAGE_HOLD`] the matrix is sampled back to back: it stays
//!      what the policy says (nothing denied opens, nothing allowed
//!      closes), the held connection keeps working, netd still answers its
//!      control socket, and a CNI ADD fails (README: no container can be
//!      created during an outage);
//!   2. host 0's netd is stopped and started again while etcd is still
//!      down, the matrix sampled all the time (and [`NETD_DOWN_HOLD`] more
//!      if netd could not start). README's Policy section: the tables stay
//!      in the kernel as netd last wrote them, also while netd is stopped or
//!      restarting. Whether netd starts or gives up is printed; if it gives
//!      up, it must do so within [`START_LIMIT`] and leave its tables
//!      unchanged (`nft -s` before and after). No deny may open. With VXLAN
//!      (the kernel's data path) nothing allowed may close either; weft's
//!      WireGuard is netd's own process, so while host 0 has no netd the
//!      allowed cells between the hosts close: they are counted, not failed;
//!   3. etcd comes back (host 0's netd is started again if it could not
//!      start without it; sampled, no deny may open), and a policy change
//!      written through host 1's netd, which ran through the whole outage,
//!      closes and opens cells and cuts the held connection on both hosts
//!      within the store follower's longest backoff
//!      ([`FOLLOW_MAX_BACKOFF`]) plus [`AFTER_OUTAGE_MARGIN`]; the time per
//!      host is printed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use weft_model::{Action, Party, Policy, Protocol, Rule, StackPolicy};
use weft_store::testing::EtcdServer;
use weft_store::FOLLOW_MAX_BACKOFF;
use weft_tests::probe::{probe_all, HeldConnection, ProbeServer, Target};
use weft_tests::weft::{CniCall, Netd};
use weft_tests::{Container, Lab, LabOptions};

/// The probe ports every container answers on.
const TCP_PORTS: [u16; 2] = [80, 81];
const UDP_PORTS: [u16; 1] = [53];
/// One probe's wait: an allowed probe answers in well under a millisecond
/// in the lab, a denied one is dropped and waits the whole time.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a change may take to be enforced on both hosts (the issue asks
/// for 1 s; the margin is for a loaded machine and a store client that has
/// just reconnected; the figure is printed).
const CONVERGE_DEADLINE: Duration = Duration::from_secs(5);
/// After an outage a netd that ran through it lists the policy again when
/// its follower's backoff (doubling up to [`FOLLOW_MAX_BACKOFF`]) next
/// fires: a change made just after the store is back may wait that long
/// on its host, plus this margin.
const AFTER_OUTAGE_MARGIN: Duration = Duration::from_secs(2);
/// How long the matrix is watched with the store down and netd running:
/// longer than the store client's timeouts (1 s connect, a few seconds per
/// request), so netd has noticed the outage and retried meanwhile.
const OUTAGE_HOLD: Duration = Duration::from_secs(8);
/// How long a netd start without the store may take to give up.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long the matrix is watched with no netd on host 0 (it could not
/// start without the store).
const NETD_DOWN_HOLD: Duration = Duration::from_secs(2);

/// (host, stack, service) of each container.
const MEMBERS: [(usize, &str, &str); 5] = [
    (0, "shop", "web"),
    (0, "api", "api"),
    (1, "shop", "web"),
    (1, "shop", "db"),
    (1, "api", "api"),
];

/// One container, attached through the CNI plugin.
struct Member {
    c: Container,
    ip: Ipv4Addr,
    party: Party,
    host: usize,
    /// `stack/service#i@hN`, for messages; also its probe server's tag.
    label: String,
}

/// The containers, as seen from each: (to member, target).
struct Matrix<'a> {
    members: &'a [Member],
}

/// One cell where the kernel and the model differ.
struct Mismatch {
    cell: String,
    /// The model denies it and it answered: a deny opened.
    opened: bool,
    /// Between containers on different hosts.
    cross_host: bool,
    /// The host of the destination (whose netd enforces the cell).
    to_host: usize,
}

impl Matrix<'_> {
    /// Every target of every other container, per source.
    fn targets(&self, from: usize) -> Vec<(usize, Target)> {
        let mut out = Vec::new();
        for (to, m) in self.members.iter().enumerate() {
            if to == from {
                continue;
            }
            for port in TCP_PORTS {
                out.push((to, target(Protocol::Tcp, m.ip, port)));
            }
            for port in UDP_PORTS {
                out.push((to, target(Protocol::Udp, m.ip, port)));
            }
        }
        out
    }

    fn cells(&self) -> usize {
        (0..self.members.len()).map(|f| self.targets(f).len()).sum()
    }

    /// Probes every cell at once and returns those that differ from
    /// `policy`'s model.
    fn mismatches(&self, policy: &Policy) -> Vec<Mismatch> {
        let rows = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .members
                .iter()
                .enumerate()
                .map(|(f, m)| {
                    let path: PathBuf = m.c.path();
                    let cells = self.targets(f);
                    s.spawn(move || {
                        let targets: Vec<Target> = cells.iter().map(|(_, t)| *t).collect();
                        let seen = probe_all(Some(&path), &targets, PROBE_TIMEOUT);
                        (f, cells, seen)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        let mut out = Vec::new();
        for (f, cells, seen) in rows {
            let from = &self.members[f];
            for ((to, t), outcome) in cells.iter().zip(seen) {
                let to_m = &self.members[*to];
                let d = policy.decide(&from.party, &to_m.party, Some((t.proto, t.port)));
                let allow = d.action == Action::Allow;
                if outcome.answered() != allow {
                    out.push(Mismatch {
                        cell: format!(
                            "{} -> {} {t}: {outcome}, the model says {d}",
                            from.label, to_m.label
                        ),
                        opened: !allow,
                        cross_host: from.host != to_m.host,
                        to_host: to_m.host,
                    });
                }
            }
        }
        out
    }

    /// Probes until the matrix matches `policy` or `deadline` after `t0`
    /// passed: when the first matching round began, and per host when the
    /// first round began in which the cells into its containers matched.
    fn await_policy_per_host(
        &self,
        policy: &Policy,
        t0: Instant,
        deadline: Duration,
    ) -> (Duration, Vec<Duration>) {
        let hosts = self.members.iter().map(|m| m.host).max().unwrap_or(0) + 1;
        let mut per_host: Vec<Option<Duration>> = vec![None; hosts];
        loop {
            let began = t0.elapsed();
            let bad = self.mismatches(policy);
            for (h, at) in per_host.iter_mut().enumerate() {
                if at.is_none() && bad.iter().all(|m| m.to_host != h) {
                    *at = Some(began);
                }
            }
            if bad.is_empty() {
                return (began, per_host.into_iter().flatten().collect());
            }
            assert!(
                t0.elapsed() < deadline,
                "the matrix does not match the policy {deadline:?} after the change:\n{}",
                describe(&bad)
            );
        }
    }

    /// [`Self::await_policy_per_host`], overall only.
    fn await_policy(&self, policy: &Policy, t0: Instant, deadline: Duration) -> Duration {
        self.await_policy_per_host(policy, t0, deadline).0
    }

    /// Runs `action` while probing the whole matrix back to back against
    /// `policy`, until `action` has returned and one more full round has
    /// run after it. Returns what `action` returned, the rounds, and every
    /// mismatch seen with when (since the start).
    fn sampled<R>(
        &self,
        policy: &Policy,
        action: impl FnOnce() -> R,
    ) -> (R, usize, Vec<(Duration, Mismatch)>) {
        let done = AtomicBool::new(false);
        let t0 = Instant::now();
        std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut rounds = 0;
                let mut seen = Vec::new();
                loop {
                    // Read before the round: a round that began after the
                    // action returned is the last.
                    let last = done.load(Ordering::SeqCst);
                    let at = t0.elapsed();
                    seen.extend(self.mismatches(policy).into_iter().map(|m| (at, m)));
                    rounds += 1;
                    if last {
                        return (rounds, seen);
                    }
                }
            });
            let result = action();
            done.store(true, Ordering::SeqCst);
            let (rounds, seen) = sampler.join().unwrap();
            (result, rounds, seen)
        })
    }
}

fn target(proto: Protocol, addr: Ipv4Addr, port: u16) -> Target {
    Target { proto, addr, port }
}

fn describe(bad: &[Mismatch]) -> String {
    bad.iter()
        .map(|m| format!("  {}", m.cell))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fails with every mismatch a sampled phase saw, deny-opened ones first.
/// With `tunnel_down`, allowed cells between the hosts that closed are
/// expected (the tunnel is netd's own process) and only counted; returns
/// how many there were.
fn assert_held(
    phase: &str,
    rounds: usize,
    seen: &[(Duration, Mismatch)],
    tunnel_down: bool,
    logs: &str,
) -> usize {
    let (tolerated, seen): (Vec<_>, Vec<_>) = seen
        .iter()
        .partition(|(_, m)| tunnel_down && !m.opened && m.cross_host);
    let (opened, closed): (Vec<_>, Vec<_>) = seen.iter().copied().partition(|(_, m)| m.opened);
    let lines = |v: &[&(Duration, Mismatch)]| {
        v.iter()
            .map(|(at, m)| format!("  at {at:.1?}: {}", m.cell))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        seen.is_empty(),
        "{phase}: {} deny cell(s) opened and {} allowed cell(s) closed in {rounds} round(s)\n\
         opened:\n{}\nclosed:\n{}\n{logs}",
        opened.len(),
        closed.len(),
        lines(&opened),
        lines(&closed),
    );
    tolerated.len()
}

/// CNI ADD with weft's arguments (name, stack, service); the address.
fn attach(netd: &Netd, c: &Container, id: &str, stack: &str, service: &str) -> Ipv4Addr {
    let out = CniCall {
        host: netd.host(),
        command: "ADD",
        container_id: id,
        netns: &c.path().display().to_string(),
        ifname: "eth0",
        args: &format!("IgnoreUnknown=1;WEFT_NAME={id};WEFT_STACK={stack};WEFT_SERVICE={service}"),
        config: &netd.cni_config("1.0.0"),
    }
    .run()
    .unwrap();
    assert!(out.ok(), "CNI ADD {id}: {}{}", out.stdout, out.stderr);
    out.address().unwrap()
}

/// Writes `policy` as JSON and applies it with `netd policy apply`.
fn apply(netd: &Netd, policy: &Policy, name: &str) {
    policy.validate().expect("the test's policy is valid");
    let path = netd.dir().join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(policy).unwrap()).unwrap();
    let out = netd
        .cli(&["policy", "apply", &path.display().to_string()])
        .unwrap();
    assert!(
        out.status.success(),
        "netd policy apply {name}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rule(name: &str, from: &str, to: &str, ports: &[&str]) -> Rule {
    Rule {
        name: name.into(),
        from: from.parse().unwrap(),
        to: to.parse().unwrap(),
        ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
    }
}

fn within_stack() -> StackPolicy {
    StackPolicy {
        within_stack: Some(Action::Allow),
        ..StackPolicy::default()
    }
}

/// Default deny; each stack open inside; shop's web reaches api on tcp/80.
fn before_outage() -> Policy {
    Policy {
        default: Action::Deny,
        stacks: [("shop", within_stack()), ("api", within_stack())]
            .into_iter()
            .map(|(s, p)| (s.to_owned(), p))
            .collect(),
        rules: vec![rule("web-to-api", "shop/web", "api", &["tcp/80"])],
    }
}

/// The change after the outage: web reaches api on tcp/81 instead of 80
/// (cells close and open), and api reaches shop's db on udp/53.
fn after_outage() -> Policy {
    Policy {
        rules: vec![
            rule("web-to-api", "shop/web", "api", &["tcp/81"]),
            rule("api-to-db", "api", "shop/db", &["udp/53"]),
        ],
        ..before_outage()
    }
}

/// weft's tables on a host without counter values (`nft -s`), to compare
/// what is in the kernel before and after.
fn tables(lab: &Lab, host: usize) -> String {
    ["inet", "bridge"]
        .iter()
        .map(|family| {
            lab.host(host)
                .exec(["nft", "-s", "list", "table", family, "weft"])
                .unwrap()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn logs(netds: &[Netd]) -> String {
    netds
        .iter()
        .enumerate()
        .map(|(i, n)| format!("--- netd on host {i} ---\n{}", tail(&n.log(), 30)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What netd logs when it has cut the connections a change denies.
const CUT_LOGGED: &str = "cut connections the policy no longer allows";

fn cuts_logged(netd: &Netd) -> usize {
    netd.log().matches(CUT_LOGGED).count()
}

/// Waits (a few seconds at most) until every netd has logged one more cut
/// than `before`.
fn await_cut(netds: &[Netd], before: &[usize], t0: Instant) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while netds.iter().zip(before).any(|(n, &b)| cuts_logged(n) <= b) {
        if Instant::now() > deadline {
            eprintln!("   (no {CUT_LOGGED:?} logged by every netd within 10 s; going on)");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "   the change's conntrack cut was done on both hosts {:.1?} after the apply",
        t0.elapsed()
    );
}

/// Starts netd on host `i`; a fresh etcd on a loaded machine may answer
/// netd's first requests slowly (setup, not what is tested): a few tries.
fn start(lab: &Lab, i: usize, store: &str, flag: &str) -> Netd {
    let mut tries = 0;
    loop {
        match Netd::start(lab, i, store, &[flag]) {
            Ok(netd) => return netd,
            Err(e) if tries < 2 => {
                tries += 1;
                eprintln!("netd on host {i} did not start ({e}); trying again");
            }
            Err(e) => panic!("netd on host {i}: {e}"),
        }
    }
}

#[test]
fn vxlan_store_outage_keeps_the_last_policy() {
    weft_tests::require_root!();
    outage("vxlan");
}

#[test]
fn wireguard_store_outage_keeps_the_last_policy() {
    weft_tests::require_root!();
    outage("wireguard");
}

fn outage(backend: &str) {
    // With weft's userspace WireGuard the tunnel stops with netd: while
    // host 0's netd is down, allowed cells between the hosts close (a deny
    // must still never open).
    let tunnel_in_netd = backend == "wireguard";
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    // etcd on the underlay switch's address, reachable from both hosts.
    let mut etcd =
        EtcdServer::start_in_netns(lab.underlay().name(), lab.host(0).gateway()).unwrap();
    let store = format!("etcd:{}", etcd.endpoint());
    let flag = format!("--backend={backend}");
    let mut netds: Vec<Netd> = (0..2).map(|i| start(&lab, i, &store, &flag)).collect();
    let members: Vec<Member> = MEMBERS
        .iter()
        .enumerate()
        .map(|(i, &(host, stack, service))| {
            let name = format!("{stack}-{service}-{i}");
            let c = lab.container(host, &name).unwrap();
            let ip = attach(&netds[host], &c, &name, stack, service);
            Member {
                c,
                ip,
                party: Party::new(Some(stack), Some(service)),
                host,
                label: format!("{stack}/{service}#{i}@h{host}"),
            }
        })
        .collect();
    let _servers: Vec<ProbeServer> = members
        .iter()
        .map(|m| ProbeServer::start(Some(&m.c.path()), &m.label, &TCP_PORTS, &UDP_PORTS).unwrap())
        .collect();
    let matrix = Matrix { members: &members };
    let (web0, api1) = (&members[0], &members[4]);

    // No policy yet: everything flows (the tunnel may take a moment).
    matrix.await_policy(&Policy::default(), Instant::now(), CONVERGE_DEADLINE);
    let before = before_outage();
    let cuts: Vec<usize> = netds.iter().map(cuts_logged).collect();
    let t0 = Instant::now();
    apply(&netds[0], &before, "before-outage");
    let took = matrix.await_policy(&before, t0, CONVERGE_DEADLINE);
    // The change cuts the connections it denies in the background, which
    // takes a moment; the outage starts once that is done on both hosts.
    await_cut(&netds, &cuts, t0);
    let denied: usize = (0..members.len())
        .map(|f| {
            matrix
                .targets(f)
                .iter()
                .filter(|(to, t)| {
                    let d = before.decide(
                        &members[f].party,
                        &members[*to].party,
                        Some((t.proto, t.port)),
                    );
                    d.action == Action::Deny
                })
                .count()
        })
        .sum();
    eprintln!(
        "{backend}: deny policy enforced on both hosts within {took:.1?}; \
         {denied} of {} cells denied",
        matrix.cells()
    );
    assert!(denied > 0 && denied < matrix.cells());
    // An allowed connection between the hosts, held through the outage.
    let mut held =
        HeldConnection::open(Some(&web0.c.path()), api1.ip, 80, Duration::from_secs(2)).unwrap();
    held.echo("before", Duration::from_secs(2)).unwrap();
    let tables_before = tables(&lab, 0);

    // 1. The store goes down; netd keeps running.
    etcd.stop();
    let t_down = Instant::now();
    let ((), rounds, seen) = matrix.sampled(&before, || std::thread::sleep(OUTAGE_HOLD));
    assert_held(
        "store down, netd running",
        rounds,
        &seen,
        false,
        &logs(&netds),
    );
    held.echo("store down", Duration::from_secs(2))
        .expect("the held connection survives the outage");
    for (i, netd) in netds.iter().enumerate() {
        let status = netd.cli(&["status", "--json"]).unwrap();
        assert!(
            status.status.success(),
            "netd on host {i} stopped answering without its store: {}",
            String::from_utf8_lossy(&status.stderr)
        );
    }
    eprintln!("1. store down {OUTAGE_HOLD:?}: {rounds} matrix rounds, all as the policy says");
    // README: no container can be created during an outage.
    let late = lab.container(1, "late").unwrap();
    let t = Instant::now();
    let out = CniCall {
        host: netds[1].host(),
        command: "ADD",
        container_id: "late",
        netns: &late.path().display().to_string(),
        ifname: "eth0",
        args: "IgnoreUnknown=1;WEFT_NAME=late;WEFT_STACK=shop;WEFT_SERVICE=web",
        config: &netds[1].cni_config("1.0.0"),
    }
    .run()
    .unwrap();
    assert!(
        !out.ok(),
        "a container was created with the store down: {}",
        out.stdout
    );
    eprintln!(
        "   CNI ADD with the store down failed after {:.1?}: {} {}",
        t.elapsed(),
        out.json()["msg"],
        out.json()["details"]
    );

    // 2. Host 0's netd restarts while the store is still down.
    assert!(
        netds[0].dir().join("policy.json").exists(),
        "netd kept no policy.json"
    );
    let ((stopped, started, start_took), rounds, seen) = matrix.sampled(&before, || {
        let stopped = netds[0].stop();
        let t = Instant::now();
        let started = netds[0].start_again();
        let took = t.elapsed();
        if started.is_err() {
            // No netd at all on host 0 for a while.
            std::thread::sleep(NETD_DOWN_HOLD);
        }
        (stopped, started, took)
    });
    let closed = assert_held(
        "netd restarting with the store down",
        rounds,
        &seen,
        tunnel_in_netd,
        &logs(&netds),
    );
    stopped.expect("netd stops cleanly with the store down");
    let tables_after = tables(&lab, 0);
    match &started {
        Ok(()) => eprintln!("2. netd restarted with the store down: ready after {start_took:.1?}"),
        Err(e) => eprintln!(
            "2. netd did not start with the store down (gave up after {start_took:.1?}): {}",
            tail(&e.to_string(), 1)
        ),
    }
    eprintln!(
        "   {rounds} matrix rounds while it stopped and started{}: no deny opened; \
         {closed} allowed cross-host probe(s) got no answer (tunnel down with netd)",
        if started.is_err() {
            format!(" and {NETD_DOWN_HOLD:?} without netd")
        } else {
            String::new()
        }
    );
    if !tunnel_in_netd {
        assert_eq!(closed, 0);
    }
    if started.is_err() {
        assert!(
            start_took < START_LIMIT,
            "netd neither started nor gave up within {START_LIMIT:?}"
        );
        assert_eq!(
            tables_after, tables_before,
            "the tables changed while no netd ran"
        );
    } else {
        let status = netds[0].cli(&["status", "--json"]).unwrap();
        assert!(status.status.success(), "netd started but does not answer");
        if tables_after != tables_before {
            eprintln!("   (netd rewrote its tables from policy.json while the store was down)");
        }
    }
    if !tunnel_in_netd {
        held.echo("after restart", Duration::from_secs(2))
            .expect("the held connection survives netd's restart");
    }

    // 3. The store comes back; a change is enforced within seconds.
    let ((), rounds, seen) = matrix.sampled(&before, || {
        etcd.restart().unwrap();
        if started.is_err() {
            netds[0]
                .start_again()
                .expect("netd starts once the store is back");
        }
    });
    assert_held(
        "store coming back",
        rounds,
        &seen,
        tunnel_in_netd,
        &logs(&netds),
    );
    let outage = t_down.elapsed();
    // With WireGuard, the tunnel to host 0 is back after a handshake.
    matrix.await_policy(&before, Instant::now(), CONVERGE_DEADLINE);
    let after = after_outage();
    let t0 = Instant::now();
    apply(&netds[1], &after, "after-outage");
    let (took, per_host) =
        matrix.await_policy_per_host(&after, t0, FOLLOW_MAX_BACKOFF + AFTER_OUTAGE_MARGIN);
    assert!(
        held.echo("after change", Duration::from_millis(500))
            .is_err(),
        "the held connection (web -> api tcp/80) still answers after the change denied it"
    );
    eprintln!(
        "3. store back after a {outage:.1?} outage: the change (written through host 1's \
         netd, which ran through it) is enforced on both hosts within {took:.1?} \
         (host 0, netd started after the outage: {:.1?}; host 1, netd ran through it: {:.1?})",
        per_host[0], per_host[1]
    );
}
