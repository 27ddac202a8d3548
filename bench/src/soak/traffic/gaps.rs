//! When a flow had no answer: the pure rule every probe flow (ping, UDP,
//! TCP) feeds with the times of its good answers (an echo reply, a UDP
//! answer, echoed stream bytes) and that says which gaps to record.
//!
//! A gap runs from the last good answer before it to the first good one
//! after it, and counts when it is at least [`MIN_GAP_MS`] long (the flows
//! send every 10 ms, so a gap's ends are that precise). Before the first
//! good answer the flow may take [`STARTUP_GRACE_MS`] (the first ARP,
//! WireGuard handshake and TCP connect); a later first answer is a gap from
//! the flow's start. A gap still open when the run ends has no end.

use crate::soak::timeline::Ms;

/// The shortest silence recorded as a gap.
pub const MIN_GAP_MS: Ms = 50;

/// How long a flow may take to get its first answer.
pub const STARTUP_GRACE_MS: Ms = 2_000;

/// One flow's silence so far.
#[derive(Debug, Clone)]
pub struct GapTracker {
    started_ms: Ms,
    last_good_ms: Option<Ms>,
}

impl GapTracker {
    /// A flow that started at `started_ms`.
    pub fn new(started_ms: Ms) -> GapTracker {
        GapTracker {
            started_ms,
            last_good_ms: None,
        }
    }

    /// A good answer at `t_ms`: the gap it ends (start, end), if any.
    pub fn good(&mut self, t_ms: Ms) -> Option<(Ms, Ms)> {
        let gap = match self.last_good_ms {
            None => (t_ms >= self.started_ms + STARTUP_GRACE_MS).then_some((self.started_ms, t_ms)),
            Some(last) => (t_ms >= last + MIN_GAP_MS).then_some((last, t_ms)),
        };
        self.last_good_ms = Some(self.last_good_ms.map_or(t_ms, |l| l.max(t_ms)));
        gap
    }

    /// Since when the flow has been silent: its last good answer, or its
    /// start if none came yet.
    pub fn silent_since(&self) -> Ms {
        self.last_good_ms.unwrap_or(self.started_ms)
    }

    /// The run ended at `end_ms`: the gap still open then, if any (it has
    /// no end).
    pub fn finish(&self, end_ms: Ms) -> Option<Ms> {
        match self.last_good_ms {
            None => (end_ms >= self.started_ms + STARTUP_GRACE_MS).then_some(self.started_ms),
            Some(last) => (end_ms >= last + MIN_GAP_MS).then_some(last),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every 10 ms from `from` to `to` (exclusive).
    fn steady(g: &mut GapTracker, from: Ms, to: Ms) -> Vec<(Ms, Ms)> {
        (from..to).step_by(10).filter_map(|t| g.good(t)).collect()
    }

    #[test]
    fn steady_answers_have_no_gap() {
        let mut g = GapTracker::new(1_000);
        assert_eq!(steady(&mut g, 1_005, 5_000), vec![]);
        assert_eq!(g.finish(5_000), None);
    }

    #[test]
    fn a_silence_of_fifty_ms_or_more_is_one_gap_from_last_good_to_next_good() {
        let mut g = GapTracker::new(0);
        assert_eq!(steady(&mut g, 0, 1_000), vec![]);
        // Last good at 990; 40 ms silence is not a gap.
        assert_eq!(g.good(1_030), None);
        // 1_030 -> 1_080: exactly the minimum.
        assert_eq!(g.good(1_080), Some((1_030, 1_080)));
        // A 210 ms outage, then steady again.
        assert_eq!(g.good(1_290), Some((1_080, 1_290)));
        assert_eq!(steady(&mut g, 1_300, 2_000), vec![]);
        assert_eq!(g.finish(2_000), None);
    }

    #[test]
    fn a_late_answer_does_not_move_the_last_good_back() {
        let mut g = GapTracker::new(0);
        assert_eq!(g.good(500), None);
        // A reply to an old request measured out of order.
        assert_eq!(g.good(480), None);
        assert_eq!(g.good(560), Some((500, 560)));
    }

    #[test]
    fn a_silence_at_the_end_is_an_open_gap() {
        let mut g = GapTracker::new(0);
        steady(&mut g, 0, 3_000);
        assert_eq!(g.silent_since(), 2_990);
        assert_eq!(g.finish(3_030), None);
        assert_eq!(g.finish(3_500), Some(2_990));
    }

    #[test]
    fn the_start_has_a_grace_then_counts_from_the_start() {
        // First answer within the grace: no gap.
        let mut g = GapTracker::new(100);
        assert_eq!(g.good(100 + STARTUP_GRACE_MS - 1), None);
        // First answer after it: a gap from the flow's start.
        let mut g = GapTracker::new(100);
        assert_eq!(
            g.good(100 + STARTUP_GRACE_MS + 400),
            Some((100, 100 + STARTUP_GRACE_MS + 400))
        );
        // Never answered: open from the start, unless the run was shorter
        // than the grace.
        let g = GapTracker::new(100);
        assert_eq!(g.silent_since(), 100);
        assert_eq!(g.finish(100 + STARTUP_GRACE_MS), Some(100));
        assert_eq!(g.finish(600), None);
    }
}
