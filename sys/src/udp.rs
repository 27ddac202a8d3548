//! Batched UDP I/O: `recvmmsg` (many datagrams per system call, with UDP GRO
//! coalesced ones split by the caller) and `sendmmsg` (many datagrams to any
//! number of destinations per system call, with runs of equal-sized datagrams
//! to one destination sent as one UDP GSO message where the socket allows).
//!
//! Used by the WireGuard data path (GRO/GSO on, IPv4) and by dnsd's UDP fast
//! path (no offloads, IPv4 and IPv6, every answer to its own client).
//!
//! The batch structures own every header, address and control buffer they
//! hand to the kernel; nothing is allocated per packet. They hold raw
//! pointers, so each thread makes its own.
//!
//! quinn-udp was considered and not used: since 0.5 it sends one `Transmit`
//! (one destination) per `sendmsg`, with no `sendmmsg`, so dnsd's batch of
//! answers to many clients and the WireGuard batch of GSO runs to several
//! peers would each take one system call per destination instead of one per
//! batch.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Largest UDP payload the kernel takes in one GSO send (64 KiB minus IPv4
/// and UDP headers, with some room).
const GSO_MAX_BYTES: usize = 65_000;
/// Most segments in one GSO send (the kernel's UDP_MAX_SEGMENTS is 64 on
/// older kernels).
const GSO_MAX_SEGMENTS: usize = 64;
/// Room for one cmsg carrying an int (UDP_GRO) or u16 (UDP_SEGMENT).
const CMSG_BUF: usize = 64;

/// A UDP socket with the offloads it may use for batches.
#[derive(Debug)]
pub struct Socket {
    sock: UdpSocket,
    /// Whether UDP GSO is used for sends (cleared after the kernel refuses).
    gso: AtomicBool,
    /// Whether UDP GRO was accepted on the socket.
    gro: bool,
}

impl Socket {
    /// Without offloads: every datagram is its own message both ways.
    pub fn new(sock: UdpSocket) -> Socket {
        Socket {
            sock,
            gso: AtomicBool::new(false),
            gro: false,
        }
    }

    /// With UDP GRO where the kernel accepts it, and UDP GSO for sends until
    /// the kernel refuses it.
    pub fn with_offloads(sock: UdpSocket) -> Socket {
        let s = Socket {
            sock,
            gso: AtomicBool::new(true),
            gro: false,
        };
        let gro = s.set_option(libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
        Socket { gro, ..s }
    }

    /// Sets an integer socket option (setsockopt(2)).
    pub fn set_option(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        value: libc::c_int,
    ) -> io::Result<()> {
        // SAFETY: `value` lives for the call; the length matches its type.
        let rc = unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Whether received batches may hold GRO-coalesced datagrams.
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// Whether sends still use GSO.
    pub fn gso(&self) -> bool {
        self.gso.load(Relaxed)
    }
}

impl std::ops::Deref for Socket {
    type Target = UdpSocket;
    fn deref(&self) -> &UdpSocket {
        &self.sock
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// Writes `a` into `out`; returns the length to give the kernel.
fn write_sockaddr(a: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match a {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in is plain old data; all-zero is valid.
            let mut s: libc::sockaddr_in = unsafe { zeroed() };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = a.port().to_be();
            s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), s) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let mut s: libc::sockaddr_in6 = unsafe { zeroed() };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = a.port().to_be();
            s.sin6_addr.s6_addr = a.ip().octets();
            s.sin6_flowinfo = a.flowinfo();
            s.sin6_scope_id = a.scope_id();
            // SAFETY: as above.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), s) };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// The address the kernel wrote into `s`; `None` for a family other than
/// IPv4 and IPv6.
fn read_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says sockaddr_in, and sockaddr_storage is
            // large and aligned enough for it.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Outcome of one batch send.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Datagrams the kernel took.
    pub datagrams: usize,
    /// Datagrams that could not go (no route, refused, ...).
    pub failed: usize,
    /// `sendmmsg` calls made.
    pub syscalls: usize,
}

/// Reusable `sendmmsg` state for up to `cap` datagrams.
pub struct SendBatch {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    ctrl: Vec<[u64; CMSG_BUF / 8]>,
    /// For each header: first datagram and count.
    runs: Vec<(usize, usize)>,
}

impl SendBatch {
    pub fn new(cap: usize) -> SendBatch {
        SendBatch {
            // SAFETY: mmsghdr/iovec/sockaddr_storage are plain old data; zero
            // is valid.
            hdrs: (0..cap).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..cap).map(|_| unsafe { zeroed() }).collect(),
            addrs: (0..cap).map(|_| unsafe { zeroed() }).collect(),
            ctrl: vec![[0u64; CMSG_BUF / 8]; cap],
            runs: Vec::with_capacity(cap),
        }
    }

    /// Sends datagram `i` = `buf[i*stride..][..lens[i]]` to `dests[i]`, for
    /// all `i` (up to the batch's capacity), with as few `sendmmsg` calls as
    /// the kernel allows. With GSO on the socket, consecutive datagrams to
    /// one destination whose sizes are equal (the last of a run may be
    /// shorter) go as one message. A datagram that cannot go is counted and
    /// skipped; a GSO message the kernel refuses is sent one datagram at a
    /// time (and GSO is turned off for good on EIO/ENOPROTOOPT).
    pub fn send<D>(
        &mut self,
        sock: &Socket,
        buf: &[u8],
        stride: usize,
        lens: &[usize],
        dests: &[D],
    ) -> Sent
    where
        D: Copy + PartialEq + Into<SocketAddr>,
    {
        let n = lens.len().min(dests.len()).min(self.iovs.len());
        let gso = sock.gso.load(Relaxed);
        self.runs.clear();
        let mut i = 0;
        while i < n {
            let seg = lens[i];
            let mut j = i + 1;
            if gso {
                while j < n
                    && dests[j] == dests[i]
                    && lens[j] <= seg
                    && lens[j - 1] == seg
                    && j - i < GSO_MAX_SEGMENTS
                    && (j - i + 1) * seg <= GSO_MAX_BYTES
                {
                    j += 1;
                }
            }
            self.runs.push((i, j - i));
            i = j;
        }
        for k in 0..n {
            let start = k * stride;
            debug_assert!(start + lens[k] <= buf.len());
            self.iovs[k] = libc::iovec {
                iov_base: buf[start..start + lens[k]].as_ptr() as *mut libc::c_void,
                iov_len: lens[k],
            };
        }
        for (m, &(first, count)) in self.runs.iter().enumerate() {
            let namelen = write_sockaddr(dests[first].into(), &mut self.addrs[m]);
            // SAFETY: zero is a valid msghdr.
            let mut h: libc::msghdr = unsafe { zeroed() };
            h.msg_name = (&mut self.addrs[m] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = namelen;
            h.msg_iov = &mut self.iovs[first];
            h.msg_iovlen = count;
            if count > 1 {
                let ctrl = &mut self.ctrl[m];
                h.msg_control = ctrl.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE is a pure size computation.
                h.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
                // SAFETY: the control buffer is CMSG_BUF bytes, aligned, larger
                // than CMSG_SPACE(2); CMSG_FIRSTHDR points into it.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), lens[first] as u16);
                }
            }
            self.hdrs[m] = libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            };
        }
        let mut out = Sent::default();
        let total = self.runs.len();
        let mut done = 0;
        // Bounded: a signal storm or a kernel taking nothing cannot hold the
        // caller here.
        while done < total && out.syscalls < 2 * total + 2 {
            out.syscalls += 1;
            // SAFETY: hdrs[done..total] are initialised above and point into
            // buffers that live for the call.
            let rc = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    self.hdrs[done..].as_mut_ptr(),
                    (total - done) as libc::c_uint,
                    0,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(code) if self.runs[done].1 > 1 => {
                        // The kernel or the route cannot do GSO for this run:
                        // send it one datagram at a time. EIO/ENOPROTOOPT mean
                        // never (no checksum offload, old kernel): stop trying.
                        if matches!(code, libc::EIO | libc::ENOPROTOOPT)
                            && sock.gso.swap(false, Relaxed)
                        {
                            tracing::warn!(error = %e, "UDP GSO refused; sending datagrams one by one");
                        }
                        let (first, count) = self.runs[done];
                        for k in first..first + count {
                            match sock
                                .sock
                                .send_to(&buf[k * stride..k * stride + lens[k]], dests[k].into())
                            {
                                Ok(_) => out.datagrams += 1,
                                Err(_) => out.failed += 1,
                            }
                        }
                    }
                    _ => {
                        tracing::debug!(error = %e, to = %dests[self.runs[done].0].into(), "UDP send failed");
                        out.failed += self.runs[done].1;
                    }
                }
                done += 1;
                continue;
            }
            for r in &self.runs[done..done + rc as usize] {
                out.datagrams += r.1;
            }
            done += rc as usize;
        }
        for r in &self.runs[done..] {
            out.failed += r.1;
        }
        out
    }
}

/// How `recv` waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Never: take what is queued, or `WouldBlock` (MSG_DONTWAIT).
    Never,
    /// Until the first datagram arrives (or the socket's receive timeout
    /// passes), then take what is queued (MSG_WAITFORONE).
    ForFirst,
}

/// Reusable `recvmmsg` state: `cap` slots of `slot` bytes each.
pub struct RecvBatch {
    bufs: Vec<u8>,
    slot: usize,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    ctrl: Vec<[u64; CMSG_BUF / 8]>,
}

/// One received message: a datagram, or several coalesced by GRO (split
/// every `segment` bytes).
#[derive(Debug)]
pub struct Received<'a> {
    pub data: &'a [u8],
    /// The sender; `None` for an address family other than IPv4 and IPv6.
    pub from: Option<SocketAddr>,
    pub segment: Option<usize>,
    /// Longer than the slot: cut off.
    pub truncated: bool,
}

impl RecvBatch {
    pub fn new(cap: usize, slot: usize) -> RecvBatch {
        RecvBatch {
            bufs: vec![0u8; cap * slot],
            slot,
            // SAFETY: plain old data; zero is valid.
            hdrs: (0..cap).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..cap).map(|_| unsafe { zeroed() }).collect(),
            addrs: (0..cap).map(|_| unsafe { zeroed() }).collect(),
            ctrl: vec![[0u64; CMSG_BUF / 8]; cap],
        }
    }

    /// Receives up to the batch's capacity of messages with one
    /// `recvmmsg` (retried on EINTR): their number, or the error
    /// (`WouldBlock` when nothing is queued, or the receive timeout passed).
    pub fn recv(&mut self, sock: &Socket, wait: Wait) -> io::Result<usize> {
        let cap = self.hdrs.len();
        for k in 0..cap {
            self.iovs[k] = libc::iovec {
                iov_base: self.bufs[k * self.slot..].as_mut_ptr().cast(),
                iov_len: self.slot,
            };
            // SAFETY: zero is a valid msghdr.
            let mut h: libc::msghdr = unsafe { zeroed() };
            h.msg_name = (&mut self.addrs[k] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[k];
            h.msg_iovlen = 1;
            if sock.gro {
                h.msg_control = self.ctrl[k].as_mut_ptr().cast();
                h.msg_controllen = CMSG_BUF;
            }
            self.hdrs[k] = libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            };
        }
        let flags = match wait {
            Wait::Never => libc::MSG_DONTWAIT,
            Wait::ForFirst => libc::MSG_WAITFORONE,
        };
        loop {
            // SAFETY: every header points into buffers owned by self.
            let rc = unsafe {
                libc::recvmmsg(
                    sock.as_raw_fd(),
                    self.hdrs.as_mut_ptr(),
                    cap as libc::c_uint,
                    flags,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                return Ok(rc as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Message `k` of the last `recv`.
    pub fn get(&self, k: usize) -> Received<'_> {
        let h = &self.hdrs[k];
        let len = (h.msg_len as usize).min(self.slot);
        let mut segment = None;
        if h.msg_hdr.msg_controllen > 0 && !h.msg_hdr.msg_control.is_null() {
            // SAFETY: the kernel wrote msg_controllen bytes of cmsgs into our
            // control buffer; the CMSG_* walk stays inside it.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                        let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                        if v > 0 {
                            segment = Some(v as usize);
                        }
                    }
                    c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
                }
            }
        }
        Received {
            data: &self.bufs[k * self.slot..k * self.slot + len],
            from: read_sockaddr(&self.addrs[k]),
            segment,
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::{Duration, Instant};

    fn bind(addr: &str, offloads: bool) -> Socket {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if offloads {
            Socket::with_offloads(s)
        } else {
            Socket::new(s)
        }
    }

    /// Receives until `n` datagrams arrived (GRO ones split), with senders.
    fn receive(sock: &Socket, n: usize, slot: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut rb = RecvBatch::new(8, slot);
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < n && Instant::now() < deadline {
            match rb.recv(sock, Wait::ForFirst) {
                Ok(m) => {
                    for k in 0..m {
                        let r = rb.get(k);
                        assert!(!r.truncated);
                        let from = r.from.unwrap();
                        match r.segment {
                            Some(s) => got.extend(r.data.chunks(s).map(|d| (d.to_vec(), from))),
                            None => got.push((r.data.to_vec(), from)),
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    #[test]
    fn gso_batch_roundtrip_over_loopback() {
        let a = bind("127.0.0.1:0", true);
        let b = bind("127.0.0.1:0", true);
        let to = match b.local_addr().unwrap() {
            SocketAddr::V4(v4) => v4,
            SocketAddr::V6(_) => unreachable!(),
        };
        let stride = 2048;
        let n = 40;
        let mut buf = vec![0u8; n * stride];
        let mut lens = Vec::new();
        for i in 0..n {
            // 30 equal ones (one GSO run), a short one, then odd sizes.
            let len = if i < 30 {
                1400
            } else if i == 30 {
                100
            } else {
                200 + i
            };
            buf[i * stride..i * stride + len].fill(i as u8);
            lens.push(len);
        }
        let dests = vec![to; n];
        let mut sb = SendBatch::new(64);
        let sent = sb.send(&a, &buf, stride, &lens, &dests);
        assert_eq!(sent.datagrams, n);
        assert_eq!(sent.failed, 0);
        if a.gso() {
            // Runs: the 30 + the short one close it, then one per odd size.
            assert_eq!(sent.syscalls, 1);
        }
        let got = receive(&b, n, 65536);
        assert_eq!(got.len(), n);
        for (i, (d, from)) in got.iter().enumerate() {
            assert_eq!(d.len(), lens[i], "datagram {i}");
            assert!(d.iter().all(|&x| x == i as u8), "datagram {i}");
            assert_eq!(*from, a.local_addr().unwrap());
        }
    }

    #[test]
    fn one_sendmmsg_answers_many_clients_on_both_families() {
        let server = bind("127.0.0.1:0", false);
        let server6 = bind("[::1]:0", false);
        let clients: Vec<Socket> = (0..5).map(|_| bind("127.0.0.1:0", false)).collect();
        let clients6: Vec<Socket> = (0..3).map(|_| bind("[::1]:0", false)).collect();
        // Each client asks; the servers read the batch and answer every
        // sender with one sendmmsg.
        for (i, c) in clients.iter().enumerate() {
            c.send_to(&[i as u8; 10], server.local_addr().unwrap())
                .unwrap();
        }
        for (i, c) in clients6.iter().enumerate() {
            c.send_to(&[i as u8; 10], server6.local_addr().unwrap())
                .unwrap();
        }
        for (srv, cls) in [(&server, &clients), (&server6, &clients6)] {
            let asked = receive(srv, cls.len(), 512);
            assert_eq!(asked.len(), cls.len());
            let stride = 64;
            let mut buf = vec![0u8; asked.len() * stride];
            let mut lens = Vec::new();
            let mut dests = Vec::new();
            for (k, (q, from)) in asked.iter().enumerate() {
                buf[k * stride..k * stride + 3].fill(q[0] + 100);
                lens.push(3);
                dests.push(*from);
            }
            let sent = SendBatch::new(32).send(srv, &buf, stride, &lens, &dests);
            assert_eq!(
                sent,
                Sent {
                    datagrams: cls.len(),
                    failed: 0,
                    syscalls: 1
                }
            );
            for (i, c) in cls.iter().enumerate() {
                let got = receive(c, 1, 512);
                assert_eq!(
                    got,
                    vec![(vec![i as u8 + 100; 3], srv.local_addr().unwrap())]
                );
            }
        }
    }

    #[test]
    fn an_unreachable_destination_is_counted_and_the_rest_go() {
        let a = bind("127.0.0.1:0", false);
        let b = bind("127.0.0.1:0", false);
        let good = b.local_addr().unwrap();
        // IPv6 destination on an IPv4 socket: the kernel refuses that one.
        let bad: SocketAddr = "[::1]:9".parse().unwrap();
        let buf = vec![7u8; 3 * 16];
        let sent = SendBatch::new(8).send(&a, &buf, 16, &[5, 5, 5], &[good, bad, good]);
        assert_eq!(sent.datagrams, 2);
        assert_eq!(sent.failed, 1);
        assert_eq!(receive(&b, 2, 64).len(), 2);
    }

    #[test]
    fn nothing_queued_is_would_block() {
        let a = bind("127.0.0.1:0", true);
        let err = RecvBatch::new(4, 64).recv(&a, Wait::Never).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn sockaddr_roundtrip() {
        for a in [
            "10.1.2.3:53",
            "0.0.0.0:0",
            "[fe80::1%7]:5353",
            "[2001:db8::5]:65535",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            // SAFETY: plain old data; zero is valid.
            let mut s: libc::sockaddr_storage = unsafe { zeroed() };
            let len = write_sockaddr(a, &mut s);
            assert_eq!(read_sockaddr(&s), Some(a));
            let want = if a.is_ipv4() { 16 } else { 28 };
            assert_eq!(len as usize, want);
        }
        // SAFETY: as above.
        let mut s: libc::sockaddr_storage = unsafe { zeroed() };
        s.ss_family = libc::AF_UNIX as libc::sa_family_t;
        assert_eq!(read_sockaddr(&s), None);
    }
}
