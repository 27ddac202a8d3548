//! The CNI result, rendered in the shape of each spec version.
//!
//! | version | differences |
//! |---|---|
//! | 0.3.0, 0.3.1, 0.4.0 | `ips[].version` (`"4"`/`"6"`) is required |
//! | 1.0.0 | `ips[].version` is gone |
//! | 1.1.0 | `interfaces[].mtu`, `socketPath`, `pciID`; `routes[].mtu`, `advmss`, `priority`, `table`, `scope` may appear |
//!
//! Common to all: `interfaces` (`name`, `mac`, `sandbox` for interfaces in
//! the container), `ips` (`address` in CIDR form, `gateway`, `interface` as
//! an index into `interfaces`), `routes` (`dst`, `gw`), `dns`
//! (`nameservers`, `domain`, `search`, `options`). Empty lists and fields are
//! left out, like the reference Go types do.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::version::CniVersion;

/// Interface fields that exist only from 1.1.0 on and that weft does not
/// set itself (kept when passed through from a `prevResult`).
const IFACE_1_1_FIELDS: [&str; 2] = ["socketPath", "pciID"];
const ROUTE_1_1_FIELDS: [&str; 5] = ["mtu", "advmss", "priority", "table", "scope"];

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Rendered only in 1.1.0 results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Other fields (`socketPath`, `pciID`) of a passed-through interface.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// 1.1.0 route fields (`mtu`, `advmss`, `priority`, `table`, `scope`)
    /// of a passed-through route.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_empty()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

impl From<&weft_api::DnsConfig> for Dns {
    fn from(d: &weft_api::DnsConfig) -> Self {
        Dns {
            nameservers: d.nameservers.iter().map(|n| n.to_string()).collect(),
            domain: d.domain.clone(),
            search: d.search.clone(),
            options: d.options.clone(),
        }
    }
}

/// A version-independent CNI result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

/// How a result looks on the wire (any version, for decoding).
#[derive(Deserialize)]
struct WireResult {
    #[serde(default)]
    interfaces: Option<Vec<Interface>>,
    #[serde(default)]
    ips: Option<Vec<WireIp>>,
    #[serde(default)]
    routes: Option<Vec<Route>>,
    #[serde(default)]
    dns: Option<Dns>,
}

#[derive(Deserialize)]
struct WireIp {
    /// 0.3/0.4 only; checked against the address when present.
    #[serde(default)]
    version: Option<String>,
    address: IpNetwork,
    #[serde(default)]
    gateway: Option<IpAddr>,
    #[serde(default)]
    interface: Option<usize>,
}

#[derive(Serialize)]
struct OutResult<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    interfaces: Vec<Interface>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ips: Vec<OutIp>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    routes: Vec<Route>,
    #[serde(skip_serializing_if = "Dns::is_empty")]
    dns: &'a Dns,
}

#[derive(Serialize)]
struct OutIp {
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'static str>,
    address: IpNetwork,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interface: Option<usize>,
}

impl CniResult {
    /// The result as JSON in the shape of `version`.
    pub fn to_value(&self, version: CniVersion) -> Value {
        serde_json::to_value(self.wire(version)).unwrap_or(Value::Null)
    }

    /// The result as pretty JSON text in the shape of `version` (fields in
    /// the spec's order).
    pub fn to_json(&self, version: CniVersion) -> String {
        serde_json::to_string_pretty(&self.wire(version)).unwrap_or_default()
    }

    fn wire(&self, version: CniVersion) -> OutResult<'_> {
        let v11 = version.is_1_1();
        let interfaces = self
            .interfaces
            .iter()
            .map(|i| {
                let mut i = i.clone();
                if !v11 {
                    i.mtu = None;
                    i.extra
                        .retain(|k, _| !IFACE_1_1_FIELDS.contains(&k.as_str()));
                }
                i
            })
            .collect();
        let routes = self
            .routes
            .iter()
            .map(|r| {
                let mut r = r.clone();
                if !v11 {
                    r.extra
                        .retain(|k, _| !ROUTE_1_1_FIELDS.contains(&k.as_str()));
                }
                r
            })
            .collect();
        let ips = self
            .ips
            .iter()
            .map(|ip| OutIp {
                version: version.has_ip_version_field().then_some(match ip.address {
                    IpNetwork::V4(_) => "4",
                    IpNetwork::V6(_) => "6",
                }),
                address: ip.address,
                gateway: ip.gateway,
                interface: ip.interface,
            })
            .collect();
        OutResult {
            cni_version: version.as_str(),
            interfaces,
            ips,
            routes,
            dns: &self.dns,
        }
    }

    /// Decodes a result of any supported version (a `prevResult`).
    pub fn from_value(value: &Value) -> Result<CniResult, String> {
        let wire: WireResult = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        let mut ips = Vec::new();
        for ip in wire.ips.unwrap_or_default() {
            if let Some(v) = &ip.version {
                let expected = if ip.address.is_ipv4() { "4" } else { "6" };
                if v != expected {
                    return Err(format!(
                        "ips: address {} has version {v:?}, expected {expected:?}",
                        ip.address
                    ));
                }
            }
            ips.push(IpConfig {
                address: ip.address,
                gateway: ip.gateway,
                interface: ip.interface,
            });
        }
        let interfaces = wire.interfaces.unwrap_or_default();
        for ip in &ips {
            if let Some(i) = ip.interface {
                if i >= interfaces.len() {
                    return Err(format!(
                        "ips: address {} names interface {i}, but there are only {}",
                        ip.address,
                        interfaces.len()
                    ));
                }
            }
        }
        Ok(CniResult {
            interfaces,
            ips,
            routes: wire.routes.unwrap_or_default(),
            dns: wire.dns.unwrap_or_default(),
        })
    }

    /// Appends `other` (this plugin's own result) to a previous result:
    /// interfaces, addresses (re-indexed) and routes are added; `other`'s
    /// DNS settings replace the previous ones when it has any.
    pub fn append(&mut self, other: CniResult) {
        let base = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + base);
            ip
        }));
        self.routes.extend(other.routes);
        if !other.dns.is_empty() {
            self.dns = other.dns;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use serde_json::json;

    use super::*;

    fn sample() -> CniResult {
        let gw = IpAddr::V4(Ipv4Addr::new(10, 42, 0, 1));
        CniResult {
            interfaces: vec![
                Interface {
                    name: "wf0123456789a".into(),
                    mac: Some("aa:bb:cc:dd:ee:01".into()),
                    mtu: Some(1440),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("aa:bb:cc:dd:ee:02".into()),
                    mtu: Some(1440),
                    sandbox: Some("/var/run/netns/c1".into()),
                    ..Default::default()
                },
            ],
            ips: vec![IpConfig {
                address: "10.42.0.2/24".parse().unwrap(),
                gateway: Some(gw),
                interface: Some(1),
            }],
            routes: vec![
                Route {
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gw: Some(gw),
                    extra: Map::new(),
                },
                Route {
                    dst: "169.254.169.250/32".parse().unwrap(),
                    gw: Some(gw),
                    extra: Map::new(),
                },
            ],
            dns: Dns {
                nameservers: vec!["169.254.169.250".into()],
                domain: "weft.local".into(),
                search: vec!["shop.weft.local".into(), "weft.local".into()],
                options: vec!["ndots:2".into()],
            },
        }
    }

    fn expected(version: &str, ip_version: bool, mtu: bool) -> Value {
        let mut host = json!({"name": "wf0123456789a", "mac": "aa:bb:cc:dd:ee:01"});
        let mut cont =
            json!({"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/c1"});
        if mtu {
            host["mtu"] = json!(1440);
            cont["mtu"] = json!(1440);
        }
        let mut ip = json!({"address": "10.42.0.2/24", "gateway": "10.42.0.1", "interface": 1});
        if ip_version {
            ip["version"] = json!("4");
        }
        json!({
            "cniVersion": version,
            "interfaces": [host, cont],
            "ips": [ip],
            "routes": [
                {"dst": "0.0.0.0/0", "gw": "10.42.0.1"},
                {"dst": "169.254.169.250/32", "gw": "10.42.0.1"}
            ],
            "dns": {
                "nameservers": ["169.254.169.250"],
                "domain": "weft.local",
                "search": ["shop.weft.local", "weft.local"],
                "options": ["ndots:2"]
            }
        })
    }

    #[test]
    fn renders_each_version() {
        let r = sample();
        assert_eq!(
            r.to_value(CniVersion::V0_3_0),
            expected("0.3.0", true, false)
        );
        assert_eq!(
            r.to_value(CniVersion::V0_3_1),
            expected("0.3.1", true, false)
        );
        assert_eq!(
            r.to_value(CniVersion::V0_4_0),
            expected("0.4.0", true, false)
        );
        assert_eq!(
            r.to_value(CniVersion::V1_0_0),
            expected("1.0.0", false, false)
        );
        assert_eq!(
            r.to_value(CniVersion::V1_1_0),
            expected("1.1.0", false, true)
        );
    }

    #[test]
    fn empty_parts_are_left_out() {
        let r = CniResult {
            ips: vec![IpConfig {
                address: "10.0.0.5/32".parse().unwrap(),
                gateway: None,
                interface: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            r.to_value(CniVersion::V1_0_0),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.5/32"}]})
        );
    }

    #[test]
    fn decodes_every_version_and_round_trips() {
        for v in CniVersion::ALL {
            let r = sample();
            let decoded = CniResult::from_value(&r.to_value(v)).unwrap();
            let mut want = r.clone();
            if !v.is_1_1() {
                for i in &mut want.interfaces {
                    i.mtu = None;
                }
            }
            assert_eq!(decoded, want, "{v}");
        }
    }

    #[test]
    fn decodes_the_spec_example_prev_result() {
        let prev = json!({
            "ips": [{"version": "4", "address": "10.0.0.5/32", "interface": 2}],
            "interfaces": [
                {"name": "cni0", "mac": "00:11:22:33:44:55"},
                {"name": "veth3243", "mac": "55:44:33:22:11:11"},
                {"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/blue"}
            ],
            "dns": {"nameservers": ["10.1.0.1"]}
        });
        let r = CniResult::from_value(&prev).unwrap();
        assert_eq!(r.interfaces.len(), 3);
        assert_eq!(r.ips[0].interface, Some(2));
        assert_eq!(r.dns.nameservers, vec!["10.1.0.1".to_string()]);
        // Rendered as 0.4.0 again it is the same document plus cniVersion.
        let mut want = prev.clone();
        want["cniVersion"] = json!("0.4.0");
        assert_eq!(r.to_value(CniVersion::V0_4_0), want);
    }

    #[test]
    fn rejects_inconsistent_results() {
        let bad_version = json!({"ips": [{"version": "6", "address": "10.0.0.5/32"}]});
        assert!(CniResult::from_value(&bad_version).is_err());
        let bad_index =
            json!({"interfaces": [], "ips": [{"address": "10.0.0.5/32", "interface": 0}]});
        assert!(CniResult::from_value(&bad_index).is_err());
        assert!(CniResult::from_value(&json!({"ips": [{"address": "nope"}]})).is_err());
        assert!(CniResult::from_value(&json!([1, 2])).is_err());
    }

    #[test]
    fn keeps_1_1_fields_only_in_1_1() {
        let prev = json!({
            "interfaces": [{"name": "net1", "socketPath": "/run/x.sock", "mtu": 9000}],
            "routes": [{"dst": "10.9.0.0/16", "gw": "10.9.0.1", "table": 100, "mtu": 1400}]
        });
        let r = CniResult::from_value(&prev).unwrap();
        let v11 = r.to_value(CniVersion::V1_1_0);
        assert_eq!(v11["interfaces"][0]["socketPath"], "/run/x.sock");
        assert_eq!(v11["interfaces"][0]["mtu"], 9000);
        assert_eq!(v11["routes"][0]["table"], 100);
        let v10 = r.to_value(CniVersion::V1_0_0);
        assert_eq!(v10["interfaces"][0], json!({"name": "net1"}));
        assert_eq!(
            v10["routes"][0],
            json!({"dst": "10.9.0.0/16", "gw": "10.9.0.1"})
        );
    }

    #[test]
    fn appends_to_a_previous_result() {
        let mut prev = CniResult::from_value(&json!({
            "interfaces": [{"name": "lo0"}],
            "ips": [{"address": "192.168.5.5/24", "interface": 0}],
            "dns": {"nameservers": ["8.8.8.8"]}
        }))
        .unwrap();
        prev.append(sample());
        assert_eq!(prev.interfaces.len(), 3);
        assert_eq!(prev.ips[0].interface, Some(0));
        assert_eq!(prev.ips[1].interface, Some(2));
        assert_eq!(prev.routes.len(), 2);
        assert_eq!(prev.dns.nameservers, vec!["169.254.169.250".to_string()]);
    }
}
