//! (e) DNS: the one rule for whether an answer is right ([`judge_dns`],
//! called online by the traffic probes, and by [`super::dns`] again for
//! the kept samples).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::at;
use crate::soak::timeline::{DnsAnswer, DnsQuery, DnsSample, Life, Ms};

/// The DNS invariant's name in its [`Verdict`].
pub const DNS_INVARIANT: &str = "DNS right within 1 s";

/// DNS must answer a container more than this after its ADD answered, and
/// must not answer it more than this after its DEL answered (the issue's
/// "never more than 1 s").
pub const DNS_SLACK_MS: Ms = 1_000;

pub(super) fn query_label(s: &DnsSample) -> String {
    match &s.query {
        DnsQuery::Container { id } => format!("{} ({id})", s.name),
        _ => s.name.clone(),
    }
}

/// Whether one DNS answer is right, judged against `lives` (every life
/// recorded so far; the traffic probes call this online). `None`: right;
/// else why not, one sentence with the time and ids.
///
/// * a container's name: must contain its address once its ADD answered
///   [`DNS_SLACK_MS`] before the query was sent, unless its DEL was sent
///   before the answer came; must not contain it once its DEL answered
///   [`DNS_SLACK_MS`] before the query;
/// * `tasks.<service>`: the same for every container of the service, and no
///   address that no container of the service ever had;
/// * a name that never existed: NXDOMAIN;
/// * no answer or an error rcode: always wrong.
pub fn judge_dns(s: &DnsSample, lives: &[Life]) -> Option<String> {
    let head = || format!("{} h{} {}", at(s.sent_ms), s.host, query_label(s));
    let addrs: &[Ipv4Addr] = match &s.answer {
        DnsAnswer::Timeout => return Some(format!("{}: no answer", head())),
        DnsAnswer::Error(rc) => return Some(format!("{}: rcode {rc}", head())),
        DnsAnswer::NxDomain => &[],
        DnsAnswer::Addrs(a) => a,
    };
    match &s.query {
        DnsQuery::Absent => match &s.answer {
            DnsAnswer::NxDomain => None,
            _ => Some(format!("{}: {addrs:?}, not NXDOMAIN", head())),
        },
        DnsQuery::Container { id } => match lives.iter().rev().find(|l| &l.id == id) {
            Some(l) => judge_members(s, std::slice::from_ref(l), addrs, false)
                .map(|w| format!("{}: {w}", head())),
            None => Some(format!("{}: no such container recorded", head())),
        },
        DnsQuery::Tasks { service, stack } => {
            let members: Vec<Life> = lives
                .iter()
                .filter(|l| l.service.as_ref() == Some(service) && &l.stack == stack)
                .cloned()
                .collect();
            judge_members(s, &members, addrs, true).map(|w| format!("{}: {w}", head()))
        }
    }
}

/// What is missing, stale or unexpected in `addrs` for `members`.
fn judge_members(
    s: &DnsSample,
    members: &[Life],
    addrs: &[Ipv4Addr],
    strict: bool,
) -> Option<String> {
    let must = |l: &Life| {
        l.added_ms + DNS_SLACK_MS <= s.sent_ms && l.del_sent_ms.is_none_or(|d| d > s.answered_ms)
    };
    let gone = |l: &Life| l.deleted_ms.is_some_and(|d| d + DNS_SLACK_MS <= s.sent_ms);
    let may: BTreeSet<Ipv4Addr> = members
        .iter()
        .filter(|l| l.add_sent_ms <= s.answered_ms && !gone(l))
        .map(|l| l.addr)
        .collect();
    let mut wrong = Vec::new();
    for l in members
        .iter()
        .filter(|l| must(l) && !addrs.contains(&l.addr))
    {
        wrong.push(format!(
            "missing {} ({}, added {})",
            l.addr,
            l.id,
            at(l.added_ms)
        ));
    }
    let mut stale = BTreeSet::new();
    for l in members.iter().filter(|l| gone(l)) {
        if addrs.contains(&l.addr) && !may.contains(&l.addr) && stale.insert(l.addr) {
            wrong.push(format!(
                "stale {} ({}, deleted {})",
                l.addr,
                l.id,
                at(l.deleted_ms.unwrap_or_default())
            ));
        }
    }
    if strict {
        for a in addrs {
            if !members.iter().any(|l| l.addr == *a) {
                wrong.push(format!("unexpected {a}"));
            }
        }
    }
    (!wrong.is_empty()).then(|| wrong.join("; "))
}
