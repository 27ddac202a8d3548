//! Key rotation, make-before-break.
//!
//! The device's own key lives in a [`KeyCell`]: the receive path takes the
//! current [`DeviceKeys`] for each handshake initiation (its mac1 is keyed
//! by our public key, its static key decrypted with our private key), and
//! [`switch`] replaces them.
//!
//! A rotation of host A's key from K1 to K2:
//! 1. *Announce*: A publishes K2 as its next key while it still uses K1.
//!    Each peer B maps K2 to A's slot too ([`super::table::PeerTable`]) and
//!    notes it as A's `next_key`.
//! 2. *Switch*: A sets K2 on every peer's noise state (which clears the
//!    sessions; boringtun queues packets until the new handshake completes)
//!    and on the device, and initiates a handshake to every peer at once.
//!    At B the initiation's static key is A's next key: [`next_key_init`]
//!    runs it through a fresh noise state for K2 and only if that answers
//!    with a handshake response (the initiator proved it holds K2) does it
//!    replace A's noise state. The slot, index and counters stay.
//! 3. *Drop*: A publishes K2 as its key and no next key; B's table forgets
//!    K1. From the switch on A answers nothing sent to K1 (mac1 fails), and
//!    B takes nothing from K1 (not A's current or next key).

use std::net::{IpAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::TunnResult;
use boringtun::x25519;

use super::datapath::{new_limiter, new_peer_limiter, Shared};
use super::key::key_to_base64;
use super::peer::{add, Peer};
use super::timers;

/// WireGuard message type of a handshake response.
const MSG_HANDSHAKE_RESPONSE: u8 = 2;

/// This device's static key and what is derived from it.
pub(crate) struct DeviceKeys {
    pub(crate) secret: x25519::StaticSecret,
    pub(crate) public: x25519::PublicKey,
    /// The device-wide handshake rate limiter: its mac1 and cookies are
    /// keyed by `public`.
    pub(crate) limiter: RateLimiter,
    /// The limiter every peer's noise state shares (its mac1 is keyed by
    /// `public` too).
    pub(crate) peer_limiter: Arc<RateLimiter>,
}

impl DeviceKeys {
    pub(crate) fn new(private: [u8; 32]) -> DeviceKeys {
        let secret = x25519::StaticSecret::from(private);
        let public = x25519::PublicKey::from(&secret);
        DeviceKeys {
            limiter: new_limiter(&public),
            peer_limiter: new_peer_limiter(&public),
            secret,
            public,
        }
    }

    pub(crate) fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }
}

/// The device's current keys, replaced whole by a switch.
pub(crate) struct KeyCell(RwLock<Arc<DeviceKeys>>);

impl KeyCell {
    pub(crate) fn new(keys: DeviceKeys) -> KeyCell {
        KeyCell(RwLock::new(Arc::new(keys)))
    }

    pub(crate) fn current(&self) -> Arc<DeviceKeys> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn replace(&self, keys: Arc<DeviceKeys>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = keys;
    }
}

/// A handshake initiation from `peer`'s slot whose static key is `key`.
/// Returns `false` when `key` is the peer's current key (the caller goes on
/// as usual). Otherwise the datagram is handled here: if `key` is the next
/// key the peer announced and the initiation is genuine (a fresh noise
/// state for `key` answers it), the peer switches to that state and the
/// response goes out; anything else (an old key, a forgery) changes
/// nothing and is counted.
pub(crate) fn next_key_init(
    sh: &Shared,
    peer: &Arc<Peer>,
    key: &[u8; 32],
    from: SocketAddrV4,
    d: &[u8],
) -> bool {
    let mut st = peer.lock();
    if st.key == *key {
        return false;
    }
    if st.next_key != Some(*key) {
        // E.g. the key the peer had before its last switch.
        add(&sh.counters.drops_unknown_peer, 1);
        return true;
    }
    let keys = sh.keys.current();
    let mut tunn = peer.tunn_for(&keys, *key);
    let mut buf = [0u8; 256];
    match tunn.decapsulate(Some(IpAddr::V4(*from.ip())), d, &mut buf) {
        TunnResult::WriteToNetwork(msg) if msg.first() == Some(&MSG_HANDSHAKE_RESPONSE) => {
            if let Err(e) = sh.udp.send_to(msg, from) {
                add(&sh.counters.drops_send, 1);
                tracing::debug!(error = %e, "sending a handshake response failed");
            }
            let old = std::mem::replace(&mut st.key, *key);
            st.tunn = tunn;
            st.next_key = None;
            st.endpoint = from;
            timers::established(&mut st);
            timers::touch(sh, peer, &mut st);
            add(&peer.rx.key_switches, 1);
            tracing::info!(old = %key_to_base64(&old), new = %key_to_base64(key), endpoint = %from,
                "peer switched to its announced next key");
        }
        _ => add(&peer.rx.handshake_errors, 1),
    }
    true
}

/// Switches this device to `private`: every peer's noise state takes the
/// new key (its sessions end; packets wait in boringtun's queue), the
/// device's mac1 check and cookies follow, and a handshake starts with every
/// peer at once. Call under the device's control lock.
pub(crate) fn switch(sh: &Shared, private: [u8; 32]) -> [u8; 32] {
    let keys = Arc::new(DeviceKeys::new(private));
    let old = sh.keys.current().public_key();
    sh.keys.replace(Arc::clone(&keys));
    let table = sh.table();
    let mut buf = [0u8; 256];
    let mut peers = 0;
    for e in table.entries() {
        let mut st = e.peer.lock();
        st.tunn.set_static_private(
            keys.secret.clone(),
            keys.public,
            Some(Arc::clone(&keys.peer_limiter)),
        );
        let to = st.endpoint;
        timers::wake(sh, &e.peer, &mut st);
        // Forced: a handshake under the old key may be in flight.
        if let TunnResult::WriteToNetwork(msg) = st.tunn.format_handshake_initiation(&mut buf, true)
        {
            timers::sent(&mut st, msg);
            if let Err(e) = sh.udp.send_to(msg, to) {
                add(&sh.counters.drops_send, 1);
                tracing::debug!(error = %e, %to, "sending a handshake initiation failed");
            }
        }
        peers += 1;
    }
    tracing::info!(old = %key_to_base64(&old), new = %key_to_base64(&keys.public_key()), peers,
        "switched to the new WireGuard key");
    old
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::time::Duration;

    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519;

    use crate::loopback_tests::{device, ipv4, local, only, wait_for, Wire};
    use crate::{KeyPair, WgDevice, WgPeer};

    const A_NET: &str = "10.42.0.0/24";
    const B_NET: &str = "10.42.1.0/24";

    /// Sends a handshake initiation made with `from`'s private key to `to`'s
    /// public key and port; returns whether anything came back.
    fn initiate_as(from: &KeyPair, to_public: [u8; 32], port: u16) -> bool {
        let mut t = Tunn::new(
            x25519::StaticSecret::from(from.private_key()),
            x25519::PublicKey::from(to_public),
            None,
            None,
            77,
            None,
        );
        let mut buf = [0u8; 256];
        let TunnResult::WriteToNetwork(msg) = t.format_handshake_initiation(&mut buf, false) else {
            panic!("no initiation");
        };
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s.send_to(msg, local(port)).unwrap();
        s.recv(&mut buf).is_ok()
    }

    fn ping(from: &Wire, to: &Wire, src: [u8; 4], dst: [u8; 4], fill: u8) {
        let p = ipv4(src, dst, 200, fill);
        from.send(&p);
        assert_eq!(to.recv(Duration::from_secs(2)).as_deref(), Some(&p[..]));
    }

    fn peer(dev: &WgDevice, key: [u8; 32], net: &str) -> WgPeer {
        WgPeer {
            public_key: key,
            endpoint: local(dev.listen_port()),
            allowed: net.parse().unwrap(),
        }
    }

    #[test]
    fn rotation_moves_the_peer_over_and_drops_the_old_key() {
        let (k1, kb) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let (a, wa) = device(1440, &k1);
        let (b, wb) = device(1440, &kb);
        a.set_peers(vec![peer(&b, kb.public_key(), B_NET)]);
        b.set_peers(vec![peer(&a, k1.public_key(), A_NET)]);
        wait_for("handshakes", || {
            only(a.stats()).last_handshake.is_some() && only(b.stats()).last_handshake.is_some()
        });
        ping(&wa, &wb, [10, 42, 0, 5], [10, 42, 1, 5], 1);
        ping(&wb, &wa, [10, 42, 1, 5], [10, 42, 0, 5], 2);
        let index = only(b.stats()).index;

        // Announce: B learns A's next key.
        let k2 = KeyPair::generate().unwrap();
        b.set_peers_with_next_keys(vec![(
            peer(&a, k1.public_key(), A_NET),
            Some(k2.public_key()),
        )]);
        // A key nobody announced moves nothing.
        let stranger = KeyPair::generate().unwrap();
        let unknown = b.device_stats().drops_unknown_peer;
        assert!(!initiate_as(&stranger, kb.public_key(), b.listen_port()));
        wait_for("unknown peer", || {
            b.device_stats().drops_unknown_peer == unknown + 1
        });
        assert_eq!(only(b.stats()).public_key, k1.public_key());

        // Switch: A uses K2; B moves over on A's initiation.
        assert_eq!(a.switch_key(&k2), k1.public_key());
        assert_eq!(a.public_key(), k2.public_key());
        wait_for("B switched", || only(b.stats()).key_switches == 1);
        let sb = only(b.stats());
        assert_eq!(sb.public_key, k2.public_key());
        assert_eq!(sb.index, index, "same slot");
        assert!(sb.rx_packets >= 1, "counters kept");
        ping(&wa, &wb, [10, 42, 0, 5], [10, 42, 1, 5], 3);
        ping(&wb, &wa, [10, 42, 1, 5], [10, 42, 0, 5], 4);

        // K1 is accepted nowhere: B refuses an initiation from it (still
        // an alias in B's table until the store catches up, and after)...
        let unknown = b.device_stats().drops_unknown_peer;
        assert!(!initiate_as(&k1, kb.public_key(), b.listen_port()));
        wait_for("old key refused", || {
            b.device_stats().drops_unknown_peer == unknown + 1
        });
        b.set_peers(vec![peer(&a, k2.public_key(), A_NET)]);
        assert_eq!(only(b.stats()).index, index);
        assert!(!initiate_as(&k1, kb.public_key(), b.listen_port()));
        wait_for("old key unknown", || {
            b.device_stats().drops_unknown_peer == unknown + 2
        });
        // ... and A answers nothing sent to it (mac1 is keyed by K2 now).
        let malformed = a.device_stats().drops_malformed;
        assert!(!initiate_as(&kb, k1.public_key(), a.listen_port()));
        wait_for("A refuses its old key", || {
            a.device_stats().drops_malformed == malformed + 1
        });
        // The sessions still work.
        ping(&wa, &wb, [10, 42, 0, 5], [10, 42, 1, 5], 5);
        assert_eq!(only(b.stats()).key_switches, 1);
        assert_eq!(only(b.stats()).public_key, k2.public_key());
        // Before the wires close (a closed fake TUN reads as EOF forever).
        a.stop();
        b.stop();
    }
}
