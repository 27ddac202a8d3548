//! Services end to end (issue 12): a service's virtual IP, balanced in the
//! kernel of the client's host, with health checks, in lab hosts with netd
//! each (one SQLite store) and containers attached through the real CNI
//! plugin (`WEFT_SERVICE=web;WEFT_STACK=shop`). Needs root.
//!
//! Every container of `web.shop` runs a [`ProbeServer`] tagged with its
//! name on tcp/80 and udp/53 (the service's listener) and another on
//! tcp/8080 (the health check's port), so stopping the health listener
//! takes a container out while its service port still answers: a
//! connection it no longer gets is seen as an answer from another backend,
//! not as a refusal. Clients (one container per host, not in the service)
//! open new connections to the VIP, each from a new source port.
//!
//! * `balance_hairpin_affinity` (3 hosts, WireGuard): 600 TCP connections
//!   and 600 UDP queries from one client spread over 6 containers on 3
//!   hosts (Pearson's chi-square against uniform, df = 5, fails above the
//!   p = 0.001 critical value); DNS answers the VIP for the service's names
//!   and PTR; a backend reaching its own VIP is answered, sometimes by
//!   itself; `--affinity` keeps a client on one backend.
//! * `health_takes_containers_out_and_back` (3 hosts, VXLAN): with
//!   `--health tcp:8080`, a container whose health listener stops gets no
//!   new connection from any host and leaves `tasks.web.shop` within 2 s,
//!   and comes back when it listens again; with every health listener
//!   stopped the VIP refuses at once (TCP reset, ICMP for UDP).
//! * `udp_flow_moves_when_its_backend_is_deleted` (2 hosts, VXLAN): a UDP
//!   flow with a fixed source port, from a client on another host and from
//!   one on the backends' host, answers from another backend at once after
//!   its backend's CNI DEL.
//! * `vip_stable_and_dnsrr` (2 hosts, WireGuard): the VIP stays across a
//!   restart of every netd and across deleting and re-creating all the
//!   service's containers; `--mode dnsrr` and `WEFT_SERVICE_MODE=dnsrr`
//!   answer the container addresses in DNS, as before services had VIPs;
//!   the former VIP is refused at once.
//! * `range_full_and_vip_freed_after_grace` (1 host, VXLAN, service range
//!   /30, grace 2 s): the third service works without a VIP and says the
//!   range is full (`netd services`, and `netd service set --mode vip`
//!   fails with it); a service without containers loses its record and VIP
//!   after the grace, and the service waiting for one gets it.
//! * `policy_applies_after_dnat` (2 hosts, WireGuard): a default-deny
//!   policy closes the VIP to another stack's clients on both hosts (the
//!   same-host one too, whose packets are masqueraded only after the
//!   policy's forward hook); a rule to `shop/web` on tcp/80 opens exactly
//!   that port through the VIP.
//!
//! Source addresses: every backend, on the client's host or another, sees
//! the client's own address (DNAT only; netd's published-port hairpin rule
//! leaves the service range alone).
//!
//! The tests take a lock so they run one at a time: the time bounds are
//! about netd, not about two labs sharing two cores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use weft_api::ServiceInfo;
use weft_model::{Mode, Protocol};
use weft_tests::probe::{probe_all, Outcome, ProbeServer, Target};
use weft_tests::services::{answered_by, chi_square_uniform, dig_a, tally, CHI2_DF5_P001};
use weft_tests::weft::{CniCall, Netd};
use weft_tests::{in_netns, Container, Lab, LabOptions};

const DNS: &str = "169.254.169.250";
const SERVICE: &str = "web.shop";
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const HEALTH_PORT: u16 = 8080;
/// One probe's wait (an answer in the lab takes well under a millisecond).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Probes sent at once, each from its own socket.
const BATCH: usize = 50;
/// How long a health change may take to reach every host (the bound).
const HEALTH_BOUND: Duration = Duration::from_secs(2);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One container of the service.
struct Member {
    c: Container,
    id: String,
    ip: Ipv4Addr,
    /// `web-<i>`: its name and its probe servers' tag.
    name: String,
    host: usize,
    /// tcp/80 and udp/53.
    _server: ProbeServer,
    /// tcp/8080, the health check's port.
    health: Option<ProbeServer>,
    /// Attached (no CNI DEL yet).
    attached: bool,
}

/// Hosts with a netd each (one store), clients (one per host) and the
/// service's members. Fields drop in order: servers first, the lab last.
struct Cluster {
    members: Vec<Member>,
    clients: Vec<Container>,
    netds: Vec<Netd>,
    lab: Lab,
    backend: &'static str,
}

impl Cluster {
    /// `hosts` hosts on `backend`, a client on each, and a member of
    /// `web.shop` on each host of `placement` (member i on `placement[i]`).
    fn new(hosts: usize, backend: &'static str, placement: &[usize]) -> Cluster {
        Cluster::with_flags(hosts, backend, placement, &[])
    }

    /// [`Cluster::new`] with more netd flags.
    fn with_flags(
        hosts: usize,
        backend: &'static str,
        placement: &[usize],
        flags: &[&str],
    ) -> Cluster {
        let lab = Lab::new(LabOptions::hosts(hosts)).unwrap();
        let store = format!("sqlite:{}", lab.dir().join("store.db").display());
        let mut args = vec![format!("--backend={backend}")];
        args.extend(flags.iter().map(|f| f.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let netds: Vec<Netd> = (0..hosts)
            .map(|i| Netd::start(&lab, i, &store, &args).unwrap())
            .collect();
        let mut cluster = Cluster {
            members: Vec::new(),
            clients: Vec::new(),
            netds,
            lab,
            backend,
        };
        for h in 0..hosts {
            let name = format!("client-{h}");
            let c = cluster.lab.container(h, &name).unwrap();
            cluster.attach(
                h,
                &c,
                &name,
                &format!("IgnoreUnknown=1;WEFT_NAME={name};WEFT_STACK=ops"),
            );
            cluster.clients.push(c);
        }
        for &h in placement {
            cluster.add_member(h, "");
        }
        cluster
    }

    /// CNI ADD through host `h`'s netd; the container's address.
    fn attach(&self, h: usize, c: &Container, id: &str, args: &str) -> Ipv4Addr {
        let netd = &self.netds[h];
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
        assert!(out.ok(), "ADD {id}: {}{}", out.stdout, out.stderr);
        out.address().unwrap()
    }

    /// A new member `web-<n>` on host `h` (`extra`: more CNI_ARGS, `;`
    /// first), serving its ports.
    fn add_member(&mut self, h: usize, extra: &str) -> usize {
        let i = self.members.len();
        let name = format!("web-{i}");
        let c = self.lab.container(h, &name).unwrap();
        let id = format!("ctr-{name}");
        let ip = self.attach(
            h,
            &c,
            &id,
            &format!("IgnoreUnknown=1;WEFT_NAME={name};WEFT_SERVICE=web;WEFT_STACK=shop{extra}"),
        );
        let server = ProbeServer::start(Some(&c.path()), &name, &[TCP_PORT], &[UDP_PORT]).unwrap();
        let health = ProbeServer::start(Some(&c.path()), &name, &[HEALTH_PORT], &[]).unwrap();
        self.members.push(Member {
            c,
            id,
            ip,
            name,
            host: h,
            _server: server,
            health: Some(health),
            attached: true,
        });
        i
    }

    /// CNI DEL of member `i` (its namespace stays, without an interface).
    fn delete_member(&mut self, i: usize) {
        let m = &self.members[i];
        let netd = &self.netds[m.host];
        let out = CniCall {
            host: netd.host(),
            command: "DEL",
            container_id: &m.id,
            netns: &m.c.path().display().to_string(),
            ifname: "eth0",
            args: "IgnoreUnknown=1",
            config: &netd.cni_config("1.0.0"),
        }
        .run()
        .unwrap();
        assert!(out.ok(), "DEL {}: {}{}", m.id, out.stdout, out.stderr);
        self.members[i].attached = false;
    }

    fn attached(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.attached)
    }

    /// `netd services --json` of host `h`'s netd.
    fn services(&self, h: usize) -> Vec<ServiceInfo> {
        let out = self.netds[h].cli(&["services", "--json"]).unwrap();
        assert!(
            out.status.success(),
            "netd services: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "netd services --json: {e}\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn service(&self, h: usize, name: &str) -> Option<ServiceInfo> {
        self.services(h)
            .into_iter()
            .find(|s| s.name.to_string() == name)
    }

    /// `netd service set <name> <args>` through host `h`'s netd.
    fn set(&self, h: usize, name: &str, args: &[&str]) {
        let mut argv = vec!["service", "set", name];
        argv.extend(args);
        let out = self.netds[h].cli(&argv).unwrap();
        assert!(
            out.status.success(),
            "netd {}: {}{}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The VIP of web.shop once every netd lists it with every attached
    /// member as a backend.
    fn vip(&self) -> Ipv4Addr {
        let want: BTreeSet<Ipv4Addr> = self.attached().map(|m| m.ip).collect();
        let mut seen = None;
        let ok = wait(Duration::from_secs(10), || {
            let vips: Vec<Option<Ipv4Addr>> = (0..self.netds.len())
                .map(|h| {
                    let s = self.service(h, SERVICE)?;
                    let got: BTreeSet<Ipv4Addr> = s.backends.iter().map(|b| b.address).collect();
                    (got == want).then_some(s.vip).flatten()
                })
                .collect();
            seen = Some(vips.clone());
            vips[0].is_some() && vips.iter().all(|v| *v == vips[0])
        });
        assert!(
            ok,
            "{SERVICE} has no VIP with backends {want:?} on every host: {seen:?}\n{}",
            self.logs()
        );
        seen.unwrap()[0].unwrap()
    }

    /// `n` new connections (TCP) or queries (UDP, each from its own port)
    /// from `from` to `addr`, [`BATCH`] at a time.
    fn round(&self, from: &Container, addr: Ipv4Addr, proto: Protocol, n: usize) -> Vec<Outcome> {
        let port = match proto {
            Protocol::Tcp => TCP_PORT,
            Protocol::Udp => UDP_PORT,
        };
        let target = Target { proto, addr, port };
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let k = BATCH.min(n - got.len());
            got.extend(probe_all(
                Some(&from.path()),
                &vec![target; k],
                PROBE_TIMEOUT,
            ));
        }
        got
    }

    /// Waits until every client reaches every attached member through
    /// `vip` (each host's table has them all).
    fn await_backends(&self, vip: Ipv4Addr) {
        let want: BTreeSet<String> = self.attached().map(|m| m.name.clone()).collect();
        for client in &self.clients {
            let mut last = BTreeMap::new();
            let ok = wait(Duration::from_secs(15), || {
                let (counts, failed) = tally(&self.round(client, vip, Protocol::Tcp, 30));
                let seen: BTreeSet<String> = counts.keys().cloned().collect();
                last = counts;
                failed.is_empty() && seen == want
            });
            assert!(
                ok,
                "{} -> {vip}: not every backend answers ({last:?}, want {want:?})\n{}",
                client.container_name(),
                self.logs()
            );
        }
    }

    /// Counts, in member order, of who answered `outcomes`; panics on a
    /// probe without answer or an answer from no attached member.
    fn counts(&self, what: &str, outcomes: &[Outcome]) -> Vec<u64> {
        let (counts, failed) = tally(outcomes);
        assert!(
            failed.is_empty(),
            "{what}: {} of {} without answer, e.g. {}",
            failed.len(),
            outcomes.len(),
            failed[0]
        );
        let names: BTreeSet<&str> = self.attached().map(|m| m.name.as_str()).collect();
        for tag in counts.keys() {
            assert!(names.contains(tag.as_str()), "{what}: answered by {tag}");
        }
        self.attached()
            .map(|m| counts.get(&m.name).copied().unwrap_or(0))
            .collect()
    }

    /// The chi-square check of `outcomes` against a uniform spread over
    /// the attached members; prints the counts and the statistic.
    fn assert_uniform(&self, what: &str, outcomes: &[Outcome]) -> f64 {
        let counts = self.counts(what, outcomes);
        let stat = chi_square_uniform(&counts);
        let names: Vec<String> = self
            .attached()
            .zip(&counts)
            .map(|(m, c)| format!("{}@h{}={c}", m.name, m.host))
            .collect();
        eprintln!(
            "{}: {what}: {} -> chi-square {stat:.2} (df {}, critical {CHI2_DF5_P001} at p=0.001)",
            self.backend,
            names.join(" "),
            counts.len() - 1
        );
        assert_eq!(counts.len(), 6, "the critical value is for 6 backends");
        assert!(
            counts.iter().all(|&c| c > 0),
            "{what}: a backend got nothing: {names:?}"
        );
        assert!(
            stat <= CHI2_DF5_P001,
            "{what}: not uniform: chi-square {stat:.2} > {CHI2_DF5_P001} ({names:?})"
        );
        stat
    }

    fn logs(&self) -> String {
        self.netds
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let log = n.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!(
                    "--- netd host{i} (last 40 lines) ---\n{}\n",
                    tail.join("\n")
                )
            })
            .collect()
    }
}

/// Polls `cond` until it holds or `limit` passes; whether it held.
fn wait(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if t.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ptr(c: &Container, addr: Ipv4Addr) -> String {
    c.exec([
        "dig",
        "+short",
        "+time=1",
        "+tries=1",
        &format!("@{DNS}"),
        "-x",
        &addr.to_string(),
    ])
    .unwrap()
    .trim()
    .to_owned()
}

/// Waits until DNS from `c` answers `name` with exactly `want`.
fn await_dns(c: &Container, name: &str, want: &[Ipv4Addr], limit: Duration) {
    let mut want = want.to_vec();
    want.sort();
    let mut got = Vec::new();
    let ok = wait(limit, || {
        got = dig_a(c, DNS, name).unwrap();
        got == want
    });
    assert!(
        ok,
        "dig {name} from {}: {got:?}, want {want:?}",
        c.container_name()
    );
}

#[test]
fn balance_hairpin_affinity() {
    weft_tests::require_root!();
    let _serial = serial();
    let t0 = Instant::now();
    // Six members, two per host.
    let cl = Cluster::new(3, "wireguard", &[0, 1, 2, 0, 1, 2]);
    let vip = cl.vip();
    let info = cl.service(0, SERVICE).unwrap();
    assert_eq!(info.spec.mode, Mode::Vip);
    assert_eq!(
        vip.octets()[..2],
        [10, 43],
        "VIP {vip} outside the default service range 10.43.0.0/16"
    );
    eprintln!("{SERVICE}: VIP {vip} ({:.1?} after start)", t0.elapsed());

    // DNS: the service's names answer the VIP, tasks the containers, PTR
    // the service.
    let client = &cl.clients[0];
    let members: Vec<Ipv4Addr> = cl.members.iter().map(|m| m.ip).collect();
    await_dns(client, SERVICE, &[vip], Duration::from_secs(5));
    await_dns(
        client,
        "web.shop.weft.internal",
        &[vip],
        Duration::from_secs(1),
    );
    await_dns(client, "tasks.web.shop", &members, Duration::from_secs(1));
    assert_eq!(ptr(client, vip), "web.shop.weft.internal.");

    cl.await_backends(vip);

    // 600 new TCP connections from one client.
    let t = Instant::now();
    let tcp = cl.round(client, vip, Protocol::Tcp, 600);
    let took = t.elapsed();
    cl.assert_uniform("600 TCP connections", &tcp);
    eprintln!("  (600 TCP connections in {took:.1?})");
    // Every backend sees the client's own address (DNAT only, no SNAT), on
    // the client's host too.
    let client_ip = cl.attach_addr(0);
    let mut peers: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for o in &tcp {
        let Outcome::Answered(line) = o else {
            unreachable!()
        };
        let mut words = line.split_whitespace();
        let (tag, peer) = (words.next().unwrap(), words.last().unwrap());
        peers.entry(tag).or_default().insert(peer);
    }
    eprintln!("  client-0 is {client_ip}; source addresses the backends saw: {peers:?}");
    for m in &cl.members {
        let want = BTreeSet::from([client_ip.to_string()]);
        let got: BTreeSet<String> = peers[m.name.as_str()]
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(got, want, "{} (host {}) saw the client as", m.name, m.host);
    }

    // 600 UDP queries, each from a new source port.
    let udp = cl.round(client, vip, Protocol::Udp, 600);
    cl.assert_uniform("600 UDP queries", &udp);

    // Hairpin: a member reaching its own service's VIP is answered, by
    // itself among others.
    let me = &cl.members[0];
    let hair = cl.round(&me.c, vip, Protocol::Tcp, 120);
    let counts = cl.counts("hairpin", &hair);
    eprintln!(
        "  hairpin: {} -> {vip}: {counts:?} (itself {})",
        me.name, counts[0]
    );
    assert!(
        counts[0] > 0,
        "{} never reached itself: {counts:?}",
        me.name
    );
    let hair_udp = cl.round(&me.c, vip, Protocol::Udp, 60);
    assert!(cl.counts("hairpin udp", &hair_udp)[0] > 0);

    // Affinity: one client stays on one backend.
    cl.set(0, SERVICE, &["--affinity"]);
    let info = cl.service(1, SERVICE).unwrap();
    assert!(info.spec.affinity, "{info:?}");
    for (h, c) in cl.clients.iter().enumerate() {
        // In effect on this client's host once 10 connections in a row
        // land on one backend ((1/6)^9 by chance).
        let mut last = BTreeMap::new();
        let ok = wait(Duration::from_secs(5), || {
            let (counts, failed) = tally(&cl.round(c, vip, Protocol::Tcp, 10));
            last = counts;
            failed.is_empty() && last.len() == 1
        });
        assert!(
            ok,
            "affinity not in effect on host {h}: {last:?}\n{}",
            cl.logs()
        );
        let fifty: Vec<Outcome> = (0..5)
            .flat_map(|_| cl.round(c, vip, Protocol::Tcp, 10))
            .collect();
        let (counts, failed) = tally(&fifty);
        assert!(failed.is_empty(), "{failed:?}");
        eprintln!("  affinity: client-{h}: 50 connections -> {counts:?}");
        assert_eq!(counts.len(), 1, "client-{h} moved: {counts:?}");
    }
    eprintln!("balance_hairpin_affinity: {:.1?}", t0.elapsed());
}

impl Cluster {
    /// Client `h`'s address (from its interface).
    fn attach_addr(&self, h: usize) -> Ipv4Addr {
        let out = self.clients[h]
            .exec(["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
            .unwrap();
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {out}"))
    }
}

/// Whether every client, in one round of 30 connections, is answered
/// every time and never by `excluded`; and which tags answered.
fn round_without(cl: &Cluster, vip: Ipv4Addr, excluded: &str) -> (bool, BTreeSet<String>) {
    let mut ok = true;
    let mut seen = BTreeSet::new();
    for c in &cl.clients {
        let (counts, failed) = tally(&cl.round(c, vip, Protocol::Tcp, 30));
        ok &= failed.is_empty() && !counts.contains_key(excluded);
        seen.extend(counts.into_keys());
    }
    (ok, seen)
}

fn tasks_everywhere(cl: &Cluster) -> Vec<Vec<Ipv4Addr>> {
    cl.clients
        .iter()
        .map(|c| dig_a(c, DNS, "tasks.web.shop").unwrap())
        .collect()
}

#[test]
fn health_takes_containers_out_and_back() {
    weft_tests::require_root!();
    let _serial = serial();
    let t0 = Instant::now();
    let mut cl = Cluster::new(3, "vxlan", &[0, 1, 2, 0]);
    let vip = cl.vip();
    cl.set(0, SERVICE, &["--health", &format!("tcp:{HEALTH_PORT}")]);
    let mut all: Vec<Ipv4Addr> = cl.members.iter().map(|m| m.ip).collect();
    all.sort();
    let ok = wait(Duration::from_secs(5), || {
        (0..3).all(|h| {
            cl.service(h, SERVICE).is_some_and(|s| {
                s.spec.health.is_some()
                    && s.backends.len() == 4
                    && s.backends.iter().all(|b| b.healthy)
            })
        })
    });
    assert!(ok, "health check not set: {:?}", cl.service(0, SERVICE));
    cl.await_backends(vip);

    // Member 1 (host 1) stops answering its health check: out of every
    // host's table and of tasks.web.shop within the bound. Its service
    // port still answers, so a connection it got would show.
    let victim = 1;
    let (vname, vip_of_victim) = (cl.members[victim].name.clone(), cl.members[victim].ip);
    let others: Vec<Ipv4Addr> = all
        .iter()
        .copied()
        .filter(|&a| a != vip_of_victim)
        .collect();
    drop(cl.members[victim].health.take());
    let stopped = Instant::now();
    let mut out_at = None;
    let mut last = (BTreeSet::new(), Vec::new());
    while stopped.elapsed() < Duration::from_secs(6) {
        let start = stopped.elapsed();
        let (ok, seen) = round_without(&cl, vip, &vname);
        let tasks = tasks_everywhere(&cl);
        let dns_ok = tasks.iter().all(|t| *t == others);
        last = (seen, tasks);
        if ok && dns_ok {
            out_at = Some(start);
            break;
        }
    }
    let out_at =
        out_at.unwrap_or_else(|| panic!("{vname} still in after 6 s: {last:?}\n{}", cl.logs()));
    eprintln!("vxlan: {vname} out of the VIP on 3 hosts and of tasks.web.shop {out_at:.2?} after its health listener stopped");
    assert!(
        out_at <= HEALTH_BOUND,
        "{vname} out only after {out_at:?} (bound {HEALTH_BOUND:?})"
    );
    // It stays out, and every host's API says why.
    for _ in 0..3 {
        let (ok, seen) = round_without(&cl, vip, &vname);
        assert!(ok, "{vname} answered again: {seen:?}");
    }
    let b = cl
        .service(2, SERVICE)
        .unwrap()
        .backends
        .into_iter()
        .find(|b| b.address == vip_of_victim)
        .unwrap();
    assert!(!b.healthy, "{b:?}");
    await_dns(&cl.clients[2], SERVICE, &[vip], Duration::from_millis(100));

    // It listens again: back everywhere.
    let m = &cl.members[victim];
    let health = ProbeServer::start(Some(&m.c.path()), &m.name, &[HEALTH_PORT], &[]).unwrap();
    cl.members[victim].health = Some(health);
    let restarted = Instant::now();
    let back = wait(Duration::from_secs(6), || {
        let (ok, seen) = round_without(&cl, vip, "-");
        ok && seen.contains(&vname) && tasks_everywhere(&cl).iter().all(|t| *t == all)
    });
    assert!(back, "{vname} not back within 6 s\n{}", cl.logs());
    eprintln!(
        "vxlan: {vname} back on 3 hosts {:.2?} after its health listener restarted",
        restarted.elapsed()
    );

    // No healthy backend at all: the VIP refuses at once (reset, ICMP),
    // although every service port still listens.
    for m in &mut cl.members {
        drop(m.health.take());
    }
    let all_down = Instant::now();
    let ok = wait(Duration::from_secs(6), || {
        (0..3).all(|h| {
            cl.service(h, SERVICE)
                .is_some_and(|s| s.backends.iter().all(|b| !b.healthy))
        })
    });
    assert!(
        ok,
        "not every backend unhealthy: {:?}",
        cl.service(0, SERVICE)
    );
    let targets = [
        Target {
            proto: Protocol::Tcp,
            addr: vip,
            port: TCP_PORT,
        },
        Target {
            proto: Protocol::Udp,
            addr: vip,
            port: UDP_PORT,
        },
    ];
    let mut last = Vec::new();
    let refused = wait(Duration::from_secs(3), || {
        last = cl
            .clients
            .iter()
            .flat_map(|c| probe_all(Some(&c.path()), &targets, PROBE_TIMEOUT))
            .collect();
        last.iter().all(|o| *o == Outcome::Refused)
    });
    assert!(
        refused,
        "the VIP without healthy backends: {last:?}\n{}",
        cl.logs()
    );
    eprintln!(
        "vxlan: all unhealthy -> VIP refuses ({:.2?} after the listeners stopped)",
        all_down.elapsed()
    );
    for c in &cl.clients {
        let t = Instant::now();
        let got = probe_all(Some(&c.path()), &targets, Duration::from_secs(3));
        let took = t.elapsed();
        assert_eq!(got, vec![Outcome::Refused; 2], "{}", c.container_name());
        assert!(took < Duration::from_millis(500), "refusal took {took:?}");
    }
    assert!(
        tasks_everywhere(&cl).iter().all(Vec::is_empty),
        "tasks.web.shop still answers: {:?}",
        tasks_everywhere(&cl)
    );
    eprintln!("health_takes_containers_out_and_back: {:.1?}", t0.elapsed());
}

/// A UDP socket in `c` bound to `port`, connected to `vip`:53.
fn udp_flow(c: &Container, port: u16, vip: Ipv4Addr) -> UdpSocket {
    in_netns(c.path(), || {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).unwrap();
        s.connect(SocketAddrV4::new(vip, UDP_PORT)).unwrap();
        s
    })
}

/// Sends one datagram on the flow and returns the tag of the answer
/// (`None`: no answer within `timeout`).
fn ask(s: &UdpSocket, timeout: Duration) -> Option<String> {
    s.set_read_timeout(Some(timeout)).unwrap();
    s.send(b"probe").ok()?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf).ok()?;
    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
    answered_by(&Outcome::Answered(line)).map(str::to_owned)
}

#[test]
fn udp_flow_moves_when_its_backend_is_deleted() {
    weft_tests::require_root!();
    let _serial = serial();
    let t0 = Instant::now();
    // Four members on host 1; clients on host 0 (the flow's conntrack entry
    // is on another host than the backend) and host 1 (the same host).
    let mut cl = Cluster::new(2, "vxlan", &[1, 1, 1, 1]);
    let vip = cl.vip();
    cl.await_backends(vip);
    for (h, port) in [(0usize, 40_000u16), (1, 40_001)] {
        let flow = udp_flow(&cl.clients[h], port, vip);
        let first = ask(&flow, PROBE_TIMEOUT).expect("the flow is answered");
        // Conntrack keeps the flow on its backend.
        for _ in 0..5 {
            assert_eq!(ask(&flow, PROBE_TIMEOUT).as_deref(), Some(first.as_str()));
        }
        let i = cl.members.iter().position(|m| m.name == first).unwrap();
        cl.delete_member(i);
        let deleted = Instant::now();
        let mut next = None;
        while deleted.elapsed() < Duration::from_secs(5) {
            if let Some(tag) = ask(&flow, Duration::from_millis(20)) {
                next = Some(tag);
                break;
            }
        }
        let took = deleted.elapsed();
        let next = next.unwrap_or_else(|| {
            panic!(
                "client-{h}: the flow from port {port} is not answered 5 s after {first}'s DEL\n{}",
                cl.logs()
            )
        });
        eprintln!(
            "vxlan: client-{h} (host {h}) udp :{port} -> {vip}: {first} deleted, answered by {next} {took:.2?} later"
        );
        assert_ne!(next, first);
        assert!(
            cl.attached().any(|m| m.name == next),
            "answered by {next}, not attached"
        );
        assert!(
            took < Duration::from_secs(1),
            "the flow moved only after {took:?}"
        );
        for _ in 0..5 {
            assert_eq!(ask(&flow, PROBE_TIMEOUT).as_deref(), Some(next.as_str()));
        }
    }
    eprintln!(
        "udp_flow_moves_when_its_backend_is_deleted: {:.1?}",
        t0.elapsed()
    );
}

#[test]
fn vip_stable_and_dnsrr() {
    weft_tests::require_root!();
    let _serial = serial();
    let t0 = Instant::now();
    let mut cl = Cluster::new(2, "wireguard", &[0, 1]);
    let vip = cl.vip();
    cl.await_backends(vip);

    // Every netd restarts: same VIP, still balanced.
    for netd in &mut cl.netds {
        netd.restart().unwrap();
    }
    assert_eq!(cl.vip(), vip, "VIP changed across netd restarts");
    cl.await_backends(vip);
    await_dns(&cl.clients[0], SERVICE, &[vip], Duration::from_secs(5));

    // Every container of the service deleted and new ones created (within
    // the grace): same VIP, only the new containers answer.
    cl.delete_member(0);
    cl.delete_member(1);
    let ok = wait(Duration::from_secs(5), || {
        cl.service(0, SERVICE)
            .is_some_and(|s| s.backends.is_empty() && s.empty_since_ms.is_some())
    });
    assert!(
        ok,
        "an empty service: {:?}\n{}",
        cl.service(0, SERVICE),
        cl.logs()
    );
    assert_eq!(cl.service(1, SERVICE).unwrap().vip, Some(vip));
    cl.add_member(1, "");
    cl.add_member(0, "");
    assert_eq!(cl.vip(), vip, "VIP changed across re-creation");
    cl.await_backends(vip);
    // The reconcilers clear the mark (they look every second).
    let ok = wait(Duration::from_secs(5), || {
        (0..2).all(|h| {
            cl.service(h, SERVICE)
                .is_some_and(|s| s.empty_since_ms.is_none())
        })
    });
    assert!(ok, "still marked empty: {:?}", cl.service(0, SERVICE));

    // dnsrr: no VIP; the service's name answers the containers.
    cl.set(1, SERVICE, &["--mode", "dnsrr"]);
    let ok = wait(Duration::from_secs(5), || {
        (0..2).all(|h| {
            cl.service(h, SERVICE)
                .is_some_and(|s| s.spec.mode == Mode::Dnsrr && s.vip.is_none())
        })
    });
    assert!(ok, "dnsrr: {:?}", cl.service(0, SERVICE));
    let addrs: Vec<Ipv4Addr> = cl.attached().map(|m| m.ip).collect();
    for c in &cl.clients {
        await_dns(c, SERVICE, &addrs, Duration::from_secs(3));
        await_dns(c, "web.shop.weft.internal", &addrs, Duration::from_secs(1));
    }
    // The old VIP is no service any more: refused at once, not black-holed.
    let t = Instant::now();
    let got = cl.round(&cl.clients[0], vip, Protocol::Tcp, 1);
    assert_eq!(got, vec![Outcome::Refused], "the former VIP {vip}");
    assert!(t.elapsed() < Duration::from_millis(500));

    // WEFT_SERVICE_MODE=dnsrr on a service's first container.
    let api = cl.lab.container(0, "api-0").unwrap();
    let api_ip = cl.attach(
        0,
        &api,
        "ctr-api-0",
        "IgnoreUnknown=1;WEFT_NAME=api-0;WEFT_SERVICE=api;WEFT_STACK=shop;WEFT_SERVICE_MODE=dnsrr",
    );
    let ok = wait(Duration::from_secs(5), || {
        cl.service(1, "api.shop")
            .is_some_and(|s| s.spec.mode == Mode::Dnsrr && s.vip.is_none())
    });
    assert!(ok, "api.shop: {:?}", cl.service(1, "api.shop"));
    await_dns(
        &cl.clients[1],
        "api.shop",
        &[api_ip],
        Duration::from_secs(3),
    );
    eprintln!("vip_stable_and_dnsrr: {:.1?}", t0.elapsed());
}

#[test]
fn range_full_and_vip_freed_after_grace() {
    weft_tests::require_root!();
    let _serial = serial();
    let t0 = Instant::now();
    // A /30 has two VIPs (.1 and .2); the grace is 2 s.
    let range = "10.43.7.0/30";
    let cl = Cluster::with_flags(
        1,
        "vxlan",
        &[],
        &[
            &format!("--service-range={range}"),
            "--service-grace-secs=2",
        ],
    );
    let client = &cl.clients[0];
    let mut containers = Vec::new();
    let mut servers = Vec::new();
    for svc in ["a", "b", "c"] {
        let name = format!("{svc}-0");
        let c = cl.lab.container(0, &name).unwrap();
        let ip = cl.attach(
            0,
            &c,
            &format!("ctr-{name}"),
            &format!("IgnoreUnknown=1;WEFT_NAME={name};WEFT_SERVICE={svc};WEFT_STACK=shop"),
        );
        servers.push(ProbeServer::start(Some(&c.path()), &name, &[TCP_PORT], &[UDP_PORT]).unwrap());
        containers.push((c, ip));
    }
    let vip_of = |svc: &str| cl.service(0, &format!("{svc}.shop")).and_then(|s| s.vip);
    let mut vips = Vec::new();
    for svc in ["a", "b"] {
        let mut got = None;
        assert!(
            wait(Duration::from_secs(5), || {
                got = vip_of(svc);
                got.is_some()
            }),
            "{svc}.shop has no VIP: {:?}",
            cl.services(0)
        );
        vips.push(got.unwrap());
    }
    vips.sort();
    let want: Vec<Ipv4Addr> = vec!["10.43.7.1".parse().unwrap(), "10.43.7.2".parse().unwrap()];
    assert_eq!(vips, want);

    // The third service works without a VIP (its name answers its
    // container) and says why.
    let c_info = cl.service(0, "c.shop").unwrap();
    assert_eq!(c_info.vip, None);
    let problem = c_info.problem.clone().unwrap_or_default();
    assert!(
        problem.contains("full") && problem.contains(range),
        "c.shop: {c_info:?}"
    );
    eprintln!("c.shop without a VIP: {problem}");
    await_dns(client, "c.shop", &[containers[2].1], Duration::from_secs(3));
    let out = cl.netds[0]
        .cli(&["service", "set", "c.shop", "--mode", "vip"])
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "set --mode vip on a full range: {text}"
    );
    assert!(text.contains("full") && text.contains(range), "{text}");
    eprintln!("netd service set c.shop --mode vip: {}", text.trim());

    // a's only container goes: after the grace a's record and VIP are
    // gone, and c gets the freed VIP.
    let a_vip = vip_of("a").unwrap();
    let out = CniCall {
        host: cl.netds[0].host(),
        command: "DEL",
        container_id: "ctr-a-0",
        netns: &containers[0].0.path().display().to_string(),
        ifname: "eth0",
        args: "IgnoreUnknown=1",
        config: &cl.netds[0].cni_config("1.0.0"),
    }
    .run()
    .unwrap();
    assert!(out.ok(), "DEL a-0: {}{}", out.stdout, out.stderr);
    let deleted = Instant::now();
    let freed = wait(Duration::from_secs(10), || {
        cl.service(0, "a.shop").is_none() && vip_of("c") == Some(a_vip)
    });
    assert!(
        freed,
        "a.shop's VIP not freed for c.shop: {:?}\n{}",
        cl.services(0),
        cl.logs()
    );
    let took = deleted.elapsed();
    eprintln!(
        "a.shop gone and {a_vip} given to c.shop {took:.1?} after its last container (grace 2 s)"
    );
    assert!(
        took >= Duration::from_secs(2),
        "freed before the grace: {took:?}"
    );
    await_dns(client, "c.shop", &[a_vip], Duration::from_secs(3));
    let mut got = Vec::new();
    assert!(
        wait(Duration::from_secs(3), || {
            got = cl.round(client, a_vip, Protocol::Tcp, 5);
            got.iter().all(|o| answered_by(o) == Some("c-0"))
        }),
        "{a_vip} now c.shop's: {got:?}"
    );
    eprintln!("range_full_and_vip_freed_after_grace: {:.1?}", t0.elapsed());
}

/// Applies a policy document through host `h`'s netd.
fn apply_policy(cl: &Cluster, h: usize, policy: &str) {
    let file = cl.netds[h].dir().join("test-policy.toml");
    std::fs::write(&file, policy).unwrap();
    let out = cl.netds[h]
        .cli(&["policy", "apply", &file.display().to_string()])
        .unwrap();
    assert!(
        out.status.success(),
        "policy apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether every client's probes of `vip:port` (TCP, 8 each) are all
/// answered (`Some(true)`), all unanswered (`Some(false)`), or mixed.
fn vip_open(cl: &Cluster, vip: Ipv4Addr, port: u16) -> Option<bool> {
    let target = Target {
        proto: Protocol::Tcp,
        addr: vip,
        port,
    };
    let got: Vec<bool> = cl
        .clients
        .iter()
        .flat_map(|c| probe_all(Some(&c.path()), &[target; 8], Duration::from_millis(300)))
        .map(|o| o.answered())
        .collect();
    if got.iter().all(|&a| a) {
        Some(true)
    } else if got.iter().all(|&a| !a) {
        Some(false)
    } else {
        None
    }
}

#[test]
fn policy_applies_after_dnat() {
    weft_tests::require_root!();
    let _serial = serial();
    let t0 = Instant::now();
    // A member on each host: each client reaches one on its own host and
    // one on the other through the VIP.
    let cl = Cluster::new(2, "wireguard", &[0, 1]);
    let vip = cl.vip();
    cl.await_backends(vip);
    assert_eq!(vip_open(&cl, vip, HEALTH_PORT), Some(true));

    // Default deny: the clients' stack (ops) reaches no backend through
    // the VIP, on either host.
    apply_policy(&cl, 0, "default = \"deny\"\n");
    let closed = wait(Duration::from_secs(3), || {
        vip_open(&cl, vip, TCP_PORT) == Some(false)
    });
    assert!(closed, "deny: the VIP still answers\n{}", cl.logs());
    assert_eq!(vip_open(&cl, vip, HEALTH_PORT), Some(false));

    // A rule from ops to shop/web on tcp/80 opens exactly that port of
    // the VIP's backends.
    apply_policy(
        &cl,
        1,
        "default = \"deny\"\n\n[[rules]]\nname = \"ops-to-web\"\nfrom = \"ops\"\nto = \"shop/web\"\nports = [\"tcp/80\"]\n",
    );
    let open = wait(Duration::from_secs(3), || {
        vip_open(&cl, vip, TCP_PORT) == Some(true)
    });
    assert!(open, "the rule does not open the VIP's port\n{}", cl.logs());
    assert_eq!(
        vip_open(&cl, vip, HEALTH_PORT),
        Some(false),
        "only the rule's port opens"
    );
    cl.await_backends(vip);
    eprintln!("policy_applies_after_dnat: {:.1?}", t0.elapsed());
}
