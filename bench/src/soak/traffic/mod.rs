//! The soak's traffic between the probe containers (never churned), for
//! the whole run:
//!
//! * DNS ([`dns`]): one client per probe, `dns_per_s` queries a second
//!   spread over them, names chosen by [`names`], each answer judged
//!   against the lives at that moment;
//! * flows ([`flows`]): for each host i, from its first probe to the
//!   second probe of host (i+1) mod n (always another host): pings and UDP
//!   every 10 ms and one long TCP stream, recording every gap ([`gaps`])
//!   and every broken stream.
//!
//! Every part runs on a thread of its own in its source's namespace; a
//! part that cannot start (a socket refused) stops the whole run, as a
//! soak without its probes would measure nothing.

pub mod dns;
pub mod flows;
pub mod gaps;
pub mod names;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, Context, Result};
use weft_tests::probe::ProbeServer;

use super::timeline::{Life, Ms, Recorder};
use super::{Probe, World};
use flows::FlowEnds;

/// What the traffic threads share: the recorder and the stop flag.
pub struct Ctx<'a> {
    pub rec: &'a Recorder,
    pub stop: &'a AtomicBool,
}

impl Ctx<'_> {
    pub fn now(&self) -> Ms {
        self.rec.now_ms()
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Runs one part; if it fails, the whole run stops.
    fn part(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let r = f();
        if r.is_err() {
            self.stop.store(true, Ordering::Relaxed);
        }
        r
    }
}

/// Runs the DNS clients and the flows until the run stops; returns when
/// every thread is joined.
pub fn run(w: &World) -> Result<()> {
    let ctx = Ctx {
        rec: &w.rec,
        stop: &w.stop,
    };
    run_between(&ctx, &w.probes, w.opts.dns_per_s, w.opts.seed)
}

/// [`run`] on `probes` (the DNS clients' rate across them all, and the
/// seed of their names) until `ctx` stops.
pub fn run_between(ctx: &Ctx, probes: &[Probe], dns_per_s: u32, seed: u64) -> Result<()> {
    let ends = flow_ends(probes);
    let mut servers = Vec::new();
    for f in &ends {
        let dst = probes
            .iter()
            .find(|p| p.life.addr == f.dst)
            .ok_or_else(|| anyhow!("no probe has {}", f.dst))?;
        let server = ProbeServer::start(
            Some(&dst.container.path()),
            flows::SERVER_TAG,
            &[flows::TCP_PORT],
            &[flows::UDP_PORT],
        )
        .with_context(|| format!("probe server in {}", dst.life.name))?;
        servers.push(server);
    }
    let lives = dns::LivesCache::default();
    let per_probe = f64::from(dns_per_s) / probes.len().max(1) as f64;
    let paths: Vec<_> = probes.iter().map(|p| p.container.path()).collect();
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let mut threads = Vec::new();
        for (i, (p, path)) in probes.iter().zip(&paths).enumerate() {
            if per_probe <= 0.0 {
                break;
            }
            let spec = dns::ClientSpec {
                netns: path,
                host: p.life.host,
                per_s: per_probe,
                seed,
                stream: DNS_STREAM + i as u64,
                domain: weft_model::DEFAULT_DOMAIN,
            };
            let lives = &lives;
            threads.push(s.spawn(move || ctx.part(|| dns::client(ctx, &spec, lives))));
        }
        for f in &ends {
            threads.push(s.spawn(move || ctx.part(|| flows::ping(ctx, f))));
            threads.push(s.spawn(move || ctx.part(|| flows::udp(ctx, f))));
            threads.push(s.spawn(move || ctx.part(|| flows::tcp(ctx, f))));
        }
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow!("a traffic thread panicked")))
            })
            .collect()
    });
    drop(servers);
    results.into_iter().collect()
}

/// The DNS clients' random streams (apart from the churn's and faults').
const DNS_STREAM: u64 = 0x0d45_0000;

/// For each host i with probes: from its first probe to the last probe of
/// the next host (in host order) that has one; none with fewer than two
/// hosts.
pub fn flow_ends(probes: &[Probe]) -> Vec<FlowEnds> {
    let mut hosts: Vec<usize> = probes.iter().map(|p| p.life.host).collect();
    hosts.sort_unstable();
    hosts.dedup();
    if hosts.len() < 2 {
        return vec![];
    }
    hosts
        .iter()
        .enumerate()
        .filter_map(|(k, &h)| {
            let next = hosts[(k + 1) % hosts.len()];
            let src = probes.iter().find(|p| p.life.host == h)?;
            let dst = probes.iter().rev().find(|p| p.life.host == next)?;
            Some(FlowEnds {
                name: format!("{}->{}", label(&src.life), label(&dst.life)),
                src: src.container.path(),
                dst: dst.life.addr,
            })
        })
        .collect()
}

/// A probe as flows name it: its name, or its id if it has none.
fn label(l: &Life) -> &str {
    if l.name.is_empty() {
        &l.id
    } else {
        &l.name
    }
}

/// Waits up to `timeout_ms` for `fd` to be readable; whether it is.
pub fn poll_in(fd: RawFd, timeout_ms: Ms) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout_ms.min(i32::MAX as Ms) as libc::c_int;
    // SAFETY: one valid pollfd, alive for the call.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(r > 0)
}

#[cfg(test)]
mod smoke;
