//! Network policy enforcement checked against the model (issue 11): the
//! kernel's behaviour on three hosts must be what `Policy::decide` says,
//! cell by cell, after every change. Needs root.
//!
//! * The cluster: 3 hosts (netd each, one SQLite store), 3 stacks of 3
//!   containers, each container on another host than its stack-mates, two
//!   of each stack in one service (so `within_service` differs from
//!   `within_stack`) and the third in another service or none. Every
//!   container answers on 2 TCP and 2 UDP ports ([`weft_tests::probe`]:
//!   sockets of the test binary itself, no process per probe).
//! * The matrix: every ordered pair of containers × every port = 9 × 9 × 4
//!   = 324 cells, probed all at once with a short timeout. A cell is
//!   expected open when the model allows it; a container reaching its own
//!   address never leaves its namespace, so the 9 × 4 cells of a
//!   container with itself are always open (the policy is about traffic
//!   between containers).
//! * After each change (`netd policy apply FILE`, on each host in turn) the
//!   cells whose outcome changes are probed back to back until each shows
//!   its new outcome: the time printed per step is when the last one did
//!   (enforced on all 3 hosts). Then the whole matrix is probed until it
//!   matches the model, or [`CONVERGE_DEADLINE`] passes. A mismatch names
//!   the cell, what the kernel did, what the model decided and why, and
//!   the step.
//! * `fixed_sequence_*`: default allow, default deny, within_stack,
//!   within_service, linked (and a stack's ingress), explicit rules with
//!   ports, back to allow; on both backends.
//! * `random_policies`: proptest generates random policies and change
//!   sequences ([`CASES`] sequences of [`STEPS`] steps), the way Cyclonus
//!   fuzzes Kubernetes network policies; the seed is printed,
//!   `WEFT_POLICY_SEED=<n>` replays a run and `WEFT_POLICY_CASES=<n>` runs
//!   more sequences. Its cluster has a tenth
//!   container without stack or service (10 × 10 × 4 = 400 cells).
//! * `change_cuts_established_connections`: a TCP connection the policy
//!   allowed stops being answered within a second of a change that denies
//!   it, while one the change still allows keeps working.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use weft_model::{Action, Party, Policy, PortSpec, Protocol, Rule, Selector, StackPolicy};
use weft_tests::probe::{probe_all, HeldConnection, Outcome, ProbeServer, Target};
use weft_tests::weft::{CniCall, Netd};
use weft_tests::{Container, Lab, LabOptions};

/// The probe ports every container answers on.
const TCP_PORTS: [u16; 2] = [80, 8080];
const UDP_PORTS: [u16; 2] = [53, 5353];
const PORTS_PER_MEMBER: usize = TCP_PORTS.len() + UDP_PORTS.len();
/// One probe's wait: an allowed probe answers in well under a millisecond
/// in the lab, a denied one is dropped and waits the whole time.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
/// A flip probe's wait, while timing a change (see `Cluster::await_flips`).
const FLIP_TIMEOUT: Duration = Duration::from_millis(25);
/// How long a change may take to be enforced on every host before the test
/// fails (the issue asks for 1 s; the margin is for a loaded CI machine,
/// the figure is printed).
const CONVERGE_DEADLINE: Duration = Duration::from_secs(5);
/// After a step failed, how long the matrix is probed again to tell a late
/// change from one that never arrives.
const LATE_WINDOW: Duration = Duration::from_secs(20);
/// Property test size: sequences × changes per sequence.
const CASES: u32 = 8;
const STEPS: usize = 3;

/// The stacks, and per stack the service of its containers 0, 1 and 2.
const STACKS: [(&str, [Option<&str>; 3]); 3] = [
    ("shop", [Some("web"), Some("web"), Some("db")]),
    ("pay", [Some("api"), Some("api"), Some("worker")]),
    ("ops", [Some("mon"), Some("mon"), None]),
];

/// One container of the cluster.
struct Member {
    c: Container,
    ip: Ipv4Addr,
    party: Party,
    /// `stack/service#j@hN`, for messages; also its probe server's tag.
    label: String,
}

/// Three netds on one store and the nine containers, each serving the
/// probe ports. Fields drop in order: servers first, the lab last.
struct Cluster {
    _servers: Vec<ProbeServer>,
    members: Vec<Member>,
    netds: Vec<Netd>,
    lab: Lab,
    /// Policy files written so far (each apply gets a new file).
    applied: std::cell::Cell<usize>,
    /// The policy last applied (none at first: allow everything).
    current: std::cell::RefCell<Policy>,
}

impl Cluster {
    /// The 9 containers of [`STACKS`]; `loner`: and a tenth on host 1
    /// without stack or service (it matches only `*` and the default).
    fn new(backend: &str, loner: bool) -> Cluster {
        let lab = Lab::new(LabOptions::hosts(3)).unwrap();
        let store = format!("sqlite:{}", lab.dir().join("store.db").display());
        let flag = format!("--backend={backend}");
        let netds: Vec<Netd> = (0..3)
            .map(|i| Netd::start(&lab, i, &store, &[&flag]).unwrap())
            .collect();
        let mut members = Vec::new();
        for (s, (stack, services)) in STACKS.iter().enumerate() {
            for (j, service) in services.iter().enumerate() {
                // Stack-mates on three different hosts, and each host has
                // a different mix of services.
                let host = (j + s) % 3;
                let name = format!("{stack}-{j}");
                let c = lab.container(host, &name).unwrap();
                let mut args = format!("IgnoreUnknown=1;WEFT_NAME={name};WEFT_STACK={stack}");
                if let Some(service) = service {
                    args.push_str(&format!(";WEFT_SERVICE={service}"));
                }
                let ip = attach(&netds[host], &c, &name, &args);
                let label = format!("{stack}/{}#{j}@h{host}", service.unwrap_or("-"));
                members.push(Member {
                    c,
                    ip,
                    party: Party::new(Some(stack), *service),
                    label,
                });
            }
        }
        if loner {
            let c = lab.container(1, "loner").unwrap();
            let ip = attach(&netds[1], &c, "loner", "IgnoreUnknown=1;WEFT_NAME=loner");
            members.push(Member {
                c,
                ip,
                party: Party::default(),
                label: "-/-#loner@h1".into(),
            });
        }
        let servers = members
            .iter()
            .map(|m| {
                ProbeServer::start(Some(&m.c.path()), &m.label, &TCP_PORTS, &UDP_PORTS).unwrap()
            })
            .collect();
        let cluster = Cluster {
            _servers: servers,
            members,
            netds,
            lab,
            applied: std::cell::Cell::new(0),
            current: std::cell::RefCell::new(Policy::default()),
        };
        // No policy stored: everything is open, as before policy existed
        // (the first round may wait for the tunnels to come up).
        let t0 = Instant::now();
        match cluster.await_matrix(
            "no policy",
            &Policy::default(),
            &Policy::default(),
            t0,
            Duration::from_secs(15),
        ) {
            Ok((_, rounds)) => {
                eprintln!(
                    "{backend}: without a policy the full matrix is open \
                     ({rounds} round(s), {:.0?})",
                    t0.elapsed()
                )
            }
            Err(e) => panic!("{backend}: {e}\n{}", cluster.logs()),
        }
        // The comparison can fail: against a deny-all model every open cell
        // between two containers is a mismatch.
        let targets = cluster.targets();
        let seen = cluster.observe(&targets);
        let deny_all = Policy {
            default: Action::Deny,
            ..Policy::default()
        };
        let n = cluster.members.len();
        assert_eq!(
            cluster
                .mismatches(&deny_all, &deny_all, &targets, &seen)
                .len(),
            n * (n - 1) * (TCP_PORTS.len() + UDP_PORTS.len()),
            "every cell between two containers is open and seen as open"
        );
        cluster
    }

    /// Every container's four probe targets, in member order.
    fn targets(&self) -> Vec<Target> {
        self.members
            .iter()
            .flat_map(|m| {
                let tcp = TCP_PORTS.iter().map(|&port| Target {
                    proto: Protocol::Tcp,
                    addr: m.ip,
                    port,
                });
                let udp = UDP_PORTS.iter().map(|&port| Target {
                    proto: Protocol::Udp,
                    addr: m.ip,
                    port,
                });
                tcp.chain(udp).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Probes the whole matrix at once: `[from][target]`.
    fn observe(&self, targets: &[Target]) -> Vec<Vec<Outcome>> {
        std::thread::scope(|s| {
            let rows: Vec<_> = self
                .members
                .iter()
                .map(|m| {
                    let path: PathBuf = m.c.path();
                    s.spawn(move || probe_all(Some(&path), targets, PROBE_TIMEOUT))
                })
                .collect();
            rows.into_iter().map(|r| r.join().unwrap()).collect()
        })
    }

    /// What the model says of cell (`from` member, `target`): open or not,
    /// and why.
    fn expect(&self, policy: &Policy, from: usize, t: usize, target: &Target) -> (bool, String) {
        let to = t / PORTS_PER_MEMBER;
        if from == to {
            return (
                true,
                "a container reaching itself (never leaves its namespace)".to_owned(),
            );
        }
        let l4 = Some((target.proto, target.port));
        let d = policy.decide(&self.members[from].party, &self.members[to].party, l4);
        (d.action == Action::Allow, d.to_string())
    }

    /// The cells where the kernel differs from the model, described.
    /// (`before`: the previous policy; a cell whose outcome it decided the
    /// same way is marked, as the kernel then showed a state neither
    /// policy allows.)
    fn mismatches(
        &self,
        before: &Policy,
        policy: &Policy,
        targets: &[Target],
        seen: &[Vec<Outcome>],
    ) -> Vec<String> {
        let mut out = Vec::new();
        for (f, from) in self.members.iter().enumerate() {
            for (t, target) in targets.iter().enumerate() {
                let to = &self.members[t / PORTS_PER_MEMBER];
                let got = &seen[f][t];
                let (allow, why) = self.expect(policy, f, t, target);
                // The server sees the probe come from `from`'s address.
                let want = format!(
                    "{} {}/{} {}",
                    to.label,
                    target.proto.as_str(),
                    target.port,
                    from.ip
                );
                let ok = match got {
                    Outcome::Answered(line) => allow && *line == want,
                    Outcome::NoAnswer | Outcome::Refused => !allow,
                    Outcome::Failed(_) => false,
                };
                if !ok {
                    let same_before = self.expect(before, f, t, target).0 == allow;
                    out.push(format!(
                        "{} -> {} {}/{}: kernel {got}, model {} ({why}){}{}",
                        from.label,
                        to.label,
                        target.proto.as_str(),
                        target.port,
                        if allow { "allow" } else { "deny" },
                        if allow {
                            format!(", expected {want:?}")
                        } else {
                            String::new()
                        },
                        if same_before && before != policy {
                            " [the previous policy decided the same]"
                        } else {
                            ""
                        },
                    ));
                }
            }
        }
        out
    }

    /// The cells whose outcome differs between two policies:
    /// (from member, target index, open under `after`).
    fn changed(
        &self,
        before: &Policy,
        after: &Policy,
        targets: &[Target],
    ) -> Vec<(usize, usize, bool)> {
        let mut out = Vec::new();
        for f in 0..self.members.len() {
            for (t, target) in targets.iter().enumerate() {
                let (was, _) = self.expect(before, f, t, target);
                let (now, _) = self.expect(after, f, t, target);
                if was != now {
                    out.push((f, t, now));
                }
            }
        }
        out
    }

    /// Probes each changed cell in a tight loop until it shows its new
    /// outcome: when the last one flipped (measured from `t0`), or `None`
    /// if one had not by the deadline. A cell that opens counts at its
    /// first answer; one that closes at the first of two unanswered probes
    /// in a row, the second with the long timeout (one slow answer on a
    /// loaded machine is not a close).
    fn await_flips(
        &self,
        changed: &[(usize, usize, bool)],
        targets: &[Target],
        t0: Instant,
    ) -> Option<Duration> {
        std::thread::scope(|s| {
            let per_source: Vec<_> = (0..self.members.len())
                .map(|f| {
                    let cells: Vec<(Target, bool)> = changed
                        .iter()
                        .filter(|(from, _, _)| *from == f)
                        .map(|&(_, t, open)| (targets[t], open))
                        .collect();
                    let path = self.members[f].c.path();
                    s.spawn(move || {
                        weft_tests::in_netns(&path, || {
                            std::thread::scope(|s| {
                                let cells: Vec<_> = cells
                                    .iter()
                                    .map(|&(target, open)| s.spawn(move || flip(target, open, t0)))
                                    .collect();
                                cells
                                    .into_iter()
                                    .map(|c| c.join().unwrap())
                                    .collect::<Vec<_>>()
                            })
                        })
                    })
                })
                .collect();
            let mut last = Duration::ZERO;
            for h in per_source {
                for took in h.join().unwrap() {
                    last = last.max(took?);
                }
            }
            Some(last)
        })
    }

    /// Writes `policy` to a file and applies it with `netd policy apply` on
    /// host `host`.
    fn apply(&self, policy: &Policy, host: usize) {
        policy.validate().expect("the test's policy is valid");
        let n = self.applied.get();
        self.applied.set(n + 1);
        let path = self.lab.dir().join(format!("policy-{n}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(policy).unwrap()).unwrap();
        let out = self.netds[host]
            .cli(&["policy", "apply", &path.display().to_string()])
            .unwrap();
        assert!(
            out.status.success(),
            "netd policy apply failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Applies `policy` with `netd policy apply` on host `host`, times it
    /// (the cells whose outcome changes are probed in a tight loop until
    /// each shows its new outcome) and then probes the whole matrix until
    /// it matches the model. Returns how long the change took to be
    /// enforced on all hosts, or the mismatches of the last round.
    fn converge(&self, step: &str, policy: &Policy, host: usize) -> Result<Duration, String> {
        let before = self.current.replace(policy.clone());
        let targets = self.targets();
        let changed = self.changed(&before, policy, &targets);
        let t0 = Instant::now();
        self.apply(policy, host);
        let applied = t0.elapsed();
        let flipped = self.await_flips(&changed, &targets, t0);
        let (verified, rounds) = self.await_matrix(step, &before, policy, t0, CONVERGE_DEADLINE)?;
        // A cell that did not flip in time fails the matrix check above.
        let took = flipped.unwrap_or(verified);
        eprintln!(
            "step {step:?}: {} of {} cells changed, enforced on all 3 hosts within {took:.1?} \
             (apply command {applied:.1?}; the whole matrix matched from {verified:.0?} on, \
             {rounds} round(s))",
            changed.len(),
            targets.len() * self.members.len(),
        );
        Ok(took)
    }

    /// Probes until the matrix matches `policy`'s model or `deadline` after
    /// `t0` has passed: (when the first matching round began, rounds).
    fn await_matrix(
        &self,
        step: &str,
        before: &Policy,
        policy: &Policy,
        t0: Instant,
        deadline: Duration,
    ) -> Result<(Duration, u32), String> {
        let targets = self.targets();
        let mut rounds = 0;
        loop {
            let started = t0.elapsed();
            let seen = self.observe(&targets);
            rounds += 1;
            let bad = self.mismatches(before, policy, &targets, &seen);
            if bad.is_empty() {
                return Ok((started, rounds));
            }
            if rounds == 1 {
                // Not an error (a change may still be on its way), but
                // worth seeing when it happens after every changed cell
                // has already flipped.
                eprintln!(
                    "step {step:?}: first full round at {started:.0?}: {} cell(s) differ, \
                     probing again; e.g.\n  {}",
                    bad.len(),
                    worst_first(&bad).join("\n  ")
                );
            }
            if t0.elapsed() > deadline {
                let late = self.late(before, policy, &targets, t0);
                return Err(format!(
                    "step {step:?}: {} of {} cells differ from the model after {:?} \
                     ({rounds} rounds); {late}\npolicy:\n{}\ncells:\n  {}\n{}",
                    bad.len(),
                    seen.len() * targets.len(),
                    t0.elapsed(),
                    serde_json::to_string_pretty(policy).unwrap(),
                    bad.join("\n  "),
                    self.tables(),
                ));
            }
        }
    }

    /// After a step failed: probes the matrix for up to [`LATE_WINDOW`]
    /// more, to say whether the kernel caught up late (and when) or not at
    /// all.
    fn late(&self, before: &Policy, policy: &Policy, targets: &[Target], t0: Instant) -> String {
        let until = t0.elapsed() + LATE_WINDOW;
        let mut rounds = 0;
        while t0.elapsed() < until {
            let started = t0.elapsed();
            let seen = self.observe(targets);
            rounds += 1;
            let bad = self.mismatches(before, policy, targets, &seen);
            if bad.is_empty() {
                return format!(
                    "the whole matrix matched late, from {started:.1?} on \
                     ({rounds} more round(s))"
                );
            }
        }
        format!("still differing {:.0?} after the change", t0.elapsed())
    }

    /// Each host's policy table as the kernel has it, for a failure message.
    fn tables(&self) -> String {
        (0..self.netds.len())
            .map(|i| {
                let listed = self
                    .lab
                    .host(i)
                    .netns()
                    .exec(["nft", "list", "table", "inet", "weft"])
                    .unwrap_or_else(|e| format!("(listing failed: {e})"));
                format!("--- h{i}: table inet weft\n{listed}")
            })
            .collect()
    }

    fn member(&self, label_prefix: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.label.starts_with(label_prefix))
            .unwrap()
    }

    /// What the netds logged, for a failure message.
    fn logs(&self) -> String {
        self.netds
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- netd {i}:\n{}", tail(&n.log(), 40)))
            .collect()
    }
}

/// A few mismatch lines, those the previous policy decided the same way
/// first, then cells open that the model denies.
fn worst_first(bad: &[String]) -> Vec<String> {
    let mut v: Vec<&String> = bad.iter().collect();
    v.sort_by_key(|l| {
        (
            !l.contains("[the previous policy decided the same]"),
            !l.contains("model deny"),
        )
    });
    v.into_iter().take(6).cloned().collect()
}

/// Probes `target` from this thread's namespace until it shows `open`;
/// when (from `t0`) the probe that first showed it began.
fn flip(target: Target, open: bool, t0: Instant) -> Option<Duration> {
    let mut closed_since: Option<Duration> = None;
    loop {
        let started = t0.elapsed();
        // A close is confirmed with the long timeout: a slow answer on a
        // loaded machine must not count as one.
        let wait = if closed_since.is_some() {
            PROBE_TIMEOUT
        } else {
            FLIP_TIMEOUT
        };
        let answered = weft_tests::probe::probe(&target, wait).answered();
        match (open, answered) {
            (true, true) => return Some(started),
            (false, false) => match closed_since {
                Some(first) => return Some(first),
                None => closed_since = Some(started),
            },
            (false, true) => closed_since = None,
            (true, false) => {}
        }
        if t0.elapsed() > CONVERGE_DEADLINE {
            return None;
        }
        if answered {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// CNI ADD with weft's arguments (name, stack, service); the address.
fn attach(netd: &Netd, c: &Container, id: &str, args: &str) -> Ipv4Addr {
    let out = CniCall {
        host: netd.host(),
        command: "ADD",
        container_id: id,
        netns: &c.path().display().to_string(),
        ifname: "eth0",
        args,
        config: &netd.cni_config("1.0.0"),
    }
    .run()
    .unwrap();
    assert!(out.ok(), "CNI ADD {id}: {}{}", out.stdout, out.stderr);
    out.address().unwrap()
}

fn stack(
    within_stack: Option<Action>,
    within_service: Option<Action>,
    ingress: Option<Action>,
    linked: &[&str],
) -> StackPolicy {
    StackPolicy {
        within_stack,
        within_service,
        ingress,
        linked: linked.iter().map(|s| s.to_string()).collect(),
    }
}

fn rule(name: &str, from: &str, to: &str, ports: &[&str]) -> Rule {
    Rule {
        name: name.into(),
        from: from.parse().unwrap(),
        to: to.parse().unwrap(),
        ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
    }
}

/// The fixed sequence of changes.
fn sequence() -> Vec<(&'static str, Policy)> {
    use Action::{Allow, Deny};
    let deny = Policy {
        default: Deny,
        ..Policy::default()
    };
    let with = |stacks: Vec<(&str, StackPolicy)>, default, rules| Policy {
        default,
        stacks: stacks.into_iter().map(|(s, p)| (s.to_owned(), p)).collect(),
        rules,
    };
    vec![
        ("default allow", Policy::default()),
        ("default deny", deny.clone()),
        (
            "within_stack",
            with(
                vec![
                    ("shop", stack(Some(Allow), None, None, &[])),
                    ("pay", stack(Some(Allow), None, None, &[])),
                ],
                Deny,
                vec![],
            ),
        ),
        (
            "within_service",
            with(
                vec![
                    // Same service allowed, the rest of the stack denied.
                    ("shop", stack(Some(Deny), Some(Allow), None, &[])),
                    // Same service allowed, the rest falls to the default.
                    ("pay", stack(None, Some(Allow), None, &[])),
                    // Same service denied inside an allowed stack.
                    ("ops", stack(Some(Allow), Some(Deny), None, &[])),
                ],
                Deny,
                vec![],
            ),
        ),
        (
            "linked and ingress",
            with(
                vec![
                    ("shop", stack(Some(Allow), None, None, &["pay"])),
                    ("pay", stack(None, None, Some(Deny), &[])),
                    // Open to everyone under a deny default.
                    ("ops", stack(None, None, Some(Allow), &[])),
                ],
                Deny,
                vec![],
            ),
        ),
        (
            "explicit rules with ports",
            with(
                vec![
                    ("shop", stack(None, None, Some(Deny), &[])),
                    ("pay", stack(None, None, Some(Deny), &[])),
                    ("ops", stack(None, Some(Deny), None, &[])),
                ],
                Allow,
                vec![
                    rule("web-to-api", "shop/web", "pay/api", &["tcp/80", "udp/53"]),
                    rule("all-to-db", "*", "shop/db", &["tcp/8080"]),
                    rule("ops-to-pay", "ops", "pay", &[]),
                    rule("mon-dns", "ops/mon", "ops/mon", &["udp/5353"]),
                ],
            ),
        ),
        ("back to allow", Policy::default()),
    ]
}

fn fixed_sequence(backend: &str) {
    let cluster = Cluster::new(backend, false);
    let mut took = Vec::new();
    for (i, (step, policy)) in sequence().iter().enumerate() {
        match cluster.converge(step, policy, i % 3) {
            Ok(t) => took.push((*step, t)),
            Err(e) => panic!("{backend}: {e}\n{}", cluster.logs()),
        }
    }
    eprintln!(
        "{backend}: {} steps on a {}-cell matrix; enforced within: {}",
        took.len(),
        cluster.members.len() * cluster.members.len() * (TCP_PORTS.len() + UDP_PORTS.len()),
        took.iter()
            .map(|(s, t)| format!("{s} {t:.0?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

#[test]
fn fixed_sequence_wireguard() {
    weft_tests::require_root!();
    fixed_sequence("wireguard");
}

#[test]
fn fixed_sequence_vxlan() {
    weft_tests::require_root!();
    fixed_sequence("vxlan");
}

/// Random policies over the cluster's stacks and services.
mod gen {
    use super::*;
    use proptest::prelude::*;

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![Just(Action::Allow), Just(Action::Deny)]
    }

    fn selector() -> impl Strategy<Value = Selector> {
        let services: Vec<(String, String)> = STACKS
            .iter()
            .flat_map(|(s, v)| v.iter().flatten().map(|v| (s.to_string(), v.to_string())))
            .collect();
        let stacks: Vec<String> = STACKS.iter().map(|(s, _)| s.to_string()).collect();
        prop_oneof![
            1 => Just(Selector::Any),
            2 => proptest::sample::select(stacks).prop_map(Selector::Stack),
            2 => proptest::sample::select(services).prop_map(|(s, v)| Selector::Service(s, v)),
        ]
    }

    fn ports() -> impl Strategy<Value = Vec<PortSpec>> {
        // The served ports and one nobody serves.
        let all: Vec<PortSpec> = ["tcp/80", "tcp/8080", "udp/53", "udp/5353", "tcp/443"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        prop_oneof![
            1 => Just(Vec::new()),
            2 => proptest::sample::subsequence(all, 1..=3),
        ]
    }

    fn stack_policy() -> impl Strategy<Value = StackPolicy> {
        (
            proptest::option::of(action()),
            proptest::option::of(action()),
            proptest::option::of(action()),
            proptest::sample::subsequence(vec!["shop", "pay", "ops"], 0..=1),
        )
            .prop_map(
                |(within_stack, within_service, ingress, linked)| StackPolicy {
                    within_stack,
                    within_service,
                    ingress,
                    linked: linked.into_iter().map(str::to_owned).collect(),
                },
            )
    }

    pub fn policy() -> impl Strategy<Value = Policy> {
        (
            action(),
            proptest::collection::vec(proptest::option::of(stack_policy()), 3),
            proptest::collection::vec((selector(), selector(), ports()), 0..=3),
        )
            .prop_map(|(default, stacks, rules)| {
                let mut stacks: std::collections::BTreeMap<String, StackPolicy> = STACKS
                    .iter()
                    .zip(stacks)
                    .filter_map(|((name, _), sp)| sp.map(|sp| (name.to_string(), sp)))
                    .collect();
                // Links only to declared stacks, never to itself (validate).
                let declared: Vec<String> = stacks.keys().cloned().collect();
                for (name, sp) in stacks.iter_mut() {
                    sp.linked.retain(|l| l != name && declared.contains(l));
                }
                let rules = rules
                    .into_iter()
                    .enumerate()
                    .map(|(i, (from, to, ports))| Rule {
                        name: format!("r{i}"),
                        from,
                        to,
                        ports,
                    })
                    .collect();
                Policy {
                    default,
                    stacks,
                    rules,
                }
            })
    }
}

#[test]
fn random_policies() {
    use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
    weft_tests::require_root!();
    let seed: u64 = std::env::var("WEFT_POLICY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    // More cases for a longer hunt by hand: WEFT_POLICY_CASES=<n>.
    let cases = std::env::var("WEFT_POLICY_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CASES);
    eprintln!(
        "random_policies: seed {seed} ({cases} sequences of {STEPS} changes; \
         replay with WEFT_POLICY_SEED={seed})"
    );
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        // A case costs seconds of probing: a few shrink steps only, and
        // nothing written into the source tree.
        max_shrink_iters: 8,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let cluster = Cluster::new("wireguard", true);
    let case = std::cell::Cell::new(0);
    let result = runner.run(
        &proptest::collection::vec(gen::policy(), STEPS),
        |changes| {
            let n = case.get();
            case.set(n + 1);
            for (i, policy) in changes.iter().enumerate() {
                let step = format!("case {n} change {i}");
                cluster
                    .converge(&step, policy, i % 3)
                    .map_err(|e| TestCaseError::fail(format!("seed {seed}: {e}")))?;
            }
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}\n{}", cluster.logs());
    }
    eprintln!(
        "random_policies: {} sequences run (with shrinking)",
        case.get()
    );
}

#[test]
fn change_cuts_established_connections() {
    weft_tests::require_root!();
    let cluster = Cluster::new("wireguard", false);
    cluster
        .converge("allow", &Policy::default(), 0)
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    // Across hosts (shop-0 on h0 to pay-0 on h1) and on one host (shop-0
    // to pay-2, both on h0): cut. Inside shop (h0 to h1): kept.
    let shop0 = cluster.member("shop/web#0");
    let cut: Vec<&Member> = vec![cluster.member("pay/api#0"), cluster.member("pay/worker#2")];
    let kept = cluster.member("shop/web#1");
    assert_eq!(
        cut[1].c.host_index(),
        shop0.c.host_index(),
        "a same-host pair"
    );
    let open = |to: &Member| {
        let mut conn =
            HeldConnection::open(Some(&shop0.c.path()), to.ip, 80, Duration::from_secs(2)).unwrap();
        conn.echo("before", Duration::from_secs(2)).unwrap();
        conn
    };
    let mut cut_conns: Vec<HeldConnection> = cut.iter().map(|m| open(m)).collect();
    let mut kept_conn = open(kept);
    let policy = Policy {
        default: Action::Deny,
        stacks: [(
            "shop".to_owned(),
            stack(Some(Action::Allow), None, None, &[]),
        )]
        .into_iter()
        .collect(),
        rules: vec![],
    };
    let took = cluster
        .converge("deny pay", &policy, 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    for (conn, to) in cut_conns.iter_mut().zip(&cut) {
        let t = Instant::now();
        let r = conn.echo("after", Duration::from_secs(1));
        assert!(
            r.is_err(),
            "shop-0 -> {}: the established connection was still answered after the change \
             denied it (enforced within {took:?})",
            to.label
        );
        eprintln!(
            "shop-0 -> {}: established connection cut ({}, {:?})",
            to.label,
            r.unwrap_err(),
            t.elapsed()
        );
    }
    kept_conn
        .echo("after", Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("a connection the change still allows was cut: {e}"));
}
