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
    let wrong = wrongs(s, lives);
    (!wrong.is_empty()).then(|| describe(s, &wrong))
}

/// One sentence for a wrong answer: when, where, what was asked, what was
/// wrong.
pub fn describe(s: &DnsSample, wrong: &[Wrong]) -> String {
    let head = format!("{} h{} {}", at(s.sent_ms), s.host, query_label(s));
    let what: Vec<&str> = wrong.iter().map(|w| w.text.as_str()).collect();
    format!("{head}: {}", what.join("; "))
}

/// What kind of wrong an answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrongKind {
    /// A live container's address is not in the answer.
    Missing,
    /// A deleted container's address still is.
    Stale,
    /// An address no container of the service ever had (e.g. one whose ADD
    /// failed and was rolled back: the runtime never saw it).
    Unexpected(Ipv4Addr),
    /// No answer, an error rcode, an absent name answered, an unknown id.
    Failed,
}

/// One thing wrong with an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrong {
    pub kind: WrongKind,
    pub text: String,
}

impl Wrong {
    fn new(kind: WrongKind, text: String) -> Self {
        Wrong { kind, text }
    }
}

/// Everything wrong with one answer (empty: right); see [`judge_dns`].
pub fn wrongs(s: &DnsSample, lives: &[Life]) -> Vec<Wrong> {
    let failed = |text: String| vec![Wrong::new(WrongKind::Failed, text)];
    let addrs: &[Ipv4Addr] = match &s.answer {
        DnsAnswer::Timeout => return failed("no answer".into()),
        DnsAnswer::Error(rc) => return failed(format!("rcode {rc}")),
        DnsAnswer::NxDomain => &[],
        DnsAnswer::Addrs(a) => a,
    };
    match &s.query {
        DnsQuery::Absent => match &s.answer {
            DnsAnswer::NxDomain => vec![],
            _ => failed(format!("{addrs:?}, not NXDOMAIN")),
        },
        DnsQuery::Container { id } => match lives.iter().rev().find(|l| &l.id == id) {
            Some(l) => judge_members(s, std::slice::from_ref(l), addrs, false),
            None => failed("no such container recorded".into()),
        },
        DnsQuery::Tasks { service, stack } => {
            let members: Vec<Life> = lives
                .iter()
                .filter(|l| l.service.as_ref() == Some(service) && &l.stack == stack)
                .cloned()
                .collect();
            judge_members(s, &members, addrs, true)
        }
    }
}

/// What is missing, stale or unexpected in `addrs` for `members`.
fn judge_members(s: &DnsSample, members: &[Life], addrs: &[Ipv4Addr], strict: bool) -> Vec<Wrong> {
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
        wrong.push(Wrong::new(
            WrongKind::Missing,
            format!("missing {} ({}, added {})", l.addr, l.id, at(l.added_ms)),
        ));
    }
    let mut stale = BTreeSet::new();
    for l in members.iter().filter(|l| gone(l)) {
        if addrs.contains(&l.addr) && !may.contains(&l.addr) && stale.insert(l.addr) {
            wrong.push(Wrong::new(
                WrongKind::Stale,
                format!(
                    "stale {} ({}, deleted {})",
                    l.addr,
                    l.id,
                    at(l.deleted_ms.unwrap_or_default())
                ),
            ));
        }
    }
    if strict {
        for a in addrs {
            if !members.iter().any(|l| l.addr == *a) {
                wrong.push(Wrong::new(
                    WrongKind::Unexpected(*a),
                    format!("unexpected {a}"),
                ));
            }
        }
    }
    wrong
}
