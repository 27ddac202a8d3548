//! The WireGuard UDP socket: bound on 0.0.0.0 with large buffers, no DF,
//! and the offloads (UDP GRO/GSO) the batches in `weft_sys::udp` use.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::RawFd;

use weft_sys::udp::Socket;

use super::error::WgError;

/// Socket buffer sizes asked for (SO_*BUFFORCE as root, else capped by
/// net.core.*mem_max).
const SOCKET_BUFFER: libc::c_int = 8 << 20;

pub(crate) struct Udp {
    sock: Socket,
    port: u16,
}

impl Udp {
    /// Binds `0.0.0.0:port` (0 picks a free port), with large buffers and
    /// UDP GRO/GSO where the kernel has them.
    pub(crate) fn bind(port: u16) -> Result<Udp, WgError> {
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
            .map_err(|e| WgError::socket(port, "bind 0.0.0.0", e))?;
        let port = sock
            .local_addr()
            .map_err(|e| WgError::socket(port, "read the bound address", e))?
            .port();
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
        Ok(Udp { sock, port })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The socket, for batches.
    pub(crate) fn socket(&self) -> &Socket {
        &self.sock
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.sock)
    }

    /// Sends one datagram (handshakes, keepalives, cookie replies).
    pub(crate) fn send_to(&self, buf: &[u8], to: SocketAddrV4) -> io::Result<usize> {
        self.sock.send_to(buf, to)
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
    use std::net::SocketAddr;
    use weft_sys::udp::{RecvBatch, SendBatch, Wait};

    /// The WireGuard socket as bound here carries GSO batches and GRO
    /// receives end to end.
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
        let sent = sb.send(a.socket(), &buf, stride, &lens, &dests);
        assert_eq!(sent.datagrams, n);
        assert_eq!(sent.failed, 0);

        let mut rb = RecvBatch::new(8, 65536);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < n && std::time::Instant::now() < deadline {
            match rb.recv(b.socket(), Wait::Never) {
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
