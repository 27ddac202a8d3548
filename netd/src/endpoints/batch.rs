//! The pure batching decisions of this host's endpoint changes: which of
//! the queued requests one batch takes ([`take`]), what each of them does
//! against this host's endpoints ([`plan`]), and whether the batch applies
//! the nf_tables tables or leaves them to a later batch or the idle worker
//! ([`enforce_now`], [`when_idle`]).
//!
//! A batch holds at most one change per endpoint (container id and
//! interface): an ADD and a DEL of the same endpoint, or two of either, go
//! to consecutive batches in the order they came, so every request sees
//! the effect of the ones before it. It also holds at most one ADD that
//! publishes ports: the port-conflict rule then only has to look at the
//! recorded endpoints, and a failed NAT update is that request's alone.

use std::collections::{BTreeMap, HashSet};

use weft_api::ApiError;
use weft_model::{ContainerId, EndpointRecord, IfName};

use super::{check_port_conflicts, NewEndpoint};

/// An endpoint of this host, by container id and interface.
pub type Key = (ContainerId, IfName);

/// This host's endpoint records by key.
pub type Set = BTreeMap<Key, EndpointRecord>;

/// The most requests one batch takes (the rest wait for the next one).
pub const MAX_BATCH: usize = 64;

/// The most batches of deletes in a row that may leave the nf_tables step
/// to a later batch ([`enforce_now`]).
pub const MAX_DEFERRED: usize = 8;

/// How long the worker waits for more requests, once the queue is empty,
/// before it applies the nf_tables step that batches of deletes left
/// ([`when_idle`]).
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

/// Whether a batch applies the nf_tables tables now. A batch with adds
/// does (they are answered only after it: anti-spoofing has no window); a
/// batch of deletes only (their veths are gone: the plugin deletes them
/// first) leaves it to a later batch or to the worker once idle
/// ([`when_idle`]), which apply the whole set anyway, at most
/// [`MAX_DEFERRED`] times in a row. A burst of deletes then costs one
/// transaction, and none of them waits for the one before.
pub fn enforce_now(adds: bool, deferred: usize) -> bool {
    adds || deferred >= MAX_DEFERRED
}

/// What the worker does when the queue is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Nothing is owed: the worker ends.
    Exit,
    /// Batches of deletes left the nf_tables step: wait up to [`LINGER`]
    /// for more requests (a burst's next DELs) first.
    Linger,
    /// Waited already: apply the step now.
    Enforce,
}

/// The worker's next move with an empty queue, `deferred` batches having
/// left the nf_tables step, after a linger or not.
pub fn when_idle(deferred: usize, lingered: bool) -> Idle {
    match (deferred, lingered) {
        (0, _) => Idle::Exit,
        (_, false) => Idle::Linger,
        (_, true) => Idle::Enforce,
    }
}

/// A queued request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Add an endpoint (checked by [`super::validate_add`]).
    Add(NewEndpoint),
    /// Delete the endpoint, and its address.
    Del(Key),
}

impl Change {
    pub fn key(&self) -> Key {
        match self {
            Change::Add(n) => (n.container_id.clone(), n.ifname.clone()),
            Change::Del(k) => k.clone(),
        }
    }

    fn publishes_ports(&self) -> bool {
        matches!(self, Change::Add(n) if !n.port_mappings.is_empty())
    }
}

/// What one request of a batch does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A retried add: the endpoint is recorded already; it is answered once
    /// the batch is enforced.
    Existing(EndpointRecord),
    /// A new endpoint: allocate, record, publish, enforce.
    Create(NewEndpoint),
    /// An add refused up front (a port another endpoint publishes).
    Refuse(ApiError),
    /// A delete: its record, if there is one, and its address (released
    /// even without a record: an add may have died between allocating and
    /// recording).
    Remove(Key, Option<EndpointRecord>),
}

/// How many requests from the front of `queue` the next batch takes: all
/// up to the first that touches an endpoint an earlier one of the batch
/// touches, or that publishes ports when an earlier add of the batch does
/// too; at most [`MAX_BATCH`]. At least one when `queue` has any.
pub fn take<'a>(queue: impl IntoIterator<Item = &'a Change>) -> usize {
    let mut keys = HashSet::new();
    let mut publishing = false;
    let mut n = 0;
    for change in queue.into_iter().take(MAX_BATCH) {
        if !keys.insert(change.key()) {
            break;
        }
        if change.publishes_ports() {
            if publishing {
                break;
            }
            publishing = true;
        }
        n += 1;
    }
    n
}

/// The steps of `batch` (one per request, in order) against this host's
/// endpoints `set`. A delete earlier in the batch frees its ports for a
/// later add; a later one does not.
pub fn plan(set: &Set, batch: &[Change]) -> Vec<Step> {
    let mut removed: HashSet<Key> = HashSet::new();
    batch
        .iter()
        .map(|change| match change {
            Change::Del(key) => {
                removed.insert(key.clone());
                Step::Remove(key.clone(), set.get(key).cloned())
            }
            Change::Add(new) => {
                let key = change.key();
                if let Some(existing) = set.get(&key) {
                    return Step::Existing(existing.clone());
                }
                if !new.port_mappings.is_empty() {
                    let others: Vec<EndpointRecord> = set
                        .iter()
                        .filter(|(k, _)| !removed.contains(*k))
                        .map(|(_, r)| r.clone())
                        .collect();
                    if let Err(e) = check_port_conflicts(&new.port_mappings, &others) {
                        return Step::Refuse(e);
                    }
                }
                Step::Create(new.clone())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use weft_api::{ErrorKind, PortMapping, Protocol};

    use super::*;

    fn new(id: &str, ports: &[u16]) -> NewEndpoint {
        NewEndpoint {
            container_id: ContainerId::new(id).unwrap(),
            ifname: IfName::new("eth0").unwrap(),
            netns: String::new(),
            name: None,
            service: None,
            stack: None,
            aliases: vec![],
            port_mappings: ports
                .iter()
                .map(|&p| PortMapping {
                    host_port: p,
                    container_port: 80,
                    protocol: Protocol::Tcp,
                    host_ip: None,
                })
                .collect(),
        }
    }

    fn add(id: &str, ports: &[u16]) -> Change {
        Change::Add(new(id, ports))
    }

    fn del(id: &str) -> Change {
        Change::Del(key(id))
    }

    fn key(id: &str) -> Key {
        (ContainerId::new(id).unwrap(), IfName::new("eth0").unwrap())
    }

    fn record(id: &str, ports: &[u16]) -> EndpointRecord {
        let mut v = serde_json::json!({
            "container_id": id, "ifname": "eth0", "netns": "", "host_id": "h0",
            "address": "10.42.0.2/24", "gateway": "10.42.0.1", "mtu": 1420,
            "bridge": "weft0",
            "dns": {"nameservers": [], "domain": "weft.internal", "search": []},
            "created_at_ms": 0
        });
        v["port_mappings"] = serde_json::to_value(new(id, ports).port_mappings).unwrap();
        serde_json::from_value(v).unwrap()
    }

    fn set(records: &[EndpointRecord]) -> Set {
        records
            .iter()
            .map(|r| ((r.container_id.clone(), r.ifname.clone()), r.clone()))
            .collect()
    }

    #[test]
    fn concurrent_changes_of_different_endpoints_go_in_one_batch() {
        let q = [del("a"), del("b"), add("c", &[]), del("d"), add("e", &[])];
        assert_eq!(take(&q), 5);
        assert_eq!(take(&[]), 0);
        assert_eq!(take(&q[..1]), 1);
    }

    #[test]
    fn a_second_change_of_one_endpoint_waits_for_the_next_batch() {
        let q = [add("a", &[]), del("b"), del("a"), add("c", &[])];
        assert_eq!(take(&q), 2);
        // The next batch starts at the second change of "a".
        assert_eq!(take(&q[2..]), 2);
        // The same request twice (a runtime retrying).
        assert_eq!(take(&[del("a"), del("a")]), 1);
    }

    #[test]
    fn one_add_that_publishes_ports_per_batch() {
        let q = [
            add("a", &[8080]),
            add("b", &[]),
            del("x"),
            add("c", &[9090]),
            add("d", &[]),
        ];
        assert_eq!(take(&q), 3);
        assert_eq!(take(&q[3..]), 2);
        // Deletes of endpoints with ports are not limited.
        assert_eq!(take(&[del("a"), del("b"), add("c", &[80])]), 3);
    }

    #[test]
    fn a_batch_is_bounded() {
        let q: Vec<Change> = (0..MAX_BATCH + 10).map(|i| del(&format!("c{i}"))).collect();
        assert_eq!(take(&q), MAX_BATCH);
    }

    #[test]
    fn deletes_leave_nf_tables_to_a_later_batch_or_the_idle_worker() {
        // Adds wait for their anti-spoofing entries.
        assert!(enforce_now(true, 0));
        assert!(enforce_now(true, 3));
        // Deletes leave it, up to a bound.
        assert!(!enforce_now(false, 0));
        assert!(!enforce_now(false, MAX_DEFERRED - 1));
        assert!(enforce_now(false, MAX_DEFERRED));
        // Once idle: nothing owed, the worker ends; else it waits a little
        // for more requests, then applies what is owed.
        assert_eq!(when_idle(0, false), Idle::Exit);
        assert_eq!(when_idle(0, true), Idle::Exit);
        assert_eq!(when_idle(2, false), Idle::Linger);
        assert_eq!(when_idle(2, true), Idle::Enforce);
    }

    #[test]
    fn steps_follow_the_set_and_the_order() {
        let s = set(&[record("old", &[8080]), record("other", &[])]);
        let steps = plan(
            &s,
            &[
                add("other", &[]),
                add("new", &[]),
                del("gone"),
                add("clash", &[8080]),
            ],
        );
        assert_eq!(steps[0], Step::Existing(record("other", &[])));
        assert_eq!(steps[1], Step::Create(new("new", &[])));
        assert_eq!(steps[2], Step::Remove(key("gone"), None));
        match &steps[3] {
            Step::Refuse(e) => {
                assert_eq!(e.kind, ErrorKind::InvalidRequest);
                assert!(e.message.contains("container old"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        // A delete earlier in the batch frees the port; a later one does not.
        let steps = plan(&s, &[del("old"), add("clash", &[8080])]);
        assert_eq!(
            steps[0],
            Step::Remove(key("old"), Some(record("old", &[8080])))
        );
        assert_eq!(steps[1], Step::Create(new("clash", &[8080])));
        let steps = plan(&s, &[add("clash", &[8080]), del("old")]);
        assert!(matches!(steps[0], Step::Refuse(_)), "{:?}", steps[0]);
    }
}
