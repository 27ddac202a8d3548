//! CNI errors: what the plugin prints on stdout when a command fails.
//!
//! Everything inside the plugin uses typed errors ([`crate::NetError`],
//! [`weft_api::client::ClientError`], ...); they are turned into a
//! [`CniError`] — a spec error code plus a message — only at the edge, in
//! [`crate::plugin`].

use serde::Serialize;

/// CNI error codes. 0–99 are the spec's well-known codes, 100 and up are
/// weft's own.
pub mod code {
    /// The `cniVersion` of the configuration is not supported (or the
    /// command does not exist in that version: CHECK before 0.4.0, GC and
    /// STATUS before 1.1.0).
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// A field of the configuration is not supported.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// The container is unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// A necessary environment variable is missing or invalid (`CNI_COMMAND`,
    /// `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`).
    pub const INVALID_ENV: u32 = 4;
    /// An I/O failure, e.g. reading the configuration from stdin.
    pub const IO_FAILURE: u32 = 5;
    /// The configuration (or a part of it) could not be decoded.
    pub const DECODE: u32 = 6;
    /// The configuration decoded but is invalid.
    pub const INVALID_CONFIG: u32 = 7;
    /// A transient condition: netd is down or restarting, or gave no complete
    /// answer (connection refused or reset, closed or cut short, timed out),
    /// or said "try again later" itself. The runtime should retry.
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot service ADD requests now.
    pub const NOT_AVAILABLE: u32 = 50;

    /// netd has no free address left in this host's block.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// The attachment exists already: the host-side veth for this container
    /// and interface, or the interface name inside the container.
    pub const ALREADY_EXISTS: u32 = 101;
    /// The kernel refused to set up (or tear down) the interfaces.
    pub const INTERFACE_SETUP: u32 = 102;
    /// netd answered the request with an error (other than "try again" and
    /// "pool exhausted"), or with a complete answer that made no sense.
    pub const NETD_ERROR: u32 = 103;
    /// CHECK: the container's network is not what it should be.
    pub const CHECK_FAILED: u32 = 104;
    /// The bridge netd named does not exist in the plugin's network
    /// namespace (netd not set up, or running in another namespace).
    pub const NO_BRIDGE: u32 = 105;
}

/// A CNI error as the spec prints it: `{"cniVersion", "code", "msg",
/// "details"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: Option<String>,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        let details = details.into();
        self.details = (!details.is_empty()).then_some(details);
        self
    }

    /// Adds to the details, after any already there.
    pub fn add_details(mut self, more: impl Into<String>) -> Self {
        let more = more.into();
        if !more.is_empty() {
            self.details = Some(match self.details.take() {
                Some(d) => format!("{d}; {more}"),
                None => more,
            });
        }
        self
    }

    /// The error JSON for `cni_version` (the version the caller speaks).
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            details: Option<&'a str>,
        }
        let out = Out {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: self.details.as_deref(),
        };
        // Serialising plain strings and numbers cannot fail; the fallback
        // keeps the output valid JSON all the same.
        serde_json::to_string_pretty(&out).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"1.1.0","code":{},"msg":"internal error"}}"#,
                self.code
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_shape() {
        let e = CniError::new(code::TRY_AGAIN, "netd is down").with_details("socket /x: ENOENT");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "cniVersion": "1.0.0",
                "code": 11,
                "msg": "netd is down",
                "details": "socket /x: ENOENT"
            })
        );
        let e = CniError::new(code::DECODE, "bad");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("0.4.0")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion": "0.4.0", "code": 6, "msg": "bad"})
        );
        // Empty details are left out.
        assert_eq!(CniError::new(1, "x").with_details("").details, None);
    }

    #[test]
    fn details_add_up() {
        let e = CniError::new(1, "x").add_details("").add_details("a");
        assert_eq!(e.details.as_deref(), Some("a"));
        let e = e.add_details("b").add_details("");
        assert_eq!(e.details.as_deref(), Some("a; b"));
    }
}
