//! Services (issue 12): what a virtual IP costs per packet, and how the
//! kernel's balancing (`table ip weft_svc`) behaves as services grow.
//!
//! **Through the VIP vs direct** (two lab hosts, netd on VXLAN: the
//! kernel's data path, so a userspace tunnel does not hide the cost of the
//! DNAT): a client container on h0, the one container of `web.bench` on
//! h1. iperf3 TCP (one stream) and ping p99 from the client to the
//! service's VIP and to the container's own address, interleaved run by
//! run; both reach the same container, the VIP through one map lookup, a
//! `numgen` pick and a DNAT on h0 (the target: VIP ≥ 0.97 ×
//! direct).
//!
//! **Scale** (one lab host, one real netd on an SQLite store): the real
//! client and a real backend (`web.bench`, one container) on h0, plus `N`
//! simulated services of [`Options::backends`] simulated endpoint records
//! each on 100 simulated hosts, written straight to the store as other
//! hosts' netds would (service record, VIP claim, endpoints). For each `N`,
//! smallest first: netd is stopped, the records that take the store from
//! the previous size to `N` are written, netd is started again and
//! * **load**: the time from its start until the kernel has the slots of
//!   the last simulated service (the whole table written in one
//!   transaction); netd's own time per apply (`services table applied
//!   took_ms`, its debug log) is kept too, split into replacements (the
//!   first load and the 30 s resync) and in-place updates;
//! * **update**: one simulated backend record added to / removed from one
//!   service (the middle one), written to the store → `nft get element ip
//!   weft_svc slots { <vip> . 0, ... }` shows / no longer shows the backend
//!   (polled back to back; one poll's duration is reported as the
//!   resolution). At most [`CHANGE_BUDGET`] per size is spent on changes
//!   (at least two are timed);
//! * **first packet**: the time of a new TCP connection (connect: SYN to
//!   SYN-ACK) from the client to the real service's VIP and, interleaved, to
//!   its container's address directly, with the table holding `N`
//!   services: flat in `N` is the goal (one map lookup per new
//!   connection).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weft_model::{
    ContainerId, DnsConfig, DnsName, EndpointRecord, HostId, IfName, Keys, ServiceName,
    ServiceRecord, ServiceSpec,
};
use weft_store::{SqliteStore, Store};
use weft_tests::probe::{probe, ProbeServer, Target};
use weft_tests::weft::{CniCall, Netd};
use weft_tests::{Container, Lab, LabOptions, Netns};

use weft_netd::nft::services::{backends_listed, slot_query};
use weft_netd::nft::SERVICES_TABLE;

use crate::policy::{iperf_gbps, ping_p99};
use crate::svg::{hbar, Chart};
use crate::sys::{percentile, Fig};

/// The port the real backends answer on (probes and connects).
const PORT: u16 = 80;
/// Simulated hosts the simulated endpoints are spread over.
const SIM_HOSTS: usize = 100;
/// The stack of the simulated services.
const SIM_STACK: &str = "sim";
/// The first simulated VIP: far above what netd gives the real services
/// (the lowest free address of 10.43.0.0/16).
const SIM_VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 43, 128, 1);
/// The first simulated endpoint address (nothing routes to them).
const SIM_ADDR_BASE: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 1);
/// How long one change, or one load, may take before the size gives up.
const DEADLINE: Duration = Duration::from_secs(600);
/// Time spent on changes per size, beyond which no new one starts.
const CHANGE_BUDGET: Duration = Duration::from_secs(240);
/// The netd log filter: info, and the balancer's apply times.
const LOG_LEVEL: &str = "--log-level=info,weft_netd::services::lb=debug";

#[derive(Debug, Clone)]
pub struct Options {
    /// Simulated service counts, measured smallest first.
    pub sizes: Vec<usize>,
    /// Backends (simulated endpoint records) per simulated service.
    pub backends: usize,
    /// Changes timed per size (adds and removes alternating).
    pub changes: usize,
    /// New TCP connections per path (VIP, direct) per size.
    pub connects: usize,
    pub runs: usize,
    pub secs: u32,
    pub pings: u32,
}

/// One size of the scale test.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScaleRow {
    /// Simulated services (the table has 2 real ones more).
    pub services: usize,
    /// Simulated endpoint records.
    pub endpoints: usize,
    /// Seconds writing the records this size added (netd stopped).
    pub fill_s: Option<f64>,
    /// Seconds from netd's start until the kernel had the last service.
    pub load_s: Option<f64>,
    /// netd's own seconds per replacement of the table (its log).
    pub replace_s: Fig,
    /// netd's own seconds per in-place update of the table (its log).
    pub update_s: Fig,
    /// Seconds from a backend record written to its chain in the kernel.
    pub added_s: Fig,
    /// Seconds from a backend record deleted to its chain gone.
    pub removed_s: Fig,
    /// Seconds one `nft get element` poll took (the resolution).
    pub poll_s: Fig,
    /// Connect time to the VIP, ms, p50 and p99.
    pub connect_vip_p50_ms: Option<f64>,
    pub connect_vip_p99_ms: Option<f64>,
    /// Connect time to the container's address, ms, p50 and p99.
    pub connect_direct_p50_ms: Option<f64>,
    pub connect_direct_p99_ms: Option<f64>,
    /// Why this size stopped early, if it did.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServicesResults {
    pub backends: usize,
    pub secs: u32,
    pub pings: u32,
    pub connects: usize,
    pub tcp_gbps_direct: Fig,
    pub tcp_gbps_vip: Fig,
    pub ping_p99_ms_direct: Fig,
    pub ping_p99_ms_vip: Fig,
    pub scale: Vec<ScaleRow>,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}×", a / b),
        _ => "n/a".into(),
    }
}

fn num(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{:.digits$}", v * scale))
}

fn runs(fig: &Fig, scale: f64, digits: usize) -> String {
    match fig.get() {
        Some(v) => format!(
            "{:.digits$} ({})",
            v * scale,
            fig.runs
                .iter()
                .map(|r| format!("{:.digits$}", r * scale))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "n/a".into(),
    }
}

impl ServicesResults {
    /// Every figure, for the report's completeness check.
    pub fn figures(&self) -> Vec<(String, Option<f64>)> {
        let mut v = vec![
            ("TCP direct".to_string(), self.tcp_gbps_direct.get()),
            ("TCP via VIP".to_string(), self.tcp_gbps_vip.get()),
            ("ping p99 direct".to_string(), self.ping_p99_ms_direct.get()),
            ("ping p99 via VIP".to_string(), self.ping_p99_ms_vip.get()),
        ];
        for r in &self.scale {
            let n = r.services;
            v.extend([
                (format!("{n} services: load"), r.load_s),
                (format!("{n} services: backend added"), r.added_s.get()),
                (format!("{n} services: backend removed"), r.removed_s.get()),
                (
                    format!("{n} services: connect via VIP"),
                    r.connect_vip_p50_ms,
                ),
                (
                    format!("{n} services: connect direct"),
                    r.connect_direct_p50_ms,
                ),
            ]);
        }
        v
    }

    /// The report's section; `chart` gives the Markdown of a chart by name.
    pub fn markdown(&self, chart: &dyn Fn(&str) -> String) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## Services\n");
        let _ = writeln!(
            s,
            "Through a VIP vs to the container's address: two hosts on VXLAN, a client on h0, the one container of the service on h1; iperf3 TCP 1 stream for {} s and {} pings per run, runs interleaved (target: VIP ≥ 0.97 × direct).\n",
            self.secs, self.pings
        );
        let _ = writeln!(s, "| figure | direct | via VIP | VIP ÷ direct |");
        let _ = writeln!(s, "|---|---|---|---|");
        let _ = writeln!(
            s,
            "| TCP Gbit/s (runs) | {} | {} | {} |",
            runs(&self.tcp_gbps_direct, 1.0, 2),
            runs(&self.tcp_gbps_vip, 1.0, 2),
            ratio(self.tcp_gbps_vip.get(), self.tcp_gbps_direct.get())
        );
        let _ = writeln!(
            s,
            "| ping p99 ms (runs) | {} | {} | {} |\n",
            runs(&self.ping_p99_ms_direct, 1.0, 3),
            runs(&self.ping_p99_ms_vip, 1.0, 3),
            ratio(self.ping_p99_ms_vip.get(), self.ping_p99_ms_direct.get())
        );
        let _ = writeln!(
            s,
            "Scale: one host, one real netd; N simulated services of {} backends each (records in the store), plus 2 real ones. Load: netd started → the last service's slots in the kernel. Backend added / removed: the record written → `nft get element` of the VIP's slots shows it (poll: one lookup's time, the resolution). netd's own apply times come from its debug log (replace: first load and the 30 s resync; update: in place). Connect: {} new TCP connections per path from the client to a real local container, via its VIP and directly, interleaved.\n",
            self.backends, self.connects
        );
        let _ = writeln!(
            s,
            "| services | load s | netd replace s (runs) | netd update ms (median, n) | backend added ms (runs) | backend removed ms (runs) | poll ms | connect p50 ms VIP / direct | connect p99 ms VIP / direct | p50 VIP ÷ direct |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for r in &self.scale {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} (n={}) | {} | {} | {} | {} / {} | {} / {} | {} |",
                r.services,
                num(r.load_s, 1.0, 2),
                runs(&r.replace_s, 1.0, 2),
                num(r.update_s.get(), 1e3, 1),
                r.update_s.runs.len(),
                runs(&r.added_s, 1e3, 0),
                runs(&r.removed_s, 1e3, 0),
                num(r.poll_s.get(), 1e3, 1),
                num(r.connect_vip_p50_ms, 1.0, 3),
                num(r.connect_direct_p50_ms, 1.0, 3),
                num(r.connect_vip_p99_ms, 1.0, 3),
                num(r.connect_direct_p99_ms, 1.0, 3),
                ratio(r.connect_vip_p50_ms, r.connect_direct_p50_ms),
            );
        }
        s.push('\n');
        for r in self.scale.iter().filter(|r| r.error.is_some()) {
            let _ = writeln!(
                s,
                "- {} services stopped early: {}",
                r.services,
                r.error.as_deref().unwrap_or_default()
            );
        }
        for r in &self.scale {
            let _ = writeln!(
                s,
                "- {} services: {} endpoint records written in {} s",
                r.services,
                r.endpoints,
                num(r.fill_s, 1.0, 1)
            );
        }
        s.push('\n');
        s.push_str(&chart("services"));
        s.push_str(&chart("services-update"));
        s
    }

    /// The charts: first-packet latency by size (the flatness claim), and
    /// load and update times by size.
    pub fn charts(&self) -> Vec<(String, String)> {
        let label = |r: &ScaleRow| format!("{} services", r.services);
        let groups: Vec<(String, Vec<Option<f64>>)> = self
            .scale
            .iter()
            .map(|r| {
                (
                    label(r),
                    vec![
                        r.connect_vip_p50_ms,
                        r.connect_direct_p50_ms,
                        r.connect_vip_p99_ms,
                        r.connect_direct_p99_ms,
                    ],
                )
            })
            .collect();
        let first = hbar(&Chart {
            title: "First packet: TCP connect to a VIP vs direct, by services in the table",
            subtitle: &format!(
                "{} backends per service, {} connections per path, one host",
                self.backends, self.connects
            ),
            unit: "milliseconds (lower is better; flat is the goal)",
            series: &[
                ("p50 via VIP", "#2b6cb0"),
                ("p50 direct", "#9e9e9e"),
                ("p99 via VIP", "#6a51a3"),
                ("p99 direct", "#cfcfcf"),
            ],
            groups: &groups,
            decimals: 3,
        });
        let groups: Vec<(String, Vec<Option<f64>>)> = self
            .scale
            .iter()
            .map(|r| (label(r), vec![r.load_s, r.added_s.get(), r.removed_s.get()]))
            .collect();
        let update = hbar(&Chart {
            title: "Services: table load and one backend change, by services",
            subtitle: "written to the store → seen in the kernel (nft get element), median",
            unit: "seconds (lower is better)",
            series: &[
                ("full load (netd start)", "#9e9e9e"),
                ("backend added", "#2b6cb0"),
                ("backend removed", "#6a51a3"),
            ],
            groups: &groups,
            decimals: 3,
        });
        vec![
            ("services".to_string(), first),
            ("services-update".to_string(), update),
        ]
    }
}

/// CNI ADD of `c` as `name` in `service.bench`; its address.
fn attach(netd: &Netd, c: &Container, name: &str, service: &str) -> Result<Ipv4Addr> {
    let out = CniCall {
        host: netd.host(),
        command: "ADD",
        container_id: name,
        netns: &c.path().display().to_string(),
        ifname: "eth0",
        args: &format!("IgnoreUnknown=1;WEFT_NAME={name};WEFT_STACK=bench;WEFT_SERVICE={service}"),
        config: &netd.cni_config("1.0.0"),
    }
    .run()?;
    if !out.ok() {
        bail!("CNI ADD {name}: {}{}", out.stdout, out.stderr);
    }
    Ok(out.address()?)
}

/// The VIP netd gave `service.bench` (waits for its record).
fn vip_of(rt: &tokio::runtime::Runtime, store: &SqliteStore, service: &str) -> Result<Ipv4Addr> {
    let name = ServiceName::new(service, Some("bench"))?;
    let key = Keys::default().service(&name);
    let t0 = Instant::now();
    loop {
        if let Some(kv) = rt.block_on(store.get(&key))? {
            let record: ServiceRecord = serde_json::from_slice(&kv.value)?;
            if let Some(vip) = record.vip {
                return Ok(vip);
            }
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("{name} got no VIP within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Probes `addr`:[`PORT`] from `from` until it answers.
fn reachable(from: &Path, addr: Ipv4Addr) -> Result<()> {
    let target = Target {
        proto: weft_model::Protocol::Tcp,
        addr,
        port: PORT,
    };
    let t0 = Instant::now();
    weft_tests::in_netns(from, || loop {
        if probe(&target, Duration::from_millis(200)).answered() {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("{target} not answering after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    })
}

/// VIP vs direct, interleaved: see the module docs.
fn through_vip(o: &Options, r: &mut ServicesResults) -> Result<()> {
    let lab = Lab::new(LabOptions::hosts(2))?;
    let db = lab.dir().join("store.db");
    let store_url = format!("sqlite:{}", db.display());
    let netds = (0..2)
        .map(|i| Netd::start(&lab, i, &store_url, &["--backend=vxlan"]))
        .collect::<weft_tests::Result<Vec<_>>>()?;
    let client = lab.container(0, "client")?;
    let web = lab.container(1, "web")?;
    attach(&netds[0], &client, "client", "client")?;
    let web_ip = attach(&netds[1], &web, "web", "web")?;
    let _server = ProbeServer::start(Some(&web.path()), "web", &[PORT], &[])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = SqliteStore::open(&db)?;
    let vip = vip_of(&rt, &store, "web")?;
    reachable(&client.path(), web_ip)?;
    reachable(&client.path(), vip)?;
    eprintln!("services: web.bench {web_ip}, VIP {vip}");
    for run in 0..o.runs {
        // Alternate which path goes first.
        let order = if run % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for via_vip in order {
            let to = if via_vip { vip } else { web_ip };
            let gbps = iperf_gbps(&client, &web, to, o.secs)?;
            let p99 = ping_p99(&client, to, o.pings)?;
            eprintln!(
                "services {}: {gbps:.2} Gbit/s, ping p99 {p99:.3} ms",
                if via_vip { "via VIP" } else { "direct" }
            );
            if via_vip {
                r.tcp_gbps_vip.push(gbps);
                r.ping_p99_ms_vip.push(p99);
            } else {
                r.tcp_gbps_direct.push(gbps);
                r.ping_p99_ms_direct.push(p99);
            }
        }
    }
    Ok(())
}

fn sim_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(SIM_VIP_BASE) + i as u32)
}

fn sim_service(i: usize) -> Result<ServiceName> {
    Ok(ServiceName::new(&format!("s{i}"), Some(SIM_STACK))?)
}

/// Simulated endpoint `k` of service `i`; `k == backends` is the extra one
/// the update test adds and removes.
fn sim_endpoint(i: usize, k: usize, backends: usize) -> Result<(String, EndpointRecord)> {
    let n = i * (backends + 1) + k;
    let addr = Ipv4Addr::from(u32::from(SIM_ADDR_BASE) + n as u32);
    let host = format!("sim-{}", n % SIM_HOSTS);
    let id = format!("sim-{i}-{k}");
    let record = EndpointRecord {
        container_id: ContainerId::new(id.as_str())?,
        ifname: IfName::new("eth0")?,
        netns: String::new(),
        host_id: HostId::new(host.as_str())?,
        address: format!("{addr}/24").parse()?,
        gateway: Ipv4Addr::from((u32::from(addr) & !0xff) | 1),
        mtu: 1450,
        bridge: IfName::new("weft0")?,
        name: Some(DnsName::new(&id)?),
        service: Some(DnsName::new(format!("s{i}"))?),
        stack: Some(DnsName::new(SIM_STACK)?),
        aliases: Vec::new(),
        port_mappings: Vec::new(),
        dns: DnsConfig::default(),
        created_at_ms: 0,
    };
    Ok((Keys::default().endpoint(&host, &id, "eth0"), record))
}

/// Writes services `from..to` with their claims and backends, the way
/// netds on other hosts would; how many endpoint records it wrote.
async fn fill(store: &SqliteStore, from: usize, to: usize, backends: usize) -> Result<usize> {
    let keys = Keys::default();
    let mut written = 0;
    for i in from..to {
        let name = sim_service(i)?;
        let vip = sim_vip(i);
        store
            .put(&keys.vip(vip), name.to_string().as_bytes(), None)
            .await?;
        let record = ServiceRecord {
            name: name.clone(),
            vip: Some(vip),
            spec: ServiceSpec::default(),
            empty_since_ms: None,
        };
        store
            .put(&keys.service(&name), &serde_json::to_vec(&record)?, None)
            .await?;
        for k in 0..backends {
            let (key, record) = sim_endpoint(i, k, backends)?;
            store.put(&key, &serde_json::to_vec(&record)?, None).await?;
            written += 1;
        }
    }
    Ok(written)
}

/// The backends the kernel's `slots` map holds for `vip` in `host` (`nft
/// get element`: one lookup per slot, whatever the table's size), `None`
/// when it has none; and how long it took.
fn list_slots(host: &Netns, vip: Ipv4Addr) -> Result<(Option<BTreeSet<Ipv4Addr>>, Duration)> {
    let t0 = Instant::now();
    let query = slot_query(vip);
    let out = host.output([
        "nft",
        "get",
        "element",
        "ip",
        SERVICES_TABLE,
        "slots",
        query.as_str(),
    ])?;
    let took = t0.elapsed();
    Ok((
        out.status
            .success()
            .then(|| backends_listed(&String::from_utf8_lossy(&out.stdout))),
        took,
    ))
}

/// Polls `vip`'s slots until `done` holds for its backends; the time since
/// `t0` of the poll that saw it start, and every poll's duration.
fn until_slots(
    host: &Netns,
    vip: Ipv4Addr,
    t0: Instant,
    done: impl Fn(Option<&BTreeSet<Ipv4Addr>>) -> bool,
) -> Result<(Duration, Vec<Duration>)> {
    let mut polls = Vec::new();
    loop {
        let started = t0.elapsed();
        let (backends, took) = list_slots(host, vip)?;
        polls.push(took);
        if done(backends.as_ref()) {
            return Ok((started, polls));
        }
        if t0.elapsed() > DEADLINE {
            bail!("the slots of {vip} not as expected after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// netd's apply times from its log: (replacements, updates), seconds.
fn applies(log: &str) -> (Vec<f64>, Vec<f64>) {
    let (mut replaced, mut updated) = (Vec::new(), Vec::new());
    for line in log.lines().filter(|l| l.contains("services table applied")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
        };
        let Some(ms) = field("took_ms=").and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if field("replaced=").as_deref() == Some("true") {
            replaced.push(ms / 1e3);
        } else {
            updated.push(ms / 1e3);
        }
    }
    (replaced, updated)
}

/// New TCP connections from `from`, alternating between `vip` and
/// `direct`: each one's connect time in ms, per path.
fn connects(
    from: &Path,
    vip: Ipv4Addr,
    direct: Ipv4Addr,
    n: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    weft_tests::in_netns(from, || {
        let (mut v, mut d) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..2 * n {
            let via_vip = i % 2 == 0;
            let to = SocketAddr::from((if via_vip { vip } else { direct }, PORT));
            let t0 = Instant::now();
            let stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .with_context(|| format!("connecting to {to}"))?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            drop(stream);
            if via_vip { &mut v } else { &mut d }.push(ms);
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok((v, d))
    })
}

/// One size of the scale test, netd already running with its records.
fn measure_size(
    o: &Options,
    rt: &tokio::runtime::Runtime,
    store: &SqliteStore,
    netd: &Netd,
    real: (&Path, Ipv4Addr, Ipv4Addr),
    row: &mut ScaleRow,
) -> Result<()> {
    let (client, vip, web_ip) = real;
    let n = row.services;
    reachable(client, vip)?;
    // Warm up (neighbours, ARP) before timing connections.
    connects(client, vip, web_ip, 3)?;
    let (v, d) = connects(client, vip, web_ip, o.connects)?;
    row.connect_vip_p50_ms = Some(percentile(&v, 0.5));
    row.connect_vip_p99_ms = Some(percentile(&v, 0.99));
    row.connect_direct_p50_ms = Some(percentile(&d, 0.5));
    row.connect_direct_p99_ms = Some(percentile(&d, 0.99));
    eprintln!(
        "services {n}: connect p50 VIP {:.3} ms, direct {:.3} ms",
        percentile(&v, 0.5),
        percentile(&d, 0.5)
    );
    // One backend added to and removed from the middle service.
    let target = n / 2;
    let target_vip = sim_vip(target);
    let (key, record) = sim_endpoint(target, o.backends, o.backends)?;
    let be = record.address.ip();
    let value = serde_json::to_vec(&record)?;
    let started = Instant::now();
    for i in 0..o.changes {
        if i >= 2 && started.elapsed() > CHANGE_BUDGET {
            eprintln!(
                "services {n}: {i} changes in {:?}; no more",
                started.elapsed()
            );
            break;
        }
        let add = i % 2 == 0;
        let t0 = Instant::now();
        if add {
            rt.block_on(store.put(&key, &value, None))?;
        } else {
            rt.block_on(store.delete(&key))?;
        }
        let (took, polls) = until_slots(netd.host(), target_vip, t0, |backends| {
            backends.is_some_and(|b| b.contains(&be)) == add
        })?;
        for p in polls {
            row.poll_s.push(p.as_secs_f64());
        }
        if add {
            row.added_s.push(took.as_secs_f64());
        } else {
            row.removed_s.push(took.as_secs_f64());
        }
        eprintln!(
            "services {n}: backend {} in {:.1} ms",
            if add { "added" } else { "removed" },
            took.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// The scale test: see the module docs.
fn scale(o: &Options, r: &mut ServicesResults) -> Result<()> {
    let lab = Lab::new(LabOptions::hosts(1))?;
    let db = lab.dir().join("store.db");
    let store_url = format!("sqlite:{}", db.display());
    let mut netd = Netd::start(&lab, 0, &store_url, &["--backend=vxlan", LOG_LEVEL])?;
    let client = lab.container(0, "client")?;
    let web = lab.container(0, "web")?;
    attach(&netd, &client, "client", "client")?;
    let web_ip = attach(&netd, &web, "web", "web")?;
    let _server = ProbeServer::start(Some(&web.path()), "web", &[PORT], &[])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = SqliteStore::open(&db)?;
    let vip = vip_of(&rt, &store, "web")?;
    reachable(&client.path(), vip)?;
    let mut sizes = o.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let mut have = 0;
    for &n in &sizes {
        let mut row = ScaleRow {
            services: n,
            endpoints: n * o.backends,
            ..ScaleRow::default()
        };
        // Written while netd is stopped: the table is then loaded once.
        netd.stop()?;
        let t0 = Instant::now();
        eprintln!(
            "services {n}: writing {} services of {} backends",
            n - have,
            o.backends
        );
        rt.block_on(fill(&store, have, n, o.backends))?;
        row.fill_s = Some(t0.elapsed().as_secs_f64());
        have = n;
        let t0 = Instant::now();
        netd.start_again()?;
        let last = sim_vip(n - 1);
        let outcome = until_slots(netd.host(), last, t0, |b| b.is_some()).and_then(|(took, _)| {
            row.load_s = Some(took.as_secs_f64());
            eprintln!("services {n}: loaded in {:.2} s", took.as_secs_f64());
            measure_size(
                o,
                &rt,
                &store,
                &netd,
                (&client.path(), vip, web_ip),
                &mut row,
            )
        });
        let (replaced, updated) = applies(&netd.log());
        for s in replaced {
            row.replace_s.push(s);
        }
        for s in updated {
            row.update_s.push(s);
        }
        if let Err(e) = outcome {
            eprintln!("services {n}: {e:#}");
            row.error = Some(format!("{e:#}"));
            r.scale.push(row);
            break;
        }
        r.scale.push(row);
    }
    // With a 110,000-chain table netd's clean stop can outlast the
    // harness's wait (it was SIGKILLed once): the figures are kept anyway.
    if let Err(e) = netd.stop() {
        eprintln!("services: netd did not stop cleanly: {e}");
    }
    Ok(())
}

pub fn run(o: &Options) -> Result<ServicesResults> {
    let mut r = ServicesResults {
        backends: o.backends,
        secs: o.secs,
        pings: o.pings,
        connects: o.connects,
        ..ServicesResults::default()
    };
    through_vip(o, &mut r)?;
    scale(o, &mut r)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn apply_times_come_from_the_log() {
        let log = "2026-11-29T12:00:00Z DEBUG weft_netd::services::lb: services table applied took_ms=1520 replaced=true services=12 endpoints=102\n\
                   x INFO other line took_ms=9\n\
                   2026-11-29T12:00:01Z DEBUG weft_netd::services::lb: services table applied took_ms=12 replaced=false services=12 endpoints=103\n";
        assert_eq!(applies(log), (vec![1.52], vec![0.012]));
    }

    #[test]
    fn simulated_records_do_not_collide() {
        let (k1, a) = sim_endpoint(0, 10, 10).unwrap();
        let (k2, b) = sim_endpoint(1, 0, 10).unwrap();
        assert_ne!(k1, k2);
        assert_ne!(a.address.ip(), b.address.ip());
        assert_eq!(ServiceName::of(&a), Some(sim_service(0).unwrap()));
        assert_eq!(sim_vip(0), Ipv4Addr::new(10, 43, 128, 1));
        assert!(sim_vip(9_999) < Ipv4Addr::new(10, 43, 255, 255));
    }
}
