//! The weft CNI plugin (`type: "weft"`), as a library: the binary
//! (`src/main.rs`) only reads the environment and stdin and calls
//! [`plugin::run`].
//!
//! * [`plugin`]: the commands (ADD, DEL, CHECK, VERSION, GC, STATUS) and the
//!   mapping of internal errors to CNI error codes.
//! * [`config`]: the network configuration on stdin (`runtimeConfig`,
//!   `prevResult`, `cni.dev/valid-attachments`).
//! * [`args`]: `CNI_ARGS` (container name, service, stack).
//! * [`result`]: the CNI result in the shape of each spec version.
//! * [`netlink`]: the veth pair between netd's bridge and the container
//!   ([`attach`], [`detach`], [`Netlink`], [`Sandbox`]).
//! * The host-side veth name and the container's MAC are
//!   `weft_model`'s ([`weft_model::host_veth_name`], [`weft_model::Mac`]):
//!   netd's anti-spoofing allows exactly what the plugin makes.
//! * [`check`]: what CHECK compares.
//! * [`error`] and [`version`]: CNI error JSON and codes, spec versions.
//!
//! The plugin talks to netd only through [`weft_api::client::Client`].

pub mod args;
pub mod check;
pub mod config;
pub mod error;
pub mod netlink;
pub mod plugin;
pub mod result;
pub mod version;

pub use error::{code, CniError};
pub use netlink::{
    attach, detach, Attached, InterfaceState, LinkState, NetError, Netlink, RouteState, Sandbox,
    VethConfig,
};
pub use plugin::{run, Command, Env, Output};
pub use version::CniVersion;
