//! The service routes' answer types. What an operator sets is weft-model's
//! [`ServiceSpec`] (`PUT /v1/services/{name}` takes it as the body; its
//! JSON is the same in the store and on the socket).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use weft_model::{ServiceName, ServiceSpec};

/// A service as netd sees it in the store (`GET /v1/services`,
/// `GET /v1/services/{name}`, the answer to `PUT`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// `service.stack`, or `service` without a stack.
    pub name: ServiceName,
    /// The virtual IP (`None` in `dnsrr` mode, or when the service range
    /// is full: `problem` says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<Ipv4Addr>,
    /// Mode, balance, affinity and health check.
    #[serde(flatten)]
    pub spec: ServiceSpec,
    /// Its containers on every host.
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// Wall-clock milliseconds since when it has had no container; the
    /// record and its VIP go after the grace (`services.grace_secs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_since_ms: Option<u64>,
    /// What keeps it from working as set, in words (`no VIP: service
    /// range 10.43.0.0/16 is full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// One container of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub address: Ipv4Addr,
    pub host_id: String,
    pub container_id: String,
    pub ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// As its host's health check last saw it (no check: healthy).
    pub healthy: bool,
    /// What the last check saw, when it failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_is_flat_json() {
        let info = ServiceInfo {
            name: "web.shop".parse().unwrap(),
            vip: Some(Ipv4Addr::new(10, 43, 0, 1)),
            spec: ServiceSpec::default(),
            backends: vec![Backend {
                address: Ipv4Addr::new(10, 42, 0, 2),
                host_id: "h1".into(),
                container_id: "abc".into(),
                ifname: "eth0".into(),
                name: None,
                healthy: true,
                detail: String::new(),
            }],
            empty_since_ms: None,
            problem: None,
        };
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(
            json,
            r#"{"name":"web.shop","vip":"10.43.0.1","mode":"vip","balance":"random","affinity":false,"backends":[{"address":"10.42.0.2","host_id":"h1","container_id":"abc","ifname":"eth0","healthy":true}]}"#
        );
        assert_eq!(serde_json::from_str::<ServiceInfo>(&json).unwrap(), info);
    }
}
