//! The host's upstream resolvers, from its resolv.conf, re-read when the
//! file changes (polled: inode, size and modification time).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::forward::{is_self, Forwarder};

/// How often the file is checked for changes.
pub const POLL: Duration = Duration::from_millis(500);

/// The nameservers of a resolv.conf text, as port-53 socket addresses, in
/// order, without duplicates and without any address for which `skip` is
/// true (dnsd's own addresses: forwarding to itself would loop). Comments
/// (`#`, `;`), options, search lists and scoped IPv6 addresses are ignored.
pub fn parse_resolv_conf(text: &str, skip: impl Fn(IpAddr) -> bool) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else {
            continue;
        };
        let Ok(ip) = addr.parse::<IpAddr>() else {
            tracing::debug!(
                addr,
                "resolv.conf: nameserver is not a plain address; ignored"
            );
            continue;
        };
        if skip(ip) {
            continue;
        }
        let sa = SocketAddr::new(ip, 53);
        if !out.contains(&sa) {
            out.push(sa);
        }
    }
    out
}

/// What identifies one version of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        inode: m.ino(),
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// Reads `path` and hands its upstreams to the forwarder. Returns the
/// version read (for [`watch`]).
pub fn load(path: &Path, listen: &[SocketAddr], fwd: &Forwarder) -> Option<Stamp> {
    let version = stamp(path);
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let list = parse_resolv_conf(&text, |ip| is_self(ip, listen));
            if list.is_empty() {
                tracing::warn!(path = %path.display(), "no usable nameserver in resolv.conf: names outside the cluster get SERVFAIL");
            } else {
                tracing::info!(path = %path.display(), upstreams = ?list, "upstream resolvers");
            }
            fwd.set_upstreams(list);
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read resolv.conf: names outside the cluster get SERVFAIL until it is there");
            fwd.set_upstreams(Vec::new());
        }
    }
    version
}

/// Re-reads `path` whenever it differs from `last` (what [`load`] read),
/// until the task is dropped.
pub async fn watch(
    path: PathBuf,
    listen: Vec<SocketAddr>,
    fwd: Arc<Forwarder>,
    mut last: Option<Stamp>,
) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = stamp(&path);
        if now != last {
            last = load(&path, &listen, &fwd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nameservers_skipping_ours_and_noise() {
        let text = "# generated\n\
                    search example.org\n\
                    nameserver 169.254.169.250\n\
                    nameserver 192.0.2.1 # primary\n\
                    ; nameserver 192.0.2.99\n\
                    nameserver\t2001:db8::53\n\
                    nameserver fe80::1%eth0\n\
                    nameserver not-an-ip\n\
                    nameserver 192.0.2.1\n\
                    options ndots:5 timeout:1\n\
                    nameserver 192.0.2.2\n";
        let list = parse_resolv_conf(text, |ip| is_self(ip, &[]));
        let want: Vec<SocketAddr> = vec![
            "192.0.2.1:53".parse().unwrap(),
            "[2001:db8::53]:53".parse().unwrap(),
            "192.0.2.2:53".parse().unwrap(),
        ];
        assert_eq!(list, want);
        assert!(parse_resolv_conf("", |_| false).is_empty());
        let listen: Vec<SocketAddr> = vec!["127.0.0.1:53".parse().unwrap()];
        assert!(parse_resolv_conf("nameserver 127.0.0.1\n", |ip| is_self(ip, &listen)).is_empty());
    }

    #[tokio::test]
    async fn reloads_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "nameserver 192.0.2.1\n").unwrap();
        let fwd = Arc::new(Forwarder::new(Duration::from_secs(1), 10, 53));
        let version = load(&path, &[], &fwd);
        assert_eq!(fwd.upstreams(), vec!["192.0.2.1:53".parse().unwrap()]);
        let task = tokio::spawn(watch(path.clone(), vec![], fwd.clone(), version));
        // Replace it the way tools do: write a new file, rename it over.
        let tmp = dir.path().join("resolv.conf.new");
        std::fs::write(&tmp, "nameserver 192.0.2.2\nnameserver 192.0.2.3\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while fwd.upstreams().len() != 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            fwd.upstreams(),
            vec![
                "192.0.2.2:53".parse().unwrap(),
                "192.0.2.3:53".parse().unwrap()
            ]
        );
        task.abort();
    }
}
