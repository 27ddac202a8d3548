//! Handshake under load (issue 14): weft wireguard's single TCP stream
//! without and during a flood of bogus handshake initiations at 50,000/s
//! from another host of the underlay, measured back to back in one run.
//!
//! The flood ([`weft_tests::flood`]) replays, round robin, initiations with
//! a valid mac1 from random keys (each costs the victim a cookie reply or,
//! within the limiter's budget, a Diffie-Hellman), garbage with a wrong mac1
//! (dropped before any work) and initiations carrying a real cookie from
//! the attacker's address (valid mac2: only the per-source budget stops
//! them). The cookie is fetched first, under a flood, since the victim only
//! demands cookies while over its rate limit. The victim's counters over
//! the flooded stream come from its netd's `/metrics`.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use weft_tests::flood::{self, Flooder};

use super::measure::{iperf, Test};
use super::testbed::{Pair, Victim};
use super::{note_err, Options};
use crate::sys::Fig;

/// The flood rate, initiations per second.
pub const FLOOD_RATE: u64 = 50_000;
/// Distinct initiations of each kind (valid mac1, garbage) in the flood.
const FLOOD_SET: usize = 1000;
/// Initiations carrying the cookie (each costs two DH to make).
const COOKIE_SET: usize = 200;
/// How long to flood for a cookie reply before giving up.
const COOKIE_TIMEOUT: Duration = Duration::from_secs(10);
/// Quiet time after the cookie flood, so that the stream without flood
/// does not see its backlog.
const SETTLE: Duration = Duration::from_secs(1);
/// Time for the victim's receive thread to drain its socket after the
/// flood, before its counters are read.
const DRAIN: Duration = Duration::from_millis(300);

/// What the flood did to weft wireguard.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FloodResult {
    pub label: String,
    /// Initiations per second asked for.
    pub target_rate: u64,
    /// What the flood replays.
    pub packets: String,
    /// Gbit/s received, one TCP stream client → server, just before the
    /// flood.
    pub tcp1_before: Fig,
    /// The same stream during the flood.
    pub tcp1_during: Fig,
    /// Initiations per second the flooder sent during the stream.
    pub flood_rate: Fig,
    /// The victim's counters over the flooded stream (`None`: its
    /// `/metrics` did not answer).
    pub victim: Option<VictimCounters>,
    pub error: Option<String>,
}

impl FloodResult {
    /// Throughput during the flood ÷ without.
    pub fn ratio(&self) -> Option<f64> {
        match (self.tcp1_during.get(), self.tcp1_before.get()) {
            (Some(d), Some(b)) if b > 0.0 => Some(d / b),
            _ => None,
        }
    }

    /// The figures that should have a number.
    pub fn figures(&self) -> [(&'static str, &Fig); 3] {
        [
            ("TCP 1 stream → without flood", &self.tcp1_before),
            ("TCP 1 stream → during the flood", &self.tcp1_during),
            ("flood rate achieved", &self.flood_rate),
        ]
    }
}

/// Growth of the victim's WireGuard counters (netd's `weft_wg_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VictimCounters {
    /// UDP datagrams its WireGuard socket received.
    pub rx_datagrams: u64,
    /// Dropped as malformed (wrong mac1 among them), before any work.
    pub malformed: u64,
    /// Cookie replies sent instead of a Diffie-Hellman.
    pub cookies_sent: u64,
    /// Initiations that got a Diffie-Hellman and named no peer.
    pub dh_unknown_peer: u64,
    /// Initiations stopped by the per-source budget (valid mac2, no DH).
    #[serde(default)]
    pub over_budget: u64,
}

impl VictimCounters {
    /// The counters in one scrape of netd's `/metrics`.
    fn parse(text: &str) -> Result<VictimCounters> {
        let get = |name: &str| metric(text, name).with_context(|| format!("no {name} in /metrics"));
        Ok(VictimCounters {
            rx_datagrams: get("weft_wg_datagrams_total{direction=\"rx\"}")?,
            malformed: get("weft_wg_drops_total{reason=\"malformed\"}")?,
            cookies_sent: get("weft_wg_cookies_sent_total")?,
            dh_unknown_peer: get("weft_wg_drops_total{reason=\"unknown_peer\"}")?,
            over_budget: get("weft_wg_drops_total{reason=\"handshake_budget\"}")?,
        })
    }

    fn since(&self, before: &VictimCounters) -> VictimCounters {
        VictimCounters {
            rx_datagrams: self.rx_datagrams.saturating_sub(before.rx_datagrams),
            malformed: self.malformed.saturating_sub(before.malformed),
            cookies_sent: self.cookies_sent.saturating_sub(before.cookies_sent),
            dh_unknown_peer: self.dh_unknown_peer.saturating_sub(before.dh_unknown_peer),
            over_budget: self.over_budget.saturating_sub(before.over_budget),
        }
    }
}

/// The value of the sample `series` (name and labels as written) in an
/// OpenMetrics text.
fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(series)?.strip_prefix(' ')?;
        v.split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
            .map(|v| v as u64)
    })
}

fn scrape(v: &Victim) -> Result<VictimCounters> {
    let out = v
        .host
        .output(["curl", "-sf", "--max-time", "5", &v.metrics_url])?;
    if !out.status.success() {
        anyhow::bail!("curl {} failed", v.metrics_url);
    }
    VictimCounters::parse(&String::from_utf8_lossy(&out.stdout))
}

/// Measures `p` (weft wireguard) without and during the flood.
pub(super) fn run(p: &Pair, o: &Options) -> FloodResult {
    let mut r = FloodResult {
        label: p.mode.label().into(),
        target_rate: FLOOD_RATE,
        packets: format!(
            "{FLOOD_SET} initiations with a valid mac1 from random keys, {FLOOD_SET} with a wrong mac1, \
             {COOKIE_SET} with the attacker's cookie (valid mac2)"
        ),
        ..FloodResult::default()
    };
    if let Err(e) = measure(p, o, &mut r) {
        note_err(&mut r.error, "handshake flood", e);
    }
    r
}

fn measure(p: &Pair, o: &Options, r: &mut FloodResult) -> Result<()> {
    let v = p
        .victim
        .as_ref()
        .context("the pair has no WireGuard server")?;
    eprintln!(
        "weft-bench: tunnel flood: {} at {FLOOD_RATE}/s from {} to {}",
        p.mode.short(),
        v.attacker,
        v.endpoint
    );
    let mut packets = flood::initiations(&v.public_key, FLOOD_SET)?;
    packets.extend(flood::garbage(FLOOD_SET)?);
    let f = Flooder::start(&v.attacker, v.endpoint, packets.clone(), FLOOD_RATE)?;
    let cookie = flood::initiations_with_cookie(
        &v.attacker,
        v.endpoint,
        &v.public_key,
        COOKIE_SET,
        COOKIE_TIMEOUT,
    );
    f.stop()?;
    packets.extend(cookie.context("getting a cookie from the server under load")?);
    std::thread::sleep(SETTLE);

    let tcp = Test::Tcp {
        streams: 1,
        reverse: false,
    };
    r.tcp1_before
        .push(iperf(p, &tcp, o).context("TCP without flood")?.gbps);
    let before = scrape(v);
    let f = Flooder::start(&v.attacker, v.endpoint, packets, FLOOD_RATE)?;
    let during = iperf(p, &tcp, o);
    let sent = f.stop()?;
    std::thread::sleep(DRAIN);
    let after = scrape(v);
    eprintln!("weft-bench: tunnel flood: {sent}");
    r.flood_rate.push(sent.rate());
    r.tcp1_during
        .push(during.context("TCP during the flood")?.gbps);
    match (before, after) {
        (Ok(b), Ok(a)) => r.victim = Some(a.since(&b)),
        (Err(e), _) | (_, Err(e)) => note_err(&mut r.error, "the server's /metrics", e),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SCRAPE: &str = "# TYPE weft_wg_drops counter\n\
        weft_wg_drops_total{reason=\"no_peer\"} 1\n\
        weft_wg_drops_total{reason=\"unknown_peer\"} 32\n\
        weft_wg_drops_total{reason=\"malformed\"} 40000\n\
        weft_wg_drops_total{reason=\"handshake_budget\"} 22000\n\
        weft_wg_datagrams_total{direction=\"rx\"} 95000\n\
        weft_wg_datagrams_total{direction=\"tx\"} 7\n\
        weft_wg_cookies_sent_total 51000\n\
        weft_wg_cookies_sent_total_extra 3\n";

    #[test]
    fn counters_are_read_from_metrics() {
        let c = VictimCounters::parse(SCRAPE).unwrap();
        assert_eq!(
            c,
            VictimCounters {
                rx_datagrams: 95000,
                malformed: 40000,
                cookies_sent: 51000,
                dh_unknown_peer: 32,
                over_budget: 22000,
            }
        );
        let zero = VictimCounters::parse(&SCRAPE.replace("95000", "0")).unwrap();
        assert_eq!(c.since(&zero).rx_datagrams, 95000);
        assert_eq!(zero.since(&c).rx_datagrams, 0, "a restart does not wrap");
        assert!(VictimCounters::parse("weft_wg_cookies_sent_total 1\n").is_err());
    }

    #[test]
    fn ratio_needs_both_figures() {
        let mut r = FloodResult::default();
        assert_eq!(r.ratio(), None);
        r.tcp1_before.push(4.0);
        r.tcp1_during.push(3.0);
        assert_eq!(r.ratio(), Some(0.75));
    }
}
