//! The data-path threads.
//!
//! * **tx** (`weft-wg-tx`): reads from the TUN (nonblocking, until it is empty
//!   or 64 datagrams wait). With TUN offloads the kernel hands over TCP
//!   packets of up to 64 KiB, which are cut into MTU-sized segments in place
//!   ([`super::offload`]). Each packet's peer is found by destination address;
//!   it is encrypted into a slot of one reused buffer, and the batch (up to
//!   128) goes out with one `sendmmsg`, runs to one peer as UDP GSO messages.
//! * **rx** (`weft-wg-rx`): `recvmmsg` of up to 32 messages, each of which may
//!   hold many datagrams coalesced by UDP GRO; finds the peer by receiver
//!   index (or by the static key in a handshake initiation), decrypts,
//!   applies crypto-key routing, and writes to the TUN, merging consecutive
//!   segments of a TCP flow into one large write (GRO towards the kernel).
//! * **timer** (`weft-wg-timer`, [`super::timers`]): every 100 ms runs
//!   `update_timers` (handshake retries, rekey, keepalives) of the peers
//!   that can have something due, and resets the handshake rate limiters.
//!
//! There are `queues` tx and rx workers (`weft-wg-tx-<q>`, `weft-wg-rx-<q>`;
//! one per CPU up to 4 by default): tx worker `q` reads TUN queue `q`, and
//! the kernel keeps each flow on one queue; rx worker `q` receives on
//! socket `q` of the port (`SO_REUSEPORT`), and the kernel keeps each peer
//! on one socket. So every flow's packets are handled in order by one
//! worker, and different flows and peers use different cores. One peer's
//! packets are still encrypted one at a time: boringtun's `Tunn` takes
//! `&mut self`, so each peer's noise state sits behind its own mutex, held
//! only while one packet is encrypted or decrypted. The peer table is an immutable
//! `Arc<PeerTable>`; the threads re-read it only when its generation number
//! changes, so the per-packet path takes no global lock. Nothing is
//! allocated per packet.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use super::offload::{self, Gro, VnetHdr, VNET_HDR_LEN};
use super::peer::{add, check_decrypted, Peer, Verdict};
use super::table::{Entry, PeerTable};
use super::timers;
use super::tun::Tun;
use super::udp::{wait_readable, Udp};
use weft_sys::udp::{RecvBatch, SendBatch, Wait};

/// Datagrams per `sendmmsg`.
pub(crate) const TX_BATCH: usize = 128;
/// Messages per `recvmmsg`.
pub(crate) const RX_BATCH: usize = 32;
/// Receive slot: a whole GRO-coalesced message fits.
pub(crate) const RX_SLOT: usize = 65_536;
/// How long an idle thread sleeps in poll(2) before checking for stop.
const POLL_MS: i32 = 100;
/// Timer tick.
pub(crate) const TICK: Duration = Duration::from_millis(100);
/// Handshake initiations per second accepted before cookies are demanded.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Handshake messages per second that reach the peers' noise states, all
/// peers together (one limiter shared by every `Tunn`, not one each):
/// initiations have passed [`HANDSHAKE_RATE_LIMIT`] and the per-source
/// budget already; this bounds the responses, and leaves room for every
/// peer of a 5,000-host cluster answering within a second or two.
const PEER_HANDSHAKE_RATE_LIMIT: u64 = 10_000;
/// WireGuard data message overhead (header 16 + tag 16).
pub(crate) const DATA_OVERHEAD: usize = 32;
/// Largest decrypted packet written to the TUN. Not the TUN's MTU: a peer
/// with a larger MTU may send more, and the kernel then routes the packet
/// and answers "fragmentation needed" where it does not fit, instead of a
/// silent drop here.
const MAX_INNER: usize = 65_535;
const MSG_DATA: u8 = 4;
const MSG_COOKIE_REPLY: u8 = 3;

/// Device-wide counters (drops that belong to no peer).
#[derive(Default)]
pub(crate) struct DeviceCounters {
    pub(crate) drops_no_peer: AtomicU64,
    pub(crate) drops_non_ipv4: AtomicU64,
    pub(crate) drops_malformed: AtomicU64,
    pub(crate) drops_unknown_peer: AtomicU64,
    pub(crate) drops_send: AtomicU64,
    pub(crate) drops_tun_read: AtomicU64,
    pub(crate) cookies_sent: AtomicU64,
    pub(crate) drops_handshake_budget: AtomicU64,
    /// Handshake initiations that got no answer ([`super::timers`]).
    pub(crate) handshake_failures: AtomicU64,
    pub(crate) tx_syscalls: AtomicU64,
    pub(crate) tx_datagrams: AtomicU64,
    pub(crate) rx_syscalls: AtomicU64,
    pub(crate) rx_datagrams: AtomicU64,
}

pub(crate) struct Shared {
    pub(crate) stop: AtomicBool,
    /// The TUN's queues: tx worker `q` reads queue `q`, rx worker `q`
    /// writes to it.
    pub(crate) tuns: Vec<Tun>,
    pub(crate) udp: Udp,
    pub(crate) mtu: usize,
    pub(crate) tx_slot: usize,
    /// This device's key, its mac1 check and cookies (replaced by a key
    /// rotation, [`super::rotate`]).
    pub(crate) keys: super::rotate::KeyCell,
    pub(crate) keepalive: Option<u16>,
    /// Handshake initiations per source that may reach the DH.
    pub(crate) sources: super::source_budget::SourceBudget,
    pub(crate) table: Mutex<Arc<PeerTable>>,
    pub(crate) generation: AtomicU64,
    pub(crate) counters: DeviceCounters,
    /// Peers the data path woke for the timer ([`super::timers::wake`]).
    pub(crate) wake: Mutex<Vec<Arc<Peer>>>,
    /// The timer thread's id, for tests that read its CPU time.
    #[cfg(test)]
    pub(crate) timer_tid: std::sync::atomic::AtomicI32,
}

impl Shared {
    pub(crate) fn table(&self) -> Arc<PeerTable> {
        Arc::clone(&self.table.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn publish(&self, t: PeerTable) {
        let mut g = self.table.lock().unwrap_or_else(|e| e.into_inner());
        *g = Arc::new(t);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A thread's cached view of the peer table.
pub(crate) struct View {
    generation: u64,
    pub(crate) table: Arc<PeerTable>,
}

impl View {
    pub(crate) fn new(sh: &Shared) -> View {
        let generation = sh.generation.load(Ordering::Acquire);
        View {
            generation,
            table: sh.table(),
        }
    }

    #[inline]
    pub(crate) fn refresh(&mut self, sh: &Shared) {
        let g = sh.generation.load(Ordering::Acquire);
        if g != self.generation {
            self.table = sh.table();
            self.generation = g;
        }
    }
}

/// Counts an encrypted data message (not a handshake, not a keepalive) as
/// sent.
#[inline]
fn count_tx(peer: &Peer, msg: &[u8]) {
    if msg.first() == Some(&MSG_DATA) && msg.len() > DATA_OVERHEAD {
        add(&peer.tx.bytes, (msg.len() - DATA_OVERHEAD) as u64);
        add(&peer.tx.packets, 1);
    }
}

/// Rate-limited logging of repeated I/O errors.
struct ErrLog {
    last: Option<Instant>,
}

impl ErrLog {
    fn log(&mut self, what: &str, e: &io::Error) {
        let now = Instant::now();
        let due = match self.last {
            None => true,
            Some(t) => now.duration_since(t) > Duration::from_secs(10),
        };
        if due {
            self.last = Some(now);
            tracing::warn!(error = %e, "{what}");
        }
    }
}

/// Encrypted datagrams waiting for one `sendmmsg`, in one reused buffer.
struct TxBatch {
    out: Vec<u8>,
    stride: usize,
    lens: Vec<usize>,
    dests: Vec<SocketAddrV4>,
    n: usize,
    send: SendBatch,
    /// The socket this batch goes out on.
    sock: usize,
}

impl TxBatch {
    fn new(stride: usize, sock: usize) -> TxBatch {
        TxBatch {
            out: vec![0u8; TX_BATCH * stride],
            stride,
            lens: vec![0; TX_BATCH],
            dests: vec![SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0); TX_BATCH],
            n: 0,
            send: SendBatch::new(TX_BATCH),
            sock,
        }
    }

    /// Encrypts one packet for `peer` into the next slot (sending the batch
    /// first if it is full).
    #[inline]
    fn encrypt(&mut self, sh: &Shared, peer: &Arc<Peer>, pkt: &[u8]) {
        if self.n == TX_BATCH {
            self.flush(sh);
        }
        if pkt.len() + DATA_OVERHEAD > self.stride {
            add(&peer.tx.drops_oversize, 1);
            return;
        }
        let n = self.n;
        let slot = &mut self.out[n * self.stride..(n + 1) * self.stride];
        let mut st = peer.lock();
        timers::touch(sh, peer, &mut st);
        match st.tunn.encapsulate(pkt, slot) {
            TunnResult::WriteToNetwork(msg) => {
                timers::sent(&mut st, msg);
                count_tx(peer, msg);
                self.lens[n] = msg.len();
                self.dests[n] = st.endpoint;
                self.n += 1;
            }
            TunnResult::Err(err) => tracing::debug!(error = ?err, "encapsulate failed"),
            // Queued inside boringtun until the handshake completes.
            _ => {}
        }
    }

    fn flush(&mut self, sh: &Shared) {
        if self.n == 0 {
            return;
        }
        let c = &sh.counters;
        let n = self.n;
        self.n = 0;
        let sent = self.send.send(
            sh.udp.socket(self.sock),
            &self.out,
            self.stride,
            &self.lens[..n],
            &self.dests[..n],
        );
        add(&c.tx_syscalls, sent.syscalls as u64);
        add(&c.tx_datagrams, sent.datagrams as u64);
        if sent.failed > 0 {
            add(&c.drops_send, sent.failed as u64);
        }
    }
}

/// Transmit worker `q`: reads TUN queue `q` (the kernel keeps each flow on
/// one queue, so a flow's packets stay in order), encrypts, sends from
/// socket `q`.
pub(crate) fn tx_loop(sh: Arc<Shared>, q: usize) {
    let tun = &sh.tuns[q % sh.tuns.len()];
    let mut batch = TxBatch::new(sh.tx_slot, q);
    let mut rbuf = vec![0u8; VNET_HDR_LEN + RX_SLOT];
    let mut view = View::new(&sh);
    let mut errs = ErrLog { last: None };
    let c = &sh.counters;
    while !sh.stopping() {
        view.refresh(&sh);
        let table = &*view.table;
        let mut idle = false;
        // Read until the TUN is empty or half a batch is waiting (a TSO
        // packet may need up to 45 slots more).
        while batch.n < TX_BATCH / 2 {
            let len = match tun.read(&mut rbuf) {
                // A TUN never reads 0 bytes; a closed file (a test's fake
                // TUN) does, forever: back off as on an error.
                Ok(0) => {
                    add(&c.drops_tun_read, 1);
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    idle = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    add(&c.drops_tun_read, 1);
                    errs.log("reading the TUN device failed", &e);
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            };
            let Some(h) = VnetHdr::parse(&rbuf[..len]) else {
                add(&c.drops_tun_read, 1);
                continue;
            };
            let pkt = &mut rbuf[VNET_HDR_LEN..len];
            if pkt.len() < 20 || pkt[0] >> 4 != 4 {
                add(&c.drops_non_ipv4, 1);
                continue;
            }
            let dst = u32::from_be_bytes([pkt[16], pkt[17], pkt[18], pkt[19]]);
            let Some(e) = table.by_dst(dst) else {
                add(&c.drops_no_peer, 1);
                continue;
            };
            match offload::classify(pkt, &h) {
                offload::Read::Single => batch.encrypt(&sh, &e.peer, pkt),
                offload::Read::Tso { hdr_len, mss } => {
                    offload::tso_segments(pkt, hdr_len, mss, |seg| batch.encrypt(&sh, &e.peer, seg))
                }
                offload::Read::Bad => add(&c.drops_tun_read, 1),
            }
        }
        batch.flush(&sh);
        if idle {
            wait_readable(tun.raw_fd(), POLL_MS);
        }
    }
}

/// Per-thread buffers of the receive path.
struct Rx {
    /// The TUN queue this worker writes to.
    q: usize,
    dec: Vec<u8>,
    cookie: [u8; 128],
    errs: ErrLog,
    gro: Gro,
    /// Whose packets are pending in `gro`.
    gro_peer: Option<Arc<Peer>>,
}

impl Rx {
    /// Writes a decrypted, accepted packet: merged into the pending large
    /// packet when it continues its TCP flow, else after flushing it.
    fn deliver(&mut self, sh: &Shared, peer: &Arc<Peer>, pkt: &[u8]) {
        if self.gro.merge(pkt) {
            return;
        }
        self.flush(sh);
        if self.gro.start(pkt) {
            self.gro_peer = Some(Arc::clone(peer));
            return;
        }
        if let Err(e) = sh.tuns[self.q].write_packet(pkt) {
            add(&peer.rx.drops_tun_write, 1);
            self.errs.log("writing to the TUN device failed", &e);
        }
    }

    /// Writes the pending merged packet, if any.
    fn flush(&mut self, sh: &Shared) {
        let peer = self.gro_peer.take();
        if let Some(frame) = self.gro.take() {
            if let Err(e) = sh.tuns[self.q].write_frame(frame) {
                if let Some(p) = peer {
                    add(&p.rx.drops_tun_write, 1);
                }
                self.errs.log("writing to the TUN device failed", &e);
            }
        }
    }
}

/// Receive worker `q`: socket `q` (the kernel keeps each peer on one socket
/// of the port, so a peer's datagrams stay in order), decrypts, writes to
/// TUN queue `q`.
pub(crate) fn rx_loop(sh: Arc<Shared>, q: usize) {
    let mut batch = RecvBatch::new(RX_BATCH, RX_SLOT);
    let mut rx = Rx {
        q: q % sh.tuns.len(),
        dec: vec![0u8; RX_SLOT],
        cookie: [0u8; 128],
        errs: ErrLog { last: None },
        gro: Gro::new(),
        gro_peer: None,
    };
    let mut view = View::new(&sh);
    let c = &sh.counters;
    while !sh.stopping() {
        view.refresh(&sh);
        let n = match batch.recv(sh.udp.socket(q), Wait::Never) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(sh.udp.raw_fd(q), POLL_MS);
                continue;
            }
            Err(e) => {
                rx.errs.log("receiving from the UDP socket failed", &e);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        add(&c.rx_syscalls, 1);
        for k in 0..n {
            let r = batch.get(k);
            // The socket is IPv4: every sender is.
            let (false, Some(SocketAddr::V4(from))) = (r.truncated, r.from) else {
                add(&c.drops_malformed, 1);
                continue;
            };
            match r.segment {
                Some(seg) if seg < r.data.len() => {
                    for d in r.data.chunks(seg) {
                        handle_datagram(&sh, &view.table, &mut rx, d, from);
                    }
                }
                _ => handle_datagram(&sh, &view.table, &mut rx, r.data, from),
            }
        }
        // Never hold a packet back across a wait.
        rx.flush(&sh);
    }
}

fn handle_datagram(sh: &Shared, table: &PeerTable, rx: &mut Rx, d: &[u8], from: SocketAddrV4) {
    let c = &sh.counters;
    add(&c.rx_datagrams, 1);
    let from_ip = IpAddr::V4(*from.ip());
    let Ok(packet) = Tunn::parse_incoming_packet(d) else {
        add(&c.drops_malformed, 1);
        return;
    };
    let is_data = matches!(packet, Packet::PacketData(_));
    // A cookie reply proves nothing about who sent it: anyone who saw our
    // initiation can make one. It must never move the peer's endpoint.
    let is_cookie = matches!(packet, Packet::PacketCookieReply(_));
    let entry: Option<&Entry> = match packet {
        Packet::HandshakeInit(ref p) => {
            // mac1 and the device-wide rate limit first: no Diffie-Hellman
            // for unauthenticated floods.
            let keys = sh.keys.current();
            match keys.limiter.verify_packet(Some(from_ip), d, &mut rx.cookie) {
                // A valid mac2 passes the limiter at any rate: a budget per
                // source before the DH.
                Ok(_) if !sh.sources.allow(*from.ip()) => {
                    add(&c.drops_handshake_budget, 1);
                    return;
                }
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    add(&c.cookies_sent, 1);
                    let _ = sh.udp.send_to(cookie, from);
                    return;
                }
                Err(_) => {
                    add(&c.drops_malformed, 1);
                    return;
                }
            }
            match parse_handshake_anon(&keys.secret, &keys.public, p) {
                // A peer's announced next key (key rotation) is handled apart.
                Ok(half) => match table.by_key(&half.peer_static_public) {
                    Some(e)
                        if super::rotate::next_key_init(
                            sh,
                            &e.peer,
                            &half.peer_static_public,
                            from,
                            d,
                        ) =>
                    {
                        return
                    }
                    e => e,
                },
                Err(_) => None,
            }
        }
        Packet::HandshakeResponse(ref p) => table.by_receiver_idx(p.receiver_idx),
        Packet::PacketCookieReply(ref p) => table.by_receiver_idx(p.receiver_idx),
        Packet::PacketData(ref p) => table.by_receiver_idx(p.receiver_idx),
    };
    let Some(entry) = entry else {
        add(&c.drops_unknown_peer, 1);
        return;
    };
    let peer = &entry.peer;
    let mut st = peer.lock();
    let mut authenticated = false;
    let mut flush = false;
    match st.tunn.decapsulate(Some(from_ip), d, &mut rx.dec) {
        TunnResult::WriteToTunnelV4(pkt, src) => {
            authenticated = true;
            let pkt: &[u8] = pkt;
            match check_decrypted(&entry.allowed, IpAddr::V4(src), pkt.len(), MAX_INNER) {
                Verdict::Accept => {
                    roam(&mut st, from, peer);
                    timers::touch(sh, peer, &mut st);
                    drop(st);
                    add(&peer.rx.bytes, pkt.len() as u64);
                    add(&peer.rx.packets, 1);
                    // `pkt` lives in rx.dec; deliver copies it out.
                    let len = pkt.len();
                    let Rx { dec, .. } = rx;
                    let pkt = std::mem::take(dec);
                    rx.deliver(sh, peer, &pkt[..len]);
                    rx.dec = pkt;
                    return;
                }
                Verdict::BadSource => {
                    add(&peer.rx.drops_bad_source, 1);
                    tracing::trace!(%src, allowed = %entry.allowed, "dropped: source outside the peer's network");
                }
                Verdict::TooBig => add(&peer.rx.drops_oversize, 1),
            }
        }
        TunnResult::WriteToTunnelV6(_, _) => {
            authenticated = true;
            add(&peer.rx.drops_bad_source, 1);
        }
        TunnResult::WriteToNetwork(msg) => {
            // A handshake response, a keepalive after a completed handshake,
            // or (under load) a cookie reply, which proves nothing.
            authenticated = msg.first() != Some(&MSG_COOKIE_REPLY);
            flush = authenticated;
            count_tx(peer, msg);
            if let Err(e) = sh.udp.send_to(msg, from) {
                add(&c.drops_send, 1);
                tracing::debug!(error = %e, "sending a handshake message failed");
            }
        }
        TunnResult::Done => authenticated = !is_cookie,
        TunnResult::Err(e) => {
            if is_data {
                add(&peer.rx.drops_decrypt, 1);
            } else {
                add(&peer.rx.handshake_errors, 1);
                if !matches!(e, WireGuardError::DuplicateCounter) {
                    tracing::debug!(error = ?e, peer = %super::key::key_to_base64(&st.key),
                        "handshake message rejected");
                }
            }
        }
    }
    if authenticated {
        roam(&mut st, from, peer);
        timers::touch(sh, peer, &mut st);
    }
    if flush {
        timers::established(&mut st);
    }
    if flush {
        // Packets boringtun queued while the handshake was going on.
        let to = st.endpoint;
        while let TunnResult::WriteToNetwork(msg) = st.tunn.decapsulate(None, &[], &mut rx.dec) {
            count_tx(peer, msg);
            if sh.udp.send_to(msg, to).is_err() {
                add(&c.drops_send, 1);
            }
        }
    }
}

/// Roaming: an authenticated message from a new address moves the peer's
/// endpoint there.
#[inline]
fn roam(st: &mut super::peer::PeerState, from: SocketAddrV4, _peer: &Peer) {
    if st.endpoint != from {
        tracing::info!(peer = %super::key::key_to_base64(&st.key), old = %st.endpoint,
            new = %from, "peer endpoint changed");
        st.endpoint = from;
    }
}

/// Starts a handshake with a newly added peer, so that sessions exist before
/// the first packet (and come back at once after a restart).
pub(crate) fn initiate(sh: &Shared, peer: &Arc<Peer>) {
    let mut buf = [0u8; 256];
    let mut st = peer.lock();
    let to = st.endpoint;
    timers::wake(sh, peer, &mut st);
    if let TunnResult::WriteToNetwork(msg) = st.tunn.format_handshake_initiation(&mut buf, false) {
        timers::sent(&mut st, msg);
        if let Err(e) = sh.udp.send_to(msg, to) {
            tracing::debug!(error = %e, %to, "sending a handshake initiation failed");
        }
    }
}

pub(crate) fn new_limiter(public: &x25519::PublicKey) -> RateLimiter {
    RateLimiter::new(public, HANDSHAKE_RATE_LIMIT)
}

/// The one rate limiter every peer's noise state shares.
pub(crate) fn new_peer_limiter(public: &x25519::PublicKey) -> Arc<RateLimiter> {
    Arc::new(RateLimiter::new(public, PEER_HANDSHAKE_RATE_LIMIT))
}
