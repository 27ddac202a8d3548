//! A budget per source address for handshake initiations that would reach
//! the Diffie-Hellman.
//!
//! boringtun's `RateLimiter` counts initiations device-wide and, over its
//! limit, answers those without a valid mac2 with a cookie reply. An
//! initiation whose mac2 is valid passes at any rate, though: a sender that
//! receives at its own address gets a cookie (good for two minutes) and can
//! then make the responder do one DH per datagram. Measured in
//! `wg/tests/flood.rs` before this budget: one such source at 50,000/s made
//! the responder spend its receive thread on about 18,000 DH/s, and the
//! socket dropped most datagrams, real peers' data included. Like the
//! kernel's WireGuard (`ratelimiter.c`): a token bucket per source address,
//! [`PER_SECOND`] initiations a second with bursts of [`BURST`], checked
//! after mac1 and the cookie, before the DH. A real peer sends one
//! initiation per handshake attempt (retries 5 s apart), far below it.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Initiations per second and source that may reach the DH.
pub(crate) const PER_SECOND: u64 = 20;
/// How many may come at once.
pub(crate) const BURST: u64 = 5;
/// Sources tracked at most; when full, idle ones (full buckets) are
/// forgotten, and while none is idle new sources are refused.
pub(crate) const MAX_SOURCES: usize = 4096;

const COST: Duration = Duration::from_nanos(1_000_000_000 / PER_SECOND);
const FULL: Duration = Duration::from_nanos(COST.as_nanos() as u64 * BURST);

#[derive(Clone, Copy)]
struct Bucket {
    /// Credit, in time: one initiation costs [`COST`].
    tokens: Duration,
    last: Instant,
}

/// The buckets, behind a mutex (handshake initiations only take it).
#[derive(Default)]
pub(crate) struct SourceBudget {
    buckets: Mutex<HashMap<Ipv4Addr, Bucket>>,
}

impl SourceBudget {
    /// Whether an initiation from `source` may go on to the DH now (and
    /// takes its token).
    pub(crate) fn allow(&self, source: Ipv4Addr) -> bool {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        allow_at(&mut b, source, Instant::now())
    }
}

fn allow_at(buckets: &mut HashMap<Ipv4Addr, Bucket>, source: Ipv4Addr, now: Instant) -> bool {
    if !buckets.contains_key(&source) && buckets.len() >= MAX_SOURCES {
        // A bucket idle long enough to be full again is as good as none.
        buckets.retain(|_, b| now.saturating_duration_since(b.last) < FULL);
        if buckets.len() >= MAX_SOURCES {
            return false;
        }
    }
    let b = buckets.entry(source).or_insert(Bucket {
        tokens: FULL,
        last: now,
    });
    b.tokens = (b.tokens + now.saturating_duration_since(b.last)).min(FULL);
    b.last = now;
    if b.tokens >= COST {
        b.tokens -= COST;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> Ipv4Addr {
        Ipv4Addr::from(0x0a00_0000 + n)
    }

    #[test]
    fn a_burst_then_the_rate() {
        let mut b = HashMap::new();
        let t0 = Instant::now();
        let first: Vec<bool> = (0..BURST + 3)
            .map(|_| allow_at(&mut b, ip(1), t0))
            .collect();
        assert_eq!(first.iter().filter(|&&x| x).count() as u64, BURST);
        // Another source has its own budget.
        assert!(allow_at(&mut b, ip(2), t0));
        // Over 10 s at 1000/s: about PER_SECOND per second get through.
        let passed = (1..=10_000)
            .filter(|i| allow_at(&mut b, ip(1), t0 + Duration::from_millis(*i)))
            .count() as u64;
        assert!(
            (10 * PER_SECOND - 1..=10 * PER_SECOND + 1).contains(&passed),
            "{passed}"
        );
    }

    #[test]
    fn a_real_peer_is_never_refused() {
        // One initiation per REKEY_TIMEOUT (5 s), even right after a burst.
        let mut b = HashMap::new();
        let t0 = Instant::now();
        for i in 0..20 {
            assert!(allow_at(&mut b, ip(1), t0 + Duration::from_secs(5 * i)));
        }
    }

    #[test]
    fn the_table_is_bounded_and_forgets_idle_sources() {
        let mut b = HashMap::new();
        let t0 = Instant::now();
        for n in 0..MAX_SOURCES as u32 {
            assert!(allow_at(&mut b, ip(n), t0));
        }
        // Full of active sources: a new one is refused, known ones go on.
        assert!(!allow_at(&mut b, ip(1_000_000), t0));
        assert!(allow_at(&mut b, ip(3), t0));
        assert_eq!(b.len(), MAX_SOURCES);
        // Once they are idle, room again.
        assert!(allow_at(&mut b, ip(1_000_000), t0 + FULL));
        assert_eq!(b.len(), 1);
    }
}
