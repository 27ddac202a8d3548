//! The daemon's side of [`crate::firewall`]: every check, and the restore
//! when weft's firewall state went missing: the NAT reconcile (the rules
//! are written again whole, the hooks inserted) and the re-apply of each
//! lost nf_tables table (the enforcer's, the balancer's), right away.

use std::time::Instant;

use crate::firewall::{Check, Watch, IPTABLES, NFTABLES};

use super::Daemon;

impl Daemon {
    /// Checks weft's firewall state and restores what another program
    /// removed. Logs once per incident; counts each in
    /// `weft_firewall_restores_total{what}`.
    pub(super) async fn check_firewall(&self, watch: &mut Watch) {
        let nat = self.nat.clone();
        let nft = self.enforcer.nft().clone();
        let check =
            match tokio::task::spawn_blocking(move || crate::firewall::check(&nat, &nft)).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "firewall check task failed");
                    return;
                }
            };
        let verdict = watch.observe(&check);
        for (what, error) in &verdict.new_errors {
            tracing::warn!(what, %error, "checking weft's firewall state failed");
        }
        for what in &verdict.healed {
            tracing::info!(what, "weft's firewall state is whole again");
        }
        let new = !verdict.new_incidents.is_empty();
        if new {
            tracing::warn!(
                missing = %check.describe(),
                "weft's firewall state was removed by another program; restoring it"
            );
            for what in &verdict.new_incidents {
                self.counters.firewall_restored(what);
            }
        }
        for what in self.restore_firewall(&check, new).await {
            watch.restored(what);
        }
    }

    /// Restores what `check` found missing (nothing when nothing is);
    /// returns the kinds restored. Failures are warned about when `loud`
    /// (the incident's first try), else logged at debug: the next check
    /// tries again.
    async fn restore_firewall(&self, check: &Check, loud: bool) -> Vec<&'static str> {
        let tables = check.tables_lost();
        if !check.iptables_lost() && tables.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        let mut failed = Vec::new();
        let mut restored = Vec::new();
        if check.iptables_lost() {
            self.nat.invalidate();
            match self.reconcile().await {
                Ok(()) => restored.push(IPTABLES),
                Err(e) => failed.push(format!("iptables: {e:#}")),
            }
        }
        if !tables.is_empty() {
            let before = failed.len();
            if tables.iter().any(|(_, n)| *n == crate::nft::TABLE) {
                match self.enforcer.reapply().await {
                    Ok(took) => self.counters.policy_applied(took),
                    Err(e) => failed.push(format!("policy: {e:#}")),
                }
            }
            if tables.iter().any(|(_, n)| *n == crate::nft::SERVICES_TABLE) {
                if let Err(e) = self.balancer.reapply().await {
                    failed.push(format!("services: {e:#}"));
                }
            }
            if failed.len() == before {
                restored.push(NFTABLES);
            }
        }
        let took_ms = started.elapsed().as_millis() as u64;
        match (failed.is_empty(), loud) {
            (true, true) => tracing::info!(took_ms, "weft's firewall state restored"),
            (true, false) => tracing::debug!(took_ms, "weft's firewall state restored"),
            (false, true) => {
                tracing::warn!(errors = %failed.join("; "), "restoring weft's firewall state failed; retrying at the next check")
            }
            (false, false) => {
                tracing::debug!(errors = %failed.join("; "), "restoring weft's firewall state failed")
            }
        }
        restored
    }
}
