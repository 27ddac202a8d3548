//! The CNI spec versions the plugin speaks.

use std::fmt;

/// A supported CNI spec version, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

/// Every supported version, as VERSION reports them.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

impl CniVersion {
    /// The newest version, the default answer to VERSION.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];

    /// Parses an exact supported version string.
    pub fn parse(s: &str) -> Option<CniVersion> {
        Some(match s {
            "0.3.0" => CniVersion::V0_3_0,
            "0.3.1" => CniVersion::V0_3_1,
            "0.4.0" => CniVersion::V0_4_0,
            "1.0.0" => CniVersion::V1_0_0,
            "1.1.0" => CniVersion::V1_1_0,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Results of versions before 1.0.0 carry `ips[].version`.
    pub fn has_ip_version_field(self) -> bool {
        self < CniVersion::V1_0_0
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// GC and STATUS exist from 1.1.0 on; so do the interface and route
    /// fields `mtu`, `socketPath`, `pciID`, `advmss`, `priority`, `table`,
    /// `scope`.
    pub fn is_1_1(self) -> bool {
        self >= CniVersion::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The VERSION answer: `{"cniVersion": ..., "supportedVersions": [...]}`,
/// answering in the requested version when it is supported.
pub fn version_json(requested: Option<&str>) -> String {
    let v = requested
        .and_then(CniVersion::parse)
        .unwrap_or(CniVersion::LATEST);
    let out = serde_json::json!({
        "cniVersion": v.as_str(),
        "supportedVersions": SUPPORTED_VERSIONS,
    });
    serde_json::to_string_pretty(&out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders() {
        for (s, v) in SUPPORTED_VERSIONS.iter().zip(CniVersion::ALL) {
            assert_eq!(CniVersion::parse(s), Some(v));
            assert_eq!(v.as_str(), *s);
        }
        assert_eq!(CniVersion::parse("0.2.0"), None);
        assert_eq!(CniVersion::parse("1.1"), None);
        assert_eq!(CniVersion::parse(""), None);
        assert!(CniVersion::V0_3_1.has_ip_version_field());
        assert!(CniVersion::V0_4_0.has_ip_version_field());
        assert!(!CniVersion::V1_0_0.has_ip_version_field());
        assert!(!CniVersion::V0_3_1.has_check());
        assert!(CniVersion::V0_4_0.has_check());
        assert!(!CniVersion::V1_0_0.is_1_1());
        assert!(CniVersion::V1_1_0.is_1_1());
    }

    #[test]
    fn version_answer() {
        let v: serde_json::Value = serde_json::from_str(&version_json(Some("0.4.0"))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "cniVersion": "0.4.0",
                "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
            })
        );
        let v: serde_json::Value = serde_json::from_str(&version_json(Some("9.9.9"))).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        let v: serde_json::Value = serde_json::from_str(&version_json(None)).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
    }
}
