//! DNS rate: weft's dnsd beside dnsmasq and unbound (Debian packages),
//! serving the same names, measured with dnsperf in one run, all on
//! 127.0.0.1 (loopback only, free high ports, bounded run times).
//!
//! The names: `--services` services (10 per stack), each with two
//! containers. dnsd reads them from an SQLite store like netd writes them;
//! dnsmasq gets a hosts file, unbound `local-data`. The query mix:
//! 35 % service FQDN (`svc3.stack7.weft.internal`), 25 % short service
//! (`svc3.stack7`), 15 % container FQDN, 15 % PTR, 10 % NXDOMAIN in the
//! domain. Every server is checked to answer each kind correctly first.
//!
//! Figures: saturated queries/s (dnsperf with many outstanding queries),
//! p99 latency at a fixed rate (dnsperf `-Q`, per-query latencies from
//! `-v`), and the server's CPU time per query (utime + stime from
//! /proc/PID/stat over the saturated run, divided by answered queries).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weft_store::{SqliteStore, Store};

use crate::sys::Fig;

const DOMAIN: &str = "weft.internal";

pub struct Options {
    pub services: usize,
    pub seconds: u32,
    pub latency_qps: u32,
    pub latency_seconds: u32,
    /// dnsperf clients (sockets) and threads for the saturated run.
    pub clients: u32,
    pub threads: u32,
    /// Server threads for dnsd and unbound (dnsmasq has one).
    pub server_threads: u32,
    /// Repeat every measurement this many times (servers interleaved).
    pub runs: usize,
    /// A 1 s dnsperf run per server before measuring.
    pub warmup: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerResult {
    pub name: String,
    pub qps: Fig,
    /// Queries lost in the saturated run / at the fixed rate.
    pub lost_saturated: Fig,
    pub lost_fixed: Fig,
    /// Milliseconds at the fixed rate.
    pub p50_ms: Fig,
    pub p99_ms: Fig,
    pub cpu_us_per_query: Fig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DnsResults {
    pub services: usize,
    pub names: usize,
    pub seconds: u32,
    pub latency_qps: u32,
    pub latency_seconds: u32,
    pub clients: u32,
    pub threads: u32,
    pub server_threads: u32,
    pub runs: usize,
    /// weft dnsd first, then unbound and dnsmasq.
    pub servers: Vec<ServerResult>,
}

struct Service {
    stack: String,
    name: String,
    containers: Vec<(String, Ipv4Addr)>,
}

fn plan(services: usize) -> Vec<Service> {
    let mut out = Vec::with_capacity(services);
    let mut n = 0u32;
    for i in 0..services {
        let stack = format!("stack{}", i / 10);
        let name = format!("svc{}", i % 10);
        let mut containers = Vec::new();
        for k in 0..2 {
            // 250 addresses per /24 block, from 10.42.0.2 on.
            let addr = Ipv4Addr::new(10, 42, (n / 250) as u8, (2 + n % 250) as u8);
            n += 1;
            containers.push((format!("{name}-{k}"), addr));
        }
        out.push(Service {
            stack,
            name,
            containers,
        });
    }
    out
}

/// A deterministic generator for the query mix.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn ptr_name(a: Ipv4Addr) -> String {
    let o = a.octets();
    format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    ServiceFqdn,
    ServiceShort,
    ContainerFqdn,
    Ptr,
    NxDomain,
}

fn query_for(kind: Kind, s: &Service, k: usize, salt: u64) -> (String, &'static str) {
    match kind {
        Kind::ServiceFqdn => (format!("{}.{}.{DOMAIN}", s.name, s.stack), "A"),
        Kind::ServiceShort => (format!("{}.{}", s.name, s.stack), "A"),
        Kind::ContainerFqdn => (format!("{}.{}.{DOMAIN}", s.containers[k].0, s.stack), "A"),
        Kind::Ptr => (ptr_name(s.containers[k].1), "PTR"),
        Kind::NxDomain => (format!("nosuch{}.{}.{DOMAIN}", salt % 1000, s.stack), "A"),
    }
}

fn query_file(plan: &[Service], path: &Path, lines: usize) -> Result<()> {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut text = String::with_capacity(lines * 40);
    for _ in 0..lines {
        let r = rng.below(100);
        let kind = match r {
            0..=34 => Kind::ServiceFqdn,
            35..=59 => Kind::ServiceShort,
            60..=74 => Kind::ContainerFqdn,
            75..=89 => Kind::Ptr,
            _ => Kind::NxDomain,
        };
        let s = &plan[rng.below(plan.len())];
        let k = rng.below(2);
        let salt = rng.next();
        let (name, t) = query_for(kind, s, k, salt);
        let _ = writeln!(text, "{name} {t}");
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

async fn fill_store(plan: &[Service], path: &Path) -> Result<()> {
    let store = SqliteStore::open(path)?;
    for s in plan {
        for (cname, addr) in &s.containers {
            let id = format!("{}-{cname}", s.stack);
            let ep = serde_json::json!({
                "container_id": id, "ifname": "eth0", "netns": "", "host_id": "bench",
                "address": format!("{addr}/24"), "gateway": "10.42.0.1", "mtu": 1420,
                "bridge": "weft0", "name": cname, "service": s.name, "stack": s.stack,
                "aliases": [], "dns": {"nameservers": [], "domain": DOMAIN, "search": []},
                "created_at_ms": 0
            });
            store
                .put(
                    &weft_model::Keys::default().endpoint("bench", &id, "eth0"),
                    &serde_json::to_vec(&ep)?,
                    None,
                )
                .await?;
        }
    }
    Ok(())
}

fn dnsmasq_hosts(plan: &[Service], path: &Path) -> Result<()> {
    let mut text = String::new();
    for s in plan {
        for (cname, addr) in &s.containers {
            // The first name is what PTR answers.
            let _ = writeln!(
                text,
                "{addr} {cname}.{st}.{DOMAIN} {svc}.{st}.{DOMAIN} {svc}.{st} {cname}.{st}",
                st = s.stack,
                svc = s.name
            );
        }
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn unbound_conf(plan: &[Service], dir: &Path, port: u16, threads: u32) -> Result<PathBuf> {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{dir}\"\n  pidfile: \"{dir}/unbound.pid\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  num-threads: {threads}\n  so-reuseport: yes\n  access-control: 127.0.0.0/8 allow\n  do-ip6: no\n  module-config: \"iterator\"\n  rrset-roundrobin: yes\n  minimal-responses: yes\n  local-zone: \"{DOMAIN}.\" static\n  local-zone: \"42.10.in-addr.arpa.\" static",
        dir = dir.display()
    );
    let mut stacks: Vec<&str> = plan.iter().map(|s| s.stack.as_str()).collect();
    stacks.dedup();
    for st in stacks {
        let _ = writeln!(c, "  local-zone: \"{st}.\" static");
    }
    for s in plan {
        for (cname, addr) in &s.containers {
            let st = &s.stack;
            let svc = &s.name;
            let _ = writeln!(c, "  local-data: \"{svc}.{st}.{DOMAIN}. 1 IN A {addr}\"");
            let _ = writeln!(c, "  local-data: \"{svc}.{st}. 1 IN A {addr}\"");
            let _ = writeln!(c, "  local-data: \"{cname}.{st}.{DOMAIN}. 1 IN A {addr}\"");
            let _ = writeln!(c, "  local-data-ptr: \"{addr} 1 {cname}.{st}.{DOMAIN}.\"");
        }
    }
    c.push_str("remote-control:\n  control-enable: no\n");
    let path = dir.join("unbound.conf");
    std::fs::write(&path, c).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A server process, killed when dropped.
struct Server {
    name: &'static str,
    port: u16,
    child: Child,
}

impl Server {
    fn spawn(name: &'static str, port: u16, cmd: &mut Command) -> Result<Server> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        crate::sys::register_child(child.id());
        Ok(Server { name, port, child })
    }

    fn cpu_ticks(&self) -> Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name (which may hold spaces): state is
        // field 3; utime and stime are fields 14 and 15.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("odd /proc stat")?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = f.get(11).context("no utime")?.parse()?;
        let stime: u64 = f.get(12).context("no stime")?.parse()?;
        Ok(utime + stime)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        crate::sys::unregister_child(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    // Free for both UDP and TCP, as far as one can tell without holding it.
    for _ in 0..50 {
        let u = UdpSocket::bind("127.0.0.1:0")?;
        let port = u.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port on 127.0.0.1")
}

/// Asks `server` one query; (rcode, answer count).
fn ask(server: SocketAddr, name: &str, qtype: &str) -> Result<(u8, u16)> {
    let t: u16 = if qtype == "PTR" { 12 } else { 1 };
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in name.split('.') {
        q.push(l.len() as u8);
        q.extend(l.as_bytes());
    }
    q.push(0);
    q.extend(t.to_be_bytes());
    q.extend(1u16.to_be_bytes());
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.send_to(&q, server)?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf)?;
    if n < 12 || buf[0..2] != q[0..2] {
        bail!("bad answer");
    }
    Ok((buf[3] & 0xF, u16::from_be_bytes([buf[6], buf[7]])))
}

fn wait_ready(s: &mut Server, plan: &[Service]) -> Result<()> {
    let probe = &plan[plan.len() - 1];
    let (name, t) = query_for(Kind::ContainerFqdn, probe, 1, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((0, n)) = ask(s.addr(), &name, t) {
            if n > 0 {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = s.child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = s.child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            bail!("{} exited ({status}): {err}", s.name);
        }
        if Instant::now() > deadline {
            bail!("{} does not answer {name}", s.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every kind of query gets the right kind of answer.
fn check_answers(s: &Server, plan: &[Service]) -> Result<()> {
    for (i, svc) in plan.iter().enumerate().step_by(plan.len() / 7 + 1) {
        for kind in [
            Kind::ServiceFqdn,
            Kind::ServiceShort,
            Kind::ContainerFqdn,
            Kind::Ptr,
            Kind::NxDomain,
        ] {
            let (name, t) = query_for(kind, svc, i % 2, i as u64);
            let (rcode, answers) = ask(s.addr(), &name, t)?;
            let want_answers = match kind {
                Kind::ServiceFqdn | Kind::ServiceShort => 2,
                Kind::NxDomain => 0,
                _ => 1,
            };
            let want_rcode = if kind == Kind::NxDomain { 3 } else { 0 };
            if rcode != want_rcode || answers != want_answers {
                bail!(
                    "{} answers {name} {t} with rcode {rcode} and {answers} records (want {want_rcode}, {want_answers})",
                    s.name
                );
            }
        }
    }
    Ok(())
}

struct Perf {
    qps: f64,
    completed: u64,
    lost: u64,
}

fn field<'a>(out: &'a str, label: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|r| r.split_whitespace().next())
}

fn dnsperf(s: &Server, queries: &Path, args: &[String]) -> Result<String> {
    let out = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &s.port.to_string(), "-d"])
        .arg(queries)
        .args(args)
        .output()
        .context("running dnsperf (apt-get install dnsperf)")?;
    if !out.status.success() {
        bail!("dnsperf failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn saturate(s: &Server, queries: &Path, o: &Options) -> Result<(Perf, f64)> {
    let before = s.cpu_ticks()?;
    let out = dnsperf(
        s,
        queries,
        &[
            "-l".into(),
            o.seconds.to_string(),
            "-c".into(),
            o.clients.to_string(),
            "-T".into(),
            o.threads.to_string(),
            "-q".into(),
            "1000".into(),
            "-t".into(),
            "2".into(),
        ],
    )?;
    let after = s.cpu_ticks()?;
    let qps: f64 = field(&out, "Queries per second:")
        .context("no qps in dnsperf output")?
        .parse()?;
    let completed: u64 = field(&out, "Queries completed:")
        .context("no completed count")?
        .parse()?;
    let lost: u64 = field(&out, "Queries lost:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let hz = crate::sys::clk_tck();
    let cpu_us = (after - before) as f64 / hz * 1e6 / completed.max(1) as f64;
    Ok((
        Perf {
            qps,
            completed,
            lost,
        },
        cpu_us,
    ))
}

/// p50 and p99 in milliseconds at a fixed rate.
fn latency(s: &Server, queries: &Path, o: &Options) -> Result<(f64, f64, u64)> {
    let out = dnsperf(
        s,
        queries,
        &[
            "-l".into(),
            o.latency_seconds.to_string(),
            "-Q".into(),
            o.latency_qps.to_string(),
            "-c".into(),
            "2".into(),
            "-q".into(),
            "2000".into(),
            "-t".into(),
            "2".into(),
            "-v".into(),
        ],
    )?;
    // Verbose lines: "> NOERROR name type latency".
    let mut lat: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with('>'))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    if lat.is_empty() {
        bail!("dnsperf -v printed no latencies");
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize] * 1000.0;
    let lost: u64 = field(&out, "Queries lost:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((p(0.5), p(0.99), lost))
}

fn dnsd_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no exe dir")?;
    let path = dir.join("dnsd");
    if !path.exists() {
        let release = dir.ends_with("release");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-p", "weft-dnsd", "--bin", "dnsd"]);
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().context("running cargo build")?;
        if !st.success() || !path.exists() {
            bail!(
                "no dnsd at {}: cargo build --release -p weft-dnsd",
                path.display()
            );
        }
    }
    Ok(path)
}

pub async fn run(o: Options) -> Result<DnsResults> {
    for tool in ["dnsperf", "dnsmasq", "unbound"] {
        if !crate::sys::have(tool) {
            bail!("{tool} missing: apt-get install dnsperf dnsmasq-base unbound");
        }
    }
    let dnsd = dnsd_binary()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    let plan = plan(o.services);
    let db = dir.join("store.db");
    fill_store(&plan, &db).await?;
    tokio::task::spawn_blocking(move || measure(&o, &plan, &dir, &db, &dnsd)).await?
}

fn measure(
    o: &Options,
    plan: &[Service],
    dir: &Path,
    db: &Path,
    dnsd: &Path,
) -> Result<DnsResults> {
    let queries = dir.join("queries.txt");
    query_file(plan, &queries, 100_000)?;
    let hosts = dir.join("hosts");
    dnsmasq_hosts(plan, &hosts)?;

    let port = free_port()?;
    let mut weft = Server::spawn(
        "weft dnsd",
        port,
        Command::new(dnsd)
            .arg(format!("--store=sqlite:{}", db.display()))
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!(
                "--resolv-conf={}",
                dir.join("no-resolv.conf").display()
            ))
            .arg(format!("--udp-threads={}", o.server_threads))
            .env("RUST_LOG", "warn"),
    )?;
    wait_ready(&mut weft, plan)?;
    let port = free_port()?;
    let mut dnsmasq = Server::spawn(
        "dnsmasq",
        port,
        Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--cache-size=10000",
                "--pid-file=",
                "--local=/weft.internal/",
                "--local=/42.10.in-addr.arpa/",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", hosts.display())),
    )?;
    wait_ready(&mut dnsmasq, plan)?;
    let port = free_port()?;
    let conf = unbound_conf(plan, dir, port, o.server_threads)?;
    let mut unbound = Server::spawn(
        "unbound",
        port,
        Command::new("unbound").arg("-d").arg("-c").arg(&conf),
    )?;
    wait_ready(&mut unbound, plan)?;

    let servers = [&weft, &unbound, &dnsmasq];
    for s in servers {
        check_answers(s, plan)?;
        if !o.warmup {
            continue;
        }
        let _ = dnsperf(
            s,
            &queries,
            &["-l".into(), "1".into(), "-q".into(), "100".into()],
        )?;
    }
    let mut results: Vec<ServerResult> = servers
        .iter()
        .map(|s| ServerResult {
            name: s.name.to_owned(),
            ..ServerResult::default()
        })
        .collect();
    for run in 0..o.runs {
        eprintln!("weft-bench: DNS run {}/{}", run + 1, o.runs);
        // Rotate the order so that no server always goes first.
        for k in 0..servers.len() {
            let i = (k + run) % servers.len();
            let (perf, cpu) = saturate(servers[i], &queries, o)?;
            let r = &mut results[i];
            r.qps.push(perf.qps);
            r.lost_saturated.push(perf.lost as f64);
            r.cpu_us_per_query.push(cpu);
            let _ = perf.completed;
        }
        for k in 0..servers.len() {
            let i = (k + run) % servers.len();
            let (p50, p99, lost) = latency(servers[i], &queries, o)?;
            let r = &mut results[i];
            r.p50_ms.push(p50);
            r.p99_ms.push(p99);
            r.lost_fixed.push(lost as f64);
        }
    }
    Ok(DnsResults {
        services: plan.len(),
        names: plan.len() * 7,
        seconds: o.seconds,
        latency_qps: o.latency_qps,
        latency_seconds: o.latency_seconds,
        clients: o.clients,
        threads: o.threads,
        server_threads: o.server_threads,
        runs: o.runs,
        servers: results,
    })
}
