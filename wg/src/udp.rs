//! The UDP socket and batched I/O on it: `recvmmsg` with UDP GRO (many
//! datagrams, some coalesced, per system call) and `sendmmsg` with UDP GSO
//! (runs of equal-sized datagrams to one endpoint as one message).
//!
//! The batch structures own every buffer and header they hand to the kernel;
//! nothing is allocated per packet. They hold raw pointers, so each thread
//! makes its own.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd as _, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use super::error::WgError;

/// Largest UDP payload the kernel takes in one GSO send (64 KiB minus IPv4
/// and UDP headers, with some room).
const GSO_MAX_BYTES: usize = 65_000;
/// Most segments in one GSO send (the kernel's UDP_MAX_SEGMENTS is 64 on
/// older kernels).
const GSO_MAX_SEGMENTS: usize = 64;
/// Socket buffer sizes asked for (SO_*BUFFORCE as root, else capped by
/// net.core.*mem_max).
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// Room for one cmsg carrying an int (UDP_GRO) or u16 (UDP_SEGMENT).
const CMSG_BUF: usize = 64;

pub(crate) struct Udp {
    sock: UdpSocket,
    port: u16,
    /// Whether UDP GSO is used for sends (cleared after the kernel refuses).
    gso: AtomicBool,
    /// Whether UDP GRO was accepted on the socket.
    gro: bool,
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` lives for the call; the length matches its type.
    let rc = unsafe {
        libc::setsockopt(
            fd,
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

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut s: libc::sockaddr_in = unsafe { zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
}

fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)),
        u16::from_be(s.sin_port),
    )
}

impl Udp {
    /// Binds `0.0.0.0:port` (0 picks a free port), with large buffers and
    /// UDP GRO where the kernel has it.
    pub(crate) fn bind(port: u16) -> Result<Udp, WgError> {
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
            .map_err(|e| WgError::socket(port, "bind 0.0.0.0", e))?;
        let port = sock
            .local_addr()
            .map_err(|e| WgError::socket(port, "read the bound address", e))?
            .port();
        let fd = sock.as_raw_fd();
        for (force, plain, what) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
        ] {
            if setsockopt_int(fd, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
                if let Err(e) = setsockopt_int(fd, libc::SOL_SOCKET, plain, SOCKET_BUFFER) {
                    tracing::warn!(error = %e, "cannot enlarge the UDP {what} buffer");
                }
            }
        }
        // Never set DF on the encrypted datagrams: when the underlay path
        // has a hop with a smaller MTU than our interface, the kernel and the
        // routers fragment them instead of dropping them (a userspace tunnel
        // would otherwise black-hole every packet between the path MTU and
        // the interface MTU, as the kernel's EMSGSIZE never reaches the
        // inner sender). Like VXLAN's default.
        if let Err(e) = setsockopt_int(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        ) {
            tracing::warn!(error = %e, "cannot turn off path MTU discovery on the WireGuard socket");
        }
        let gro = setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
        Ok(Udp {
            sock,
            port,
            gso: AtomicBool::new(true),
            gro,
        })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends one datagram (handshakes, keepalives, cookie replies).
    pub(crate) fn send_to(&self, buf: &[u8], to: SocketAddrV4) -> io::Result<usize> {
        self.sock.send_to(buf, to)
    }
}

/// Outcome of one batch send.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) datagrams: usize,
    pub(crate) failed: usize,
    pub(crate) syscalls: usize,
}

/// Reusable `sendmmsg` state for up to `cap` datagrams.
pub(crate) struct SendBatch {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in>,
    ctrl: Vec<[u64; CMSG_BUF / 8]>,
    /// For each header: first datagram and count.
    runs: Vec<(usize, usize)>,
}

impl SendBatch {
    pub(crate) fn new(cap: usize) -> SendBatch {
        SendBatch {
            // SAFETY: mmsghdr/iovec/sockaddr_in are plain old data; zero is valid.
            hdrs: (0..cap).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..cap).map(|_| unsafe { zeroed() }).collect(),
            addrs: (0..cap).map(|_| unsafe { zeroed() }).collect(),
            ctrl: vec![[0u64; CMSG_BUF / 8]; cap],
            runs: Vec::with_capacity(cap),
        }
    }

    /// Sends datagram `i` = `buf[i*stride..][..lens[i]]` to `dests[i]`, for
    /// all `i`. Consecutive datagrams to one endpoint whose sizes are equal
    /// (the last of a run may be shorter) go as one UDP GSO message.
    pub(crate) fn send(
        &mut self,
        udp: &Udp,
        buf: &[u8],
        stride: usize,
        lens: &[usize],
        dests: &[SocketAddrV4],
    ) -> Sent {
        let n = lens.len().min(dests.len()).min(self.iovs.len());
        let gso = udp.gso.load(Relaxed);
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
            self.addrs[m] = sockaddr(dests[first]);
            // SAFETY: zero is a valid msghdr.
            let mut h: libc::msghdr = unsafe { zeroed() };
            h.msg_name = (&mut self.addrs[m] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
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
        while done < total {
            out.syscalls += 1;
            // SAFETY: hdrs[done..total] are initialised above and point into
            // buffers that live for the call.
            let rc = unsafe {
                libc::sendmmsg(
                    udp.raw_fd(),
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
                            && udp.gso.swap(false, Relaxed)
                        {
                            tracing::warn!(error = %e, "UDP GSO refused; sending datagrams one by one");
                        }
                        let (first, count) = self.runs[done];
                        for k in first..first + count {
                            match udp.send_to(&buf[k * stride..k * stride + lens[k]], dests[k]) {
                                Ok(_) => out.datagrams += 1,
                                Err(_) => out.failed += 1,
                            }
                        }
                    }
                    _ => {
                        tracing::debug!(error = %e, to = %dests[self.runs[done].0], "UDP send failed");
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
        out
    }
}

/// Reusable `recvmmsg` state: `cap` slots of `slot` bytes each.
pub(crate) struct RecvBatch {
    bufs: Vec<u8>,
    slot: usize,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in>,
    ctrl: Vec<[u64; CMSG_BUF / 8]>,
}

/// One received message: a datagram, or several coalesced by GRO (split
/// every `segment` bytes).
pub(crate) struct Received<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) from: SocketAddrV4,
    pub(crate) segment: Option<usize>,
    pub(crate) truncated: bool,
}

impl RecvBatch {
    pub(crate) fn new(cap: usize, slot: usize) -> RecvBatch {
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

    /// Receives what is queued, without waiting: the number of messages, or
    /// `WouldBlock`.
    pub(crate) fn recv(&mut self, udp: &Udp) -> io::Result<usize> {
        let cap = self.hdrs.len();
        for k in 0..cap {
            self.iovs[k] = libc::iovec {
                iov_base: self.bufs[k * self.slot..].as_mut_ptr().cast(),
                iov_len: self.slot,
            };
            // SAFETY: zero is a valid msghdr.
            let mut h: libc::msghdr = unsafe { zeroed() };
            h.msg_name = (&mut self.addrs[k] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[k];
            h.msg_iovlen = 1;
            if udp.gro {
                h.msg_control = self.ctrl[k].as_mut_ptr().cast();
                h.msg_controllen = CMSG_BUF;
            }
            self.hdrs[k] = libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            };
        }
        loop {
            // SAFETY: every header points into buffers owned by self.
            let rc = unsafe {
                libc::recvmmsg(
                    udp.raw_fd(),
                    self.hdrs.as_mut_ptr(),
                    cap as libc::c_uint,
                    libc::MSG_DONTWAIT,
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
    pub(crate) fn get(&self, k: usize) -> Received<'_> {
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
            from: from_sockaddr(&self.addrs[k]),
            segment,
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        }
    }
}

/// Waits until `fd` is readable or `timeout_ms` passes.
pub(crate) fn wait_readable(fd: RawFd, timeout_ms: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, timeout_ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_roundtrip_over_loopback() {
        let a = Udp::bind(0).unwrap();
        let b = Udp::bind(0).unwrap();
        let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, b.port());
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

        let mut rb = RecvBatch::new(8, 65536);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < n && std::time::Instant::now() < deadline {
            match rb.recv(&b) {
                Ok(m) => {
                    for k in 0..m {
                        let r = rb.get(k);
                        assert!(!r.truncated);
                        assert_eq!(r.from.port(), a.port());
                        match r.segment {
                            Some(s) => got.extend(r.data.chunks(s).map(<[u8]>::to_vec)),
                            None => got.push(r.data.to_vec()),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(b.raw_fd(), 100),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), n);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.len(), lens[i], "datagram {i}");
            assert!(d.iter().all(|&x| x == i as u8), "datagram {i}");
        }
    }
}
