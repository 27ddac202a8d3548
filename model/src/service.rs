//! Services: a stable virtual IP per service, balanced in the kernel, with
//! optional health checks. The one definition of every service concept the
//! crates share:
//!
//! * [`ServiceName`]: `service.stack` (or `service` for containers without
//!   a stack), taken from the endpoint records' `service` and `stack`.
//! * [`ServiceSpec`]: what an operator sets per service: the [`Mode`]
//!   (`vip`, the default, or `dnsrr`: today's DNS round robin), the
//!   [`Balance`] (`random` or a `hash` of the flow), source-IP `affinity`,
//!   and an optional [`HealthCheck`] (`tcp:PORT` or `http:PORT/PATH`).
//! * [`ServiceRecord`]: stored at [`crate::Keys::service`]: the spec and the
//!   VIP, allocated once by compare-and-swap on [`crate::Keys::vip`] (one
//!   claim key per address, so two hosts can never take the same one) and
//!   kept while the service has containers and for
//!   [`DEFAULT_SERVICE_GRACE`] after its last one went
//!   ([`ServiceRecord::empty_since_ms`]).
//! * [`HealthRecord`]: stored at [`crate::Keys::health_of`] by the netd of
//!   the host where the container lives, when its health changes.
//! * [`HealthState`]: the pure rise/fall state machine of one container's
//!   checks.
//!
//! Text forms (CLI, CNI_ARGS, the API) parse with `FromStr` and print with
//! `Display`, and the JSON of the records is pinned by tests.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::{DnsName, EndpointRecord};

/// The service range when none is configured (`[ipam] service_range`).
pub const DEFAULT_SERVICE_RANGE: Ipv4Network =
    match Ipv4Network::new_checked(Ipv4Addr::new(10, 43, 0, 0), 16) {
        Some(n) => n,
        None => panic!("valid network"),
    };

/// How long a service keeps its VIP after its last container went.
pub const DEFAULT_SERVICE_GRACE: Duration = Duration::from_secs(600);

/// What went wrong reading a service setting; each says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("service name {0:?}: write SERVICE or SERVICE.STACK (DNS labels)")]
    Name(String),
    #[error("service mode {0:?}: `vip` or `dnsrr`")]
    Mode(String),
    #[error("balance {0:?}: `random` or `hash`")]
    Balance(String),
    #[error(
        "health check {0:?}: `tcp:PORT` or `http:PORT/PATH` (PORT 1-65535, PATH starting with /)"
    )]
    Probe(String),
    #[error("health check {field} = {value}: {why}")]
    Health {
        field: &'static str,
        value: u64,
        why: &'static str,
    },
}

/// A service: `service.stack`, or `service` without a stack.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName {
    /// One DNS label.
    pub service: DnsName,
    pub stack: Option<DnsName>,
}

impl ServiceName {
    /// `service` of `stack`; the service must be one DNS label (it is the
    /// first label of `service.stack`).
    pub fn new(service: &str, stack: Option<&str>) -> Result<ServiceName, ServiceError> {
        let whole = match stack {
            Some(s) => format!("{service}.{s}"),
            None => service.to_owned(),
        };
        let bad = || ServiceError::Name(whole.clone());
        if service.contains('.') {
            return Err(bad());
        }
        Ok(ServiceName {
            service: DnsName::new(service).map_err(|_| bad())?,
            stack: stack
                .map(|s| DnsName::new(s).map_err(|_| bad()))
                .transpose()?,
        })
    }

    /// The service `record` belongs to (`None` without a service, or when
    /// its service is not one label: such a record has DNS round robin only).
    pub fn of(record: &EndpointRecord) -> Option<ServiceName> {
        let service = record.service.as_ref()?;
        ServiceName::new(service.as_str(), record.stack.as_deref()).ok()
    }

    /// The part of its store key after `services/`: `stack/service`, or
    /// `service` without a stack (names have no `/`, so the two forms never
    /// meet).
    pub fn key_suffix(&self) -> String {
        match &self.stack {
            Some(stack) => format!("{stack}/{}", self.service),
            None => self.service.to_string(),
        }
    }

    /// The name back from [`ServiceName::key_suffix`].
    pub fn from_key_suffix(suffix: &str) -> Result<ServiceName, ServiceError> {
        match suffix.split_once('/') {
            Some((stack, service)) => ServiceName::new(service, Some(stack)),
            None => ServiceName::new(suffix, None),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.stack {
            Some(stack) => write!(f, "{}.{stack}", self.service),
            None => write!(f, "{}", self.service),
        }
    }
}

impl FromStr for ServiceName {
    type Err = ServiceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('.') {
            Some((service, stack)) => ServiceName::new(service, Some(stack)),
            None => ServiceName::new(s, None),
        }
    }
}

impl TryFrom<String> for ServiceName {
    type Error = ServiceError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ServiceName> for String {
    fn from(n: ServiceName) -> String {
        n.to_string()
    }
}

macro_rules! text_enum {
    ($name:ident, $err:ident, $($variant:ident => $text:literal),+) => {
        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $name {
            type Err = ServiceError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s.trim().to_ascii_lowercase().as_str() {
                    $($text => Ok($name::$variant),)+
                    _ => Err(ServiceError::$err(s.to_owned())),
                }
            }
        }
    };
}

/// How clients reach a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A virtual IP, balanced in the kernel on the client's host; DNS
    /// answers the VIP.
    #[default]
    Vip,
    /// No VIP: DNS answers every healthy container (round robin).
    Dnsrr,
}
text_enum!(Mode, Mode, Vip => "vip", Dnsrr => "dnsrr");

/// How a new connection to a VIP picks its backend (conntrack keeps a
/// connection on the one it got).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// A random healthy backend.
    #[default]
    Random,
    /// A hash of the flow (addresses, protocol and ports).
    Hash,
}
text_enum!(Balance, Balance, Random => "random", Hash => "hash");

/// What a health check probes, from the container's host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Probe {
    /// A TCP connect to the port.
    Tcp { port: u16 },
    /// An HTTP GET of the path; 2xx and 3xx are healthy.
    Http { port: u16, path: String },
}

impl Probe {
    pub fn port(&self) -> u16 {
        match self {
            Probe::Tcp { port } | Probe::Http { port, .. } => *port,
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Tcp { port } => write!(f, "tcp:{port}"),
            Probe::Http { port, path } => write!(f, "http:{port}{path}"),
        }
    }
}

impl FromStr for Probe {
    type Err = ServiceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ServiceError::Probe(s.to_owned());
        let (kind, rest) = s.trim().split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
        match kind.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Probe::Tcp { port: port(rest)? }),
            "http" => {
                let (p, path) = match rest.find('/') {
                    Some(i) => (&rest[..i], &rest[i..]),
                    None => (rest, "/"),
                };
                if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(bad());
                }
                Ok(Probe::Http {
                    port: port(p)?,
                    path: path.to_owned(),
                })
            }
            _ => Err(bad()),
        }
    }
}

impl TryFrom<String> for Probe {
    type Error = ServiceError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Probe> for String {
    fn from(p: Probe) -> String {
        p.to_string()
    }
}

/// A service's health check: see [`HealthState`] for how results count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    pub probe: Probe,
    /// Between two probes of one container.
    #[serde(default = "HealthCheck::default_interval_ms")]
    pub interval_ms: u64,
    /// A probe that takes longer fails.
    #[serde(default = "HealthCheck::default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive successes that make an unhealthy container healthy.
    #[serde(default = "HealthCheck::default_rise")]
    pub rise: u32,
    /// Consecutive failures that make a healthy container unhealthy.
    #[serde(default = "HealthCheck::default_fall")]
    pub fall: u32,
}

impl HealthCheck {
    fn default_interval_ms() -> u64 {
        500
    }
    fn default_timeout_ms() -> u64 {
        400
    }
    fn default_rise() -> u32 {
        2
    }
    fn default_fall() -> u32 {
        2
    }

    /// `probe` with the default timing: every 500 ms, 400 ms timeout, two
    /// failures make a container unhealthy (out within about 1 s plus the
    /// time every host takes to hear it), two successes bring it back.
    pub fn new(probe: Probe) -> HealthCheck {
        HealthCheck {
            probe,
            interval_ms: Self::default_interval_ms(),
            timeout_ms: Self::default_timeout_ms(),
            rise: Self::default_rise(),
            fall: Self::default_fall(),
        }
    }

    /// Checks the timing: an interval of 100 ms to 1 h, a timeout of at
    /// least 10 ms and at most the interval, thresholds of 1 to 100.
    pub fn validate(&self) -> Result<(), ServiceError> {
        let health = |field, value, why| Err(ServiceError::Health { field, value, why });
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return health("interval_ms", self.interval_ms, "between 100 and 3600000");
        }
        if self.timeout_ms < 10 || self.timeout_ms > self.interval_ms {
            return health(
                "timeout_ms",
                self.timeout_ms,
                "at least 10 and at most interval_ms",
            );
        }
        for (field, v) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&v) {
                return health(field, u64::from(v), "between 1 and 100");
            }
        }
        Ok(())
    }
}

/// What an operator sets per service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceSpec {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub balance: Balance,
    /// Keep a client (by source address) on one backend while it is healthy.
    #[serde(default)]
    pub affinity: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
}

impl ServiceSpec {
    pub fn validate(&self) -> Result<(), ServiceError> {
        self.health.as_ref().map_or(Ok(()), HealthCheck::validate)
    }
}

/// A service as stored at [`crate::Keys::service`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub name: ServiceName,
    /// Its virtual IP in the service range (claimed at [`crate::Keys::vip`]);
    /// `None` in `dnsrr` mode until it is switched to `vip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<Ipv4Addr>,
    #[serde(default)]
    pub spec: ServiceSpec,
    /// Wall-clock milliseconds since when the service has had no container
    /// (`None` while it has one); the record and its VIP go
    /// [`DEFAULT_SERVICE_GRACE`] later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_since_ms: Option<u64>,
}

/// One container's health as its host's netd last saw it, stored at
/// [`crate::Keys::health_of`] (written when it changes; no record means
/// healthy: a service without a check, or a container not probed yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    pub healthy: bool,
    /// Wall-clock milliseconds of the change.
    pub since_ms: u64,
    /// What the last probe saw (`connection refused`, `HTTP 503`, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl HealthRecord {
    /// Whether a container whose health record is `record` may take
    /// traffic (be a VIP backend, answer its service's names): with no
    /// record (no check, or not probed yet) or a healthy one. The one copy
    /// of the rule: the balancer, dnsd and the services API ask it.
    pub fn is_healthy(record: Option<&HealthRecord>) -> bool {
        record.map_or(true, |h| h.healthy)
    }
}

/// One container's health checks as a pure state machine: it starts
/// healthy (a new container takes traffic at once, as with no check) and
/// turns unhealthy after `fall` consecutive failures, healthy again after
/// `rise` consecutive successes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    healthy: bool,
    /// Consecutive results against the current state.
    streak: u32,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState {
            healthy: true,
            streak: 0,
        }
    }
}

impl HealthState {
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Takes one probe's result; `Some(new state)` when it changed.
    pub fn observe(&mut self, ok: bool, check: &HealthCheck) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy { check.fall } else { check.rise };
        if self.streak >= needed.max(1) {
            self.healthy = ok;
            self.streak = 0;
            return Some(ok);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn no_health_record_or_a_healthy_one_takes_traffic() {
        let record = |healthy| HealthRecord {
            healthy,
            since_ms: 1,
            detail: String::new(),
        };
        assert!(HealthRecord::is_healthy(None));
        assert!(HealthRecord::is_healthy(Some(&record(true))));
        assert!(!HealthRecord::is_healthy(Some(&record(false))));
    }

    #[test]
    fn names_read_and_print_and_make_keys() {
        let n: ServiceName = "web.shop".parse().unwrap();
        assert_eq!(n.service.as_str(), "web");
        assert_eq!(n.stack.as_deref(), Some("shop"));
        assert_eq!(n.to_string(), "web.shop");
        assert_eq!(n.key_suffix(), "shop/web");
        assert_eq!(ServiceName::from_key_suffix("shop/web").unwrap(), n);
        let bare: ServiceName = "web".parse().unwrap();
        assert_eq!(bare.key_suffix(), "web");
        assert_eq!(ServiceName::from_key_suffix("web").unwrap(), bare);
        // A stack may have dots; the service is the first label.
        let deep: ServiceName = "web.shop.eu".parse().unwrap();
        assert_eq!(deep.stack.as_deref(), Some("shop.eu"));
        for bad in ["", ".shop", "web.", "we b", "a/b"] {
            let e = bad.parse::<ServiceName>().unwrap_err();
            assert!(e.to_string().contains("SERVICE.STACK"), "{e}");
        }
        assert!(ServiceName::new("a.b", Some("c")).is_err());
        assert_eq!(
            serde_json::to_string(&n).unwrap(),
            "\"web.shop\"",
            "a plain string in JSON"
        );
    }

    #[test]
    fn modes_balances_and_probes_parse() {
        assert_eq!("VIP".parse::<Mode>().unwrap(), Mode::Vip);
        assert_eq!("dnsrr".parse::<Mode>().unwrap(), Mode::Dnsrr);
        assert!("rr"
            .parse::<Mode>()
            .unwrap_err()
            .to_string()
            .contains("dnsrr"));
        assert_eq!("hash".parse::<Balance>().unwrap(), Balance::Hash);
        assert_eq!("tcp:80".parse::<Probe>().unwrap(), Probe::Tcp { port: 80 });
        assert_eq!(
            "http:8080/healthz".parse::<Probe>().unwrap(),
            Probe::Http {
                port: 8080,
                path: "/healthz".into()
            }
        );
        assert_eq!(
            "http:8080".parse::<Probe>().unwrap().to_string(),
            "http:8080/"
        );
        for bad in [
            "tcp:0",
            "tcp:x",
            "udp:53",
            "http:80/a b",
            "tcp",
            "tcp:70000",
        ] {
            assert!(bad.parse::<Probe>().is_err(), "{bad}");
        }
    }

    #[test]
    fn records_have_a_stable_json() {
        let r = ServiceRecord {
            name: "web.shop".parse().unwrap(),
            vip: Some(Ipv4Addr::new(10, 43, 0, 2)),
            spec: ServiceSpec {
                health: Some(HealthCheck::new("http:80/ok".parse().unwrap())),
                ..ServiceSpec::default()
            },
            empty_since_ms: None,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"name":"web.shop","vip":"10.43.0.2","spec":{"mode":"vip","balance":"random","affinity":false,"health":{"probe":"http:80/ok","interval_ms":500,"timeout_ms":400,"rise":2,"fall":2}}}"#
        );
        assert_eq!(serde_json::from_str::<ServiceRecord>(&json).unwrap(), r);
        // The least a record can be.
        let min: ServiceRecord = serde_json::from_str(r#"{"name":"db"}"#).unwrap();
        assert_eq!(min.spec, ServiceSpec::default());
        assert_eq!(min.vip, None);
        let h: HealthCheck = serde_json::from_str(r#"{"probe":"tcp:5432"}"#).unwrap();
        assert_eq!(h, HealthCheck::new(Probe::Tcp { port: 5432 }));
    }

    #[test]
    fn health_checks_validate_their_timing() {
        let mut h = HealthCheck::new(Probe::Tcp { port: 1 });
        h.validate().unwrap();
        h.timeout_ms = 600;
        assert!(h.validate().unwrap_err().to_string().contains("timeout_ms"));
        h.timeout_ms = 100;
        h.fall = 0;
        assert!(h.validate().unwrap_err().to_string().contains("fall"));
        h.fall = 1;
        h.interval_ms = 10;
        assert!(h.validate().is_err());
    }

    #[test]
    fn health_rises_and_falls_on_streaks() {
        let check = HealthCheck::new(Probe::Tcp { port: 1 });
        let mut s = HealthState::default();
        assert!(s.healthy());
        assert_eq!(s.observe(false, &check), None);
        // A success in between resets the streak.
        assert_eq!(s.observe(true, &check), None);
        assert_eq!(s.observe(false, &check), None);
        assert_eq!(s.observe(false, &check), Some(false));
        assert_eq!(s.observe(false, &check), None);
        assert_eq!(s.observe(true, &check), None);
        assert_eq!(s.observe(true, &check), Some(true));
        let once = HealthCheck {
            fall: 1,
            ..check.clone()
        };
        assert_eq!(s.observe(false, &once), Some(false));
    }
}
