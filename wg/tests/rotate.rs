#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Key rotation between two lab hosts (needs root; no netd: the test plays
//! the store's part and hands each device its peer list). A TCP stream runs
//! from A's block to B's across A's rotation from K1 to K2: announce (B
//! learns K2 as A's next key), switch (A moves to K2, B follows on A's
//! handshake), then the store catches up (B's peer list names K2 only).
//! Proves: no reset, no gap of 1 s or more between received chunks, B moved
//! the same peer slot over, and afterwards a handshake initiation made with
//! K1 is refused by B, and one sent to K1 is refused by A.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use common::{pair, serial};
use weft_tests::{in_netns, wait_until, Host, Lab, LabOptions};
use weft_wg::KeyPair;

const TCP_PORT: u16 = 5201;
/// Persistent keepalive of both devices, in seconds.
const KEEPALIVE: u16 = 25;

/// Sends a handshake initiation made with `from`'s private key towards
/// `to_public` at `to`, from a fresh socket in `host`'s namespace; returns
/// whether anything answered within 500 ms.
fn initiate_as(host: &Host, from: &KeyPair, to_public: [u8; 32], to: SocketAddrV4) -> bool {
    let mut t = Tunn::new(
        x25519::StaticSecret::from(from.private_key()),
        x25519::PublicKey::from(to_public),
        None,
        None,
        99,
        None,
    );
    let mut buf = [0u8; 256];
    let TunnResult::WriteToNetwork(msg) = t.format_handshake_initiation(&mut buf, false) else {
        panic!("boringtun made no initiation");
    };
    let msg = msg.to_vec();
    in_netns(host.netns().path(), move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.send_to(&msg, to).unwrap();
        let mut b = [0u8; 256];
        s.recv(&mut b).is_ok()
    })
}

/// What the receiving end saw.
#[derive(Debug)]
struct Received {
    bytes: u64,
    max_gap: Duration,
    error: Option<String>,
}

#[test]
fn a_tcp_stream_survives_a_key_rotation() {
    weft_tests::require_root!();
    let _s = serial();
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let (a, b) = pair(&lab, Some(KEEPALIVE));
    let (k1, kb) = (&a.keys, &b.keys);
    wait_until(Duration::from_secs(5), "the first handshake", || {
        b.dev()
            .stats()
            .first()
            .and_then(|s| s.last_handshake)
            .is_some()
    })
    .expect("handshake");

    // The stream: B receives and records the largest gap between reads; A
    // writes 16 KiB every millisecond or so until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let listener = in_netns(b.host.netns().path(), || {
        TcpListener::bind(format!("{}:{TCP_PORT}", b.gw())).unwrap()
    });
    let receiver = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut got = Received {
            bytes: 0,
            max_gap: Duration::ZERO,
            error: None,
        };
        let mut last = Instant::now();
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let now = Instant::now();
                    got.max_gap = got.max_gap.max(now - last);
                    last = now;
                    got.bytes += n as u64;
                }
                Err(e) => {
                    got.error = Some(e.to_string());
                    break;
                }
            }
        }
        got
    });
    let dst = b.gw();
    let sender = {
        let stop = Arc::clone(&stop);
        let path = a.host.netns().path().to_path_buf();
        std::thread::spawn(move || -> Result<u64, String> {
            // From A's gateway: the route to B's block says so.
            let to: SocketAddr = format!("{dst}:{TCP_PORT}").parse().unwrap();
            let mut conn = in_netns(&path, || {
                TcpStream::connect_timeout(&to, Duration::from_secs(5))
            })
            .map_err(|e| format!("connect: {e}"))?;
            let chunk = vec![0x5au8; 16 * 1024];
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                conn.write_all(&chunk).map_err(|e| format!("write: {e}"))?;
                sent += chunk.len() as u64;
                std::thread::sleep(Duration::from_millis(1));
            }
            conn.shutdown(std::net::Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"))?;
            Ok(sent)
        })
    };
    std::thread::sleep(Duration::from_secs(1));

    // Announce: B learns A's next key.
    let k2 = KeyPair::generate().unwrap();
    b.dev()
        .set_peers_with_next_keys(vec![(a.peer_with(k1.public_key()), Some(k2.public_key()))]);
    let index = b.dev().stats()[0].index;
    std::thread::sleep(Duration::from_millis(500));
    // Switch.
    let switched = Instant::now();
    assert_eq!(a.dev().switch_key(&k2), k1.public_key());
    wait_until(Duration::from_secs(5), "B moving over to K2", || {
        b.dev().stats()[0].key_switches == 1
    })
    .expect("B moves over to K2 on A's handshake");
    println!("B moved over {:?} after the switch", switched.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    // The store catches up: K2 only.
    b.dev().set_peers(vec![a.peer_with(k2.public_key())]);
    std::thread::sleep(Duration::from_secs(1));

    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    let got = receiver.join().unwrap();
    println!("sent {sent:?}, received {got:?}");
    let sent = sent.expect("the sender saw no error (no reset)");
    assert_eq!(got.error, None, "the receiver saw no error (no reset)");
    assert_eq!(got.bytes, sent, "every byte arrived");
    assert!(
        got.max_gap < Duration::from_secs(1),
        "largest gap between received chunks: {:?}",
        got.max_gap
    );
    let sb = &b.dev().stats()[0];
    assert_eq!(sb.public_key, k2.public_key());
    assert_eq!(sb.index, index, "the same peer slot moved over");
    assert_eq!(sb.key_switches, 1);

    // K1 is accepted nowhere: B does not answer an initiation made with it
    // (unknown peer), and A does not answer one sent to it (mac1 is keyed
    // by K2 now).
    let unknown = b.dev().device_stats().drops_unknown_peer;
    assert!(!initiate_as(&a.host, k1, kb.public_key(), b.endpoint()));
    assert_eq!(b.dev().device_stats().drops_unknown_peer, unknown + 1);
    let malformed = a.dev().device_stats().drops_malformed;
    assert!(!initiate_as(&b.host, kb, k1.public_key(), a.endpoint()));
    assert_eq!(a.dev().device_stats().drops_malformed, malformed + 1);
    // While K2 is answered (the same probe towards K2 gets a response).
    assert!(initiate_as(&b.host, kb, k2.public_key(), a.endpoint()));
}
