//! The sampler: what each lab host and the store hold, over time, as plain
//! counts for the invariants ([`HostSample`], [`StoreSample`]).
//!
//! * every second, per host: netd's pid (a restart changes it), its RSS,
//!   fds and sockets (`/proc`), the same of dnsd (every `dnsd` pid in the
//!   namespace: one, two during a handover; the figures when one), the
//!   container veths on weft's bridge and
//!   the routes on the tunnel device (`ip -n`), the rules in weft's
//!   iptables chains and whether every jump into them is there (one
//!   `iptables-save` of netd's backend), weft's nf_tables tables
//!   (`nft list tables`); every [`CONNTRACK_EVERY`] also the conntrack
//!   entries of addresses deleted longer ago than the checkers' grace and
//!   held by no live container (`conntrack -L`);
//! * every [`STORE_EVERY`], on a thread inside the underlay namespace
//!   (etcd listens there): IPAM's addresses with their holders
//!   (`weft_ipam`'s listing) and the endpoint records. A store that does
//!   not answer (an etcd fault) gives `reachable: false`, never an error.
//!
//! [`final_samples`] takes the last ones after the churned containers are
//! gone, once things settled (or [`SETTLE_LIMIT`] passed).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use weft_ipam::{HostBlock, Ipam, IpamConfig};
use weft_model::{host_veth_name, is_host_veth_name, EndpointRecord, Keys};
use weft_netd::command::Runner;
use weft_netd::config::settings::DEFAULT_BRIDGE;
use weft_netd::conntrack::Conntrack;
use weft_netd::nat::{hooks, Iptables, CHAINS};
use weft_netd::nft::TABLES;
use weft_store::{DynStore, StoreConfig};
use weft_tests::Netns;

use super::invariants::{CheckOptions, Process, CONTAINER_IFNAME};
use super::timeline::{HostSample, Life, Ms, StoreSample};
use super::World;
use crate::scale::observe;

/// How often each host is sampled.
pub const HOST_EVERY: Duration = Duration::from_secs(1);
/// How often conntrack is listed (the costliest read).
pub const CONNTRACK_EVERY: u64 = 3;
/// How often the store is read.
pub const STORE_EVERY: Duration = Duration::from_secs(3);
/// How long one store read may take before the store counts as unreachable.
const STORE_TIMEOUT: Duration = Duration::from_secs(4);
/// How long [`final_samples`] waits for the churned containers' veths and
/// addresses to go.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// Until the run stops: host samples every second, store samples every
/// few seconds.
pub fn run(w: &World) -> Result<()> {
    std::thread::scope(|s| {
        let store = s.spawn(|| {
            weft_tests::in_netns(w.lab.underlay().path(), || {
                let mut r = StoreReader::new(&w.store_url)?;
                while !w.stopped() {
                    let sample = r.sample(w.rec.now_ms());
                    w.rec.with(|t| t.store.push(sample));
                    w.sleep(STORE_EVERY);
                }
                Ok::<(), anyhow::Error>(())
            })
        });
        let mut hosts = HostReaders::new(w);
        let mut round = 0u64;
        while !w.stopped() {
            let t0 = Instant::now();
            let samples = hosts.sample_all(w, round.is_multiple_of(CONNTRACK_EVERY));
            w.rec.with(|t| t.hosts.extend(samples));
            round += 1;
            w.sleep(HOST_EVERY.saturating_sub(t0.elapsed()));
        }
        store
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the store sampler panicked")))
    })
}

/// After the run (the churned containers deleted): waits until only the
/// probes' veths and addresses are left (at most [`SETTLE_LIMIT`]), then
/// takes one last sample of every host and of the store.
pub fn final_samples(w: &World) -> Result<()> {
    let probe_veths: HashSet<(usize, String)> = w
        .probes
        .iter()
        .map(|p| (p.life.host, host_veth_name(&p.life.id, CONTAINER_IFNAME)))
        .collect();
    let probe_addrs: HashSet<Ipv4Addr> = w.probes.iter().map(|p| p.life.addr).collect();
    weft_tests::in_netns(w.lab.underlay().path(), || {
        let mut store = StoreReader::new(&w.store_url)?;
        let mut hosts = HostReaders::new(w);
        let t0 = Instant::now();
        loop {
            let veths_gone = (0..w.hosts()).all(|h| {
                bridge_veths(w.lab.host(h))
                    .iter()
                    .all(|v| probe_veths.contains(&(h, v.clone())))
            });
            let s = store.sample(w.rec.now_ms());
            let addrs_gone =
                s.reachable && s.ipam_addrs.iter().all(|(a, _)| probe_addrs.contains(a));
            if (veths_gone && addrs_gone) || t0.elapsed() >= SETTLE_LIMIT {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let samples = hosts.sample_all(w, true);
        let s = store.sample(w.rec.now_ms());
        w.rec.with(|t| {
            t.hosts.extend(samples);
            t.store.push(s);
        });
        Ok(())
    })
}

/// Per host, what is worth keeping between samples: the iptables backend
/// netd uses (detected once).
struct HostReaders {
    iptables: Vec<Option<Iptables>>,
}

impl HostReaders {
    fn new(w: &World) -> HostReaders {
        HostReaders {
            iptables: (0..w.hosts()).map(|_| None).collect(),
        }
    }

    /// One sample of every host (with conntrack or not).
    fn sample_all(&mut self, w: &World, conntrack: bool) -> Vec<HostSample> {
        let dead = conntrack.then(|| {
            let grace = CheckOptions::default().conntrack_grace_ms;
            let now = w.rec.now_ms();
            w.rec.with(|t| dead_addrs(&t.lives, now, grace))
        });
        (0..w.hosts())
            .map(|h| {
                let ns: &Netns = w.lab.host(h);
                if self.iptables[h].is_none() {
                    self.iptables[h] = Iptables::detect_in_netns(ns.name()).ok();
                }
                host_sample(
                    w.rec.now_ms(),
                    h,
                    ns,
                    self.iptables[h].as_ref(),
                    dead.as_ref(),
                )
            })
            .collect()
    }
}

/// The addresses whose container's DEL answered more than `grace_ms` before
/// `now` and that no container holds now (live, or deleted within the
/// grace).
pub fn dead_addrs(lives: &[Life], now: Ms, grace_ms: Ms) -> HashSet<Ipv4Addr> {
    let mut held = HashSet::new();
    let mut dead = HashSet::new();
    for l in lives {
        match l.deleted_ms {
            Some(d) if d + grace_ms < now => {
                dead.insert(l.addr);
            }
            _ => {
                held.insert(l.addr);
            }
        }
    }
    dead.retain(|a| !held.contains(a));
    dead
}

fn host_sample(
    t_ms: Ms,
    host: usize,
    ns: &Netns,
    iptables: Option<&Iptables>,
    dead: Option<&HashSet<Ipv4Addr>>,
) -> HostSample {
    let procs = ns.pids().unwrap_or_default();
    let pid = match named(&procs, Process::Netd.name())[..] {
        [p] => Some(p),
        _ => None,
    };
    let (fds, sockets) = pid.and_then(fd_counts).unzip();
    let dnsd_pids = named(&procs, Process::Dnsd.name());
    let dnsd = match dnsd_pids[..] {
        [p] => Some(p),
        _ => None,
    };
    let (dnsd_fds, dnsd_sockets) = dnsd.and_then(fd_counts).unzip();
    let (iptables_rules, iptables_jumps_ok) = iptables
        .and_then(|i| i.save().ok())
        .map_or((0, false), |s| weft_rules(&s));
    HostSample {
        t_ms,
        host,
        netd_pid: pid,
        rss_kib: pid.and_then(rss_kib),
        fds,
        sockets,
        dnsd_pids,
        dnsd_rss_kib: dnsd.and_then(rss_kib),
        dnsd_fds,
        dnsd_sockets,
        veths: bridge_veths(ns),
        tunnel_routes: observe::wg_routes(ns).len(),
        iptables_rules,
        iptables_jumps_ok,
        nft_tables: ns
            .output(["nft", "list", "tables"])
            .ok()
            .filter(|o| o.status.success())
            .map(|o| weft_tables(&String::from_utf8_lossy(&o.stdout)))
            .unwrap_or_default(),
        conntrack_dead: dead
            .filter(|d| !d.is_empty())
            .and_then(|d| {
                let entries = Conntrack::new(Runner::new(Some(ns.name()))).list().ok()?;
                let mut found: Vec<Ipv4Addr> = entries
                    .iter()
                    .flat_map(|e| {
                        let mut a = vec![e.tuple.src, e.tuple.dst];
                        if let Some(r) = e.reply {
                            a.extend([r.0, r.1]);
                        }
                        a
                    })
                    .filter(|a| d.contains(a))
                    .collect();
                found.sort_unstable();
                found.dedup();
                Some(found)
            })
            .unwrap_or_default(),
    }
}

/// The pids among `pids` whose process is named `comm` (netd is the one
/// `observe::netd_pid` finds; read here from one listing for both).
fn named(pids: &[u32], comm: &str) -> Vec<u32> {
    pids.iter()
        .copied()
        .filter(|&p| crate::sys::proc_comm(p).as_deref() == Some(comm))
        .collect()
}

/// A process's VmRSS, KiB (None: it is gone).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    observe::vm_rss_kb(&status)
}

/// A process's open fds and, of them, sockets (None: it is gone).
fn fd_counts(pid: u32) -> Option<(u64, u64)> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let (mut fds, mut sockets) = (0, 0);
    for e in dir.flatten() {
        fds += 1;
        if std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")) {
            sockets += 1;
        }
    }
    Some((fds, sockets))
}

/// The container veths (weft's naming) on weft's bridge in `ns`.
fn bridge_veths(ns: &Netns) -> Vec<String> {
    ns.ip(["-o", "link", "show", "master", DEFAULT_BRIDGE])
        .map(|out| link_names(&out))
        .unwrap_or_default()
}

/// The names in an `ip -o link show` listing that follow weft's host veth
/// scheme (`7: wvabc@if2: <...` → `wvabc`).
pub fn link_names(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| is_host_veth_name(n))
        .collect()
}

/// From an `iptables-save`: the rules in weft's chains ([`CHAINS`]), and
/// whether every jump into them ([`hooks`]) is there.
pub fn weft_rules(save: &str) -> (usize, bool) {
    let mut table = "";
    let mut rules = 0;
    let mut jumps: HashMap<(&str, String), bool> = hooks()
        .iter()
        .map(|h| ((h.table, h.save_line()), false))
        .collect();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            if CHAINS.iter().any(|&(t, c)| t == table && c == chain) {
                rules += 1;
            }
            for ((t, want), seen) in jumps.iter_mut() {
                if *t == table && line.trim_end() == want {
                    *seen = true;
                }
            }
        }
    }
    (rules, jumps.values().all(|&s| s))
}

/// weft's tables ([`TABLES`]) in an `nft list tables` listing, as
/// `family name`.
pub fn weft_tables(list: &str) -> Vec<String> {
    list.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next()) {
                (Some("table"), Some(f), Some(n)) if TABLES.contains(&(f, n)) => {
                    Some(format!("{f} {n}"))
                }
                _ => None,
            }
        })
        .collect()
}

/// Reads the store from a thread inside the underlay namespace: opened
/// lazily, again after a failure.
struct StoreReader {
    rt: tokio::runtime::Runtime,
    config: StoreConfig,
    open: Option<(DynStore, Ipam)>,
}

impl StoreReader {
    /// For `url` as netd gets it (`etcd:URL`, `sqlite:PATH`).
    fn new(url: &str) -> Result<StoreReader> {
        let mut config: StoreConfig = url.parse().with_context(|| format!("the store {url}"))?;
        if let StoreConfig::Etcd(e) = &mut config {
            e.connect_timeout = Duration::from_secs(1);
            e.request_timeout = Duration::from_secs(2);
        }
        Ok(StoreReader {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            config,
            open: None,
        })
    }

    /// One sample at `t_ms`; `reachable: false` if the store did not
    /// answer in time.
    fn sample(&mut self, t_ms: Ms) -> StoreSample {
        let read = self.rt.block_on(async {
            tokio::time::timeout(STORE_TIMEOUT, async {
                if self.open.is_none() {
                    let store = weft_store::open(&self.config).await.ok()?;
                    let keys = Keys::default();
                    let ipam = Ipam::new(store.clone(), IpamConfig::default(), keys.root())
                        .await
                        .ok()?;
                    self.open = Some((store, ipam));
                }
                let (store, ipam) = self.open.as_ref()?;
                read_store(store, ipam).await
            })
            .await
            .ok()
            .flatten()
        });
        match read {
            Some((ipam_addrs, endpoints)) => StoreSample {
                t_ms,
                ipam_addrs,
                endpoints,
                reachable: true,
            },
            None => {
                // Open it again next time: a new connection, a new plan check.
                self.open = None;
                StoreSample {
                    t_ms,
                    reachable: false,
                    ..StoreSample::default()
                }
            }
        }
    }
}

type StoreLists = (Vec<(Ipv4Addr, String)>, Vec<(String, Ipv4Addr)>);

/// IPAM's addresses (every leased block's) with their holders, and the
/// endpoint records' containers and addresses.
async fn read_store(store: &DynStore, ipam: &Ipam) -> Option<StoreLists> {
    let mut addrs = Vec::new();
    for b in ipam.block_leases().await.ok()? {
        let block = HostBlock {
            block: b.block,
            gateway: weft_ipam::plan::gateway(b.block),
            host_id: b.host_id,
        };
        for a in ipam.list(&block).await.ok()? {
            addrs.push((a.addr, a.owner.container_id));
        }
    }
    let eps = store.get_prefix(&Keys::default().endpoints()).await.ok()?;
    let endpoints = eps
        .kvs
        .iter()
        .filter_map(|kv| weft_store::decode_json::<EndpointRecord>(kv, "endpoint record"))
        .map(|r| (r.container_id.to_string(), r.address.ip()))
        .collect();
    Some((addrs, endpoints))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veths_are_read_from_a_link_listing() {
        let name = host_veth_name("abc", CONTAINER_IFNAME);
        let out = format!(
            "7: {name}@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1420 qdisc noqueue master weft0 state UP\n\
             9: other@if3: <BROADCAST> mtu 1500 master weft0\n"
        );
        assert_eq!(link_names(&out), vec![name]);
        assert!(link_names("").is_empty());
    }

    #[test]
    fn weft_rules_count_weft_chains_and_see_the_jumps() {
        let mut save = String::new();
        for t in ["filter", "nat", "mangle"] {
            save.push_str(&format!("*{t}\n"));
            for h in hooks().iter().filter(|h| h.table == t) {
                save.push_str(&h.save_line());
                save.push('\n');
            }
            for &(_, c) in CHAINS.iter().filter(|(tt, _)| *tt == t) {
                save.push_str(&format!(":{c} - [0:0]\n-A {c} -j ACCEPT\n"));
            }
            save.push_str("-A FORWARD -j DOCKER\nCOMMIT\n");
        }
        assert_eq!(weft_rules(&save), (CHAINS.len(), true));
        // A wipe of the jumps (a firewall reload keeping the chains).
        let first = hooks()[0].save_line();
        let wiped = save.replacen(&format!("{first}\n"), "", 1);
        assert_eq!(weft_rules(&wiped), (CHAINS.len(), false));
        // A jump in the wrong table does not count.
        assert_eq!(weft_rules(""), (0, false));
    }

    #[test]
    fn weft_tables_are_picked_from_the_listing() {
        let list = "table inet weft\ntable ip filter\ntable ip weft_svc\ntable bridge weft\n";
        assert_eq!(
            weft_tables(list),
            vec!["inet weft", "ip weft_svc", "bridge weft"]
        );
    }

    fn life(addr: &str, deleted: Option<Ms>) -> Life {
        Life {
            id: addr.into(),
            host: 0,
            name: addr.into(),
            service: None,
            stack: None,
            aliases: vec![],
            ports: vec![],
            addr: addr.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
            add_sent_ms: 0,
            added_ms: 0,
            del_sent_ms: deleted,
            deleted_ms: deleted,
            probe: false,
        }
    }

    #[test]
    fn dead_addresses_are_deleted_past_the_grace_and_not_held_again() {
        let lives = vec![
            life("10.42.0.5", Some(1_000)),
            life("10.42.0.6", Some(1_000)),
            life("10.42.0.6", None),
            life("10.42.0.7", Some(9_000)),
            life("10.42.0.8", None),
        ];
        let dead = dead_addrs(&lives, 10_000, 3_000);
        assert_eq!(dead, HashSet::from([Ipv4Addr::new(10, 42, 0, 5)]));
    }

    /// A real lab (root, netd and the plugin built): two hosts, one
    /// container on h0; one sample of h0 and of the store shows it all,
    /// cheaply.
    #[test]
    #[ignore = "root lab test: cargo test -p weft-bench sample -- --ignored"]
    fn a_lab_host_and_its_store_are_sampled() {
        if !weft_tests::root_or_skip("a_lab_host_and_its_store_are_sampled") {
            return;
        }
        let lab = weft_tests::Lab::new(weft_tests::LabOptions::hosts(2)).expect("lab");
        let url = format!("sqlite:{}", lab.dir().join("store.db").display());
        let netds: Vec<_> = (0..2)
            .map(|h| weft_tests::weft::Netd::start(&lab, h, &url, &[]).expect("netd"))
            .collect();
        let c = lab.container(0, "s0").expect("container");
        let id = "sample00000000000001";
        let addr: Ipv4Addr = netds[0]
            .attach(&c, id)
            .expect("attach")
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .expect("an address");
        let ns: &Netns = lab.host(0);
        let ipt = Iptables::detect_in_netns(ns.name()).expect("iptables");
        // Routes to the other host come with its record: wait for them.
        weft_tests::wait_until(Duration::from_secs(10), "the tunnel route", || {
            observe::wg_routes(ns).len() == 1
        })
        .expect("route");
        let cpu0 = crate::sys::cpu_ticks();
        let t0 = Instant::now();
        let dead = HashSet::from([Ipv4Addr::new(10, 99, 0, 1)]);
        let s = host_sample(7, 0, ns, Some(&ipt), Some(&dead));
        let took = t0.elapsed();
        let cpu1 = crate::sys::cpu_ticks();
        eprintln!(
            "one host sample: {took:?} wall, {} busy ticks machine-wide; {s:?}",
            cpu1.0 - cpu0.0
        );
        assert!(s.netd_pid.is_some());
        assert!(s.rss_kib.is_some_and(|r| r > 1_000));
        assert!(s.fds.is_some_and(|f| f > 3));
        assert!(s.sockets.is_some_and(|k| k >= 1 && Some(k) <= s.fds));
        assert_eq!(s.dnsd_pids.len(), 1, "{s:?}");
        assert!(s.dnsd_rss_kib.is_some_and(|r| r > 500));
        assert!(s
            .dnsd_sockets
            .is_some_and(|k| k >= 1 && Some(k) <= s.dnsd_fds));
        assert_eq!(s.veths, vec![host_veth_name(id, CONTAINER_IFNAME)]);
        assert_eq!(s.tunnel_routes, 1);
        assert!(s.iptables_rules > 0 && s.iptables_jumps_ok, "{s:?}");
        assert!(!s.nft_tables.is_empty());
        assert!(s.conntrack_dead.is_empty());
        let mut r = StoreReader::new(&url).expect("reader");
        let st = r.sample(8);
        assert!(st.reachable);
        assert!(st.ipam_addrs.contains(&(addr, id.to_string())), "{st:?}");
        assert!(st.endpoints.contains(&(id.to_string(), addr)), "{st:?}");
        // A store that is not there answers unreachable, no error.
        let mut gone = StoreReader::new("etcd:http://127.0.0.1:1").expect("reader");
        assert!(!gone.sample(9).reachable);
    }
}
