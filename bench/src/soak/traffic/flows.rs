//! The probe flows between two containers on different hosts, each on a
//! thread of its own in the source container's namespace, each feeding a
//! [`GapTracker`] and recording its gaps:
//!
//! * ping: an ICMP echo request every [`PERIOD_MS`] (a raw socket:
//!   [`weft_tests::probe::Pinger`]); good = a reply from the destination;
//! * UDP: a datagram every [`PERIOD_MS`] to the destination's probe server
//!   ([`weft_tests::probe::ProbeServer`], which answers each with a line
//!   starting with its tag); good = such an answer;
//! * TCP: one long stream to the probe server's echo port,
//!   [`TCP_CHUNK`] bytes every [`PERIOD_MS`] (a few hundred KB/s each way:
//!   the machine has 2 cores and the tunnel is userspace WireGuard); good
//!   = echoed bytes back. A stream that breaks (reset, broken pipe, EOF) is
//!   a [`StreamError`] and is connected again; so is one that made no
//!   progress for [`TCP_STALL_MS`] (the gap stays recorded either way).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use weft_tests::probe::Pinger;

use super::gaps::GapTracker;
use super::Ctx;
use crate::soak::timeline::{FlowKind, Gap, Ms, StreamError};

/// How often the ping and UDP flows send, and the TCP flow writes.
pub const PERIOD_MS: Ms = 10;
/// What the TCP flow writes every period.
pub const TCP_CHUNK: usize = 4096;
/// A TCP stream with no progress this long is connected again.
pub const TCP_STALL_MS: Ms = 30_000;
/// The probe servers' ports in the destination containers.
pub const UDP_PORT: u16 = 7_001;
pub const TCP_PORT: u16 = 7_002;
/// The probe servers' tag (the first word of every answer).
pub const SERVER_TAG: &str = "soak-probe";

/// One flow's ends: from the namespace at `src` to `dst`.
#[derive(Debug, Clone)]
pub struct FlowEnds {
    /// `<source name>-><destination name>`, as gaps and errors name it.
    pub name: String,
    pub src: PathBuf,
    pub dst: Ipv4Addr,
}

/// Records `flow`'s gaps as they close, and the one open at the end.
struct Gaps<'a> {
    ctx: &'a Ctx<'a>,
    flow: &'a str,
    kind: FlowKind,
    tracker: GapTracker,
}

impl<'a> Gaps<'a> {
    fn new(ctx: &'a Ctx<'a>, flow: &'a str, kind: FlowKind) -> Self {
        Gaps {
            ctx,
            flow,
            kind,
            tracker: GapTracker::new(ctx.now()),
        }
    }

    fn good(&mut self) {
        if let Some((start, end)) = self.tracker.good(self.ctx.now()) {
            self.record(start, Some(end));
        }
    }

    fn silent_ms(&self) -> Ms {
        self.ctx.now().saturating_sub(self.tracker.silent_since())
    }

    fn finish(self) {
        if let Some(start) = self.tracker.finish(self.ctx.now()) {
            self.record(start, None);
        }
    }

    fn record(&self, start_ms: Ms, end_ms: Option<Ms>) {
        let gap = Gap {
            flow: self.flow.to_owned(),
            kind: self.kind,
            start_ms,
            end_ms,
        };
        self.ctx.rec.with(|t| t.gaps.push(gap));
    }
}

/// Sends every period until `now` reaches the next send time.
struct Ticker {
    next_ms: Ms,
}

impl Ticker {
    fn new(now: Ms) -> Ticker {
        Ticker { next_ms: now }
    }

    /// Whether a period started (a late one skips ahead, no burst).
    fn due(&mut self, now: Ms) -> bool {
        if now < self.next_ms {
            return false;
        }
        self.next_ms = (self.next_ms + PERIOD_MS).max(now + 1);
        true
    }

    /// How long until the next period (at least 1 ms).
    fn wait(&self, now: Ms) -> Duration {
        Duration::from_millis(self.next_ms.saturating_sub(now).max(1))
    }
}

/// ICMP echo every period until the run stops.
pub fn ping(ctx: &Ctx, f: &FlowEnds) -> Result<()> {
    weft_tests::in_netns(&f.src, || -> Result<()> {
        let pinger = Pinger::open().context("opening a raw ICMP socket")?;
        let mut gaps = Gaps::new(ctx, &f.name, FlowKind::Ping);
        let mut tick = Ticker::new(ctx.now());
        let mut seq: u16 = 0;
        let mut buf = [0u8; 1500];
        while !ctx.stopped() {
            if tick.due(ctx.now()) {
                // A send that fails (no route during a fault) is an
                // unanswered request.
                let _ = pinger.send(f.dst, seq);
                seq = seq.wrapping_add(1);
            }
            if let Some((_, from)) = pinger.recv(&mut buf, tick.wait(ctx.now()))? {
                if from == f.dst {
                    gaps.good();
                }
            }
        }
        gaps.finish();
        Ok(())
    })
    .with_context(|| format!("ping {}", f.name))
}

/// A UDP request every period to the probe server until the run stops.
pub fn udp(ctx: &Ctx, f: &FlowEnds) -> Result<()> {
    weft_tests::in_netns(&f.src, || -> Result<()> {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("binding")?;
        sock.connect((f.dst, UDP_PORT)).context("connecting")?;
        let mut gaps = Gaps::new(ctx, &f.name, FlowKind::Udp);
        let mut tick = Ticker::new(ctx.now());
        let mut seq: u64 = 0;
        let mut buf = [0u8; 1500];
        while !ctx.stopped() {
            if tick.due(ctx.now()) {
                let _ = sock.send(&seq.to_be_bytes());
                seq += 1;
            }
            sock.set_read_timeout(Some(tick.wait(ctx.now())))?;
            match sock.recv(&mut buf) {
                Ok(n) if buf[..n].starts_with(SERVER_TAG.as_bytes()) => gaps.good(),
                // Timeouts, and ICMP errors reported on the connected
                // socket (port unreachable, no route): no answer.
                Ok(_) | Err(_) => {}
            }
        }
        gaps.finish();
        Ok(())
    })
    .with_context(|| format!("UDP {}", f.name))
}

/// One TCP stream to the probe server's echo port, connected again when
/// it breaks, until the run stops.
pub fn tcp(ctx: &Ctx, f: &FlowEnds) -> Result<()> {
    weft_tests::in_netns(&f.src, || -> Result<()> {
        let mut gaps = Gaps::new(ctx, &f.name, FlowKind::Tcp);
        let to = SocketAddr::from((f.dst, TCP_PORT));
        while !ctx.stopped() {
            let conn = match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                Ok(c) => c,
                Err(_) => {
                    // Not up yet, or the path is down: the gap says so.
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if let Err(error) = stream(ctx, &conn, &mut gaps) {
                let t_ms = ctx.now();
                let flow = f.name.clone();
                ctx.rec
                    .with(|t| t.stream_errors.push(StreamError { flow, t_ms, error }));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        gaps.finish();
        Ok(())
    })
    .with_context(|| format!("TCP {}", f.name))
}

/// Streams on `conn` until the run stops (Ok) or it breaks (what broke).
fn stream(ctx: &Ctx, mut conn: &TcpStream, gaps: &mut Gaps) -> std::result::Result<(), String> {
    let setup = |e: std::io::Error| format!("setting up the stream: {e}");
    conn.set_nodelay(true).map_err(setup)?;
    conn.set_write_timeout(Some(Duration::from_millis(5)))
        .map_err(setup)?;
    let chunk = [0x5au8; TCP_CHUNK];
    let mut buf = vec![0u8; 64 * 1024];
    let mut unwritten = 0usize;
    let mut tick = Ticker::new(ctx.now());
    let mut last_progress = ctx.now();
    while !ctx.stopped() {
        let now = ctx.now();
        if tick.due(now) {
            // At most two periods' bytes wait: a stalled stream does not
            // pile up writes.
            unwritten = (unwritten + TCP_CHUNK).min(2 * TCP_CHUNK);
        }
        if unwritten > 0 {
            match conn.write(&chunk[..unwritten.min(TCP_CHUNK)]) {
                Ok(n) => unwritten -= n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        conn.set_read_timeout(Some(tick.wait(ctx.now())))
            .map_err(setup)?;
        match conn.read(&mut buf) {
            Ok(0) => return Err("unexpected EOF".into()),
            Ok(_) => {
                gaps.good();
                last_progress = ctx.now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
        if ctx.now() >= last_progress + TCP_STALL_MS {
            return Err(format!(
                "no progress for {} s (silent {} ms)",
                TCP_STALL_MS / 1000,
                gaps.silent_ms()
            ));
        }
    }
    Ok(())
}
