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

/// CPU time of thread `tid` of this process (schedstat: ns on a CPU).
fn task_cpu(tid: i32) -> Duration {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap();
    Duration::from_nanos(s.split_whitespace().next().unwrap().parse().unwrap())
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
    let start = Instant::now();
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

    // The timer thread's CPU while every handshake waits for its first
    // retry (REKEY_TIMEOUT, 5 s after set_peers).
    let tid = dev
        .shared
        .timer_tid
        .load(std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1_000).saturating_sub(start.elapsed()));
    let (cpu0, t0) = (task_cpu(tid), Instant::now());
    std::thread::sleep(Duration::from_millis(3_000));
    let timer_cpu = (task_cpu(tid) - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    // Every first initiation got no answer: one failure each, counted.
    std::thread::sleep(Duration::from_millis(6_500).saturating_sub(start.elapsed()));
    let failures = dev.device_stats().handshake_failures;
    eprintln!(
        "{N} peers: {per_peer} bytes per peer (a Peer {} inline, its Tunn {}); \
         set_peers of all {burst:?}, one join {join:?}, one leave {leave:?}; \
         timer thread {:.3} % of a core while handshakes wait; {failures} \
         handshake failures after 6.5 s",
        std::mem::size_of::<peer::Peer>(),
        std::mem::size_of::<boringtun::noise::Tunn>(),
        timer_cpu * 100.0
    );
    assert!(
        timer_cpu < 0.005,
        "timer thread at {:.2} % of a core",
        timer_cpu * 100.0
    );
    assert!(failures >= u64::from(N), "{failures}");
    assert!(dev.stats().iter().all(|s| s.handshake_failures >= 1));
    // O(n) with small constants (an O(n²) step shows at this size).
    assert!(join < Duration::from_millis(100), "one join took {join:?}");
    assert!(
        leave < Duration::from_millis(100),
        "one leave took {leave:?}"
    );
    // ~1.5 KB with boringtun's sessions boxed (third_party/boringtun), 11.5 KB without.
    assert!(per_peer < 4_000, "{per_peer} bytes per peer");
    dev.stop();
}
