//! Counters netd keeps itself: store operations that failed, reconcile runs
//! and failures by kind, how long policy applies take, service health
//! checks and how many of this host's containers fail them. (The policy's rule
//! hits and drops are the kernel's counters, read at scrape time by
//! [`crate::metrics`].) The daemon counts here; the exporter
//! ([`crate::metrics`]) registers them, so the daemon does not depend on
//! the exporter.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The label of the reconcile counters: `host` (bridge, addresses,
/// sysctls, iptables) or `mesh` (tunnel device, peers, routes).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// The label of the firewall restore counter: `iptables` or `nftables`
/// ([`crate::firewall`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhatLabel {
    pub what: &'static str,
}

/// The label of the health check counter: `ok` or `fail`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// What the service health checks ([`crate::services::health`]) count.
#[derive(Clone, Debug, Default)]
pub struct HealthCounters {
    /// Probes run, by result.
    pub checks: Family<ResultLabel, Counter>,
    /// This host's containers whose health check finds them unhealthy now.
    pub unhealthy: Gauge,
}

impl HealthCounters {
    /// Counts one probe.
    pub fn probed(&self, ok: bool) {
        let result = if ok { "ok" } else { "fail" };
        self.checks.get_or_create(&ResultLabel { result }).inc();
    }
}

/// Counters netd keeps itself.
#[derive(Debug)]
pub struct NetdMetrics {
    /// Store operations that failed (endpoint reads and writes, block
    /// renewals, health probes); counted by [`crate::health::StoreHealth`].
    pub store_errors: Counter,
    pub reconcile_runs: Family<KindLabel, Counter>,
    pub reconcile_failures: Family<KindLabel, Counter>,
    /// Seconds each nf_tables apply that changed the kernel took (render,
    /// `nft -f`).
    pub policy_apply_seconds: Histogram,
    pub health: HealthCounters,
    /// Times weft's firewall state went missing (another program removed
    /// it) and was restored, by what ([`crate::firewall`]): one per
    /// incident.
    pub firewall_restores: Family<WhatLabel, Counter>,
    /// dnsd children netd started again because the one it supervised
    /// had died ([`crate::dns`]).
    pub dnsd_restarts: Counter,
}

impl Default for NetdMetrics {
    fn default() -> Self {
        let m = NetdMetrics {
            store_errors: Counter::default(),
            reconcile_runs: Family::default(),
            reconcile_failures: Family::default(),
            // 1 ms to ~16 s.
            policy_apply_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            health: HealthCounters::default(),
            firewall_restores: Family::default(),
            dnsd_restarts: Counter::default(),
        };
        // Both kinds show from the start, at zero.
        for kind in ["host", "mesh"] {
            let l = KindLabel { kind };
            drop(m.reconcile_runs.get_or_create(&l));
            drop(m.reconcile_failures.get_or_create(&l));
        }
        for result in ["ok", "fail"] {
            drop(m.health.checks.get_or_create(&ResultLabel { result }));
        }
        for what in [crate::firewall::IPTABLES, crate::firewall::NFTABLES] {
            drop(m.firewall_restores.get_or_create(&WhatLabel { what }));
        }
        m
    }
}

impl NetdMetrics {
    /// Counts one reconcile run of `kind`.
    pub fn reconciled(&self, kind: &'static str, ok: bool) {
        let l = KindLabel { kind };
        self.reconcile_runs.get_or_create(&l).inc();
        if !ok {
            self.reconcile_failures.get_or_create(&l).inc();
        }
    }

    /// Counts one policy apply that took `took` (`None`: nothing changed,
    /// nothing counted).
    pub fn policy_applied(&self, took: Option<std::time::Duration>) {
        if let Some(t) = took {
            self.policy_apply_seconds.observe(t.as_secs_f64());
        }
    }

    /// Counts one incident of weft's firewall state of kind `what` gone
    /// missing (and restored).
    pub fn firewall_restored(&self, what: &'static str) {
        self.firewall_restores
            .get_or_create(&WhatLabel { what })
            .inc();
    }

    /// Adds the counters to a registry (they stay shared with `self`).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "weft_store_errors",
            "Store operations that failed",
            self.store_errors.clone(),
        );
        r.register(
            "weft_reconcile_runs",
            "Reconcile runs, by kind (host: bridge, sysctls, iptables; mesh: tunnel peers and routes)",
            self.reconcile_runs.clone(),
        );
        r.register(
            "weft_reconcile_failures",
            "Reconcile runs that failed, by kind",
            self.reconcile_failures.clone(),
        );
        r.register(
            "weft_policy_apply_seconds",
            "Seconds each apply of weft's nf_tables rules (policy, anti-spoofing) took",
            self.policy_apply_seconds.clone(),
        );
        r.register(
            "weft_firewall_restores",
            "Times weft's firewall state went missing (another program removed it) and was restored, by what (iptables, nftables)",
            self.firewall_restores.clone(),
        );
        r.register(
            "weft_service_health_checks",
            "Service health check probes this host ran, by result (ok, fail)",
            self.health.checks.clone(),
        );
        r.register(
            "weft_service_unhealthy_backends",
            "This host's containers whose service health check finds them unhealthy",
            self.health.unhealthy.clone(),
        );
        r.register(
            "weft_dnsd_restarts",
            "Times netd started dnsd again because the one it supervised had died",
            self.dnsd_restarts.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_show_at_zero_and_failures_count_apart() {
        let m = NetdMetrics::default();
        m.reconciled("host", true);
        m.reconciled("mesh", false);
        m.store_errors.inc();
        m.policy_applied(Some(std::time::Duration::from_millis(3)));
        m.policy_applied(None);
        m.health.probed(false);
        m.health.unhealthy.inc();
        m.firewall_restored(crate::firewall::NFTABLES);
        m.dnsd_restarts.inc();
        let mut r = Registry::default();
        m.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        for line in [
            "weft_store_errors_total 1",
            r#"weft_reconcile_runs_total{kind="host"} 1"#,
            r#"weft_reconcile_runs_total{kind="mesh"} 1"#,
            r#"weft_reconcile_failures_total{kind="host"} 0"#,
            r#"weft_reconcile_failures_total{kind="mesh"} 1"#,
            "weft_policy_apply_seconds_count 1",
            r#"weft_service_health_checks_total{result="ok"} 0"#,
            r#"weft_service_health_checks_total{result="fail"} 1"#,
            "weft_service_unhealthy_backends 1",
            r#"weft_firewall_restores_total{what="iptables"} 0"#,
            r#"weft_firewall_restores_total{what="nftables"} 1"#,
            "weft_dnsd_restarts_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
