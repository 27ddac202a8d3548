//! weft's benchmark harness.
//!
//! `weft-bench all [--quick]`: everything, side by side with the reference
//! tools, in one run: tunnel throughput, latency and CPU (weft's backends
//! beside the raw underlay, a hand-made kernel VXLAN and wireguard-go), the
//! MTU check and sweep, DNS (dnsd beside unbound and dnsmasq under dnsperf),
//! CNI latency (weft beside bridge + host-local) and network policy (update
//! latency at scale, throughput and ping with policy on vs off) and services
//! (through a VIP vs direct, rule update and first-packet latency by number
//! of services) and the control plane at scale (convergence, CPU, RSS
//! and cold start of one netd with N simulated hosts). Writes a Markdown
//! report, the raw numbers as JSON and SVG charts. Needs root. `bench/run`
//! builds the binaries and runs this.
//!
//! `weft-bench tunnel | mtu | dns | cni-latency | policy | services | scale`: one part, its Markdown on
//! stdout. `weft-bench ipam-alloc`: the IPAM allocation rate per store
//! backend (no root).

mod cni;
mod dns;
mod ipam_alloc;
mod policy;
mod report;
mod scale;
mod services;
mod soak;
mod svg;
mod sys;
mod tunnel;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::report::Report;
use crate::tunnel::Mode;

#[derive(Parser)]
#[command(about = "weft benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Every part; writes <out>/<date>.md, .json and -<chart>.svg (root).
    All {
        #[command(flatten)]
        o: Opts,
        /// Where to write the report (default: bench/results, or
        /// target/bench-quick with --quick).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only these parts.
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<Part>,
    },
    /// Tunnel throughput, latency and CPU at underlay MTU 1500 (root).
    Tunnel {
        #[command(flatten)]
        o: Opts,
    },
    /// The MTU check and the throughput sweep over underlay MTUs (root).
    Mtu {
        #[command(flatten)]
        o: Opts,
    },
    /// DNS: dnsd beside unbound and dnsmasq under dnsperf (127.0.0.1).
    Dns {
        #[command(flatten)]
        o: Opts,
    },
    /// CNI ADD/DEL latency, weft beside bridge + host-local (root).
    CniLatency {
        #[command(flatten)]
        o: Opts,
    },
    /// Re-renders a report (Markdown and charts) from its JSON, next to it.
    Render {
        /// The report's JSON, e.g. bench/results/2026-11-23.json.
        json: PathBuf,
    },
    /// Network policy: change written -> enforced on a host at scale, and
    /// throughput and ping p99 with policy on vs off (root).
    Policy {
        #[command(flatten)]
        o: Opts,
    },
    /// Services: throughput and ping p99 through a VIP vs direct, rule
    /// update and first-packet latency by number of services (root).
    Services {
        #[command(flatten)]
        o: Opts,
    },
    /// The control plane at scale: one netd, N simulated hosts; burst,
    /// join/leave, idle CPU, RSS and cold start per store backend (root).
    Scale {
        #[command(flatten)]
        o: Opts,
    },
    /// Soak and chaos: churn, DNS load, flows and faults on a lab of real
    /// netds for a set time, every invariant checked all along; writes
    /// <out>/soak-<tag>.md, .json and -*.svg; fails on any violation (root).
    Soak {
        #[command(flatten)]
        s: SoakArgs,
    },
    /// Allocation and release rate of one process, per store backend.
    IpamAlloc {
        /// Backends to measure.
        #[arg(long, value_enum, default_values_t = [ipam_alloc::Backend::Sqlite, ipam_alloc::Backend::Etcd])]
        backend: Vec<ipam_alloc::Backend>,
        /// Host blocks to fill (each /24 holds 253 endpoints).
        #[arg(long, default_value_t = 4)]
        blocks: usize,
        /// Repeat each measurement this many times and report the median.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

#[derive(clap::Args, Debug)]
struct SoakArgs {
    /// Seconds of churn, traffic and faults per store [1800; quick 60].
    #[arg(long)]
    duration: Option<u64>,
    /// The CI soak: 60 s per store, a fault every 6 s on average.
    #[arg(long)]
    quick: bool,
    /// Lab hosts, each with its netd (at least 3).
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Store backends, one run each [etcd,sqlite].
    #[arg(long, value_enum, value_delimiter = ',')]
    stores: Vec<scale::StoreKind>,
    /// CNI ADDs and DELs per second across the hosts.
    #[arg(long, default_value_t = 10.0)]
    churn_per_s: f64,
    /// Churned containers live at most at once.
    #[arg(long, default_value_t = 60)]
    max_live: usize,
    /// DNS queries per second across the probe containers.
    #[arg(long, default_value_t = 1000)]
    dns_per_s: u32,
    /// Mean seconds between two faults [30; quick 6].
    #[arg(long)]
    fault_every: Option<u64>,
    /// Only these faults (default: every kind that applies to the store).
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<soak::timeline::FaultKind>,
    /// Random seed of the churn and the fault schedule (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the report goes (default: bench/results, or target/bench-quick with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
}

impl SoakArgs {
    fn options(&self) -> soak::Options {
        let bench = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1)
        });
        soak::Options {
            hosts: self.hosts.max(3),
            stores: if self.stores.is_empty() {
                vec![scale::StoreKind::Etcd, scale::StoreKind::Sqlite]
            } else {
                self.stores.clone()
            },
            duration: std::time::Duration::from_secs(self.duration.unwrap_or(if self.quick {
                60
            } else {
                1800
            })),
            churn_per_s: self.churn_per_s,
            max_live: self.max_live,
            dns_per_s: self.dns_per_s,
            fault_every: std::time::Duration::from_secs(
                self.fault_every
                    .unwrap_or(if self.quick { 6 } else { 30 })
                    .max(1),
            ),
            faults: self.faults.clone(),
            seed,
            out: self.out.clone().unwrap_or_else(|| {
                if self.quick {
                    bench.join("../target/bench-quick")
                } else {
                    bench.join("results")
                }
            }),
            tag: sys::now_utc().0,
        }
    }
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
enum Part {
    Tunnel,
    Mtu,
    Dns,
    Cni,
    Policy,
    Services,
    Scale,
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
enum ModeArg {
    Raw,
    KernelVxlan,
    WeftVxlan,
    WireguardGo,
    WeftWireguard,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Raw => Mode::Raw,
            ModeArg::KernelVxlan => Mode::KernelVxlan,
            ModeArg::WeftVxlan => Mode::WeftVxlan,
            ModeArg::WireguardGo => Mode::WireguardGo,
            ModeArg::WeftWireguard => Mode::WeftWireguard,
        }
    }
}

/// Settings shared by the parts; unset ones take the full or --quick
/// default.
#[derive(Args, Clone, Debug)]
struct Opts {
    /// Every part for a second or two: checks the harness, measures nothing.
    #[arg(long)]
    quick: bool,
    /// Runs per figure (the median is reported) [3; quick 1].
    #[arg(long)]
    runs: Option<usize>,
    /// Seconds per iperf3 test [5; quick 1].
    #[arg(long)]
    secs: Option<u32>,
    /// Offered UDP rate in Mbit/s (the raw underlay carries it without
    /// loss on a 2-core machine; iperf3's own receiver drops above ~400).
    #[arg(long, default_value_t = 300)]
    udp_mbit: u32,
    /// Pings per latency run [200; quick 20].
    #[arg(long)]
    pings: Option<u32>,
    /// Underlay MTUs of the sweep besides 1500.
    #[arg(long, value_delimiter = ',', default_values_t = [9000u32, 1400])]
    sweep_mtus: Vec<u32>,
    /// Tunnel modes to measure [all].
    #[arg(long, value_enum, value_delimiter = ',')]
    modes: Vec<ModeArg>,
    /// DNS: services to serve (10 per stack, 2 containers each) [2000; quick 200].
    #[arg(long)]
    dns_services: Option<usize>,
    /// DNS: seconds of each saturated run [5; quick 1].
    #[arg(long)]
    dns_secs: Option<u32>,
    /// DNS: the fixed rate of the latency run.
    #[arg(long, default_value_t = 20_000)]
    dns_latency_qps: u32,
    /// DNS: seconds of each fixed-rate run [3; quick 1].
    #[arg(long)]
    dns_latency_secs: Option<u32>,
    /// DNS: dnsperf clients (sockets) in the saturated run.
    #[arg(long, default_value_t = 8)]
    dns_clients: u32,
    /// DNS: dnsperf threads in the saturated run.
    #[arg(long, default_value_t = 2)]
    dns_threads: u32,
    /// DNS: threads of dnsd and unbound (dnsmasq has one).
    #[arg(long, default_value_t = 2)]
    dns_server_threads: u32,
    /// CNI: containers per plugin per round [20; quick 8].
    #[arg(long)]
    cni_containers: Option<usize>,
    /// CNI: rounds [3; quick 1].
    #[arg(long)]
    cni_rounds: Option<usize>,
    /// CNI: calls at once in the concurrent test.
    #[arg(long, default_value_t = 8)]
    cni_concurrency: usize,
    /// Policy: stacks [1000; quick 100].
    #[arg(long)]
    policy_stacks: Option<usize>,
    /// Policy: simulated endpoints (10 per stack) [10000; quick 300].
    #[arg(long)]
    policy_endpoints: Option<usize>,
    /// Policy: rules [1000; quick 100].
    #[arg(long)]
    policy_rules: Option<usize>,
    /// Policy: rule removals and additions timed [10; quick 2].
    #[arg(long)]
    policy_changes: Option<usize>,
    /// Services: simulated service counts [10,1000,10000; quick 10].
    #[arg(long, value_delimiter = ',')]
    services_sizes: Vec<usize>,
    /// Services: backends per simulated service.
    #[arg(long, default_value_t = 10)]
    services_backends: usize,
    /// Services: backend additions and removals timed per size [10; quick 2].
    #[arg(long)]
    services_changes: Option<usize>,
    /// Services: new TCP connections per path per size [200; quick 20].
    #[arg(long)]
    services_connects: Option<usize>,
    /// Scale: simulated host counts [100,1000,5000; quick 100].
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<usize>,
    /// Scale: store backends [etcd,sqlite].
    #[arg(long, value_enum, value_delimiter = ',')]
    scale_stores: Vec<scale::StoreKind>,
    /// Scale: seconds a burst or a cold start may take [300; quick 60].
    #[arg(long)]
    scale_timeout: Option<u64>,
    /// Scale: ms between two batches of the burst (0: back to back).
    #[arg(long, default_value_t = 0)]
    scale_pace_ms: u64,
    /// Scale: at the largest size, seconds after the burst before idle is
    /// measured again for 60 s, once the handshake retries to the
    /// unreachable hosts are over (0: not measured) [165; quick 0].
    #[arg(long)]
    scale_settle: Option<u64>,
}

impl Opts {
    fn pick<T>(&self, v: Option<T>, full: T, quick: T) -> T {
        v.unwrap_or(if self.quick { quick } else { full })
    }

    fn runs(&self) -> usize {
        self.pick(self.runs, 3, 1).max(1)
    }

    fn tunnel(&self) -> tunnel::Options {
        tunnel::Options {
            runs: self.runs(),
            secs: self.pick(self.secs, 5, 1).max(1),
            // --quick measures nothing: 20 MB per test is enough to see
            // that iperf3 runs and reports, and takes far less than 1 s.
            bytes: (self.quick && self.secs.is_none()).then_some(20_000_000),
            udp_mbit: self.udp_mbit.max(1),
            pings: self.pick(self.pings, 200, 20).max(1),
            sweep_mtus: self.sweep_mtus.clone(),
        }
    }

    fn modes(&self) -> Vec<Mode> {
        if self.modes.is_empty() {
            tunnel::MODES.to_vec()
        } else {
            tunnel::MODES
                .iter()
                .copied()
                .filter(|m| self.modes.iter().any(|&a| Mode::from(a) == *m))
                .collect()
        }
    }

    fn dns(&self) -> dns::Options {
        dns::Options {
            services: self.pick(self.dns_services, 2000, 200).max(10),
            seconds: self.pick(self.dns_secs, 5, 1).max(1),
            latency_qps: self.dns_latency_qps.max(1),
            latency_seconds: self.pick(self.dns_latency_secs, 3, 1).max(1),
            clients: self.dns_clients.max(1),
            threads: self.dns_threads.max(1),
            server_threads: self.dns_server_threads.max(1),
            runs: self.runs(),
            warmup: !self.quick,
        }
    }

    fn cni(&self) -> cni::Options {
        let concurrency = self.cni_concurrency.max(1);
        cni::Options {
            containers: self
                .pick(self.cni_containers, 20, 8)
                .max(concurrency.min(8)),
            rounds: self.pick(self.cni_rounds, 3, 1).max(1),
            concurrency,
        }
    }

    fn policy(&self) -> policy::Options {
        policy::Options {
            stacks: self.pick(self.policy_stacks, 1000, 100).max(1),
            endpoints: self.pick(self.policy_endpoints, 10_000, 300),
            rules: self.pick(self.policy_rules, 1000, 100),
            changes: self.pick(self.policy_changes, 10, 2).max(1),
            runs: self.runs(),
            secs: self.pick(self.secs, 5, 1).max(1),
            pings: self.pick(self.pings, 200, 20).max(1),
        }
    }

    fn services(&self) -> services::Options {
        let sizes = if !self.services_sizes.is_empty() {
            self.services_sizes.clone()
        } else if self.quick {
            vec![10]
        } else {
            vec![10, 1000, 10_000]
        };
        services::Options {
            sizes: sizes.into_iter().map(|n| n.max(1)).collect(),
            backends: self.services_backends.max(1),
            changes: self.pick(self.services_changes, 10, 2).max(2),
            connects: self.pick(self.services_connects, 200, 20).max(1),
            runs: self.runs(),
            secs: self.pick(self.secs, 5, 1).max(1),
            pings: self.pick(self.pings, 200, 20).max(1),
        }
    }

    /// The quiet window of the busy rule.
    fn window(&self) -> Duration {
        Duration::from_millis(if self.quick { 500 } else { 2000 })
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    // Ctrl-C or SIGTERM: no lab namespace, wireguard-go or DNS server may
    // outlive the run.
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("weft-bench: interrupted; cleaning up");
        sys::cleanup_after_signal();
        std::process::exit(130);
    });
    // wireguard-go makes /run/wireguard for its sockets on first use: gone
    // again at the end if this run made it (the sockets go with their
    // processes; cleanup_after_signal handles an interrupted run).
    let _wireguard_dir = weft_tests::MachinePaths::watch(&[sys::WIREGUARD_GO_SOCKETS]);
    match Cli::parse().bench {
        Bench::IpamAlloc {
            backend,
            blocks,
            runs,
        } => ipam_alloc::run(&backend, blocks, runs.max(1)).await,
        Bench::All { o, out, only } => {
            let parts = if only.is_empty() {
                vec![
                    Part::Tunnel,
                    Part::Mtu,
                    Part::Dns,
                    Part::Cni,
                    Part::Policy,
                    Part::Services,
                    Part::Scale,
                ]
            } else {
                only
            };
            let dir = out.unwrap_or_else(|| {
                let bench = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
                if o.quick {
                    bench.join("../target/bench-quick")
                } else {
                    bench.join("results")
                }
            });
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let report = tokio::task::spawn_blocking(move || collect(&o, &parts, command)).await?;
            let written = report::write(&report, &dir)?;
            for p in &written {
                println!("wrote {}", p.display());
            }
            finish(&report)
        }
        Bench::Render { json } => {
            let text = std::fs::read_to_string(&json)?;
            let report: Report = serde_json::from_str(&text)?;
            let dir = json
                .parent()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            for p in report::write(&report, &dir)? {
                println!("wrote {}", p.display());
            }
            Ok(())
        }
        Bench::Soak { s } => {
            let o = s.options();
            eprintln!("soak: seed {} (replay with --seed {})", o.seed, o.seed);
            let held = tokio::task::spawn_blocking(move || soak::run(&o)).await??;
            if !held {
                anyhow::bail!("soak: an invariant was violated (see the report)");
            }
            Ok(())
        }
        Bench::Policy { o } => one(o, Part::Policy).await,
        Bench::Services { o } => one(o, Part::Services).await,
        Bench::Scale { o } => one(o, Part::Scale).await,
        Bench::Tunnel { o } => one(o, Part::Tunnel).await,
        Bench::Mtu { o } => one(o, Part::Mtu).await,
        Bench::Dns { o } => one(o, Part::Dns).await,
        Bench::CniLatency { o } => one(o, Part::Cni).await,
    }
}

/// One part: its report section on stdout.
async fn one(o: Opts, part: Part) -> Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let report = tokio::task::spawn_blocking(move || collect(&o, &[part], command)).await?;
    print!("{}", report::markdown(&report, &report.date, &[]));
    finish(&report)
}

fn finish(report: &Report) -> Result<()> {
    if report.missing.is_empty() {
        eprintln!(
            "weft-bench: every figure has a number ({:.0} s)",
            report.seconds
        );
        Ok(())
    } else {
        for m in &report.missing {
            eprintln!("weft-bench: NOT MEASURED: {m}");
        }
        bail!("{} figure(s) got no number", report.missing.len())
    }
}

/// Runs `parts` in order, each between quiet windows, into one report.
fn collect(o: &Opts, parts: &[Part], command: String) -> Report {
    let started = Instant::now();
    let (date, started_at) = sys::now_utc();
    let mut r = Report {
        date,
        started: started_at,
        seconds: 0.0,
        quick: o.quick,
        command,
        commit: sys::commit(),
        machine: sys::machine(),
        tools: sys::tool_versions().into_iter().collect(),
        busy_rule: report::busy_rule(),
        parts: vec![],
        tunnel: None,
        mtu: None,
        dns: None,
        cni: None,
        policy: None,
        services: None,
        scale: None,
        missing: vec![],
    };
    let modes = o.modes();
    let topts = o.tunnel();
    for &part in parts {
        match part {
            Part::Tunnel => {
                let (info, v) =
                    sys::part("tunnel", o.window(), || tunnel::run_main(&topts, &modes));
                r.parts.push(info);
                if let Some((t, rows)) = v {
                    let mtu = r.mtu.get_or_insert(tunnel::MtuResults {
                        mtus: vec![],
                        rows: vec![],
                    });
                    mtu.mtus.insert(0, t.underlay_mtu);
                    mtu.rows.splice(0..0, rows);
                    r.tunnel = Some(t);
                }
            }
            Part::Mtu => {
                for &m in &topts.sweep_mtus {
                    let (info, v) = sys::part(&format!("mtu {m}"), o.window(), || {
                        tunnel::run_sweep(&topts, &modes, m)
                    });
                    r.parts.push(info);
                    let mtu = r.mtu.get_or_insert(tunnel::MtuResults {
                        mtus: vec![],
                        rows: vec![],
                    });
                    mtu.mtus.push(m);
                    match v {
                        Some(rows) => mtu.rows.extend(rows),
                        None => mtu.rows.extend(modes.iter().map(|&md| tunnel::MtuRow {
                            underlay_mtu: m,
                            mode: Some(md),
                            label: md.label().into(),
                            error: Some("the lab failed".into()),
                            ..tunnel::MtuRow::default()
                        })),
                    }
                }
            }
            Part::Dns => {
                let dopts = o.dns();
                let handle = tokio::runtime::Handle::current();
                let (info, v) = sys::part("dns", o.window(), || handle.block_on(dns::run(dopts)));
                r.parts.push(info);
                r.dns = v;
            }
            Part::Cni => {
                let copts = o.cni();
                let (info, v) = sys::part("cni", o.window(), || cni::run(&copts));
                r.parts.push(info);
                r.cni = v;
            }
            Part::Policy => {
                let popts = o.policy();
                let (info, v) = sys::part("policy", o.window(), || policy::run(&popts));
                r.parts.push(info);
                r.policy = v;
            }
            Part::Services => {
                let sopts = o.services();
                let (info, v) = sys::part("services", o.window(), || services::run(&sopts));
                r.parts.push(info);
                r.services = v;
            }
            Part::Scale => {
                let sopts = scale::Options::new(
                    o.quick,
                    &o.hosts,
                    &o.scale_stores,
                    o.scale_timeout,
                    o.scale_pace_ms,
                    o.scale_settle,
                );
                let (info, v) = sys::part("scale", o.window(), || scale::run(&sopts));
                r.parts.push(info);
                r.scale = v;
            }
        }
    }
    r.seconds = started.elapsed().as_secs_f64();
    r.missing = report::missing(&r);
    r
}
