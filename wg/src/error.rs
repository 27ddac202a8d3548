//! Errors of the WireGuard data path.

use std::io;
use std::path::PathBuf;

/// What went wrong while setting up or changing the WireGuard device, with
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// An interface name the kernel would refuse.
    #[error("invalid interface name {0:?}: use 1 to 15 bytes, no '/', ':', whitespace or NUL")]
    IfName(String),

    /// Creating, attaching or configuring the TUN device failed.
    #[error("TUN device {ifname}: cannot {what}: {source} ({hint})")]
    Tun {
        ifname: String,
        what: String,
        #[source]
        source: io::Error,
        hint: String,
    },

    /// The UDP socket could not be opened, bound or configured.
    #[error("UDP socket on port {port}: cannot {what}: {source} ({hint})")]
    Socket {
        port: u16,
        what: String,
        #[source]
        source: io::Error,
        hint: String,
    },

    /// Reading or writing the key file failed.
    #[error("key file {path}: cannot {what}: {source}")]
    KeyIo {
        path: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },

    /// The key file does not hold a WireGuard private key.
    #[error(
        "key file {path} does not hold a base64 WireGuard private key ({reason}); \
         move it away to have a new key generated (peers then need the new public key)"
    )]
    KeyFormat { path: PathBuf, reason: String },

    /// A key given as text is not 32 bytes of base64.
    #[error("invalid WireGuard key: {0}")]
    KeyText(String),

    /// The kernel would not give random bytes (for a key or session indices).
    #[error(transparent)]
    Random(#[from] weft_sys::random::RandomError),

    /// A configuration value out of range.
    #[error("invalid WireGuard configuration: {0}")]
    Config(String),

    /// A data-path thread could not be started.
    #[error("cannot start thread {name}: {source} (the process may be out of threads or memory)")]
    Thread {
        name: String,
        #[source]
        source: io::Error,
    },
}

impl WgError {
    pub(crate) fn tun(ifname: &str, what: impl Into<String>, source: io::Error) -> WgError {
        let hint = match source.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENODEV) => {
                "/dev/net/tun is missing: load the tun module (modprobe tun) or give the \
                 container /dev/net/tun"
            }
            Some(libc::EPERM) | Some(libc::EACCES) => "netd needs root (CAP_NET_ADMIN)",
            Some(libc::EBUSY) => {
                "another process is attached to this device: stop the other netd \
                 (or `netd teardown`) first"
            }
            Some(libc::EINVAL) => {
                "an interface of that name exists but is not a weft TUN device: remove it \
                 (ip link del) or choose another name"
            }
            _ => "check the kernel log (dmesg)",
        };
        WgError::Tun {
            ifname: ifname.to_string(),
            what: what.into(),
            source,
            hint: hint.to_string(),
        }
    }

    pub(crate) fn socket(port: u16, what: impl Into<String>, source: io::Error) -> WgError {
        let hint = match source.raw_os_error() {
            Some(libc::EADDRINUSE) => {
                "the port is taken: stop the other WireGuard/netd or set another listen port"
            }
            Some(libc::EACCES) | Some(libc::EPERM) => "netd needs root",
            _ => "check the host's network configuration",
        };
        WgError::Socket {
            port,
            what: what.into(),
            source,
            hint: hint.to_string(),
        }
    }
}
