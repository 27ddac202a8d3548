//! Soak and chaos (issue 15), `weft-bench soak`: hours of container churn,
//! DNS load, long flows and faults on a lab of real netds, with invariants
//! checked all along and a report that counts every violation.
//!
//! ```text
//!  lab: h0 .. h(N-1), each with netd (WireGuard backend) and
//!       2 long-lived probe containers (DNS clients, flow ends);
//!  store: etcd in the lab's underlay namespace, or the embedded SQLite file
//!  at once, for `duration`:
//!    churn    (churn.rs)    CNI ADD/DEL through the real plugin, with
//!                           services, aliases and published ports
//!    traffic  (traffic.rs)  DNS queries from the probes, each answer
//!                           judged against the live set; pings and UDP
//!                           at 10 ms, TCP streams between hosts; gaps
//!    faults   (faults.rs)   netd SIGTERM/SIGKILL, etcd stop/kill, rule
//!                           wipes, a veth deleted, underlay down/up,
//!                           clock jump; each waited on until healed
//!    sampler  (sample.rs)   every second: netd RSS, fds, sockets, veths,
//!                           routes, rules, conntrack; the store's IPAM
//!  then: the churned containers deleted, a settle, the last samples;
//!  invariants.rs judges the whole timeline (pure), report.rs writes it.
//! ```
//!
//! Everything a part sees goes into one [`timeline::Recorder`]; the parts
//! share the [`World`] (lab, netds, store) and stop when it says so.

pub mod churn;
pub mod faults;
pub mod invariants;
pub mod report;
pub mod rng;
pub mod sample;
pub mod timeline;
pub mod traffic;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use weft_store::testing::EtcdServer;
use weft_tests::weft::Netd;
use weft_tests::{Container, Lab, LabOptions};

pub use crate::scale::StoreKind;
use timeline::{Life, Recorder, Timeline};

/// How long the other parts wait for the sampler's first round.
const BASELINE_WAIT: Duration = Duration::from_secs(5);

/// Probe containers per host (never churned): DNS clients and flow ends.
pub const PROBES_PER_HOST: usize = 2;

#[derive(Debug, Clone)]
pub struct Options {
    /// Lab hosts, each with a netd (3 or more).
    pub hosts: usize,
    /// Store backends, one run each.
    pub stores: Vec<StoreKind>,
    /// How long churn, traffic and faults run, per store.
    pub duration: Duration,
    /// CNI ADDs + DELs per second across all hosts.
    pub churn_per_s: f64,
    /// Churned containers kept live at most (the churn adds while below,
    /// deletes at random otherwise).
    pub max_live: usize,
    /// DNS queries per second across all probes.
    pub dns_per_s: u32,
    /// Mean seconds between two faults (exponential, seeded).
    pub fault_every: Duration,
    /// Only these fault kinds (empty: all that apply to the store).
    pub faults: Vec<timeline::FaultKind>,
    /// The fault scheduler's and churn's random seed (a failing run can be
    /// replayed with it).
    pub seed: u64,
    /// Where the report goes.
    pub out: PathBuf,
    /// The report's name: `soak-<tag>.md/.json/-*.svg`.
    pub tag: String,
}

/// What every part of a run shares.
pub struct World {
    pub opts: Options,
    pub lab: Lab,
    pub store: StoreKind,
    /// `etcd:URL` or `sqlite:PATH`, as netd gets it.
    pub store_url: String,
    /// The etcd server (None on SQLite): the faults stop and start it.
    pub etcd: Mutex<Option<EtcdServer>>,
    /// One netd per lab host; the faults restart them.
    pub netds: Vec<Mutex<Netd>>,
    /// The CNI config for host i (the netd socket does not change on restart).
    pub cni_configs: Vec<String>,
    /// The long-lived probe containers: PROBES_PER_HOST per host.
    pub probes: Vec<Probe>,
    pub rec: Recorder,
    stop: AtomicBool,
}

/// A probe container: attached at start, never churned.
pub struct Probe {
    pub container: Container,
    pub life: Life,
}

impl World {
    /// Whether the parts should stop (the duration is over or a part failed).
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Tells every part to stop.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Sleeps up to `d`, waking early when the run stops; false if it stopped.
    pub fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while !self.stopped() {
            let now = Instant::now();
            if now >= end {
                return true;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(100)));
        }
        false
    }

    /// Hosts in the lab.
    pub fn hosts(&self) -> usize {
        self.netds.len()
    }
}

/// One soak run per store; writes the report. Returns whether every
/// invariant held.
pub fn run(o: &Options) -> Result<bool> {
    let mut results = report::SoakResults::new(o);
    for &store in &o.stores {
        eprintln!(
            "soak {}: {} hosts for {:.0} s",
            store.label(),
            o.hosts,
            o.duration.as_secs_f64()
        );
        let t0 = Instant::now();
        let timeline = one_store(o, store).with_context(|| format!("soak on {}", store.label()))?;
        let checks = invariants::CheckOptions {
            store_across_underlay: store == StoreKind::Etcd,
            ..invariants::CheckOptions::default()
        };
        let verdicts = invariants::check(&timeline, &checks);
        for v in &verdicts {
            eprintln!("soak {}: {}", store.label(), v.line());
        }
        results.push(store, timeline, verdicts);
        eprintln!(
            "soak {}: done in {:.0} s",
            store.label(),
            t0.elapsed().as_secs_f64()
        );
    }
    let md = report::write(&o.out, &results)?;
    eprintln!("soak: report {}", md.display());
    Ok(results.all_held())
}

fn one_store(o: &Options, store: StoreKind) -> Result<Timeline> {
    let lab = Lab::new(LabOptions::hosts(o.hosts))?;
    let ul = lab.underlay().clone();
    let (etcd, store_url) = match store {
        StoreKind::Etcd => {
            let etcd = EtcdServer::start_in_netns(ul.name(), lab.host(0).gateway())
                .context("starting etcd")?;
            crate::sys::register_dir(etcd.dir());
            let url = format!("etcd:{}", etcd.endpoint());
            (Some(etcd), url)
        }
        StoreKind::Sqlite => (
            None,
            format!("sqlite:{}", lab.dir().join("store.db").display()),
        ),
    };
    let mut netds = Vec::new();
    for i in 0..o.hosts {
        netds.push(Netd::start(&lab, i, &store_url, &[])?);
    }
    let cni_configs = netds.iter().map(|n| n.cni_config("1.0.0")).collect();
    let rec = Recorder::new();
    let mut world = World {
        opts: o.clone(),
        lab,
        store,
        store_url,
        etcd: Mutex::new(etcd),
        netds: netds.into_iter().map(Mutex::new).collect(),
        cni_configs,
        probes: vec![],
        rec,
        stop: AtomicBool::new(false),
    };
    world.probes = churn::attach_probes(&world)?;
    let outcome = soak(&world);
    // Whatever happened: the churned containers go (the runtime's DEL), the
    // last samples are taken, the lab is torn down on drop.
    world.request_stop();
    let end_ms = world.rec.now_ms();
    world.rec.with(|t| t.end_ms = end_ms);
    churn::delete_all(&world)?;
    sample::final_samples(&world)?;
    if let Some(etcd) = world
        .etcd
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        crate::sys::unregister_dir(etcd.dir());
    }
    outcome?;
    Ok(world.rec.snapshot())
}

/// The parts, each on its own thread, for the duration.
fn soak(w: &World) -> Result<()> {
    std::thread::scope(|s| {
        // The sampler first: its first round is the baseline the leak
        // checks compare the end with (probes only, before any churn).
        let sampler = s.spawn(|| sample::run(w));
        let baseline = Instant::now() + BASELINE_WAIT;
        while Instant::now() < baseline && w.rec.with(|t| t.hosts.len()) < w.hosts() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let parts: Vec<(&str, std::thread::ScopedJoinHandle<Result<()>>)> = vec![
            ("sampler", sampler),
            ("churn", s.spawn(|| churn::run(w))),
            ("traffic", s.spawn(|| traffic::run(w))),
            ("faults", s.spawn(|| faults::run(w))),
        ];
        let end = Instant::now() + w.opts.duration;
        let mut last_print = Instant::now();
        while Instant::now() < end && !w.stopped() {
            std::thread::sleep(Duration::from_millis(200));
            if last_print.elapsed() >= Duration::from_secs(30) {
                last_print = Instant::now();
                progress(w, end);
            }
        }
        w.request_stop();
        let mut first_err = None;
        for (name, h) in parts {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("{name} panicked")));
            if let Err(e) = r {
                eprintln!("soak: {name} failed: {e:#}");
                first_err.get_or_insert(e.context(format!("soak part {name}")));
            }
        }
        first_err.map_or(Ok(()), Err)
    })
}

/// One line every 30 s: what has happened so far.
fn progress(w: &World, end: Instant) {
    let (lives, faults, gaps, dns) = w.rec.with(|t| {
        (
            t.lives.len(),
            t.faults.len(),
            t.gaps.len(),
            t.dns_seconds.iter().map(|d| d.sent).sum::<u64>(),
        )
    });
    eprintln!(
        "soak {}: {:.0} s left; {lives} containers so far, {dns} DNS queries, {faults} faults, {gaps} gaps",
        w.store.label(),
        end.saturating_duration_since(Instant::now()).as_secs_f64()
    );
}

/// The report's directory and file stem for `tag` (`soak-<tag>`).
pub fn stem(out: &Path, tag: &str) -> PathBuf {
    out.join(format!("soak-{tag}"))
}
