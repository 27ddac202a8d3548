//! The listeners: UDP on dedicated threads (several SO_REUSEPORT sockets per
//! address, batches of datagrams per system call with recvmmsg/sendmmsg,
//! answers written into preallocated buffers), TCP on the async runtime
//! (bounded connections, idle timeout, pipelined queries).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

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
/// Forwarded queries in flight per TCP connection.
const TCP_INFLIGHT: usize = 16;

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
    /// TCP connections refused because the limit was reached.
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

/// A UDP socket for `addr` in a SO_REUSEPORT group.
pub(crate) fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // Room for bursts; the kernel caps it at net.core.rmem_max.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.set_read_timeout(Some(UDP_POLL))?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// A TCP listener for `addr`.
pub(crate) fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

struct UdpBuffers {
    rx: Vec<[u8; RX_SIZE]>,
    tx: Vec<[u8; TX_SIZE]>,
    addrs: Vec<libc::sockaddr_storage>,
    rx_iov: Vec<libc::iovec>,
    rx_msgs: Vec<libc::mmsghdr>,
    tx_iov: Vec<libc::iovec>,
    tx_msgs: Vec<libc::mmsghdr>,
    /// For each answer: the index of the datagram it answers, its length.
    tx_src: [usize; BATCH],
    tx_len: [usize; BATCH],
}

impl UdpBuffers {
    fn new() -> Box<Self> {
        // SAFETY: these libc structs are plain data for which all-zero bytes
        // are a valid (empty) value.
        let zero_storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let zero_msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
        let zero_iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut b = Box::new(UdpBuffers {
            rx: vec![[0u8; RX_SIZE]; BATCH],
            tx: vec![[0u8; TX_SIZE]; BATCH],
            addrs: vec![zero_storage; BATCH],
            rx_iov: vec![zero_iov; BATCH],
            rx_msgs: vec![zero_msg; BATCH],
            tx_iov: vec![zero_iov; BATCH],
            tx_msgs: vec![zero_msg; BATCH],
            tx_src: [0; BATCH],
            tx_len: [0; BATCH],
        });
        // The vectors never grow, so these pointers stay valid as long as `b`.
        let b_ref = &mut *b;
        for i in 0..BATCH {
            b_ref.rx_iov[i] = libc::iovec {
                iov_base: b_ref.rx[i].as_mut_ptr().cast(),
                iov_len: RX_SIZE,
            };
            let h = &mut b_ref.rx_msgs[i].msg_hdr;
            h.msg_name = (&mut b_ref.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut b_ref.rx_iov[i];
            h.msg_iovlen = 1;
        }
        b
    }
}

fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET), and
            // sockaddr_storage is large and aligned enough for it.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// One UDP thread: receive a batch, answer what the table knows into the
/// preallocated buffers, send the batch; hand the rest to the forwarder.
pub(crate) fn udp_loop(sock: Arc<std::net::UdpSocket>, ctx: Arc<Ctx>) {
    let fd = sock.as_raw_fd();
    let mut b = UdpBuffers::new();
    let storage_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let mut errors = 0u64;
    let mut counts = BatchCounts::default();
    while !ctx.stop.load(Ordering::Relaxed) {
        for m in b.rx_msgs.iter_mut() {
            m.msg_hdr.msg_namelen = storage_len;
            m.msg_hdr.msg_flags = 0;
            m.msg_len = 0;
        }
        // SAFETY: every header points into `b`'s buffers (set up in
        // `UdpBuffers::new`, never moved: `b` is boxed and its vectors never
        // grow), which outlive the call; BATCH is their length.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                b.rx_msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => {}
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
        let n = n as usize;
        // One clock read per batch: every answer in it waited about as long.
        let received = Instant::now();
        ctx.stats.udp_queries.fetch_add(n as u64, Ordering::Relaxed);
        let table = ctx.table.load();
        let mut out = 0;
        let mut dropped = 0;
        for i in 0..n {
            let len = b.rx_msgs[i].msg_len as usize;
            if b.rx_msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len > RX_SIZE {
                dropped += 1;
                continue;
            }
            let Some(src) = sockaddr_to_std(&b.addrs[i]) else {
                dropped += 1;
                continue;
            };
            let packet = &b.rx[i][..len];
            counts.query(packet);
            match handle(&table, &ctx.acl, packet, src.ip(), false, &mut b.tx[out]) {
                Action::Reply(l) => {
                    counts.answer(&b.tx[out][..l]);
                    b.tx_len[out] = l;
                    b.tx_src[out] = i;
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
        for k in 0..out {
            let src = b.tx_src[k];
            b.tx_iov[k] = libc::iovec {
                iov_base: b.tx[k].as_mut_ptr().cast(),
                iov_len: b.tx_len[k],
            };
            let namelen = b.rx_msgs[src].msg_hdr.msg_namelen;
            let h = &mut b.tx_msgs[k].msg_hdr;
            h.msg_name = (&mut b.addrs[src] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = namelen;
            h.msg_iov = &mut b.tx_iov[k];
            h.msg_iovlen = 1;
        }
        let mut sent = 0;
        let mut tries = 0;
        while sent < out && tries < 2 * BATCH {
            tries += 1;
            // SAFETY: headers `sent..out` point into `b` (set just above).
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    b.tx_msgs.as_mut_ptr().add(sent),
                    (out - sent) as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                sent += r as usize;
            } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // This datagram cannot go (e.g. no route back): skip it.
                sent += 1;
            }
        }
        ctx.stats
            .queries
            .latency(Path::Local)
            .observe_n(received.elapsed(), out as u64);
    }
}

fn forward_udp(
    ctx: &Arc<Ctx>,
    sock: &Arc<std::net::UdpSocket>,
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

/// Accepts TCP connections until the task is dropped (which also ends
/// every connection it started).
pub(crate) async fn tcp_accept(listener: TcpListener, ctx: Arc<Ctx>) {
    let slots = Arc::new(Semaphore::new(ctx.max_tcp));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let ctx = ctx.clone();
                        conns.spawn(async move {
                            tcp_conn(stream, peer, ctx).await;
                            drop(slot);
                        });
                    }
                    Err(_) => {
                        ctx.stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "TCP connection limit reached; closing the new one");
                        drop(stream);
                    }
                },
                Err(e) => {
                    // Out of file descriptors and such: wait a little.
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// One TCP connection: length-prefixed queries, answered as they come
/// (forwarded ones may overtake, RFC 7766 allows it). Every query must
/// arrive whole within the idle timeout, and every answer must be taken
/// within it, or the connection is closed.
async fn tcp_conn(stream: TcpStream, peer: SocketAddr, ctx: Arc<Ctx>) {
    let _ = stream.set_nodelay(true);
    let idle = ctx.tcp_idle;
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_INFLIGHT);
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            match tokio::time::timeout(idle, wr.write_all(&msg)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
        let _ = tokio::time::timeout(idle, wr.shutdown()).await;
    });
    let inflight = Arc::new(Semaphore::new(TCP_INFLIGHT));
    let mut buf = vec![0u8; u16::MAX as usize];
    let mut out = vec![0u8; u16::MAX as usize + 2];
    let client: IpAddr = peer.ip();
    loop {
        let read = async {
            let mut len = [0u8; 2];
            rd.read_exact(&mut len).await?;
            let n = u16::from_be_bytes(len) as usize;
            rd.read_exact(&mut buf[..n]).await?;
            Ok::<usize, io::Error>(n)
        };
        let n = match tokio::time::timeout(idle, read).await {
            Ok(Ok(n)) => n,
            _ => break,
        };
        ctx.stats.tcp_queries.fetch_add(1, Ordering::Relaxed);
        let received = Instant::now();
        let packet = &buf[..n];
        let action = {
            let table = ctx.table.load();
            let (len, body) = out.split_at_mut(2);
            let a = handle(&table, &ctx.acl, packet, client, true, body);
            if let Action::Reply(l) = a {
                len.copy_from_slice(&(l as u16).to_be_bytes());
            }
            a
        };
        match action {
            Action::Reply(l) => {
                ctx.stats.local_answers.fetch_add(1, Ordering::Relaxed);
                ctx.stats.queries.count(packet, Some(&out[2..l + 2]));
                ctx.stats
                    .queries
                    .latency(Path::Local)
                    .observe_n(received.elapsed(), 1);
                if tx.send(out[..l + 2].to_vec()).await.is_err() {
                    break;
                }
            }
            Action::Forward => {
                ctx.stats.queries.count(packet, None);
                let Ok(permit) = inflight.clone().acquire_owned().await else {
                    break;
                };
                let ctx = ctx.clone();
                let tx = tx.clone();
                let packet = packet.to_vec();
                tokio::spawn(async move {
                    if let Some(answer) = ctx.fwd.resolve(&packet, true).await {
                        ctx.stats
                            .queries
                            .count_answer(&answer, Path::Forward, received.elapsed());
                        let mut msg = Vec::with_capacity(answer.len() + 2);
                        msg.extend_from_slice(&(answer.len() as u16).to_be_bytes());
                        msg.extend_from_slice(&answer);
                        let _ = tx.send(msg).await;
                    }
                    drop(permit);
                });
            }
            Action::Drop => {
                ctx.stats.queries.count(packet, None);
                ctx.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
