//! Thousands of peers that never answer (hosts at addresses that lead
//! nowhere): what they cost in memory, in timer CPU and in `set_peers`.
//! No root: the fake TUN of [`super::loopback_tests`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::loopback_tests::device;
use super::*;

/// Counts the bytes live per thread, so that concurrent tests do not
/// disturb a measurement.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the counter is a plain
// thread-local cell without a destructor.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|c| c.set(c.get() + l.size() as isize));
        // SAFETY: the caller's layout is passed on unchanged.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        let _ = LIVE.try_with(|c| c.set(c.get() - l.size() as isize));
        // SAFETY: `p` came from `alloc` with the same layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_bytes() -> isize {
    LIVE.with(Cell::get)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `n` peers whose endpoints lead nowhere (loopback ports nobody
/// listens on), with /28 blocks in 10.64.0.0/10.
pub(crate) fn unreachable_peers(n: u32, salt: u8) -> Vec<WgPeer> {
    (0..n)
        .map(|i| {
            let mut public_key = [salt; 32];
            public_key[..4].copy_from_slice(&i.to_be_bytes());
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 77, 0, 0)) + i);
            WgPeer {
                public_key,
                endpoint: SocketAddr::from((ip, 9)),
                allowed: ipnetwork::Ipv4Network::new(
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i * 16),
                    28,
                )
                .unwrap(),
            }
        })
        .collect()
}

const N: u32 = 5_000;

#[test]
fn five_thousand_unreachable_peers() {
    let keys = KeyPair::generate().unwrap();
    let (dev, _wire) = device(1440, &keys);
    let peers = unreachable_peers(N, 0x33);

    let before = live_bytes();
    let t = Instant::now();
    dev.set_peers(peers.clone());
    let burst = t.elapsed();
    let per_peer = (live_bytes() - before) / N as isize;

    // One join and one leave at that size.
    let mut more = peers.clone();
    more.extend(unreachable_peers(1, 0x44));
    let t = Instant::now();
    dev.set_peers(more);
    let join = t.elapsed();
    let t = Instant::now();
    dev.set_peers(peers.clone());
    let leave = t.elapsed();

    // What one timer pass over every peer costs (the timer thread runs
    // too; ticking a peer twice is harmless).
    let sh = &dev.shared;
    let table = sh.table();
    let mut buf = vec![0u8; 2048];
    let cpu = thread_cpu();
    let rounds = 20;
    for _ in 0..rounds {
        for e in table.entries() {
            datapath::tick_peer(sh, &e.peer, &mut buf);
        }
    }
    let tick = (thread_cpu() - cpu) / rounds;
    eprintln!(
        "{N} peers: {per_peer} bytes per peer; set_peers of all {burst:?}, \
         one join {join:?}, one leave {leave:?}; one timer pass over all {tick:?}"
    );
    // O(n) with small constants (an O(n²) step shows at this size).
    assert!(join < Duration::from_millis(100), "one join took {join:?}");
    assert!(
        leave < Duration::from_millis(100),
        "one leave took {leave:?}"
    );
    assert!(per_peer < 16_000, "{per_peer} bytes per peer");
    dev.stop();
}
