//! `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
//!
//! Known keys: `WEFT_NAME`, `WEFT_SERVICE`, `WEFT_STACK`, `WEFT_SERVICE_MODE`
//! (`vip` or `dnsrr`: the service's mode when its first container creates
//! its record) (weft's own),
//! `K8S_POD_NAME` (podman passes the container name there),
//! `K8S_POD_NAMESPACE`, `K8S_POD_INFRA_CONTAINER_ID`, `K8S_POD_UID` and
//! `IgnoreUnknown`. As in libcni, an unknown key is an error unless
//! `IgnoreUnknown` is `1`/`true` (any case).

use weft_model::{DnsName, Mode};

use crate::error::{code, CniError};

/// The parsed `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub weft_name: Option<String>,
    pub weft_service: Option<String>,
    pub weft_stack: Option<String>,
    pub weft_service_mode: Option<String>,
    pub k8s_pod_name: Option<String>,
    pub k8s_pod_namespace: Option<String>,
    pub ignore_unknown: bool,
    /// Keys that were not understood (kept only with `IgnoreUnknown`).
    pub unknown: Vec<String>,
}

/// What netd is told about the container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub name: Option<DnsName>,
    pub service: Option<DnsName>,
    pub stack: Option<DnsName>,
    /// `WEFT_SERVICE_MODE`.
    pub service_mode: Option<Mode>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_ENV, msg)
}

impl CniArgs {
    /// Parses `CNI_ARGS`. Empty segments (`a=b;;c=d`, a trailing `;`) are
    /// skipped; a segment without `=` is an error.
    pub fn parse(raw: &str) -> Result<CniArgs, CniError> {
        let mut args = CniArgs::default();
        let mut ignore_unknown = None;
        for pair in raw.split(';') {
            let pair = pair.trim();
            if pair.is_empty() {
                continue;
            }
            let Some((key, value)) = pair.split_once('=') else {
                return Err(invalid(format!(
                    "CNI_ARGS: invalid pair {pair:?} (expected KEY=VALUE)"
                )));
            };
            let value = (!value.is_empty()).then(|| value.to_string());
            match key {
                "WEFT_NAME" => args.weft_name = value,
                "WEFT_SERVICE" => args.weft_service = value,
                "WEFT_STACK" => args.weft_stack = value,
                "WEFT_SERVICE_MODE" => args.weft_service_mode = value,
                "K8S_POD_NAME" => args.k8s_pod_name = value,
                "K8S_POD_NAMESPACE" => args.k8s_pod_namespace = value,
                "K8S_POD_INFRA_CONTAINER_ID" | "K8S_POD_UID" => {}
                "IgnoreUnknown" => {
                    let v = value.unwrap_or_default().to_ascii_lowercase();
                    ignore_unknown = Some(match v.as_str() {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => {
                            return Err(invalid(format!(
                                "CNI_ARGS: IgnoreUnknown must be 1, 0, true or false, not {v:?}"
                            )))
                        }
                    });
                }
                other => args.unknown.push(other.to_string()),
            }
        }
        args.ignore_unknown = ignore_unknown.unwrap_or(false);
        if !args.unknown.is_empty() && !args.ignore_unknown {
            return Err(invalid(format!(
                "CNI_ARGS: unknown key(s) {} (known: WEFT_NAME, WEFT_SERVICE, WEFT_STACK, \
                 WEFT_SERVICE_MODE, K8S_POD_NAME, K8S_POD_NAMESPACE; set IgnoreUnknown=1 to ignore others)",
                args.unknown.join(", ")
            )));
        }
        Ok(args)
    }

    /// The container's name, service and stack for netd: `WEFT_NAME` else
    /// `K8S_POD_NAME`; `WEFT_SERVICE`; `WEFT_STACK` else `K8S_POD_NAMESPACE`;
    /// `WEFT_SERVICE_MODE`. A `WEFT_*` value that is no valid DNS name (or
    /// mode) is an error; a fallback
    /// that is not is dropped (a runtime's own naming must not fail the
    /// container).
    pub fn metadata(&self) -> Result<Metadata, CniError> {
        let explicit = |key: &str, v: &Option<String>| -> Result<Option<DnsName>, CniError> {
            v.as_deref()
                .map(|v| {
                    DnsName::new(v).map_err(|e| {
                        invalid(format!(
                            "CNI_ARGS: {key}={v:?} is not a valid DNS name ({})",
                            e.allowed
                        ))
                    })
                })
                .transpose()
        };
        let fallback = |v: &Option<String>| v.as_deref().and_then(|v| DnsName::new(v).ok());
        Ok(Metadata {
            name: explicit("WEFT_NAME", &self.weft_name)?.or_else(|| fallback(&self.k8s_pod_name)),
            service: explicit("WEFT_SERVICE", &self.weft_service)?,
            stack: explicit("WEFT_STACK", &self.weft_stack)?
                .or_else(|| fallback(&self.k8s_pod_namespace)),
            service_mode: self
                .weft_service_mode
                .as_deref()
                .map(|v| {
                    v.parse::<Mode>()
                        .map_err(|e| invalid(format!("CNI_ARGS: WEFT_SERVICE_MODE: {e}")))
                })
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns(name: &str) -> DnsName {
        name.parse().unwrap()
    }

    #[test]
    fn parses_known_keys() {
        let a = CniArgs::parse("WEFT_SERVICE=web;WEFT_STACK=shop;WEFT_NAME=web-1").unwrap();
        assert_eq!(a.weft_service.as_deref(), Some("web"));
        assert_eq!(a.weft_stack.as_deref(), Some("shop"));
        assert_eq!(a.weft_name.as_deref(), Some("web-1"));
        assert_eq!(
            a.metadata().unwrap(),
            Metadata {
                name: Some(dns("web-1")),
                service: Some(dns("web")),
                stack: Some(dns("shop")),
                service_mode: None,
            }
        );
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
        assert_eq!(CniArgs::parse(";;").unwrap(), CniArgs::default());
    }

    #[test]
    fn podman_style_args() {
        let a = CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAME=db;K8S_POD_NAMESPACE=shop").unwrap();
        assert!(a.ignore_unknown);
        assert_eq!(
            a.metadata().unwrap(),
            Metadata {
                name: Some(dns("db")),
                service: None,
                stack: Some(dns("shop")),
                service_mode: None,
            }
        );
        // WEFT_* win over the fallbacks.
        let a = CniArgs::parse("K8S_POD_NAME=db;WEFT_NAME=db-2;K8S_POD_NAMESPACE=x;WEFT_STACK=y")
            .unwrap();
        let m = a.metadata().unwrap();
        assert_eq!(m.name.as_deref(), Some("db-2"));
        assert_eq!(m.stack.as_deref(), Some("y"));
    }

    #[test]
    fn unknown_keys_need_ignore_unknown() {
        let e = CniArgs::parse("FOO=bar;WEFT_NAME=x").unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("FOO"), "{}", e.msg);
        let a = CniArgs::parse("FOO=bar;IgnoreUnknown=true").unwrap();
        assert_eq!(a.unknown, vec!["FOO".to_string()]);
        let a = CniArgs::parse("IgnoreUnknown=TRUE;BAR=1").unwrap();
        assert!(a.ignore_unknown);
        assert_eq!(
            CniArgs::parse("IgnoreUnknown=0;FOO=1").unwrap_err().code,
            code::INVALID_ENV
        );
        assert_eq!(
            CniArgs::parse("IgnoreUnknown=maybe").unwrap_err().code,
            code::INVALID_ENV
        );
        // Known kubernetes keys are never "unknown".
        assert!(CniArgs::parse("K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u").is_ok());
    }

    #[test]
    fn malformed_pairs_and_names() {
        assert_eq!(
            CniArgs::parse("WEFT_NAME").unwrap_err().code,
            code::INVALID_ENV
        );
        let a = CniArgs::parse("WEFT_SERVICE=bad name").unwrap();
        let e = a.metadata().unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("WEFT_SERVICE"), "{}", e.msg);
        // An unusable fallback is dropped, not an error.
        let a = CniArgs::parse("K8S_POD_NAME=bad name;IgnoreUnknown=1").unwrap();
        assert_eq!(a.metadata().unwrap().name, None);
        // Empty values count as absent; a value may contain '='.
        let a = CniArgs::parse("WEFT_NAME=;WEFT_STACK=a=b").unwrap();
        assert_eq!(a.weft_name, None);
        assert_eq!(a.weft_stack.as_deref(), Some("a=b"));
    }

    #[test]
    fn service_mode() {
        let a = CniArgs::parse("WEFT_SERVICE=web;WEFT_SERVICE_MODE=dnsrr").unwrap();
        assert_eq!(a.metadata().unwrap().service_mode, Some(Mode::Dnsrr));
        let a = CniArgs::parse("WEFT_SERVICE_MODE=VIP").unwrap();
        assert_eq!(a.metadata().unwrap().service_mode, Some(Mode::Vip));
        assert_eq!(
            CniArgs::parse("").unwrap().metadata().unwrap().service_mode,
            None
        );
        let e = CniArgs::parse("WEFT_SERVICE_MODE=rr")
            .unwrap()
            .metadata()
            .unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(
            e.msg.contains("WEFT_SERVICE_MODE") && e.msg.contains("dnsrr"),
            "{}",
            e.msg
        );
    }
}
