//! Measuring one container pair: iperf3 throughput (TCP streams, UDP at a
//! rate), ping round trips, and the DF search for the largest packet the path
//! carries.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use weft_tests::Netns;

use super::testbed::Pair;
use super::Options;
use crate::sys::percentile;

/// What one iperf3 run reported.
pub(super) struct Iperf {
    pub(super) gbps: f64,
    pub(super) bytes: f64,
    pub(super) loss_pct: f64,
}

fn wait_listening(ns: &Netns, port: u16) -> Result<()> {
    weft_tests::wait_until(Duration::from_secs(5), "iperf3 server listening", || {
        ns.output(["ss", "-ltnH", &format!("sport = :{port}")])
            .map(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
            .unwrap_or(false)
    })?;
    Ok(())
}

pub(super) enum Test {
    Tcp { streams: u32, reverse: bool },
    Udp { mbit: u32, len: u32 },
}

pub(super) fn iperf(p: &Pair, test: &Test, o: &Options) -> Result<Iperf> {
    let mut srv = p.server.spawn(["iperf3", "-s", "-1", "-p", "5201"])?;
    wait_listening(&p.server, 5201)?;
    let limit = (o.secs + 20).to_string();
    // A fixed time, or (--quick) a fixed size: iperf3 takes whole seconds.
    let (flag, amount) = match o.bytes {
        Some(b) => ("-n", b.to_string()),
        None => ("-t", o.secs.to_string()),
    };
    let mut argv: Vec<String> = [
        "timeout",
        &limit,
        "iperf3",
        "-c",
        &p.server_ip,
        "-p",
        "5201",
        flag,
        &amount,
        "-J",
        "--connect-timeout",
        "3000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match test {
        Test::Tcp { streams, reverse } => {
            argv.extend(["-P".into(), streams.to_string()]);
            if *reverse {
                argv.push("-R".into());
            }
        }
        Test::Udp { mbit, len } => {
            argv.extend([
                "-u".into(),
                "-b".into(),
                format!("{mbit}M"),
                "-l".into(),
                len.to_string(),
            ]);
        }
    }
    let out = p.client.output(&argv)?;
    let _ = srv.wait_timeout(Duration::from_secs(3));
    drop(srv);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("iperf3 JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let r = &v["end"]["sum_received"];
    Ok(Iperf {
        gbps: r["bits_per_second"]
            .as_f64()
            .context("iperf3 reported no throughput")?
            / 1e9,
        bytes: r["bytes"].as_f64().unwrap_or(0.0),
        loss_pct: r["lost_percent"].as_f64().unwrap_or(0.0),
    })
}

/// Round trip times (ms) of `count` pings 10 ms apart: (p50, p99).
pub(super) fn ping_rtt(p: &Pair, count: u32) -> Result<(f64, f64)> {
    let out = p.client.output([
        "ping",
        "-c",
        &count.to_string(),
        "-i",
        "0.01",
        "-W",
        "1",
        &p.server_ip,
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
    Ok((percentile(&rtts, 0.5), percentile(&rtts, 0.99)))
}

/// Does a DF ping with `payload` bytes pass? (ok, output text).
fn df_ping(p: &Pair, payload: u32) -> Result<(bool, String)> {
    let size = payload.to_string();
    // Two tries, so that one lost packet is not taken for "too big".
    let mut text = String::new();
    for _ in 0..2 {
        let out = p
            .client
            .output(["ping", "-M", "do", "-c1", "-W1", "-s", &size, &p.server_ip])?;
        text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            return Ok((true, text));
        }
        if text.contains("too long") {
            break;
        }
    }
    Ok((false, text))
}

fn classify_failure(text: &str) -> String {
    if text.contains("too long") {
        "refused at the sender (EMSGSIZE)".into()
    } else if text.contains("Frag needed") || text.contains("frag needed") {
        "ICMP fragmentation needed".into()
    } else {
        "silent drop".into()
    }
}

/// The largest ICMP payload that passes with DF set: checks the advertised
/// size first (and one byte more), binary search only when that is off.
pub(super) fn df_search(p: &Pair, underlay: u32) -> Result<(u32, String)> {
    let guess = p.advertised.saturating_sub(28);
    let (ok, _) = df_ping(p, guess)?;
    let (over, text) = df_ping(p, guess + 1)?;
    if ok && !over {
        return Ok((guess, classify_failure(&text)));
    }
    let (mut lo, mut hi) = (0u32, underlay.max(p.advertised) + 1);
    if !df_ping(p, lo)?.0 {
        bail!("{}: even an empty DF ping fails", p.mode.short());
    }
    let (hi_ok, _) = df_ping(p, hi)?;
    if hi_ok {
        bail!(
            "{}: a DF ping of {hi} bytes passes, more than the underlay",
            p.mode.short()
        );
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if df_ping(p, mid)?.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (_, text) = df_ping(p, lo + 1)?;
    Ok((lo, classify_failure(&text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified() {
        assert_eq!(
            classify_failure("ping: local error: message too long, mtu=1450"),
            "refused at the sender (EMSGSIZE)"
        );
        assert_eq!(
            classify_failure("From 10.42.0.1 icmp_seq=1 Frag needed and DF set (mtu = 1450)"),
            "ICMP fragmentation needed"
        );
        assert_eq!(
            classify_failure("1 packets transmitted, 0 received"),
            "silent drop"
        );
    }
}
