//! Forwarding names outside the cluster to the host's upstream resolvers,
//! with a cache that honours TTLs, a timeout per upstream, failover, and
//! SERVFAIL when no upstream answers.
//!
//! The client's query goes upstream as it came (with a fresh random id, and
//! its EDNS size capped at 1232). The upstream's answer is read with
//! hickory-proto (`Message`) and goes back with the client's id and
//! question (its case). Answers are cached by (name, type, class, EDNS, DO,
//! CD, transport) for the smallest TTL in them (negative answers: the SOA's
//! TTL or minimum, whichever is smaller, RFC 2308), at most an hour, and
//! served with the TTLs counted down. The cache is bounded: when full, the
//! answer that expires soonest makes room ([`cache`]). Identical queries
//! that arrive while one is being asked upstream wait for that one answer
//! instead of asking again (single-flight).
//!
//! The exchange itself stays on plain tokio sockets: hickory-net's UDP
//! client retries the same server within its timeout and its TCP client
//! needs a multiplexer task per connection, and hickory-resolver's pool
//! re-asks truncated UDP answers over TCP itself and orders servers by its
//! own statistics; dnsd's rules (one try per upstream, the last good one
//! first, a truncated UDP answer passed on for the client to retry over
//! TCP) are a few lines here.

mod cache;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, MessageType, Query as Question, ResponseCode};
use hickory_proto::rr::RData;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::answer::{write_simple, write_truncated};
use crate::wire::{parse_query, Query, EDNS_UDP_SIZE, FLAG_CD, HEADER_LEN, RCODE_SERVFAIL};
use cache::Cache;

/// Longest time an answer stays cached, whatever its TTL.
pub const MAX_CACHE_TTL: u32 = 3600;
/// Distinct queries forwarded at the same time, at most; more are dropped
/// (the client retries). Queries merged into one in flight do not count.
pub const MAX_INFLIGHT: usize = 1024;

/// Counters of the forwarding path.
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Queries asked upstream (one per flight, however many clients wait).
    pub forwarded: AtomicU64,
    pub cache_hits: AtomicU64,
    pub servfail: AtomicU64,
    pub dropped: AtomicU64,
    /// Queries that waited for an identical one already in flight.
    pub merged: AtomicU64,
    /// Live answers evicted from the full cache.
    pub evicted: AtomicU64,
}

/// What a flight ends with: the upstream's answer, or `None` when no
/// upstream gave a usable one.
type Outcome = Option<Arc<Message>>;

/// The forwarder: upstreams (replaced when resolv.conf changes), the cache
/// and the queries in flight.
pub struct Forwarder {
    upstreams: ArcSwap<Vec<SocketAddr>>,
    /// Index of the upstream that answered last: tried first.
    preferred: AtomicUsize,
    timeout: Duration,
    /// The port of the upstreams (53).
    port: u16,
    cache: Mutex<Cache>,
    /// Queries being asked upstream, by cache key: later identical ones
    /// wait on the receiver. `None` in the channel until the answer is in.
    flights: Mutex<HashMap<Vec<u8>, watch::Receiver<Option<Outcome>>>>,
    inflight: Arc<Semaphore>,
    pub stats: ForwardStats,
}

/// How a query that missed the cache gets its answer.
enum Flight {
    /// Ask upstream and tell the others.
    Lead(watch::Sender<Option<Outcome>>, OwnedSemaphorePermit),
    /// Wait for the one in flight.
    Join(watch::Receiver<Option<Outcome>>),
    /// Answered from the cache after all (filled meanwhile).
    Cached(cache::Hit),
    /// Too many in flight.
    Busy,
}

/// Removes a flight from the table when its leader is done (or dropped).
struct Landing<'a> {
    fwd: &'a Forwarder,
    key: &'a [u8],
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        if let Ok(mut f) = self.fwd.flights.lock() {
            f.remove(self.key);
        }
    }
}

impl Forwarder {
    pub fn new(timeout: Duration, cache_size: usize, port: u16) -> Self {
        Forwarder {
            upstreams: ArcSwap::from_pointee(Vec::new()),
            preferred: AtomicUsize::new(0),
            timeout,
            port,
            cache: Mutex::new(Cache::new(cache_size)),
            flights: Mutex::new(HashMap::new()),
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
        let question = client_question(packet, &q)?;
        let limit = if tcp {
            u16::MAX as usize
        } else {
            q.udp_limit()
        };
        let key = cache_key(&q, tcp);
        if let Some(hit) = self.cached(&key) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Some(self.hit_reply(&key, &hit, &q, &question, packet, limit));
        }
        let outcome = match self.board(&key) {
            Flight::Cached(hit) => {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Some(self.hit_reply(&key, &hit, &q, &question, packet, limit));
            }
            Flight::Busy => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Flight::Join(mut rx) => {
                self.stats.merged.fetch_add(1, Ordering::Relaxed);
                // A leader that went away (its task dropped) leaves nothing:
                // SERVFAIL, the client asks again.
                let got = rx.wait_for(Option::is_some).await;
                got.ok().and_then(|o| o.clone()).flatten()
            }
            Flight::Lead(tx, _permit) => {
                let _landing = Landing {
                    fwd: self,
                    key: &key,
                };
                self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                let outcome = self.ask_upstreams(&q, &question, packet, tcp).await;
                if let Some(answer) = &outcome {
                    if let Some(ttl) = cache_ttl(answer) {
                        self.store(key.clone(), answer.clone(), ttl);
                    }
                }
                tx.send_replace(Some(outcome.clone()));
                outcome
            }
        };
        match outcome {
            Some(answer) => Some(reply(&answer, 0, &q, &question, packet, limit)),
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
        let key = cache_key(&q, false);
        let hit = self.cached(&key)?;
        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        if let Some(out) = hit.rendered.as_deref().and_then(|r| patched(r, &q, packet)) {
            return Some(fit(out, &q, packet, q.udp_limit()));
        }
        let question = client_question(packet, &q)?;
        Some(self.hit_reply(&key, &hit, &q, &question, packet, q.udp_limit()))
    }

    /// The reply to a cache hit: the bytes already written from this answer
    /// in this second with the client's id and question patched in, or
    /// written afresh (and remembered for the next hit).
    fn hit_reply(
        &self,
        key: &[u8],
        hit: &cache::Hit,
        q: &Query,
        question: &Question,
        packet: &[u8],
        limit: usize,
    ) -> Vec<u8> {
        if let Some(out) = hit.rendered.as_deref().and_then(|r| patched(r, q, packet)) {
            return fit(out, q, packet, limit);
        }
        match render(&hit.answer, hit.age, q.id, question) {
            Some(bytes) => {
                if let Ok(mut cache) = self.cache.lock() {
                    cache.remember(key, hit.age, Arc::from(bytes.as_slice()));
                }
                fit(bytes, q, packet, limit)
            }
            None => servfail(q, packet),
        }
    }

    fn cached(&self, key: &[u8]) -> Option<cache::Hit> {
        self.cache.lock().ok()?.get(key, Instant::now())
    }

    fn store(&self, key: Vec<u8>, answer: Arc<Message>, ttl: u32) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        let evicted = cache.insert(key, answer, ttl, Instant::now());
        if evicted > 0 {
            self.stats.evicted.fetch_add(evicted, Ordering::Relaxed);
        }
    }

    /// Joins the flight for `key`, or starts one (if there is room).
    fn board(&self, key: &[u8]) -> Flight {
        let Ok(mut flights) = self.flights.lock() else {
            return Flight::Busy;
        };
        if let Some(rx) = flights.get(key) {
            return Flight::Join(rx.clone());
        }
        // A flight for this key may have landed since the cache was asked.
        if let Some(hit) = self.cached(key) {
            return Flight::Cached(hit);
        }
        let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
            return Flight::Busy;
        };
        let (tx, rx) = watch::channel(None);
        flights.insert(key.to_vec(), rx);
        Flight::Lead(tx, permit)
    }

    /// Tries each upstream once, the last one that worked first. An answer
    /// with SERVFAIL or REFUSED counts as a failure (the next one may know);
    /// `None` when none gave a usable answer.
    async fn ask_upstreams(
        &self,
        q: &Query,
        question: &Question,
        packet: &[u8],
        tcp: bool,
    ) -> Option<Arc<Message>> {
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
                self.ask_tcp(server, &query, id, question).await
            } else {
                self.ask_udp(server, &query, id, question).await
            };
            match result {
                Some(answer) => {
                    let rcode = answer.metadata.response_code;
                    if rcode == ResponseCode::ServFail || rcode == ResponseCode::Refused {
                        tracing::debug!(%server, %rcode, "upstream refused or failed; trying the next");
                        continue;
                    }
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Some(Arc::new(answer));
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
        question: &Question,
    ) -> Option<Message> {
        let local: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = UdpSocket::bind(local).await.ok()?;
        sock.connect(server).await.ok()?;
        sock.send(query).await.ok()?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        // Room for any datagram, but not zeroed: the kernel writes only what
        // arrives (zeroing 64 KiB per query cost 3 page faults a query and
        // about a fifth of the forwarding rate).
        let mut buf = Vec::with_capacity(65535);
        loop {
            buf.clear();
            let n = tokio::time::timeout_at(deadline, sock.recv_buf(&mut buf))
                .await
                .ok()?
                .ok()?;
            // Anything but the answer to this query (spoofed, stale,
            // unreadable) is ignored.
            if let Some(m) = answer_to(&buf[..n], id, question) {
                return Some(m);
            }
        }
    }

    async fn ask_tcp(
        &self,
        server: SocketAddr,
        query: &[u8],
        id: u16,
        question: &Question,
    ) -> Option<Message> {
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
            answer_to(&buf, id, question)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .ok()
            .flatten()
    }
}

/// `answer` parsed, if it answers our query (id `id`): a response with that
/// id and the same single question (names compared case-insensitively).
fn answer_to(answer: &[u8], id: u16, question: &Question) -> Option<Message> {
    // Cheap checks before parsing: most strays fail on the id.
    if answer.len() < HEADER_LEN || answer[0..2] != id.to_be_bytes() {
        return None;
    }
    let m = Message::from_vec(answer).ok()?;
    (m.metadata.message_type == MessageType::Response
        && m.queries.len() == 1
        && m.queries[0] == *question)
        .then_some(m)
}

/// The client's question as it wrote it (its case kept).
fn client_question(packet: &[u8], q: &Query) -> Option<Question> {
    let bytes = packet.get(HEADER_LEN..q.question_end)?;
    Question::read(&mut BinDecoder::new(bytes)).ok()
}

/// The client's answer from an upstream `answer` stored `age` seconds ago:
/// the client's id and question, TTLs counted down, dnsd's EDNS size; if
/// larger than the client takes, header + question + TC.
fn reply(
    answer: &Message,
    age: u32,
    q: &Query,
    question: &Question,
    packet: &[u8],
    limit: usize,
) -> Vec<u8> {
    match render(answer, age, q.id, question) {
        Some(bytes) => fit(bytes, q, packet, limit),
        None => servfail(q, packet),
    }
}

/// `rendered` (a reply written for an identical question: same cache key)
/// with this client's id and question (its case) in place, or `None` if the
/// question there is not the client's after all. The question is the first
/// thing after the header and never compressed, so the lengths match and
/// compression pointers into it stay valid.
fn patched(rendered: &[u8], q: &Query, packet: &[u8]) -> Option<Vec<u8>> {
    let end = q.question_end;
    let theirs = packet.get(HEADER_LEN..end)?;
    if !rendered.get(HEADER_LEN..end)?.eq_ignore_ascii_case(theirs) {
        return None;
    }
    let mut out = rendered.to_vec();
    out[0..2].copy_from_slice(&q.id.to_be_bytes());
    out[HEADER_LEN..end].copy_from_slice(theirs);
    Some(out)
}

/// `bytes` if the client takes that much, else header + question + TC.
fn fit(bytes: Vec<u8>, q: &Query, packet: &[u8], limit: usize) -> Vec<u8> {
    if bytes.len() <= limit {
        return bytes;
    }
    let mut out = vec![0u8; q.question_end + 64];
    let n = write_truncated(q, packet, &mut out);
    out.truncate(n);
    out
}

fn servfail(q: &Query, packet: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; q.question_end + 64];
    let n = write_simple(q, packet, RCODE_SERVFAIL, &mut out);
    out.truncate(n);
    out
}

/// The upstream `answer` as sent to a client: id `id`, the client's
/// `question`, TTLs counted down by `age`, dnsd's EDNS size; `None` if it
/// cannot be written.
fn render(answer: &Message, age: u32, id: u16, question: &Question) -> Option<Vec<u8>> {
    let mut m = answer.clone();
    m.metadata.id = id;
    m.queries = vec![question.clone()];
    if age > 0 {
        for r in m
            .answers
            .iter_mut()
            .chain(m.authorities.iter_mut())
            .chain(m.additionals.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(age);
        }
    }
    if let Some(edns) = m.edns.as_mut() {
        edns.set_max_payload(EDNS_UDP_SIZE);
    }
    m.to_vec()
        .map_err(|e| tracing::debug!(error = %e, "cannot write an upstream answer back; SERVFAIL"))
        .ok()
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

/// How long to cache an upstream answer, or `None`: not at all (truncated,
/// an error other than NXDOMAIN, no TTL to go by, or a TTL of 0).
/// Positive answers: the smallest TTL of the answer and authority records.
/// Negative ones (NXDOMAIN, or no answer records): the authority SOA's TTL
/// or its minimum, whichever is smaller (RFC 2308). At most
/// [`MAX_CACHE_TTL`].
pub fn cache_ttl(m: &Message) -> Option<u32> {
    let rcode = m.metadata.response_code;
    if m.metadata.truncation || (rcode != ResponseCode::NoError && rcode != ResponseCode::NXDomain)
    {
        return None;
    }
    let ttl = if m.answers.is_empty() {
        m.authorities.iter().find_map(|r| match &r.data {
            RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
            _ => None,
        })
    } else {
        m.answers.iter().chain(&m.authorities).map(|r| r.ttl).min()
    };
    ttl.map(|t| t.min(MAX_CACHE_TTL)).filter(|&t| t > 0)
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

    fn ttl_of(a: &[u8]) -> Option<u32> {
        cache_ttl(&Message::from_vec(a).unwrap())
    }

    #[test]
    fn cache_ttl_positive_negative_and_uncacheable() {
        let a = answer(0, &[(300, &[1, 2, 3, 4]), (60, &[5, 6, 7, 8])], None, true);
        assert_eq!(ttl_of(&a), Some(60));
        // NXDOMAIN: min(SOA TTL, SOA minimum).
        assert_eq!(ttl_of(&answer(3, &[], Some((900, 30)), false)), Some(30));
        assert_eq!(ttl_of(&answer(0, &[], Some((20, 30)), false)), Some(20));
        // NODATA without SOA: nothing to go by.
        assert_eq!(ttl_of(&answer(0, &[], None, false)), None);
        // SERVFAIL is never cached.
        assert_eq!(
            ttl_of(&answer(2, &[(300, &[1, 2, 3, 4])], None, false)),
            None
        );
        assert_eq!(
            ttl_of(&answer(0, &[(999_999, &[1, 2, 3, 4])], None, false)),
            Some(MAX_CACHE_TTL)
        );
        assert_eq!(ttl_of(&answer(0, &[(0, &[1, 2, 3, 4])], None, false)), None);
        // Truncated: not cached.
        let mut tc = answer(0, &[(300, &[1, 2, 3, 4])], None, false);
        tc[2] |= 0x02;
        assert_eq!(ttl_of(&tc), None);
        // A cut-off answer does not parse.
        let a = answer(0, &[(300, &[1, 2, 3, 4])], None, false);
        assert!(Message::from_vec(&a[..a.len() - 1]).is_err());
    }

    fn example_question(name: &str) -> Question {
        let q = format!(
            "\x11\x22\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07{name}\x03com\x00\x00\x01\x00\x01"
        );
        let p = q.as_bytes();
        client_question(p, &parse_query(p).unwrap()).unwrap()
    }

    #[test]
    fn matches_only_the_right_answer() {
        let question = example_question("ExAmple");
        let a = answer(0, &[(300, &[1, 2, 3, 4])], None, false);
        assert!(answer_to(&a, 0x1122, &question).is_some());
        assert!(answer_to(&a, 0x1123, &question).is_none());
        let mut other = a.clone();
        other[13] = b'x';
        assert!(answer_to(&other, 0x1122, &question).is_none());
        assert!(answer_to(&a[..10], 0x1122, &question).is_none());
        let mut not_response = a.clone();
        not_response[2] &= 0x7F;
        assert!(answer_to(&not_response, 0x1122, &question).is_none());
    }

    #[test]
    fn reply_has_the_clients_id_question_counted_down_ttls_and_dnsd_edns_size() {
        let p = b"\x77\x66\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x07EXAMPLE\x03com\x00\x00\x01\x00\x01\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00";
        let q = parse_query(p).unwrap();
        let question = client_question(p, &q).unwrap();
        let up = Message::from_vec(&answer(0, &[(300, &[1, 2, 3, 4])], None, true)).unwrap();
        let out = Message::from_vec(&reply(&up, 100, &q, &question, p, 1232)).unwrap();
        assert_eq!(out.metadata.id, 0x7766);
        assert_eq!(out.queries[0].name().to_string(), "EXAMPLE.com.");
        assert_eq!(out.answers[0].ttl, 200);
        assert_eq!(out.edns.unwrap().max_payload(), EDNS_UDP_SIZE);
        // Too large for the client: header, question, TC.
        let small = reply(&up, 0, &q, &question, p, 40);
        let t = Message::from_vec(&small).unwrap();
        assert!(t.metadata.truncation);
        assert!(t.answers.is_empty());
        assert_eq!(t.metadata.id, 0x7766);
    }

    #[test]
    fn a_second_hit_reuses_the_written_reply_with_its_own_id_and_case() {
        let fwd = Forwarder::new(Duration::from_secs(1), 10, 53);
        let first = b"\x77\x66\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x07EXAMPLE\x03com\x00\x00\x01\x00\x01\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00";
        let mut second = first.to_vec();
        second[0..2].copy_from_slice(&[0x12, 0x34]);
        second[13..20].copy_from_slice(b"eXaMpLe");
        let q = parse_query(first).unwrap();
        let up = Message::from_vec(&answer(0, &[(300, &[1, 2, 3, 4])], None, true)).unwrap();
        fwd.store(cache_key(&q, false), Arc::new(up), 300);
        let a = fwd.cached_answer(first).unwrap();
        // The first hit wrote the reply and remembered it for this second.
        let key = cache_key(&q, false);
        let hit = fwd.cached(&key).unwrap();
        assert_eq!(hit.rendered.as_deref(), Some(&a[..]));
        let b = fwd.cached_answer(&second).unwrap();
        let (ma, mb) = (
            Message::from_vec(&a).unwrap(),
            Message::from_vec(&b).unwrap(),
        );
        assert_eq!(ma.metadata.id, 0x7766);
        assert_eq!(mb.metadata.id, 0x1234);
        assert_eq!(ma.queries[0].name().to_string(), "EXAMPLE.com.");
        assert_eq!(mb.queries[0].name().to_string(), "eXaMpLe.com.");
        assert_eq!(ma.answers, mb.answers);
        assert_eq!(&a[2..12], &b[2..12]);
        assert_eq!(fwd.stats.cache_hits.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_remembered_reply_is_only_for_its_second() {
        let now = Instant::now();
        let mut c = Cache::new(4);
        let up = Message::from_vec(&answer(0, &[(300, &[1, 2, 3, 4])], None, true)).unwrap();
        c.insert(b"k".to_vec(), Arc::new(up), 300, now);
        c.remember(b"k", 0, Arc::from(&b"reply"[..]));
        assert_eq!(
            c.get(b"k", now).unwrap().rendered.as_deref(),
            Some(&b"reply"[..])
        );
        // A second later the TTLs are one lower: the reply must be written again.
        let later = c.get(b"k", now + Duration::from_millis(1500)).unwrap();
        assert_eq!(later.age, 1);
        assert!(later.rendered.is_none());
    }

    #[test]
    fn cache_key_tells_transport_edns_do_and_cd_apart() {
        let base = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01";
        let q = parse_query(base).unwrap();
        let mut upper = base.to_vec();
        upper[13] = b'A';
        let mut cd = base.to_vec();
        cd[3] |= 0x10;
        let k = cache_key(&q, false);
        assert_eq!(k, cache_key(&parse_query(&upper).unwrap(), false));
        assert_ne!(k, cache_key(&q, true));
        assert_ne!(k, cache_key(&parse_query(&cd).unwrap(), false));
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
