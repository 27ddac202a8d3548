//! [`NetError`], the kernel side's errors, and turning rtnetlink's errors
//! into it (with the operation and errno).

use std::io;
use std::path::PathBuf;

use nix::errno::Errno;

/// Errors of the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid interface name {0:?}")]
    InvalidName(String),
    #[error("network namespace {} does not exist", .path.display())]
    NetnsMissing { path: PathBuf },
    #[error("opening network namespace {}: {source}", .path.display())]
    NetnsOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a network namespace (deleted, or not a netns file)", .path.display())]
    NotNetns { path: PathBuf },
    #[error("{} is the plugin's own (host) network namespace, not a container's", .path.display())]
    SameNetns { path: PathBuf },
    #[error("entering network namespace {}: {source}", .path.display())]
    Setns {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("starting the netlink runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("the helper thread entering the container's namespace died")]
    Thread,
    #[error("bridge {bridge} does not exist in the plugin's network namespace")]
    NoBridge { bridge: String },
    #[error("host interface {name} exists already (is the container attached already?)")]
    HostVethExists { name: String },
    #[error("interface {ifname} exists already in the container's network namespace")]
    IfnameExists { ifname: String },
    #[error("{op}: {message}")]
    Netlink {
        op: String,
        /// The kernel's errno, when the kernel answered with an error.
        errno: Option<i32>,
        message: String,
    },
}

impl NetError {
    /// Whether the error says "this already exists".
    pub fn is_exists(&self) -> bool {
        matches!(
            self,
            NetError::HostVethExists { .. } | NetError::IfnameExists { .. }
        )
    }
}

pub(super) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().wrapping_neg()),
        _ => None,
    }
}

pub(super) fn nl_err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let op = op.into();
    move |e| NetError::Netlink {
        op,
        errno: errno(&e),
        message: match &e {
            rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
            other => other.to_string(),
        },
    }
}
pub(super) const fn libc_enodev() -> i32 {
    Errno::ENODEV as i32
}
