//! The DNS clients: one thread per probe container, its UDP socket made
//! in the container's namespace, asking weft's DNS address
//! ([`weft_model::DNS_ADDR`]) at a steady rate, pipelined (queries go out
//! on schedule whatever is outstanding; answers are matched by id and
//! question name; a query unanswered after [`TIMEOUT_MS`] is a timeout).
//!
//! Every answer becomes a [`DnsSample`] judged by
//! [`invariants::judge_dns`] against the lives recorded by then. The judge
//! waits [`JUDGE_DELAY_MS`] after the answer: a `tasks.` answer may hold a
//! container whose ADD is still in flight (its life is recorded when the
//! ADD answers), and the judge must know it. The clients share one
//! snapshot of the lives ([`LivesCache`]), taken every [`SNAPSHOT_MS`]
//! and holding only the live ones and those deleted within [`KEEP_MS`]
//! (an old address in an answer is wrong either way), so a long run does
//! not copy thousands of lives ten times a second.
//!
//! Counts go to the recorder per second of the query's sending
//! ([`DnsSecond`]), wrong and failed samples in full (up to
//! [`DNS_KEPT_MAX`]), both once per [`FLUSH_MS`] per client.
//!
//! The wire format is hickory-proto's (dnsd's dependency already): the
//! answer's decoding (name compression, rcodes) is the part worth not
//! writing again.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::names::Pool;
use super::{poll_in, Ctx};
use crate::soak::invariants;
use crate::soak::rng::Rng;
use crate::soak::timeline::{
    DnsAnswer, DnsQuery, DnsSample, DnsSecond, Life, Ms, Recorder, Timeline, DNS_KEPT_MAX,
};

/// A query unanswered this long is a timeout.
pub const TIMEOUT_MS: Ms = 1_000;
/// An answer is judged this long after it came (see the module docs).
pub const JUDGE_DELAY_MS: Ms = 2_000;
/// How often the shared snapshot of the lives is taken again.
pub const SNAPSHOT_MS: Ms = 75;
/// Deleted containers stay in the snapshot this long after their DEL.
pub const KEEP_MS: Ms = 30_000;
/// How often a client adds its counts to the recorder.
pub const FLUSH_MS: Ms = 100;
/// How long a client sleeps at most between two looks at its socket.
const TICK_MS: Ms = 10;

/// One snapshot of the lives for every client, taken again when older
/// than [`SNAPSHOT_MS`].
#[derive(Default)]
pub struct LivesCache {
    inner: Mutex<Option<(Ms, Arc<Vec<Life>>)>>,
}

impl LivesCache {
    /// The snapshot and when it was taken (a fresh one if the last is old).
    pub fn get(&self, rec: &Recorder) -> (Ms, Arc<Vec<Life>>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = rec.now_ms();
        if let Some((at, lives)) = &*g {
            if now < at + SNAPSHOT_MS {
                return (*at, lives.clone());
            }
        }
        let lives: Vec<Life> = rec.with(|t| {
            t.lives
                .iter()
                .filter(|l| l.deleted_ms.is_none_or(|d| d + KEEP_MS >= now))
                .cloned()
                .collect()
        });
        let fresh = (now, Arc::new(lives));
        *g = Some(fresh.clone());
        fresh
    }
}

/// A query as sent: `id`, question `name` (for the wire).
pub fn encode(id: u16, name: &str) -> Option<Vec<u8>> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::A));
    m.to_vec().ok()
}

/// An answer: its id, its question's name (lowercase, no trailing dot) and
/// what it says; `None` if it is not a DNS response.
pub fn decode(packet: &[u8]) -> Option<(u16, String, DnsAnswer)> {
    let m = Message::from_vec(packet).ok()?;
    if m.metadata.message_type != MessageType::Response {
        return None;
    }
    let name = m.queries.first()?.name().to_ascii();
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let answer = match m.metadata.response_code {
        ResponseCode::NoError => DnsAnswer::Addrs(
            m.answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect(),
        ),
        ResponseCode::NXDomain => DnsAnswer::NxDomain,
        rc => DnsAnswer::Error(u16::from(rc) as u8),
    };
    Some((m.metadata.id, name, answer))
}

/// A client's counts and kept samples since its last flush.
#[derive(Debug, Default)]
pub struct Tally {
    seconds: BTreeMap<u64, DnsSecond>,
    kept: Vec<DnsSample>,
}

impl Tally {
    fn second(&mut self, sent_ms: Ms) -> &mut DnsSecond {
        let t_s = sent_ms / 1000;
        self.seconds.entry(t_s).or_insert(DnsSecond {
            t_s,
            ..DnsSecond::default()
        })
    }

    /// A query went out.
    pub fn sent(&mut self, sent_ms: Ms) {
        self.second(sent_ms).sent += 1;
    }

    /// A query's outcome: failed (no answer, an error rcode), else right or
    /// wrong as `judge` says (why it is wrong, if it is).
    pub fn outcome(&mut self, s: DnsSample, judge: impl FnOnce(&DnsSample) -> Option<String>) {
        let failed = matches!(s.answer, DnsAnswer::Timeout | DnsAnswer::Error(_));
        let wrong = !failed && judge(&s).is_some();
        let sec = self.second(s.sent_ms);
        if failed {
            sec.failed += 1;
        } else if wrong {
            sec.wrong += 1;
        } else {
            sec.right += 1;
            return;
        }
        self.kept.push(s);
    }

    /// Adds everything to `t` (counts merged per second, samples kept up to
    /// [`DNS_KEPT_MAX`]) and starts again.
    pub fn merge_into(&mut self, t: &mut Timeline) {
        for (t_s, d) in std::mem::take(&mut self.seconds) {
            match t.dns_seconds.binary_search_by_key(&t_s, |s| s.t_s) {
                Ok(i) => {
                    let s = &mut t.dns_seconds[i];
                    s.sent += d.sent;
                    s.right += d.right;
                    s.wrong += d.wrong;
                    s.failed += d.failed;
                }
                Err(i) => t.dns_seconds.insert(i, d),
            }
        }
        let room = DNS_KEPT_MAX.saturating_sub(t.dns_kept.len());
        t.dns_kept
            .extend(std::mem::take(&mut self.kept).into_iter().take(room));
    }

    fn is_empty(&self) -> bool {
        self.seconds.is_empty() && self.kept.is_empty()
    }
}

/// What a client asks and how often.
pub struct ClientSpec<'a> {
    /// The probe's namespace and host.
    pub netns: &'a Path,
    pub host: usize,
    /// Queries per second from this client.
    pub per_s: f64,
    /// The seed and stream of its name choices.
    pub seed: u64,
    pub stream: u64,
    /// The cluster's DNS domain.
    pub domain: &'a str,
}

struct Pending {
    name: String,
    query: DnsQuery,
    sent_ms: Ms,
}

/// Runs one client until the run stops, then waits for (or times out) the
/// queries in flight and judges everything.
pub fn client(ctx: &Ctx, spec: &ClientSpec, lives: &LivesCache) -> Result<()> {
    weft_tests::in_netns(spec.netns, || client_in_netns(ctx, spec, lives))
        .with_context(|| format!("DNS client in {}", spec.netns.display()))
}

fn client_in_netns(ctx: &Ctx, spec: &ClientSpec, lives: &LivesCache) -> Result<()> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("binding")?;
    sock.connect((weft_model::DNS_ADDR, 53))
        .context("connecting")?;
    sock.set_nonblocking(true)?;
    let mut rng = Rng::new(spec.seed, spec.stream);
    let interval = 1000.0 / spec.per_s.max(0.001);
    let mut pending: HashMap<u16, Pending> = HashMap::new();
    let mut order: VecDeque<(u16, Ms)> = VecDeque::new();
    let mut to_judge: VecDeque<DnsSample> = VecDeque::new();
    let mut tally = Tally::default();
    let mut next_id: u16 = rng.next_u64() as u16;
    let (mut snap_at, snap) = lives.get(ctx.rec);
    let mut pool = Pool::new(snap, snap_at);
    let mut next_at = ctx.now() as f64;
    let mut last_flush = ctx.now();
    let mut stopping = false;
    let mut buf = [0u8; 4096];
    loop {
        let now = ctx.now();
        stopping |= ctx.stopped();
        // Send what is due (a client late by more than a timeout skips
        // ahead instead of bursting).
        if !stopping {
            if next_at + (TIMEOUT_MS as f64) < now as f64 {
                next_at = now as f64;
            }
            while next_at <= now as f64 {
                next_at += interval;
                let (name, query) = pool.choose(&mut rng, spec.domain);
                while pending.contains_key(&next_id) {
                    next_id = next_id.wrapping_add(1);
                }
                let id = next_id;
                next_id = next_id.wrapping_add(1);
                let Some(wire) = encode(id, &name) else {
                    anyhow::bail!("cannot encode a query for {name:?}");
                };
                tally.sent(now);
                // A connected socket reports an earlier ICMP error on the
                // next send: send again once then.
                if sock.send(&wire).is_err() && sock.send(&wire).is_err() {
                    let s = sample(spec.host, name, query, now, now, DnsAnswer::Timeout);
                    tally.outcome(s, |_| None);
                    continue;
                }
                order.push_back((id, now));
                pending.insert(
                    id,
                    Pending {
                        name,
                        query,
                        sent_ms: now,
                    },
                );
            }
        }
        // Read every answer there is.
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => {
                    let at = ctx.now();
                    let Some((id, name, answer)) = decode(&buf[..n]) else {
                        continue;
                    };
                    if pending.get(&id).is_some_and(|p| p.name == name) {
                        if let Some(p) = pending.remove(&id) {
                            to_judge.push_back(sample(
                                spec.host, p.name, p.query, p.sent_ms, at, answer,
                            ));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // ECONNREFUSED and the like (an ICMP error): the queries
                // concerned time out.
                Err(_) => break,
            }
        }
        // Timeouts, oldest first.
        let now = ctx.now();
        while let Some(&(id, sent)) = order.front() {
            if !pending.contains_key(&id) {
                order.pop_front();
                continue;
            }
            if sent + TIMEOUT_MS > now {
                break;
            }
            order.pop_front();
            if let Some(p) = pending.remove(&id) {
                let s = sample(
                    spec.host,
                    p.name,
                    p.query,
                    p.sent_ms,
                    now,
                    DnsAnswer::Timeout,
                );
                tally.outcome(s, |_| None);
            }
        }
        // A fresh snapshot: a new pool, and the answers old enough judged.
        let (at, snap) = lives.get(ctx.rec);
        if at != snap_at {
            snap_at = at;
            pool = Pool::new(snap, at);
        }
        let done = stopping && pending.is_empty();
        while to_judge
            .front()
            .is_some_and(|s| done || s.answered_ms + JUDGE_DELAY_MS <= snap_at)
        {
            if let Some(s) = to_judge.pop_front() {
                tally.outcome(s, |s| invariants::judge_dns(s, pool.lives()));
            }
        }
        if done || now >= last_flush + FLUSH_MS {
            last_flush = now;
            if !tally.is_empty() {
                ctx.rec.with(|t| tally.merge_into(t));
            }
        }
        if done {
            return Ok(());
        }
        let wait = if stopping {
            TICK_MS
        } else {
            ((next_at - ctx.now() as f64).ceil().max(1.0) as Ms).min(TICK_MS)
        };
        poll_in(sock.as_raw_fd(), wait).context("waiting for answers")?;
    }
}

fn sample(
    host: usize,
    name: String,
    query: DnsQuery,
    sent_ms: Ms,
    answered_ms: Ms,
    answer: DnsAnswer,
) -> DnsSample {
    DnsSample {
        host,
        name,
        query,
        sent_ms,
        answered_ms,
        answer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_and_its_answer_round_trip_through_the_wire() {
        let q = encode(0x1234, "n-c1.stack-a.weft.internal").unwrap();
        assert_eq!(&q[..2], &[0x12, 0x34]);
        // Made into an answer the way dnsd does: the same message, QR set,
        // one A record.
        let mut m = Message::from_vec(&q).unwrap();
        m.metadata.message_type = MessageType::Response;
        let name = m.queries[0].name().clone();
        m.answers.push(hickory_proto::rr::Record::from_rdata(
            name,
            30,
            RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(10, 42, 0, 7))),
        ));
        let (id, n, a) = decode(&m.to_vec().unwrap()).unwrap();
        assert_eq!((id, n.as_str()), (0x1234, "n-c1.stack-a.weft.internal"));
        assert_eq!(a, DnsAnswer::Addrs(vec![Ipv4Addr::new(10, 42, 0, 7)]));
        m.answers.clear();
        m.metadata.response_code = ResponseCode::NXDomain;
        assert_eq!(decode(&m.to_vec().unwrap()).unwrap().2, DnsAnswer::NxDomain);
        m.metadata.response_code = ResponseCode::ServFail;
        assert_eq!(decode(&m.to_vec().unwrap()).unwrap().2, DnsAnswer::Error(2));
        // A query is not an answer; garbage is nothing.
        assert_eq!(decode(&q), None);
        assert_eq!(decode(&[1, 2, 3]), None);
    }

    fn s(sent_ms: Ms, answer: DnsAnswer) -> DnsSample {
        sample(
            0,
            "x".into(),
            DnsQuery::Absent,
            sent_ms,
            sent_ms + 1,
            answer,
        )
    }

    #[test]
    fn the_tally_counts_per_second_and_keeps_only_the_bad() {
        let mut t = Timeline::default();
        let mut a = Tally::default();
        a.sent(1_100);
        a.sent(1_900);
        a.sent(3_000);
        a.outcome(s(1_100, DnsAnswer::NxDomain), |_| None);
        a.outcome(s(1_900, DnsAnswer::NxDomain), |_| Some("stale".into()));
        a.outcome(s(3_000, DnsAnswer::Timeout), |_| {
            panic!("failed ones are not judged")
        });
        a.merge_into(&mut t);
        assert!(a.is_empty());
        // Another client's second 2 (between) and 3 (merged).
        let mut b = Tally::default();
        b.sent(2_500);
        b.sent(3_400);
        b.outcome(s(2_500, DnsAnswer::Error(2)), |_| None);
        b.outcome(s(3_400, DnsAnswer::Addrs(vec![])), |_| None);
        b.merge_into(&mut t);
        let secs: Vec<(u64, u64, u64, u64, u64)> = t
            .dns_seconds
            .iter()
            .map(|d| (d.t_s, d.sent, d.right, d.wrong, d.failed))
            .collect();
        assert_eq!(
            secs,
            vec![(1, 2, 1, 1, 0), (2, 1, 0, 0, 1), (3, 2, 1, 0, 1)]
        );
        let kept: Vec<Ms> = t.dns_kept.iter().map(|s| s.sent_ms).collect();
        assert_eq!(kept, vec![1_900, 3_000, 2_500]);
    }

    #[test]
    fn kept_samples_stop_at_the_limit() {
        let mut t = Timeline::default();
        let mut a = Tally::default();
        for i in 0..(DNS_KEPT_MAX as Ms + 5) {
            a.sent(i);
            a.outcome(s(i, DnsAnswer::Timeout), |_| None);
        }
        a.merge_into(&mut t);
        assert_eq!(t.dns_kept.len(), DNS_KEPT_MAX);
        let failed: u64 = t.dns_seconds.iter().map(|d| d.failed).sum();
        assert_eq!(failed, DNS_KEPT_MAX as u64 + 5);
    }
}
