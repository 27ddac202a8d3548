//! Deleting connection-tracking entries by their original tuple over
//! ctnetlink (a `NETLINK_NETFILTER` socket): one `IPCTNL_MSG_CT_DELETE` per
//! entry, sent in batches, each answered by its own acknowledgement. The
//! kernel finds an entry by a hash lookup; nothing is dumped.
//!
//! `conntrack -D <selection>` instead reads the whole table for every
//! invocation (it dumps and deletes what matches, even when given a whole
//! tuple): at 20,000 entries about 50 ms of CPU per call, and a policy
//! change cutting a few hundred (pair, port)s spent seconds of both cores
//! on it (issue 15's CI run: `conntrack` was 48% of all CPU in
//! `perf record -a` while the policy test changed policies, and probes
//! timed out).
//!
//! The caller finds the entries (one listing) and hands over their
//! [`Tuple`]s; an entry gone since (expired, or deleted by someone else) is
//! not an error.

use std::io;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// `NETLINK_NETFILTER`.
const NETLINK_NETFILTER: libc::c_int = 12;
/// `NETLINK_CAP_ACK`: errors do not echo the request back.
const NETLINK_CAP_ACK: libc::c_int = 10;
/// `(NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE`.
const CT_DELETE: u16 = (1 << 8) | 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;
/// `enum ctattr_type`.
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_ZONE: u16 = 18;
/// `enum ctattr_tuple`.
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
/// `enum ctattr_ip`.
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
/// `enum ctattr_l4proto`.
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
/// Deletes per `send` (each message is 72 bytes at most, each
/// acknowledgement 36).
const BATCH: usize = 256;
/// How long a batch's acknowledgements may take.
const ACK_TIMEOUT_MS: i64 = 5_000;

/// The original-direction tuple of an IPv4 entry: what the kernel looks it
/// up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// The IP protocol number (6 TCP, 17 UDP, 1 ICMP, ...).
    pub proto: u8,
    pub l4: L4,
    /// The conntrack zone (0 unless something set one).
    pub zone: u16,
}

/// What identifies an entry past its addresses and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4 {
    /// TCP, UDP, SCTP, DCCP, UDP-Lite: the ports (GRE: its keys).
    Ports { src: u16, dst: u16 },
    /// ICMP: the echo id, type and code.
    Icmp { id: u16, kind: u8, code: u8 },
    /// A protocol the kernel tracks by addresses only.
    None,
}

/// A ctnetlink socket in one network namespace.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// A socket in this thread's network namespace.
    pub fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2); the fd is checked and owned right after.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // Best effort: without it an error acknowledgement is only longer.
        // SAFETY: the option value is a c_int that outlives the call.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                NETLINK_CAP_ACK,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let timeout = libc::timeval {
            tv_sec: ACK_TIMEOUT_MS / 1000,
            tv_usec: (ACK_TIMEOUT_MS % 1000) * 1000,
        };
        // SAFETY: the option value is a timeval that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket { fd, seq: 0 })
    }

    /// A socket in the network namespace at `netns` (e.g.
    /// `/run/netns/<name>`), opened on a thread that enters it; the socket
    /// stays in that namespace whichever thread uses it.
    pub fn open_in(netns: &Path) -> io::Result<Socket> {
        let netns = netns.to_owned();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&netns)?;
            // SAFETY: setns(2) on this short-lived thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Socket::open()
        })
        .join()
        .map_err(|_| io::Error::other("the thread opening a ctnetlink socket panicked"))?
    }

    /// Deletes the entries with these original tuples; how many went (an
    /// entry already gone is skipped). Stops at the first other error.
    pub fn delete(&mut self, tuples: &[Tuple]) -> io::Result<usize> {
        let mut deleted = 0;
        let mut buf = Vec::with_capacity(BATCH * 72);
        for batch in tuples.chunks(BATCH) {
            buf.clear();
            let first = self.seq.wrapping_add(1);
            for t in batch {
                self.seq = self.seq.wrapping_add(1);
                encode_delete(t, self.seq, &mut buf);
            }
            // SAFETY: `buf` is valid for its length; netlink takes the
            // whole buffer as one datagram of several messages.
            let sent =
                unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
            if sent < 0 {
                return Err(io::Error::last_os_error());
            }
            let acks = self.acks(first, batch.len())?;
            deleted += acks;
        }
        Ok(deleted)
    }

    /// Reads the acknowledgements of `n` messages numbered from `first`:
    /// how many said the entry was deleted.
    fn acks(&self, first: u32, n: usize) -> io::Result<usize> {
        let mut seen = 0;
        let mut deleted = 0;
        let mut failure: Option<io::Error> = None;
        let mut buf = vec![0u8; 64 * 1024];
        while seen < n {
            // SAFETY: `buf` is valid for writes of its length.
            let got =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if got < 0 {
                return Err(io::Error::last_os_error());
            }
            for ack in parse_acks(&buf[..got as usize]) {
                // Only this batch's (a late answer of an earlier failed
                // call is not counted twice).
                if ack.seq.wrapping_sub(first) as usize >= n {
                    continue;
                }
                seen += 1;
                match ack.error {
                    0 => deleted += 1,
                    e if e == -libc::ENOENT => {}
                    e => {
                        failure.get_or_insert(io::Error::from_raw_os_error(-e));
                    }
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(deleted),
        }
    }
}

/// One acknowledgement: the request's sequence number and its error (0:
/// done, else a negated errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ack {
    seq: u32,
    error: i32,
}

/// The acknowledgements in one datagram (other messages are skipped).
fn parse_acks(mut data: &[u8]) -> Vec<Ack> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < 16 || len > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if kind == NLMSG_ERROR && len >= 20 + 16 {
            let error = i32::from_ne_bytes([data[16], data[17], data[18], data[19]]);
            // The request's header follows: its sequence number.
            let seq = u32::from_ne_bytes([data[28], data[29], data[30], data[31]]);
            out.push(Ack { seq, error });
        }
        data = &data[align(len).min(data.len())..];
    }
    out
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends one `IPCTNL_MSG_CT_DELETE` of `t` to `buf`.
fn encode_delete(t: &Tuple, seq: u32, buf: &mut Vec<u8>) {
    let start = buf.len();
    // struct nlmsghdr; the length is written at the end.
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&CT_DELETE.to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // struct nfgenmsg: AF_INET, NFNETLINK_V0, res_id 0.
    buf.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
    let orig = nest_start(buf, CTA_TUPLE_ORIG);
    let ip = nest_start(buf, CTA_TUPLE_IP);
    attr(buf, CTA_IP_V4_SRC, &t.src.octets());
    attr(buf, CTA_IP_V4_DST, &t.dst.octets());
    nest_end(buf, ip);
    let proto = nest_start(buf, CTA_TUPLE_PROTO);
    attr(buf, CTA_PROTO_NUM, &[t.proto]);
    match t.l4 {
        L4::Ports { src, dst } => {
            attr(buf, CTA_PROTO_SRC_PORT, &src.to_be_bytes());
            attr(buf, CTA_PROTO_DST_PORT, &dst.to_be_bytes());
        }
        L4::Icmp { id, kind, code } => {
            attr(buf, CTA_PROTO_ICMP_ID, &id.to_be_bytes());
            attr(buf, CTA_PROTO_ICMP_TYPE, &[kind]);
            attr(buf, CTA_PROTO_ICMP_CODE, &[code]);
        }
        L4::None => {}
    }
    nest_end(buf, proto);
    nest_end(buf, orig);
    if t.zone != 0 {
        attr(buf, CTA_ZONE, &t.zone.to_be_bytes());
    }
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// Appends an attribute, padded to 4 bytes.
fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = (4 + payload.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align(buf.len()), 0);
}

/// Starts a nested attribute; [`nest_end`] writes its length.
fn nest_start(buf: &mut Vec<u8>, kind: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    at
}

fn nest_end(buf: &mut [u8], at: usize) {
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp() -> Tuple {
        Tuple {
            src: Ipv4Addr::new(10, 42, 1, 2),
            dst: Ipv4Addr::new(10, 42, 2, 3),
            proto: 6,
            l4: L4::Ports {
                src: 40000,
                dst: 80,
            },
            zone: 0,
        }
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    #[test]
    fn a_tcp_delete_is_the_tuple_the_kernel_looks_up() {
        let mut buf = Vec::new();
        encode_delete(&tcp(), 7, &mut buf);
        // nlmsghdr 16 + nfgenmsg 4 + orig (4 + ip 20 + proto 28) = 72.
        assert_eq!(buf.len(), 72);
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().unwrap()), 72);
        assert_eq!(u16_at(&buf, 4), 0x0102);
        assert_eq!(u16_at(&buf, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(buf[8..12].try_into().unwrap()), 7);
        assert_eq!(buf[16], libc::AF_INET as u8);
        // CTA_TUPLE_ORIG, nested, 52 bytes.
        assert_eq!((u16_at(&buf, 20), u16_at(&buf, 22)), (52, 1 | NLA_F_NESTED));
        // CTA_TUPLE_IP: src then dst, in network order.
        assert_eq!((u16_at(&buf, 24), u16_at(&buf, 26)), (20, 1 | NLA_F_NESTED));
        assert_eq!(&buf[32..36], &[10, 42, 1, 2]);
        assert_eq!(&buf[40..44], &[10, 42, 2, 3]);
        // CTA_TUPLE_PROTO: protocol 6, ports big-endian.
        assert_eq!((u16_at(&buf, 44), u16_at(&buf, 46)), (28, 2 | NLA_F_NESTED));
        assert_eq!((u16_at(&buf, 48), u16_at(&buf, 50), buf[52]), (5, 1, 6));
        assert_eq!((u16_at(&buf, 56), u16_at(&buf, 58)), (6, 2));
        assert_eq!(&buf[60..62], &40000u16.to_be_bytes());
        assert_eq!((u16_at(&buf, 64), u16_at(&buf, 66)), (6, 3));
        assert_eq!(&buf[68..70], &80u16.to_be_bytes());
    }

    #[test]
    fn icmp_and_zones_and_batches() {
        let mut buf = Vec::new();
        let icmp = Tuple {
            proto: 1,
            l4: L4::Icmp {
                id: 7,
                kind: 8,
                code: 0,
            },
            zone: 3,
            ..tcp()
        };
        encode_delete(&icmp, 1, &mut buf);
        let one = buf.len();
        // proto: 4 + num 8 + id 8 + type 8 + code 8 = 36; zone 8 more.
        assert_eq!(one, 16 + 4 + 4 + 20 + 36 + 8);
        assert_eq!(&buf[one - 8..], {
            let mut z = 6u16.to_ne_bytes().to_vec();
            z.extend_from_slice(&CTA_ZONE.to_ne_bytes());
            z.extend_from_slice(&[0, 3, 0, 0]);
            &z.clone()[..]
        });
        // Messages follow each other, each 4-byte aligned.
        encode_delete(&tcp(), 2, &mut buf);
        assert_eq!(buf.len(), one + 72);
        assert_eq!(
            u32::from_ne_bytes(buf[one + 8..one + 12].try_into().unwrap()),
            2
        );
    }

    #[test]
    fn acks_give_each_request_its_error() {
        let ack = |seq: u32, error: i32| {
            let mut b = Vec::new();
            b.extend_from_slice(&36u32.to_ne_bytes());
            b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&seq.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&error.to_ne_bytes());
            // The request's header.
            b.extend_from_slice(&72u32.to_ne_bytes());
            b.extend_from_slice(&CT_DELETE.to_ne_bytes());
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&seq.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b
        };
        let mut data = ack(5, 0);
        data.extend(ack(6, -libc::ENOENT));
        data.extend_from_slice(&[1, 2, 3]); // a truncated tail is ignored
        assert_eq!(
            parse_acks(&data),
            [
                Ack { seq: 5, error: 0 },
                Ack {
                    seq: 6,
                    error: -libc::ENOENT
                }
            ]
        );
        assert!(parse_acks(&[0u8; 8]).is_empty());
    }
}
