//! Network policy: which container may open connections to which, as plain
//! data, and the one pure decision every part of weft uses (netd's kernel
//! rules, `netd policy check`, the tests' reachability model).
//!
//! This file is the document: its types, their text forms, its errors
//! ([`PolicyError`]) and [`Policy::validate`]. The parties of a flow
//! ([`Party`]) are in `party.rs`; the decision ([`Policy::decide`]), the
//! order it follows and its per-pair form ([`Policy::reach`]) are in
//! `decide.rs`, whose module docs are the one description of that order.
//!
//! The document (JSON at [`crate::Keys::policy_doc`], TOML in files):
//!
//! ```toml
//! default = "allow"              # cluster default: "allow" | "deny"
//!
//! [stacks.shop]                  # per destination stack (ingress into it)
//! within_stack = "allow"         # containers of shop among themselves
//! within_service = "allow"       # containers of one service of shop
//! linked = ["payments"]          # shop <-> payments allowed, both ways
//! ingress = "deny"               # from anywhere else into shop
//!
//! [stacks.payments]              # a linked stack must be declared
//!
//! [[rules]]                      # explicit allow rules, first match wins
//! name = "web-to-api"            # unique, [a-z0-9-]: the audit counter's name
//! from = "shop/web"              # stack[/service] or "*"
//! to = "api"                     # stack[/service] or "*"
//! ports = ["tcp/80", "udp/53"]   # empty or absent = every port (and ICMP)
//! ```
//!
//! The policy is about traffic between containers: DNS at
//! [`crate::DNS_ADDR`] is always reachable, and traffic from outside the
//! cluster (published ports, the host itself) is not subject to it.
//! No stored document means [`Policy::default`]: allow everything, as
//! before policy existed.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{DnsName, Protocol};

mod decide;
mod party;
#[cfg(test)]
mod testing;

pub use decide::{DecidedBy, Decision, Reach};
pub use party::Party;

/// What happens to a connection.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            other => Err(PolicyError::Action {
                value: other.chars().take(64).collect(),
            }),
        }
    }
}

/// The whole policy document.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// What happens when nothing more specific decides.
    #[serde(default)]
    pub default: Action,
    /// Per destination stack, by stack name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stacks: BTreeMap<String, StackPolicy>,
    /// Explicit allow rules, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// How traffic into one stack is treated. Every field is optional: unset
/// means the next step of the order decides.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackPolicy {
    /// Containers of this stack among themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_stack: Option<Action>,
    /// Containers of one service of this stack among themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_service: Option<Action>,
    /// From anywhere else into this stack (else the cluster default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Action>,
    /// Stacks this one may talk with, both ways; each must be a stack of
    /// the policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub linked: Vec<String>,
}

/// An explicit allow rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique, 1–63 of `a-z`, `0-9` and `-`; names the audit counter.
    pub name: String,
    pub from: Selector,
    pub to: Selector,
    /// Empty: every port and protocol (ICMP too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
}

impl Rule {
    /// Whether the rule covers this flow's parties and port.
    pub fn matches(&self, from: &Party, to: &Party, l4: Option<(Protocol, u16)>) -> bool {
        self.from.matches(from) && self.to.matches(to) && self.covers(l4)
    }

    /// Whether the rule's ports cover `l4` (`None`: no port, e.g. ICMP).
    pub fn covers(&self, l4: Option<(Protocol, u16)>) -> bool {
        self.ports.is_empty()
            || l4.is_some_and(|(proto, port)| self.ports.contains(&PortSpec { proto, port }))
    }
}

/// Which containers a rule side means: `*`, `stack` or `stack/service`.
/// Plain strings in JSON and TOML.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Selector {
    Any,
    Stack(String),
    Service(String, String),
}

impl Selector {
    pub fn matches(&self, party: &Party) -> bool {
        match self {
            Selector::Any => true,
            Selector::Stack(s) => party.stack.as_deref() == Some(s),
            Selector::Service(s, v) => {
                party.stack.as_deref() == Some(s) && party.service.as_deref() == Some(v)
            }
        }
    }

    /// The first name in it that a record could not hold, as an error.
    fn check(&self) -> Result<(), PolicyError> {
        let bad = |reason: String| PolicyError::Selector {
            value: self.to_string().chars().take(64).collect(),
            reason,
        };
        let names: &[&String] = match self {
            Selector::Any => &[],
            Selector::Stack(s) => &[s],
            Selector::Service(s, v) => &[s, v],
        };
        for name in names {
            if !DnsName::is_valid(name) {
                return Err(bad(format!(
                    "{name:?} is not a stack or service name ({})",
                    DnsName::ALLOWED
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Any => f.write_str("*"),
            Selector::Stack(s) => f.write_str(s),
            Selector::Service(s, v) => write!(f, "{s}/{v}"),
        }
    }
}

impl FromStr for Selector {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let sel = match s.split_once('/') {
            _ if s == "*" => Selector::Any,
            None => Selector::Stack(s.to_owned()),
            Some((stack, service)) => Selector::Service(stack.to_owned(), service.to_owned()),
        };
        sel.check()?;
        Ok(sel)
    }
}

impl TryFrom<String> for Selector {
    type Error = PolicyError;
    fn try_from(s: String) -> Result<Self, PolicyError> {
        s.parse()
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.to_string()
    }
}

/// One port of one protocol, `tcp/80`. A plain string in JSON and TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortSpec {
    pub proto: Protocol,
    pub port: u16,
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.proto.as_str(), self.port)
    }
}

impl FromStr for PortSpec {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let bad = |reason: &'static str| PolicyError::Port {
            value: s.chars().take(64).collect(),
            reason,
        };
        let (proto, port) = s.split_once('/').ok_or(bad("no protocol"))?;
        let proto = match proto {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(bad("the protocol is not tcp or udp")),
        };
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port is not a number 1-65535"))?;
        if port == 0 {
            return Err(bad("port 0 is no port"));
        }
        Ok(PortSpec { proto, port })
    }
}

impl TryFrom<String> for PortSpec {
    type Error = PolicyError;
    fn try_from(s: String) -> Result<Self, PolicyError> {
        s.parse()
    }
}

impl From<PortSpec> for String {
    fn from(p: PortSpec) -> String {
        p.to_string()
    }
}

/// What is wrong with a policy document, in words that say what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid action {value:?}: use allow or deny")]
    Action { value: String },
    #[error("invalid selector {value:?}: {reason}")]
    Selector { value: String, reason: String },
    #[error("invalid port {value:?}: {reason} (write tcp/80 or udp/53, ports 1-65535)")]
    Port { value: String, reason: &'static str },
    #[error("invalid party {value:?}: {reason}")]
    Party { value: String, reason: String },
    #[error("invalid stack name {name:?} in stacks: {}", DnsName::ALLOWED)]
    StackName { name: String },
    #[error(
        "invalid rule name {name:?}: use 1-63 of a-z, 0-9 and -, starting with a letter or digit \
         (it names the rule's audit counter)"
    )]
    RuleName { name: String },
    #[error(
        "two rules are named {name:?} (rules[{first}] and rules[{second}]): rule names must be \
         unique, they name the audit counters"
    )]
    DuplicateRule {
        name: String,
        first: usize,
        second: usize,
    },
    #[error("rule {rule:?}: {error}")]
    InRule {
        rule: String,
        #[source]
        error: Box<PolicyError>,
    },
    #[error(
        "stack {stack:?} links {linked:?}, which is not a stack of the policy: declare it \
         ([stacks.{linked}], an empty table is enough) or fix the name"
    )]
    UnknownLinked { stack: String, linked: String },
    #[error("stack {stack:?} links itself: use within_stack for traffic inside a stack")]
    SelfLinked { stack: String },
}

/// Rule names: 1–63 of `a-z`, `0-9`, `-`, not starting with `-` (so they
/// never contain the `_` of the built-in counter labels).
fn rule_name_ok(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

impl Policy {
    /// Checks everything serde cannot: names, unique rule names, links to
    /// declared stacks, ports. Returns the first problem.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (stack, sp) in &self.stacks {
            if !DnsName::is_valid(stack) {
                return Err(PolicyError::StackName {
                    name: stack.chars().take(64).collect(),
                });
            }
            for linked in &sp.linked {
                if linked == stack {
                    return Err(PolicyError::SelfLinked {
                        stack: stack.clone(),
                    });
                }
                if !self.stacks.contains_key(linked) {
                    return Err(PolicyError::UnknownLinked {
                        stack: stack.clone(),
                        linked: linked.chars().take(64).collect(),
                    });
                }
            }
        }
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (index, rule) in self.rules.iter().enumerate() {
            if !rule_name_ok(&rule.name) {
                return Err(PolicyError::RuleName {
                    name: rule.name.chars().take(64).collect(),
                });
            }
            if let Some(&first) = seen.get(rule.name.as_str()) {
                return Err(PolicyError::DuplicateRule {
                    name: rule.name.clone(),
                    first,
                    second: index,
                });
            }
            seen.insert(&rule.name, index);
            let in_rule = |error| PolicyError::InRule {
                rule: rule.name.clone(),
                error: Box::new(error),
            };
            rule.from.check().map_err(in_rule)?;
            rule.to.check().map_err(in_rule)?;
            if let Some(p) = rule.ports.iter().find(|p| p.port == 0) {
                return Err(in_rule(PolicyError::Port {
                    value: p.to_string(),
                    reason: "port 0 is no port",
                }));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = r#"
default = "allow"

[stacks.shop]
within_stack = "allow"
within_service = "allow"
linked = ["payments"]
ingress = "deny"

[stacks.payments]

[[rules]]
name = "web-to-api"
from = "shop/web"
to = "api"
ports = ["tcp/80", "udp/53"]
"#;

    fn example() -> Policy {
        Policy {
            default: Action::Allow,
            stacks: [
                (
                    "shop".to_string(),
                    stack(
                        Some(Action::Allow),
                        Some(Action::Allow),
                        Some(Action::Deny),
                        &["payments"],
                    ),
                ),
                ("payments".to_string(), StackPolicy::default()),
            ]
            .into(),
            rules: vec![rule("web-to-api", "shop/web", "api", &["tcp/80", "udp/53"])],
        }
    }

    #[test]
    fn the_documented_file_reads_as_toml_and_json() {
        let p: Policy = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(p, example());
        p.validate().unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"default":"allow","stacks":{"payments":{},"shop":{"within_stack":"allow","within_service":"allow","ingress":"deny","linked":["payments"]}},"rules":[{"name":"web-to-api","from":"shop/web","to":"api","ports":["tcp/80","udp/53"]}]}"#
        );
        assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), p);
        let back: Policy = toml::from_str(&toml::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn an_empty_document_is_the_default_allow_everything() {
        let p: Policy = serde_json::from_str("{}").unwrap();
        assert_eq!(p, Policy::default());
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"default":"allow"}"#);
        let d = p.decide(&party("a/x"), &party("b/y"), tcp(80));
        assert_eq!(d.action, Action::Allow);
        assert_eq!(d.by, DecidedBy::ClusterDefault);
    }

    #[test]
    fn typos_and_bad_values_fail_to_parse_with_the_reason() {
        let err =
            toml::from_str::<Policy>("default = \"allow\"\n[stacks.a]\nwithin_stak = \"deny\"")
                .unwrap_err()
                .to_string();
        assert!(err.contains("within_stak"), "{err}");
        let err = toml::from_str::<Policy>("default = \"maybe\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("maybe"), "{err}");
        for (port, says) in [
            ("tcp/0", "port 0"),
            ("80", "no protocol"),
            ("icmp/1", "not tcp or udp"),
            ("tcp/70000", "1-65535"),
        ] {
            let err = port.parse::<PortSpec>().unwrap_err().to_string();
            assert!(err.contains(says), "{port}: {err}");
        }
        for sel in ["", "a/", "/b", "a b", "a/b/c", "**"] {
            assert!(sel.parse::<Selector>().is_err(), "{sel:?}");
        }
        assert_eq!("*".parse::<Selector>().unwrap(), Selector::Any);
        assert_eq!(
            "a/b".parse::<Selector>().unwrap(),
            Selector::Service("a".into(), "b".into())
        );
    }

    #[test]
    fn validate_says_what_is_wrong() {
        let check = |p: Policy, says: &str| {
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains(says), "wanted {says:?} in {err}");
        };
        let mut p = example();
        p.stacks.remove("payments");
        check(p, "links \"payments\", which is not a stack");
        let mut p = example();
        p.stacks.get_mut("payments").unwrap().linked = vec!["payments".into()];
        check(p, "links itself");
        let mut p = example();
        p.rules.push(p.rules[0].clone());
        check(
            p,
            "two rules are named \"web-to-api\" (rules[0] and rules[1])",
        );
        let mut p = example();
        p.rules[0].name = "Web_API".into();
        check(p, "invalid rule name");
        let mut p = example();
        p.rules[0].from = Selector::Stack("a b".into());
        check(p, "rule \"web-to-api\": invalid selector");
        let mut p = example();
        p.rules[0].ports[0].port = 0;
        check(p, "port 0");
        let mut p = example();
        p.stacks.insert("bad name".into(), StackPolicy::default());
        check(p, "invalid stack name");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Every document survives JSON (the store) and TOML (files).
        #[test]
        fn documents_round_trip_json_and_toml(p in policy()) {
            let json = serde_json::to_string(&p).unwrap();
            prop_assert_eq!(&serde_json::from_str::<Policy>(&json).unwrap(), &p);
            let text = toml::to_string(&p).unwrap();
            prop_assert_eq!(&toml::from_str::<Policy>(&text).unwrap(), &p);
        }
    }
}
