//! weft's OS helpers, each with one job, written once for every crate:
//!
//! - [`udp`]: batched UDP I/O, `recvmmsg` and `sendmmsg` over reused buffers,
//!   with UDP GRO/GSO where the socket has them (the WireGuard data path in
//!   `weft-wg` and dnsd's UDP fast path).
//! - [`random`]: bytes and numbers from the kernel's random source
//!   (getrandom(2)).
//! - [`signal`]: the future that ends when the process is asked to stop
//!   (SIGTERM or SIGINT).
//! - [`time`]: the wall clock in milliseconds, as records store it.
//! - [`conntrack`]: deleting connection-tracking entries by their
//!   original tuple over ctnetlink (no table dump per delete).
//! - [`memory`]: the allocator's free memory handed back to the kernel.
//!
//! Plain functions and types; errors are typed (`io::Error` where the caller
//! decides by its kind, as with `WouldBlock`).

pub mod conntrack;
pub mod memory;
pub mod random;
pub mod signal;
pub mod time;
pub mod udp;
