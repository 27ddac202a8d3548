//! The policy routes' request and answer types. The document itself is
//! weft-model's [`Policy`] (its JSON is the same in the store and on the
//! socket); a revision is the store revision of the document's last write.

use serde::{Deserialize, Serialize};
use weft_model::{Decision, Party, Policy, PortSpec};

/// The cluster's policy as netd read it from the store (`GET /v1/policy`,
/// and the answer to `PUT`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDoc {
    pub policy: Policy,
    /// The store revision of the document's last write; `None`: no
    /// document is stored and [`Policy::default`] (allow everything) applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

/// Replaces the cluster's policy (`PUT /v1/policy`). netd validates it
/// first and answers 400 with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutPolicy {
    pub policy: Policy,
    /// Write only if the stored document is still at this revision (`0`:
    /// only if none is stored), else answer 409 (`conflict`): a
    /// read-modify-write cannot lose another writer's change. `None`:
    /// replace whatever is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_revision: Option<i64>,
}

/// Asks what the policy decides for one flow (`POST /v1/policy/check`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCheck {
    pub from: Party,
    pub to: Party,
    /// `None`: a flow without a port (ICMP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSpec>,
    /// Decide with this document instead of the stored one (a dry run of
    /// a change before applying it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
}

/// The answer to a [`PolicyCheck`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVerdict {
    pub decision: Decision,
    /// The decision in words (its `Display`).
    pub explanation: String,
    /// The revision of the stored document that decided; `None` for the
    /// default (none stored) or a document given in the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_plain_json() {
        let check = PolicyCheck {
            from: "shop/web".parse().unwrap(),
            to: "api".parse().unwrap(),
            port: Some("tcp/80".parse().unwrap()),
            policy: None,
        };
        let json = serde_json::to_string(&check).unwrap();
        assert_eq!(
            json,
            r#"{"from":{"stack":"shop","service":"web"},"to":{"stack":"api"},"port":"tcp/80"}"#
        );
        assert_eq!(serde_json::from_str::<PolicyCheck>(&json).unwrap(), check);
        let put: PutPolicy = serde_json::from_str(r#"{"policy":{"default":"deny"}}"#).unwrap();
        assert_eq!(put.expect_revision, None);
        assert_eq!(put.policy.default, weft_model::Action::Deny);
    }
}
