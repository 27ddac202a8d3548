//! The part of the DNS wire format (RFC 1035, RFC 6891) dnsd needs, by hand:
//! parsing a query (header, the one question, the OPT record) without
//! allocating, and small helpers to write answers into caller buffers.
//!
//! Everything here takes untrusted bytes: every read is bounds-checked and a
//! malformed packet yields [`ParseError`], never a panic.

/// Length of the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// Longest name in wire form, terminating zero included (RFC 1035 2.3.4).
pub const MAX_NAME_LEN: usize = 255;
/// Longest label.
pub const MAX_LABEL_LEN: usize = 63;
/// Most labels a 255-byte name can hold (127 one-byte labels and the root).
pub const MAX_LABELS: usize = 128;
/// The UDP payload size dnsd advertises and honours at most (the DNS flag
/// day 2020 value: no IP fragmentation on any usual path).
pub const EDNS_UDP_SIZE: u16 = 1232;
/// UDP answers to clients without EDNS are at most this long.
pub const PLAIN_UDP_SIZE: usize = 512;
/// Length of an OPT record without options.
pub const OPT_LEN: usize = 11;

pub const TYPE_A: u16 = 1;
pub const TYPE_NS: u16 = 2;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;
pub const CLASS_ANY: u16 = 255;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;
/// Extended rcode BADVERS (16), carried as 1 in the OPT record's upper bits.
pub const EXT_RCODE_BADVERS: u8 = 1;

pub const FLAG_QR: u16 = 0x8000;
pub const MASK_OPCODE: u16 = 0x7800;
pub const FLAG_AA: u16 = 0x0400;
pub const FLAG_TC: u16 = 0x0200;
pub const FLAG_RD: u16 = 0x0100;
pub const FLAG_RA: u16 = 0x0080;
pub const FLAG_CD: u16 = 0x0010;
/// The DO bit in the OPT record's TTL field.
pub const EDNS_FLAG_DO: u16 = 0x8000;

/// Reads a big-endian u16 at `at`, if the packet is long enough.
#[inline]
pub fn get_u16(p: &[u8], at: usize) -> Option<u16> {
    let b = p.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

/// A name in wire form, lowercased, with the offsets of its labels. Lives on
/// the stack: parsing a query allocates nothing.
#[derive(Clone)]
pub struct Name {
    bytes: [u8; MAX_NAME_LEN],
    len: u8,
    labels: [u8; MAX_LABELS],
    count: u8,
}

impl Name {
    pub fn root() -> Self {
        let mut n = Name {
            bytes: [0; MAX_NAME_LEN],
            len: 1,
            labels: [0; MAX_LABELS],
            count: 0,
        };
        n.bytes[0] = 0;
        n
    }

    /// The wire form, terminating zero included.
    #[inline]
    pub fn wire(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// Number of labels (the root counts none).
    #[inline]
    pub fn label_count(&self) -> usize {
        self.count as usize
    }

    /// The wire form from label `i` on (label `i` and every one after it, and
    /// the terminating zero). `suffix(label_count())` is the root.
    #[inline]
    pub fn suffix(&self, i: usize) -> &[u8] {
        let start = if i >= self.count as usize {
            self.len as usize - 1
        } else {
            self.labels[i] as usize
        };
        &self.bytes[start..self.len as usize]
    }

    /// Label `i` without its length byte.
    pub fn label(&self, i: usize) -> &[u8] {
        if i >= self.count as usize {
            return &[];
        }
        let at = self.labels[i] as usize;
        let len = self.bytes[at] as usize;
        &self.bytes[at + 1..at + 1 + len]
    }

    /// Label `i` with its length byte.
    pub fn label_wire(&self, i: usize) -> &[u8] {
        if i >= self.count as usize {
            return &[];
        }
        let at = self.labels[i] as usize;
        let len = self.bytes[at] as usize;
        &self.bytes[at..at + 1 + len]
    }

    /// Whether the name is `zone` or below it (`zone` in lowercase wire form).
    pub fn is_at_or_under(&self, zone: &[u8], zone_labels: usize) -> bool {
        self.label_count() >= zone_labels && self.suffix(self.label_count() - zone_labels) == zone
    }

    /// Parses an uncompressed name at `pos` (as in a question), lowercasing it.
    /// Returns the name and the position after it; `None` if it is truncated,
    /// compressed, too long, or uses a reserved label type.
    pub fn parse(p: &[u8], mut pos: usize) -> Option<(Name, usize)> {
        let mut n = Name {
            bytes: [0; MAX_NAME_LEN],
            len: 0,
            labels: [0; MAX_LABELS],
            count: 0,
        };
        let mut len = 0usize;
        loop {
            let l = *p.get(pos)? as usize;
            if l == 0 {
                if len + 1 > MAX_NAME_LEN {
                    return None;
                }
                n.bytes[len] = 0;
                n.len = (len + 1) as u8;
                return Some((n, pos + 1));
            }
            // Compression pointers (0xC0) and the reserved 0x40/0x80 label
            // types have no place in a question.
            if l > MAX_LABEL_LEN {
                return None;
            }
            if len + 1 + l + 1 > MAX_NAME_LEN || n.count as usize >= MAX_LABELS {
                return None;
            }
            let label = p.get(pos + 1..pos + 1 + l)?;
            n.labels[n.count as usize] = len as u8;
            n.count += 1;
            n.bytes[len] = l as u8;
            for (dst, src) in n.bytes[len + 1..len + 1 + l].iter_mut().zip(label) {
                *dst = src.to_ascii_lowercase();
            }
            len += 1 + l;
            pos += 1 + l;
        }
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&name_to_string(self.wire()))
    }
}

/// Turns a wire-form name into dotted text (for logs and tests), escaping
/// bytes that are not printable.
pub fn name_to_string(wire: &[u8]) -> String {
    let mut out = String::new();
    let mut pos = 0;
    while let Some(&l) = wire.get(pos) {
        if l == 0 || l as usize > MAX_LABEL_LEN {
            break;
        }
        let Some(label) = wire.get(pos + 1..pos + 1 + l as usize) else {
            break;
        };
        for &b in label {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                out.push(b as char);
            } else {
                out.push_str(&format!("\\{b:03}"));
            }
        }
        out.push('.');
        pos += 1 + l as usize;
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// Encodes a dotted name (`web.shop.weft.internal`, a trailing dot is fine)
/// in lowercase wire form. `None` if a label is empty or too long, the name
/// is too long, or it holds characters other than letters, digits, `-`, `_`.
pub fn name_from_str(name: &str) -> Option<Vec<u8>> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut out = Vec::with_capacity(name.len() + 2);
    if !name.is_empty() {
        for label in name.split('.') {
            if label.is_empty()
                || label.len() > MAX_LABEL_LEN
                || !label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return None;
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    (out.len() <= MAX_NAME_LEN).then_some(out)
}

/// Number of labels of a wire-form name.
pub fn wire_label_count(wire: &[u8]) -> usize {
    let mut pos = 0;
    let mut n = 0;
    while let Some(&l) = wire.get(pos) {
        if l == 0 {
            break;
        }
        n += 1;
        pos += 1 + l as usize;
    }
    n
}

/// The EDNS parameters of a query (its OPT record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// The requester's UDP payload size (values under 512 count as 512).
    pub udp_size: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

/// A parsed query: what the answer needs from it.
#[derive(Debug, Clone)]
pub struct Query {
    pub id: u16,
    pub flags: u16,
    /// The question name, lowercased.
    pub name: Name,
    pub qtype: u16,
    pub qclass: u16,
    /// Offset just past the question in the packet: `packet[12..question_end]`
    /// is the question as the client wrote it (its case kept).
    pub question_end: usize,
    pub edns: Option<Edns>,
    /// Offset of the OPT record's class field (the UDP size) in the packet.
    pub opt_size_at: Option<usize>,
}

impl Query {
    /// The largest answer this client takes over UDP.
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            Some(e) => (e.udp_size as usize).clamp(PLAIN_UDP_SIZE, EDNS_UDP_SIZE as usize),
            None => PLAIN_UDP_SIZE,
        }
    }
}

/// Why a packet is not a query dnsd can answer normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not worth any answer: shorter than a header, or a response (answering
    /// responses could start a loop between two servers).
    Drop,
    /// Answer with just a header carrying this rcode (FORMERR, NOTIMP).
    Reject { id: u16, flags: u16, rcode: u8 },
}

/// One resource record as [`next_record`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct RecordInfo {
    /// The owner name is the root (a single zero byte).
    pub root_owner: bool,
    pub rtype: u16,
    /// Offset of the class field.
    pub class_at: usize,
    /// Offset of the TTL field.
    pub ttl_at: usize,
    /// Offset of the RDATA.
    pub rdata_at: usize,
    pub rdata_len: usize,
    /// Offset just past the record.
    pub end: usize,
}

/// Skips a possibly compressed name at `pos`; the position after it.
pub fn skip_name(p: &[u8], mut pos: usize) -> Option<usize> {
    // At most 128 labels fit in a name; a longer walk is malformed.
    for _ in 0..=MAX_LABELS {
        let l = *p.get(pos)?;
        match l & 0xC0 {
            0x00 if l == 0 => return Some(pos + 1),
            0x00 => {
                pos += 1 + l as usize;
                if pos > p.len() {
                    return None;
                }
            }
            0xC0 => {
                p.get(pos + 1)?;
                return Some(pos + 2);
            }
            _ => return None,
        }
    }
    None
}

/// Reads the record at `pos`.
pub fn next_record(p: &[u8], pos: usize) -> Option<RecordInfo> {
    let after_name = skip_name(p, pos)?;
    let rtype = get_u16(p, after_name)?;
    let rdata_len = get_u16(p, after_name + 8)? as usize;
    let rdata_at = after_name + 10;
    let end = rdata_at + rdata_len;
    if end > p.len() {
        return None;
    }
    Some(RecordInfo {
        root_owner: after_name == pos + 1 && p[pos] == 0,
        rtype,
        class_at: after_name + 2,
        ttl_at: after_name + 4,
        rdata_at,
        rdata_len,
        end,
    })
}

/// Parses a query. Never panics, never allocates.
pub fn parse_query(p: &[u8]) -> Result<Query, ParseError> {
    if p.len() < HEADER_LEN {
        return Err(ParseError::Drop);
    }
    let id = u16::from_be_bytes([p[0], p[1]]);
    let flags = u16::from_be_bytes([p[2], p[3]]);
    if flags & FLAG_QR != 0 {
        return Err(ParseError::Drop);
    }
    let reject = |rcode| Err(ParseError::Reject { id, flags, rcode });
    if flags & MASK_OPCODE != 0 {
        return reject(RCODE_NOTIMP);
    }
    let qdcount = u16::from_be_bytes([p[4], p[5]]);
    let ancount = u16::from_be_bytes([p[6], p[7]]) as usize;
    let nscount = u16::from_be_bytes([p[8], p[9]]) as usize;
    let arcount = u16::from_be_bytes([p[10], p[11]]) as usize;
    if qdcount != 1 {
        return reject(RCODE_FORMERR);
    }
    let Some((name, pos)) = Name::parse(p, HEADER_LEN) else {
        return reject(RCODE_FORMERR);
    };
    let (Some(qtype), Some(qclass)) = (get_u16(p, pos), get_u16(p, pos + 2)) else {
        return reject(RCODE_FORMERR);
    };
    let question_end = pos + 4;
    let mut pos = question_end;
    for _ in 0..ancount + nscount {
        match next_record(p, pos) {
            Some(r) => pos = r.end,
            None => return reject(RCODE_FORMERR),
        }
    }
    let mut edns = None;
    let mut opt_size_at = None;
    for _ in 0..arcount {
        let Some(r) = next_record(p, pos) else {
            return reject(RCODE_FORMERR);
        };
        if r.rtype == TYPE_OPT {
            // One OPT at most, owned by the root (RFC 6891 6.1.1).
            if edns.is_some() || !r.root_owner {
                return reject(RCODE_FORMERR);
            }
            let size = get_u16(p, r.class_at).unwrap_or(0);
            let version = p[r.ttl_at + 1];
            let eflags = get_u16(p, r.ttl_at + 2).unwrap_or(0);
            edns = Some(Edns {
                udp_size: size.max(PLAIN_UDP_SIZE as u16),
                version,
                dnssec_ok: eflags & EDNS_FLAG_DO != 0,
            });
            opt_size_at = Some(r.class_at);
        }
        pos = r.end;
    }
    Ok(Query {
        id,
        flags,
        name,
        qtype,
        qclass,
        question_end,
        edns,
        opt_size_at,
    })
}

/// The flags of an answer to a query with flags `qflags`: QR, the query's
/// opcode, RD and CD, RA (dnsd recurses for its clients), and `rcode`.
#[inline]
pub fn answer_flags(qflags: u16, rcode: u8, authoritative: bool, truncated: bool) -> u16 {
    let mut f =
        FLAG_QR | FLAG_RA | (qflags & (MASK_OPCODE | FLAG_RD | FLAG_CD)) | (rcode & 0xF) as u16;
    if authoritative {
        f |= FLAG_AA;
    }
    if truncated {
        f |= FLAG_TC;
    }
    f
}

/// Writes a header at the start of `out` (at least 12 bytes).
#[inline]
pub fn write_header(out: &mut [u8], id: u16, flags: u16, qd: u16, an: u16, ns: u16, ar: u16) {
    out[0..2].copy_from_slice(&id.to_be_bytes());
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    out[4..6].copy_from_slice(&qd.to_be_bytes());
    out[6..8].copy_from_slice(&an.to_be_bytes());
    out[8..10].copy_from_slice(&ns.to_be_bytes());
    out[10..12].copy_from_slice(&ar.to_be_bytes());
}

/// Writes an OPT record advertising [`EDNS_UDP_SIZE`] at `out[..11]`.
#[inline]
pub fn write_opt(out: &mut [u8], ext_rcode: u8) {
    out[0] = 0;
    out[1..3].copy_from_slice(&TYPE_OPT.to_be_bytes());
    out[3..5].copy_from_slice(&EDNS_UDP_SIZE.to_be_bytes());
    out[5] = ext_rcode;
    out[6] = 0; // version 0
    out[7] = 0; // no DO: dnsd does not sign
    out[8] = 0;
    out[9] = 0;
    out[10] = 0;
}

/// A header-only answer (FORMERR, NOTIMP for unparsable queries). Returns
/// its length (12), or 0 if `out` is too small.
pub fn write_reject(out: &mut [u8], id: u16, qflags: u16, rcode: u8) -> usize {
    if out.len() < HEADER_LEN {
        return 0;
    }
    write_header(
        out,
        id,
        answer_flags(qflags, rcode, false, false),
        0,
        0,
        0,
        0,
    );
    HEADER_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        p.extend(name_from_str(name).unwrap_or_default());
        p.extend(qtype.to_be_bytes());
        p.extend(CLASS_IN.to_be_bytes());
        p
    }

    #[test]
    fn parses_a_plain_query_lowercased() {
        let p = query("Web.SHOP.weft.internal", TYPE_A);
        let q = parse_query(&p).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.qtype, TYPE_A);
        assert_eq!(q.name.label_count(), 4);
        assert_eq!(q.name.label(0), b"web");
        assert_eq!(q.name.suffix(2), b"\x04weft\x08internal\x00");
        assert_eq!(format!("{:?}", q.name), "web.shop.weft.internal.");
        assert_eq!(q.question_end, p.len());
        assert!(q.edns.is_none());
        assert_eq!(q.udp_limit(), 512);
    }

    #[test]
    fn parses_edns() {
        let mut p = query("a", TYPE_A);
        p[11] = 1;
        p.extend([0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 0]);
        let q = parse_query(&p).unwrap();
        assert_eq!(
            q.edns,
            Some(Edns {
                udp_size: 4096,
                version: 0,
                dnssec_ok: true
            })
        );
        assert_eq!(q.udp_limit(), 1232);
        // Tiny sizes count as 512.
        let at = p.len() - 8;
        p[at] = 0;
        p[at + 1] = 0;
        let q = parse_query(&p).unwrap();
        assert_eq!(q.udp_limit(), 512);
    }

    #[test]
    fn rejects_malformed() {
        assert!(matches!(parse_query(&[1, 2, 3]), Err(ParseError::Drop)));
        let mut p = query("a", TYPE_A);
        p[2] |= 0x80; // a response
        assert!(matches!(parse_query(&p), Err(ParseError::Drop)));
        let mut p = query("a", TYPE_A);
        p[5] = 2; // two questions
        assert!(matches!(
            parse_query(&p),
            Err(ParseError::Reject {
                rcode: RCODE_FORMERR,
                ..
            })
        ));
        let p = query("a", TYPE_A);
        assert!(matches!(
            parse_query(&p[..p.len() - 1]),
            Err(ParseError::Reject {
                rcode: RCODE_FORMERR,
                ..
            })
        ));
        let mut p = query("a", TYPE_A);
        p[2] = 0x28; // opcode UPDATE
        assert!(matches!(
            parse_query(&p),
            Err(ParseError::Reject {
                rcode: RCODE_NOTIMP,
                ..
            })
        ));
        // A compression pointer in the question.
        let mut p = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1, 0, 1];
        assert!(matches!(
            parse_query(&p),
            Err(ParseError::Reject {
                rcode: RCODE_FORMERR,
                ..
            })
        ));
        // Two OPT records.
        p = query("a", TYPE_A);
        p[11] = 2;
        for _ in 0..2 {
            p.extend([0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        }
        assert!(matches!(
            parse_query(&p),
            Err(ParseError::Reject {
                rcode: RCODE_FORMERR,
                ..
            })
        ));
    }

    #[test]
    fn name_limits() {
        assert!(name_from_str(&"a".repeat(63)).is_some());
        assert!(name_from_str(&"a".repeat(64)).is_none());
        let long = vec!["abcdefg"; 31].join(".");
        assert_eq!(name_from_str(&long).map(|w| w.len()), Some(249));
        let too_long = vec!["abcdefg"; 32].join(".");
        assert!(name_from_str(&too_long).is_none());
        assert!(name_from_str("a..b").is_none());
        assert!(name_from_str("a b").is_none());
        assert_eq!(name_from_str("."), Some(vec![0]));
        assert_eq!(name_from_str("A.b."), Some(b"\x01a\x01b\x00".to_vec()));
        // The longest legal name parses; one byte more does not.
        let mut p = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let max: Vec<u8> = std::iter::repeat_n([1u8, b'x'], 127)
            .flatten()
            .chain([0])
            .collect();
        assert_eq!(max.len(), 255);
        p.extend(&max);
        p.extend([0, 1, 0, 1]);
        let q = parse_query(&p).unwrap();
        assert_eq!(q.name.label_count(), 127);
        let mut p = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, b'x', b'x'];
        p.extend(&max);
        p.extend([0, 1, 0, 1]);
        assert!(parse_query(&p).is_err());
    }

    #[test]
    fn skips_compressed_names_in_records() {
        let p = [0xC0u8, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2, 3, 4];
        let r = next_record(&p, 0).unwrap();
        assert_eq!(r.rtype, TYPE_A);
        assert_eq!(r.ttl_at, 6);
        assert_eq!(r.end, p.len());
        assert!(next_record(&p[..15], 0).is_none());
        assert!(skip_name(&[0x40], 0).is_none());
    }
}
