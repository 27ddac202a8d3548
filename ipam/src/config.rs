//! The address plan's configuration and its validation.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// Smallest block that still holds a network address, a gateway, one
/// endpoint and a broadcast address.
pub const MAX_BLOCK_PREFIX: u8 = 30;

/// The cluster's address plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamConfig {
    /// Every container address comes from this range.
    pub cluster_range: Ipv4Network,
    /// Prefix length of the block each host leases (24 = a /24 per host).
    pub block_prefix: u8,
    /// How long a block stays reserved for its host after the host stopped
    /// renewing it (a dead host gets the same block back within this time).
    #[serde(with = "secs")]
    pub block_grace: Duration,
    /// Every service's virtual IP comes from this range
    /// ([`weft_model::ServiceRecord::vip`]); it shares no address with the
    /// cluster range. Plans stored before services existed read as the
    /// default.
    #[serde(default = "default_service_range")]
    pub service_range: Ipv4Network,
}

fn default_service_range() -> Ipv4Network {
    weft_model::DEFAULT_SERVICE_RANGE
}

/// Each host's block when none is configured: a /24 (253 containers).
pub const DEFAULT_BLOCK_PREFIX: u8 = 24;
/// How long a dead host's block stays its own when nothing is configured.
pub const DEFAULT_BLOCK_GRACE: Duration = Duration::from_secs(3600);

impl Default for IpamConfig {
    fn default() -> Self {
        Self {
            cluster_range: weft_model::DEFAULT_CLUSTER_RANGE,
            block_prefix: DEFAULT_BLOCK_PREFIX,
            block_grace: DEFAULT_BLOCK_GRACE,
            service_range: weft_model::DEFAULT_SERVICE_RANGE,
        }
    }
}

/// A configuration that cannot work, with what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cluster range {given} is not a network address: its host bits are set \
         (did you mean {network}/{prefix}?)"
    )]
    NotNetworkAddress {
        given: Ipv4Network,
        network: Ipv4Addr,
        prefix: u8,
    },
    #[error(
        "host block /{block_prefix} is larger than the cluster range {range}: \
         use a block prefix of at least /{min}"
    )]
    BlockLargerThanRange {
        block_prefix: u8,
        range: Ipv4Network,
        min: u8,
    },
    #[error(
        "host block /{block_prefix} is too small: a block needs a network address, \
         a gateway, at least one container and a broadcast address (use /{MAX_BLOCK_PREFIX} or larger)"
    )]
    BlockTooSmall { block_prefix: u8 },
    #[error("{which} {range} overlaps {what} {other}: pick a {which} that does not")]
    Overlap {
        /// `cluster range` or `service range`.
        which: &'static str,
        range: Ipv4Network,
        what: String,
        other: Ipv4Network,
    },
    #[error("block grace period must be longer than zero")]
    ZeroGrace,
    #[error(
        "service range {given} is not a network address: its host bits are set \
         (did you mean {network}/{prefix}?)"
    )]
    ServiceRangeNotNetwork {
        given: Ipv4Network,
        network: Ipv4Addr,
        prefix: u8,
    },
    #[error("service range {range} is too small: use /30 or larger")]
    ServiceRangeTooSmall { range: Ipv4Network },
}

impl IpamConfig {
    /// Checks that the plan can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = self.cluster_range;
        if range.network() != range.ip() {
            return Err(ConfigError::NotNetworkAddress {
                given: range,
                network: range.network(),
                prefix: range.prefix(),
            });
        }
        if self.block_prefix < range.prefix() {
            return Err(ConfigError::BlockLargerThanRange {
                block_prefix: self.block_prefix,
                range,
                min: range.prefix(),
            });
        }
        if self.block_prefix > MAX_BLOCK_PREFIX {
            return Err(ConfigError::BlockTooSmall {
                block_prefix: self.block_prefix,
            });
        }
        if self.block_grace.is_zero() {
            return Err(ConfigError::ZeroGrace);
        }
        let svc = self.service_range;
        if svc.network() != svc.ip() {
            return Err(ConfigError::ServiceRangeNotNetwork {
                given: svc,
                network: svc.network(),
                prefix: svc.prefix(),
            });
        }
        if svc.prefix() > 30 {
            return Err(ConfigError::ServiceRangeTooSmall { range: svc });
        }
        if overlaps(svc, range) {
            return Err(ConfigError::Overlap {
                which: "service range",
                range: svc,
                what: "the cluster range".to_owned(),
                other: range,
            });
        }
        Ok(())
    }

    /// Checks that the cluster range shares no address with other networks
    /// the host uses (its underlay subnets, other runtimes' bridges, ...).
    /// Each entry is (what it is, for the message; the network).
    pub fn check_no_overlap<'a>(
        &self,
        others: impl IntoIterator<Item = (&'a str, Ipv4Network)>,
    ) -> Result<(), ConfigError> {
        for (what, other) in others {
            for (which, range) in [
                ("cluster range", self.cluster_range),
                ("service range", self.service_range),
            ] {
                if overlaps(range, other) {
                    return Err(ConfigError::Overlap {
                        which,
                        range,
                        what: what.to_owned(),
                        other,
                    });
                }
            }
        }
        Ok(())
    }

    /// How many host blocks the range holds.
    pub fn block_count(&self) -> u64 {
        1u64 << (self.block_prefix - self.cluster_range.prefix())
    }

    /// The `index`-th block of the range, in address order.
    pub fn block(&self, index: u64) -> Option<Ipv4Network> {
        if index >= self.block_count() {
            return None;
        }
        let size = 1u64 << (32 - self.block_prefix);
        let base = u64::from(u32::from(self.cluster_range.network()));
        let addr = u32::try_from(base + index * size).ok()?;
        Ipv4Network::new(Ipv4Addr::from(addr), self.block_prefix).ok()
    }
}

/// True when the two networks share at least one address.
pub fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn cfg(range: &str, block_prefix: u8) -> IpamConfig {
        IpamConfig {
            cluster_range: net(range),
            block_prefix,
            ..IpamConfig::default()
        }
    }

    #[test]
    fn the_service_range_is_checked_and_defaults_for_old_plans() {
        let old: IpamConfig = serde_json::from_str(
            r#"{"cluster_range":"10.42.0.0/16","block_prefix":24,"block_grace":3600}"#,
        )
        .unwrap();
        assert_eq!(old.service_range, net("10.43.0.0/16"));
        let inside = IpamConfig {
            service_range: net("10.42.128.0/20"),
            ..IpamConfig::default()
        };
        let e = inside.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("service range 10.42.128.0/20 overlaps the cluster range"),
            "{e}"
        );
        let host_bits = IpamConfig {
            service_range: net("10.43.0.1/16"),
            ..IpamConfig::default()
        };
        assert!(host_bits
            .validate()
            .unwrap_err()
            .to_string()
            .contains("10.43.0.0/16"));
        let tiny = IpamConfig {
            service_range: net("10.43.0.0/31"),
            ..IpamConfig::default()
        };
        assert!(tiny.validate().is_err());
        let e = IpamConfig::default()
            .check_no_overlap([("underlay subnet", net("10.43.7.0/24"))])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "service range 10.43.0.0/16 overlaps underlay subnet 10.43.7.0/24: pick a service range that does not"
        );
    }

    #[test]
    fn default_is_valid() {
        let c = IpamConfig::default();
        c.validate().unwrap();
        assert_eq!(c.cluster_range, net("10.42.0.0/16"));
        assert_eq!(c.block_count(), 256);
        assert_eq!(c.block(0), Some(net("10.42.0.0/24")));
        assert_eq!(c.block(255), Some(net("10.42.255.0/24")));
        assert_eq!(c.block(256), None);
    }

    #[test]
    fn rejects_host_bits() {
        let e = cfg("10.42.0.1/16", 24).validate().unwrap_err();
        assert!(matches!(e, ConfigError::NotNetworkAddress { .. }));
        assert!(e.to_string().contains("did you mean 10.42.0.0/16"), "{e}");
    }

    #[test]
    fn rejects_block_larger_than_range() {
        let e = cfg("10.42.0.0/16", 15).validate().unwrap_err();
        assert!(
            e.to_string()
                .contains("larger than the cluster range 10.42.0.0/16"),
            "{e}"
        );
        assert!(e.to_string().contains("at least /16"), "{e}");
    }

    #[test]
    fn rejects_tiny_blocks_and_zero_grace() {
        assert!(matches!(
            cfg("10.42.0.0/16", 31).validate(),
            Err(ConfigError::BlockTooSmall { block_prefix: 31 })
        ));
        cfg("10.42.0.0/16", 30).validate().unwrap();
        let c = IpamConfig {
            block_grace: Duration::ZERO,
            ..IpamConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::ZeroGrace));
    }

    #[test]
    fn block_equal_to_range_is_one_block() {
        let c = cfg("10.42.7.0/24", 24);
        c.validate().unwrap();
        assert_eq!(c.block_count(), 1);
        assert_eq!(c.block(0), Some(net("10.42.7.0/24")));
    }

    #[test]
    fn overlap_is_detected_both_ways() {
        let c = IpamConfig::default();
        let e = c
            .check_no_overlap([("underlay", net("10.42.3.0/24"))])
            .unwrap_err();
        assert!(
            e.to_string().contains("overlaps underlay 10.42.3.0/24"),
            "{e}"
        );
        assert!(c
            .check_no_overlap([("docker0", net("10.0.0.0/8"))])
            .is_err());
        c.check_no_overlap([
            ("underlay", net("192.168.1.0/24")),
            ("docker0", net("172.17.0.0/16")),
            ("neighbour", net("10.44.0.0/16")),
        ])
        .unwrap();
    }
}
