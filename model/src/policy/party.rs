//! The parties of a flow ([`Party`]): the stack and service policy knows a
//! container by, taken from its endpoint record or parsed from text (for
//! `netd policy check` and tests).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::PolicyError;
use crate::DnsName;

/// One side of a flow: what policy knows about a container (from its
/// endpoint record). `stack/service`, `stack`, or `-` for none, as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Party {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

impl Party {
    pub fn new(stack: Option<&str>, service: Option<&str>) -> Self {
        Party {
            stack: stack.map(str::to_owned),
            service: service.map(str::to_owned),
        }
    }
}

impl From<&crate::EndpointRecord> for Party {
    fn from(r: &crate::EndpointRecord) -> Self {
        Party::new(r.stack.as_deref(), r.service.as_deref())
    }
}

impl fmt::Display for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.stack.as_deref().unwrap_or("-"))?;
        match &self.service {
            Some(s) => write!(f, "/{s}"),
            None => Ok(()),
        }
    }
}

impl FromStr for Party {
    type Err = PolicyError;
    /// `stack`, `stack/service`, `-` (no stack) or `-/service`.
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let (stack, service) = match s.split_once('/') {
            Some((stack, service)) => (stack, Some(service)),
            None => (s, None),
        };
        let stack = (stack != "-").then_some(stack);
        for name in stack.iter().chain(service.iter()) {
            if !DnsName::is_valid(name) {
                return Err(PolicyError::Party {
                    value: s.chars().take(64).collect(),
                    reason: format!(
                        "{name:?} is not a stack or service name ({}); write stack, \
                         stack/service or - for a container without a stack",
                        DnsName::ALLOWED
                    ),
                });
            }
        }
        Ok(Party::new(stack, service))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::party;

    #[test]
    fn parses_stack_service_and_dash_for_none() {
        assert_eq!(party("-"), Party::default());
        assert_eq!(party("-/web"), Party::new(None, Some("web")));
        assert_eq!(party("shop/web").to_string(), "shop/web");
        assert!("a/b/c".parse::<Party>().is_err());
        let err = "a b".parse::<Party>().unwrap_err().to_string();
        assert!(err.contains("stack/service or - for a container"), "{err}");
    }
}
