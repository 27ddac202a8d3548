//! Answering one query from the table: the fast path, shared by UDP and TCP.
//! Writes into a caller buffer and allocates nothing.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::table::{Resolution, Table, Zone, A_RECORD_LEN};
use crate::wire::{
    answer_flags, parse_query, write_header, write_opt, write_reject, ParseError, Query, CLASS_ANY,
    CLASS_IN, EXT_RCODE_BADVERS, HEADER_LEN, OPT_LEN, RCODE_NOERROR, RCODE_NOTIMP, RCODE_NXDOMAIN,
    RCODE_REFUSED, TYPE_A, TYPE_ANY, TYPE_PTR, TYPE_SOA,
};

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send the first `n` bytes of the output buffer back.
    Reply(usize),
    /// Not ours: forward it upstream (the client may recurse).
    Forward,
    /// Send nothing.
    Drop,
}

/// Which clients may have names outside the cluster domain resolved
/// (forwarded): dnsd is not an open resolver.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    nets: Vec<IpNetwork>,
}

impl Acl {
    pub fn new(nets: Vec<IpNetwork>) -> Self {
        Acl { nets }
    }

    #[inline]
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(ip))
    }
}

/// Answers one packet from `client`. `tcp` lifts the size limit to the
/// buffer (up to 65535); over UDP answers are cut to what the client takes
/// (512 without EDNS, at most 1232 with it) with TC set.
pub fn handle(
    table: &Table,
    acl: &Acl,
    packet: &[u8],
    client: IpAddr,
    tcp: bool,
    out: &mut [u8],
) -> Action {
    match parse_query(packet) {
        Ok(q) => answer(table, acl, &q, packet, client, tcp, out),
        Err(ParseError::Drop) => Action::Drop,
        Err(ParseError::Reject { id, flags, rcode }) => match write_reject(out, id, flags, rcode) {
            0 => Action::Drop,
            n => Action::Reply(n),
        },
    }
}

/// Answers a parsed query (see [`handle`]).
pub fn answer(
    table: &Table,
    acl: &Acl,
    q: &Query,
    packet: &[u8],
    client: IpAddr,
    tcp: bool,
    out: &mut [u8],
) -> Action {
    let limit = if tcp {
        out.len().min(u16::MAX as usize)
    } else {
        q.udp_limit().min(out.len())
    };
    let Some(question) = packet.get(HEADER_LEN..q.question_end) else {
        return Action::Drop;
    };
    let w = Writer { q, question, limit };
    if HEADER_LEN + question.len() + w.opt_len() > limit {
        return Action::Drop;
    }
    if let Some(e) = q.edns {
        if e.version > 0 {
            return w.write(out, RCODE_NOERROR, &[], 1, &[], EXT_RCODE_BADVERS);
        }
    }
    if q.qclass != CLASS_IN && q.qclass != CLASS_ANY {
        return w.write(out, RCODE_NOTIMP, &[], 1, &[], 0);
    }
    let wants = |t: u16| q.qtype == t || q.qtype == TYPE_ANY;
    match table.resolve(&q.name, client) {
        Resolution::Addrs(e) => {
            if wants(TYPE_A) {
                w.write(
                    out,
                    RCODE_NOERROR,
                    e.rotated_records(),
                    A_RECORD_LEN,
                    &[],
                    0,
                )
            } else {
                w.write(out, RCODE_NOERROR, &[], 1, table.soa(Zone::Domain), 0)
            }
        }
        Resolution::Ptr(rec, zone) => {
            if wants(TYPE_PTR) {
                w.write(out, RCODE_NOERROR, rec, rec.len(), &[], 0)
            } else {
                w.write(out, RCODE_NOERROR, &[], 1, table.soa(zone), 0)
            }
        }
        Resolution::Apex(zone) => {
            let soa = table.soa(zone);
            if wants(TYPE_SOA) {
                w.write(out, RCODE_NOERROR, soa, soa.len(), &[], 0)
            } else {
                w.write(out, RCODE_NOERROR, &[], 1, soa, 0)
            }
        }
        Resolution::NoData(zone) => w.write(out, RCODE_NOERROR, &[], 1, table.soa(zone), 0),
        Resolution::NxDomain(zone) => w.write(out, RCODE_NXDOMAIN, &[], 1, table.soa(zone), 0),
        Resolution::External => {
            if acl.allows(client) {
                Action::Forward
            } else {
                w.write(out, RCODE_REFUSED, &[], 1, &[], 0)
            }
        }
    }
}

/// Writes an answer with the same question and EDNS as a query; SERVFAIL,
/// REFUSED and such for the forwarding path. Returns its length (0 if the
/// buffer cannot hold it).
pub fn write_simple(q: &Query, packet: &[u8], rcode: u8, out: &mut [u8]) -> usize {
    let Some(question) = packet.get(HEADER_LEN..q.question_end) else {
        return 0;
    };
    let w = Writer {
        q,
        question,
        limit: out.len(),
    };
    if HEADER_LEN + question.len() + w.opt_len() > out.len() {
        return 0;
    }
    match w.write(out, rcode, &[], 1, &[], 0) {
        Action::Reply(n) => n,
        _ => 0,
    }
}

/// Writes an answer with only header and question, TC set: for answers too
/// large for the client's UDP size.
pub fn write_truncated(q: &Query, packet: &[u8], out: &mut [u8]) -> usize {
    let Some(question) = packet.get(HEADER_LEN..q.question_end) else {
        return 0;
    };
    let w = Writer {
        q,
        question,
        limit: out.len(),
    };
    if HEADER_LEN + question.len() + w.opt_len() > out.len() {
        return 0;
    }
    let mut pos = HEADER_LEN;
    out[pos..pos + question.len()].copy_from_slice(question);
    pos += question.len();
    let ar = w.put_opt(out, &mut pos, 0);
    write_header(
        out,
        q.id,
        answer_flags(q.flags, RCODE_NOERROR, false, true),
        1,
        0,
        0,
        ar,
    );
    pos
}

struct Writer<'a> {
    q: &'a Query,
    question: &'a [u8],
    limit: usize,
}

impl Writer<'_> {
    fn opt_len(&self) -> usize {
        if self.q.edns.is_some() {
            OPT_LEN
        } else {
            0
        }
    }

    fn put_opt(&self, out: &mut [u8], pos: &mut usize, ext_rcode: u8) -> u16 {
        if self.q.edns.is_some() {
            write_opt(&mut out[*pos..*pos + OPT_LEN], ext_rcode);
            *pos += OPT_LEN;
            1
        } else {
            0
        }
    }

    /// Header, question, as many of `answers` (records of `rec_len` bytes
    /// each) as fit (TC when not all do), `authority` if it fits after them,
    /// and the OPT record when the query had one. The caller checked that
    /// header, question and OPT fit in `limit`.
    fn write(
        &self,
        out: &mut [u8],
        rcode: u8,
        answers: &[u8],
        rec_len: usize,
        authority: &[u8],
        ext_rcode: u8,
    ) -> Action {
        let avail = self.limit - self.opt_len();
        let mut pos = HEADER_LEN;
        out[pos..pos + self.question.len()].copy_from_slice(self.question);
        pos += self.question.len();
        let total = answers.len() / rec_len.max(1);
        let fit = total.min((avail - pos) / rec_len.max(1));
        let n = fit * rec_len;
        out[pos..pos + n].copy_from_slice(&answers[..n]);
        pos += n;
        let truncated = fit < total;
        let mut ns = 0;
        if !authority.is_empty() && !truncated && pos + authority.len() <= avail {
            out[pos..pos + authority.len()].copy_from_slice(authority);
            pos += authority.len();
            ns = 1;
        }
        let ar = self.put_opt(out, &mut pos, ext_rcode);
        write_header(
            out,
            self.q.id,
            answer_flags(self.q.flags, rcode, rcode != RCODE_REFUSED, truncated),
            1,
            fit as u16,
            ns,
            ar,
        );
        Action::Reply(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::tests::{cfg, endpoint, sample};
    use crate::wire::{name_from_str, TYPE_AAAA, TYPE_NS};
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::{RData, RecordType};

    fn query(name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut p = vec![0xAB, 0xCD, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 0];
        // Keep the client's case in the question.
        let mut wire = Vec::new();
        for label in name.split('.') {
            wire.push(label.len() as u8);
            wire.extend(label.as_bytes());
        }
        wire.push(0);
        p.extend(wire);
        p.extend(qtype.to_be_bytes());
        p.extend(CLASS_IN.to_be_bytes());
        if let Some(size) = edns {
            p[11] = 1;
            p.extend([0, 0, 41]);
            p.extend(size.to_be_bytes());
            p.extend([0, 0, 0, 0, 0, 0]);
        }
        p
    }

    fn table() -> Table {
        Table::build(&cfg(), &sample(), 3)
    }

    fn ask(t: &Table, p: &[u8], client: &str, tcp: bool) -> (Action, Vec<u8>) {
        let mut out = vec![0u8; if tcp { 65535 } else { 4096 }];
        let acl = Acl::new(vec!["10.42.0.0/16".parse().unwrap()]);
        let a = handle(t, &acl, p, client.parse().unwrap(), tcp, &mut out);
        let n = match a {
            Action::Reply(n) => n,
            _ => 0,
        };
        out.truncate(n);
        (a, out)
    }

    fn parsed(t: &Table, p: &[u8], client: &str, tcp: bool) -> Message {
        let (a, out) = ask(t, p, client, tcp);
        assert!(matches!(a, Action::Reply(_)), "{a:?}");
        Message::from_vec(&out).unwrap()
    }

    fn a_addrs(m: &Message) -> Vec<String> {
        let mut v: Vec<String> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_answer_keeps_question_case_and_id() {
        let t = table();
        let p = query("Web.Shop.WEFT.internal", TYPE_A, None);
        let (a, out) = ask(&t, &p, "10.42.0.2", false);
        assert_eq!(a, Action::Reply(out.len()));
        assert_eq!(&out[..2], &[0xAB, 0xCD]);
        // The question comes back byte for byte.
        assert_eq!(&out[12..p.len()], &p[12..]);
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert!(m.metadata.recursion_desired && m.metadata.recursion_available);
        assert_eq!(a_addrs(&m), vec!["10.42.0.2", "10.42.1.2"]);
        assert!(m.answers.iter().all(|r| r.ttl == 1));
        assert!(m.edns.is_none());
    }

    #[test]
    fn aaaa_for_known_name_is_empty_noerror() {
        let t = table();
        let m = parsed(
            &t,
            &query("web.shop.weft.internal", TYPE_AAAA, None),
            "10.42.0.2",
            false,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities.len(), 1);
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        let m = parsed(&t, &query("web", TYPE_NS, None), "10.42.0.3", false);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn nxdomain_carries_the_soa() {
        let t = table();
        let m = parsed(
            &t,
            &query("nothing.shop.weft.internal", TYPE_A, None),
            "10.42.0.2",
            false,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities.len(), 1);
        let soa = &m.authorities[0];
        assert_eq!(soa.name.to_string(), "weft.internal.");
        match &soa.data {
            RData::SOA(s) => {
                assert_eq!(s.minimum, 1);
                assert_eq!(s.mname.to_string(), "ns.weft.internal.");
                assert_eq!(s.serial, 3);
            }
            other => panic!("not an SOA: {other:?}"),
        }
        // The reverse zone too.
        let m = parsed(
            &t,
            &query("99.0.42.10.in-addr.arpa", TYPE_PTR, None),
            "10.42.0.2",
            false,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(m.authorities[0].name.to_string(), "42.10.in-addr.arpa.");
        // SOA at the apex.
        let m = parsed(
            &t,
            &query("weft.internal", TYPE_SOA, None),
            "10.42.0.2",
            false,
        );
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn ptr_answer() {
        let t = table();
        let m = parsed(
            &t,
            &query("2.0.42.10.in-addr.arpa", TYPE_PTR, Some(1232)),
            "10.42.0.2",
            false,
        );
        assert_eq!(m.answers.len(), 1);
        match &m.answers[0].data {
            RData::PTR(p) => assert_eq!(p.0.to_string(), "web-1.shop.weft.internal."),
            other => panic!("not a PTR: {other:?}"),
        }
        assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    }

    #[test]
    fn round_robin_across_queries() {
        let t = table();
        let p = query("web.shop", TYPE_A, None);
        let first: Vec<String> = (0..4)
            .map(|_| {
                let m = parsed(&t, &p, "10.42.0.2", false);
                match &m.answers[0].data {
                    RData::A(a) => a.0.to_string(),
                    _ => String::new(),
                }
            })
            .collect();
        assert_eq!(
            first,
            vec!["10.42.0.2", "10.42.1.2", "10.42.0.2", "10.42.1.2"]
        );
    }

    fn big_table(n: usize) -> Table {
        let eps: Vec<_> = (0..n)
            .map(|i| {
                endpoint(
                    &format!("c{i}"),
                    &format!("10.42.{}.{}", i / 200, 2 + i % 200),
                    Some(&format!("big-{i}")),
                    Some("big"),
                    Some("shop"),
                    &[],
                )
            })
            .collect();
        Table::build(&cfg(), &eps, 1)
    }

    #[test]
    fn truncation_without_edns_fills_512_bytes() {
        let t = big_table(50);
        let p = query("big.shop.weft.internal", TYPE_A, None);
        let (_, out) = ask(&t, &p, "10.42.0.2", false);
        assert!(out.len() <= 512, "{}", out.len());
        let m = Message::from_vec(&out).unwrap();
        assert!(m.metadata.truncation);
        // 12 + 28 question: (512 - 40) / 16 = 29 records.
        let fit = (512 - 12 - (p.len() - 12)) / 16;
        assert_eq!(m.answers.len(), fit);
        assert!(512 - out.len() < 16);
        // With EDNS 1232: more fit, still truncated (50 * 16 = 800 + ... fits!).
        let p = query("big.shop.weft.internal", TYPE_A, Some(4096));
        let (_, out) = ask(&t, &p, "10.42.0.2", false);
        let m = Message::from_vec(&out).unwrap();
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 50);
        assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(1232));
        // 100 records exceed 1232 bytes: truncated at the advertised size.
        let t = big_table(100);
        let (_, out) = ask(&t, &p, "10.42.0.2", false);
        assert!(out.len() <= 1232);
        let m = Message::from_vec(&out).unwrap();
        assert!(m.metadata.truncation);
        assert_eq!(m.answers.len(), (1232 - 11 - 40) / 16);
        // A client asking for less than 1232 gets that.
        let p = query("big.shop.weft.internal", TYPE_A, Some(800));
        let (_, out) = ask(&t, &p, "10.42.0.2", false);
        assert!(out.len() <= 800);
        // Over TCP: everything.
        let p = query("big.shop.weft.internal", TYPE_A, None);
        let m = parsed(&t, &p, "10.42.0.2", true);
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 100);
    }

    #[test]
    fn bad_edns_version_and_class() {
        let t = table();
        let mut p = query("web.shop", TYPE_A, Some(1232));
        let v = p.len() - 5;
        p[v] = 1; // EDNS version 1
        let (_, out) = ask(&t, &p, "10.42.0.2", false);
        let m = Message::from_vec(&out).unwrap();
        // BADVERS and BADSIG share the value 16.
        assert_eq!(u16::from(m.metadata.response_code), 16);
        assert!(m.answers.is_empty());
        let mut p = query("web.shop", TYPE_A, None);
        let c = p.len() - 1;
        p[c] = 3; // class CH
        let m = parsed(&t, &p, "10.42.0.2", false);
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    }

    #[test]
    fn external_names_forwarded_only_for_allowed_clients() {
        let t = table();
        let p = query("example.com", TYPE_A, None);
        assert_eq!(ask(&t, &p, "10.42.0.2", false).0, Action::Forward);
        let m = parsed(&t, &p, "192.0.2.7", false);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        // Our own names answer anyone who can reach the listener.
        let m = parsed(&t, &query("web.shop", TYPE_A, None), "192.0.2.7", false);
        assert_eq!(a_addrs(&m).len(), 2);
    }

    #[test]
    fn malformed_packets_get_formerr_or_nothing() {
        let t = table();
        assert_eq!(ask(&t, &[], "10.42.0.2", false).0, Action::Drop);
        assert_eq!(ask(&t, &[0; 11], "10.42.0.2", false).0, Action::Drop);
        // Truncated question: FORMERR with the id.
        let p = query("web.shop", TYPE_A, None);
        let (a, out) = ask(&t, &p[..p.len() - 2], "10.42.0.2", false);
        assert_eq!(a, Action::Reply(12));
        assert_eq!(&out[..2], &[0xAB, 0xCD]);
        assert_eq!(out[3] & 0xF, 1);
        assert!(out[2] & 0x80 != 0);
        // A response is never answered.
        let mut p = query("web.shop", TYPE_A, None);
        p[2] |= 0x80;
        assert_eq!(ask(&t, &p, "10.42.0.2", false).0, Action::Drop);
    }

    #[test]
    fn simple_and_truncated_writers() {
        let p = query("example.com", TYPE_A, Some(1232));
        let q = parse_query(&p).unwrap();
        let mut out = vec![0u8; 512];
        let n = write_simple(&q, &p, crate::wire::RCODE_SERVFAIL, &mut out);
        let m = Message::from_vec(&out[..n]).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(m.queries.len(), 1);
        let n = write_truncated(&q, &p, &mut out);
        let m = Message::from_vec(&out[..n]).unwrap();
        assert!(m.metadata.truncation);
        assert!(name_from_str("example.com").is_some());
    }
}
