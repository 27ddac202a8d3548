//! Helpers for the services end-to-end tests (tests/tests/services.rs):
//! Pearson's chi-square statistic against a uniform spread, with the
//! critical values the tests use, who answered a round of probes, and the
//! A records `dig` gets for a name.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::probe::Outcome;
use crate::{Netns, Result};

/// The chi-square distribution's critical value for 5 degrees of freedom at
/// p = 0.001 (6 backends): a fair spread exceeds it once in a thousand runs.
pub const CHI2_DF5_P001: f64 = 20.515;

/// Pearson's statistic of `counts` against the uniform distribution over
/// them: Σ (observed − expected)² / expected, expected = total / n. Zero
/// for no counts.
pub fn chi_square_uniform(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if counts.is_empty() || total == 0 {
        return 0.0;
    }
    let expected = total as f64 / counts.len() as f64;
    counts
        .iter()
        .map(|&c| {
            let d = c as f64 - expected;
            d * d / expected
        })
        .sum()
}

/// The tag of a [`crate::probe::ProbeServer`]'s answer line (its first word:
/// `web-3 tcp/80 10.42.1.5` → `web-3`).
pub fn answered_by(outcome: &Outcome) -> Option<&str> {
    match outcome {
        Outcome::Answered(line) => line.split_whitespace().next(),
        _ => None,
    }
}

/// How many of `outcomes` each tag answered, and the outcomes that were no
/// answer at all (for the failure message).
pub fn tally(outcomes: &[Outcome]) -> (BTreeMap<String, u64>, Vec<Outcome>) {
    let mut counts = BTreeMap::new();
    let mut failed = Vec::new();
    for o in outcomes {
        match answered_by(o) {
            Some(tag) => *counts.entry(tag.to_owned()).or_insert(0) += 1,
            None => failed.push(o.clone()),
        }
    }
    (counts, failed)
}

/// The A records `dig @server name` gets from `ns` (one try, 1 s), sorted;
/// empty for NXDOMAIN, no data or no answer.
pub fn dig_a(ns: &Netns, server: &str, name: &str) -> Result<Vec<Ipv4Addr>> {
    let out = ns.output([
        "dig",
        "+short",
        "+time=1",
        "+tries=1",
        "+nocookie",
        &format!("@{server}"),
        name,
        "A",
    ])?;
    let mut addrs: Vec<Ipv4Addr> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    addrs.sort();
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_square_of_a_perfect_and_a_skewed_spread() {
        assert_eq!(chi_square_uniform(&[100; 6]), 0.0);
        assert_eq!(chi_square_uniform(&[]), 0.0);
        assert_eq!(chi_square_uniform(&[0, 0]), 0.0);
        // 600 over 6, expected 100: (20² + 20² + 0 ...) / 100 = 8.
        let s = chi_square_uniform(&[120, 80, 100, 100, 100, 100]);
        assert!((s - 8.0).abs() < 1e-9, "{s}");
        // Everything on one backend is far past the critical value.
        assert!(chi_square_uniform(&[600, 0, 0, 0, 0, 0]) > CHI2_DF5_P001);
    }

    #[test]
    fn tally_counts_tags_and_keeps_failures() {
        let outcomes = [
            Outcome::Answered("web-1 tcp/80 10.42.0.5".into()),
            Outcome::Answered("web-2 tcp/80 10.42.0.5".into()),
            Outcome::Answered("web-1 udp/53 10.42.0.5".into()),
            Outcome::Refused,
        ];
        let (counts, failed) = tally(&outcomes);
        assert_eq!(counts.get("web-1"), Some(&2));
        assert_eq!(counts.get("web-2"), Some(&1));
        assert_eq!(failed, vec![Outcome::Refused]);
    }
}
