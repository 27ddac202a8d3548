//! The fault scheduler: until the run stops, a fault every so often
//! (exponential, mean `fault_every`, capped at [`WAIT_CAP`] means, from the
//! run's seed), one at a time, each waited on until healed and recorded as
//! a [`Fault`].
//!
//! The kind is one of the least injected so far ([`pick`]: a short run
//! covers many kinds), among those that apply to the store
//! ([`applicable`]); the host is random. What each kind does and when it
//! counts as healed:
//!
//! | kind | injection (start..end) | healed when |
//! |---|---|---|
//! | NetdTerm / NetdKill | SIGTERM (waited) / SIGKILL; netd started again | its status answers with the store up and the tunnel has a route per peer |
//! | EtcdStop / EtcdKill | SIGTERM / SIGKILL of etcd, 3-5 s down, started again | every netd reports the store up |
//! | IptablesFlush / IptablesRestore / NftFlush | see `faults/rules.rs` | weft's chains, jumps and nft tables are back |
//! | VethDeleted | a live churned container's host veth deleted; its runtime DELs it | the DEL answered, no veth and no endpoint left |
//! | UnderlayDown | the host's underlay link down 2-4 s, up (default route put back) | a ping from the host to a probe on another host answers |
//! | ClockJump | the machine's wall clock +180 s for 5 s, set back to the true time | every netd ready, every host record still in the store |
//!
//! Healing is polled every [`POLL`] for the kind's heal limit plus
//! [`OBSERVE_MARGIN`], so a slow heal is measured rather than cut off.
//! A run that stops mid-fault still finishes the injection (netd and etcd
//! running, link up, clock right): the end of the run needs a whole lab.

mod clock;
mod rules;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use weft_model::host_veth_name;
use weft_netd::tunnel::WG_DEVICE;
use weft_tests::HOST_IFACE;

use super::rng::Rng;
use super::timeline::{Fault, FaultKind, Ms};
use super::{churn, StoreKind, World};

/// How often healing is checked.
const POLL: Duration = Duration::from_millis(100);
/// How long past a kind's heal limit healing is still waited for.
pub const OBSERVE_MARGIN: Duration = Duration::from_secs(30);
/// The clock jump: how far ahead and for how long.
pub const CLOCK_JUMP: Duration = Duration::from_secs(180);
const CLOCK_HOLD: Duration = Duration::from_secs(5);
/// The wait between two faults is capped at this many means: an
/// exponential draw of 5+ means (1 in 150) would leave half of a 60 s CI
/// soak without faults.
const WAIT_CAP: f64 = 4.0;
/// The fault scheduler's stream of the run's seed (the churn uses 1..=hosts).
const RNG_STREAM: u64 = 0xFA17;

/// The kinds to inject: `only` (empty: all), without the etcd kinds on
/// another store.
pub fn applicable(only: &[FaultKind], store: StoreKind) -> Vec<FaultKind> {
    let base: &[FaultKind] = if only.is_empty() {
        &FaultKind::ALL
    } else {
        only
    };
    let mut kinds: Vec<FaultKind> = base
        .iter()
        .copied()
        .filter(|k| {
            store == StoreKind::Etcd || !matches!(k, FaultKind::EtcdStop | FaultKind::EtcdKill)
        })
        .collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

/// One of the least injected `kinds` so far (uniformly among them).
pub fn pick(kinds: &[FaultKind], counts: &BTreeMap<FaultKind, u32>, rng: &mut Rng) -> FaultKind {
    let count = |k: &FaultKind| counts.get(k).copied().unwrap_or(0);
    let least = kinds.iter().map(count).min().unwrap_or(0);
    let fewest: Vec<FaultKind> = kinds
        .iter()
        .copied()
        .filter(|k| count(k) == least)
        .collect();
    fewest[rng.below(fewest.len() as u64) as usize]
}

/// Injects faults until the run stops.
pub fn run(w: &World) -> Result<()> {
    let kinds = applicable(&w.opts.faults, w.store);
    let mut rng = Rng::new(w.opts.seed, RNG_STREAM);
    let mut counts = BTreeMap::new();
    if kinds.is_empty() {
        while w.sleep(Duration::from_secs(1)) {}
        return Ok(());
    }
    loop {
        let mean = w.opts.fault_every.as_secs_f64();
        let wait = rng.exp(mean).min(WAIT_CAP * mean);
        if !w.sleep(Duration::from_secs_f64(wait)) {
            return Ok(());
        }
        let kind = pick(&kinds, &counts, &mut rng);
        let host = rng.below(w.hosts() as u64) as usize;
        *counts.entry(kind).or_insert(0) += 1;
        let fault = inject(w, kind, host, &mut rng)
            .with_context(|| format!("injecting {} on host {host}", kind.label()))?;
        let Some(fault) = fault else { continue };
        eprintln!("soak fault: {}", line(&fault));
        w.rec.with(|t| t.faults.push(fault));
    }
}

/// One line per fault: kind, host, heal time.
fn line(f: &Fault) -> String {
    let on = f
        .host
        .map_or_else(|| "the cluster".to_owned(), |h| format!("host {h}"));
    let healed = match f.healed_ms {
        Some(h) => format!(
            "healed {} ms after it ended (limit {} ms)",
            h.saturating_sub(f.end_ms),
            f.kind.heal_limit_ms()
        ),
        None => format!("NOT healed ({} ms limit)", f.kind.heal_limit_ms()),
    };
    format!(
        "{} on {on}: {} ms long, {healed}; {}",
        f.kind.label(),
        f.end_ms.saturating_sub(f.start_ms),
        f.detail
    )
}

fn inject(w: &World, kind: FaultKind, host: usize, rng: &mut Rng) -> Result<Option<Fault>> {
    match kind {
        FaultKind::NetdTerm | FaultKind::NetdKill => netd_restart(w, kind, host).map(Some),
        FaultKind::EtcdStop | FaultKind::EtcdKill => etcd_outage(w, kind, rng),
        FaultKind::IptablesFlush | FaultKind::IptablesRestore | FaultKind::NftFlush => {
            rules::wipe(w, kind, host)
        }
        FaultKind::VethDeleted => veth_deleted(w, host, rng),
        FaultKind::UnderlayDown => underlay_down(w, host, rng).map(Some),
        FaultKind::ClockJump => clock_jump(w).map(Some),
    }
}

/// Polls `healed` every [`POLL`] from now until it holds: when it did; None
/// once `kind`'s heal limit plus [`OBSERVE_MARGIN`] after `end_ms` passed.
/// Does not stop with the run: a fault's heal time is measured to the end.
fn wait_healed(
    w: &World,
    kind: FaultKind,
    end_ms: Ms,
    mut healed: impl FnMut() -> bool,
) -> Option<Ms> {
    let deadline = end_ms + kind.heal_limit_ms() + OBSERVE_MARGIN.as_millis() as Ms;
    loop {
        if healed() {
            return Some(w.rec.now_ms());
        }
        if w.rec.now_ms() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// The first line of an error, shortened, for a fault's detail.
fn short(e: impl std::fmt::Display) -> String {
    let s = e.to_string();
    let first = s.lines().next().unwrap_or_default();
    first.chars().take(200).collect()
}

/// netd on host `h` answers its status and sees its store.
fn netd_ready(w: &World, h: usize) -> bool {
    let out = {
        let netd = w.netds[h].lock().unwrap_or_else(|p| p.into_inner());
        netd.cli(&["status", "--json"])
    };
    let Ok(out) = out else { return false };
    out.status.success()
        && serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v["store_ok"].as_bool())
            == Some(true)
}

/// Routes through the tunnel device on host `h`.
fn tunnel_routes(w: &World, h: usize) -> usize {
    w.lab
        .host(h)
        .netns()
        .ip(["-4", "route", "show", "dev", WG_DEVICE])
        .map(|out| out.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0)
}

fn netd_restart(w: &World, kind: FaultKind, h: usize) -> Result<Fault> {
    let mut detail = String::new();
    let (start_ms, end_ms) = {
        let mut netd = w.netds[h].lock().unwrap_or_else(|p| p.into_inner());
        let start_ms = w.rec.now_ms();
        if kind == FaultKind::NetdTerm {
            if let Err(e) = netd.stop() {
                detail = format!("; the stop: {}", short(e));
            }
        } else {
            netd.kill();
        }
        let end_ms = w.rec.now_ms();
        if let Err(e) = netd.start_again() {
            detail.push_str(&format!("; first start failed: {}", short(e)));
            std::thread::sleep(Duration::from_secs(1));
            netd.start_again()
                .with_context(|| format!("starting netd on host {h} again"))?;
        }
        (start_ms, end_ms)
    };
    let peers = w.hosts() - 1;
    let healed_ms = wait_healed(w, kind, end_ms, || {
        netd_ready(w, h) && tunnel_routes(w, h) >= peers
    });
    Ok(Fault {
        kind,
        host: Some(h),
        start_ms,
        end_ms,
        healed_ms,
        detail: format!(
            "netd stopped and started again; healed: status answers with the store up and {peers} tunnel routes{detail}"
        ),
    })
}

/// Whether process `pid` is gone or a zombie.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

fn etcd_outage(w: &World, kind: FaultKind, rng: &mut Rng) -> Result<Option<Fault>> {
    let hold = Duration::from_millis(rng.between(3_000, 5_000));
    let (start_ms, end_ms, how) = {
        let mut guard = w.etcd.lock().unwrap_or_else(|p| p.into_inner());
        let Some(etcd) = guard.as_mut() else {
            return Ok(None);
        };
        let start_ms = w.rec.now_ms();
        let how = if kind == FaultKind::EtcdStop {
            let pid = etcd.pid().ok_or_else(|| anyhow!("etcd is not running"))?;
            // SAFETY: kill(2) with a pid of our own child and a valid signal.
            if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
                return Err(std::io::Error::last_os_error()).context("SIGTERM to etcd");
            }
            let t = Instant::now();
            while !exited(pid) && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            format!("SIGTERM (exited after {} ms)", t.elapsed().as_millis())
        } else {
            etcd.stop();
            "SIGKILL".to_owned()
        };
        std::thread::sleep(hold);
        let mut tries = 0;
        while let Err(e) = etcd.restart() {
            tries += 1;
            if tries >= 3 {
                return Err(e).context("starting etcd again");
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        (start_ms, w.rec.now_ms(), how)
    };
    let healed_ms = wait_healed(w, kind, end_ms, || (0..w.hosts()).all(|h| netd_ready(w, h)));
    Ok(Some(Fault {
        kind,
        host: None,
        start_ms,
        end_ms,
        healed_ms,
        detail: format!(
            "etcd {how}, down {} ms, started again; healed: every netd reports the store up",
            hold.as_millis()
        ),
    }))
}

fn veth_deleted(w: &World, h: usize, rng: &mut Rng) -> Result<Option<Fault>> {
    let live = churn::live(w);
    let on_host: Vec<_> = live.iter().filter(|l| l.host == h).collect();
    let pool: Vec<_> = if on_host.is_empty() {
        live.iter().collect()
    } else {
        on_host
    };
    if pool.is_empty() {
        return Ok(None);
    }
    let victim = pool[rng.below(pool.len() as u64) as usize].clone();
    let host = victim.host;
    let ns = w.lab.host(host).netns();
    let veth = host_veth_name(&victim.id, churn::IFNAME);
    let start_ms = w.rec.now_ms();
    if let Err(e) = ns.ip(["link", "del", &veth]) {
        // The churn deleted it in between: nothing was injected.
        if churn::live(w).iter().all(|l| l.id != victim.id) {
            return Ok(None);
        }
        return Err(e).with_context(|| format!("deleting veth {veth} of {}", victim.id));
    }
    let end_ms = w.rec.now_ms();
    // The runtime notices its container broken and DELs it (unless the
    // churn got there first: then its DEL is waited for).
    let mut detail = match churn::delete(w, &victim.id) {
        Ok(true) => "DELed at once by the runtime".to_owned(),
        Ok(false) => "DELed by the churn".to_owned(),
        Err(e) => format!("its DEL failed: {}", short(format!("{e:#}"))),
    };
    let quoted = format!("\"{}\"", victim.id);
    let healed_ms = wait_healed(w, FaultKind::VethDeleted, end_ms, || {
        let deleted = w.rec.with(|t| {
            t.lives
                .iter()
                .rev()
                .find(|l| l.id == victim.id)
                .is_some_and(|l| l.deleted_ms.is_some())
        });
        let veth_gone = ns.ip(["link", "show", &veth]).is_err();
        let endpoint_gone = {
            let netd = w.netds[host].lock().unwrap_or_else(|p| p.into_inner());
            netd.cli(&["endpoints", "--json"]).is_ok_and(|o| {
                o.status.success() && !String::from_utf8_lossy(&o.stdout).contains(&quoted)
            })
        };
        deleted && veth_gone && endpoint_gone
    });
    detail = format!(
        "veth {veth} of {} deleted behind weft's back; {detail}; healed: DEL answered, no veth, no endpoint",
        victim.id
    );
    Ok(Some(Fault {
        kind: FaultKind::VethDeleted,
        host: Some(host),
        start_ms,
        end_ms,
        healed_ms,
        detail,
    }))
}

fn underlay_down(w: &World, h: usize, rng: &mut Rng) -> Result<Fault> {
    let hold = Duration::from_millis(rng.between(2_000, 4_000));
    let ns = w.lab.host(h).netns();
    let defaults: Vec<String> = ns
        .ip(["-4", "route", "show", "default"])?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    let other = (h + 1) % w.hosts();
    let target = w
        .probes
        .iter()
        .find(|p| p.life.host == other)
        .map(|p| p.life.addr.to_string())
        .ok_or_else(|| anyhow!("no probe on host {other}"))?;
    let start_ms = w.rec.now_ms();
    ns.ip(["link", "set", HOST_IFACE, "down"])?;
    std::thread::sleep(hold);
    // Up it must come: retried.
    let mut tries = 0;
    while let Err(e) = ns.ip(["link", "set", HOST_IFACE, "up"]) {
        tries += 1;
        if tries >= 20 {
            return Err(e).context("setting the underlay link up again");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The link going down took the default route with it; the host's
    // network manager would put it back.
    for route in &defaults {
        let mut argv = vec!["route", "replace"];
        argv.extend(route.split_whitespace());
        ns.ip(argv)
            .with_context(|| format!("putting back the route {route}"))?;
    }
    let end_ms = w.rec.now_ms();
    let healed_ms = wait_healed(w, FaultKind::UnderlayDown, end_ms, || {
        ns.output(["ping", "-c1", "-W1", "-q", &target])
            .is_ok_and(|o| o.status.success())
    });
    Ok(Fault {
        kind: FaultKind::UnderlayDown,
        host: Some(h),
        start_ms,
        end_ms,
        healed_ms,
        detail: format!(
            "{HOST_IFACE} down {} ms, up; healed: ping to probe {target} on host {other} answers",
            hold.as_millis()
        ),
    })
}

/// The host records in the store (read from inside the lab: etcd listens
/// on the underlay).
fn store_hosts(w: &World, rt: &tokio::runtime::Runtime) -> Result<usize> {
    let config: weft_store::StoreConfig = w.store_url.parse()?;
    let keys = weft_model::Keys::default();
    rt.block_on(async {
        let store = weft_store::open(&config).await?;
        let range = store.get_prefix(&keys.hosts()).await?;
        Ok(range.kvs.len())
    })
}

fn clock_jump(w: &World) -> Result<Fault> {
    let start_ms = w.rec.now_ms();
    let jump = clock::ClockJump::ahead(CLOCK_JUMP).context("setting the wall clock ahead")?;
    std::thread::sleep(CLOCK_HOLD);
    jump.restore().context("setting the wall clock back")?;
    let end_ms = w.rec.now_ms();
    let hosts = w.hosts();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut last_err = String::new();
    let healed_ms = weft_tests::in_netns(w.lab.underlay().path(), || {
        wait_healed(w, FaultKind::ClockJump, end_ms, || {
            if !(0..hosts).all(|h| netd_ready(w, h)) {
                return false;
            }
            match store_hosts(w, &rt) {
                Ok(n) => n >= hosts,
                Err(e) => {
                    last_err = short(format!("{e:#}"));
                    false
                }
            }
        })
    });
    let mut detail = format!(
        "wall clock +{} s for {} s, set back to the true time; healed: every netd ready, {hosts} host records in the store",
        CLOCK_JUMP.as_secs(),
        CLOCK_HOLD.as_secs()
    );
    if healed_ms.is_none() && !last_err.is_empty() {
        detail.push_str(&format!(" (store: {last_err})"));
    }
    Ok(Fault {
        kind: FaultKind::ClockJump,
        host: None,
        start_ms,
        end_ms,
        healed_ms,
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_kinds_only_on_etcd() {
        let sqlite = applicable(&[], StoreKind::Sqlite);
        assert_eq!(sqlite.len(), FaultKind::ALL.len() - 2);
        assert!(!sqlite.contains(&FaultKind::EtcdStop) && !sqlite.contains(&FaultKind::EtcdKill));
        assert_eq!(applicable(&[], StoreKind::Etcd).len(), FaultKind::ALL.len());
        assert_eq!(
            applicable(
                &[
                    FaultKind::EtcdKill,
                    FaultKind::NftFlush,
                    FaultKind::NftFlush
                ],
                StoreKind::Sqlite
            ),
            vec![FaultKind::NftFlush]
        );
    }

    #[test]
    fn pick_covers_every_kind_before_repeating() {
        let kinds = applicable(&[], StoreKind::Etcd);
        let mut rng = Rng::new(3, RNG_STREAM);
        let mut counts = BTreeMap::new();
        for round in 1..=3u32 {
            for _ in 0..kinds.len() {
                let k = pick(&kinds, &counts, &mut rng);
                *counts.entry(k).or_insert(0) += 1;
            }
            assert!(kinds.iter().all(|k| counts[k] == round), "{counts:?}");
        }
    }

    #[test]
    fn pick_replays_with_the_seed() {
        let kinds = applicable(&[], StoreKind::Sqlite);
        let seq = |seed| {
            let mut rng = Rng::new(seed, RNG_STREAM);
            let mut counts = BTreeMap::new();
            (0..20)
                .map(|_| {
                    let k = pick(&kinds, &counts, &mut rng);
                    *counts.entry(k).or_insert(0) += 1;
                    k
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(seq(9), seq(9));
        assert_ne!(seq(9), seq(10));
    }

    #[test]
    fn exited_reads_proc() {
        assert!(!exited(std::process::id()));
        assert!(exited(u32::MAX - 1));
    }
}
