//! ICMP echo for [`super::Flow`]s, from the test binary itself, no `ping`
//! process per probe: one raw ICMP socket (needs root, like the namespaces
//! it runs in) and one thread echo many addresses at once, so the echoes
//! of a matrix round add a thread per source, not one per cell.
//!
//! Like every socket, it keeps the namespace of the thread that made it
//! ([`crate::in_netns`]). A raw socket sees every ICMP packet its
//! namespace receives: a reply counts only with this process's
//! identifier, a sequence number naming the target, the target as its
//! source and a payload naming this call, so echoes running at once in one
//! namespace never take each other's replies, nor late ones of an earlier
//! call. The identifier is the same for every echo, like one long `ping`
//! per pair of addresses: the hosts' conntrack keeps one entry per pair
//! instead of one per probe (the tight loops timing a policy change send
//! thousands, and netd's cut of lost connections lists them all).
//!
//! [`Pinger`] is the same socket and rules for one long-running echo flow
//! (`weft-bench soak`'s pings every 10 ms), the caller numbering requests.

use std::io::{Error, ErrorKind, Result};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const ECHO_REPLY: u8 = 0;
const DEST_UNREACHABLE: u8 = 3;
const ECHO_REQUEST: u8 = 8;
/// The payload's first bytes; the call's number follows.
const MAGIC: &[u8; 8] = b"weftping";
/// At most this many targets per call: sequence numbers are the target's
/// index times two plus the attempt.
pub const MAX_TARGETS: usize = 1 << 15;

/// Numbers for the calls of [`echo_all`], in their payloads.
static NEXT_CALL: AtomicU32 = AtomicU32::new(1);

/// The identifier of this process's echoes.
fn ident() -> u16 {
    // The low bits of the pid: the identifier is per process anyway.
    std::process::id() as u16
}

/// [`echo_all`] for one address.
pub fn echo(addr: Ipv4Addr, timeout: Duration) -> Result<()> {
    echo_all(&[addr], timeout)
        .pop()
        .unwrap_or_else(|| Err(Error::other("no result")))
}

/// Sends an ICMP echo request to each of `addrs` from this thread's
/// namespace, and a second one halfway through `timeout` to those that
/// have not answered yet (in case the first was lost, e.g. while the
/// neighbour entry resolved). Per address, in order: `Ok(())` when a reply
/// came back from it within `timeout`; a [`ErrorKind::TimedOut`] error if
/// none did; [`ErrorKind::HostUnreachable`] when a destination unreachable
/// about it came back; the error of sending to it.
pub fn echo_all(addrs: &[Ipv4Addr], timeout: Duration) -> Vec<Result<()>> {
    let mut out: Vec<Option<Result<()>>> = (0..addrs.len()).map(|_| None).collect();
    if addrs.len() > MAX_TARGETS {
        let e = || {
            Err(Error::other(format!(
                "more than {MAX_TARGETS} echo targets"
            )))
        };
        return addrs.iter().map(|_| e()).collect();
    }
    let socket = match RawIcmp::open() {
        Ok(s) => s,
        Err(e) => {
            return addrs
                .iter()
                .map(|_| Err(Error::new(e.kind(), e.to_string())))
                .collect()
        }
    };
    let (id, call) = (ident(), NEXT_CALL.fetch_add(1, Ordering::Relaxed));
    let start = Instant::now();
    let mut buf = [0u8; 1500];
    for attempt in 0..2u16 {
        for (i, &addr) in addrs.iter().enumerate() {
            if out[i].is_none() {
                // `i` < MAX_TARGETS, checked above.
                let seq = (i as u16) << 1 | attempt;
                if let Err(e) = socket.send_to(&request(id, seq, call), addr) {
                    out[i] = Some(Err(e));
                }
            }
        }
        let until = timeout * u32::from(attempt + 1) / 2;
        while out.iter().any(Option::is_none) {
            let left = until.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            let n = match socket.recv(&mut buf, left) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    for slot in out.iter_mut().filter(|o| o.is_none()) {
                        *slot = Some(Err(Error::new(e.kind(), e.to_string())));
                    }
                    break;
                }
            };
            let (seq, result) = match classify(&buf[..n], id, call) {
                Reply::Echo { seq, from } => (seq, (from, Ok(()))),
                Reply::Unreachable { seq, to, code } => (
                    seq,
                    (
                        to,
                        Err(Error::new(
                            ErrorKind::HostUnreachable,
                            format!("destination unreachable (code {code}) for {to}"),
                        )),
                    ),
                ),
                Reply::Other => continue,
            };
            let i = usize::from(seq >> 1);
            let (addr, result) = result;
            if addrs.get(i) == Some(&addr) && out[i].is_none() {
                out[i] = Some(result);
            }
        }
    }
    out.into_iter()
        .zip(addrs)
        .map(|(o, addr)| {
            o.unwrap_or_else(|| {
                Err(Error::new(
                    ErrorKind::TimedOut,
                    format!("no echo reply from {addr}"),
                ))
            })
        })
        .collect()
}

/// An echo request (ICMP header and payload; the kernel adds the IP
/// header).
fn request(id: u16, seq: u16, call: u32) -> Vec<u8> {
    let mut p = vec![ECHO_REQUEST, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&payload(call));
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

fn payload(call: u32) -> Vec<u8> {
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(&call.to_be_bytes());
    p
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What a received packet (IP header first, as a raw socket gets it) is to
/// the echoes with identifier `id` of call `call`.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// An echo reply to request `seq`, with its payload, from `from`.
    Echo { seq: u16, from: Ipv4Addr },
    /// A destination unreachable (this code) quoting request `seq` to `to`.
    Unreachable { seq: u16, to: Ipv4Addr, code: u8 },
    /// Anything else (another process's or call's packet, our own request
    /// when pinging our own address).
    Other,
}

fn classify(packet: &[u8], id: u16, call: u32) -> Reply {
    let Some((src, _, icmp)) = ip_parts(packet) else {
        return Reply::Other;
    };
    let ours = |h: &[u8], kind: u8| h.len() >= 8 && h[0] == kind && h[4..6] == id.to_be_bytes();
    let seq = |h: &[u8]| u16::from_be_bytes([h[6], h[7]]);
    match icmp.first() {
        Some(&ECHO_REPLY) if ours(icmp, ECHO_REPLY) => {
            let seq = seq(icmp);
            if icmp[8..] == payload(call)[..] {
                Reply::Echo { seq, from: src }
            } else {
                Reply::Other
            }
        }
        // The error quotes the request's IP header and first 8 bytes.
        Some(&DEST_UNREACHABLE) if icmp.len() > 8 => match ip_parts(&icmp[8..]) {
            Some((_, to, quoted)) if ours(quoted, ECHO_REQUEST) => Reply::Unreachable {
                seq: seq(quoted),
                to,
                code: icmp[1],
            },
            _ => Reply::Other,
        },
        _ => Reply::Other,
    }
}

/// Source, destination and what follows the header of IPv4 `packet`, if
/// it is one.
fn ip_parts(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, &[u8])> {
    let first = *packet.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 {
        return None;
    }
    let addr = |at: usize| -> Option<Ipv4Addr> {
        let b: [u8; 4] = packet.get(at..at + 4)?.try_into().ok()?;
        Some(Ipv4Addr::from(b))
    };
    Some((addr(12)?, addr(16)?, packet.get(ihl..)?))
}

/// A long-running echo flow from this thread's namespace (one `ping -i`
/// of the soak's probes): requests numbered by the caller, replies read
/// one at a time, with this process's identifier and a call number of its
/// own like [`echo_all`]'s, so neither takes the other's replies.
pub struct Pinger {
    socket: RawIcmp,
    call: u32,
}

impl Pinger {
    /// Opens the raw socket in this thread's namespace (needs root).
    pub fn open() -> Result<Self> {
        Ok(Pinger {
            socket: RawIcmp::open()?,
            call: NEXT_CALL.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Sends echo request `seq` to `addr`.
    pub fn send(&self, addr: Ipv4Addr, seq: u16) -> Result<()> {
        self.socket.send_to(&request(ident(), seq, self.call), addr)
    }

    /// Waits up to `timeout` for one packet: `Some((seq, from))` if it is
    /// a reply to one of this pinger's requests, `None` if it is anything
    /// else or nothing came.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> Result<Option<(u16, Ipv4Addr)>> {
        let Some(n) = self.socket.recv(buf, timeout)? else {
            return Ok(None);
        };
        Ok(match classify(&buf[..n], ident(), self.call) {
            Reply::Echo { seq, from } => Some((seq, from)),
            _ => None,
        })
    }
}

/// A raw ICMP socket.
struct RawIcmp(OwnedFd);

impl RawIcmp {
    fn open() -> Result<Self> {
        // SAFETY: socket(2) takes no pointers; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if fd < 0 {
            return Err(Error::last_os_error());
        }
        // SAFETY: `fd` is a socket just made and owned by nothing else.
        Ok(RawIcmp(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn send_to(&self, packet: &[u8], addr: Ipv4Addr) -> Result<()> {
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(addr).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer is valid for its length and `sa` is a valid
        // sockaddr_in of the length given, both alive for the call.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                std::ptr::from_ref(&sa).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(Error::last_os_error());
        }
        Ok(())
    }

    /// One packet, or `None` if nothing came within `timeout`.
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> Result<Option<usize>> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Rounded up: a wait shorter than a millisecond still waits.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd, alive for the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = Error::last_os_error();
            return if e.kind() == ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if r == 0 {
            return Ok(None);
        }
        // SAFETY: the buffer is valid for its length during the call.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = Error::last_os_error();
            return if e.kind() == ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(n as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    /// An IPv4 header (no options) from `src` to `dst` carrying `payload`.
    fn ip(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    fn reply_to(request: &[u8]) -> Vec<u8> {
        let mut r = request.to_vec();
        r[0] = ECHO_REPLY;
        r[2..4].copy_from_slice(&[0, 0]);
        let sum = checksum(&r);
        r[2..4].copy_from_slice(&sum.to_be_bytes());
        r
    }

    #[test]
    fn a_request_checks_out() {
        let req = request(0x1234, 2, 9);
        assert_eq!(req[0], ECHO_REQUEST);
        assert_eq!(&req[4..8], &[0x12, 0x34, 0, 2]);
        assert_eq!(&req[8..], b"weftping\0\0\0\x09");
        // A packet with its checksum in place sums to zero.
        assert_eq!(checksum(&req), 0);
        // RFC 1071's example words.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }

    #[test]
    fn only_our_replies_count() {
        let req = request(7, 3, 1);
        assert_eq!(
            classify(&ip(PEER, ME, &reply_to(&req)), 7, 1),
            Reply::Echo { seq: 3, from: PEER }
        );
        // Another process's reply, a late one of an earlier call, our own
        // request (pinging ourselves), a reply with another payload,
        // garbage.
        let other = reply_to(&request(8, 3, 1));
        assert_eq!(classify(&ip(PEER, ME, &other), 7, 1), Reply::Other);
        let late = reply_to(&request(7, 3, 0));
        assert_eq!(classify(&ip(PEER, ME, &late), 7, 1), Reply::Other);
        assert_eq!(classify(&ip(ME, ME, &req), 7, 1), Reply::Other);
        let mut odd = reply_to(&req);
        odd.push(0);
        assert_eq!(classify(&ip(PEER, ME, &odd), 7, 1), Reply::Other);
        assert_eq!(classify(&[0x45, 0], 7, 1), Reply::Other);
        assert_eq!(classify(&[], 7, 1), Reply::Other);
        // Unreachable quoting our request (IP header + 8 bytes), or not.
        let mut unreach = vec![DEST_UNREACHABLE, 1, 0, 0, 0, 0, 0, 0];
        unreach.extend_from_slice(&ip(ME, PEER, &req[..8]));
        let router = Ipv4Addr::new(10, 0, 0, 254);
        assert_eq!(
            classify(&ip(router, ME, &unreach), 7, 1),
            Reply::Unreachable {
                seq: 3,
                to: PEER,
                code: 1
            }
        );
        assert_eq!(classify(&ip(router, ME, &unreach), 8, 1), Reply::Other);
    }
}
