//! Driving dnsperf against one server: the saturated rate with the server's
//! CPU time per query, and the latency percentiles at a fixed rate.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::servers::Server;
use super::Options;

pub(super) struct Perf {
    pub(super) qps: f64,
    pub(super) completed: u64,
    pub(super) lost: u64,
}

pub(super) fn field<'a>(out: &'a str, label: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|r| r.split_whitespace().next())
}

pub(super) fn dnsperf(s: &Server, queries: &Path, args: &[String]) -> Result<String> {
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

pub(super) fn saturate(s: &Server, queries: &Path, o: &Options) -> Result<(Perf, f64)> {
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
pub(super) fn latency(s: &Server, queries: &Path, o: &Options) -> Result<(f64, f64, u64)> {
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
