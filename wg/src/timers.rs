//! The timer thread (`weft-wg-timer`): boringtun's `update_timers` for a
//! peer only when something can be due, so thousands of peers that never
//! answer cost next to nothing.
//!
//! Every peer with a place in the schedule (a heap of "next due" instants)
//! is ticked when due, and the next instant follows from what can happen
//! ([`next_due`]): traffic since the last tick keeps the peer on the 100 ms
//! tick (keepalives, rekeys after sending and receiving, as before); an
//! idle peer with a session is looked at every second and when its session
//! reaches REJECT_AFTER_TIME; a handshake in flight without a session is
//! looked at only when its retry is due (REKEY_TIMEOUT, 5 s, plus 0-333 ms
//! of jitter, so that thousands of retries do not go out at once); a peer
//! whose handshakes boringtun gave up on (REKEY_ATTEMPT_TIME, 90 s) or
//! whose keys expired leaves the schedule until traffic, a handshake from
//! it or `set_peers` wakes it ([`wake`]). The data path wakes a peer with
//! one flag test per packet under the peer's lock it already holds, and
//! one push to a shared list when the flag flips.
//!
//! A handshake initiation that got no answer within REKEY_TIMEOUT (boringtun
//! retries it) or until boringtun gave up is a *handshake failure*: counted
//! per peer and in total, summarised in one log line a minute at most.
//! boringtun's own per-retry warnings (`HANDSHAKE(REKEY_TIMEOUT)`,
//! `CONNECTION_EXPIRED(...)`) are not emitted: `update_timers` runs with
//! no tracing subscriber.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;
use tracing::Dispatch;

use super::datapath::{Shared, View, TICK};
use super::peer::{add, Peer, PeerState};
use super::table::PeerTable;

/// boringtun's REKEY_TIMEOUT: a handshake initiation is retried after it.
pub(crate) const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// boringtun's REJECT_AFTER_TIME: a session is dropped at this age.
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// How often an idle peer with a session (or neither a session nor a
/// handshake) is looked at: keepalives and rekeys are due in seconds.
pub(crate) const IDLE_STEP: Duration = Duration::from_secs(1);
/// Most jitter added to a handshake retry.
const JITTER_MS: u32 = 333;
/// How often handshake failures are summarised in the log.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);
/// WireGuard message type of a handshake initiation.
const MSG_HANDSHAKE_INIT: u8 = 1;

/// The schedule fields of a peer, under its lock.
#[derive(Debug, Default)]
pub(crate) struct Sched {
    /// Ticked within [`TICK`] (traffic was seen, or it was woken).
    awake: bool,
    /// Traffic since the last tick.
    touched: bool,
    /// When our last handshake initiation went out, until a handshake
    /// completes or boringtun gives up.
    init_sent: Option<Instant>,
    /// Bumped whenever the peer is (re)scheduled: older heap entries are
    /// stale.
    seq: u32,
    /// The summary window in which the peer last failed a handshake.
    failed_window: u32,
    /// Whether a handshake with the peer ever completed.
    answered: bool,
    /// Retries of our initiation that got no answer, while the peer never
    /// answered ([`retry_after`]).
    unanswered: u32,
}

/// Traffic through `peer` (under its lock): keeps it on the fast tick.
#[inline]
pub(crate) fn touch(sh: &Shared, peer: &Arc<Peer>, st: &mut PeerState) {
    st.sched.touched = true;
    // Traffic waits on the handshake: retry at the protocol's pace.
    st.sched.unanswered = 0;
    wake(sh, peer, st);
}

/// Puts `peer` on the fast tick if it is not there already.
#[inline]
pub(crate) fn wake(sh: &Shared, peer: &Arc<Peer>, st: &mut PeerState) {
    if !st.sched.awake {
        st.sched.awake = true;
        sh.wake
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::clone(peer));
    }
}

/// Notes a message boringtun made for the network: an initiation starts
/// (or retries) a handshake.
#[inline]
pub(crate) fn sent(st: &mut PeerState, msg: &[u8]) {
    if msg.first() == Some(&MSG_HANDSHAKE_INIT) {
        st.sched.init_sent = Some(Instant::now());
    }
}

/// A handshake completed (we answered one, or one we started was answered).
#[inline]
pub(crate) fn established(st: &mut PeerState) {
    st.sched.init_sent = None;
    st.sched.answered = true;
    st.sched.unanswered = 0;
}

/// Most doublings of the retry wait for a peer that never answered.
const MAX_BACKOFF_SHIFT: u32 = 4;

/// How long after an unanswered initiation it is retried: REKEY_TIMEOUT,
/// as the protocol says, for a peer that ever answered (a rekey, an outage
/// of a known peer: back within seconds); for one that never did (a host
/// in the records that is not up, or unreachable) the wait doubles with
/// each retry up to 16 times REKEY_TIMEOUT, so thousands of such peers cost
/// six initiations each before boringtun gives up (REKEY_ATTEMPT_TIME is
/// passed at the sixth tick, 155 s), not eighteen in 90 s. A host that comes
/// up later initiates itself (its keepalive), so nothing waits on these
/// retries.
pub(crate) fn retry_after(answered: bool, unanswered: u32) -> Duration {
    if answered {
        REKEY_TIMEOUT
    } else {
        REKEY_TIMEOUT * (1 << unanswered.min(MAX_BACKOFF_SHIFT))
    }
}

/// When a peer is next due, or `None` when nothing can be due until
/// traffic or a handshake wakes it. `session_age`: the current session's
/// age, if there is one; `init_sent`: our unanswered initiation, if any.
pub(crate) fn next_due(
    now: Instant,
    touched: bool,
    expired: bool,
    session_age: Option<Duration>,
    init_sent: Option<Instant>,
    retry_wait: Duration,
    jitter: Duration,
) -> Option<Instant> {
    if expired {
        return None;
    }
    if touched {
        return Some(now + TICK);
    }
    let retry = init_sent.map(|t| t + retry_wait + jitter);
    let due = match session_age {
        Some(age) => {
            let end = now + REJECT_AFTER_TIME.saturating_sub(age);
            retry
                .into_iter()
                .fold((now + IDLE_STEP).min(end), Instant::min)
        }
        None => retry.unwrap_or(now + IDLE_STEP),
    };
    Some(due.max(now + TICK))
}

/// One entry of the schedule.
struct Due {
    at: Instant,
    seq: u32,
    peer: Arc<Peer>,
}

impl PartialEq for Due {
    fn eq(&self, o: &Due) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Due) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Due {
    /// Earliest first in a max-heap.
    fn cmp(&self, o: &Due) -> Ordering {
        o.at.cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

/// The timer thread's state.
pub(crate) struct Timer {
    heap: BinaryHeap<Due>,
    buf: Vec<u8>,
    quiet: Dispatch,
    rng: u32,
    window: u32,
    window_start: Instant,
    failed_peers: usize,
    failures: u64,
}

impl Timer {
    pub(crate) fn new(now: Instant) -> Timer {
        Timer {
            heap: BinaryHeap::new(),
            buf: vec![0u8; 2048],
            quiet: Dispatch::none(),
            rng: weft_sys::random::u32().unwrap_or(0x9e37_79b9) | 1,
            window: 1,
            window_start: now,
            failed_peers: 0,
            failures: 0,
        }
    }

    fn jitter(&mut self) -> Duration {
        // xorshift32: spreads retries, nothing secret.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 17;
        self.rng ^= self.rng << 5;
        Duration::from_millis(u64::from(self.rng % (JITTER_MS + 1)))
    }

    /// Ticks the peers woken since the last run and those due by `now`;
    /// returns how many were ticked.
    pub(crate) fn run(&mut self, sh: &Shared, table: &PeerTable, now: Instant) -> usize {
        let woken = std::mem::take(&mut *sh.wake.lock().unwrap_or_else(|e| e.into_inner()));
        for peer in woken {
            let seq = {
                let mut st = peer.lock();
                st.sched.seq = st.sched.seq.wrapping_add(1);
                st.sched.seq
            };
            self.heap.push(Due { at: now, seq, peer });
        }
        let mut ticked = 0;
        while self.heap.peek().is_some_and(|d| d.at <= now) {
            let Some(Due { seq, peer, .. }) = self.heap.pop() else {
                break;
            };
            // A peer removed from the table leaves the schedule.
            let current = table
                .by_receiver_idx(peer.index << 8)
                .is_some_and(|e| Arc::ptr_eq(&e.peer, &peer));
            if !current {
                continue;
            }
            let jitter = self.jitter();
            let mut st = peer.lock();
            if st.sched.seq != seq {
                continue;
            }
            ticked += 1;
            self.tick(sh, &peer, &mut st);
            let at = next_due(
                now,
                std::mem::take(&mut st.sched.touched),
                st.tunn.is_expired(),
                st.tunn.time_since_last_handshake(),
                st.sched.init_sent,
                retry_after(st.sched.answered, st.sched.unanswered),
                jitter,
            );
            st.sched.awake = at.is_some_and(|at| at <= now + TICK);
            if let Some(at) = at {
                st.sched.seq = st.sched.seq.wrapping_add(1);
                let seq = st.sched.seq;
                drop(st);
                self.heap.push(Due { at, seq, peer });
            }
        }
        if now.duration_since(self.window_start) >= SUMMARY_EVERY {
            if self.failed_peers > 0 {
                tracing::warn!(
                    failures = self.failures,
                    "{} of {} peers did not answer handshakes in the last {} s",
                    self.failed_peers,
                    table.entries().count(),
                    SUMMARY_EVERY.as_secs()
                );
            }
            self.window = self.window.wrapping_add(1).max(1);
            self.window_start = now;
            self.failed_peers = 0;
            self.failures = 0;
        }
        ticked
    }

    /// boringtun's timers for one peer (handshake retries, rekeys,
    /// keepalives), its own log lines muted.
    fn tick(&mut self, sh: &Shared, peer: &Peer, st: &mut PeerState) {
        let was_expired = st.tunn.is_expired();
        let in_flight = st.sched.init_sent.is_some();
        let to = st.endpoint;
        let buf = &mut self.buf;
        let tunn = &mut st.tunn;
        let res = tracing::dispatcher::with_default(&self.quiet, || tunn.update_timers(buf));
        let mut failed = false;
        match res {
            TunnResult::WriteToNetwork(msg) => {
                // An initiation while ours was unanswered: a retry.
                failed = in_flight && msg.first() == Some(&MSG_HANDSHAKE_INIT);
                if msg.first() == Some(&MSG_HANDSHAKE_INIT) {
                    st.sched.init_sent = Some(Instant::now());
                }
                if let Err(e) = sh.udp.send_to(msg, to) {
                    add(&sh.counters.drops_send, 1);
                    tracing::debug!(error = %e, %to, "sending a timer message failed");
                }
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                failed = in_flight && !was_expired;
                st.sched.init_sent = None;
            }
            TunnResult::Err(e) => tracing::debug!(error = ?e, "update_timers"),
            _ => {}
        }
        if failed {
            if !st.sched.answered {
                st.sched.unanswered = st.sched.unanswered.saturating_add(1);
            }
            add(&peer.tx.handshake_failures, 1);
            add(&sh.counters.handshake_failures, 1);
            self.failures += 1;
            if st.sched.failed_window != self.window {
                st.sched.failed_window = self.window;
                self.failed_peers += 1;
            }
        }
    }
}

pub(crate) fn timer_loop(sh: Arc<Shared>) {
    #[cfg(test)]
    // SAFETY: gettid has no preconditions.
    sh.timer_tid.store(
        unsafe { libc::gettid() },
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut timer = Timer::new(Instant::now());
    let mut view = View::new(&sh);
    while !sh.stopping() {
        std::thread::sleep(TICK);
        let keys = sh.keys.current();
        keys.limiter.reset_count();
        keys.peer_limiter.reset_count();
        view.refresh(&sh);
        timer.run(&sh, &view.table, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_to_a_peer_that_never_answered_back_off() {
        assert_eq!(
            retry_after(true, 7),
            REKEY_TIMEOUT,
            "a known peer: the protocol's 5 s"
        );
        let waits: Vec<u64> = (0..7).map(|n| retry_after(false, n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 80, 80]);
        // The sixth tick (5 + 10 + 20 + 40 + 80 = 155 s after the first
        // initiation) is past REKEY_ATTEMPT_TIME: boringtun gives up there.
        assert!(waits[..5].iter().sum::<u64>() > 90);
        let now = Instant::now();
        let sent = now - Duration::from_secs(1);
        assert_eq!(
            next_due(
                now,
                false,
                false,
                None,
                Some(sent),
                retry_after(false, 2),
                Duration::ZERO
            ),
            Some(sent + Duration::from_secs(20))
        );
    }

    #[test]
    fn only_what_can_be_due_is_scheduled() {
        let now = Instant::now();
        let j = Duration::from_millis(200);
        // Gave up (or keys expired): out of the schedule.
        assert_eq!(
            next_due(now, true, true, None, None, REKEY_TIMEOUT, j),
            None
        );
        // Traffic: the 100 ms tick.
        assert_eq!(
            next_due(
                now,
                true,
                false,
                Some(Duration::ZERO),
                None,
                REKEY_TIMEOUT,
                j
            ),
            Some(now + TICK)
        );
        // A handshake in flight with no session: only its retry.
        let sent = now - Duration::from_secs(1);
        assert_eq!(
            next_due(now, false, false, None, Some(sent), REKEY_TIMEOUT, j),
            Some(sent + REKEY_TIMEOUT + j)
        );
        // A retry already late: the next tick.
        let late = now - Duration::from_secs(9);
        assert_eq!(
            next_due(now, false, false, None, Some(late), REKEY_TIMEOUT, j),
            Some(now + TICK)
        );
        // An idle session: every second, and when it ends.
        let idle = Some(Duration::from_secs(30));
        assert_eq!(
            next_due(now, false, false, idle, None, REKEY_TIMEOUT, j),
            Some(now + IDLE_STEP)
        );
        let ending = Some(REJECT_AFTER_TIME - Duration::from_millis(300));
        assert_eq!(
            next_due(now, false, false, ending, None, REKEY_TIMEOUT, j),
            Some(now + Duration::from_millis(300))
        );
        // A rekey in flight with a session: its retry if sooner.
        let soon = now - REKEY_TIMEOUT + Duration::from_millis(100);
        assert_eq!(
            next_due(
                now,
                false,
                false,
                idle,
                Some(soon),
                REKEY_TIMEOUT,
                Duration::ZERO
            ),
            Some(now + Duration::from_millis(100))
        );
        // Neither: every second (a persistent keepalive may start one).
        assert_eq!(
            next_due(now, false, false, None, None, REKEY_TIMEOUT, j),
            Some(now + IDLE_STEP)
        );
    }
}
