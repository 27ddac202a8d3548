//! Noticing within seconds that another program removed weft's firewall
//! state (`iptables -F`/`-X` of weft's chains, a firewall reload that
//! restores the tables without them, `nft flush ruleset`), so the daemon
//! restores it right away instead of at the next 30 s resync.
//!
//! Every [`CHECK_EVERY`] the daemon runs [`check`]: one `iptables-save`
//! compared with the rules weft applied last ([`crate::nat::verify`]:
//! weft's chains, their rule counts, the hooks) and one `nft -j list tables`
//! compared with the tables weft applied ([`Nft::missing_tables`], which also
//! makes the next apply write a lost table whole). Both only read, and only
//! weft's own state counts: another tool's rules, in its chains or in the
//! built-in ones, are left alone. [`Watch`] turns the checks into incidents:
//! one log line and one count (`weft_firewall_restores_total{what}`) when
//! something goes missing, none while it stays missing (a restore that
//! failed is retried silently at each check), a new one once it was whole
//! again (a check found it so, or the restore succeeded). The restore itself is the daemon's
//! (`daemon/firewall.rs`): the NAT reconcile and the nf_tables re-applies.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use crate::nat::{Iptables, Missing, NatError};
use crate::nft::{Nft, NftError};

/// How often the daemon checks. A check costs one `iptables-save` and one
/// `nft -j list tables` (a few ms of CPU); a fault heals within this plus
/// the restore.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The label of weft's iptables rules in logs and metrics.
pub const IPTABLES: &str = "iptables";
/// The label of weft's nf_tables tables.
pub const NFTABLES: &str = "nftables";

/// The most items [`Findings::describe`] names (the rest are counted).
const NAMED: usize = 8;

/// What one check found, per kind: what is missing, or why the check of
/// that kind failed.
#[derive(Debug)]
pub struct Check {
    pub iptables: Result<Vec<Missing>, NatError>,
    /// (family, name) of each lost table.
    pub nftables: Result<Vec<(&'static str, &'static str)>, NftError>,
}

/// Checks weft's iptables rules and nf_tables tables against what `nat` and
/// `nft` applied last. Blocking (runs two programs).
pub fn check(nat: &Iptables, nft: &Nft) -> Check {
    Check {
        iptables: nat.verify(),
        nftables: nft.missing_tables(),
    }
}

impl Check {
    /// Whether weft's iptables rules need restoring.
    pub fn iptables_lost(&self) -> bool {
        self.iptables.as_ref().is_ok_and(|m| !m.is_empty())
    }

    /// The nf_tables tables to restore.
    pub fn tables_lost(&self) -> &[(&'static str, &'static str)] {
        self.nftables.as_deref().unwrap_or_default()
    }

    /// The kinds with something missing.
    fn lost(&self) -> BTreeSet<&'static str> {
        let mut out = BTreeSet::new();
        if self.iptables_lost() {
            out.insert(IPTABLES);
        }
        if !self.tables_lost().is_empty() {
            out.insert(NFTABLES);
        }
        out
    }

    /// The kinds whose check failed, with the error.
    fn failed(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Err(e) = &self.iptables {
            out.push((IPTABLES, e.to_string()));
        }
        if let Err(e) = &self.nftables {
            out.push((NFTABLES, e.to_string()));
        }
        out
    }

    /// What is missing, for one log line: e.g. `iptables: nat chain
    /// WEFT-DNAT, nat hook PREROUTING -> WEFT-PREROUTING; nftables: table
    /// inet weft`, at most a few items per kind named.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Ok(m) = &self.iptables {
            if !m.is_empty() {
                parts.push(format!("{IPTABLES}: {}", named(m.iter())));
            }
        }
        let tables = self.tables_lost();
        if !tables.is_empty() {
            let t = tables.iter().map(|(f, n)| format!("table {f} {n}"));
            parts.push(format!("{NFTABLES}: {}", named(t)));
        }
        parts.join("; ")
    }
}

fn named<T: std::fmt::Display>(items: impl ExactSizeIterator<Item = T>) -> String {
    let n = items.len();
    let mut out = String::new();
    for (i, item) in items.take(NAMED).enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{item}");
    }
    if n > NAMED {
        let _ = write!(out, " and {} more", n - NAMED);
    }
    out
}

/// What the daemon should say about one check ([`Watch::observe`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Kinds whose state just went missing: log once, count once.
    pub new_incidents: Vec<&'static str>,
    /// Kinds whose state was restored since the last check.
    pub healed: Vec<&'static str>,
    /// Kinds whose check just started failing, with the error: log once.
    pub new_errors: Vec<(&'static str, String)>,
}

/// The incidents under way, across checks: see the module docs.
#[derive(Debug, Default)]
pub struct Watch {
    lost: BTreeSet<&'static str>,
    failing: BTreeSet<&'static str>,
}

impl Watch {
    /// Takes one check. A kind whose check failed keeps its incident state
    /// (nothing is known about it).
    pub fn observe(&mut self, c: &Check) -> Verdict {
        let failed = c.failed();
        let failing: BTreeSet<&'static str> = failed.iter().map(|(k, _)| *k).collect();
        let lost = c.lost();
        let mut v = Verdict {
            new_incidents: lost.difference(&self.lost).copied().collect(),
            healed: self
                .lost
                .iter()
                .filter(|k| !lost.contains(*k) && !failing.contains(*k))
                .copied()
                .collect(),
            new_errors: failed
                .into_iter()
                .filter(|(k, _)| !self.failing.contains(k))
                .collect(),
        };
        v.new_incidents.sort_unstable();
        for k in &v.new_incidents {
            self.lost.insert(k);
        }
        for k in &v.healed {
            self.lost.remove(k);
        }
        self.failing = failing;
        v
    }

    /// The state of `what` was restored: its incident is over, and a loss
    /// the next check finds is a new one (another removal), even if no
    /// check saw it whole in between.
    pub fn restored(&mut self, what: &'static str) {
        self.lost.remove(what);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::CommandError;

    fn chain(c: &str) -> Missing {
        Missing::Chain {
            table: "nat".into(),
            chain: c.into(),
        }
    }

    fn ok(ipt: Vec<Missing>, nft: Vec<(&'static str, &'static str)>) -> Check {
        Check {
            iptables: Ok(ipt),
            nftables: Ok(nft),
        }
    }

    fn nat_failed() -> NatError {
        NatError::Command(CommandError::Failed {
            cmd: "iptables-nft-save".into(),
            status: "exit status: 4".into(),
            stderr: "xtables lock".into(),
            hint: "retry".into(),
        })
    }

    #[test]
    fn one_incident_per_loss_until_it_is_whole_again() {
        let mut w = Watch::default();
        assert_eq!(w.observe(&ok(vec![], vec![])), Verdict::default());
        let lost = ok(vec![chain("WEFT-DNAT")], vec![("inet", "weft")]);
        let v = w.observe(&lost);
        assert_eq!(v.new_incidents, vec![IPTABLES, NFTABLES]);
        // Still missing (the restore failed, or has not run yet): silent.
        assert_eq!(w.observe(&lost), Verdict::default());
        // nf_tables back, iptables still missing.
        let v = w.observe(&ok(vec![chain("WEFT-DNAT")], vec![]));
        assert_eq!((v.new_incidents, v.healed), (vec![], vec![NFTABLES]));
        let v = w.observe(&ok(vec![], vec![]));
        assert_eq!(v.healed, vec![IPTABLES]);
        // Lost again: a new incident.
        let v = w.observe(&ok(vec![], vec![("ip", "weft_svc")]));
        assert_eq!(v.new_incidents, vec![NFTABLES]);
        // Restored, then removed again before any check saw it whole: a
        // new incident too.
        w.restored(NFTABLES);
        let v = w.observe(&ok(vec![], vec![("ip", "weft_svc")]));
        assert_eq!(v.new_incidents, vec![NFTABLES]);
        assert!(v.healed.is_empty());
    }

    #[test]
    fn a_failing_check_is_said_once_and_keeps_the_incident() {
        let mut w = Watch::default();
        w.observe(&ok(vec![chain("WEFT-DNAT")], vec![]));
        let failing = || Check {
            iptables: Err(nat_failed()),
            nftables: Ok(vec![]),
        };
        let v = w.observe(&failing());
        assert_eq!(v.new_errors.len(), 1);
        assert_eq!(v.new_errors[0].0, IPTABLES);
        assert!(v.new_errors[0].1.contains("iptables-nft-save"), "{v:?}");
        // Nothing known about iptables: not healed, not a new incident.
        assert!(v.healed.is_empty() && v.new_incidents.is_empty(), "{v:?}");
        assert_eq!(w.observe(&failing()), Verdict::default());
        // Still missing once the check works again: the same incident.
        assert_eq!(
            w.observe(&ok(vec![chain("WEFT-DNAT")], vec![])),
            Verdict::default()
        );
    }

    #[test]
    fn describe_names_what_is_missing_briefly() {
        let c = ok(
            vec![
                chain("WEFT-DNAT"),
                Missing::Hook {
                    table: "nat",
                    chain: "PREROUTING",
                    target: "WEFT-PREROUTING".into(),
                },
            ],
            vec![("inet", "weft")],
        );
        assert_eq!(
            c.describe(),
            "iptables: nat chain WEFT-DNAT, nat hook PREROUTING -> WEFT-PREROUTING; \
             nftables: table inet weft"
        );
        assert!(c.iptables_lost());
        assert_eq!(c.tables_lost(), &[("inet", "weft")]);
        let many = ok((0..13).map(|i| chain(&format!("C{i}"))).collect(), vec![]);
        assert!(
            many.describe().ends_with("nat chain C7 and 5 more"),
            "{}",
            many.describe()
        );
        let failed = Check {
            iptables: Err(nat_failed()),
            nftables: Ok(vec![]),
        };
        assert!(!failed.iptables_lost());
        assert_eq!(failed.describe(), "");
    }
}
