//! netd's only user of the `conntrack` program: deleting the kernel's
//! connection-tracking entries that must not outlive a change.
//! * [`Conntrack::flush`]: every entry an address takes part in, in either
//!   direction (a deleted container: the next one to get its address must
//!   not inherit its UDP or NAT flows); [`Conntrack::flush_all`] for the
//!   addresses of a batch of deletes, with one listing;
//! * [`Conntrack::cut`]: the entries of (source, destination) pairs that
//!   lost reach (a policy change).
//!
//! Both list the table once (`conntrack -L -f ipv4`, [`parse`]) and run a
//! `conntrack -D` only for what the listing shows, so the common case (no
//! entry to delete) costs one process. A `conntrack -D` reads the whole
//! table itself; one per candidate was four processes per deleted container
//! (one per selector) and, for a policy change, one per lost pair (two
//! minutes of spawning at 10,000 endpoints, halving the throughput meanwhile).

use std::collections::HashSet;
use std::net::Ipv4Addr;

use weft_model::Protocol;

use crate::command::{CommandError, Hint, Runner};

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
    /// The first `src=` and `dst=` of the line.
    pub original: Pair,
    /// The second ones (what the replies carry), if the line has them.
    pub reply: Option<Pair>,
    /// The IP protocol number (the line's second word: 6 tcp, 17 udp, 1 icmp).
    pub proto: u8,
    /// TCP or UDP and the original destination port; `None` for other
    /// protocols (ICMP echo and the rest, which have no port).
    pub l4: Option<(Protocol, u16)>,
}

/// The ways `conntrack -D` selects an entry by one address, in the order
/// [`Conntrack::flush`] tries them.
const SELECTORS: [&str; 4] = ["--orig-src", "--orig-dst", "--reply-src", "--reply-dst"];

impl Entry {
    /// Whether `selector` (one of [`SELECTORS`]) with `addr` matches this entry.
    fn matches(&self, selector: &str, addr: Ipv4Addr) -> bool {
        let field = match selector {
            "--orig-src" => Some(self.original.0),
            "--orig-dst" => Some(self.original.1),
            "--reply-src" => self.reply.map(|r| r.0),
            "--reply-dst" => self.reply.map(|r| r.1),
            _ => None,
        };
        field == Some(addr)
    }
}

/// The entries of a `conntrack -L` listing; lines without two addresses
/// are skipped.
pub fn parse(listing: &str) -> Vec<Entry> {
    listing
        .lines()
        .filter_map(|line| {
            let values = |key: &str| -> Vec<Ipv4Addr> {
                line.split_whitespace()
                    .filter_map(|w| w.strip_prefix(key))
                    .filter_map(|v| v.parse().ok())
                    .collect()
            };
            let (src, dst) = (values("src="), values("dst="));
            let mut words = line.split_whitespace();
            let name = words.next()?;
            let proto: u8 = words.next()?.parse().ok()?;
            let dport = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("dport="))
                .and_then(|v| v.parse().ok());
            let l4 = match (name, dport) {
                ("tcp", Some(p)) => Some((Protocol::Tcp, p)),
                ("udp", Some(p)) => Some((Protocol::Udp, p)),
                _ => None,
            };
            Some(Entry {
                original: (*src.first()?, *dst.first()?),
                reply: src.get(1).copied().zip(dst.get(1).copied()),
                proto,
                l4,
            })
        })
        .collect()
}

/// The selectors that delete every entry of `entries` involving `addr`,
/// fewest first: a selector is picked only for entries the ones before it
/// leave (a plain flow from `addr` is both `--orig-src` and `--reply-dst`;
/// one delete takes it).
fn selectors_for(entries: &[Entry], addr: Ipv4Addr) -> Vec<&'static str> {
    let mut left: Vec<&Entry> = entries
        .iter()
        .filter(|e| SELECTORS.iter().any(|s| e.matches(s, addr)))
        .collect();
    let mut picked = Vec::new();
    for s in SELECTORS {
        if left.iter().any(|e| e.matches(s, addr)) {
            picked.push(s);
            left.retain(|e| !e.matches(s, addr));
        }
    }
    picked
}

/// `conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.` → 3.
fn deleted_count(stderr: &str) -> Option<usize> {
    let words: Vec<&str> = stderr.split_whitespace().collect();
    words.windows(3).find_map(|w| {
        (w[1] == "flow" && w[2] == "entries")
            .then(|| w[0].parse().ok())
            .flatten()
    })
}

/// Runs `conntrack` on the host or in a network namespace.
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

    /// `conntrack -D -f ipv4 <selection...>`: how many entries went (none
    /// matching is not an error).
    pub fn delete(&self, selection: &[&str]) -> Result<usize, CommandError> {
        let mut args = vec!["-D", "-f", "ipv4"];
        args.extend_from_slice(selection);
        let out = self.runner.run("conntrack", &args, None, HINT)?;
        let deleted = deleted_count(&String::from_utf8_lossy(&out.stderr));
        match (out.status.code(), deleted) {
            (Some(0), n) => Ok(n.unwrap_or(0)),
            // conntrack exits 1 when nothing matched (or the entry expired
            // since it was listed).
            (Some(1), Some(0) | None)
                if deleted.is_some()
                    || String::from_utf8_lossy(&out.stderr).contains("doesn't exist") =>
            {
                Ok(0)
            }
            _ => Err(self.runner.failed("conntrack", &args, &out, None, HINT)),
        }
    }

    /// Deletes the entries whose original source or destination, or reply
    /// source or destination, is `addr`; returns how many went. One
    /// listing, then one delete per selector that still has entries (none
    /// when the listing shows no entry of `addr`).
    pub fn flush(&self, addr: Ipv4Addr) -> Result<usize, CommandError> {
        self.flush_all(&[addr])
    }

    /// [`Conntrack::flush`] for every address of `addrs` (the containers of
    /// a batch of deletes) with one listing: one process when no entry
    /// involves any of them.
    pub fn flush_all(&self, addrs: &[Ipv4Addr]) -> Result<usize, CommandError> {
        if addrs.is_empty() {
            return Ok(0);
        }
        let entries = self.list()?;
        let mut total = 0;
        for &addr in addrs {
            let a = addr.to_string();
            let mut deleted = 0;
            for selector in selectors_for(&entries, addr) {
                deleted += self.delete(&[selector, a.as_str()])?;
            }
            if deleted > 0 {
                tracing::debug!(%addr, deleted, "conntrack entries deleted");
            }
            total += deleted;
        }
        Ok(total)
    }

    /// Deletes the entries of connections from `src` to `dst` (original
    /// direction) of each pair in `pairs` that `keep` no longer allows
    /// (`keep(pair, l4)`: whether the pair may still have a flow of `l4`,
    /// `None` for a protocol without ports); returns how many went.
    /// Connections of a pair on what is still allowed stay. One listing,
    /// then one delete per (pair, protocol, port) it shows: a change that
    /// denies thousands of pairs has a handful of live connections among
    /// them. An entry that expired since the listing is not an error.
    pub fn cut(
        &self,
        pairs: &[Pair],
        keep: impl Fn(Pair, Option<(Protocol, u16)>) -> bool,
    ) -> Result<usize, CommandError> {
        if pairs.is_empty() {
            return Ok(0);
        }
        let wanted: HashSet<Pair> = pairs.iter().copied().collect();
        let mut todo: Vec<(Pair, u8, Option<u16>)> = self
            .list()?
            .into_iter()
            .filter(|e| wanted.contains(&e.original) && !keep(e.original, e.l4))
            .map(|e| (e.original, e.proto, e.l4.map(|(_, p)| p)))
            .collect();
        todo.sort();
        todo.dedup();
        let mut total = 0;
        for ((src, dst), proto, dport) in &todo {
            let (s, d, p) = (src.to_string(), dst.to_string(), proto.to_string());
            let mut sel = vec!["-s", s.as_str(), "-d", d.as_str(), "-p", p.as_str()];
            let port = dport.map(|p| p.to_string());
            if let Some(port) = &port {
                sel.extend(["--dport", port.as_str()]);
            }
            total += self.delete(&sel)?;
        }
        Ok(total)
    }
}

/// Deletes the conntrack entries `addr` takes part in ([`Conntrack::flush`]),
/// in network namespace `netns`, or the host's with `None`.
pub fn flush(netns: Option<&str>, addr: Ipv4Addr) -> Result<usize, CommandError> {
    Conntrack::new(Runner::new(netns)).flush(addr)
}

/// [`flush`] for several addresses with one listing ([`Conntrack::flush_all`]).
pub fn flush_all(netns: Option<&str>, addrs: &[Ipv4Addr]) -> Result<usize, CommandError> {
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
                original: (a("10.42.1.2"), a("10.42.2.3")),
                reply: Some((a("10.42.2.3"), a("10.42.1.2"))),
                proto: 6,
                l4: Some((Protocol::Tcp, 80)),
            }
        );
        assert_eq!(entries[1].l4, Some((Protocol::Udp, 53)));
        assert_eq!((entries[3].proto, entries[3].l4), (1, None));
        // DNAT to a published port: the container is only in the reply.
        assert_eq!(entries[2].original, (a("192.168.1.5"), a("192.168.1.1")));
        assert_eq!(entries[2].reply, Some((a("10.42.1.7"), a("192.168.1.5"))));
        let originals: HashSet<Pair> = entries.iter().map(|e| e.original).collect();
        assert!(originals.contains(&(a("10.42.2.3"), a("10.42.1.9"))));
        assert!(!originals.contains(&(a("10.42.2.3"), a("10.42.1.2"))));
        assert_eq!(
            parse("udp 17 29 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2")[0].reply,
            None
        );
    }

    #[test]
    fn flush_picks_only_the_selectors_that_have_entries() {
        let entries = parse(LISTING);
        // Nothing of this address: no delete at all.
        assert!(selectors_for(&entries, a("10.42.9.9")).is_empty());
        // Its own flow: orig-src, so also reply-dst; one delete.
        assert_eq!(selectors_for(&entries, a("10.42.1.2")), ["--orig-src"]);
        // Its own flow and one to it.
        assert_eq!(
            selectors_for(&entries, a("10.42.2.3")),
            ["--orig-src", "--orig-dst"]
        );
        assert_eq!(selectors_for(&entries, a("10.42.1.9")), ["--orig-dst"]);
        // DNATed to it: only the reply source says so.
        assert_eq!(selectors_for(&entries, a("10.42.1.7")), ["--reply-src"]);
        // A host address: the original destination of a DNATed flow, the
        // reply destination of a masqueraded one.
        assert_eq!(
            selectors_for(&entries, a("192.168.1.1")),
            ["--orig-dst", "--reply-dst"]
        );
        // Masqueraded to it and nothing else: only the reply destination.
        let only_reply_dst = parse(
            "icmp 1 29 src=10.42.1.8 dst=192.168.1.9 type=8 src=192.168.1.9 dst=192.168.1.1 type=0",
        );
        assert_eq!(
            selectors_for(&only_reply_dst, a("192.168.1.1")),
            ["--reply-dst"]
        );
    }

    #[test]
    fn deleted_count_and_hints() {
        assert_eq!(
            deleted_count(
                "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n"
            ),
            Some(3)
        );
        assert_eq!(deleted_count("conntrack: Operation failed"), None);
        assert!(diagnose("Operation not permitted", HINT.install).contains("root"));
        assert!(diagnose("odd", HINT.install).contains("apt-get install conntrack"));
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
