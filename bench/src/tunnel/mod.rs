//! Tunnel throughput, latency, CPU and MTU: weft's two backends beside their
//! references, container to container across two hosts, all built in one lab
//! of four hosts on one underlay switch and measured interleaved, run by run.
//!
//! ```text
//!  h0, h1: raw underlay (routed, no tunnel)   10.97.{0,1}.0/24
//!          hand-made kernel VXLAN (VNI 100)   10.98.{0,1}.0/24
//!          weft vxlan (netd)                  10.42.{0,1}.0/24
//!  h2, h3: wireguard-go (Debian)              10.99.{0,1}.0/24
//!          weft wireguard (netd)              10.42.{0,1}.0/24 (own store)
//! ```
//!
//! Every mode has the same shape: a container namespace with `eth0` (veth)
//! on a bridge in its host, the host routing into the tunnel, the tunnel
//! over the underlay to the other host, its bridge and container. The
//! container's MTU is the mode's overlay MTU: underlay − 50 for VXLAN,
//! underlay − 60 for WireGuard (weft's choice for an IPv4 underlay; given to
//! wireguard-go too so both carry the same segments), the underlay MTU for
//! raw routing. The client always runs in the container on the first host
//! of the pair, the server in the one on the second; "←" is iperf3 `-R`.
//!
//! `testbed` builds the lab and every mode, `measure` runs the tools on a
//! pair, `flood` measures weft wireguard under a handshake flood after the
//! runs; this file holds the modes, the result types and the runs.

mod flood;
mod measure;
mod testbed;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::sys::{CpuMeter, Fig};
pub use flood::FloodResult;
use flood::FLOOD_RATE;
use measure::{df_search, iperf, ping_rtt, Test};
use testbed::{testbed, Testbed};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Raw,
    KernelVxlan,
    WeftVxlan,
    WireguardGo,
    WeftWireguard,
}

pub const MODES: [Mode; 5] = [
    Mode::Raw,
    Mode::KernelVxlan,
    Mode::WeftVxlan,
    Mode::WireguardGo,
    Mode::WeftWireguard,
];

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Raw => "raw underlay (no tunnel)",
            Mode::KernelVxlan => "kernel VXLAN (hand-made)",
            Mode::WeftVxlan => "weft vxlan",
            Mode::WireguardGo => "wireguard-go",
            Mode::WeftWireguard => "weft wireguard",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Mode::Raw => "raw underlay",
            Mode::KernelVxlan => "kernel VXLAN",
            Mode::WeftVxlan => "weft vxlan",
            Mode::WireguardGo => "wireguard-go",
            Mode::WeftWireguard => "weft wireguard",
        }
    }

    /// The reference a weft mode is compared with.
    pub fn reference(self) -> Option<Mode> {
        match self {
            Mode::WeftVxlan => Some(Mode::KernelVxlan),
            Mode::WeftWireguard => Some(Mode::WireguardGo),
            _ => None,
        }
    }

    fn overhead(self) -> u32 {
        match self {
            Mode::Raw => 0,
            Mode::KernelVxlan | Mode::WeftVxlan => weft_model::mtu::VXLAN_OVERHEAD,
            Mode::WireguardGo | Mode::WeftWireguard => weft_model::mtu::WIREGUARD_OVERHEAD,
        }
    }

    /// The pair of hosts it runs on: (client host, server host).
    fn hosts(self) -> (usize, usize) {
        match self {
            Mode::Raw | Mode::KernelVxlan | Mode::WeftVxlan => (0, 1),
            Mode::WireguardGo | Mode::WeftWireguard => (2, 3),
        }
    }

    /// Second octet of the reference modes' container subnets.
    fn subnet(self) -> u8 {
        match self {
            Mode::Raw => 97,
            Mode::KernelVxlan => 98,
            Mode::WireguardGo => 99,
            Mode::WeftVxlan | Mode::WeftWireguard => 42,
        }
    }

    /// Whether its data path runs in a process (else in the kernel).
    pub fn userspace(self) -> bool {
        matches!(self, Mode::WireguardGo | Mode::WeftWireguard)
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub runs: usize,
    pub secs: u32,
    /// Bytes per iperf3 test instead of `secs` (--quick).
    pub bytes: Option<u64>,
    pub udp_mbit: u32,
    pub pings: u32,
    pub sweep_mtus: Vec<u32>,
}

/// One mode's figures at the main underlay MTU.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModeResult {
    pub mode: Option<Mode>,
    pub label: String,
    pub overlay_mtu: Option<u32>,
    /// Gbit/s received.
    pub tcp1_fwd: Fig,
    pub tcp1_rev: Fig,
    pub tcp4_fwd: Fig,
    pub tcp4_rev: Fig,
    pub udp_gbps: Fig,
    pub udp_loss_pct: Fig,
    pub ping_p50_ms: Fig,
    pub ping_p99_ms: Fig,
    /// Whole-machine busy CPU seconds per GB (10^9 bytes) received, over the
    /// four TCP tests of a run.
    pub cpu_system_s_per_gb: Fig,
    /// The tunnel processes' CPU seconds per GB (userspace modes only).
    pub cpu_tunnel_s_per_gb: Option<Fig>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelResults {
    pub underlay_mtu: u32,
    pub runs: usize,
    pub secs: u32,
    /// Bytes per test instead of seconds (--quick).
    #[serde(default)]
    pub bytes: Option<u64>,
    pub udp_mbit: u32,
    pub pings: u32,
    pub topology: String,
    pub modes: Vec<ModeResult>,
    /// weft wireguard's single stream without and during a handshake flood
    /// (when that mode is measured).
    #[serde(default)]
    pub flood: Option<FloodResult>,
}

/// The DF search and throughput of one mode at one underlay MTU.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MtuRow {
    pub underlay_mtu: u32,
    pub mode: Option<Mode>,
    pub label: String,
    /// The MTU the mode advertises: netd's `status` for weft, the device
    /// MTU set by hand for the references (the container's eth0 in all).
    pub advertised: Option<u32>,
    /// The largest ICMP payload that passes with DF set.
    pub largest_df_payload: Option<u32>,
    /// largest payload + 28 (IPv4 + ICMP headers).
    pub path_mtu: Option<u32>,
    pub matches: Option<bool>,
    /// What happens one byte over the path MTU.
    pub one_over: Option<String>,
    pub tcp1_fwd: Fig,
    pub tcp4_fwd: Fig,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MtuResults {
    pub mtus: Vec<u32>,
    pub rows: Vec<MtuRow>,
}

fn mtu_row(tb: &Testbed, underlay: u32, mode: Mode) -> MtuRow {
    let mut row = MtuRow {
        underlay_mtu: underlay,
        mode: Some(mode),
        label: mode.label().into(),
        ..MtuRow::default()
    };
    if let Some((_, e)) = tb.errors.iter().find(|(m, _)| *m == mode) {
        row.error = Some(e.clone());
        return row;
    }
    let Some(p) = tb.paths.iter().find(|p| p.mode == mode) else {
        row.error = Some("not set up".into());
        return row;
    };
    row.advertised = Some(p.advertised);
    match df_search(p, underlay) {
        Ok((payload, over)) => {
            row.largest_df_payload = Some(payload);
            row.path_mtu = Some(payload + 28);
            row.matches = Some(payload + 28 == p.advertised);
            row.one_over = Some(over);
        }
        Err(e) => row.error = Some(format!("{e:#}")),
    }
    row
}

fn note_err(slot: &mut Option<String>, what: &str, e: anyhow::Error) {
    eprintln!("weft-bench: {what}: {e:#}");
    slot.get_or_insert_with(|| format!("{what}: {e:#}"));
}

/// The main measurement (underlay MTU 1500): every test, every mode, and
/// the DF check.
pub fn run_main(o: &Options, modes: &[Mode]) -> Result<(TunnelResults, Vec<MtuRow>)> {
    let underlay = 1500;
    let tb = testbed(underlay, modes)?;
    let mut results: Vec<ModeResult> = modes
        .iter()
        .map(|&m| ModeResult {
            mode: Some(m),
            label: m.label().into(),
            overlay_mtu: tb.paths.iter().find(|p| p.mode == m).map(|p| p.advertised),
            cpu_tunnel_s_per_gb: m.userspace().then(Fig::default),
            error: tb
                .errors
                .iter()
                .find(|(x, _)| *x == m)
                .map(|(_, e)| e.clone()),
            ..ModeResult::default()
        })
        .collect();
    let mut mtu_rows: Vec<MtuRow> = modes.iter().map(|&m| mtu_row(&tb, underlay, m)).collect();
    let tcp = [(1, false), (1, true), (4, false), (4, true)];
    for run in 0..o.runs {
        // Rotate the order so that no mode always goes first.
        for k in 0..tb.paths.len() {
            let p = &tb.paths[(k + run) % tb.paths.len()];
            let Some(r) = results.iter_mut().find(|r| r.mode == Some(p.mode)) else {
                continue;
            };
            eprintln!(
                "weft-bench: tunnel run {}/{}: {}",
                run + 1,
                o.runs,
                p.mode.short()
            );
            let (mut sys_s, mut proc_s, mut bytes) = (0.0, 0.0, 0.0);
            for (i, &(streams, reverse)) in tcp.iter().enumerate() {
                let meter = CpuMeter::start(&p.tunnel_pids);
                match iperf(p, &Test::Tcp { streams, reverse }, o) {
                    Ok(res) => {
                        let (s, t) = meter.stop();
                        sys_s += s;
                        proc_s += t;
                        bytes += res.bytes;
                        let fig = match i {
                            0 => &mut r.tcp1_fwd,
                            1 => &mut r.tcp1_rev,
                            2 => &mut r.tcp4_fwd,
                            _ => &mut r.tcp4_rev,
                        };
                        fig.push(res.gbps);
                    }
                    Err(e) => note_err(
                        &mut r.error,
                        &format!(
                            "TCP {streams} stream(s){}",
                            if reverse { " reverse" } else { "" }
                        ),
                        e,
                    ),
                }
            }
            if bytes > 0.0 {
                let gb = bytes / 1e9;
                r.cpu_system_s_per_gb.push(sys_s / gb);
                if let Some(f) = r.cpu_tunnel_s_per_gb.as_mut() {
                    f.push(proc_s / gb);
                }
            }
            let udp = Test::Udp {
                mbit: o.udp_mbit,
                len: p.advertised - 28,
            };
            match iperf(p, &udp, o) {
                Ok(res) => {
                    r.udp_gbps.push(res.gbps);
                    r.udp_loss_pct.push(res.loss_pct);
                }
                Err(e) => note_err(&mut r.error, "UDP", e),
            }
            match ping_rtt(p, o.pings) {
                Ok((p50, p99)) => {
                    r.ping_p50_ms.push(p50);
                    r.ping_p99_ms.push(p99);
                }
                Err(e) => note_err(&mut r.error, "ping", e),
            }
        }
    }
    let flood = modes.contains(&Mode::WeftWireguard).then(|| {
        match tb.paths.iter().find(|p| p.mode == Mode::WeftWireguard) {
            Some(p) => flood::run(p, o),
            None => FloodResult {
                label: Mode::WeftWireguard.label().into(),
                target_rate: FLOOD_RATE,
                error: Some("weft wireguard is not set up".into()),
                ..FloodResult::default()
            },
        }
    });
    // The sweep's figures at this MTU are the main measurement's.
    for row in &mut mtu_rows {
        if let Some(r) = results.iter().find(|r| r.mode == row.mode) {
            row.tcp1_fwd = r.tcp1_fwd.clone();
            row.tcp4_fwd = r.tcp4_fwd.clone();
        }
    }
    Ok((
        TunnelResults {
            underlay_mtu: underlay,
            runs: o.runs,
            secs: o.secs,
            bytes: o.bytes,
            udp_mbit: o.udp_mbit,
            pings: o.pings,
            topology: "container to container across two hosts (veth + bridge on each host, routed into the tunnel)".into(),
            modes: results,
            flood,
        },
        mtu_rows,
    ))
}

/// One more underlay MTU: a fresh lab, the DF check, TCP 1 and 4 streams.
pub fn run_sweep(o: &Options, modes: &[Mode], underlay: u32) -> Result<Vec<MtuRow>> {
    let tb = testbed(underlay, modes)?;
    let mut rows: Vec<MtuRow> = modes.iter().map(|&m| mtu_row(&tb, underlay, m)).collect();
    let streams: &[u32] = &[1, 4];
    for run in 0..o.runs {
        for k in 0..tb.paths.len() {
            let p = &tb.paths[(k + run) % tb.paths.len()];
            let Some(row) = rows.iter_mut().find(|r| r.mode == Some(p.mode)) else {
                continue;
            };
            eprintln!(
                "weft-bench: MTU {underlay} run {}/{}: {}",
                run + 1,
                o.runs,
                p.mode.short()
            );
            for &n in streams {
                match iperf(
                    p,
                    &Test::Tcp {
                        streams: n,
                        reverse: false,
                    },
                    o,
                ) {
                    Ok(res) if n == 1 => row.tcp1_fwd.push(res.gbps),
                    Ok(res) => row.tcp4_fwd.push(res.gbps),
                    Err(e) => note_err(&mut row.error, &format!("TCP {n} stream(s)"), e),
                }
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(Mode::WeftVxlan.reference(), Some(Mode::KernelVxlan));
        assert_eq!(Mode::WeftWireguard.reference(), Some(Mode::WireguardGo));
        assert_eq!(Mode::Raw.reference(), None);
    }
}
