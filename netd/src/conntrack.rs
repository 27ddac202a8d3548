//! netd's conntrack work: deleting the kernel's connection-tracking entries
//! that must not outlive a change.
//! * [`Conntrack::flush`]: every entry an address takes part in, in either
//!   direction (a deleted container: the next one to get its address must
//!   not inherit its UDP or NAT flows); [`Conntrack::flush_all`] for the
//!   addresses of a batch of deletes, with one listing;
//! * [`Conntrack::cut`]: the entries of (source, destination) pairs that
//!   lost reach (a policy change);
//! * [`Conntrack::delete_where`]: any entries a predicate picks (the
//!   balancer's UDP flows of a backend that left its VIP).
//!
//! Each lists the table once (`conntrack -L -f ipv4`, [`parse`]) and
//! deletes exactly the entries it picked by their original tuple over
//! ctnetlink ([`weft_sys::conntrack`]): a hash lookup per entry in the
//! kernel, no process. `conntrack -D` reads the whole table on every call
//! (about 50 ms of CPU at 20,000 entries), so one per (pair, port) of a
//! policy change kept both cores busy for seconds on a host with many
//! short connections.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use weft_model::Protocol;
use weft_sys::conntrack::{Socket, Tuple, L4};

use crate::command::{CommandError, Hint, Runner};

/// Listing or deleting conntrack entries failed.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// `conntrack -L` could not run or failed.
    #[error(transparent)]
    List(#[from] CommandError),
    /// The netlink deletes failed.
    #[error("deleting {entries} conntrack entries over netlink failed: {source} ({hint})")]
    Delete {
        entries: usize,
        #[source]
        source: std::io::Error,
        hint: &'static str,
    },
}

/// What to do about a failed netlink delete.
fn netlink_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => "netd needs root (CAP_NET_ADMIN)",
        Some(libc::EPROTONOSUPPORT) | Some(libc::EOPNOTSUPP) => {
            "the kernel's conntrack netlink interface may be missing (nf_conntrack_netlink): check dmesg"
        }
        _ => "see the error; the entries stay until they time out",
    }
}

/// (source, destination) of one direction of a connection.
pub type Pair = (Ipv4Addr, Ipv4Addr);

const HINT: Hint = Hint {
    install: "is the conntrack package installed? Debian: apt-get install conntrack",
    diagnose,
};

fn diagnose(stderr: &str, install: &'static str) -> String {
    let s = stderr.to_ascii_lowercase();
    if s.contains("operation not permitted") || s.contains("permission denied") {
        "netd needs root (CAP_NET_ADMIN)".to_owned()
    } else if s.contains("not supported") || s.contains("can't open handler") {
        "the kernel's conntrack netlink interface may be missing (nf_conntrack_netlink): check dmesg"
            .to_owned()
    } else {
        format!("see the message above; {install}")
    }
}

/// One entry of a `conntrack -L` listing: the addresses of both directions
/// (they differ for NATed connections) and what it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    /// The original direction: the first `src=` and `dst=` of the line,
    /// the protocol number (its second word: 6 tcp, 17 udp, 1 icmp) and the
    /// ports or ICMP id; a delete names the entry by it.
    pub tuple: Tuple,
    /// The second `src=` and `dst=` (what the replies carry), if the line
    /// has them.
    pub reply: Option<Pair>,
}

impl Entry {
    /// The original direction's (source, destination).
    pub fn original(&self) -> Pair {
        (self.tuple.src, self.tuple.dst)
    }

    /// TCP or UDP and the original destination port; `None` for other
    /// protocols (ICMP echo and the rest, which have no port).
    pub fn l4(&self) -> Option<(Protocol, u16)> {
        match (self.tuple.proto, self.tuple.l4) {
            (6, L4::Ports { dst, .. }) => Some((Protocol::Tcp, dst)),
            (17, L4::Ports { dst, .. }) => Some((Protocol::Udp, dst)),
            _ => None,
        }
    }
}

/// The entries of a `conntrack -L` listing; lines without two addresses
/// are skipped.
pub fn parse(listing: &str) -> Vec<Entry> {
    listing.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Entry> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let values =
        |key: &str| -> Vec<&str> { words.iter().filter_map(|w| w.strip_prefix(key)).collect() };
    let first = |key: &str| values(key).first().copied();
    let addrs = |key: &str| -> Vec<Ipv4Addr> {
        values(key).iter().filter_map(|v| v.parse().ok()).collect()
    };
    let (src, dst) = (addrs("src="), addrs("dst="));
    let proto: u8 = words.get(1)?.parse().ok()?;
    let port = |key: &str| first(key).and_then(|v| v.parse::<u16>().ok());
    let key = |key: &str| {
        first(key).and_then(|v| u16::from_str_radix(v.trim_start_matches("0x"), 16).ok())
    };
    let l4 = match (
        port("sport="),
        port("dport="),
        key("srckey="),
        key("dstkey="),
    ) {
        (Some(src), Some(dst), _, _) | (_, _, Some(src), Some(dst)) => L4::Ports { src, dst },
        _ => match (port("id="), first("type="), first("code=")) {
            (Some(id), Some(kind), Some(code)) => L4::Icmp {
                id,
                kind: kind.parse().ok()?,
                code: code.parse().ok()?,
            },
            _ => L4::None,
        },
    };
    Some(Entry {
        tuple: Tuple {
            src: *src.first()?,
            dst: *dst.first()?,
            proto,
            l4,
            zone: first("zone=").and_then(|v| v.parse().ok()).unwrap_or(0),
        },
        reply: src.get(1).copied().zip(dst.get(1).copied()),
    })
}

/// Runs `conntrack -L` and the netlink deletes on the host or in a network
/// namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conntrack {
    runner: Runner,
}

impl Conntrack {
    pub fn new(runner: Runner) -> Conntrack {
        Conntrack { runner }
    }

    /// The IPv4 entries (`conntrack -L -f ipv4`).
    pub fn list(&self) -> Result<Vec<Entry>, CommandError> {
        let out = self
            .runner
            .check("conntrack", &["-L", "-f", "ipv4"], None, HINT)?;
        Ok(parse(&out))
    }

    /// Deletes `entries` by their original tuples; how many went (one
    /// gone since the listing is not counted, and not an error).
    pub fn delete(&self, entries: &[&Entry]) -> Result<usize, ConntrackError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut tuples: Vec<Tuple> = entries.iter().map(|e| e.tuple).collect();
        tuples.sort();
        tuples.dedup();
        let failed = |source: std::io::Error| ConntrackError::Delete {
            entries: tuples.len(),
            hint: netlink_hint(&source),
            source,
        };
        let mut socket = match &self.runner.netns {
            Some(ns) => Socket::open_in(&std::path::Path::new("/run/netns").join(ns)),
            None => Socket::open(),
        }
        .map_err(failed)?;
        socket.delete(&tuples).map_err(failed)
    }

    /// Deletes the entries `pick` picks, with one listing (no delete when
    /// it picks none); how many went.
    pub fn delete_where(&self, pick: impl Fn(&Entry) -> bool) -> Result<usize, ConntrackError> {
        let entries = self.list()?;
        let picked: Vec<&Entry> = entries.iter().filter(|e| pick(e)).collect();
        self.delete(&picked)
    }

    /// Deletes the entries whose original source or destination, or reply
    /// source or destination, is `addr`; returns how many went.
    pub fn flush(&self, addr: Ipv4Addr) -> Result<usize, ConntrackError> {
        self.flush_all(&[addr])
    }

    /// [`Conntrack::flush`] for every address of `addrs` (the containers of
    /// a batch of deletes) with one listing.
    pub fn flush_all(&self, addrs: &[Ipv4Addr]) -> Result<usize, ConntrackError> {
        if addrs.is_empty() {
            return Ok(0);
        }
        let addrs: HashSet<Ipv4Addr> = addrs.iter().copied().collect();
        let deleted = self.delete_where(|e| involves(e, &addrs))?;
        if deleted > 0 {
            tracing::debug!(
                addresses = addrs.len(),
                deleted,
                "conntrack entries deleted"
            );
        }
        Ok(deleted)
    }

    /// Deletes the entries of connections from `src` to `dst` (original
    /// direction) of each pair in `pairs` that `keep` no longer allows
    /// (`keep(pair, l4)`: whether the pair may still have a flow of `l4`,
    /// `None` for a protocol without ports); returns how many went.
    pub fn cut(
        &self,
        pairs: &[Pair],
        keep: impl Fn(Pair, Option<(Protocol, u16)>) -> bool,
    ) -> Result<usize, ConntrackError> {
        if pairs.is_empty() {
            return Ok(0);
        }
        let wanted: HashSet<Pair> = pairs.iter().copied().collect();
        self.delete_where(|e| wanted.contains(&e.original()) && !keep(e.original(), e.l4()))
    }
}

/// Whether `e` has one of `addrs` as its original or reply source or
/// destination.
fn involves(e: &Entry, addrs: &HashSet<Ipv4Addr>) -> bool {
    let (o, r) = (e.original(), e.reply);
    addrs.contains(&o.0)
        || addrs.contains(&o.1)
        || r.is_some_and(|r| addrs.contains(&r.0) || addrs.contains(&r.1))
}

/// Deletes the conntrack entries `addr` takes part in ([`Conntrack::flush`]),
/// in network namespace `netns`, or the host's with `None`.
pub fn flush(netns: Option<&str>, addr: Ipv4Addr) -> Result<usize, ConntrackError> {
    Conntrack::new(Runner::new(netns)).flush(addr)
}

/// [`flush`] for several addresses with one listing ([`Conntrack::flush_all`]).
pub fn flush_all(netns: Option<&str>, addrs: &[Ipv4Addr]) -> Result<usize, ConntrackError> {
    Conntrack::new(Runner::new(netns)).flush_all(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    const LISTING: &str = "\
tcp      6 431999 ESTABLISHED src=10.42.1.2 dst=10.42.2.3 sport=40000 dport=80 src=10.42.2.3 dst=10.42.1.2 sport=80 dport=40000 [ASSURED] mark=0 use=1
udp      17 29 src=10.42.2.3 dst=10.42.1.9 sport=5353 dport=53 [UNREPLIED] src=10.42.1.9 dst=10.42.2.3 sport=53 dport=5353 mark=0 use=1
tcp      6 117 TIME_WAIT src=192.168.1.5 dst=192.168.1.1 sport=50000 dport=8080 src=10.42.1.7 dst=192.168.1.5 sport=80 dport=50000 [ASSURED] mark=0 use=1
icmp     1 29 src=10.42.1.8 dst=192.168.1.9 type=8 code=0 id=7 src=192.168.1.9 dst=192.168.1.1 type=0 code=0 id=7 mark=0 use=1
garbage line
";

    #[test]
    fn listing_gives_both_directions_of_each_entry() {
        let entries = parse(LISTING);
        assert_eq!(entries.len(), 4);
        assert_eq!(
            entries[0],
            Entry {
                reply: Some((a("10.42.2.3"), a("10.42.1.2"))),
                tuple: Tuple {
                    src: a("10.42.1.2"),
                    dst: a("10.42.2.3"),
                    proto: 6,
                    l4: L4::Ports {
                        src: 40000,
                        dst: 80
                    },
                    zone: 0,
                },
            }
        );
        assert_eq!(entries[0].original(), (a("10.42.1.2"), a("10.42.2.3")));
        assert_eq!(entries[0].l4(), Some((Protocol::Tcp, 80)));
        assert_eq!(entries[1].l4(), Some((Protocol::Udp, 53)));
        assert_eq!((entries[3].tuple.proto, entries[3].l4()), (1, None));
        // DNAT to a published port: the container is only in the reply.
        assert_eq!(entries[2].original(), (a("192.168.1.5"), a("192.168.1.1")));
        assert_eq!(entries[2].reply, Some((a("10.42.1.7"), a("192.168.1.5"))));
        let originals: HashSet<Pair> = entries.iter().map(|e| e.original()).collect();
        assert!(originals.contains(&(a("10.42.2.3"), a("10.42.1.9"))));
        assert!(!originals.contains(&(a("10.42.2.3"), a("10.42.1.2"))));
        assert_eq!(
            parse("udp 17 29 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2")[0].reply,
            None
        );
    }

    #[test]
    fn each_entry_is_named_by_its_original_tuple() {
        let entries = parse(LISTING);
        // The original direction's ports, not the reply's.
        assert_eq!(
            entries[2].tuple.l4,
            L4::Ports {
                src: 50000,
                dst: 8080
            }
        );
        assert_eq!(
            entries[3].tuple.l4,
            L4::Icmp {
                id: 7,
                kind: 8,
                code: 0
            }
        );
        let other = |line: &str| parse(line)[0].tuple;
        // GRE with its tracker: keys in place of ports.
        assert_eq!(
            other("gre 47 179 src=10.0.0.1 dst=10.0.0.2 srckey=0x0 dstkey=0x1a src=10.0.0.2 dst=10.0.0.1 srckey=0x1a dstkey=0x0").l4,
            L4::Ports { src: 0, dst: 0x1a }
        );
        // Tracked by addresses only; a zone is kept.
        let t = other(
            "unknown 41 599 src=10.0.0.1 dst=10.0.0.2 src=10.0.0.2 dst=10.0.0.1 zone=4 use=1",
        );
        assert_eq!((t.proto, t.l4, t.zone), (41, L4::None, 4));
    }

    #[test]
    fn a_flush_takes_every_entry_an_address_is_in() {
        let entries = parse(LISTING);
        let picked = |addr: &str| -> Vec<usize> {
            let addrs: HashSet<Ipv4Addr> = [a(addr)].into();
            (0..entries.len())
                .filter(|&i| involves(&entries[i], &addrs))
                .collect()
        };
        assert!(picked("10.42.9.9").is_empty());
        assert_eq!(picked("10.42.1.2"), [0]);
        assert_eq!(picked("10.42.2.3"), [0, 1]);
        // DNATed to it: only the reply source says so.
        assert_eq!(picked("10.42.1.7"), [2]);
        // A host address: the original destination of a DNATed flow, the
        // reply destination of a masqueraded one.
        assert_eq!(picked("192.168.1.1"), [2, 3]);
    }

    #[test]
    fn hints() {
        assert!(diagnose("Operation not permitted", HINT.install).contains("root"));
        assert!(diagnose("odd", HINT.install).contains("apt-get install conntrack"));
        let e = std::io::Error::from_raw_os_error(libc::EPERM);
        assert!(netlink_hint(&e).contains("root"));
    }

    #[test]
    fn missing_conntrack_says_how_to_install_it() {
        let c = Conntrack::new(Runner::default());
        let e = c
            .runner
            .run("weft-no-such-conntrack", &[], None, HINT)
            .unwrap_err();
        assert!(matches!(e, CommandError::Spawn { .. }), "{e}");
        assert!(e.to_string().contains("apt-get install conntrack"), "{e}");
        assert_eq!(c.cut(&[], |_, _| false).unwrap(), 0);
    }
}
