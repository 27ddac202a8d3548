//! One peer: its noise state (behind one lock) and its counters (atomics).
//!
//! A peer is one slot of the table, not one key: during a key rotation
//! ([`super::rotate`]) its static key changes under the lock while the slot,
//! the index and the counters stay.

use std::net::{IpAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use boringtun::noise::Tunn;
use boringtun::x25519;
use ipnetwork::Ipv4Network;

use super::rotate::DeviceKeys;

/// What the noise state needs a lock for: the session itself, the
/// endpoint to send to (which roams with authenticated packets) and the
/// peer's static keys (which change with a key rotation).
pub(crate) struct PeerState {
    pub(crate) tunn: Tunn,
    pub(crate) endpoint: SocketAddrV4,
    /// The peer's static public key `tunn` is made for.
    pub(crate) key: [u8; 32],
    /// The key the peer announced it will switch to: a handshake initiation
    /// authenticated by it replaces `tunn` ([`super::rotate`]).
    pub(crate) next_key: Option<[u8; 32]>,
    /// Where the peer is in the timer's schedule ([`super::timers`]).
    pub(crate) sched: super::timers::Sched,
}

/// Counters the transmit side writes (own cache line, no false sharing with
/// the receive side).
#[derive(Default)]
#[repr(align(64))]
pub(crate) struct TxCounters {
    pub(crate) bytes: AtomicU64,
    pub(crate) packets: AtomicU64,
    pub(crate) drops_oversize: AtomicU64,
    /// Our handshake initiations that got no answer (the timer writes it).
    pub(crate) handshake_failures: AtomicU64,
}

/// Counters the receive side writes.
#[derive(Default)]
#[repr(align(64))]
pub(crate) struct RxCounters {
    pub(crate) bytes: AtomicU64,
    pub(crate) packets: AtomicU64,
    pub(crate) drops_bad_source: AtomicU64,
    pub(crate) drops_decrypt: AtomicU64,
    pub(crate) drops_oversize: AtomicU64,
    pub(crate) drops_tun_write: AtomicU64,
    pub(crate) handshake_errors: AtomicU64,
    /// Switches to the peer's announced next key ([`super::rotate`]).
    pub(crate) key_switches: AtomicU64,
}

pub(crate) struct Peer {
    /// The 24-bit index given to boringtun: every session index of this peer
    /// is `index << 8 | n`.
    pub(crate) index: u32,
    pub(crate) keepalive: Option<u16>,
    state: Mutex<PeerState>,
    pub(crate) tx: TxCounters,
    pub(crate) rx: RxCounters,
}

impl Peer {
    pub(crate) fn new(
        keys: &DeviceKeys,
        public_key: [u8; 32],
        endpoint: SocketAddrV4,
        keepalive: Option<u16>,
        index: u32,
    ) -> Peer {
        Peer {
            index,
            keepalive,
            state: Mutex::new(PeerState {
                tunn: new_tunn(keys, public_key, keepalive, index),
                endpoint,
                key: public_key,
                next_key: None,
                sched: Default::default(),
            }),
            tx: TxCounters::default(),
            rx: RxCounters::default(),
        }
    }

    /// A fresh noise state for this peer's slot, with the peer's static key
    /// `key`.
    pub(crate) fn tunn_for(&self, keys: &DeviceKeys, key: [u8; 32]) -> Tunn {
        new_tunn(keys, key, self.keepalive, self.index)
    }

    /// The peer's current static public key.
    pub(crate) fn public_key(&self) -> [u8; 32] {
        self.lock().key
    }

    /// Locks the noise state. A poisoned lock (a panic elsewhere while held)
    /// is taken over: the state is still consistent enough to go on.
    pub(crate) fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn endpoint(&self) -> SocketAddrV4 {
        self.lock().endpoint
    }
}

/// A noise state with no session yet, sharing the device's peer rate
/// limiter (one per `Tunn` would cost 200 bytes and two getrandom calls a
/// peer; its count is reset by the timer).
fn new_tunn(keys: &DeviceKeys, key: [u8; 32], keepalive: Option<u16>, index: u32) -> Tunn {
    Tunn::new(
        keys.secret.clone(),
        x25519::PublicKey::from(key),
        None,
        keepalive,
        index,
        Some(Arc::clone(&keys.peer_limiter)),
    )
}

/// What to do with a packet decrypted from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Write it to the TUN.
    Accept,
    /// Its source is outside the peer's allowed network (crypto-key routing).
    BadSource,
    /// Larger than the TUN's MTU.
    TooBig,
}

/// Crypto-key routing: a packet decrypted from a peer goes to the TUN only if
/// its source address is inside that peer's allowed network, and only if it
/// fits the TUN's MTU.
pub(crate) fn check_decrypted(
    allowed: &Ipv4Network,
    src: IpAddr,
    len: usize,
    mtu: usize,
) -> Verdict {
    match src {
        IpAddr::V4(a) if allowed.contains(a) => {
            if len > mtu {
                Verdict::TooBig
            } else {
                Verdict::Accept
            }
        }
        _ => Verdict::BadSource,
    }
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_key_routing() {
        let allowed: Ipv4Network = "10.42.3.0/24".parse().unwrap();
        let ok: IpAddr = "10.42.3.7".parse().unwrap();
        assert_eq!(check_decrypted(&allowed, ok, 1420, 1440), Verdict::Accept);
        assert_eq!(check_decrypted(&allowed, ok, 1440, 1440), Verdict::Accept);
        assert_eq!(check_decrypted(&allowed, ok, 1441, 1440), Verdict::TooBig);
        for bad in ["10.42.4.7", "10.42.2.255", "192.168.77.10", "0.0.0.0"] {
            let bad: IpAddr = bad.parse().unwrap();
            assert_eq!(
                check_decrypted(&allowed, bad, 100, 1440),
                Verdict::BadSource,
                "{bad}"
            );
        }
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(check_decrypted(&allowed, v6, 100, 1440), Verdict::BadSource);
        // Not only /24: a peer may own any network.
        let wide: Ipv4Network = "10.42.0.0/23".parse().unwrap();
        let edge: IpAddr = "10.42.1.255".parse().unwrap();
        assert_eq!(check_decrypted(&wide, edge, 100, 1440), Verdict::Accept);
    }
}
