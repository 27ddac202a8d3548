//! WireGuard data path.
