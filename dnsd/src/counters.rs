//! Query counters for metrics: queries by type, answers by rcode, and a
//! latency histogram per path. Cheap enough for the UDP fast path: the
//! threads count a batch into local arrays ([`BatchCounts`]) and add them to
//! the shared atomics once per batch; latency is read once per batch.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::wire::{get_u16, skip_name, HEADER_LEN};

/// The query types counted by name; everything else is `OTHER`.
pub const QTYPES: [(u16, &str); 11] = [
    (1, "A"),
    (28, "AAAA"),
    (12, "PTR"),
    (33, "SRV"),
    (16, "TXT"),
    (15, "MX"),
    (5, "CNAME"),
    (2, "NS"),
    (6, "SOA"),
    (255, "ANY"),
    (65, "HTTPS"),
];
/// Slots of [`QueryCounters::by_type`]: the named types, then other.
pub const QTYPE_SLOTS: usize = QTYPES.len() + 1;
/// Rcode names (the 4-bit header rcode).
pub const RCODES: [&str; 16] = [
    "NOERROR",
    "FORMERR",
    "SERVFAIL",
    "NXDOMAIN",
    "NOTIMP",
    "REFUSED",
    "YXDOMAIN",
    "YXRRSET",
    "NXRRSET",
    "NOTAUTH",
    "NOTZONE",
    "DSOTYPENI",
    "RCODE12",
    "RCODE13",
    "RCODE14",
    "RCODE15",
];
/// Upper bounds (seconds) of the latency histogram's buckets (+Inf after).
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// The name of a type slot.
pub fn qtype_name(slot: usize) -> &'static str {
    QTYPES.get(slot).map_or("OTHER", |(_, n)| n)
}

/// The slot of a query type.
pub fn qtype_slot(qtype: u16) -> usize {
    QTYPES
        .iter()
        .position(|(t, _)| *t == qtype)
        .unwrap_or(QTYPES.len())
}

/// The question type of a query packet, if it has a question.
pub fn peek_qtype(packet: &[u8]) -> Option<u16> {
    if get_u16(packet, 4)? == 0 {
        return None;
    }
    let end = skip_name(packet, HEADER_LEN)?;
    get_u16(packet, end)
}

/// The rcode of an answer packet.
pub fn peek_rcode(answer: &[u8]) -> Option<usize> {
    answer.get(3).map(|b| (b & 0x0F) as usize)
}

/// Where an answer came from, for the latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// From the table (the cluster's names, rejects, refusals).
    Local = 0,
    /// From the forwarding cache.
    Cache = 1,
    /// From an upstream resolver (or SERVFAIL after all failed).
    Forward = 2,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::Local, Path::Cache, Path::Forward];

    pub fn as_str(self) -> &'static str {
        match self {
            Path::Local => "local",
            Path::Cache => "cache",
            Path::Forward => "forward",
        }
    }
}

/// A fixed-bucket histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// A histogram read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations in this bucket only), ending
    /// with `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_secs: f64,
}

impl Histogram {
    /// Records `n` observations of `d`.
    pub fn observe_n(&self, d: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let secs = d.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(n, Relaxed);
        self.count.fetch_add(n, Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos.saturating_mul(n), Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets = LATENCY_BUCKETS
            .iter()
            .chain(std::iter::once(&f64::INFINITY))
            .zip(&self.buckets)
            .map(|(b, c)| (*b, c.load(Relaxed)))
            .collect();
        HistogramSnapshot {
            buckets,
            count: self.count.load(Relaxed),
            sum_secs: self.sum_nanos.load(Relaxed) as f64 / 1e9,
        }
    }
}

/// Queries by type, answers by rcode, latency by path.
#[derive(Debug, Default)]
pub struct QueryCounters {
    /// Queries with a question, by type slot ([`qtype_name`]).
    pub by_type: [AtomicU64; QTYPE_SLOTS],
    /// Answers sent, by rcode.
    pub by_rcode: [AtomicU64; 16],
    /// Time from receiving a query to sending its answer, by [`Path`].
    pub latency: [Histogram; 3],
}

impl QueryCounters {
    /// Counts one query with its answer (`None`: no answer sent yet, or
    /// none at all).
    pub fn count(&self, query: &[u8], answer: Option<&[u8]>) {
        if let Some(t) = peek_qtype(query) {
            self.by_type[qtype_slot(t)].fetch_add(1, Relaxed);
        }
        if let Some(r) = answer.and_then(peek_rcode) {
            self.by_rcode[r].fetch_add(1, Relaxed);
        }
    }

    /// Counts one answer sent later (forwarded queries).
    pub fn count_answer(&self, answer: &[u8], path: Path, took: Duration) {
        if let Some(r) = peek_rcode(answer) {
            self.by_rcode[r].fetch_add(1, Relaxed);
        }
        self.latency[path as usize].observe_n(took, 1);
    }

    pub fn latency(&self, path: Path) -> &Histogram {
        &self.latency[path as usize]
    }
}

/// One UDP batch's counts, added to the shared counters at its end.
#[derive(Debug, Default)]
pub(crate) struct BatchCounts {
    by_type: [u32; QTYPE_SLOTS],
    by_rcode: [u32; 16],
}

impl BatchCounts {
    pub fn query(&mut self, query: &[u8]) {
        if let Some(t) = peek_qtype(query) {
            self.by_type[qtype_slot(t)] += 1;
        }
    }

    pub fn answer(&mut self, answer: &[u8]) {
        if let Some(r) = peek_rcode(answer) {
            self.by_rcode[r] += 1;
        }
    }

    /// Adds the counts to `to` and zeroes them.
    pub fn flush(&mut self, to: &QueryCounters) {
        for (c, n) in to.by_type.iter().zip(self.by_type.iter_mut()) {
            if *n > 0 {
                c.fetch_add(u64::from(*n), Relaxed);
                *n = 0;
            }
        }
        for (c, n) in to.by_rcode.iter().zip(self.by_rcode.iter_mut()) {
            if *n > 0 {
                c.fetch_add(u64::from(*n), Relaxed);
                *n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qtype_and_rcode_from_packets() {
        // id, flags RD, 1 question: www.example.com AAAA IN
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in ["www", "example", "com"] {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 28, 0, 1]);
        assert_eq!(peek_qtype(&q), Some(28));
        assert_eq!(qtype_name(qtype_slot(28)), "AAAA");
        assert_eq!(qtype_name(qtype_slot(99)), "OTHER");
        assert_eq!(peek_qtype(&q[..14]), None);
        let mut a = q.clone();
        a[2] |= 0x80;
        a[3] = 0x83;
        assert_eq!(peek_rcode(&a), Some(3));
        let c = QueryCounters::default();
        let mut b = BatchCounts::default();
        b.query(&q);
        b.answer(&a);
        b.flush(&c);
        b.flush(&c);
        assert_eq!(c.by_type[1].load(Relaxed), 1);
        assert_eq!(c.by_rcode[3].load(Relaxed), 1);
    }

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe_n(Duration::from_micros(10), 3);
        h.observe_n(Duration::from_millis(3), 1);
        h.observe_n(Duration::from_secs(10), 1);
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.buckets[0], (0.000_05, 3));
        assert_eq!(s.buckets[6], (0.005, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 5);
        assert!((s.sum_secs - 10.003_03).abs() < 1e-6, "{}", s.sum_secs);
    }
}
