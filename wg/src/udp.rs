//! The WireGuard UDP socket: bound on 0.0.0.0 with large buffers, no DF,
//! and the offloads (UDP GRO/GSO) the batches in `weft_sys::udp` use.

use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::RawFd;

use weft_sys::udp::Socket;

use super::error::WgError;

/// Socket buffer sizes asked for (SO_*BUFFORCE as root, else capped by
/// net.core.*mem_max).
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// The device's sockets: one per receive worker, all bound to the same port
/// with `SO_REUSEPORT`. The kernel hands each datagram to one of them by a
/// hash of its addresses and ports, so every datagram of one peer reaches
/// the same socket (and worker), in order.
pub(crate) struct Udp {
    socks: Vec<Socket>,
    port: u16,
}

/// Binds an IPv4 UDP socket to `0.0.0.0:port`, with `SO_REUSEPORT` set
/// before the bind when `reuse` (the only way to share a port).
fn bind_one(port: u16, reuse: bool) -> io::Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    if reuse {
        let one: libc::c_int = 1;
        // SAFETY: SO_REUSEPORT takes an int.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEPORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in and its length.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

impl Udp {
    /// Binds `count` sockets (at least one) to `0.0.0.0:port` (0 picks a
    /// free port for the first, the others share it), with large buffers
    /// and UDP GRO/GSO where the kernel has them.
    pub(crate) fn bind(port: u16, count: usize) -> Result<Udp, WgError> {
        let reuse = count > 1;
        let first = bind_one(port, reuse).map_err(|e| WgError::socket(port, "bind 0.0.0.0", e))?;
        let port = first
            .local_addr()
            .map_err(|e| WgError::socket(port, "read the bound address", e))?
            .port();
        let mut socks = vec![Udp::setup(first)];
        for _ in 1..count {
            let s = bind_one(port, true)
                .map_err(|e| WgError::socket(port, "bind 0.0.0.0 (SO_REUSEPORT)", e))?;
            socks.push(Udp::setup(s));
        }
        Ok(Udp { socks, port })
    }

    /// Buffers, no DF, offloads.
    fn setup(sock: UdpSocket) -> Socket {
        let sock = Socket::with_offloads(sock);
        for (force, plain, what) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
        ] {
            if sock
                .set_option(libc::SOL_SOCKET, force, SOCKET_BUFFER)
                .is_err()
            {
                if let Err(e) = sock.set_option(libc::SOL_SOCKET, plain, SOCKET_BUFFER) {
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
        if let Err(e) = sock.set_option(
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        ) {
            tracing::warn!(error = %e, "cannot turn off path MTU discovery on the WireGuard socket");
        }
        sock
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Socket `i` (modulo the count), for a worker's batches.
    pub(crate) fn socket(&self, i: usize) -> &Socket {
        &self.socks[i % self.socks.len()]
    }

    pub(crate) fn raw_fd(&self, i: usize) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self.socket(i))
    }

    /// Sends one datagram (handshakes, keepalives, cookie replies) from the
    /// first socket: all have the same address.
    pub(crate) fn send_to(&self, buf: &[u8], to: SocketAddrV4) -> io::Result<usize> {
        self.socks[0].send_to(buf, to)
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
    use std::net::Ipv4Addr;
    use std::net::SocketAddr;
    use weft_sys::udp::{RecvBatch, SendBatch, Wait};

    /// The WireGuard socket as bound here carries GSO batches and GRO
    /// receives end to end.
    #[test]
    fn batch_roundtrip_over_loopback() {
        let a = Udp::bind(0, 1).unwrap();
        let b = Udp::bind(0, 1).unwrap();
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
        let sent = sb.send(a.socket(0), &buf, stride, &lens, &dests);
        assert_eq!(sent.datagrams, n);
        assert_eq!(sent.failed, 0);

        let mut rb = RecvBatch::new(8, 65536);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < n && std::time::Instant::now() < deadline {
            match rb.recv(b.socket(0), Wait::Never) {
                Ok(m) => {
                    for k in 0..m {
                        let r = rb.get(k);
                        assert!(!r.truncated);
                        assert_eq!(
                            r.from,
                            Some(SocketAddr::from(SocketAddrV4::new(
                                Ipv4Addr::LOCALHOST,
                                a.port()
                            )))
                        );
                        match r.segment {
                            Some(s) => got.extend(r.data.chunks(s).map(<[u8]>::to_vec)),
                            None => got.push(r.data.to_vec()),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(b.raw_fd(0), 100),
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

#[cfg(test)]
mod reuseport_tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::Ipv4Addr;
    use weft_sys::udp::{RecvBatch, Wait};

    /// The sockets share one port, and every datagram of one sender lands
    /// on the same socket (the receive worker of that peer), in order.
    #[test]
    fn sockets_share_the_port_and_keep_each_sender_on_one() {
        let u = Udp::bind(0, 3).unwrap();
        let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, u.port());
        let senders: Vec<UdpSocket> = (0..12)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for k in 0..5u8 {
            for (s, c) in senders.iter().enumerate() {
                c.send_to(&[s as u8, k], to).unwrap();
            }
        }
        // sender port -> (socket indices, sequence numbers in arrival order)
        let mut got: BTreeMap<u16, (BTreeSet<usize>, Vec<u8>)> = BTreeMap::new();
        let mut rb = RecvBatch::new(64, 2048);
        let mut total = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while total < 60 && std::time::Instant::now() < deadline {
            for i in 0..3 {
                if let Ok(m) = rb.recv(u.socket(i), Wait::Never) {
                    for k in 0..m {
                        let r = rb.get(k);
                        let from = r.from.unwrap().port();
                        let e = got.entry(from).or_default();
                        e.0.insert(i);
                        e.1.push(r.data[1]);
                        total += 1;
                    }
                }
            }
        }
        assert_eq!(total, 60);
        assert_eq!(got.len(), 12);
        for (port, (socks, seq)) in &got {
            assert_eq!(socks.len(), 1, "sender {port} reached sockets {socks:?}");
            assert_eq!(seq, &[0, 1, 2, 3, 4], "sender {port} in order");
        }
        let used: BTreeSet<usize> = got.values().flat_map(|v| v.0.iter().copied()).collect();
        assert!(
            used.len() > 1,
            "12 senders all hashed to one socket: {used:?}"
        );
    }
}
