//! Two devices in one process, no root: a SOCK_SEQPACKET socket pair stands
//! in for each TUN and the UDP sockets talk over 127.0.0.1. Covers the data
//! path end to end: handshake, forwarding both ways, crypto-key routing,
//! drops and their counters, batching, roaming and reconciliation.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::{Duration, Instant};

use super::offload;
use super::*;

fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: both were just created and are owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The device's end is nonblocking like a TUN opened with O_NONBLOCK.
    // SAFETY: plain fcntl on a valid descriptor.
    unsafe {
        let fl = libc::fcntl(a.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(a.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    (a, b)
}

/// The "kernel" side of a fake TUN.
pub(crate) struct Wire(OwnedFd);

impl Wire {
    /// Hands the device a plain packet (empty virtio-net header).
    pub(crate) fn send(&self, pkt: &[u8]) {
        self.send_with(&offload::VnetHdr::default(), pkt);
    }

    fn send_with(&self, h: &offload::VnetHdr, pkt: &[u8]) {
        let mut frame = vec![0u8; offload::VNET_HDR_LEN];
        h.write(&mut frame);
        frame.extend_from_slice(pkt);
        // SAFETY: valid buffer and descriptor.
        let n = unsafe { libc::write(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        assert_eq!(n as usize, frame.len());
    }

    /// The next packet the device wrote, without its virtio-net header
    /// (which must be empty: no offload).
    pub(crate) fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let (h, p) = self.recv_frame(timeout)?;
        assert_eq!(h, offload::VnetHdr::default());
        Some(p)
    }

    fn recv_frame(&self, timeout: Duration) -> Option<(offload::VnetHdr, Vec<u8>)> {
        let f = self.recv_raw(timeout)?;
        let h = offload::VnetHdr::parse(&f).unwrap();
        Some((h, f[offload::VNET_HDR_LEN..].to_vec()))
    }

    fn recv_raw(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut p = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
        if rc <= 0 {
            return None;
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: valid buffer and descriptor.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n >= 0);
        buf.truncate(n as usize);
        Some(buf)
    }
}

pub(crate) fn ipv4(src: [u8; 4], dst: [u8; 4], total: usize, fill: u8) -> Vec<u8> {
    let mut p = vec![fill; total];
    p[0] = 0x45;
    p[1] = 0;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&[0, 1]);
    p[6..8].copy_from_slice(&[0x40, 0]);
    p[8] = 64;
    p[9] = 17;
    p[10..12].copy_from_slice(&[0, 0]);
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let mut sum: u32 = 0;
    for w in p[..20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p
}

pub(crate) fn device(mtu: u32, keys: &KeyPair) -> (WgDevice, Wire) {
    let (dev_end, test_end) = socketpair();
    let tun = tun::Tun::from_fd(dev_end, "fake");
    let cfg = WgConfig::new("fake", 0, mtu, keys.private_key());
    let dev = WgDevice::launch(vec![tun], 1, mtu, &cfg).unwrap();
    (dev, Wire(test_end))
}

pub(crate) fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

pub(crate) fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn only(stats: Vec<PeerStats>) -> PeerStats {
    assert_eq!(stats.len(), 1, "{stats:?}");
    stats.into_iter().next().unwrap()
}

const A_NET: &str = "10.42.0.0/24";
const B_NET: &str = "10.42.1.0/24";

#[test]
fn two_devices_over_loopback() {
    let (ka, kb) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    // A's MTU is bigger than B's: B still takes A's larger packets.
    let (a, wa) = device(2000, &ka);
    let (b, wb) = device(1440, &kb);
    let peer_b = WgPeer {
        public_key: kb.public_key(),
        endpoint: local(b.listen_port()),
        allowed: B_NET.parse().unwrap(),
    };
    let peer_a = WgPeer {
        public_key: ka.public_key(),
        endpoint: local(a.listen_port()),
        allowed: A_NET.parse().unwrap(),
    };
    a.set_peers(vec![peer_b.clone()]);
    b.set_peers(vec![peer_a.clone()]);
    wait_for("handshakes", || {
        only(a.stats()).last_handshake.is_some() && only(b.stats()).last_handshake.is_some()
    });

    // A -> B and back.
    let p = ipv4([10, 42, 0, 5], [10, 42, 1, 5], 100, 0xab);
    wa.send(&p);
    assert_eq!(wb.recv(Duration::from_secs(2)).as_deref(), Some(&p[..]));
    let q = ipv4([10, 42, 1, 5], [10, 42, 0, 5], 1440, 0xcd);
    wb.send(&q);
    assert_eq!(wa.recv(Duration::from_secs(2)).as_deref(), Some(&q[..]));
    let (sa, sb) = (only(a.stats()), only(b.stats()));
    assert_eq!((sa.tx_packets, sa.tx_bytes), (1, 100));
    assert_eq!((sa.rx_packets, sa.rx_bytes), (1, 1440));
    assert_eq!((sb.rx_packets, sb.rx_bytes), (1, 100));
    assert_eq!((sb.tx_packets, sb.tx_bytes), (1, 1440));
    assert_eq!(sa.public_key, kb.public_key());
    assert_eq!(sa.endpoint, local(b.listen_port()));

    // Crypto-key routing: a source outside A's network is dropped by B.
    wa.send(&ipv4([10, 42, 9, 9], [10, 42, 1, 5], 100, 0));
    wait_for("drops_bad_source", || only(b.stats()).drops_bad_source == 1);
    // Bigger than B's TUN MTU (1440) though A's (2000) took it: delivered
    // all the same, so B's kernel routes it and answers "fragmentation
    // needed" where it does not fit, instead of a silent drop here.
    let big = ipv4([10, 42, 0, 5], [10, 42, 1, 5], 1500, 0);
    wa.send(&big);
    assert_eq!(wb.recv(Duration::from_secs(2)).as_deref(), Some(&big[..]));
    assert_eq!(only(b.stats()).drops_oversize, 0);
    assert_eq!(only(b.stats()).rx_packets, 2);

    // No peer for the destination; not IPv4.
    wa.send(&ipv4([10, 42, 0, 5], [10, 42, 7, 1], 60, 0));
    let mut v6 = vec![0u8; 60];
    v6[0] = 0x60;
    wa.send(&v6);
    wait_for("drops_no_peer", || a.device_stats().drops_no_peer == 1);
    wait_for("drops_non_ipv4", || a.device_stats().drops_non_ipv4 == 1);

    // Garbage and forged messages at B's socket never panic, only count.
    let rogue = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = local(b.listen_port());
    rogue.send_to(b"hello", to).unwrap();
    rogue.send_to(&[], to).unwrap();
    let mut fake = vec![0u8; 64];
    fake[0] = 4;
    fake[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    rogue.send_to(&fake, to).unwrap();
    let mut fake_init = vec![0u8; 148];
    fake_init[0] = 1;
    rogue.send_to(&fake_init, to).unwrap();
    // A data message with A's real receiver index but a forged payload.
    let mut forged = vec![0u8; 80];
    forged[0] = 4;
    let idx_of_b_at_a = only(b.stats()).index; // B's index for A: A sends to it
    forged[4..8].copy_from_slice(&(idx_of_b_at_a << 8).to_le_bytes());
    rogue.send_to(&forged, to).unwrap();
    wait_for("malformed and unknown counted", || {
        let d = b.device_stats();
        d.drops_malformed >= 3 && d.drops_unknown_peer >= 1
    });
    wait_for("forged data counted", || only(b.stats()).drops_decrypt >= 1);
    // The forged packet did not move B's endpoint for A.
    assert_eq!(only(b.stats()).endpoint, local(a.listen_port()));

    // A burst: many equal-sized packets (GSO runs, GRO on receive).
    let n = 500;
    let before = only(b.stats()).rx_packets;
    // Read B's side concurrently: the socket pair standing in for the TUN
    // holds only ~200 KB (a real TUN never pushes back on writes).
    let got = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut got = 0;
            while got < n && wb.recv(Duration::from_secs(2)).is_some() {
                got += 1;
            }
            got
        });
        for i in 0..n {
            wa.send(&ipv4(
                [10, 42, 0, 5],
                [10, 42, 1, (i % 250) as u8],
                1400,
                i as u8,
            ));
        }
        reader.join().unwrap()
    });
    assert_eq!(got, n, "{:?} {:?}", only(b.stats()), b.device_stats());
    assert_eq!(only(b.stats()).rx_packets - before, n as u64);
    let d = a.device_stats();
    assert!(d.tx_datagrams >= n as u64, "{d:?}");

    // Reconcile in place: a wrong endpoint for B keeps the session; B's next
    // packet (authenticated) moves it back (roaming).
    let index_before = only(a.stats()).index;
    let mut wrong = peer_b.clone();
    wrong.endpoint = local(9);
    a.set_peers(vec![wrong]);
    let s = only(a.stats());
    assert_eq!(s.endpoint, local(9));
    assert_eq!(s.index, index_before);
    assert!(s.last_handshake.is_some(), "session kept");
    assert!(s.tx_packets > 0, "counters kept");
    wb.send(&q);
    assert_eq!(wa.recv(Duration::from_secs(2)).as_deref(), Some(&q[..]));
    assert_eq!(
        only(a.stats()).endpoint,
        local(b.listen_port()),
        "roamed back"
    );
    wa.send(&p);
    assert_eq!(wb.recv(Duration::from_secs(2)).as_deref(), Some(&p[..]));

    // Allowed network changed in place: B now owns 10.42.2.0/24 instead.
    let mut moved = peer_b.clone();
    moved.allowed = "10.42.2.0/24".parse().unwrap();
    a.set_peers(vec![moved]);
    let no_peer = a.device_stats().drops_no_peer;
    wa.send(&p);
    wait_for("old block unrouted", || {
        a.device_stats().drops_no_peer == no_peer + 1
    });
    let p2 = ipv4([10, 42, 0, 5], [10, 42, 2, 5], 100, 1);
    wa.send(&p2);
    assert_eq!(wb.recv(Duration::from_secs(2)).as_deref(), Some(&p2[..]));

    // Removing the peer: nothing routed any more.
    a.set_peers(vec![]);
    assert!(a.stats().is_empty());
    a.stop();
    b.stop();
}

#[test]
fn traffic_before_the_handshake_is_queued_and_delivered() {
    let (ka, kb) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let (a, wa) = device(1440, &ka);
    let (b, wb) = device(1440, &kb);
    // B learns of A first; A's first packet triggers A's handshake.
    b.set_peers(vec![WgPeer {
        public_key: ka.public_key(),
        endpoint: local(a.listen_port()),
        allowed: A_NET.parse().unwrap(),
    }]);
    a.set_peers(vec![WgPeer {
        public_key: kb.public_key(),
        endpoint: local(b.listen_port()),
        allowed: B_NET.parse().unwrap(),
    }]);
    let p = ipv4([10, 42, 0, 1], [10, 42, 1, 1], 84, 7);
    wa.send(&p);
    assert_eq!(wb.recv(Duration::from_secs(3)).as_deref(), Some(&p[..]));
    drop(a);
    drop(b);
}

#[test]
fn tso_in_gro_out() {
    use super::offload::{tests::tcp, VnetHdr};
    let (ka, kb) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let (a, wa) = device(1440, &ka);
    let (b, wb) = device(1440, &kb);
    a.set_peers(vec![WgPeer {
        public_key: kb.public_key(),
        endpoint: local(b.listen_port()),
        allowed: B_NET.parse().unwrap(),
    }]);
    b.set_peers(vec![WgPeer {
        public_key: ka.public_key(),
        endpoint: local(a.listen_port()),
        allowed: A_NET.parse().unwrap(),
    }]);
    wait_for("handshakes", || {
        only(a.stats()).last_handshake.is_some() && only(b.stats()).last_handshake.is_some()
    });
    // The kernel hands A one 30 000-byte TCP packet to cut at mss 1388
    // (= 1440 - 52 bytes of headers).
    let payload: Vec<u8> = (0..30_000u32).map(|i| (i % 253) as u8).collect();
    let mut sup = tcp(7, 0x18, &payload, 1);
    sup[12..16].copy_from_slice(&[10, 42, 0, 2]);
    sup[16..20].copy_from_slice(&[10, 42, 1, 2]);
    // Headers only need to be plausible: A recomputes every checksum.
    let h = VnetHdr {
        flags: 1,
        gso_type: 1,
        hdr_len: 52,
        gso_size: 1388,
        csum_start: 20,
        csum_offset: 16,
    };
    wa.send_with(&h, &sup);
    let segs = 30_000usize.div_ceil(1388) as u64;
    wait_for("all segments", || only(b.stats()).rx_packets == segs);
    assert_eq!(only(a.stats()).tx_packets, segs);
    // B hands its kernel large packets again (GRO), with the payload intact.
    let mut joined = Vec::new();
    let mut frames = 0;
    while joined.len() < payload.len() {
        let (vh, p) = wb.recv_frame(Duration::from_secs(2)).expect("a frame");
        frames += 1;
        assert!(offload::tests::ip_ok(&p));
        if frames == 1 {
            assert_eq!(vh.gso_type, 1, "merged: {vh:?}");
            assert_eq!(vh.gso_size, 1388);
        }
        joined.extend_from_slice(&p[52..]);
    }
    assert_eq!(joined, payload);
    assert!(frames < segs, "{frames} frames for {segs} segments");
    a.stop();
    b.stop();
}

#[test]
fn a_cookie_reply_from_elsewhere_does_not_move_the_peer() {
    use boringtun::noise::rate_limiter::RateLimiter;
    use boringtun::noise::TunnResult;
    use std::net::UdpSocket;
    let (ka, kb) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let (a, _wa) = device(1440, &ka);
    // B is only a socket: it receives A's initiation and never answers it.
    let b = UdpSocket::bind(local(0)).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let b_addr = b.local_addr().unwrap();
    a.set_peers(vec![WgPeer {
        public_key: kb.public_key(),
        endpoint: b_addr,
        allowed: B_NET.parse().unwrap(),
    }]);
    let mut init = [0u8; 256];
    let (n, _) = b.recv_from(&mut init).unwrap();
    assert_eq!(init[0], 1, "a handshake initiation");
    // Anyone who saw the initiation can answer it with a valid cookie reply
    // (a limiter at limit 0 is always "under load").
    let limiter = RateLimiter::new(&boringtun::x25519::PublicKey::from(kb.public_key()), 0);
    let mut out = [0u8; 128];
    let from_elsewhere = UdpSocket::bind(local(0)).unwrap();
    let src = from_elsewhere.local_addr().unwrap();
    let cookie = match limiter.verify_packet(Some(src.ip()), &init[..n], &mut out) {
        Err(TunnResult::WriteToNetwork(c)) => c.to_vec(),
        _ => panic!("expected a cookie reply"),
    };
    from_elsewhere
        .send_to(&cookie, local(a.listen_port()))
        .unwrap();
    // A takes the cookie (the datagram reached the peer's session) ...
    wait_for("A to process the cookie reply", || {
        a.device_stats().rx_datagrams >= 1
    });
    std::thread::sleep(Duration::from_millis(50));
    // ... but the peer stays where it was configured.
    assert_eq!(only(a.stats()).endpoint, b_addr);
    a.stop();
}
