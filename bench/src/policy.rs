//! Network policy at scale (issue 11): how long a change written to the
//! store takes to be enforced on a host, and what enforcement costs per
//! packet (container-to-container TCP throughput and ping p99 with policy
//! on vs off, interleaved in one run).
//!
//! ```text
//!  h0: netd (VXLAN: the kernel's data path, so that the cost of the
//!      policy lookups is not hidden behind a userspace tunnel),
//!      containers a (stack bench-a) and c (stack bench-c)
//!  h1: netd, container  b (stack bench-b): iperf3, ping and probe target
//!  store (SQLite): + <endpoints> simulated endpoint records of <stacks>
//!                  stacks on 100 simulated hosts, and the policy
//! ```
//!
//! * **on**: default deny, every stack declared (`within_stack = allow`),
//!   `<rules>` rules between the simulated stacks, then the rule that lets
//!   a reach b (last, the worst place for a rule list; no ports, so ping
//!   passes too). c has no rule: c → b is refused.
//! * **off**: no stacks and no rules, default allow (what a cluster without
//!   a policy runs); the simulated endpoints stay.
//! * Update latency: the a → b rule is taken out and put back, each time
//!   the document written to the store directly (as `netd policy apply`
//!   would); the clock runs from the write until a TCP probe from a to b
//!   changes its outcome (probes back to back; a refused probe waits
//!   [`PROBE`], a close counts from the first of two refused probes in a
//!   row, the second waiting [`CONFIRM`]). Measured on the full-size policy.
//! * netd deletes the conntrack entries of the pairs a change denies in the
//!   background (one listing, then a delete per pair that has entries);
//!   after each switch the bench waits until none runs ([`settle`]) and
//!   reports how long that took, so the throughput and ping figures are the
//!   per-packet cost.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weft_model::{
    Action, ContainerId, DnsConfig, DnsName, EndpointRecord, HostId, IfName, Keys, Policy, Rule,
    StackPolicy,
};
use weft_store::{SqliteStore, Store};
use weft_tests::probe::{probe, ProbeServer, Target};
use weft_tests::weft::{CniCall, Netd};
use weft_tests::{Container, Lab, LabOptions, Netns};

use crate::sys::{percentile, Fig};

/// A probe's wait: the lab's round trip over the kernel's VXLAN is well
/// under a millisecond.
const PROBE: Duration = Duration::from_millis(10);
/// The wait of the probe that confirms a close.
const CONFIRM: Duration = Duration::from_millis(300);
/// The port b's probe server answers on.
const PROBE_PORT: u16 = 5300;
/// How long one change may take before the run gives up.
const DEADLINE: Duration = Duration::from_secs(30);
/// Simulated hosts the endpoints are spread over.
const SIM_HOSTS: usize = 100;

#[derive(Debug, Clone)]
pub struct Options {
    pub stacks: usize,
    pub endpoints: usize,
    pub rules: usize,
    /// Rule removals + additions timed (each counts once).
    pub changes: usize,
    pub runs: usize,
    pub secs: u32,
    pub pings: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyResults {
    pub stacks: usize,
    pub endpoints: usize,
    pub rules: usize,
    /// Seconds from writing the full policy (policy off before) until a
    /// probe sees it enforced.
    pub first_load_s: Option<f64>,
    /// Seconds from a write to enforcement: a rule removed (deny).
    pub deny_s: Fig,
    /// Seconds from a write to enforcement: a rule added (allow).
    pub allow_s: Fig,
    pub tcp_gbps_off: Fig,
    pub tcp_gbps_on: Fig,
    pub ping_p99_ms_off: Fig,
    pub ping_p99_ms_on: Fig,
    /// Seconds `conntrack` processes kept running after the switch from
    /// off to on (netd's background cut of the pairs the change denied).
    #[serde(default)]
    pub cut_s: Fig,
}

impl PolicyResults {
    /// Every figure, for the report's completeness check.
    pub fn figures(&self) -> Vec<(&'static str, Option<f64>)> {
        vec![
            ("first load", self.first_load_s),
            ("rule removed -> refused", self.deny_s.get()),
            ("rule added -> answered", self.allow_s.get()),
            ("TCP policy off", self.tcp_gbps_off.get()),
            ("TCP policy on", self.tcp_gbps_on.get()),
            ("ping p99 policy off", self.ping_p99_ms_off.get()),
            ("ping p99 policy on", self.ping_p99_ms_on.get()),
        ]
    }

    pub fn markdown(&self) -> String {
        let f = |fig: &Fig, scale: f64, digits: usize| match fig.get() {
            Some(v) => format!(
                "{:.digits$} (runs: {})",
                v * scale,
                fig.runs
                    .iter()
                    .map(|r| format!("{:.digits$}", r * scale))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => "not measured".into(),
        };
        let ratio = match (self.tcp_gbps_on.get(), self.tcp_gbps_off.get()) {
            (Some(on), Some(off)) if off > 0.0 => format!("{:.3}", on / off),
            _ => "not measured".into(),
        };
        let load = self
            .first_load_s
            .map_or("not measured".into(), |s| format!("{:.0}", s * 1e3));
        format!(
            "## Policy\n\n{} stacks, {} simulated endpoints, {} rules (+ the a → b rule, last).\n\n\
             | figure | median |\n|---|---|\n\
             | first load: policy written → enforced on h1 (ms) | {load} |\n\
             | rule removed → refused (ms) | {} |\n\
             | rule added → answered (ms) | {} |\n\
             | TCP a → b, policy off (Gbit/s) | {} |\n\
             | TCP a → b, policy on (Gbit/s) | {} |\n\
             | on / off throughput | {ratio} |\n\
             | conntrack cut after off → on, before measuring (s) | {} |\n\
             | ping p99, policy off (ms) | {} |\n\
             | ping p99, policy on (ms) | {} |\n",
            self.stacks,
            self.endpoints,
            self.rules,
            f(&self.deny_s, 1e3, 1),
            f(&self.allow_s, 1e3, 1),
            f(&self.tcp_gbps_off, 1.0, 2),
            f(&self.tcp_gbps_on, 1.0, 2),
            f(&self.cut_s, 1.0, 1),
            f(&self.ping_p99_ms_off, 1.0, 3),
            f(&self.ping_p99_ms_on, 1.0, 3),
        )
    }
}

/// The stack of simulated endpoint `i` (10 per stack, two per service).
fn sim_party(i: usize, stacks: usize) -> (String, String) {
    (
        format!("s{}", i % stacks),
        format!("svc{}", (i / stacks) % 5),
    )
}

/// The full policy; `with_ab`: the a → b rule at the end.
pub fn full_policy(o: &Options, with_ab: bool) -> Policy {
    let allow = StackPolicy {
        within_stack: Some(Action::Allow),
        ..StackPolicy::default()
    };
    let mut stacks: std::collections::BTreeMap<String, StackPolicy> = (0..o.stacks)
        .map(|s| (format!("s{s}"), allow.clone()))
        .collect();
    for s in ["bench-a", "bench-b", "bench-c"] {
        stacks.insert(s.into(), StackPolicy::default());
    }
    let mut rules: Vec<Rule> = (0..o.rules)
        .map(|i| Rule {
            name: format!("r{i}"),
            from: weft_model::Selector::Stack(format!("s{}", i % o.stacks.max(1))),
            to: weft_model::Selector::Service(
                format!("s{}", (i * 7 + 1) % o.stacks.max(1)),
                format!("svc{}", i % 5),
            ),
            ports: vec![weft_model::PortSpec {
                proto: if i % 2 == 0 {
                    weft_model::Protocol::Tcp
                } else {
                    weft_model::Protocol::Udp
                },
                port: 1000 + (i % 1000) as u16,
            }],
        })
        .collect();
    if with_ab {
        rules.push(Rule {
            name: "a-to-b".into(),
            from: weft_model::Selector::Stack("bench-a".into()),
            to: weft_model::Selector::Stack("bench-b".into()),
            ports: vec![],
        });
    }
    Policy {
        default: Action::Deny,
        stacks,
        rules,
    }
}

/// Writes `endpoints` simulated endpoint records, the way netds on other
/// hosts would.
async fn fill_endpoints(store: &SqliteStore, o: &Options) -> Result<()> {
    let keys = Keys::default();
    let per_host = o.endpoints.div_ceil(SIM_HOSTS).max(1);
    for i in 0..o.endpoints {
        let (h, k) = (i / per_host, i % per_host);
        // 10.42.64.0/18 and up: far from the lab hosts' blocks.
        let n = (64u32 << 8) + (h as u32) * 256 + 2 + k as u32;
        let addr = Ipv4Addr::new(10, 42, (n >> 8) as u8, (n & 0xff) as u8);
        let (stack, service) = sim_party(i, o.stacks.max(1));
        let host = format!("sim-{h}");
        let id = format!("sim-{i}");
        let record = EndpointRecord {
            container_id: ContainerId::new(id.as_str())?,
            ifname: IfName::new("eth0")?,
            netns: String::new(),
            host_id: HostId::new(host.as_str())?,
            address: format!("{addr}/24").parse()?,
            gateway: Ipv4Addr::new(10, 42, (n >> 8) as u8, 1),
            mtu: 1420,
            bridge: IfName::new("weft0")?,
            name: Some(DnsName::new(&id)?),
            service: Some(DnsName::new(&service)?),
            stack: Some(DnsName::new(&stack)?),
            aliases: Vec::new(),
            port_mappings: Vec::new(),
            dns: DnsConfig::default(),
            created_at_ms: 0,
        };
        store
            .put(
                &keys.endpoint(&host, &id, "eth0"),
                &serde_json::to_vec(&record)?,
                None,
            )
            .await?;
    }
    Ok(())
}

async fn write_policy(store: &SqliteStore, policy: &Policy) -> Result<()> {
    policy.validate()?;
    store
        .put(
            &Keys::default().policy_doc(),
            &serde_json::to_vec(policy)?,
            None,
        )
        .await?;
    Ok(())
}

fn attach(netd: &Netd, c: &Container, name: &str, stack: &str) -> Result<Ipv4Addr> {
    let out = CniCall {
        host: netd.host(),
        command: "ADD",
        container_id: name,
        netns: &c.path().display().to_string(),
        ifname: "eth0",
        args: &format!("IgnoreUnknown=1;WEFT_NAME={name};WEFT_STACK={stack};WEFT_SERVICE=main"),
        config: &netd.cni_config("1.0.0"),
    }
    .run()?;
    if !out.ok() {
        bail!("CNI ADD {name}: {}{}", out.stdout, out.stderr);
    }
    Ok(out.address()?)
}

/// Probes from `from` to `to`'s probe port until the outcome is `open`;
/// the time from `t0` until the first probe that saw it began (for a
/// close: the first of two unanswered probes in a row, the second waiting
/// [`CONFIRM`], so that one slow answer does not count as a close).
fn until(from: &Path, to: Ipv4Addr, open: bool, t0: Instant) -> Result<Duration> {
    let target = Target {
        proto: weft_model::Protocol::Tcp,
        addr: to,
        port: PROBE_PORT,
    };
    weft_tests::in_netns(from, || {
        let mut closed_since = None;
        loop {
            let started = t0.elapsed();
            // A close is confirmed with a long wait: a slow answer on a
            // busy machine must not count as one.
            let wait = if closed_since.is_some() {
                CONFIRM
            } else {
                PROBE
            };
            let answered = probe(&target, wait).answered();
            match (open, answered) {
                (true, true) => return Ok(started),
                (false, false) => match closed_since {
                    Some(first) => return Ok(first),
                    None => closed_since = Some(started),
                },
                (false, true) => closed_since = None,
                (true, false) => {}
            }
            if t0.elapsed() > DEADLINE {
                bail!(
                    "{target} still {} after {DEADLINE:?}",
                    if open { "refused" } else { "answered" }
                );
            }
            if answered {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    })
}

/// Waits until no `conntrack` process has run for half a second (at most
/// `limit`); how long it waited.
fn settle(limit: Duration) -> Duration {
    let t0 = Instant::now();
    let mut quiet_since = Instant::now();
    while t0.elapsed() < limit {
        if conntrack_running() {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_millis(500) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    quiet_since.duration_since(t0)
}

fn conntrack_running() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == "conntrack")
    })
}

/// iperf3 TCP, one stream, `client` → `ip` (served in `server`); Gbit/s
/// received.
pub(crate) fn iperf_gbps(client: &Netns, server: &Netns, ip: Ipv4Addr, secs: u32) -> Result<f64> {
    let mut srv = server.spawn(["iperf3", "-s", "-1", "-p", "5201"])?;
    weft_tests::wait_until(Duration::from_secs(5), "iperf3 listening", || {
        server
            .output(["ss", "-ltnH", "sport = :5201"])
            .map(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
            .unwrap_or(false)
    })?;
    let out = client.output([
        "iperf3",
        "-c",
        &ip.to_string(),
        "-p",
        "5201",
        "-t",
        &secs.to_string(),
        "-J",
        "--connect-timeout",
        "3000",
    ])?;
    let _ = srv.wait_timeout(Duration::from_secs(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    Ok(v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 reported no throughput")?
        / 1e9)
}

/// The p99 round trip of `count` pings 10 ms apart, ms.
pub(crate) fn ping_p99(client: &Netns, ip: Ipv4Addr, count: u32) -> Result<f64> {
    let out = client.output([
        "ping",
        "-c",
        &count.to_string(),
        "-i",
        "0.01",
        "-W",
        "1",
        &ip.to_string(),
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    if rtts.is_empty() {
        bail!("ping got no replies: {text}");
    }
    Ok(percentile(&rtts, 0.99))
}

pub fn run(o: &Options) -> Result<PolicyResults> {
    let lab = Lab::new(LabOptions::hosts(2))?;
    let db = lab.dir().join("store.db");
    let store_url = format!("sqlite:{}", db.display());
    let netds = (0..2)
        .map(|i| Netd::start(&lab, i, &store_url, &["--backend=vxlan"]))
        .collect::<weft_tests::Result<Vec<_>>>()?;
    let a = lab.container(0, "a")?;
    let c = lab.container(0, "c")?;
    let b = lab.container(1, "b")?;
    attach(&netds[0], &a, "a", "bench-a")?;
    attach(&netds[0], &c, "c", "bench-c")?;
    let b_ip = attach(&netds[1], &b, "b", "bench-b")?;
    let _server = ProbeServer::start(Some(&b.path()), "b", &[PROBE_PORT], &[])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = SqliteStore::open(&db)?;
    let mut r = PolicyResults {
        stacks: o.stacks,
        endpoints: o.endpoints,
        rules: o.rules,
        ..PolicyResults::default()
    };
    let (a_ns, c_ns) = (a.path(), c.path());
    // Both sources have reached b once (neighbour entries, tunnel peers).
    until(&a_ns, b_ip, true, Instant::now())?;
    until(&c_ns, b_ip, true, Instant::now())?;
    eprintln!("policy: writing {} simulated endpoints", o.endpoints);
    rt.block_on(fill_endpoints(&store, o))?;
    let on = full_policy(o, true);
    let off = Policy::default();
    // First load: from off to the full policy, seen when c loses b.
    let t0 = Instant::now();
    rt.block_on(write_policy(&store, &on))?;
    r.first_load_s = Some(until(&c_ns, b_ip, false, t0)?.as_secs_f64());
    until(&a_ns, b_ip, true, Instant::now())?;
    eprintln!(
        "policy: first load {:?}; conntrack cut of the pairs it denied: {:?}",
        r.first_load_s,
        settle(Duration::from_secs(300))
    );
    let without = full_policy(o, false);
    for i in 0..o.changes {
        let t0 = Instant::now();
        rt.block_on(write_policy(&store, &without))?;
        r.deny_s.push(until(&a_ns, b_ip, false, t0)?.as_secs_f64());
        let t0 = Instant::now();
        rt.block_on(write_policy(&store, &on))?;
        r.allow_s.push(until(&a_ns, b_ip, true, t0)?.as_secs_f64());
        eprintln!(
            "policy: change {i}: deny {:.1} ms, allow {:.1} ms",
            r.deny_s.runs[i] * 1e3,
            r.allow_s.runs[i] * 1e3
        );
    }
    // Per-packet cost: off and on, interleaved run by run.
    for _ in 0..o.runs {
        for policy_on in [false, true] {
            let t0 = Instant::now();
            rt.block_on(write_policy(&store, if policy_on { &on } else { &off }))?;
            until(&c_ns, b_ip, !policy_on, t0)?;
            // netd deletes the conntrack entries of the pairs a change
            // denies in the background, one `conntrack` run per pair: let
            // that finish (and say how long it took) so the figures below
            // are the per-packet cost only.
            let cut = settle(Duration::from_secs(if o.endpoints > 2000 {
                300
            } else {
                60
            }));
            if policy_on {
                r.cut_s.push(cut.as_secs_f64());
            }
            let gbps = iperf_gbps(&a, &b, b_ip, o.secs)?;
            let p99 = ping_p99(&a, b_ip, o.pings)?;
            eprintln!(
                "policy {}: {gbps:.2} Gbit/s, ping p99 {p99:.3} ms",
                if policy_on { "on" } else { "off" }
            );
            if policy_on {
                r.tcp_gbps_on.push(gbps);
                r.ping_p99_ms_on.push(p99);
            } else {
                r.tcp_gbps_off.push(gbps);
                r.ping_p99_ms_off.push(p99);
            }
        }
    }
    Ok(r)
}
