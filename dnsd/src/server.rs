//! The listeners: UDP on dedicated threads (several SO_REUSEPORT sockets per
//! address, batches of datagrams per system call with recvmmsg/sendmmsg,
//! answers written into preallocated buffers). TCP is served by
//! hickory-server (`tcp.rs`).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use weft_sys::udp::{RecvBatch, SendBatch, Socket as UdpSocket, Wait};

use crate::answer::{handle, Acl, Action};
use crate::counters::{BatchCounts, Path, QueryCounters};
use crate::forward::Forwarder;
use crate::table::Table;
use crate::wire::EDNS_UDP_SIZE;

/// Datagrams per recvmmsg/sendmmsg call.
const BATCH: usize = 32;
/// Largest query accepted over UDP; longer ones are dropped.
const RX_SIZE: usize = 4096;
/// Largest answer sent over UDP (the EDNS size dnsd advertises).
const TX_SIZE: usize = EDNS_UDP_SIZE as usize;
/// How often a UDP thread looks at the stop flag when idle.
const UDP_POLL: Duration = Duration::from_millis(100);

/// Counters, for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Queries received over UDP.
    pub udp_queries: AtomicU64,
    /// Queries received over TCP.
    pub tcp_queries: AtomicU64,
    /// Answers given from the table (both transports).
    pub local_answers: AtomicU64,
    /// Packets dropped (malformed beyond an answer, oversized, responses).
    pub dropped: AtomicU64,
    /// TCP queries answered REFUSED because `max_tcp` were being answered.
    pub tcp_refused: AtomicU64,
    /// Queries by type, answers by rcode, latency by path.
    pub queries: QueryCounters,
}

/// What the listeners share.
pub(crate) struct Ctx {
    pub table: Arc<ArcSwap<Table>>,
    pub fwd: Arc<Forwarder>,
    pub acl: Acl,
    pub stop: AtomicBool,
    pub rt: tokio::runtime::Handle,
    pub stats: Stats,
    pub tcp_idle: Duration,
    pub max_tcp: usize,
}

/// A UDP socket for `addr` in a SO_REUSEPORT group (no offloads: every
/// query and answer is its own datagram). A second dnsd binds the same
/// addresses while the first still serves them (netd replaces its child
/// with an overlap).
pub(crate) fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    free_bind(&s, addr)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // Room for bursts; the kernel caps it at net.core.rmem_max.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.set_read_timeout(Some(UDP_POLL))?;
    s.bind(&addr.into())?;
    Ok(UdpSocket::new(s.into()))
}

/// IP_FREEBIND: bind `addr` even when no interface holds it (yet): netd
/// may (re)start dnsd before, or while, it puts 169.254.169.250 back on
/// the bridge.
pub(crate) fn free_bind(s: &Socket, addr: SocketAddr) -> io::Result<()> {
    if addr.is_ipv6() {
        s.set_freebind_v6(true)
    } else {
        s.set_freebind_v4(true)
    }
}

/// Answers written by one UDP thread, each to the client that asked.
struct Answers {
    /// `BATCH` slots of `TX_SIZE` bytes.
    buf: Vec<u8>,
    lens: [usize; BATCH],
    to: [SocketAddr; BATCH],
}

/// One UDP thread: receive a batch (one recvmmsg), answer what the table
/// knows into the preallocated buffers, send the answers (one sendmmsg);
/// hand the rest to the forwarder.
pub(crate) fn udp_loop(sock: Arc<UdpSocket>, ctx: Arc<Ctx>) {
    let mut rx = RecvBatch::new(BATCH, RX_SIZE);
    let mut tx = SendBatch::new(BATCH);
    let mut answers = Answers {
        buf: vec![0u8; BATCH * TX_SIZE],
        lens: [0; BATCH],
        to: [SocketAddr::from(([0, 0, 0, 0], 0)); BATCH],
    };
    let mut errors = 0u64;
    let mut counts = BatchCounts::default();
    // On stop, one last pass answers what is queued without waiting
    // (`Wait::Never` ends at the first empty read): a dnsd being replaced
    // drops no query its socket already holds.
    let mut draining = false;
    loop {
        let wait = if draining {
            Wait::Never
        } else if ctx.stop.load(Ordering::Relaxed) {
            draining = true;
            Wait::Never
        } else {
            Wait::ForFirst
        };
        let n = match rx.recv(&sock, wait) {
            Ok(0) if draining => break,
            Ok(n) => n,
            Err(_) if draining => break,
            Err(e) => {
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {}
                    _ => {
                        errors += 1;
                        if errors.is_power_of_two() {
                            tracing::warn!(error = %e, errors, "UDP receive failed");
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                continue;
            }
        };
        // One clock read per batch: every answer in it waited about as long.
        let received = Instant::now();
        ctx.stats.udp_queries.fetch_add(n as u64, Ordering::Relaxed);
        let table = ctx.table.load();
        let mut out = 0;
        let mut dropped = 0;
        for i in 0..n {
            let r = rx.get(i);
            let (false, Some(src)) = (r.truncated, r.from) else {
                dropped += 1;
                continue;
            };
            let packet = r.data;
            counts.query(packet);
            let slot = &mut answers.buf[out * TX_SIZE..(out + 1) * TX_SIZE];
            match handle(&table, &ctx.acl, packet, src.ip(), false, slot) {
                Action::Reply(l) => {
                    counts.answer(&slot[..l]);
                    answers.lens[out] = l;
                    answers.to[out] = src;
                    out += 1;
                }
                Action::Forward => forward_udp(&ctx, &sock, packet, src, received),
                Action::Drop => dropped += 1,
            }
        }
        drop(table);
        counts.flush(&ctx.stats.queries);
        ctx.stats
            .local_answers
            .fetch_add(out as u64, Ordering::Relaxed);
        if dropped > 0 {
            ctx.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        if out == 0 {
            continue;
        }
        // An answer that cannot go (e.g. no route back) is skipped.
        tx.send(
            &sock,
            &answers.buf,
            TX_SIZE,
            &answers.lens[..out],
            &answers.to[..out],
        );
        ctx.stats
            .queries
            .latency(Path::Local)
            .observe_n(received.elapsed(), out as u64);
    }
}

fn forward_udp(
    ctx: &Arc<Ctx>,
    sock: &Arc<UdpSocket>,
    packet: &[u8],
    src: SocketAddr,
    received: Instant,
) {
    // A cached answer goes straight back from this thread.
    if let Some(answer) = ctx.fwd.cached_answer(packet) {
        let _ = sock.send_to(&answer, src);
        ctx.stats
            .queries
            .count_answer(&answer, Path::Cache, received.elapsed());
        return;
    }
    let ctx = ctx.clone();
    let sock = sock.clone();
    let packet = packet.to_vec();
    let rt = ctx.rt.clone();
    rt.spawn(async move {
        if let Some(answer) = ctx.fwd.resolve(&packet, false).await {
            let _ = sock.send_to(&answer, src);
            ctx.stats
                .queries
                .count_answer(&answer, Path::Forward, received.elapsed());
        }
    });
}
