//! The control plane at scale (issue 16), `weft-bench scale`: one real
//! netd (WireGuard backend) in a lab host, N simulated hosts in the store.
//!
//! ```text
//!  lab host h0: netd --backend=wireguard --cluster-range=10.64.0.0/13 --block-prefix=26
//!  store (etcd in the lab's underlay namespace, or the embedded SQLite file):
//!      hosts/host0   netd's own record (its block, leased by IPAM)
//!      hosts/sim-<i> N simulated records, no lease: WireGuard, a public key,
//!                    another /26 of the range, underlay 198.18.0.0/15
//! ```
//!
//! The simulated underlay addresses lead nowhere: h0's only route out goes
//! to the lab's underlay switch, a namespace that forwards nothing and has
//! no route to 198.18.0.0/15 (checked before each run), so netd's
//! handshake attempts never leave the lab.
//!
//! For each store and each N (a fresh lab, store and netd each time):
//! 1. **burst**: the N records written in batches ([`sim::Writer::burst`]);
//!    the time from the last write answered until `weft-wg` has a route
//!    for every simulated block (`ip route show dev weft-wg`, every 20 ms);
//!    netd's CPU over the burst and its RSS after;
//! 2. **join / leave**: one more record written, then deleted; the time
//!    until `ip route get` of its block goes into / leaves `weft-wg`;
//! 3. **idle**: netd's CPU and log lines over a window with nothing
//!    changing (handshake lines apart);
//! 4. **cold start**: netd stopped (SIGTERM) and its device deleted, as on
//!    a fresh boot, then started again with the N records in the store:
//!    the time from the process start to all routes, and from its log line
//!    that it read the hosts.
//!
//! Results and the Markdown/charts are in [`results`]; what is read from
//! the kernel, `/proc` and the log in [`observe`]; the simulated records
//! and the store writer in [`sim`].

pub(crate) mod observe;
mod results;
mod sim;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use ipnetwork::Ipv4Network;
use weft_store::testing::EtcdServer;
use weft_store::SqliteStore;
use weft_tests::weft::Netd;
use weft_tests::{Lab, LabOptions, Netns};

use crate::sys::CpuMeter;
pub use results::{slope, ScaleResults, StoreKind};
use results::{ScaleRow, StoreResults};
use sim::{SimHost, Writer};

/// How often the route dump is polled during a burst or a cold start.
const POLL: Duration = Duration::from_millis(20);
/// How long a join or leave may take.
const CHANGE_LIMIT: Duration = Duration::from_secs(30);
/// The settled idle window (see [`Options::settle`]).
const SETTLED_WINDOW: Duration = Duration::from_secs(60);
/// Seconds after the burst before the settled idle window: past the last
/// handshake retry to a peer that never answers (netd backs them off: 5,
/// 10, 20, 40, 80 s; it gives up at 155 s).
const DEFAULT_SETTLE_S: u64 = 165;
/// The host id the lab harness gives netd on h0.
const NETD_HOST: &str = "host0";

#[derive(Debug, Clone)]
pub struct Options {
    /// Simulated host counts, smallest first.
    pub sizes: Vec<usize>,
    pub stores: Vec<StoreKind>,
    /// Records per etcd transaction / per batch of SQLite puts.
    pub batch: usize,
    /// The pause between two batches of the burst (0: back to back).
    pub pace: Duration,
    /// Joins and leaves timed per size.
    pub changes: usize,
    pub idle: Duration,
    /// At the largest size, idle measured again over [`SETTLED_WINDOW`]
    /// once this long has passed since the burst (handshake retries to the
    /// unreachable simulated hosts over); `None`: not measured.
    pub settle: Option<Duration>,
    /// How long a burst or a cold start may take.
    pub timeout: Duration,
}

impl Options {
    /// From the command line: `hosts` and `stores` empty take the defaults
    /// (100, 1,000 and 5,000, or 100 with `quick`; both stores).
    pub fn new(
        quick: bool,
        hosts: &[usize],
        stores: &[StoreKind],
        timeout: Option<u64>,
        pace_ms: u64,
        settle_s: Option<u64>,
    ) -> Self {
        let mut sizes = if !hosts.is_empty() {
            hosts.iter().map(|&n| n.max(1)).collect()
        } else if quick {
            vec![100]
        } else {
            vec![100, 1000, 5000]
        };
        sizes.sort_unstable();
        sizes.dedup();
        Options {
            sizes,
            stores: if stores.is_empty() {
                vec![StoreKind::Etcd, StoreKind::Sqlite]
            } else {
                stores.to_vec()
            },
            batch: 100,
            pace: Duration::from_millis(pace_ms),
            changes: 5,
            idle: Duration::from_secs(if quick { 3 } else { 10 }),
            settle: Some(settle_s.unwrap_or(if quick { 0 } else { DEFAULT_SETTLE_S }))
                .filter(|&s| s > 0)
                .map(Duration::from_secs),
            timeout: Duration::from_secs(timeout.unwrap_or(if quick { 60 } else { 300 })),
        }
    }
}

pub fn run(o: &Options) -> Result<ScaleResults> {
    let largest = o.sizes.iter().copied().max().unwrap_or(1);
    // Room for the largest size, its join, and netd's own block.
    let range = sim::cluster_range(largest + 2)?;
    let mut r = ScaleResults {
        batch: o.batch,
        pace_ms: o.pace.as_secs_f64() * 1e3,
        idle_s: o.idle.as_secs_f64(),
        changes: o.changes,
        timeout_s: o.timeout.as_secs_f64(),
        cluster_range: format!("{range}, /{} blocks", sim::BLOCK_PREFIX),
        stores: vec![],
    };
    for &store in &o.stores {
        let mut st = StoreResults {
            store,
            rows: vec![],
        };
        for &n in &o.sizes {
            let mut row = ScaleRow {
                hosts: n,
                ..ScaleRow::default()
            };
            eprintln!("scale {} {n}: starting", store.label());
            let outcome = one_size(o, store, range, &mut row);
            let failed = outcome.is_err();
            if let Err(e) = outcome {
                eprintln!("scale {} {n}: {e:#}", store.label());
                row.error = Some(format!("{e:#}"));
            }
            st.rows.push(row);
            // A larger size would fail the same way, only slower.
            if failed {
                break;
            }
        }
        r.stores.push(st);
    }
    Ok(r)
}

/// Registers a directory for [`crate::sys::cleanup_after_signal`] while
/// it lives.
struct SignalCleanup(PathBuf);

impl SignalCleanup {
    fn new(dir: &Path) -> Self {
        crate::sys::register_dir(dir);
        SignalCleanup(dir.to_owned())
    }
}

impl Drop for SignalCleanup {
    fn drop(&mut self) {
        crate::sys::unregister_dir(&self.0);
    }
}

/// Refuses to run when the lab's underlay could carry netd's handshakes to
/// the simulated addresses anywhere: it must forward nothing and have no
/// route to them.
fn check_no_way_out(lab: &Lab) -> Result<()> {
    let ul = lab.underlay();
    let forward = ul.exec(["cat", "/proc/sys/net/ipv4/ip_forward"])?;
    if forward.trim() != "0" {
        bail!("the lab's underlay {} forwards packets", ul.name());
    }
    let probe = sim::SIM_UNDERLAY.to_string();
    if ul
        .output(["ip", "-4", "route", "get", &probe])?
        .status
        .success()
    {
        bail!(
            "the lab's underlay {} has a route to {probe}: simulated hosts would be reachable",
            ul.name()
        );
    }
    Ok(())
}

/// One store at one size, in a fresh lab: see the module docs.
fn one_size(o: &Options, store: StoreKind, range: Ipv4Network, row: &mut ScaleRow) -> Result<()> {
    let lab = Lab::new(LabOptions::hosts(1))?;
    check_no_way_out(&lab)?;
    let ul = lab.underlay().clone();
    // etcd listens on the underlay switch's address, which netd reaches
    // and, from a thread inside that namespace, the bench too.
    weft_tests::in_netns(ul.path(), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (_etcd, url, mut writer) = match store {
            StoreKind::Etcd => {
                let etcd = EtcdServer::start_in_netns(ul.name(), lab.host(0).gateway())
                    .context("starting etcd")?;
                // etcd dies with the lab's namespaces on a signal; its data
                // dir is outside the lab's.
                let dir = SignalCleanup::new(etcd.dir());
                let client = rt
                    .block_on(etcd_client::Client::connect([etcd.endpoint()], None))
                    .context("connecting to etcd")?;
                let url = format!("etcd:{}", etcd.endpoint());
                (Some((etcd, dir)), url, Writer::Etcd(Box::new(client)))
            }
            StoreKind::Sqlite => {
                let db = lab.dir().join("store.db");
                let store = SqliteStore::open(&db)?;
                (
                    None,
                    format!("sqlite:{}", db.display()),
                    Writer::Sqlite(Arc::new(store)),
                )
            }
        };
        let flags = [
            "--backend=wireguard".to_string(),
            format!("--cluster-range={range}"),
            format!("--block-prefix={}", sim::BLOCK_PREFIX),
        ];
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mut netd = Netd::start(&lab, 0, &url, &flags)?;
        let outcome = measure(o, &rt, &mut writer, &mut netd, range, row);
        if let Err(e) = netd.stop() {
            eprintln!("scale: netd did not stop cleanly: {e}");
        }
        outcome
    })
}

/// netd's own block, from its record (it registers right after it starts).
fn own_block(rt: &tokio::runtime::Runtime, writer: &mut Writer) -> Result<Ipv4Network> {
    let t0 = Instant::now();
    loop {
        if let Some(r) = rt.block_on(writer.host(NETD_HOST))? {
            return Ok(r.block);
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("netd wrote no host record within 30 s");
        }
        std::thread::sleep(POLL);
    }
}

/// Polls the routes on `weft-wg` until every one of `want` is there; when
/// (or an error naming how many were there at the deadline).
fn until_routes(
    ns: &Netns,
    want: &HashSet<Ipv4Network>,
    t0: Instant,
    limit: Duration,
) -> Result<Instant> {
    loop {
        let have = observe::wg_routes(ns);
        let now = Instant::now();
        let present = want.iter().filter(|b| have.contains(b)).count();
        if present == want.len() {
            return Ok(now);
        }
        if now.duration_since(t0) > limit {
            bail!(
                "timed out: {present} of {} routes after {:.0} s",
                want.len(),
                limit.as_secs_f64()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `ip route get` of `h`'s block until it goes into `weft-wg`
/// (`present`) or not; the time since `t0`.
fn until_route(ns: &Netns, h: &SimHost, present: bool, t0: Instant) -> Result<Duration> {
    loop {
        if observe::routed_to_wg(ns, h.probe_addr())? == present {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > CHANGE_LIMIT {
            bail!(
                "the route to {} still {} after {CHANGE_LIMIT:?}",
                h.block,
                if present { "missing" } else { "there" }
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn measure(
    o: &Options,
    rt: &tokio::runtime::Runtime,
    writer: &mut Writer,
    netd: &mut Netd,
    range: Ipv4Network,
    row: &mut ScaleRow,
) -> Result<()> {
    let n = row.hosts;
    let label = format!("scale {n}");
    let ns = netd.host().clone();
    let mine = own_block(rt, writer)?;
    let hosts: Vec<SimHost> = sim::blocks(range, mine, n + 1)?
        .into_iter()
        .enumerate()
        .map(|(i, b)| sim::sim_host(i, b))
        .collect::<Result<_>>()?;
    let (burst, joiner) = hosts.split_at(n);
    let joiner = &joiner[0];
    let want: HashSet<Ipv4Network> = burst.iter().map(|h| h.block).collect();

    // 1. The burst.
    let pid = observe::netd_pid(&ns)?;
    row.rss_before_mb = Some(observe::rss_mb(pid)?);
    let log_start = netd.log().lines().count();
    let cpu = CpuMeter::start(&[pid]);
    let t0 = Instant::now();
    rt.block_on(writer.burst(burst, o.batch, o.pace))?;
    let last = Instant::now();
    row.write_s = Some(last.duration_since(t0).as_secs_f64());
    let all = until_routes(&ns, &want, last, o.timeout);
    row.burst_cpu_s = Some(cpu.stop().1);
    row.rss_mb = Some(observe::rss_mb(pid)?);
    let all = all?;
    row.burst_s = Some(all.saturating_duration_since(last).as_secs_f64());
    eprintln!(
        "{label}: written in {:.2} s, all routes {:.2} s later; CPU {:.2} s, RSS {:.1} MB",
        row.write_s.unwrap_or_default(),
        row.burst_s.unwrap_or_default(),
        row.burst_cpu_s.unwrap_or_default(),
        row.rss_mb.unwrap_or_default()
    );

    // 2. One join, one leave, `changes` times.
    for _ in 0..o.changes {
        let t0 = Instant::now();
        rt.block_on(writer.put(joiner))?;
        row.join_ms
            .push(until_route(&ns, joiner, true, t0)?.as_secs_f64() * 1e3);
        let t0 = Instant::now();
        rt.block_on(writer.delete(&joiner.key))?;
        row.leave_ms
            .push(until_route(&ns, joiner, false, t0)?.as_secs_f64() * 1e3);
    }
    eprintln!(
        "{label}: join {:.1} ms, leave {:.1} ms (medians)",
        row.join_ms.get().unwrap_or_default(),
        row.leave_ms.get().unwrap_or_default()
    );

    // 3. Idle.
    std::thread::sleep(Duration::from_secs(1));
    let log_idle = netd.log().lines().count();
    let cpu = CpuMeter::start(&[pid]);
    let t0 = Instant::now();
    std::thread::sleep(o.idle);
    let (_, idle_cpu) = cpu.stop();
    let secs = t0.elapsed().as_secs_f64();
    let log = netd.log();
    let idle = observe::count_lines(&log, log_idle);
    row.idle_cpu_pct = Some(idle_cpu / secs * 100.0);
    row.idle_lines_per_min = Some(idle.lines as f64 * 60.0 / secs);
    row.idle_handshake_per_min = Some(idle.handshakes as f64 * 60.0 / secs);
    // 3b. Idle again once the handshakes to the unreachable hosts are
    // over (the largest size only: it takes minutes).
    if let Some(settle) = o.settle.filter(|_| Some(&n) == o.sizes.iter().max()) {
        let wait = settle.saturating_sub(all.elapsed());
        eprintln!(
            "{label}: waiting {:.0} s for the handshake retries to end",
            wait.as_secs_f64()
        );
        std::thread::sleep(wait);
        let log_from = netd.log().lines().count();
        let cpu = CpuMeter::start(&[pid]);
        let t0 = Instant::now();
        std::thread::sleep(SETTLED_WINDOW);
        let (_, settled_cpu) = cpu.stop();
        let secs = t0.elapsed().as_secs_f64();
        let settled = observe::count_lines(&netd.log(), log_from);
        row.settled_after_s = Some(settle.as_secs_f64());
        row.settled_idle_cpu_pct = Some(settled_cpu / secs * 100.0);
        row.settled_lines_per_min = Some(settled.lines as f64 * 60.0 / secs);
        row.settled_rss_mb = Some(observe::rss_mb(pid)?);
        eprintln!(
            "{label}: settled idle CPU {:.2} %, {:.1} log lines/min, RSS {:.1} MB",
            row.settled_idle_cpu_pct.unwrap_or_default(),
            row.settled_lines_per_min.unwrap_or_default(),
            row.settled_rss_mb.unwrap_or_default()
        );
    }
    let log = netd.log();
    let run = observe::count_lines(&log, log_start);
    row.log_lines = Some(run.lines);
    row.handshake_lines = Some(run.handshakes);
    row.warning_lines = Some(run.warnings);
    row.warnings = run.samples;
    eprintln!(
        "{label}: idle CPU {:.2} %, {:.1} log lines/min; {} lines ({} about handshakes, {} other warnings) since the burst",
        row.idle_cpu_pct.unwrap_or_default(),
        row.idle_lines_per_min.unwrap_or_default(),
        run.lines,
        run.handshakes,
        run.warnings
    );

    // 4. Cold start: a fresh boot of this host, the hosts in the store.
    // A netd that outlasts the harness's 5 s grace is SIGKILLed: gone
    // either way, which is all a cold start needs.
    if let Err(e) = netd.stop() {
        eprintln!("{label}: netd did not stop cleanly: {e}");
    }
    if ns
        .links()?
        .iter()
        .any(|l| l == weft_netd::tunnel::WG_DEVICE)
    {
        ns.ip(["link", "del", weft_netd::tunnel::WG_DEVICE])?;
    }
    if !observe::wg_routes(&ns).is_empty() {
        bail!("routes on the WireGuard device survived its deletion");
    }
    let wall = SystemTime::now();
    let t0 = Instant::now();
    netd.start_again()?;
    let all = until_routes(&ns, &want, t0, o.timeout)?;
    let cold = all.duration_since(t0).as_secs_f64();
    row.cold_start_s = Some(cold);
    if let Some(read) = observe::hosts_read_at(&netd.log()) {
        let mut after = read - observe::wall_time_of_day(wall);
        if after < -43_200.0 {
            after += 86_400.0; // across midnight
        }
        row.cold_from_list_s = Some(cold - after).filter(|s| *s >= 0.0);
    }
    eprintln!(
        "{label}: cold start {cold:.2} s ({} s from reading the hosts)",
        row.cold_from_list_s
            .map_or("n/a".into(), |s| format!("{s:.2}"))
    );
    Ok(())
}
