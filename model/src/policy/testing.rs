//! Shared by the policy modules' tests: shorthands that parse parties,
//! rules and stack settings, and proptest strategies for whole documents
//! and parties over a few stacks and services.

use proptest::prelude::*;

use super::{Action, Party, Policy, PortSpec, Rule, Selector, StackPolicy};
use crate::Protocol;

pub(super) fn party(s: &str) -> Party {
    s.parse().unwrap()
}

pub(super) fn tcp(port: u16) -> Option<(Protocol, u16)> {
    Some((Protocol::Tcp, port))
}

pub(super) fn rule(name: &str, from: &str, to: &str, ports: &[&str]) -> Rule {
    Rule {
        name: name.into(),
        from: from.parse().unwrap(),
        to: to.parse().unwrap(),
        ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
    }
}

pub(super) fn stack(
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

const STACKS: [&str; 3] = ["a", "b", "c"];
const SERVICES: [&str; 2] = ["x", "y"];

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![Just(Action::Allow), Just(Action::Deny)]
}

pub(super) fn proto() -> impl Strategy<Value = Protocol> {
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

pub(super) fn policy() -> impl Strategy<Value = Policy> {
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

pub(super) fn party_strategy() -> impl Strategy<Value = Party> {
    (
        prop::option::of(prop::sample::select(&STACKS[..])),
        prop::option::of(prop::sample::select(&SERVICES[..])),
    )
        .prop_map(|(stack, service)| Party::new(stack, service))
}
