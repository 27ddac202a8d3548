//! The one decision: what happens to a connection from one [`Party`] to
//! another, and why ([`Decision`], [`DecidedBy`]).
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
//!
//! [`Policy::reach`] gives the same answer per pair of parties for every
//! port at once, for the kernel's sets (a property test keeps the two in
//! agreement).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Action, Party, Policy, PortSpec};
use crate::Protocol;

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
impl Policy {
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
    use crate::policy::rule_name_ok;
    use crate::policy::testing::*;
    use proptest::prelude::*;

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
    }
}
