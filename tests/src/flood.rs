//! A flood of bogus WireGuard handshake initiations, for the test and the
//! bench of weft's DoS defence (cookie replies under load,
//! `wg/tests/flood.rs`, `weft-bench tunnel`'s flood figure).
//!
//! [`initiations`] makes real initiations from random static keys towards
//! the victim's public key: their mac1 is valid (anyone who knows the public
//! key can make them), so the victim cannot reject them without work; their
//! sender is no peer of the victim's, so a Diffie-Hellman spent on one is
//! wasted. [`garbage`] makes initiation-sized messages with a wrong mac1.
//! [`Flooder`] replays a set of them, round robin, from a UDP socket in a
//! lab namespace at a target rate with `sendmmsg`, and reports the rate it
//! achieved.
//!
//! ```no_run
//! # fn main() -> weft_tests::Result<()> {
//! # let (lab, victim_key): (weft_tests::Lab, [u8; 32]) = todo!();
//! use weft_tests::flood::{self, Flooder};
//! let mut packets = flood::initiations(&victim_key, 1000)?;
//! packets.extend(flood::garbage(1000)?);
//! let f = Flooder::start(lab.host(2).netns(), "192.168.77.10:51820".parse().unwrap(), packets, 50_000)?;
//! // ... measure ...
//! let report = f.stop()?;
//! println!("{report}");
//! # Ok(()) }
//! ```

use std::net::{SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use weft_sys::udp::{SendBatch, Socket};

use crate::error::{Error, Result};
use crate::netns::{in_netns, Netns};

/// Size of a WireGuard handshake initiation (type 1).
pub const INITIATION_LEN: usize = 148;
/// Datagrams per `sendmmsg`.
const BATCH: usize = 64;
/// How far behind schedule the sender may fall before it stops catching up
/// (no burst after a stall).
const MAX_BACKLOG: u64 = 4 * BATCH as u64;

fn random(buf: &mut [u8]) -> Result<()> {
    weft_sys::random::fill(buf).map_err(|e| {
        Error::io(
            "getting random bytes for the flood",
            std::io::Error::other(e.to_string()),
        )
    })
}

/// `n` handshake initiations, each from a fresh random static key and
/// ephemeral key, addressed to `victim` (its static public key): valid mac1,
/// no mac2, unknown sender.
pub fn initiations(victim: &[u8; 32], n: usize) -> Result<Vec<Vec<u8>>> {
    let victim = x25519::PublicKey::from(*victim);
    let mut out = Vec::with_capacity(n);
    let mut buf = [0u8; 256];
    for i in 0..n {
        let mut key = [0u8; 32];
        random(&mut key)?;
        let mut tunn = Tunn::new(
            x25519::StaticSecret::from(key),
            victim,
            None,
            None,
            i as u32,
            None,
        );
        match tunn.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(msg) if msg.len() == INITIATION_LEN => {
                out.push(msg.to_vec())
            }
            _ => {
                return Err(Error::Options(
                    "boringtun made no handshake initiation".into(),
                ))
            }
        }
    }
    Ok(out)
}

/// `n` handshake initiations from one random key whose mac2 is valid for
/// the address of `from` (the attacker who can receive at its address):
/// sends initiations from `from` to `target` until `target`, under load,
/// answers with a cookie reply, then makes `n` initiations carrying it
/// (each with its own ephemeral key). The cookie stays good for about two
/// minutes. Fails if no cookie reply came within `timeout` (the target
/// demands cookies only while over its rate limit: flood it meanwhile).
pub fn initiations_with_cookie(
    from: &Netns,
    target: SocketAddrV4,
    victim: &[u8; 32],
    n: usize,
    timeout: Duration,
) -> Result<Vec<Vec<u8>>> {
    let sock = in_netns(from.path(), || UdpSocket::bind("0.0.0.0:0"))
        .map_err(|e| Error::io(format!("binding the cookie socket in {}", from.name()), e))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| Error::io("setting a read timeout", e))?;
    let mut key = [0u8; 32];
    random(&mut key)?;
    let mut tunn = Tunn::new(
        x25519::StaticSecret::from(key),
        x25519::PublicKey::from(*victim),
        None,
        None,
        0,
        None,
    );
    let (mut buf, mut reply) = ([0u8; 256], [0u8; 256]);
    let deadline = Instant::now() + timeout;
    'cookie: loop {
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!("a cookie reply from {target}")));
        }
        if let TunnResult::WriteToNetwork(msg) = tunn.format_handshake_initiation(&mut buf, true) {
            sock.send_to(msg, target)
                .map_err(|e| Error::io(format!("sending an initiation to {target}"), e))?;
        }
        // The reply may wait behind the flood in the target's queue: give
        // it a second before the next initiation (which makes this one's
        // reply useless).
        let resend = Instant::now() + Duration::from_secs(1);
        while Instant::now() < resend {
            let Ok((len, _)) = sock.recv_from(&mut reply) else {
                continue;
            };
            // Type 3: cookie reply, 64 bytes.
            if len == 64 && reply[0] == 3 {
                if let TunnResult::Done = tunn.decapsulate(None, &reply[..len], &mut buf) {
                    break 'cookie;
                }
            }
        }
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        match tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(msg) => out.push(msg.to_vec()),
            _ => {
                return Err(Error::Options(
                    "boringtun made no handshake initiation".into(),
                ))
            }
        }
    }
    Ok(out)
}

/// `n` messages that parse as handshake initiations (type 1, the right
/// length) but are random bytes: mac1 is wrong.
pub fn garbage(n: usize) -> Result<Vec<Vec<u8>>> {
    (0..n)
        .map(|_| {
            let mut m = vec![0u8; INITIATION_LEN];
            random(&mut m[4..])?;
            m[0] = 1;
            Ok(m)
        })
        .collect()
}

/// What a flood did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloodReport {
    /// Datagrams the kernel took.
    pub sent: u64,
    /// Datagrams it refused.
    pub failed: u64,
    /// How long the flood ran.
    pub secs: f64,
    /// The rate asked for, per second.
    pub target: u64,
}

impl FloodReport {
    /// Datagrams sent per second.
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.sent as f64 / self.secs
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for FloodReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} handshake initiations in {:.2} s = {:.0}/s (target {}/s, {} refused by the kernel)",
            self.sent,
            self.secs,
            self.rate(),
            self.target,
            self.failed
        )
    }
}

/// A running flood; [`Flooder::stop`] ends it (dropping it does too).
pub struct Flooder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<FloodReport>>,
}

impl Flooder {
    /// Sends `packets` round robin to `target` at `rate` datagrams per
    /// second from a UDP socket bound in `from` (any port), on a thread of
    /// its own, until stopped.
    pub fn start(
        from: &Netns,
        target: SocketAddrV4,
        packets: Vec<Vec<u8>>,
        rate: u64,
    ) -> Result<Flooder> {
        if packets.is_empty() || rate == 0 {
            return Err(Error::Options("a flood needs packets and a rate".into()));
        }
        let sock = in_netns(from.path(), || UdpSocket::bind("0.0.0.0:0"))
            .map_err(|e| Error::io(format!("binding the flood socket in {}", from.name()), e))?;
        let stride = packets.iter().map(Vec::len).max().unwrap_or(0);
        let mut buf = vec![0u8; packets.len() * stride];
        let mut lens = Vec::with_capacity(packets.len());
        for (i, p) in packets.iter().enumerate() {
            buf[i * stride..][..p.len()].copy_from_slice(p);
            lens.push(p.len());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("flood".into())
            .spawn(move || send_loop(&Socket::new(sock), &buf, stride, &lens, target, rate, &flag))
            .map_err(|e| Error::io("starting the flood thread", e))?;
        Ok(Flooder {
            stop,
            thread: Some(thread),
        })
    }

    /// Ends the flood and says what it did.
    pub fn stop(mut self) -> Result<FloodReport> {
        self.finish()
            .ok_or_else(|| Error::Options("the flood thread panicked".into()))
    }

    fn finish(&mut self) -> Option<FloodReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take()?.join().ok()
    }
}

impl Drop for Flooder {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Keeps to the schedule `rate * elapsed`: whatever is due goes out in
/// batches, then the thread sleeps a little.
fn send_loop(
    sock: &Socket,
    buf: &[u8],
    stride: usize,
    lens: &[usize],
    target: SocketAddrV4,
    rate: u64,
    stop: &AtomicBool,
) -> FloodReport {
    let dests = [target; BATCH];
    let mut batch = SendBatch::new(BATCH);
    let n = lens.len();
    let (mut next, mut sent, mut failed, mut skipped) = (0usize, 0u64, 0u64, 0u64);
    let t0 = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
        let done = sent + failed + skipped;
        if due > done + MAX_BACKLOG {
            skipped += due - done - MAX_BACKLOG;
        }
        let mut todo = due.saturating_sub(sent + failed + skipped);
        while todo > 0 {
            // A contiguous run of packets (the buffer wraps around).
            let k = (todo as usize).min(BATCH).min(n - next);
            let r = batch.send(
                sock,
                &buf[next * stride..],
                stride,
                &lens[next..next + k],
                &dests[..k],
            );
            sent += r.datagrams as u64;
            failed += r.failed as u64;
            todo -= k as u64;
            next = (next + k) % n;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    FloodReport {
        sent,
        failed,
        secs: t0.elapsed().as_secs_f64(),
        target: rate,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn initiations_carry_a_valid_mac1_and_garbage_does_not() {
        let victim_secret = x25519::StaticSecret::from([7u8; 32]);
        let victim = x25519::PublicKey::from(&victim_secret);
        let limiter = boringtun::noise::rate_limiter::RateLimiter::new(&victim, 1000);
        let mut reply = [0u8; 128];
        let good = initiations(victim.as_bytes(), 3).unwrap();
        let bad = garbage(3).unwrap();
        for m in &good {
            assert_eq!(m.len(), INITIATION_LEN);
            assert!(limiter.verify_packet(None, m, &mut reply).is_ok());
        }
        assert_ne!(good[0], good[1], "each from its own key");
        for m in &bad {
            assert!(matches!(
                Tunn::parse_incoming_packet(m),
                Ok(boringtun::noise::Packet::HandshakeInit(_))
            ));
            assert!(limiter.verify_packet(None, m, &mut reply).is_err());
        }
    }

    #[test]
    fn report_rate() {
        let r = FloodReport {
            sent: 100,
            failed: 0,
            secs: 2.0,
            target: 50,
        };
        assert_eq!(r.rate(), 50.0);
        assert!(r.to_string().contains("50/s"));
    }
}
