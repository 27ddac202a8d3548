//! Network policy: which container may open connections to which, as plain
//! data, and the one pure decision every part of weft uses (netd's kernel
//! rules, `netd policy check`, the tests' reachability model).
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
//! [`Policy::decide`] is the one decision; first match wins, in this order:
//! 1. explicit rules in order (from, to and ports match) → allow, by that rule;
//! 2. same stack and same service (both set): the destination stack's
//!    `within_service`, if set;
//! 3. same stack: the destination stack's `within_stack`, if set;
//! 4. linked stacks (either lists the other) → allow;
//! 5. the destination stack's `ingress`, if set (this includes traffic from
//!    its own stack when `within_stack` is not set);
//! 6. the cluster `default`.
//!
//! A container without a stack matches only `*` selectors and the default.
//! The policy is about traffic between containers: DNS at
//! [`crate::DNS_ADDR`] is always reachable, and traffic from outside the
//! cluster (published ports, the host itself) is not subject to it.
//! No stored document means [`Policy::default`]: allow everything, as
//! before policy existed.
//!
//! [`Policy::reach`] gives the same answer per pair of parties for every
//! port at once, for the kernel's sets (a property test keeps the two in
//! agreement).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{DnsName, Protocol};

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

/// What decided a flow: the audit counter it is counted under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DecidedBy {
    /// `rules[index]`, the first explicit rule that matched.
    Rule {
        index: usize,
        name: String,
    },
    WithinService,
    WithinStack,
    Linked,
    StackIngress,
    ClusterDefault,
}

impl DecidedBy {
    /// The name its audit counter carries: the rule's name, or for the
    /// built-in reasons a name with `_`, which rule names cannot have.
    pub fn label(&self) -> &str {
        match self {
            DecidedBy::Rule { name, .. } => name,
            DecidedBy::WithinService => "within_service",
            DecidedBy::WithinStack => "within_stack",
            DecidedBy::Linked => "linked_stacks",
            DecidedBy::StackIngress => "stack_ingress",
            DecidedBy::ClusterDefault => "cluster_default",
        }
    }
}

impl fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecidedBy::Rule { index, name } => write!(
                f,
                "rule {name:?} (rules[{index}]), the first rule whose from, to and ports match"
            ),
            DecidedBy::WithinService => f.write_str(
                "the destination stack's within_service: both are in the same service of the \
                 same stack",
            ),
            DecidedBy::WithinStack => {
                f.write_str("the destination stack's within_stack: both are in the same stack")
            }
            DecidedBy::Linked => {
                f.write_str("linked stacks: one of the two stacks lists the other in linked")
            }
            DecidedBy::StackIngress => f.write_str(
                "the destination stack's ingress: no rule, within setting or link decided",
            ),
            DecidedBy::ClusterDefault => {
                f.write_str("the cluster default: nothing more specific decided")
            }
        }
    }
}

/// The outcome of [`Policy::decide`] and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Decision {
    pub action: Action,
    pub by: DecidedBy,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, decided by {}", self.action, self.by)
    }
}

/// What one party may reach of another, for every port at once (see
/// [`Policy::reach`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reach {
    /// Every port (and ICMP) not in `ports` is allowed, by this; `None`:
    /// every port not in `ports` is denied.
    pub all: Option<DecidedBy>,
    /// These ports are allowed, each by its rule; they take precedence
    /// over `all`. Each port appears once.
    pub ports: Vec<(PortSpec, DecidedBy)>,
}

impl Reach {
    /// What allows `l4` (`None`: no port, e.g. ICMP), or `None` if denied.
    /// Agrees with [`Policy::decide`].
    pub fn allows(&self, l4: Option<(Protocol, u16)>) -> Option<&DecidedBy> {
        l4.and_then(|(proto, port)| {
            self.ports
                .iter()
                .find(|(p, _)| *p == PortSpec { proto, port })
                .map(|(_, by)| by)
        })
        .or(self.all.as_ref())
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

    /// The one decision for a connection from `from` to `to` on `l4`
    /// (`None`: no port, e.g. ICMP); first match wins in the order of the
    /// module docs.
    pub fn decide(&self, from: &Party, to: &Party, l4: Option<(Protocol, u16)>) -> Decision {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.matches(from, to, l4))
            .map(|(index, rule)| Decision {
                action: Action::Allow,
                by: DecidedBy::Rule {
                    index,
                    name: rule.name.clone(),
                },
            })
            .unwrap_or_else(|| self.fallback(from, to))
    }

    /// Steps 2–6 of the order: the decision when no explicit rule allows.
    /// It does not depend on the port.
    pub fn fallback(&self, from: &Party, to: &Party) -> Decision {
        let decision = |action, by| Decision { action, by };
        let dest = to.stack.as_deref().and_then(|s| self.stacks.get(s));
        let same_stack = from.stack.is_some() && from.stack == to.stack;
        let same_service = same_stack && from.service.is_some() && from.service == to.service;
        if let Some(sp) = dest {
            if let (true, Some(a)) = (same_service, sp.within_service) {
                return decision(a, DecidedBy::WithinService);
            }
            if let (true, Some(a)) = (same_stack, sp.within_stack) {
                return decision(a, DecidedBy::WithinStack);
            }
        }
        if let (Some(a), Some(b)) = (from.stack.as_deref(), to.stack.as_deref()) {
            if a != b && (self.lists(a, b) || self.lists(b, a)) {
                return decision(Action::Allow, DecidedBy::Linked);
            }
        }
        if let Some(a) = dest.and_then(|sp| sp.ingress) {
            return decision(a, DecidedBy::StackIngress);
        }
        decision(self.default, DecidedBy::ClusterDefault)
    }

    /// Whether stack `a` lists `b` as linked.
    fn lists(&self, a: &str, b: &str) -> bool {
        self.stacks
            .get(a)
            .is_some_and(|sp| sp.linked.iter().any(|l| l == b))
    }

    /// What `from` may reach of `to`, for every port at once: the ports
    /// explicit rules allow (first rule per port), and what decides every
    /// other port. For every `l4`, `reach(from, to).allows(l4)` is what
    /// [`Policy::decide`] allows, by the same reason.
    pub fn reach(&self, from: &Party, to: &Party) -> Reach {
        let mut ports: Vec<(PortSpec, DecidedBy)> = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            if !(rule.from.matches(from) && rule.to.matches(to)) {
                continue;
            }
            let by = DecidedBy::Rule {
                index,
                name: rule.name.clone(),
            };
            if rule.ports.is_empty() {
                return Reach {
                    all: Some(by),
                    ports,
                };
            }
            for p in &rule.ports {
                if !ports.iter().any(|(q, _)| q == p) {
                    ports.push((*p, by.clone()));
                }
            }
        }
        let rest = self.fallback(from, to);
        Reach {
            all: (rest.action == Action::Allow).then_some(rest.by),
            ports,
        }
    }
}

#[cfg(test)]
mod tests {
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

    fn party(s: &str) -> Party {
        s.parse().unwrap()
    }

    fn tcp(port: u16) -> Option<(Protocol, u16)> {
        Some((Protocol::Tcp, port))
    }

    fn rule(name: &str, from: &str, to: &str, ports: &[&str]) -> Rule {
        Rule {
            name: name.into(),
            from: from.parse().unwrap(),
            to: to.parse().unwrap(),
            ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    fn stack(
        within_stack: Option<Action>,
        within_service: Option<Action>,
        ingress: Option<Action>,
        linked: &[&str],
    ) -> StackPolicy {
        StackPolicy {
            within_stack,
            within_service,
            ingress,
            linked: linked.iter().map(|s| s.to_string()).collect(),
        }
    }

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
        assert_eq!(party("-"), Party::default());
        assert_eq!(party("-/web"), Party::new(None, Some("web")));
        assert_eq!(party("shop/web").to_string(), "shop/web");
        assert!("a/b/c".parse::<Party>().is_err());
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

    /// One policy where every step of the order decides some flow.
    fn layered() -> Policy {
        Policy {
            default: Action::Allow,
            stacks: [
                (
                    "shop".to_string(),
                    stack(
                        Some(Action::Deny),
                        Some(Action::Allow),
                        Some(Action::Deny),
                        &["pay"],
                    ),
                ),
                ("pay".to_string(), stack(None, None, None, &[])),
                // within_service unset: same service falls to within_stack;
                // within_stack unset too: falls to ingress.
                (
                    "open".to_string(),
                    stack(None, None, Some(Action::Deny), &[]),
                ),
                (
                    "loose".to_string(),
                    stack(Some(Action::Allow), None, None, &[]),
                ),
            ]
            .into(),
            rules: vec![
                rule("web-db", "shop/web", "shop/db", &["tcp/5432"]),
                rule("ops-all", "ops", "*", &[]),
            ],
        }
    }

    fn decided(p: &Policy, from: &str, to: &str, l4: Option<(Protocol, u16)>) -> (Action, String) {
        let d = p.decide(&party(from), &party(to), l4);
        (d.action, d.by.label().to_string())
    }

    #[test]
    fn step_1_explicit_rules_first_in_order_on_their_ports() {
        let p = layered();
        // Beats within_stack = deny, on its port only.
        assert_eq!(
            decided(&p, "shop/web", "shop/db", tcp(5432)),
            (Action::Allow, "web-db".into())
        );
        assert_eq!(
            decided(&p, "shop/web", "shop/db", tcp(80)),
            (Action::Deny, "within_stack".into())
        );
        assert_eq!(
            decided(&p, "shop/web", "shop/db", Some((Protocol::Udp, 5432))),
            (Action::Deny, "within_stack".into())
        );
        // A rule with ports does not cover ICMP; one without does.
        assert_eq!(
            decided(&p, "shop/web", "shop/db", None),
            (Action::Deny, "within_stack".into())
        );
        assert_eq!(
            decided(&p, "ops/x", "shop/db", None),
            (Action::Allow, "ops-all".into())
        );
        let d = p.decide(&party("ops/x"), &party("shop/db"), None);
        assert_eq!(
            d.by,
            DecidedBy::Rule {
                index: 1,
                name: "ops-all".into()
            }
        );
        assert!(
            d.to_string()
                .starts_with("allow, decided by rule \"ops-all\" (rules[1])"),
            "{d}"
        );
        // First match wins: a later rule with the same match is not used.
        let mut p2 = p.clone();
        p2.rules.push(rule("later", "shop/web", "shop/db", &[]));
        assert_eq!(
            decided(&p2, "shop/web", "shop/db", tcp(5432)),
            (Action::Allow, "web-db".into())
        );
        assert_eq!(
            decided(&p2, "shop/web", "shop/db", tcp(1)),
            (Action::Allow, "later".into())
        );
    }

    #[test]
    fn step_2_within_service_needs_the_same_stack_and_service() {
        let p = layered();
        assert_eq!(
            decided(&p, "shop/db", "shop/db", tcp(1)),
            (Action::Allow, "within_service".into())
        );
        // Both without a service are not "the same service".
        assert_eq!(
            decided(&p, "shop", "shop", tcp(1)),
            (Action::Deny, "within_stack".into())
        );
        // Same service name in another stack is not the same service.
        assert_eq!(
            decided(&p, "pay/db", "shop/db", tcp(1)),
            (Action::Allow, "linked_stacks".into())
        );
    }

    #[test]
    fn step_3_within_stack_and_falling_through_when_unset() {
        let p = layered();
        assert_eq!(
            decided(&p, "shop/web", "shop/db", tcp(1)),
            (Action::Deny, "within_stack".into())
        );
        assert_eq!(
            decided(&p, "loose/a", "loose/a", tcp(1)),
            (Action::Allow, "within_stack".into())
        );
        // open sets neither within: its own traffic meets its ingress.
        assert_eq!(
            decided(&p, "open/a", "open/a", tcp(1)),
            (Action::Deny, "stack_ingress".into())
        );
    }

    #[test]
    fn step_4_linked_both_ways_before_ingress() {
        let p = layered();
        assert_eq!(
            decided(&p, "pay/x", "shop/web", tcp(1)),
            (Action::Allow, "linked_stacks".into())
        );
        assert_eq!(
            decided(&p, "shop/web", "pay/x", tcp(1)),
            (Action::Allow, "linked_stacks".into())
        );
        assert_eq!(
            decided(&p, "open/x", "shop/web", tcp(1)),
            (Action::Deny, "stack_ingress".into())
        );
    }

    #[test]
    fn step_5_ingress_and_step_6_default() {
        let mut p = layered();
        assert_eq!(
            decided(&p, "loose/x", "open/y", tcp(1)),
            (Action::Deny, "stack_ingress".into())
        );
        assert_eq!(
            decided(&p, "open/x", "loose/y", tcp(1)),
            (Action::Allow, "cluster_default".into())
        );
        // A stack the policy does not name: the default.
        assert_eq!(
            decided(&p, "shop/x", "other/y", tcp(1)),
            (Action::Allow, "cluster_default".into())
        );
        p.default = Action::Deny;
        assert_eq!(
            decided(&p, "open/x", "loose/y", tcp(1)),
            (Action::Deny, "cluster_default".into())
        );
        let d = p.decide(&party("open/x"), &party("loose/y"), tcp(1));
        assert_eq!(
            d.to_string(),
            "deny, decided by the cluster default: nothing more specific decided"
        );
    }

    #[test]
    fn containers_without_a_stack_match_only_any_and_the_default() {
        let mut p = layered();
        p.default = Action::Deny;
        // Two stackless containers are not "the same stack".
        assert_eq!(
            decided(&p, "-", "-", tcp(1)),
            (Action::Deny, "cluster_default".into())
        );
        assert_eq!(
            decided(&p, "-/web", "-/web", tcp(1)),
            (Action::Deny, "cluster_default".into())
        );
        assert_eq!(
            decided(&p, "-", "shop/web", tcp(1)),
            (Action::Deny, "stack_ingress".into())
        );
        p.rules.push(rule("any-in", "*", "shop/web", &[]));
        assert_eq!(
            decided(&p, "-", "shop/web", tcp(1)),
            (Action::Allow, "any-in".into())
        );
    }

    #[test]
    fn reach_lists_rule_ports_and_the_rest() {
        let p = layered();
        let r = p.reach(&party("shop/web"), &party("shop/db"));
        assert_eq!(r.all, None);
        assert_eq!(
            r.ports,
            vec![(
                "tcp/5432".parse().unwrap(),
                DecidedBy::Rule {
                    index: 0,
                    name: "web-db".into()
                }
            )]
        );
        let r = p.reach(&party("ops/a"), &party("shop/web"));
        assert_eq!(
            r.all,
            Some(DecidedBy::Rule {
                index: 1,
                name: "ops-all".into()
            })
        );
        let r = p.reach(&party("pay/a"), &party("shop/web"));
        assert_eq!(r.all, Some(DecidedBy::Linked));
        assert!(r.ports.is_empty());
    }

    #[test]
    fn labels_of_rules_and_built_in_reasons_never_collide() {
        for by in [
            DecidedBy::WithinService,
            DecidedBy::WithinStack,
            DecidedBy::Linked,
            DecidedBy::StackIngress,
            DecidedBy::ClusterDefault,
        ] {
            assert!(!rule_name_ok(by.label()), "{}", by.label());
        }
        assert!(rule_name_ok("web-to-api"));
        let json = serde_json::to_string(&DecidedBy::Rule {
            index: 2,
            name: "a".into(),
        })
        .unwrap();
        assert_eq!(json, r#"{"kind":"rule","index":2,"name":"a"}"#);
        assert_eq!(
            serde_json::to_string(&DecidedBy::StackIngress).unwrap(),
            r#"{"kind":"stack_ingress"}"#
        );
    }

    const STACKS: [&str; 3] = ["a", "b", "c"];
    const SERVICES: [&str; 2] = ["x", "y"];

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![Just(Action::Allow), Just(Action::Deny)]
    }

    fn proto() -> impl Strategy<Value = Protocol> {
        prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]
    }

    fn selector() -> impl Strategy<Value = Selector> {
        prop_oneof![
            Just(Selector::Any),
            prop::sample::select(&STACKS[..]).prop_map(|s| Selector::Stack(s.into())),
            (
                prop::sample::select(&STACKS[..]),
                prop::sample::select(&SERVICES[..])
            )
                .prop_map(|(s, v)| Selector::Service(s.into(), v.into())),
        ]
    }

    fn policy() -> impl Strategy<Value = Policy> {
        let stack_policy = (
            prop::option::of(action()),
            prop::option::of(action()),
            prop::option::of(action()),
            prop::sample::subsequence(&STACKS[..], 0..=2),
        )
            .prop_map(
                |(within_stack, within_service, ingress, linked)| StackPolicy {
                    within_stack,
                    within_service,
                    ingress,
                    linked: linked.into_iter().map(String::from).collect(),
                },
            );
        let rule = (
            selector(),
            selector(),
            prop::collection::vec(
                (proto(), 1u16..=4).prop_map(|(proto, port)| PortSpec { proto, port }),
                0..3,
            ),
        );
        (
            action(),
            prop::collection::btree_map(
                prop::sample::select(&STACKS[..]).prop_map(String::from),
                stack_policy,
                0..=3,
            ),
            prop::collection::vec(rule, 0..5),
        )
            .prop_map(|(default, stacks, rules)| Policy {
                default,
                stacks,
                rules: rules
                    .into_iter()
                    .enumerate()
                    .map(|(i, (from, to, ports))| Rule {
                        name: format!("r{i}"),
                        from,
                        to,
                        ports,
                    })
                    .collect(),
            })
    }

    fn party_strategy() -> impl Strategy<Value = Party> {
        (
            prop::option::of(prop::sample::select(&STACKS[..])),
            prop::option::of(prop::sample::select(&SERVICES[..])),
        )
            .prop_map(|(stack, service)| Party::new(stack, service))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// reach and decide agree for every port (and no port), by the same
        /// reason.
        #[test]
        fn reach_agrees_with_decide(
            p in policy(),
            from in party_strategy(),
            to in party_strategy(),
            l4 in prop::option::of((proto(), 1u16..=5)),
        ) {
            let d = p.decide(&from, &to, l4);
            let reach = p.reach(&from, &to);
            let want = (d.action == Action::Allow).then_some(&d.by);
            prop_assert_eq!(reach.allows(l4), want);
            let mut seen = std::collections::BTreeSet::new();
            prop_assert!(reach.ports.iter().all(|(port, _)| seen.insert(*port)), "a port listed twice");
        }

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
