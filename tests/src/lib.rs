//! Test harness for weft: hosts in network namespaces on a shared underlay.
//!
//! ```no_run
//! use weft_tests::{Lab, LabOptions};
//!
//! #[test]
//! fn hosts_talk() {
//!     weft_tests::require_root!();
//!     let lab = Lab::new(LabOptions::hosts(2)).unwrap();
//!     let (a, b) = (lab.host(0), lab.host(1));
//!     a.exec(["ping", "-c1", "-W1", &b.addr().to_string()]).unwrap();
//!     let c = lab.container(0, "web").unwrap();      // empty netns for CNI
//!     let _srv = c.spawn(["sleep", "60"]).unwrap();   // killed on drop
//! } // everything deleted here, also on panic
//! ```
//!
//! * [`Lab`]: N hosts (`<prefix>-h<i>`, `eth0` = `192.168.77.(10+i)/24`, default
//!   route via `.1`) on a Linux bridge in the underlay namespace
//!   (`<prefix>-ul`), optionally split by a router (`<prefix>-rt`) with a smaller
//!   MTU on its far side ([`RouterOptions`]).
//! * [`Netns`]: run commands in any of those namespaces (`exec`, `output`,
//!   `spawn`, `ip`).
//! * Cleanup: dropping the lab kills every process in its namespaces and deletes
//!   them; `Lab::new` sweeps namespaces of dead earlier runs ([`sweep_stale`]).
//! * Needs root; tests call [`require_root!`] first, which skips them with a
//!   message, or fails them when `WEFT_REQUIRE_ROOT_TESTS=1` (CI).

use std::io::Write as _;

mod error;
pub mod flood;
mod lab;
pub mod naming;
mod netns;
pub mod probe;
pub mod proc;
pub mod services;
pub mod spoof;
pub mod weft;

pub use error::{Error, Result};
pub use lab::{
    sweep_stale, Container, Host, Lab, LabOptions, Router, RouterOptions, FAR_SUBNET, HOST_IFACE,
    HOST_OFFSET, MAX_HOSTS, NEAR_SUBNET, UNDERLAY_PREFIX_LEN,
};
pub use netns::{in_netns, list_netns, wait_until, ChildOutput, Netns, NsChild, NETNS_DIR};

/// Signal numbers for [`NsChild::signal`] and [`NsChild::stop_with`].
pub mod signal {
    pub use libc::{SIGHUP, SIGINT, SIGKILL, SIGTERM, SIGUSR1, SIGUSR2};
}

/// The environment variable that turns "not root, skipped" into a test failure.
pub const REQUIRE_ROOT_ENV: &str = "WEFT_REQUIRE_ROOT_TESTS";

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether [`REQUIRE_ROOT_ENV`] asks for root tests to never be skipped.
pub fn root_required() -> bool {
    std::env::var(REQUIRE_ROOT_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// For a test named `test`: `true` if it may go on (running as root); otherwise
/// prints `SKIP <test>: needs root ...` to stderr and returns `false` — or
/// panics if `WEFT_REQUIRE_ROOT_TESTS=1`, so that CI never skips silently.
pub fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if root_required() {
        panic!(
            "{test}: needs root, and {REQUIRE_ROOT_ENV}=1 forbids skipping it (run the tests as root: sudo -E cargo test -p weft-tests)"
        );
    }
    // Written to the stderr handle directly, not with eprintln!, so that the test
    // runner's output capture does not hide the skip.
    let _ = writeln!(
        std::io::stderr(),
        "SKIP {test}: needs root (run the tests as root: sudo -E cargo test -p weft-tests)"
    );
    false
}

#[doc(hidden)]
pub fn __fn_path<T>(_: T) -> &'static str {
    let name = std::any::type_name::<T>();
    let name = name.strip_suffix("::__here").unwrap_or(name);
    name.trim_end_matches("::{{closure}}")
}

/// Returns from the calling test unless running as root, printing
/// `SKIP <test path>: needs root ...`; with `WEFT_REQUIRE_ROOT_TESTS=1` it fails
/// the test instead. `require_root!()` returns `()`; `require_root!(value)`
/// returns `value` (e.g. `require_root!(Ok(()))` in a test returning `Result`).
#[macro_export]
macro_rules! require_root {
    () => {
        $crate::require_root!(())
    };
    ($ret:expr) => {{
        fn __here() {}
        if !$crate::root_or_skip($crate::__fn_path(__here)) {
            return $ret;
        }
    }};
}

/// Paths on the real machine that a tool a test runs makes by itself, outside
/// the test's own directories: podman's and runc's default state directories
/// and libcni's result cache ([`MachinePaths::PODMAN`]), or a mount point the
/// test needs. Notes which of them are missing now; on drop (also on panic)
/// removes those it noted, so the suite leaves nothing on the machine.
/// Paths that existed before are never touched.
pub struct MachinePaths {
    made: Vec<std::path::PathBuf>,
}

impl MachinePaths {
    /// What podman 4.3 with the CNI backend and runc create on first use even
    /// with `--root`, `--runroot` and `tmp_dir` in a test's own directory.
    pub const PODMAN: &'static [&'static str] = &["/run/containers", "/run/runc", "/var/lib/cni"];

    /// Watches `paths`: those missing now are removed again on drop.
    pub fn watch(paths: &[&str]) -> Self {
        MachinePaths {
            made: paths
                .iter()
                .map(std::path::PathBuf::from)
                .filter(|p| !p.exists())
                .collect(),
        }
    }

    /// Makes `dir` (an empty directory, e.g. a mount point) if it is missing,
    /// and removes it on drop if it was made here.
    pub fn dir(dir: &str) -> std::io::Result<Self> {
        let paths = Self::watch(&[dir]);
        std::fs::create_dir_all(dir)?;
        Ok(paths)
    }
}

impl Drop for MachinePaths {
    fn drop(&mut self) {
        for path in &self.made {
            if path.is_dir() {
                let _ = std::fs::remove_dir_all(path);
            } else {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
