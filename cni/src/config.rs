//! The network configuration the runtime streams on stdin.
//!
//! ```json
//! {
//!   "cniVersion": "1.0.0",
//!   "name": "weft",
//!   "type": "weft",
//!   "socket": "/run/weft/netd.sock",
//!   "capabilities": {"portMappings": true, "aliases": true},
//!   "runtimeConfig": {
//!     "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}],
//!     "aliases": {"weft": ["db", "db-primary"]}
//!   },
//!   "prevResult": { ... },
//!   "cni.dev/valid-attachments": [{"containerID": "...", "ifname": "eth0"}]
//! }
//! ```
//!
//! Decoding happens in three steps, each with its own CNI error code:
//! JSON that does not decode (or has fields of the wrong type) is code 6;
//! an unsupported `cniVersion` is code 1; values that decode but make no
//! sense are code 7. Unknown fields are ignored.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde::Deserialize;
use serde_json::Value;
use weft_api::{Attachment, PortMapping, Protocol, DEFAULT_SOCKET};
use weft_model::DnsName;

use crate::error::{code, CniError};
use crate::result::CniResult;
use crate::version::{CniVersion, SUPPORTED_VERSIONS};

/// A decoded, validated network configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub version: CniVersion,
    pub name: String,
    /// The `type` field (`weft`), informational.
    pub plugin_type: String,
    /// netd's control socket.
    pub socket: String,
    pub runtime: RuntimeConfig,
    /// The previous plugin's result (ADD in a chain) or the result of the
    /// ADD being checked or deleted (CHECK, DEL).
    pub prev_result: Option<CniResult>,
    /// GC: the attachments still in use (`cni.dev/valid-attachments`);
    /// `None` when the field is absent.
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// The capability arguments weft uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    pub port_mappings: Vec<PortMapping>,
    pub aliases: Vec<DnsName>,
}

#[derive(Deserialize)]
struct RawConf {
    #[serde(rename = "cniVersion", default)]
    cni_version: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(rename = "type", default)]
    plugin_type: Option<String>,
    #[serde(default)]
    socket: Option<String>,
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: Option<RawRuntimeConfig>,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Option<Vec<RawAttachment>>,
}

#[derive(Deserialize, Default)]
struct RawRuntimeConfig {
    #[serde(rename = "portMappings", default)]
    port_mappings: Option<Vec<RawPortMapping>>,
    #[serde(default)]
    aliases: Option<RawAliases>,
}

#[derive(Deserialize)]
struct RawPortMapping {
    #[serde(rename = "hostPort")]
    host_port: u16,
    #[serde(rename = "containerPort")]
    container_port: u16,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(rename = "hostIP", default)]
    host_ip: Option<String>,
}

/// podman/netavark pass aliases per network (`{"net": ["a", "b"]}`); a
/// plain list is accepted as well.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawAliases {
    List(Vec<String>),
    PerNetwork(BTreeMap<String, Vec<String>>),
}

#[derive(Deserialize)]
struct RawAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

fn decode_err(e: impl std::fmt::Display) -> CniError {
    CniError::new(
        code::DECODE,
        format!("decoding the network configuration: {e}"),
    )
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

/// The unsupported-version error, listing what is supported.
pub fn unsupported_version(v: &str) -> CniError {
    CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!(
            "CNI version {v:?} is not supported; supported versions: {}",
            SUPPORTED_VERSIONS.join(", ")
        ),
    )
}

/// Reads just `cniVersion`, leniently: for VERSION, and for the
/// `cniVersion` of error answers. `None` if the input is no JSON object or
/// has no string `cniVersion`.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_string)
}

/// Checks a network name as the spec defines it: an alphanumeric first
/// character, then alphanumerics, `_`, `.` and `-`.
pub fn valid_network_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl NetConf {
    /// Decodes and validates the configuration.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        if stdin.iter().all(u8::is_ascii_whitespace) {
            return Err(decode_err(
                "stdin is empty (expected the JSON network configuration)",
            ));
        }
        let value: Value = serde_json::from_slice(stdin).map_err(decode_err)?;
        if !value.is_object() {
            return Err(decode_err("expected a JSON object"));
        }
        let raw: RawConf = serde_json::from_value(value).map_err(decode_err)?;

        // A configuration without cniVersion is 0.1.0 by libcni's rules,
        // which is not supported.
        let version_str = raw.cni_version.unwrap_or_else(|| "0.1.0".into());
        let version =
            CniVersion::parse(&version_str).ok_or_else(|| unsupported_version(&version_str))?;

        let name = raw.name.unwrap_or_default();
        if name.is_empty() {
            return Err(invalid("the network configuration has no \"name\""));
        }
        if !valid_network_name(&name) {
            return Err(invalid(format!(
                "network name {name:?} is invalid (must start with a letter or digit, \
                 then letters, digits, '_', '.', '-')"
            )));
        }
        let socket = raw.socket.unwrap_or_else(|| DEFAULT_SOCKET.to_string());
        if socket.is_empty() {
            return Err(invalid("\"socket\" is empty (netd's control socket path)"));
        }

        let runtime = parse_runtime(raw.runtime_config.unwrap_or_default(), &name)?;

        let prev_result =
            match raw.prev_result {
                None | Some(Value::Null) => None,
                Some(v) => Some(CniResult::from_value(&v).map_err(|e| {
                    CniError::new(code::DECODE, format!("decoding prevResult: {e}"))
                })?),
            };

        let valid_attachments = raw.valid_attachments.map(|list| {
            list.into_iter()
                .map(|a| Attachment {
                    container_id: a.container_id,
                    ifname: a.ifname,
                })
                .collect()
        });

        Ok(NetConf {
            version,
            name,
            plugin_type: raw.plugin_type.unwrap_or_default(),
            socket,
            runtime,
            prev_result,
            valid_attachments,
        })
    }
}

fn parse_runtime(raw: RawRuntimeConfig, network: &str) -> Result<RuntimeConfig, CniError> {
    let mut port_mappings = Vec::new();
    for (i, m) in raw
        .port_mappings
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let field = format!("runtimeConfig.portMappings[{i}]");
        if m.host_port == 0 || m.container_port == 0 {
            return Err(invalid(format!(
                "{field}: hostPort and containerPort must be 1-65535"
            )));
        }
        let protocol = match m
            .protocol
            .as_deref()
            .unwrap_or("tcp")
            .to_ascii_lowercase()
            .as_str()
        {
            "" | "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return Err(invalid(format!(
                    "{field}: protocol {other:?} is not supported (tcp or udp)"
                )))
            }
        };
        let host_ip = match m.host_ip.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => match s.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) if a == Ipv4Addr::UNSPECIFIED => None,
                Ok(IpAddr::V4(a)) => Some(a),
                Ok(IpAddr::V6(_)) => {
                    return Err(invalid(format!(
                        "{field}: hostIP {s} is IPv6; weft publishes ports on IPv4 only"
                    )))
                }
                Err(_) => {
                    return Err(invalid(format!(
                        "{field}: hostIP {s:?} is not an IP address"
                    )))
                }
            },
        };
        port_mappings.push(PortMapping {
            host_port: m.host_port,
            container_port: m.container_port,
            protocol,
            host_ip,
        });
    }

    let aliases = match raw.aliases {
        None => Vec::new(),
        Some(RawAliases::List(list)) => list,
        Some(RawAliases::PerNetwork(mut map)) => map.remove(network).unwrap_or_default(),
    };
    let mut unique = Vec::with_capacity(aliases.len());
    for a in aliases {
        let a = DnsName::new(a).map_err(|e| {
            invalid(format!(
                "runtimeConfig.aliases: {:?} is not a valid DNS name ({})",
                e.value, e.allowed
            ))
        })?;
        if !unique.contains(&a) {
            unique.push(a);
        }
    }
    Ok(RuntimeConfig {
        port_mappings,
        aliases: unique,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: Value) -> Result<NetConf, CniError> {
        NetConf::parse(v.to_string().as_bytes())
    }

    #[test]
    fn minimal_config_for_each_version() {
        for v in SUPPORTED_VERSIONS {
            let c = parse(json!({"cniVersion": v, "name": "weft", "type": "weft"})).unwrap();
            assert_eq!(c.version.as_str(), v);
            assert_eq!(c.name, "weft");
            assert_eq!(c.plugin_type, "weft");
            assert_eq!(c.socket, DEFAULT_SOCKET);
            assert_eq!(c.runtime, RuntimeConfig::default());
            assert_eq!(c.prev_result, None);
            assert_eq!(c.valid_attachments, None);
        }
    }

    #[test]
    fn full_config() {
        let c = parse(json!({
            "cniVersion": "1.1.0",
            "name": "weft",
            "type": "weft",
            "socket": "/tmp/netd.sock",
            "capabilities": {"portMappings": true, "aliases": true},
            "ipam": {},
            "args": {"labels": {"x": "y"}},
            "runtimeConfig": {
                "portMappings": [
                    {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
                    {"hostPort": 5353, "containerPort": 53, "protocol": "UDP", "hostIP": "192.168.1.5"},
                    {"hostPort": 9000, "containerPort": 9000, "hostIP": "0.0.0.0"}
                ],
                "aliases": {"weft": ["db", "db-primary", "db"], "other": ["x"]},
                "ips": ["10.0.0.1"]
            },
            "prevResult": {
                "cniVersion": "1.1.0",
                "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
                "ips": [{"address": "10.42.0.2/24", "gateway": "10.42.0.1", "interface": 0}]
            },
            "cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}]
        }))
        .unwrap();
        assert_eq!(c.socket, "/tmp/netd.sock");
        assert_eq!(
            c.runtime.port_mappings,
            vec![
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: Protocol::Tcp,
                    host_ip: None
                },
                PortMapping {
                    host_port: 5353,
                    container_port: 53,
                    protocol: Protocol::Udp,
                    host_ip: Some(Ipv4Addr::new(192, 168, 1, 5))
                },
                PortMapping {
                    host_port: 9000,
                    container_port: 9000,
                    protocol: Protocol::Tcp,
                    host_ip: None
                },
            ]
        );
        assert_eq!(
            c.runtime.aliases,
            vec!["db".to_string(), "db-primary".to_string()]
        );
        let prev = c.prev_result.unwrap();
        assert_eq!(prev.interfaces[0].name, "eth0");
        assert_eq!(prev.ips[0].address.to_string(), "10.42.0.2/24");
        assert_eq!(
            c.valid_attachments,
            Some(vec![Attachment {
                container_id: "abc".into(),
                ifname: "eth0".into()
            }])
        );
    }

    #[test]
    fn aliases_as_a_list_or_for_another_network() {
        let c = parse(json!({
            "cniVersion": "1.0.0", "name": "weft",
            "runtimeConfig": {"aliases": ["a", "b"]}
        }))
        .unwrap();
        assert_eq!(c.runtime.aliases, vec!["a".to_string(), "b".to_string()]);
        let c = parse(json!({
            "cniVersion": "1.0.0", "name": "weft",
            "runtimeConfig": {"aliases": {"podman": ["a"]}}
        }))
        .unwrap();
        assert!(c.runtime.aliases.is_empty());
        let e = parse(json!({
            "cniVersion": "1.0.0", "name": "weft",
            "runtimeConfig": {"aliases": ["bad alias"]}
        }))
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
    }

    #[test]
    fn old_versions_with_prev_result() {
        let c = parse(json!({
            "cniVersion": "0.4.0", "name": "weft",
            "prevResult": {
                "cniVersion": "0.4.0",
                "interfaces": [{"name": "eth0", "sandbox": "/x"}],
                "ips": [{"version": "4", "address": "10.42.0.2/24", "gateway": "10.42.0.1", "interface": 0}],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        }))
        .unwrap();
        let prev = c.prev_result.unwrap();
        assert_eq!(prev.routes[0].gw, None);
        assert_eq!(prev.ips[0].gateway.unwrap().to_string(), "10.42.0.1");
    }

    #[test]
    fn decode_errors_are_code_6() {
        for bad in [
            &b""[..],
            b"   ",
            b"{",
            b"[]",
            b"\"x\"",
            br#"{"cniVersion": 1}"#,
            br#"{"cniVersion": "1.0.0", "name": "w", "runtimeConfig": {"portMappings": [{"hostPort": 70000, "containerPort": 80}]}}"#,
            br#"{"cniVersion": "1.0.0", "name": "w", "runtimeConfig": {"portMappings": {}}}"#,
            br#"{"cniVersion": "1.0.0", "name": "w", "prevResult": {"ips": [{"address": "x"}]}}"#,
            br#"{"cniVersion": "1.1.0", "name": "w", "cni.dev/valid-attachments": [{"containerID": "a"}]}"#,
        ] {
            let e = NetConf::parse(bad).unwrap_err();
            assert_eq!(e.code, code::DECODE, "{} -> {e:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn unsupported_versions_are_code_1() {
        for v in [
            json!({"name": "w"}),
            json!({"cniVersion": "0.2.0", "name": "w"}),
            json!({"cniVersion": "2.0.0", "name": "w"}),
        ] {
            let e = parse(v).unwrap_err();
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
            assert!(
                e.msg.contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"),
                "{}",
                e.msg
            );
        }
    }

    #[test]
    fn invalid_values_are_code_7() {
        for bad in [
            json!({"cniVersion": "1.0.0"}),
            json!({"cniVersion": "1.0.0", "name": ""}),
            json!({"cniVersion": "1.0.0", "name": "-bad"}),
            json!({"cniVersion": "1.0.0", "name": "w", "socket": ""}),
            json!({"cniVersion": "1.0.0", "name": "w", "runtimeConfig": {"portMappings": [{"hostPort": 0, "containerPort": 80}]}}),
            json!({"cniVersion": "1.0.0", "name": "w", "runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80, "protocol": "sctp"}]}}),
            json!({"cniVersion": "1.0.0", "name": "w", "runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80, "hostIP": "::1"}]}}),
            json!({"cniVersion": "1.0.0", "name": "w", "runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80, "hostIP": "nope"}]}}),
        ] {
            let e = parse(bad.clone()).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{bad} -> {e:?}");
        }
    }

    #[test]
    fn peeks_the_version() {
        assert_eq!(
            peek_version(br#"{"cniVersion":"0.4.0"}"#).as_deref(),
            Some("0.4.0")
        );
        assert_eq!(peek_version(b"{}"), None);
        assert_eq!(peek_version(b"garbage"), None);
        assert_eq!(peek_version(b""), None);
    }

    #[test]
    fn network_names() {
        assert!(valid_network_name("weft"));
        assert!(valid_network_name("a.b_c-1"));
        assert!(!valid_network_name(""));
        assert!(!valid_network_name("_x"));
        assert!(!valid_network_name("a b"));
    }
}
