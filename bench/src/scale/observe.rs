//! What the scale bench reads from outside netd: the routes on its
//! WireGuard device (`ip`), its RSS (`/proc`; its CPU time is
//! [`crate::sys::CpuMeter`]'s), and its log
//! (line counts, handshake warnings, when it read the hosts).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};
use ipnetwork::Ipv4Network;
use weft_netd::tunnel::WG_DEVICE;
use weft_tests::Netns;

/// The IPv4 routes on netd's WireGuard device in `ns` (one dump; empty when
/// the device does not exist or the dump failed, e.g. interrupted while the
/// routes were changing: the next poll sees them).
pub fn wg_routes(ns: &Netns) -> HashSet<Ipv4Network> {
    let out = Command::new("ip")
        .args(["-n", ns.name(), "-4", "route", "show", "dev", WG_DEVICE])
        .output();
    match out {
        Ok(o) if o.status.success() => parse_routes(&String::from_utf8_lossy(&o.stdout)),
        _ => HashSet::new(),
    }
}

/// The destinations of an `ip route show` listing.
pub fn parse_routes(text: &str) -> HashSet<Ipv4Network> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|dst| dst.parse().ok())
        .collect()
}

/// Whether `addr` is routed into netd's WireGuard device in `ns` (one
/// `ip route get`: a lookup, not a dump, so it costs the same at any size).
pub fn routed_to_wg(ns: &Netns, addr: Ipv4Addr) -> Result<bool> {
    let out = Command::new("ip")
        .args(["-n", ns.name(), "-4", "route", "get", &addr.to_string()])
        .output()
        .context("running ip route get")?;
    Ok(out.status.success() && route_dev(&String::from_utf8_lossy(&out.stdout)) == Some(WG_DEVICE))
}

/// The device of an `ip route get` answer.
pub fn route_dev(text: &str) -> Option<&str> {
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "dev" {
            return words.next();
        }
    }
    None
}

/// The pid of the one netd running in `ns`.
pub fn netd_pid(ns: &Netns) -> Result<u32> {
    let pids: Vec<u32> = ns
        .pids()?
        .into_iter()
        .filter(|&p| crate::sys::proc_comm(p).as_deref() == Some("netd"))
        .collect();
    match pids[..] {
        [p] => Ok(p),
        _ => bail!("expected one netd in {}, found {pids:?}", ns.name()),
    }
}

/// VmRSS of `pid`, MB (10^6 bytes).
pub fn rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    vm_rss_kb(&status)
        .map(|kb| kb as f64 * 1024.0 / 1e6)
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// The VmRSS line of a `/proc/PID/status`, KiB.
pub fn vm_rss_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A log line about a WireGuard handshake (boringtun's
/// `HANDSHAKE(REKEY_TIMEOUT)`, or netd's own summary of unanswered peers).
pub fn is_handshake_line(line: &str) -> bool {
    line.contains("REKEY") || line.to_ascii_lowercase().contains("handshake")
}

/// What part of netd's log says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LogCount {
    pub lines: usize,
    /// Lines about handshakes ([`is_handshake_line`]).
    pub handshakes: usize,
    /// Other WARN and ERROR lines.
    pub warnings: usize,
    /// The first few distinct other warnings, without their timestamps.
    pub samples: Vec<String>,
}

/// How many distinct warnings [`LogCount::samples`] keeps.
const SAMPLES: usize = 3;

/// Counts the lines of `log` after its first `skip` lines.
pub fn count_lines(log: &str, skip: usize) -> LogCount {
    let mut c = LogCount::default();
    for l in log.lines().skip(skip) {
        c.lines += 1;
        if is_handshake_line(l) {
            c.handshakes += 1;
        } else if l.contains(" WARN ") || l.contains(" ERROR ") {
            c.warnings += 1;
            let text: String = l
                .split_once(' ')
                .map_or(l, |(_, rest)| rest)
                .trim()
                .chars()
                .take(200)
                .collect();
            if c.samples.len() < SAMPLES && !c.samples.contains(&text) {
                c.samples.push(text);
            }
        }
    }
    c
}

/// The time of day (UTC seconds since midnight) of the first line of
/// `log` saying that netd read the host records: a line about the hosts'
/// listing or snapshot (netd's summary `hosts changed ... listing=true`),
/// or else the first "host joined" (older netds log one per host while
/// reading the listing).
pub fn hosts_read_at(log: &str) -> Option<f64> {
    let listing = |l: &str| {
        let lower = l.to_ascii_lowercase();
        lower.contains("host")
            && (lower.contains("listing=true")
                || lower.contains("listed")
                || lower.contains("snapshot"))
    };
    log.lines()
        .find(|l| listing(l))
        .or_else(|| log.lines().find(|l| l.contains("host joined")))
        .and_then(time_of_day)
}

/// The UTC time of day, seconds, of a tracing line starting with an RFC
/// 3339 timestamp (`2026-11-29T17:28:11.123456Z ...`).
pub fn time_of_day(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let (_, time) = ts.split_once('T')?;
    let time = time.trim_end_matches('Z');
    let mut parts = time.splitn(3, ':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The UTC time of day, seconds, of `t`.
pub fn wall_time_of_day(t: std::time::SystemTime) -> f64 {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    secs % 86_400.0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn routes_and_devices_parse() {
        let text = "10.64.0.64/26 proto static scope link src 10.64.0.1 \n10.64.0.128/26 scope link\nbogus\n";
        let r = parse_routes(text);
        assert_eq!(r.len(), 2);
        assert!(r.contains(&"10.64.0.128/26".parse().unwrap()));
        assert_eq!(
            route_dev("10.64.0.65 dev weft-wg src 10.64.0.1 uid 0 \n    cache \n"),
            Some("weft-wg")
        );
        assert_eq!(
            route_dev("10.64.0.65 via 192.168.77.1 dev eth0 src 192.168.77.10"),
            Some("eth0")
        );
        assert_eq!(route_dev("nothing"), None);
    }

    #[test]
    fn proc_fields_parse() {
        assert_eq!(vm_rss_kb("Name:\tnetd\nVmRSS:\t   20480 kB\n"), Some(20480));
    }

    #[test]
    fn log_lines_are_counted_and_timed() {
        let log = "2026-11-29T17:28:11.500000Z  INFO weft_netd::daemon: block leased\n\
                   2026-11-29T17:28:12.250000Z  INFO weft_netd::mesh: host joined or changed host=sim-1\n\
                   2026-11-29T17:28:12.300000Z  WARN boringtun::noise: HANDSHAKE(REKEY_TIMEOUT)\n\
                   2026-11-29T17:28:13.000000Z  INFO weft_netd::mesh: 3 peers did not answer a handshake\n";
        let c = count_lines(log, 0);
        assert_eq!((c.lines, c.handshakes, c.warnings), (4, 2, 0));
        let c = count_lines(log, 3);
        assert_eq!((c.lines, c.handshakes), (1, 1));
        let warn = "2026-11-29T17:28:14.000000Z  WARN weft_netd::daemon: updating the tunnel peers failed; will retry error=EBUSY\n";
        let c = count_lines(&format!("{log}{warn}{warn}"), 0);
        assert_eq!((c.lines, c.handshakes, c.warnings), (6, 2, 2));
        assert_eq!(
            c.samples,
            ["WARN weft_netd::daemon: updating the tunnel peers failed; will retry error=EBUSY"]
        );
        assert_eq!(
            hosts_read_at(log),
            Some(17.0 * 3600.0 + 28.0 * 60.0 + 12.25)
        );
        let listed = "2026-11-29T00:00:01.000000Z  INFO weft_netd::mesh: hosts listed n=5000\n\
                      2026-11-29T00:00:02.000000Z  INFO weft_netd::mesh: host joined or changed\n";
        assert_eq!(hosts_read_at(listed), Some(1.0));
        let summary = "2026-11-29T00:00:00.500000Z  INFO weft_netd::mesh: host registered\n\
                       2026-11-29T00:00:03.000000Z  INFO weft_netd::mesh: hosts changed joined_or_changed=5000 left=0 hosts=5001 listing=true\n";
        assert_eq!(hosts_read_at(summary), Some(3.0));
        assert_eq!(time_of_day("no timestamp"), None);
    }
}
