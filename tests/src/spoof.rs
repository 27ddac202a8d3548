//! What a container does to pose as another, for the anti-spoofing tests
//! (netd's kernel test of the table, `netd/tests/spoof.rs`, and the end to
//! end test through netd and the CNI plugin, `tests/tests/spoof.rs`), and
//! how the host shows whether it worked.
//!
//! Each attack is undone before it returns, so the container's own traffic
//! can be checked again right after.

use std::net::Ipv4Addr;

use crate::{Netns, Result};

/// IP spoof: puts `victim`'s address on the container's `eth0` too and
/// pings `target` twice from it. Whether any reply came back.
pub fn ip_spoof(c: &Netns, victim: Ipv4Addr, target: Ipv4Addr) -> Result<bool> {
    let cidr = format!("{victim}/32");
    c.ip(["addr", "add", &cidr, "dev", "eth0"])?;
    let out = c.output([
        "ping",
        "-c2",
        "-i0.2",
        "-W1",
        "-I",
        &victim.to_string(),
        &target.to_string(),
    ]);
    c.ip(["addr", "del", &cidr, "dev", "eth0"])?;
    Ok(out?.status.success())
}

/// ARP spoof: two gratuitous ARPs from the container claiming `victim`'s
/// address with the container's own MAC (busybox `arping -U`; the address
/// is on `eth0` while they are sent, as arping needs).
pub fn arp_spoof(c: &Netns, victim: Ipv4Addr) -> Result<()> {
    let cidr = format!("{victim}/32");
    let ip = victim.to_string();
    c.ip(["addr", "add", &cidr, "dev", "eth0"])?;
    let out = c.exec([
        "busybox", "arping", "-U", "-c", "2", "-w", "2", "-I", "eth0", "-s", &ip, &ip,
    ]);
    c.ip(["addr", "del", &cidr, "dev", "eth0"])?;
    out.map(drop)
}

/// MAC spoof: gives the container's `eth0` the MAC `victim_mac` and pings
/// `target` twice with the container's own address; puts its own MAC back.
/// Whether any reply came back.
pub fn mac_spoof(c: &Netns, victim_mac: &str, target: Ipv4Addr) -> Result<bool> {
    let own = mac(c, "eth0")?;
    c.ip(["link", "set", "eth0", "address", victim_mac])?;
    let out = c.output(["ping", "-c2", "-i0.2", "-W1", &target.to_string()]);
    c.ip(["link", "set", "eth0", "address", &own])?;
    Ok(out?.status.success())
}

/// Whether one ping from `c` to `target` is answered.
pub fn pings(c: &Netns, target: Ipv4Addr) -> Result<bool> {
    Ok(c.output(["ping", "-c1", "-W2", &target.to_string()])?
        .status
        .success())
}

/// The MAC of `dev` in `ns`.
pub fn mac(ns: &Netns, dev: &str) -> Result<String> {
    let line = ns.ip(["-o", "link", "show", "dev", dev])?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "link/ether" {
            if let Some(m) = words.next() {
                return Ok(m.to_owned());
            }
        }
    }
    Err(crate::Error::Options(format!("no MAC in {line:?}")))
}

/// The MAC the neighbour table of `ns` holds for `ip` (any device), if any.
pub fn neighbour_mac(ns: &Netns, ip: Ipv4Addr) -> Result<Option<String>> {
    let out = ns.ip(["neigh", "show", &ip.to_string()])?;
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "lladdr" {
            return Ok(words.next().map(str::to_owned));
        }
    }
    Ok(None)
}

/// The bridge ports of `ns` whose forwarding database has learned `mac`.
pub fn fdb_ports(ns: &Netns, mac: &str) -> Result<Vec<String>> {
    let out = ns.exec(["bridge", "fdb", "show"])?;
    Ok(out
        .lines()
        .filter(|l| l.starts_with(&format!("{mac} ")) && l.contains(" master "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "dev")
                .and_then(|_| w.next())
                .map(str::to_owned)
        })
        .collect())
}
