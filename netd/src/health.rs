//! Health: "is the store up?" answered in one place, and readiness.
//!
//! [`StoreHealth`] is told the outcome of every store operation the daemon
//! makes (endpoint reads and writes, block renewals, and the maintenance
//! loop's probe every [`PROBE_EVERY`], so the answer is never older than
//! that); `netd status` (and with it CNI STATUS), `GET /readyz` and the
//! `weft_store_up` metric read it. The store is down after an error that
//! says it did not answer (unreachable, timeout, locked); any answer, even
//! a refusal, means it is up.
//!
//! [`readiness`] adds the data path for `/readyz`: the bridge and the tunnel
//! device exist and are up.

use std::fmt::Display;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use weft_store::{DynStore, StoreError};

use crate::host::HostNet;

/// How long a probe (or a scrape's store read) waits for the store.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the maintenance loop probes the store.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// Whether the store answered the last operation, and why not.
#[derive(Debug)]
pub struct StoreHealth {
    /// The store, as `StoreBackend::describe` names it.
    store: String,
    /// `None` while up; the last error while down.
    down: Mutex<Option<String>>,
    /// Failed store operations (shared with the exported counter).
    errors: Counter,
}

impl StoreHealth {
    /// Starts up (netd has just read the store to start); failures count
    /// into `errors`.
    pub fn new(store: String, errors: Counter) -> StoreHealth {
        StoreHealth {
            store,
            down: Mutex::new(None),
            errors,
        }
    }

    /// The store answered.
    pub fn answered(&self) {
        *self.down.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// A store operation failed; `transient`: the store did not answer (it
    /// is down), otherwise it answered with a refusal (it is up).
    pub fn failed(&self, transient: bool, error: &dyn Display) {
        self.errors.inc();
        *self.down.lock().unwrap_or_else(|p| p.into_inner()) =
            transient.then(|| format!("{}: {error}", self.store));
    }

    /// Records the outcome of a store call and passes it on.
    pub fn observe<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match &r {
            Ok(_) => self.answered(),
            Err(e) => self.failed(e.is_transient(), e),
        }
        r
    }

    /// A store call got no answer within `waited`.
    pub fn timed_out(&self, waited: Duration) {
        self.failed(true, &format!("no answer within {waited:?}"));
    }

    /// Whether the store answered the last operation.
    pub fn up(&self) -> bool {
        self.down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// `Ok` while up, the last error while down.
    pub fn status(&self) -> Result<(), String> {
        match &*self.down.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(e) => Err(e.clone()),
        }
    }

    /// Reads `key` (within [`STORE_TIMEOUT`]) and records the outcome.
    pub async fn probe(&self, store: &DynStore, key: &str) {
        match tokio::time::timeout(STORE_TIMEOUT, store.get(key)).await {
            Ok(r) => {
                let _ = self.observe(r);
            }
            Err(_) => self.timed_out(STORE_TIMEOUT),
        }
    }
}

/// The result of the readiness checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub store: Result<(), String>,
    pub datapath: Result<(), String>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.store.is_ok() && self.datapath.is_ok()
    }

    /// The `/readyz` body: `ready` or `not ready`, then one line per check.
    pub fn report(&self) -> String {
        let line = |what: &str, res: &Result<(), String>| match res {
            Ok(()) => format!("{what}: ok\n"),
            Err(e) => format!("{what}: {e}\n"),
        };
        format!(
            "{}\n{}{}",
            if self.ready() { "ready" } else { "not ready" },
            line("store", &self.store),
            line("datapath", &self.datapath)
        )
    }
}

/// Is the store up (as last seen), and are `devices` (bridge, tunnel
/// device) there and up?
pub async fn readiness(store: &StoreHealth, net: &HostNet, devices: &[&str]) -> Readiness {
    let mut problems = Vec::new();
    for &dev in devices {
        match net.link(dev).await {
            Ok(Some(l)) if l.up => {}
            Ok(Some(_)) => problems.push(format!("{dev} is down")),
            Ok(None) => problems.push(format!("{dev} does not exist")),
            Err(e) => problems.push(format!("{dev}: {e}")),
        }
    }
    let datapath = if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    };
    Readiness {
        store: store.status(),
        datapath,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unavailable() -> StoreError {
        StoreError::Unavailable {
            store: "etcd:x".into(),
            detail: "connection refused".into(),
        }
    }

    #[test]
    fn down_after_no_answer_up_after_any_answer() {
        let errors = Counter::default();
        let h = StoreHealth::new("etcd:x".into(), errors.clone());
        assert!(h.up(), "netd starts after reading the store");
        assert!(h.observe::<()>(Err(unavailable())).is_err());
        assert!(!h.up());
        let why = h.status().unwrap_err();
        assert!(
            why.starts_with("etcd:x: ") && why.contains("refused"),
            "{why}"
        );
        assert_eq!(h.observe(Ok(7)).unwrap(), 7);
        assert!(h.up());
        // A refusal is an answer: up, but counted.
        let refused = StoreError::LeaseNotFound {
            store: "etcd:x".into(),
            lease: 1,
        };
        assert!(!refused.is_transient());
        let _ = h.observe::<()>(Err(refused));
        assert!(h.up());
        h.timed_out(STORE_TIMEOUT);
        assert!(h.status().unwrap_err().contains("no answer within 2s"));
        assert_eq!(errors.get(), 3);
    }

    #[test]
    fn readiness_report_names_each_check() {
        let r = Readiness {
            store: Ok(()),
            datapath: Err("weft0 is down".into()),
        };
        assert!(!r.ready());
        assert_eq!(
            r.report(),
            "not ready\nstore: ok\ndatapath: weft0 is down\n"
        );
        let r = Readiness {
            store: Ok(()),
            datapath: Ok(()),
        };
        assert!(r.ready());
        assert!(r.report().starts_with("ready\n"));
    }
}
