//! This host's endpoints: the control API's add, get, list, delete and GC.
//!
//! Endpoints are recorded in the store as [`EndpointRecord`]s under
//! `<prefix>endpoints/<host id>/<container id>/<ifname>` (dnsd watches that
//! prefix on every host); their addresses come from IPAM. Adds and deletes
//! are applied in batches, a group commit (`local.rs`: what arrives while a
//! batch is applied goes into the next one; `apply.rs`: one batch), each
//! under the daemon's lock and ending with one NAT reconcile, so the
//! published ports in iptables always match the records. This host's
//! records are kept in memory ([`Local`]); the store stays the truth across
//! restarts and resyncs.
//!
//! Anti-spoofing ([`crate::nft::spoof`]) has no window: an add answers the
//! plugin only after this host's records, the new one included, are
//! enforced in the kernel ([`Daemon::enforce_local`]), and the plugin makes
//! the veth only after that answer; if that apply fails, the add is undone
//! and refused. A delete or GC enforces the remaining records (the plugin
//! has removed the veth already, so a failure there is only logged; the
//! resync retries).
//!
//! The decisions are pure functions: which requests a batch takes and what
//! each does ([`batch`]), and here: [`validate_add`] parses a request
//! into model types (the names' rules are weft-model's), [`check_port_conflicts`]
//! applies the one port-conflict rule ([`PortMapping::conflicts_with`], which
//! the NAT rules use too, so a conflict is a 400 here and never a failed
//! iptables apply later), and [`store_error`] / [`ipam_error`] map failures
//! to API error kinds.

mod apply;
pub mod batch;
mod local;

use std::collections::HashSet;
use std::sync::Arc;

use weft_api::{
    AddEndpoint, ApiError, Attachment, Deleted, Endpoint, ErrorKind, GcRequest, GcResult,
};
use weft_ipam::{IpamError, Owner};
use weft_model::{
    find_port_conflict, ContainerId, DnsConfig, DnsName, EndpointRecord, IfName, NameError,
    PortMapping,
};
use weft_store::StoreError;

use batch::Change;
pub use local::{Answer, Local};

use crate::daemon::Daemon;

/// An add request whose names and ports have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEndpoint {
    pub container_id: ContainerId,
    pub ifname: IfName,
    pub netns: String,
    pub name: Option<DnsName>,
    pub service: Option<DnsName>,
    pub stack: Option<DnsName>,
    pub aliases: Vec<DnsName>,
    pub port_mappings: Vec<PortMapping>,
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidRequest, msg)
}

fn name_error(field: &str) -> impl Fn(NameError) -> ApiError + '_ {
    move |e| invalid(format!("{field}: {e}"))
}

/// Parses an add request: every name by its model rule, every port mapping
/// with both ports non-zero and no two in conflict with each other.
pub fn validate_add(req: &AddEndpoint) -> Result<NewEndpoint, ApiError> {
    let dns = |field: &'static str, v: &Option<String>| {
        v.as_deref()
            .map(|n| DnsName::new(n).map_err(name_error(field)))
            .transpose()
    };
    let new = NewEndpoint {
        container_id: ContainerId::new(req.container_id.as_str())
            .map_err(name_error("container_id"))?,
        ifname: IfName::new(req.ifname.as_str()).map_err(name_error("ifname"))?,
        netns: req.netns.clone(),
        name: dns("name", &req.name)?,
        service: dns("service", &req.service)?,
        stack: dns("stack", &req.stack)?,
        aliases: req
            .aliases
            .iter()
            .map(|a| DnsName::new(a.as_str()).map_err(name_error("alias")))
            .collect::<Result<_, _>>()?,
        port_mappings: req.port_mappings.clone(),
    };
    for (i, m) in new.port_mappings.iter().enumerate() {
        if m.host_port == 0 || m.container_port == 0 {
            return Err(invalid(format!(
                "invalid port mapping {}->{}/{}: ports must be 1-65535",
                m.host_port,
                m.container_port,
                m.protocol.as_str()
            )));
        }
        if new.port_mappings[..i].iter().any(|o| o.conflicts_with(m)) {
            return Err(invalid(format!(
                "host port {}/{} is mapped twice",
                m.host_port,
                m.protocol.as_str()
            )));
        }
    }
    Ok(new)
}

/// The one port-conflict rule against this host's other endpoints: a
/// wanted host port that another endpoint publishes on an overlapping host
/// address (`0.0.0.0` or none is every address) is an invalid request.
pub fn check_port_conflicts(
    wanted: &[PortMapping],
    existing: &[EndpointRecord],
) -> Result<(), ApiError> {
    match find_port_conflict(wanted, existing) {
        None => Ok(()),
        Some((m, ep)) => Err(invalid(format!(
            "host port {}{}/{} is already published by container {} ({})",
            m.host_addr().map(|ip| format!("{ip}:")).unwrap_or_default(),
            m.host_port,
            m.protocol.as_str(),
            ep.container_id,
            ep.name.as_deref().unwrap_or("unnamed")
        ))),
    }
}

/// A store failure as the API says it: try again later when the store is
/// unreachable, else internal.
pub fn store_error(e: StoreError) -> ApiError {
    let kind = if e.is_transient() {
        ErrorKind::TryAgainLater
    } else {
        ErrorKind::Internal
    };
    ApiError::new(kind, e.to_string())
}

/// An IPAM failure as the API says it.
pub fn ipam_error(e: IpamError) -> ApiError {
    let kind = match &e {
        IpamError::BlockFull { .. } | IpamError::NoFreeBlock { .. } => ErrorKind::PoolExhausted,
        IpamError::InvalidId { .. } => ErrorKind::InvalidRequest,
        e if e.is_transient() => ErrorKind::TryAgainLater,
        _ => ErrorKind::Internal,
    };
    ApiError::new(kind, e.to_string())
}

/// The resolv.conf settings a container gets: weft's DNS address, and the
/// search list stack, service within stack, then the domain.
pub fn dns_config(
    dns_addr: std::net::Ipv4Addr,
    domain: &str,
    stack: Option<&str>,
    service: Option<&str>,
) -> DnsConfig {
    let mut search = Vec::new();
    if let Some(stack) = stack {
        search.push(format!("{stack}.{domain}"));
        if let Some(service) = service {
            search.push(format!("{service}.{stack}.{domain}"));
        }
    }
    search.push(domain.to_owned());
    DnsConfig {
        nameservers: vec![dns_addr],
        domain: domain.to_owned(),
        search,
        options: vec!["ndots:1".into()],
    }
}

/// An apply of weft's nf_tables rules failed: the add is refused (the
/// plugin may retry).
fn enforce_error(e: &anyhow::Error) -> ApiError {
    ApiError::new(
        ErrorKind::TryAgainLater,
        format!("enforcing anti-spoofing for the endpoint failed: {e:#}"),
    )
}

/// Deletes the conntrack entries of `addrs` (released addresses) with one
/// listing.
async fn flush_conntrack(addrs: Vec<std::net::Ipv4Addr>) {
    let n = addrs.len();
    match tokio::task::spawn_blocking(move || crate::conntrack::flush_all(None, &addrs)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(addresses = n, error = %e, "flushing conntrack entries failed")
        }
        Err(e) => tracing::warn!(addresses = n, error = %e, "conntrack task failed"),
    }
}

impl Daemon {
    fn endpoint_key(&self, container_id: &str, ifname: &str) -> String {
        self.config()
            .keys
            .endpoint(self.host_id(), container_id, ifname)
    }

    /// This host's endpoint records as the store holds them (records that
    /// do not parse are skipped with a warning).
    pub async fn endpoint_records(&self) -> Result<Vec<EndpointRecord>, ApiError> {
        let prefix = self.config().keys.host_endpoints(self.host_id());
        let range = self
            .note_store(self.store().get_prefix(&prefix).await)
            .map_err(store_error)?;
        let mut out = Vec::with_capacity(range.kvs.len());
        for kv in range.kvs {
            match serde_json::from_slice::<EndpointRecord>(&kv.value) {
                Ok(ep) => out.push(ep),
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping a corrupt endpoint record")
                }
            }
        }
        Ok(out)
    }

    /// This host's endpoints, as the API answers them.
    pub async fn own_endpoints(&self) -> Result<Vec<Endpoint>, ApiError> {
        Ok(self
            .endpoint_records()
            .await?
            .into_iter()
            .map(Endpoint::from)
            .collect())
    }

    pub async fn get_endpoint(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Endpoint, ApiError> {
        let key = self.endpoint_key(container_id, ifname);
        let kv = self
            .note_store(self.store().get(&key).await)
            .map_err(store_error)?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::NotFound,
                    format!(
                        "no endpoint for container {container_id} interface {ifname} on host {}",
                        self.host_id()
                    ),
                )
            })?;
        serde_json::from_slice::<EndpointRecord>(&kv.value)
            .map(Endpoint::from)
            .map_err(|e| {
                ApiError::new(
                    ErrorKind::Internal,
                    format!("endpoint record {key} is corrupt: {e}"),
                )
            })
    }

    /// Allocates an address and records the endpoint. A retried add for the
    /// same container and interface gets the same endpoint back. Applied in
    /// a batch with the adds and deletes that come at the same time
    /// (`local.rs`); answered once the endpoint's port is enforced.
    pub async fn add_endpoint(self: &Arc<Self>, req: AddEndpoint) -> Result<Endpoint, ApiError> {
        let service_mode = req.service_mode;
        let new = validate_add(&req)?;
        let record = match self.submit(Change::Add(new)).await? {
            Answer::Added(record) => *record,
            Answer::Deleted(_) => {
                return Err(ApiError::new(
                    ErrorKind::Internal,
                    "the endpoint batch answered an add as a delete",
                ))
            }
        };
        // The first container of a service creates its record and VIP
        // (known services: a map lookup); never fails the add.
        self.services().ensure_for(&record, service_mode).await;
        Ok(Endpoint::from(record))
    }

    /// Removes the endpoint: record, published ports, conntrack entries and
    /// address. Deleting an unknown endpoint succeeds. Applied in a batch
    /// with the adds and deletes that come at the same time (`local.rs`).
    pub async fn delete_endpoint(
        self: &Arc<Self>,
        container_id: &str,
        ifname: &str,
    ) -> Result<Deleted, ApiError> {
        let container_id = ContainerId::new(container_id).map_err(name_error("container_id"))?;
        let ifname = IfName::new(ifname).map_err(name_error("ifname"))?;
        match self.submit(Change::Del((container_id, ifname))).await? {
            Answer::Deleted(released) => Ok(Deleted { released }),
            Answer::Added(_) => Err(ApiError::new(
                ErrorKind::Internal,
                "the endpoint batch answered a delete as an add",
            )),
        }
    }

    /// CNI GC: frees every endpoint and address of this host whose
    /// attachment is not in `valid`.
    pub async fn gc(&self, req: GcRequest) -> Result<GcResult, ApiError> {
        let valid: HashSet<Attachment> = req.valid.into_iter().collect();
        let _guard = self.lock.lock().await;
        let mut set = self.endpoint_set().await?;
        let gone: Vec<EndpointRecord> = set
            .values()
            .filter(|e| {
                !valid.contains(&Attachment {
                    container_id: e.container_id.to_string(),
                    ifname: e.ifname.to_string(),
                })
            })
            .cloned()
            .collect();
        for ep in &gone {
            let key = self.endpoint_key(&ep.container_id, &ep.ifname);
            if let Err(e) = self.note_store(self.store().delete(&key).await) {
                self.keep_endpoints(set, false);
                return Err(store_error(e));
            }
            set.remove(&(ep.container_id.clone(), ep.ifname.clone()));
        }
        self.keep_endpoints(set.clone(), true);
        let rest: Vec<EndpointRecord> = set.into_values().collect();
        if gone.iter().any(|e| !e.port_mappings.is_empty()) {
            self.apply_nat(&rest).await.map_err(|e| {
                ApiError::new(
                    ErrorKind::Internal,
                    format!("updating published ports failed: {e:#}"),
                )
            })?;
        }
        if !gone.is_empty() {
            // The ports of `gone` leave the anti-spoofing table.
            if let Err(e) = self.enforce_local(rest).await {
                tracing::warn!(error = %format!("{e:#}"), "removing deleted endpoints from weft's nf_tables rules failed; the resync retries");
            }
        }
        let live: HashSet<Owner> = valid
            .iter()
            .map(|a| Owner::new(&a.container_id, &a.ifname))
            .collect();
        let freed = self
            .ipam
            .gc(self.block(), &live)
            .await
            .map_err(ipam_error)?;
        if !freed.is_empty() {
            self.endpoints
                .flush_conntrack(freed.iter().map(|a| a.addr).collect());
        }
        tracing::info!(
            endpoints = gone.len(),
            addresses = freed.len(),
            "garbage collected"
        );
        Ok(GcResult {
            released: gone.into_iter().map(Endpoint::from).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use weft_api::{PortMapping, Protocol};

    use super::*;

    fn add(ports: Vec<PortMapping>) -> AddEndpoint {
        AddEndpoint {
            container_id: "abc".into(),
            ifname: "eth0".into(),
            netns: String::new(),
            name: Some("web-1".into()),
            service: Some("web".into()),
            stack: Some("shop".into()),
            aliases: vec![],
            port_mappings: ports,
            service_mode: None,
        }
    }

    fn pm(host: u16, ctr: u16, protocol: Protocol) -> PortMapping {
        PortMapping {
            host_port: host,
            container_port: ctr,
            protocol,
            host_ip: None,
        }
    }

    fn on(ip: [u8; 4], m: PortMapping) -> PortMapping {
        PortMapping {
            host_ip: Some(Ipv4Addr::from(ip)),
            ..m
        }
    }

    fn record(id: &str, ports: Vec<PortMapping>) -> EndpointRecord {
        let mut v = serde_json::json!({
            "container_id": id, "ifname": "eth0", "netns": "", "host_id": "h0",
            "address": "10.42.0.2/24", "gateway": "10.42.0.1", "mtu": 1420,
            "bridge": "weft0", "name": "db",
            "dns": {"nameservers": [], "domain": "weft.internal", "search": []},
            "created_at_ms": 0
        });
        v["port_mappings"] = serde_json::to_value(ports).unwrap();
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn validation_names_the_bad_field() {
        let ok = validate_add(&add(vec![pm(8080, 80, Protocol::Tcp)])).unwrap();
        assert_eq!(ok.container_id, "abc");
        assert_eq!(ok.service.as_deref(), Some("web"));
        let mut r = add(vec![]);
        r.container_id = "../x".into();
        let e = validate_add(&r).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        assert!(e.message.contains("container id"), "{}", e.message);
        assert!(
            e.message.contains("a letter or digit first"),
            "{}",
            e.message
        );
        let mut r = add(vec![]);
        r.ifname = "eth0/x".into();
        assert!(validate_add(&r)
            .unwrap_err()
            .message
            .contains("interface name"));
        let mut r = add(vec![]);
        r.service = Some("we b".into());
        assert!(validate_add(&r).unwrap_err().message.contains("service"));
        let mut r = add(vec![]);
        r.aliases = vec!["ok".into(), "not ok".into()];
        assert!(validate_add(&r).unwrap_err().message.contains("alias"));
        let e = validate_add(&add(vec![pm(0, 80, Protocol::Tcp)])).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        let e = validate_add(&add(vec![
            pm(80, 80, Protocol::Tcp),
            pm(80, 81, Protocol::Tcp),
        ]))
        .unwrap_err();
        assert!(e.message.contains("mapped twice"), "{}", e.message);
        validate_add(&add(vec![
            pm(80, 80, Protocol::Tcp),
            pm(80, 80, Protocol::Udp),
        ]))
        .unwrap();
        // Within one request, the same rule as across endpoints: 0.0.0.0
        // overlaps a specific address, two specific addresses do not.
        let e = validate_add(&add(vec![
            on([0, 0, 0, 0], pm(80, 80, Protocol::Tcp)),
            on([10, 0, 0, 1], pm(80, 81, Protocol::Tcp)),
        ]))
        .unwrap_err();
        assert!(e.message.contains("mapped twice"), "{}", e.message);
        validate_add(&add(vec![
            on([10, 0, 0, 1], pm(80, 80, Protocol::Tcp)),
            on([10, 0, 0, 2], pm(80, 81, Protocol::Tcp)),
        ]))
        .unwrap();
    }

    /// The bug of the issue: the endpoint check let `0.0.0.0:8080` and
    /// `10.0.0.1:8080` through while NAT refused them, so a direct API
    /// client got a 500. Now the one rule refuses it up front as a 400.
    #[test]
    fn a_0_0_0_0_port_conflicts_with_a_specific_address_as_a_400() {
        let existing = [record(
            "db1",
            vec![on([0, 0, 0, 0], pm(8080, 80, Protocol::Tcp))],
        )];
        let wanted = [on([10, 0, 0, 1], pm(8080, 8080, Protocol::Tcp))];
        let e = check_port_conflicts(&wanted, &existing).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        assert_eq!(e.kind.http_status(), 400);
        assert!(
            e.message
                .contains("10.0.0.1:8080/tcp is already published by container db1 (db)"),
            "{}",
            e.message
        );
        // The body the API sends.
        let body = serde_json::to_value(&e).unwrap();
        assert_eq!(body["kind"], "invalid_request");
        assert!(body["message"].as_str().unwrap().contains("db1"));
        // And the other way round.
        let existing = [record(
            "db2",
            vec![on([10, 0, 0, 1], pm(8080, 80, Protocol::Tcp))],
        )];
        let wanted = [on([0, 0, 0, 0], pm(8080, 80, Protocol::Tcp))];
        assert_eq!(
            check_port_conflicts(&wanted, &existing).unwrap_err().kind,
            ErrorKind::InvalidRequest
        );
        // Two specific addresses, another protocol or port: no conflict.
        let wanted = [
            on([10, 0, 0, 2], pm(8080, 80, Protocol::Tcp)),
            pm(8080, 80, Protocol::Udp),
            pm(8081, 80, Protocol::Tcp),
        ];
        check_port_conflicts(&wanted, &existing).unwrap();
    }

    /// NAT agrees: what the endpoint check lets through, the NAT spec
    /// accepts, and what NAT would refuse, the endpoint check refuses.
    #[test]
    fn the_endpoint_check_and_nat_use_the_same_rule() {
        use crate::nat::{NatSpec, PublishedPort};
        let cases = [
            (None, Some([10, 0, 0, 1])),
            (Some([0, 0, 0, 0]), Some([10, 0, 0, 1])),
            (Some([10, 0, 0, 1]), Some([10, 0, 0, 2])),
            (Some([10, 0, 0, 1]), Some([10, 0, 0, 1])),
        ];
        for (a, b) in cases {
            let ma = PortMapping {
                host_ip: a.map(Ipv4Addr::from),
                ..pm(8080, 80, Protocol::Tcp)
            };
            let mb = PortMapping {
                host_ip: b.map(Ipv4Addr::from),
                ..pm(8080, 81, Protocol::Tcp)
            };
            let endpoint_ok =
                check_port_conflicts(std::slice::from_ref(&mb), &[record("x", vec![ma.clone()])])
                    .is_ok();
            let spec = NatSpec {
                cluster_range: "10.42.0.0/16".parse().unwrap(),
                block: "10.42.0.0/24".parse().unwrap(),
                bridge: "weft0".into(),
                dns_addr: weft_model::DNS_ADDR,
                service_range: weft_model::DEFAULT_SERVICE_RANGE,
                ports: vec![
                    PublishedPort {
                        container: Ipv4Addr::new(10, 42, 0, 2),
                        mapping: ma,
                    },
                    PublishedPort {
                        container: Ipv4Addr::new(10, 42, 0, 3),
                        mapping: mb,
                    },
                ],
            };
            assert_eq!(spec.validate().is_ok(), endpoint_ok, "{a:?} {b:?}");
        }
    }

    #[test]
    fn error_kinds_map_from_ipam() {
        let full = IpamError::BlockFull {
            block: "10.42.0.0/24".parse().unwrap(),
            capacity: 253,
        };
        assert_eq!(ipam_error(full).kind, ErrorKind::PoolExhausted);
        let down = IpamError::Store(StoreError::Unavailable {
            store: "etcd:x".into(),
            detail: "refused".into(),
        });
        assert_eq!(ipam_error(down).kind, ErrorKind::TryAgainLater);
        let bad = IpamError::from(ContainerId::new("-x").unwrap_err());
        assert_eq!(ipam_error(bad).kind, ErrorKind::InvalidRequest);
    }

    #[test]
    fn dns_search_list() {
        let d = dns_config(
            weft_model::DNS_ADDR,
            "weft.internal",
            Some("shop"),
            Some("web"),
        );
        assert_eq!(
            d.search,
            [
                "shop.weft.internal",
                "web.shop.weft.internal",
                "weft.internal"
            ]
        );
        assert_eq!(d.nameservers, [weft_model::DNS_ADDR]);
        let d = dns_config(weft_model::DNS_ADDR, "weft.internal", None, Some("web"));
        assert_eq!(d.search, ["weft.internal"]);
    }
}
