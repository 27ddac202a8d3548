//! Forwarding names outside the cluster to the host's upstream resolvers,
//! with a cache that honours TTLs, a timeout per upstream, failover, and
//! SERVFAIL when no upstream answers.
//!
//! The client's query goes upstream as it came (with a fresh random id, and
//! its EDNS size capped at 1232); the answer goes back with the client's id
//! and question. Answers are cached by (name, type, class, EDNS, DO, CD,
//! transport) for the smallest TTL in them (negative answers: the SOA's
//! TTL/minimum, RFC 2308), at most an hour, and served with the TTLs counted
//! down.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::answer::{write_simple, write_truncated};
use crate::wire::{
    get_u16, get_u32, next_record, parse_query, Query, EDNS_UDP_SIZE, FLAG_CD, FLAG_QR, FLAG_TC,
    HEADER_LEN, RCODE_NOERROR, RCODE_NXDOMAIN, RCODE_SERVFAIL, TYPE_OPT, TYPE_SOA,
};

/// Longest time an answer stays cached, whatever its TTL.
pub const MAX_CACHE_TTL: u32 = 3600;
/// Queries forwarded at the same time, at most; more are dropped (the
/// client retries).
pub const MAX_INFLIGHT: usize = 1024;

/// Counters of the forwarding path.
#[derive(Debug, Default)]
pub struct ForwardStats {
    pub forwarded: AtomicU64,
    pub cache_hits: AtomicU64,
    pub servfail: AtomicU64,
    pub dropped: AtomicU64,
}

struct CacheEntry {
    answer: Vec<u8>,
    /// (offset, original TTL) of every record's TTL field.
    ttls: Vec<(usize, u32)>,
    stored: Instant,
    expires: Instant,
}

/// The forwarder: upstreams (replaced when resolv.conf changes) and the cache.
pub struct Forwarder {
    upstreams: ArcSwap<Vec<SocketAddr>>,
    /// Index of the upstream that answered last: tried first.
    preferred: AtomicUsize,
    timeout: Duration,
    /// The port of the upstreams (53).
    port: u16,
    cache: Mutex<HashMap<Vec<u8>, CacheEntry>>,
    cache_size: usize,
    inflight: Arc<Semaphore>,
    pub stats: ForwardStats,
}

impl Forwarder {
    pub fn new(timeout: Duration, cache_size: usize, port: u16) -> Self {
        Forwarder {
            upstreams: ArcSwap::from_pointee(Vec::new()),
            preferred: AtomicUsize::new(0),
            timeout,
            port,
            cache: Mutex::new(HashMap::new()),
            cache_size,
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
            stats: ForwardStats::default(),
        }
    }

    /// Replaces the upstream list (a changed resolv.conf). Keeps the cache:
    /// what was true a second ago still is.
    pub fn set_upstreams(&self, mut upstreams: Vec<SocketAddr>) {
        for u in &mut upstreams {
            u.set_port(self.port);
        }
        self.preferred.store(0, Ordering::Relaxed);
        self.upstreams.store(Arc::new(upstreams));
    }

    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.upstreams.load().as_ref().clone()
    }

    /// Number of cached answers.
    pub fn cache_len(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// The answer for the client's `packet` (a query that parsed, asking for
    /// a name outside the cluster), or `None` to send nothing.
    pub async fn resolve(&self, packet: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let q = parse_query(packet).ok()?;
        let limit = if tcp {
            u16::MAX as usize
        } else {
            q.udp_limit()
        };
        let key = cache_key(&q, tcp);
        if let Some(answer) = self.cached(&key, &q, packet) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Some(self.fit(answer, &q, packet, limit));
        }
        let Ok(_permit) = self.inflight.clone().try_acquire_owned() else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        match self.ask_upstreams(&q, packet, tcp).await {
            Some(mut answer) => {
                answer[0..2].copy_from_slice(&q.id.to_be_bytes());
                restore_question(&mut answer, packet, q.question_end);
                if let Some(scan) = scan_answer(&answer) {
                    if let Some(at) = scan.opt_size_at {
                        answer[at..at + 2].copy_from_slice(&EDNS_UDP_SIZE.to_be_bytes());
                    }
                    if let Some(ttl) = scan.cache_ttl {
                        self.store(key, &answer, scan.ttls, ttl);
                    }
                }
                Some(self.fit(answer, &q, packet, limit))
            }
            None => {
                self.stats.servfail.fetch_add(1, Ordering::Relaxed);
                let mut out = vec![0u8; q.question_end + 64];
                let n = write_simple(&q, packet, RCODE_SERVFAIL, &mut out);
                out.truncate(n);
                (n > 0).then_some(out)
            }
        }
    }

    /// The cached answer for a UDP query, if there is a fresh one (no await:
    /// the UDP threads answer these themselves).
    pub fn cached_answer(&self, packet: &[u8]) -> Option<Vec<u8>> {
        let q = parse_query(packet).ok()?;
        let answer = self.cached(&cache_key(&q, false), &q, packet)?;
        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        Some(self.fit(answer, &q, packet, q.udp_limit()))
    }

    /// An answer larger than the client takes becomes header + question + TC.
    fn fit(&self, answer: Vec<u8>, q: &Query, packet: &[u8], limit: usize) -> Vec<u8> {
        if answer.len() <= limit {
            return answer;
        }
        let mut out = vec![0u8; q.question_end + 64];
        let n = write_truncated(q, packet, &mut out);
        out.truncate(n);
        out
    }

    fn cached(&self, key: &[u8], q: &Query, packet: &[u8]) -> Option<Vec<u8>> {
        let mut answer = {
            let cache = self.cache.lock().ok()?;
            let e = cache.get(key)?;
            let now = Instant::now();
            if now >= e.expires {
                return None;
            }
            let age = now.duration_since(e.stored).as_secs() as u32;
            let mut answer = e.answer.clone();
            for &(at, ttl) in &e.ttls {
                if let Some(f) = answer.get_mut(at..at + 4) {
                    f.copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
                }
            }
            answer
        };
        answer[0..2].copy_from_slice(&q.id.to_be_bytes());
        restore_question(&mut answer, packet, q.question_end);
        Some(answer)
    }

    fn store(&self, key: Vec<u8>, answer: &[u8], ttls: Vec<(usize, u32)>, ttl: u32) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        let now = Instant::now();
        if cache.len() >= self.cache_size {
            cache.retain(|_, e| e.expires > now);
            if cache.len() >= self.cache_size {
                // Still full of live answers: make room for a new generation.
                cache.clear();
            }
        }
        if self.cache_size == 0 {
            return;
        }
        cache.insert(
            key,
            CacheEntry {
                answer: answer.to_vec(),
                ttls,
                stored: now,
                expires: now + Duration::from_secs(ttl as u64),
            },
        );
    }

    /// Tries each upstream once, the last one that worked first. An answer
    /// with SERVFAIL or REFUSED counts as a failure (the next one may know);
    /// `None` when none gave a usable answer.
    async fn ask_upstreams(&self, q: &Query, packet: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let upstreams = self.upstreams.load_full();
        if upstreams.is_empty() {
            tracing::debug!("no upstream resolvers; answering SERVFAIL");
            return None;
        }
        let mut query = packet.to_vec();
        if let Some(at) = q.opt_size_at {
            let size = q.udp_limit() as u16;
            query[at..at + 2].copy_from_slice(&size.to_be_bytes());
        }
        let first = self.preferred.load(Ordering::Relaxed) % upstreams.len();
        for i in 0..upstreams.len() {
            let idx = (first + i) % upstreams.len();
            let server = upstreams[idx];
            let id = random_u16();
            query[0..2].copy_from_slice(&id.to_be_bytes());
            // A truncated answer over UDP is passed on as it is: the client
            // asks again over TCP, and then so do we.
            let result = if tcp {
                self.ask_tcp(server, &query, id, q).await
            } else {
                self.ask_udp(server, &query, id, q).await
            };
            match result {
                Some(answer) => {
                    let rcode = answer[3] & 0x0F;
                    if rcode == RCODE_SERVFAIL || rcode == crate::wire::RCODE_REFUSED {
                        tracing::debug!(%server, rcode, "upstream refused or failed; trying the next");
                        continue;
                    }
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Some(answer);
                }
                None => {
                    tracing::debug!(%server, "upstream did not answer in time; trying the next");
                }
            }
        }
        None
    }

    async fn ask_udp(
        &self,
        server: SocketAddr,
        query: &[u8],
        id: u16,
        q: &Query,
    ) -> Option<Vec<u8>> {
        let local: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = UdpSocket::bind(local).await.ok()?;
        sock.connect(server).await.ok()?;
        sock.send(query).await.ok()?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut buf = vec![0u8; 65535];
        loop {
            let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
                .await
                .ok()?
                .ok()?;
            // Anything but the answer to this query (spoofed, stale) is ignored.
            if is_answer_to(&buf[..n], id, query, q.question_end) {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }

    async fn ask_tcp(
        &self,
        server: SocketAddr,
        query: &[u8],
        id: u16,
        q: &Query,
    ) -> Option<Vec<u8>> {
        let work = async {
            let mut s = TcpStream::connect(server).await.ok()?;
            let mut msg = Vec::with_capacity(query.len() + 2);
            msg.extend_from_slice(&(query.len() as u16).to_be_bytes());
            msg.extend_from_slice(query);
            s.write_all(&msg).await.ok()?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.ok()?;
            let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut buf).await.ok()?;
            is_answer_to(&buf, id, query, q.question_end).then_some(buf)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .ok()
            .flatten()
    }
}

/// Whether `answer` answers our `query` (id `id`): a response with that id
/// and the same question (names compared case-insensitively).
fn is_answer_to(answer: &[u8], id: u16, query: &[u8], question_end: usize) -> bool {
    if answer.len() < question_end || get_u16(answer, 0) != Some(id) {
        return false;
    }
    let flags = get_u16(answer, 2).unwrap_or(0);
    if flags & FLAG_QR == 0 || get_u16(answer, 4) != Some(1) {
        return false;
    }
    answer[HEADER_LEN..question_end]
        .iter()
        .zip(&query[HEADER_LEN..question_end])
        .all(|(a, b)| a.eq_ignore_ascii_case(b))
}

/// Puts the client's question (its case) back into an answer.
fn restore_question(answer: &mut [u8], packet: &[u8], question_end: usize) {
    if answer.len() >= question_end && packet.len() >= question_end {
        answer[HEADER_LEN..question_end].copy_from_slice(&packet[HEADER_LEN..question_end]);
    }
}

fn cache_key(q: &Query, tcp: bool) -> Vec<u8> {
    let mut flags = 0u8;
    if q.edns.is_some() {
        flags |= 1;
    }
    if q.edns.is_some_and(|e| e.dnssec_ok) {
        flags |= 2;
    }
    if q.flags & FLAG_CD != 0 {
        flags |= 4;
    }
    if tcp {
        flags |= 8;
    }
    let mut key = Vec::with_capacity(5 + q.name.wire().len());
    key.push(flags);
    key.extend_from_slice(&q.qtype.to_be_bytes());
    key.extend_from_slice(&q.qclass.to_be_bytes());
    key.extend_from_slice(q.name.wire());
    key
}

/// What the cache needs to know about an upstream answer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AnswerScan {
    /// TTL fields of every record but OPT: (offset, value).
    pub ttls: Vec<(usize, u32)>,
    /// How long to cache it; `None`: not at all.
    pub cache_ttl: Option<u32>,
    /// Offset of the OPT record's UDP size.
    pub opt_size_at: Option<usize>,
}

/// Walks an answer's records. `None` if it is malformed.
pub fn scan_answer(a: &[u8]) -> Option<AnswerScan> {
    let flags = get_u16(a, 2)?;
    let counts = [
        get_u16(a, 4)?,
        get_u16(a, 6)?,
        get_u16(a, 8)?,
        get_u16(a, 10)?,
    ];
    let mut pos = HEADER_LEN;
    for _ in 0..counts[0] {
        pos = crate::wire::skip_name(a, pos)? + 4;
        if pos > a.len() {
            return None;
        }
    }
    let mut scan = AnswerScan::default();
    let mut min_ttl: Option<u32> = None;
    let mut negative_ttl: Option<u32> = None;
    for (section, &count) in counts.iter().enumerate().skip(1) {
        for _ in 0..count {
            let r = next_record(a, pos)?;
            if r.rtype == TYPE_OPT {
                scan.opt_size_at = Some(r.class_at);
            } else {
                let ttl = get_u32(a, r.ttl_at)?;
                scan.ttls.push((r.ttl_at, ttl));
                if section < 3 {
                    min_ttl = Some(min_ttl.map_or(ttl, |m| m.min(ttl)));
                }
                if section == 2 && r.rtype == TYPE_SOA && r.rdata_len >= 20 {
                    let minimum = get_u32(a, r.rdata_at + r.rdata_len - 4)?;
                    negative_ttl = Some(ttl.min(minimum));
                }
            }
            pos = r.end;
        }
    }
    let rcode = (flags & 0x0F) as u8;
    let cacheable = flags & FLAG_TC == 0 && (rcode == RCODE_NOERROR || rcode == RCODE_NXDOMAIN);
    scan.cache_ttl = if !cacheable {
        None
    } else if counts[1] > 0 {
        min_ttl
    } else {
        negative_ttl
    }
    .map(|t| t.min(MAX_CACHE_TTL))
    .filter(|&t| t > 0);
    Some(scan)
}

/// A random query id (from getrandom(2); the clock if that fails).
fn random_u16() -> u16 {
    if let Ok(id) = weft_sys::random::u16() {
        return id;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (t ^ (t >> 16)) as u16
}

/// Addresses that must never be upstreams: dnsd itself.
pub fn is_self(ip: IpAddr, listen: &[SocketAddr]) -> bool {
    ip == IpAddr::V4(weft_model::DNS_ADDR)
        || ip.is_unspecified()
        || listen.iter().any(|l| l.ip() == ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(rcode: u8, an: &[(u32, &[u8])], soa: Option<(u32, u32)>, opt: bool) -> Vec<u8> {
        let mut a = vec![
            0x11,
            0x22,
            0x81,
            0x80 | rcode,
            0,
            1,
            0,
            an.len() as u8,
            0,
            0,
            0,
            0,
        ];
        a.extend(b"\x07example\x03com\x00\x00\x01\x00\x01");
        for (ttl, addr) in an {
            a.extend([0xC0, 12, 0, 1, 0, 1]);
            a.extend(ttl.to_be_bytes());
            a.extend([0, 4]);
            a.extend(*addr);
        }
        if let Some((ttl, min)) = soa {
            a[9] = 1;
            a.extend([0xC0, 20, 0, 6, 0, 1]);
            a.extend(ttl.to_be_bytes());
            a.extend([0, 22, 0, 0]); // mname ., rname .
            for v in [1u32, 2, 3, 4, min] {
                a.extend(v.to_be_bytes());
            }
        }
        if opt {
            a[11] = 1;
            a.extend([0, 0, 41, 4, 0xD0, 0, 0, 0, 0, 0, 0]);
        }
        a
    }

    #[test]
    fn scan_positive_negative_and_uncacheable() {
        let a = answer(0, &[(300, &[1, 2, 3, 4]), (60, &[5, 6, 7, 8])], None, true);
        let s = scan_answer(&a).unwrap();
        assert_eq!(s.cache_ttl, Some(60));
        assert_eq!(s.ttls.len(), 2);
        assert!(s.opt_size_at.is_some());
        let a = answer(3, &[], Some((900, 30)), false);
        assert_eq!(scan_answer(&a).unwrap().cache_ttl, Some(30));
        let a = answer(0, &[], None, false);
        assert_eq!(scan_answer(&a).unwrap().cache_ttl, None);
        let a = answer(2, &[(300, &[1, 2, 3, 4])], None, false);
        assert_eq!(scan_answer(&a).unwrap().cache_ttl, None);
        let a = answer(0, &[(999_999, &[1, 2, 3, 4])], None, false);
        assert_eq!(scan_answer(&a).unwrap().cache_ttl, Some(MAX_CACHE_TTL));
        let a = answer(0, &[(300, &[1, 2, 3, 4])], None, false);
        assert!(scan_answer(&a[..a.len() - 1]).is_none());
    }

    #[test]
    fn matches_only_the_right_answer() {
        let q = b"\x11\x22\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07ExAmple\x03com\x00\x00\x01\x00\x01";
        let qend = q.len();
        let a = answer(0, &[(300, &[1, 2, 3, 4])], None, false);
        assert!(is_answer_to(&a, 0x1122, q, qend));
        assert!(!is_answer_to(&a, 0x1123, q, qend));
        let mut other = a.clone();
        other[13] = b'x';
        assert!(!is_answer_to(&other, 0x1122, q, qend));
        assert!(!is_answer_to(&a[..10], 0x1122, q, qend));
    }

    #[test]
    fn never_forwards_to_itself() {
        let listen: Vec<SocketAddr> = vec!["127.0.0.1:5353".parse().unwrap()];
        assert!(is_self("169.254.169.250".parse().unwrap(), &listen));
        assert!(is_self("127.0.0.1".parse().unwrap(), &listen));
        assert!(is_self("0.0.0.0".parse().unwrap(), &listen));
        assert!(!is_self("192.0.2.53".parse().unwrap(), &listen));
    }
}
