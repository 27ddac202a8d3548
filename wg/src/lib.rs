//! weft's WireGuard data path: one persistent multi-queue TUN device, UDP
//! sockets sharing one port and one boringtun `noise::Tunn` per peer, driven
//! by weft's own threads.
//!
//! Per queue (one per CPU up to 4, [`WgConfig::queues`]) a *tx* worker reads
//! its TUN queue (with TSO offload: up to 64 KiB TCP packets, cut into
//! segments in place), encrypts into reused slots and sends batches with
//! `sendmmsg` + UDP GSO, and an *rx* worker receives batches on its socket
//! with `recvmmsg` + UDP GRO, decrypts, checks the source against the peer's
//! network (crypto-key routing) and writes to the TUN, merging TCP segments
//! into large writes. The kernel keeps a flow on one TUN queue and a peer on
//! one socket, so packets stay in order. One *timer* thread drives
//! handshakes, rekeys and keepalives, ticking a peer only when something
//! can be due (`timers.rs`: peers that never answer cost next to nothing,
//! and their handshake failures are a counter and one log line a minute).
//! One mutex per peer; no allocation per packet. Details in `datapath.rs`,
//! `timers.rs` and `offload.rs`.
//!
//! Key rotation without dropping traffic ([`WgDevice::switch_key`], peers'
//! announced next keys in [`WgDevice::set_peers_with_next_keys`]) is
//! described in `rotate.rs`.
//!
//! ```no_run
//! use weft_wg::{load_or_create_key, WgConfig, WgDevice, WgPeer};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let key = load_or_create_key(std::path::Path::new("/var/lib/weft"))?;
//! let dev = WgDevice::start(WgConfig {
//!     keepalive: Some(25),
//!     // queues: 0 (the default): one worker per CPU, up to 4
//!     ..WgConfig::new("weft-wg", 51820, 1440, key.private_key())
//! })?;
//! dev.set_peers(vec![WgPeer {
//!     public_key: weft_wg::key_from_base64("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=")?,
//!     endpoint: "192.168.77.11:51820".parse()?,
//!     allowed: "10.42.1.0/24".parse()?,
//! }]);
//! // routes 10.42.1.0/24 dev weft-wg are the caller's job
//! dev.stop(); // the TUN stays, with its addresses and routes
//! # Ok(()) }
//! ```
//!
//! Everything is created in the calling thread's network namespace.

mod datapath;
mod error;
mod key;
mod offload;
mod peer;
mod rotate;
mod source_budget;
mod table;
mod timers;
mod tun;
mod udp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ipnetwork::Ipv4Network;

pub use error::WgError;
pub use key::{
    key_from_base64, key_to_base64, load_or_create_key, promote_next_key, remove_next_key,
    write_next_key, KeyPair, KEY_FILE, NEXT_KEY_FILE,
};
pub use tun::destroy;

use datapath::{DeviceCounters, Shared, DATA_OVERHEAD};
use peer::Peer;
use table::{PeerTable, Want};

/// Bytes WireGuard adds on an IPv4 underlay (IPv4 20 + UDP 8 + WireGuard
/// data header 16 + tag 16 = 60): the model's figure, which this crate's
/// wire format must match. The MTU rule itself is [`weft_model::mtu`].
pub const OVERHEAD_IPV4: u32 = weft_model::mtu::WIREGUARD_OVERHEAD;
const _: () = assert!(weft_model::mtu::IPV4_UDP_HEADERS + DATA_OVERHEAD as u32 == OVERHEAD_IPV4);

/// How to start the device.
#[derive(Clone)]
pub struct WgConfig {
    /// Name of the TUN device (created if missing, reattached otherwise).
    pub ifname: String,
    /// UDP port to listen on (0.0.0.0); 0 picks a free one.
    pub listen_port: u16,
    /// MTU of the TUN device (overlay MTU).
    pub mtu: u32,
    /// This host's private key.
    pub private_key: [u8; 32],
    /// Persistent keepalive interval in seconds, for every peer.
    pub keepalive: Option<u16>,
    /// Data-path workers per direction (TUN queues and sockets on the
    /// port); 0 picks [`default_queues`].
    pub queues: usize,
}

impl WgConfig {
    /// A device named `ifname` on `listen_port` with `mtu` and
    /// `private_key`; no persistent keepalive, [`default_queues`] workers.
    pub fn new(
        ifname: impl Into<String>,
        listen_port: u16,
        mtu: u32,
        private_key: [u8; 32],
    ) -> WgConfig {
        WgConfig {
            ifname: ifname.into(),
            listen_port,
            mtu,
            private_key,
            keepalive: None,
            queues: 0,
        }
    }
}

/// The most data-path workers per direction [`default_queues`] picks.
pub const MAX_DEFAULT_QUEUES: usize = 4;
/// Peers logged one by one per `set_peers`; more are counted in one line.
const LOG_EACH: usize = 8;

/// One worker per direction per CPU, at most [`MAX_DEFAULT_QUEUES`].
pub fn default_queues() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_DEFAULT_QUEUES)
}

impl std::fmt::Debug for WgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgConfig")
            .field("ifname", &self.ifname)
            .field("listen_port", &self.listen_port)
            .field("mtu", &self.mtu)
            .field("private_key", &"<redacted>")
            .field("keepalive", &self.keepalive)
            .field("queues", &self.queues)
            .finish()
    }
}

/// One peer host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// Its static public key.
    pub public_key: [u8; 32],
    /// Where to send to until it roams (IPv4 only for now).
    pub endpoint: SocketAddr,
    /// Its network (block): packets to it go to this peer, packets from this
    /// peer must come from it.
    pub allowed: Ipv4Network,
}

/// Counters of one peer (inner packets and bytes; since the peer was added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    pub public_key: [u8; 32],
    pub endpoint: SocketAddr,
    pub allowed: Ipv4Network,
    /// Index given to boringtun (session indices are `index << 8 | n`).
    pub index: u32,
    /// Decrypted and written to the TUN.
    pub rx_bytes: u64,
    pub rx_packets: u64,
    /// Read from the TUN and encrypted to this peer.
    pub tx_bytes: u64,
    pub tx_packets: u64,
    /// Time since the current session's handshake; `None` without a session.
    pub last_handshake: Option<Duration>,
    /// Decrypted packets whose source is outside `allowed` (crypto-key routing).
    pub drops_bad_source: u64,
    /// Data messages that did not decrypt (bad tag, replay, no session).
    pub drops_decrypt: u64,
    /// Packets too big for the TUN MTU (received) or the send buffer (sent).
    pub drops_oversize: u64,
    /// Handshake messages rejected (bad MAC, stale timestamp, ...).
    pub handshake_errors: u64,
    /// Our handshake initiations that got no answer: retried after
    /// REKEY_TIMEOUT (5 s), or given up on after REKEY_ATTEMPT_TIME (90 s).
    pub handshake_failures: u64,
    /// Switches to the peer's announced next key (key rotations).
    pub key_switches: u64,
    /// Writes to the TUN that failed.
    pub drops_tun_write: u64,
}

/// Device-wide counters: drops that belong to no peer, and batching.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Packets from the TUN to an address no peer owns.
    pub drops_no_peer: u64,
    /// Packets from the TUN that are not IPv4.
    pub drops_non_ipv4: u64,
    /// UDP datagrams that are not WireGuard messages (or fail mac1).
    pub drops_malformed: u64,
    /// WireGuard messages for an unknown index or from an unknown key.
    pub drops_unknown_peer: u64,
    /// Datagrams the socket refused to send.
    pub drops_send: u64,
    /// Failed reads from the TUN.
    pub drops_tun_read: u64,
    /// Cookie replies sent under handshake load.
    pub cookies_sent: u64,
    /// Handshake initiations dropped before the Diffie-Hellman because
    /// their source exceeded its budget (20/s, bursts of 5).
    pub drops_handshake_budget: u64,
    /// Handshake initiations to any peer (also to peers since removed) that
    /// got no answer ([`PeerStats::handshake_failures`]).
    pub handshake_failures: u64,
    /// sendmmsg calls and datagrams sent by the transmit thread.
    pub tx_syscalls: u64,
    pub tx_datagrams: u64,
    /// recvmmsg calls and datagrams received.
    pub rx_syscalls: u64,
    pub rx_datagrams: u64,
}

/// The running WireGuard device.
pub struct WgDevice {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    ifname: String,
    ifindex: u32,
    control: Mutex<()>,
    stopped: AtomicBool,
}

impl std::fmt::Debug for WgDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgDevice")
            .field("ifname", &self.ifname)
            .field("ifindex", &self.ifindex)
            .field("listen_port", &self.shared.udp.port())
            .field("public_key", &key_to_base64(&self.public_key()))
            .finish()
    }
}

impl WgDevice {
    /// Creates (or reattaches to) the persistent TUN device, sets its MTU and
    /// brings it up, binds the UDP socket and starts the data-path threads.
    /// The device starts without peers: call [`WgDevice::set_peers`].
    pub fn start(cfg: WgConfig) -> Result<WgDevice, WgError> {
        tun::check_ifname(&cfg.ifname)?;
        weft_model::mtu::check_mtu(cfg.mtu, OVERHEAD_IPV4)
            .map_err(|e| WgError::Config(e.to_string()))?;
        let queues = if cfg.queues == 0 {
            default_queues()
        } else {
            cfg.queues
        };
        let (tuns, created) = tun::Tun::open_persistent(&cfg.ifname, queues)?;
        let link = tun::Link::new(&cfg.ifname)?;
        link.set_mtu(cfg.mtu)?;
        link.set_up()?;
        let ifindex = link.index()?;
        let mtu = link.mtu()?;
        let dev = WgDevice::launch(tuns, ifindex, mtu, &cfg)?;
        tracing::info!(
            ifname = %cfg.ifname, ifindex, mtu, port = dev.listen_port(), queues,
            public_key = %key_to_base64(&dev.public_key()), created, "WireGuard device started"
        );
        Ok(dev)
    }

    /// Binds one socket per TUN queue and starts a tx and an rx worker per
    /// queue, and the timer.
    fn launch(
        tuns: Vec<tun::Tun>,
        ifindex: u32,
        mtu: u32,
        cfg: &WgConfig,
    ) -> Result<WgDevice, WgError> {
        let keys = KeyPair::from_private(cfg.private_key);
        let queues = tuns.len().max(1);
        let udp = udp::Udp::bind(cfg.listen_port, queues)?;
        let base = weft_sys::random::u32()?;
        let tx_slot = (mtu as usize + DATA_OVERHEAD).div_ceil(64) * 64;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            tuns,
            udp,
            mtu: mtu as usize,
            tx_slot: tx_slot.max(256),
            keys: rotate::KeyCell::new(rotate::DeviceKeys::new(keys.private_key())),
            keepalive: cfg.keepalive,
            sources: Default::default(),
            table: Mutex::new(Arc::new(PeerTable::new(base))),
            generation: AtomicU64::new(0),
            counters: DeviceCounters::default(),
            wake: Default::default(),
            #[cfg(test)]
            timer_tid: Default::default(),
        });
        let mut dev = WgDevice {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
            ifname: cfg.ifname.clone(),
            ifindex,
            control: Mutex::new(()),
            stopped: AtomicBool::new(false),
        };
        type Loop = fn(Arc<Shared>, usize);
        let mut loops: Vec<(String, Loop, usize)> = Vec::new();
        for q in 0..queues {
            loops.push((format!("weft-wg-rx-{q}"), datapath::rx_loop, q));
            loops.push((format!("weft-wg-tx-{q}"), datapath::tx_loop, q));
        }
        loops.push(("weft-wg-timer".into(), |sh, _| timers::timer_loop(sh), 0));
        for (name, f, q) in loops {
            let sh = Arc::clone(&shared);
            let h = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || f(sh, q))
                .map_err(|source| WgError::Thread {
                    name: name.clone(),
                    source,
                })?;
            dev.threads.push(h);
        }
        Ok(dev)
    }

    /// Makes the peer set exactly `peers`: adds new ones (and starts a
    /// handshake with each), removes those gone, and updates the endpoint and
    /// allowed network of those that stay without touching their sessions.
    /// Peers that cannot be used (IPv6 endpoint, own key, a duplicate key, an
    /// allowed network overlapping another peer's) are left out with a
    /// warning.
    pub fn set_peers(&self, peers: Vec<WgPeer>) {
        self.set_peers_with_next_keys(peers.into_iter().map(|p| (p, None)).collect());
    }

    /// [`WgDevice::set_peers`], with the next key each peer announced (key
    /// rotation): a handshake initiation that proves the next key moves the
    /// peer over to it, keeping its slot and counters. A peer found by its
    /// next key, or whose key changed while no handshake moved it over,
    /// stays too (its noise state is made anew for the new key).
    pub fn set_peers_with_next_keys(&self, peers: Vec<(WgPeer, Option<[u8; 32]>)>) {
        let _g = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let mut want = Vec::with_capacity(peers.len());
        for (p, next_key) in peers {
            match p.endpoint {
                SocketAddr::V4(endpoint) => want.push(Want {
                    public_key: p.public_key,
                    next_key: next_key.filter(|k| *k != p.public_key),
                    endpoint,
                    allowed: p.allowed,
                }),
                SocketAddr::V6(_) => tracing::warn!(
                    peer = %key_to_base64(&p.public_key), endpoint = %p.endpoint,
                    "peer left out: IPv6 endpoints are not supported yet"
                ),
            }
        }
        let sh = &self.shared;
        let keys = sh.keys.current();
        let old = sh.table();
        let (next, changes) = old.reconcile(&want, &keys.public_key(), |w, index| {
            let p = Peer::new(&keys, w.public_key, w.endpoint, sh.keepalive, index);
            p.lock().next_key = w.next_key;
            Arc::new(p)
        });
        let each = |n: usize| n <= LOG_EACH;
        for (peer, endpoint) in &changes.moved {
            let mut st = peer.lock();
            st.endpoint = *endpoint;
            if each(changes.moved.len()) {
                tracing::info!(peer = %key_to_base64(&st.key), %endpoint, "peer endpoint set");
            }
        }
        for (peer, key) in &changes.rekeyed {
            let mut st = peer.lock();
            tracing::info!(old = %key_to_base64(&st.key), new = %key_to_base64(key),
                "peer key changed without a handshake moving it over; new session");
            st.tunn = peer.tunn_for(&keys, *key);
            st.key = *key;
        }
        for (peer, next_key) in &changes.next_keys {
            let mut st = peer.lock();
            if let Some(k) = next_key {
                tracing::info!(peer = %key_to_base64(&st.key), next = %key_to_base64(k),
                    "peer announced its next key");
            }
            st.next_key = *next_key;
        }
        sh.publish(next);
        for (key, why) in changes.rejected.iter().take(LOG_EACH) {
            tracing::warn!(peer = %key_to_base64(key), "peer left out: {why}");
        }
        for p in &changes.removed {
            if each(changes.removed.len()) {
                tracing::info!(peer = %key_to_base64(&p.public_key()), "peer removed");
            }
        }
        for p in &changes.added {
            if each(changes.added.len()) {
                tracing::info!(peer = %key_to_base64(&p.public_key()), endpoint = %p.endpoint(),
                    index = p.index, "peer added");
            }
            datapath::initiate(sh, p);
        }
        // Thousands at once (a cluster starting): one line with the counts.
        let many = [
            changes.added.len(),
            changes.removed.len(),
            changes.moved.len(),
            changes.rejected.len(),
        ];
        if many.iter().any(|&n| n > LOG_EACH) {
            tracing::info!(
                added = changes.added.len(),
                removed = changes.removed.len(),
                endpoint_set = changes.moved.len(),
                left_out = changes.rejected.len(),
                peers = sh.table().entries().count(),
                "peers updated"
            );
        }
        for (p, _) in &changes.rekeyed {
            datapath::initiate(sh, p);
        }
    }

    /// Switches this device to the key pair `new` (the second phase of a
    /// key rotation, after the peers have seen it announced): every peer's
    /// sessions are renegotiated at once under the new key, packets to a
    /// peer wait in its queue until then, and from now on nothing sent to
    /// the old key is answered. Returns the old public key.
    pub fn switch_key(&self, new: &KeyPair) -> [u8; 32] {
        let _g = self.control.lock().unwrap_or_else(|e| e.into_inner());
        rotate::switch(&self.shared, new.private_key())
    }

    /// The TUN device's name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The TUN device's interface index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The UDP port in use.
    pub fn listen_port(&self) -> u16 {
        self.shared.udp.port()
    }

    /// The TUN's MTU as set at start.
    pub fn mtu(&self) -> u32 {
        self.shared.mtu as u32
    }

    /// This host's public key (the new one after [`WgDevice::switch_key`]).
    pub fn public_key(&self) -> [u8; 32] {
        self.shared.keys.current().public_key()
    }

    /// Counters per peer.
    pub fn stats(&self) -> Vec<PeerStats> {
        let t = self.shared.table();
        t.entries()
            .map(|e| {
                let p = &e.peer;
                let (endpoint, last_handshake, public_key) = {
                    let st = p.lock();
                    (st.endpoint, st.tunn.time_since_last_handshake(), st.key)
                };
                PeerStats {
                    public_key,
                    endpoint: SocketAddr::V4(endpoint),
                    allowed: e.allowed,
                    index: p.index,
                    rx_bytes: p.rx.bytes.load(Relaxed),
                    rx_packets: p.rx.packets.load(Relaxed),
                    tx_bytes: p.tx.bytes.load(Relaxed),
                    tx_packets: p.tx.packets.load(Relaxed),
                    last_handshake,
                    drops_bad_source: p.rx.drops_bad_source.load(Relaxed),
                    drops_decrypt: p.rx.drops_decrypt.load(Relaxed),
                    drops_oversize: p.rx.drops_oversize.load(Relaxed)
                        + p.tx.drops_oversize.load(Relaxed),
                    handshake_errors: p.rx.handshake_errors.load(Relaxed),
                    handshake_failures: p.tx.handshake_failures.load(Relaxed),
                    key_switches: p.rx.key_switches.load(Relaxed),
                    drops_tun_write: p.rx.drops_tun_write.load(Relaxed),
                }
            })
            .collect()
    }

    /// Device-wide counters.
    pub fn device_stats(&self) -> DeviceStats {
        let c = &self.shared.counters;
        DeviceStats {
            drops_no_peer: c.drops_no_peer.load(Relaxed),
            drops_non_ipv4: c.drops_non_ipv4.load(Relaxed),
            drops_malformed: c.drops_malformed.load(Relaxed),
            drops_unknown_peer: c.drops_unknown_peer.load(Relaxed),
            drops_send: c.drops_send.load(Relaxed),
            drops_tun_read: c.drops_tun_read.load(Relaxed),
            cookies_sent: c.cookies_sent.load(Relaxed),
            drops_handshake_budget: c.drops_handshake_budget.load(Relaxed),
            handshake_failures: c.handshake_failures.load(Relaxed),
            tx_syscalls: c.tx_syscalls.load(Relaxed),
            tx_datagrams: c.tx_datagrams.load(Relaxed),
            rx_syscalls: c.rx_syscalls.load(Relaxed),
            rx_datagrams: c.rx_datagrams.load(Relaxed),
        }
    }

    /// Stops the threads and closes the socket and the TUN file descriptor.
    /// The TUN device stays (persistent), with its addresses and routes;
    /// [`WgDevice::start`] with the same name attaches to it again.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.stopped.swap(true, Relaxed) {
            return;
        }
        self.shared.stop.store(true, Relaxed);
        for h in self.threads.drain(..) {
            let name = h.thread().name().unwrap_or("?").to_string();
            if h.join().is_err() {
                tracing::error!(thread = %name, "WireGuard thread panicked");
            }
        }
        tracing::info!(ifname = %self.ifname, "WireGuard device stopped (TUN left in place)");
    }
}

impl Drop for WgDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod loopback_tests;
#[cfg(test)]
mod scale_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_debug_hides_the_key() {
        let cfg = WgConfig::new("w", 1, 1440, [0x41; 32]);
        let text = format!("{cfg:?}");
        assert!(text.contains("redacted"));
        assert!(!text.contains(&key_to_base64(&[0x41; 32])));
        assert!(!text.contains("65, 65"));
    }

    #[test]
    fn device_is_shareable() {
        fn shareable<T: Send + Sync>() {}
        shareable::<WgDevice>();
        shareable::<WgError>();
    }

    #[test]
    fn overhead_is_ipv4_udp_and_the_data_header() {
        assert_eq!(OVERHEAD_IPV4, 60);
        assert!(weft_model::mtu::check_mtu(65_475, OVERHEAD_IPV4).is_ok());
        assert!(weft_model::mtu::check_mtu(65_476, OVERHEAD_IPV4).is_err());
    }

    #[test]
    fn start_rejects_bad_config_before_touching_the_system() {
        let base = WgConfig::new("weft-wg", 0, 1440, [1; 32]);
        assert_eq!((base.keepalive, base.queues), (None, 0));
        let mut c = base.clone();
        c.mtu = 100;
        assert!(matches!(WgDevice::start(c), Err(WgError::Config(_))));
        let mut c = base;
        c.ifname = "this-name-is-too-long".into();
        assert!(matches!(WgDevice::start(c), Err(WgError::IfName(_))));
    }
}
