//! TUN offloads: the virtio-net header, checksums, TCP segmentation of the
//! large packets the kernel hands us (TSO), and coalescing of received TCP
//! segments into large packets for the kernel (GRO).
//!
//! With `IFF_VNET_HDR` and `TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4)` the
//! kernel's TCP stack passes up to 64 KiB per read (one header, `gso_size`
//! bytes per segment); we cut it into MTU-sized packets for encryption. On
//! the way in, consecutive segments of one TCP flow are merged into one
//! write, so the receiving stack handles one large packet instead of dozens.
//! Both save per-packet system calls and stack traversals, which is where
//! the time goes (encryption itself is ~10 %).
//!
//! All functions here are pure (buffers in, buffers out) and never panic on
//! malformed input.

/// Size of `struct virtio_net_hdr` (no `num_buffers`).
pub(crate) const VNET_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_ECN: u8 = 0x80;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// Largest IPv4 packet.
const MAX_IP_LEN: usize = 65_535;
/// Most segments merged into one write.
const GRO_MAX_SEGS: usize = 64;

/// `struct virtio_net_hdr` (little-endian, as TUN uses by default).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VnetHdr {
    pub(crate) flags: u8,
    pub(crate) gso_type: u8,
    pub(crate) hdr_len: u16,
    pub(crate) gso_size: u16,
    pub(crate) csum_start: u16,
    pub(crate) csum_offset: u16,
}

impl VnetHdr {
    pub(crate) fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub(crate) fn write(&self, b: &mut [u8]) {
        if b.len() < VNET_HDR_LEN {
            return;
        }
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// Ones' complement sum of `data` added to `acc`, in native byte order
/// (RFC 1071: the sum is byte-order independent; see [`csum_bytes`]).
///
/// Sums 32-bit words into a 64-bit accumulator (2^16 = 1 modulo 0xffff, so a
/// 32-bit word counts as its two 16-bit halves): there is no carry chain from
/// one word to the next, so the compiler vectorizes the loop. The carries
/// are folded once at the end. A 64 KiB packet is 16,384 words, far below
/// the 2^32 that could overflow the accumulator.
pub(crate) fn csum_add(acc: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(4);
    let words: u64 = chunks
        .by_ref()
        .map(|c| u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
        .sum();
    let mut sum = words;
    let rest = chunks.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        sum += u64::from(u16::from_ne_bytes([p[0], p[1]]));
    }
    if let [b] = pairs.remainder() {
        sum += u64::from(u16::from_ne_bytes([*b, 0]));
    }
    let (s, carry) = acc.overflowing_add(sum);
    s + u64::from(carry)
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The bytes to store for a finished checksum over `acc`.
pub(crate) fn csum_bytes(acc: u64) -> [u8; 2] {
    (!fold(acc)).to_ne_bytes()
}

/// The IPv4 pseudo-header sum for a TCP/UDP segment of `len` bytes.
fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u64 {
    let mut p = [0u8; 12];
    p[..4].copy_from_slice(src);
    p[4..8].copy_from_slice(dst);
    p[9] = proto;
    p[10..12].copy_from_slice(&(len as u16).to_be_bytes());
    csum_add(0, &p)
}

fn ip_header_checksum(ip: &mut [u8]) {
    ip[10] = 0;
    ip[11] = 0;
    let c = csum_bytes(csum_add(0, ip));
    ip[10..12].copy_from_slice(&c);
}

/// Fills in a checksum the kernel left partial (`VIRTIO_NET_HDR_F_NEEDS_CSUM`):
/// the field at `start + offset` already holds the pseudo-header sum.
pub(crate) fn complete_checksum(pkt: &mut [u8], h: &VnetHdr) -> bool {
    let start = h.csum_start as usize;
    let at = start + h.csum_offset as usize;
    if at + 2 > pkt.len() {
        return false;
    }
    let mut c = csum_bytes(csum_add(0, &pkt[start..]));
    // UDP (checksum at offset 6) sends a computed 0 as 0xffff: 0 means "none".
    if h.csum_offset == 6 && c == [0, 0] {
        c = [0xff, 0xff];
    }
    pkt[at..at + 2].copy_from_slice(&c);
    true
}

/// Header lengths of an IPv4/TCP packet: (IP header, IP + TCP headers).
fn tcp4_lens(pkt: &[u8]) -> Option<(usize, usize)> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != 6 {
        return None;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    if ihl < 20 || pkt.len() < ihl + 20 {
        return None;
    }
    let doff = usize::from(pkt[ihl + 12] >> 4) * 4;
    if doff < 20 || pkt.len() < ihl + doff {
        return None;
    }
    Some((ihl, ihl + doff))
}

/// What a packet read from the TUN turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Read {
    /// One packet (checksum completed if it was partial).
    Single,
    /// A TCP super-packet to cut into `gso_size` segments.
    Tso { hdr_len: usize, mss: usize },
    /// Something we cannot handle (drop it).
    Bad,
}

/// Prepares a packet read from the TUN (after its virtio header).
pub(crate) fn classify(pkt: &mut [u8], h: &VnetHdr) -> Read {
    match h.gso_type & !GSO_ECN {
        GSO_NONE => {
            if h.flags & F_NEEDS_CSUM != 0 && !complete_checksum(pkt, h) {
                return Read::Bad;
            }
            Read::Single
        }
        GSO_TCPV4 => match tcp4_lens(pkt) {
            Some((_, hdr_len)) if h.gso_size > 0 => Read::Tso {
                hdr_len,
                mss: usize::from(h.gso_size),
            },
            _ => Read::Bad,
        },
        _ => Read::Bad,
    }
}

/// Cuts the TCP super-packet `pkt` (headers of `hdr_len` bytes, then payload)
/// into segments of at most `mss` payload bytes and calls `emit` with each
/// complete IPv4/TCP packet (lengths, IDs, sequence numbers, flags and both
/// checksums fixed). Works in place: segment `i`'s headers are written just
/// before its payload, over bytes of segment `i-1` that were already
/// emitted, so no payload is copied.
pub(crate) fn tso_segments(
    pkt: &mut [u8],
    hdr_len: usize,
    mss: usize,
    mut emit: impl FnMut(&[u8]),
) {
    let Some((ihl, hl)) = tcp4_lens(pkt) else {
        return;
    };
    if hl != hdr_len || mss == 0 || pkt.len() <= hdr_len {
        return;
    }
    let mut hdr = [0u8; 120];
    hdr[..hdr_len].copy_from_slice(&pkt[..hdr_len]);
    let id0 = u16::from_be_bytes([hdr[4], hdr[5]]);
    let seq0 = u32::from_be_bytes([hdr[ihl + 4], hdr[ihl + 5], hdr[ihl + 6], hdr[ihl + 7]]);
    let flags0 = hdr[ihl + 13];
    let payload = pkt.len() - hdr_len;
    let nsegs = payload.div_ceil(mss);
    for i in 0..nsegs {
        let data_start = hdr_len + i * mss;
        let seg_len = mss.min(pkt.len() - data_start);
        let start = data_start - hdr_len;
        let seg = &mut pkt[start..data_start + seg_len];
        seg[..hdr_len].copy_from_slice(&hdr[..hdr_len]);
        let total = hdr_len + seg_len;
        seg[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
        ip_header_checksum(&mut seg[..ihl]);
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[ihl + 4..ihl + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i + 1 < nsegs {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        seg[ihl + 13] = flags;
        seg[ihl + 16] = 0;
        seg[ihl + 17] = 0;
        let acc = pseudo(&hdr[12..16], &hdr[16..20], 6, total - ihl);
        let c = csum_bytes(csum_add(acc, &seg[ihl..]));
        seg[ihl + 16..ihl + 18].copy_from_slice(&c);
        emit(seg);
    }
}

/// Whether an IPv4/TCP packet's checksum is right.
fn tcp4_checksum_ok(pkt: &[u8], ihl: usize) -> bool {
    let acc = pseudo(&pkt[12..16], &pkt[16..20], 6, pkt.len() - ihl);
    fold(csum_add(acc, &pkt[ihl..])) == 0xffff
}

/// Merges consecutive TCP segments of one flow into one large packet with a
/// virtio header asking the kernel for GSO, like the kernel's own GRO.
pub(crate) struct Gro {
    /// virtio header + the merged packet.
    buf: Vec<u8>,
    /// Bytes of the merged packet (after the virtio header); 0 = nothing
    /// pending.
    len: usize,
    ihl: usize,
    hdr_len: usize,
    mss: usize,
    segs: usize,
    next_seq: u32,
    /// The last merged segment was shorter than `mss` or had PSH: nothing
    /// may follow it.
    closed: bool,
}

impl Default for Gro {
    fn default() -> Self {
        Gro::new()
    }
}

impl Gro {
    pub(crate) fn new() -> Gro {
        Gro {
            buf: vec![0u8; VNET_HDR_LEN + MAX_IP_LEN],
            len: 0,
            ihl: 0,
            hdr_len: 0,
            mss: 0,
            segs: 0,
            next_seq: 0,
            closed: false,
        }
    }

    #[cfg(test)]
    pub(crate) fn pending(&self) -> bool {
        self.len > 0
    }

    /// Appends `pkt` to the pending packet if it continues it; false if it
    /// does not (the caller then flushes and calls [`Gro::start`]).
    pub(crate) fn merge(&mut self, pkt: &[u8]) -> bool {
        if self.len == 0 || self.closed || self.segs >= GRO_MAX_SEGS {
            return false;
        }
        let Some((ihl, hdr_len)) = tcp4_lens(pkt) else {
            return false;
        };
        let p = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + self.len];
        let payload = pkt.len().saturating_sub(hdr_len);
        let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
        if ihl != 20
            || hdr_len != self.hdr_len
            || total != pkt.len()
            || payload == 0
            || payload > self.mss
            || self.len + payload > MAX_IP_LEN
            // TOS, fragment bits (DF only), TTL, protocol, addresses.
            || pkt[1] != p[1]
            || pkt[6..10] != p[6..10]
            || pkt[12..20] != p[12..20]
            // Ports, ack, window; options (e.g. timestamps) identical.
            || pkt[ihl..ihl + 4] != p[ihl..ihl + 4]
            || pkt[ihl + 8..ihl + 12] != p[ihl + 8..ihl + 12]
            || pkt[ihl + 14..ihl + 16] != p[ihl + 14..ihl + 16]
            || pkt[ihl + 20..hdr_len] != p[ihl + 20..hdr_len]
        {
            return false;
        }
        let flags = pkt[ihl + 13];
        if flags & !TCP_PSH != TCP_ACK {
            return false;
        }
        let seq = u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]);
        if seq != self.next_seq || !tcp4_checksum_ok(pkt, ihl) {
            return false;
        }
        let at = VNET_HDR_LEN + self.len;
        self.buf[at..at + payload].copy_from_slice(&pkt[hdr_len..]);
        self.len += payload;
        self.segs += 1;
        self.next_seq = seq.wrapping_add(payload as u32);
        if flags & TCP_PSH != 0 {
            self.buf[VNET_HDR_LEN + ihl + 13] |= TCP_PSH;
            self.closed = true;
        }
        if payload < self.mss {
            self.closed = true;
        }
        true
    }

    /// Makes `pkt` the start of a new merged packet if it is a plain TCP
    /// data segment (ACK, maybe PSH; no IP options or fragments) with a
    /// correct checksum. False for anything else (write it as it is). Must
    /// only be called when nothing is pending.
    pub(crate) fn start(&mut self, pkt: &[u8]) -> bool {
        debug_assert_eq!(self.len, 0);
        let Some((ihl, hdr_len)) = tcp4_lens(pkt) else {
            return false;
        };
        let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
        let flags = pkt[ihl + 13];
        let frag = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff;
        if ihl != 20
            || total != pkt.len()
            || pkt.len() <= hdr_len
            || frag != 0
            || flags & !TCP_PSH != TCP_ACK
            || flags & TCP_PSH != 0
            || !tcp4_checksum_ok(pkt, ihl)
        {
            return false;
        }
        self.buf[VNET_HDR_LEN..VNET_HDR_LEN + pkt.len()].copy_from_slice(pkt);
        self.len = pkt.len();
        self.ihl = ihl;
        self.hdr_len = hdr_len;
        self.mss = pkt.len() - hdr_len;
        self.segs = 1;
        self.next_seq =
            u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]])
                .wrapping_add(self.mss as u32);
        self.closed = false;
        true
    }

    /// The pending packet with its virtio header, ready to write; resets.
    pub(crate) fn take(&mut self) -> Option<&[u8]> {
        if self.len == 0 {
            return None;
        }
        let len = self.len;
        self.len = 0;
        let ihl = self.ihl;
        let (vh, pkt) = self.buf.split_at_mut(VNET_HDR_LEN);
        let pkt = &mut pkt[..len];
        let h = if self.segs == 1 {
            // Unchanged, checksums as they came.
            VnetHdr::default()
        } else {
            pkt[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            ip_header_checksum(&mut pkt[..ihl]);
            // CHECKSUM_PARTIAL: the field holds the pseudo-header sum.
            let acc = pseudo(&pkt[12..16], &pkt[16..20], 6, len - ihl);
            pkt[ihl + 16..ihl + 18].copy_from_slice(&fold(acc).to_ne_bytes());
            VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: self.hdr_len as u16,
                gso_size: self.mss as u16,
                csum_start: ihl as u16,
                csum_offset: 16,
            }
        };
        h.write(vh);
        Some(&self.buf[..VNET_HDR_LEN + len])
    }

    #[cfg(test)]
    pub(crate) fn segments(&self) -> usize {
        self.segs
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// RFC 1071 as written: 16-bit big-endian words, end-around carry.
    fn rfc1071(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for p in data.chunks(2) {
            let w = u32::from(p[0]) << 8 | u32::from(*p.get(1).unwrap_or(&0));
            sum += w;
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn csum_add_matches_rfc1071_at_every_length_and_split() {
        let mut x: u32 = 0x9e37_79b9;
        let data: Vec<u8> = (0..1500)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let ones = vec![0xffu8; 70_000];
        for len in (0..64).chain([1399, 1400, 1448, 1499, 1500]) {
            let d = &data[..len];
            let want = rfc1071(d);
            let got = u16::from_be_bytes(fold(csum_add(0, d)).to_ne_bytes());
            // 0 and 0xffff are the same number in ones' complement.
            assert_eq!(got % 0xffff, want % 0xffff, "length {len}");
            // Chained over an even split, as the pseudo header is.
            for split in (0..len).step_by(2).take(8) {
                let chained = csum_add(csum_add(0, &d[..split]), &d[split..]);
                assert_eq!(fold(chained) % 0xffff, fold(csum_add(0, d)) % 0xffff);
            }
        }
        // All ones over more than 64 KiB: the accumulator does not overflow.
        let acc = u64::MAX - 3;
        assert_eq!(u64::from(fold(csum_add(acc, &ones)) % 0xffff), acc % 0xffff);
    }

    /// An IPv4/TCP packet with correct checksums; 12 bytes of options
    /// (timestamps), so headers are 52 bytes.
    pub(crate) fn tcp(seq: u32, flags: u8, payload: &[u8], id: u16) -> Vec<u8> {
        let hl = 52;
        let mut p = vec![0u8; hl + payload.len()];
        p[0] = 0x45;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 42, 0, 2]);
        p[16..20].copy_from_slice(&[10, 42, 1, 2]);
        p[20..22].copy_from_slice(&5201u16.to_be_bytes());
        p[22..24].copy_from_slice(&40000u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&77u32.to_be_bytes());
        p[32] = 8 << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&502u16.to_be_bytes());
        p[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 7]);
        p[hl..].copy_from_slice(payload);
        ip_header_checksum(&mut p[..20]);
        let acc = pseudo(&p[12..16], &p[16..20], 6, p.len() - 20);
        let c = csum_bytes(csum_add(acc, &p[20..]));
        p[36..38].copy_from_slice(&c);
        p
    }

    pub(crate) fn ip_ok(p: &[u8]) -> bool {
        fold(csum_add(0, &p[..20])) == 0xffff
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        let sum = u16::from_be_bytes(fold(csum_add(0, &data)).to_ne_bytes());
        assert_eq!(sum, 0xddf2);
        // Odd lengths and split sums agree.
        let odd = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
        assert_eq!(
            fold(csum_add(0, &odd)),
            fold(csum_add(csum_add(0, &odd[..8]), &odd[8..]))
        );
        let p = tcp(1, TCP_ACK, b"hello world", 1);
        assert!(ip_ok(&p));
        assert!(tcp4_checksum_ok(&p, 20));
    }

    #[test]
    fn vnet_header_roundtrip() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: 52,
            gso_size: 1388,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut b = [0u8; 10];
        h.write(&mut b);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }

    #[test]
    fn tso_then_gro_restores_the_stream() {
        let mss = 1388;
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut sup = tcp(1000, TCP_ACK | TCP_PSH, &payload, 500);
        // As the kernel hands it over: lengths of the whole, checksum partial
        // (we recompute everything anyway).
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: mss as u16,
            csum_start: 20,
            csum_offset: 16,
        };
        assert_eq!(classify(&mut sup, &h), Read::Tso { hdr_len: 52, mss });
        let mut segs: Vec<Vec<u8>> = Vec::new();
        tso_segments(&mut sup, 52, mss, |s| segs.push(s.to_vec()));
        assert_eq!(segs.len(), 10_000usize.div_ceil(mss));
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(ip_ok(s), "segment {i} IP checksum");
            assert!(tcp4_checksum_ok(s, 20), "segment {i} TCP checksum");
            let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
            assert_eq!(seq, 1000 + (i * mss) as u32);
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 500 + i as u16);
            assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
            let last = i + 1 == segs.len();
            assert_eq!(s[33] & TCP_PSH != 0, last, "PSH only on the last");
            joined.extend_from_slice(&s[52..]);
        }
        assert_eq!(joined, payload);

        // GRO merges them back into one packet.
        let mut g = Gro::new();
        assert!(g.start(&segs[0]));
        for s in &segs[1..] {
            assert!(g.merge(s), "merge");
        }
        assert_eq!(g.segments(), segs.len());
        let frame = g.take().unwrap().to_vec();
        assert!(!g.pending());
        let vh = VnetHdr::parse(&frame).unwrap();
        assert_eq!(vh.gso_type, GSO_TCPV4);
        assert_eq!(usize::from(vh.gso_size), mss);
        assert_eq!(vh.hdr_len, 52);
        let merged = &frame[VNET_HDR_LEN..];
        assert_eq!(merged.len(), 52 + payload.len());
        assert_eq!(&merged[52..], &payload[..]);
        assert!(ip_ok(merged));
        assert_eq!(merged[33] & TCP_PSH, TCP_PSH, "PSH carried over");
        // Completing the partial checksum gives a valid TCP checksum.
        let mut m = merged.to_vec();
        assert!(complete_checksum(&mut m, &vh));
        assert!(tcp4_checksum_ok(&m, 20));
    }

    #[test]
    fn gro_refuses_what_it_must_not_merge() {
        let a = tcp(1, TCP_ACK, &[1; 100], 1);
        let mut g = Gro::new();
        assert!(g.start(&a));
        // A gap in the sequence.
        assert!(!g.merge(&tcp(500, TCP_ACK, &[1; 100], 2)));
        // Different ack.
        let mut b = tcp(101, TCP_ACK, &[1; 100], 2);
        b[28..32].copy_from_slice(&78u32.to_be_bytes());
        assert!(!g.merge(&b));
        // Bad checksum.
        let mut c = tcp(101, TCP_ACK, &[1; 100], 2);
        c[60] ^= 1;
        assert!(!g.merge(&c));
        // FIN, SYN or RST.
        assert!(!g.merge(&tcp(101, TCP_ACK | TCP_FIN, &[1; 100], 2)));
        // Bigger than the first segment.
        assert!(!g.merge(&tcp(101, TCP_ACK, &[1; 200], 2)));
        // A shorter one is fine, but closes the packet.
        assert!(g.merge(&tcp(101, TCP_ACK, &[1; 50], 2)));
        assert!(!g.merge(&tcp(151, TCP_ACK, &[1; 100], 3)));
        assert_eq!(g.segments(), 2);
        let f = g.take().unwrap();
        assert_eq!(f.len(), VNET_HDR_LEN + 52 + 150);

        // Pure ACKs, SYNs and non-TCP are never started.
        assert!(!g.start(&tcp(1, TCP_ACK, &[], 1)));
        assert!(!g.start(&tcp(1, 0x02, &[1; 10], 1)));
        let mut udp = tcp(1, TCP_ACK, &[1; 10], 1);
        udp[9] = 17;
        assert!(!g.start(&udp));
        assert!(!g.start(&[0x45, 0, 0]));
        // A single pending segment is written unchanged, no GSO.
        assert!(g.start(&a));
        let f = g.take().unwrap();
        assert_eq!(VnetHdr::parse(f).unwrap(), VnetHdr::default());
        assert_eq!(&f[VNET_HDR_LEN..], &a[..]);
    }

    #[test]
    fn malformed_input_never_panics() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 100,
            csum_start: 60_000,
            csum_offset: 16,
        };
        for len in [0usize, 1, 19, 20, 39, 40, 51, 52, 53, 200] {
            let mut p = vec![0x45u8; len];
            if len > 9 {
                p[9] = 6;
            }
            let _ = classify(&mut p, &h);
            tso_segments(&mut p, 52, 100, |_| {});
            tso_segments(&mut p, 40, 0, |_| {});
            let mut g = Gro::new();
            let _ = g.start(&p);
            let _ = g.merge(&p);
            let _ = g.take();
            let mut n = h;
            n.gso_type = GSO_NONE;
            let _ = classify(&mut p, &n);
        }
    }
}
