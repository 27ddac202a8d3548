//! The peer table: who gets a packet from the TUN (by destination address),
//! who sent a datagram (by receiver index or, for handshake initiations, by
//! static public key).
//!
//! A table is immutable; `set_peers` builds a new one and the data-path
//! threads pick it up between batches. Peers that stay keep their `Arc<Peer>`
//! (and so their sessions and counters).

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::Arc;

use ipnetwork::Ipv4Network;

use super::peer::Peer;

/// boringtun indices are 24 bits (it shifts them left by 8).
const INDEX_MASK: u32 = 0x00ff_ffff;

/// Disjoint IPv4 ranges, each owned by a slot, sorted by start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Routes {
    routes: Vec<(u32, u32, u32)>, // (first, last, slot)
}

impl Routes {
    /// Adds `net` for `slot` unless it overlaps a range already there; then
    /// returns the slot that owns the overlapping range.
    pub(crate) fn insert(&mut self, net: Ipv4Network, slot: u32) -> Result<(), u32> {
        let first = u32::from(net.network());
        let last = u32::from(net.broadcast());
        let i = self.routes.partition_point(|r| r.0 <= first);
        if i > 0 && self.routes[i - 1].1 >= first {
            return Err(self.routes[i - 1].2);
        }
        if let Some(next) = self.routes.get(i) {
            if next.0 <= last {
                return Err(next.2);
            }
        }
        self.routes.insert(i, (first, last, slot));
        Ok(())
    }

    /// Adds `net` for `slot` without checking for overlaps; call
    /// [`Routes::sort`] once after the last one.
    fn push(&mut self, net: Ipv4Network, slot: u32) {
        self.routes
            .push((u32::from(net.network()), u32::from(net.broadcast()), slot));
    }

    fn sort(&mut self) {
        self.routes.sort_unstable_by_key(|r| r.0);
    }

    /// The slot whose range holds `addr`.
    #[inline]
    pub(crate) fn lookup(&self, addr: u32) -> Option<u32> {
        let i = self.routes.partition_point(|r| r.0 <= addr);
        match i.checked_sub(1).map(|j| self.routes[j]) {
            Some((_, last, slot)) if addr <= last => Some(slot),
            _ => None,
        }
    }
}

/// Which of `nets` overlap at least one other (sorted once: O(n log n)).
fn overlapping(nets: impl Iterator<Item = Ipv4Network>) -> Vec<bool> {
    let mut ranges: Vec<(u32, u32, usize)> = nets
        .enumerate()
        .map(|(i, n)| (u32::from(n.network()), u32::from(n.broadcast()), i))
        .collect();
    let mut out = vec![false; ranges.len()];
    ranges.sort_unstable_by_key(|r| r.0);
    // The range reaching furthest so far, and whose it is.
    let mut reach: Option<(u32, usize)> = None;
    for &(first, last, i) in &ranges {
        if let Some((end, j)) = reach {
            if first <= end {
                out[i] = true;
                out[j] = true;
            }
        }
        if reach.is_none_or(|(end, _)| last > end) {
            reach = Some((last, i));
        }
    }
    out
}

/// The routes of a table being built: networks that overlap no other
/// wanted network go in unchecked (sorted once at the end), the few that
/// do are checked one by one in the order wanted (the first one wins), so
/// a rebuild costs O(n log n), not O(n²).
struct RouteBuilder {
    routes: Routes,
    contested: Routes,
    overlaps: Vec<bool>,
}

impl RouteBuilder {
    fn new(want: &[Want]) -> RouteBuilder {
        RouteBuilder {
            routes: Routes {
                routes: Vec::with_capacity(want.len()),
            },
            contested: Routes::default(),
            overlaps: overlapping(want.iter().map(|w| w.allowed)),
        }
    }

    /// Adds want `i`'s network for `slot`, or returns the slot that owns a
    /// network it overlaps.
    fn insert(&mut self, i: usize, net: Ipv4Network, slot: u32) -> Result<(), u32> {
        if self.overlaps[i] {
            self.contested.insert(net, slot)
        } else {
            self.routes.push(net, slot);
            Ok(())
        }
    }

    fn finish(mut self) -> Routes {
        self.routes.routes.append(&mut self.contested.routes);
        self.routes.sort();
        self.routes
    }
}

pub(crate) struct Entry {
    pub(crate) peer: Arc<Peer>,
    pub(crate) allowed: Ipv4Network,
}

/// A peer as configured (see [`super::WgPeer`]), IPv4 endpoint only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Want {
    pub(crate) public_key: [u8; 32],
    /// The key the peer announced it will switch to (key rotation): found by
    /// [`PeerTable::by_key`] too, so its handshake initiation reaches the
    /// peer's slot.
    pub(crate) next_key: Option<[u8; 32]>,
    pub(crate) endpoint: SocketAddrV4,
    pub(crate) allowed: Ipv4Network,
}

#[derive(Default)]
pub(crate) struct PeerTable {
    slots: Vec<Option<Entry>>,
    routes: Routes,
    /// Current and announced next keys, both to the peer's slot.
    by_key: HashMap<[u8; 32], u32>,
    index_base: u32,
}

/// What [`PeerTable::reconcile`] did.
#[derive(Default)]
pub(crate) struct Changes {
    pub(crate) added: Vec<Arc<Peer>>,
    pub(crate) removed: Vec<Arc<Peer>>,
    /// Peers that were kept, with their endpoint changed by configuration.
    pub(crate) moved: Vec<(Arc<Peer>, SocketAddrV4)>,
    /// Peers kept whose announced next key is to be set (new, changed or
    /// gone; also after a switch to it, when it is no longer next).
    pub(crate) next_keys: Vec<(Arc<Peer>, Option<[u8; 32]>)>,
    /// Peers kept (same slot, index and counters) whose key changed without
    /// a switch during a rotation: their noise state must be made anew for
    /// this key.
    pub(crate) rekeyed: Vec<(Arc<Peer>, [u8; 32])>,
    /// Peers left out, with why.
    pub(crate) rejected: Vec<([u8; 32], String)>,
}

impl PeerTable {
    pub(crate) fn new(index_base: u32) -> PeerTable {
        PeerTable {
            index_base: index_base & INDEX_MASK,
            ..PeerTable::default()
        }
    }

    fn index_of_slot(&self, slot: u32) -> u32 {
        self.index_base.wrapping_add(slot) & INDEX_MASK
    }

    /// The peer owning destination `dst` (host byte order).
    #[inline]
    pub(crate) fn by_dst(&self, dst: u32) -> Option<&Entry> {
        let slot = self.routes.lookup(dst)?;
        self.slots.get(slot as usize)?.as_ref()
    }

    /// The peer owning a session index (`receiver_idx` of a data packet,
    /// handshake response or cookie reply).
    #[inline]
    pub(crate) fn by_receiver_idx(&self, receiver_idx: u32) -> Option<&Entry> {
        let index = receiver_idx >> 8;
        let slot = index.wrapping_sub(self.index_base) & INDEX_MASK;
        let e = self.slots.get(slot as usize)?.as_ref()?;
        (e.peer.index == index).then_some(e)
    }

    /// The peer with static public key `key`: its current key or the next
    /// key it announced (the caller tells them apart,
    /// [`super::rotate::next_key_init`]).
    pub(crate) fn by_key(&self, key: &[u8; 32]) -> Option<&Entry> {
        let slot = *self.by_key.get(key)?;
        self.slots.get(slot as usize)?.as_ref()
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.slots.iter().flatten()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries().count()
    }

    /// A new table with exactly the peers in `want` (first one wins on a
    /// duplicate key or overlapping network). Peers already here, found by
    /// their key or by the next key they announced, are kept (same `Arc`,
    /// same sessions) with their endpoint updated; new ones are made by
    /// `make(want, index)`. A kept peer whose current key is neither the
    /// wanted key nor its next key (the peer rotated while no handshake
    /// switched us over) is listed in [`Changes::rekeyed`].
    pub(crate) fn reconcile(
        &self,
        want: &[Want],
        own_key: &[u8; 32],
        mut make: impl FnMut(&Want, u32) -> Arc<Peer>,
    ) -> (PeerTable, Changes) {
        let mut changes = Changes::default();
        let mut next = PeerTable::new(self.index_base);
        // Keep the slots of staying peers so their indices do not change.
        let mut new_peers: Vec<(usize, &Want)> = Vec::new();
        let mut routes = RouteBuilder::new(want);
        // Announced next keys, mapped after every current key (a current key
        // wins over an alias).
        let mut aliases: Vec<([u8; 32], u32)> = Vec::new();
        next.slots = (0..self.slots.len()).map(|_| None).collect();
        for (i, w) in want.iter().enumerate() {
            if &w.public_key == own_key {
                changes
                    .rejected
                    .push((w.public_key, "it is this host's own key".into()));
                continue;
            }
            if next.by_key.contains_key(&w.public_key) {
                changes
                    .rejected
                    .push((w.public_key, "the same public key is listed twice".into()));
                continue;
            }
            let found = self
                .by_key
                .get(&w.public_key)
                .or_else(|| w.next_key.and_then(|k| self.by_key.get(&k)))
                .copied()
                .filter(|&slot| next.slots[slot as usize].is_none());
            let old = found.and_then(|slot| Some((slot, self.slots[slot as usize].as_ref()?)));
            match old {
                Some((slot, old)) => {
                    if let Err(other) = routes.insert(i, w.allowed, slot) {
                        changes
                            .rejected
                            .push((w.public_key, overlap_reason(&next, other, w)));
                        continue;
                    }
                    let peer = &old.peer;
                    let (key, next_key, endpoint) = {
                        let st = peer.lock();
                        (st.key, st.next_key, st.endpoint)
                    };
                    let wanted_next = if key == w.public_key {
                        w.next_key
                    } else if Some(key) == w.next_key {
                        // Switched already; the store has not caught up.
                        None
                    } else {
                        changes.rekeyed.push((Arc::clone(peer), w.public_key));
                        w.next_key
                    };
                    if wanted_next != next_key {
                        changes.next_keys.push((Arc::clone(peer), wanted_next));
                    }
                    next.slots[slot as usize] = Some(Entry {
                        peer: Arc::clone(peer),
                        allowed: w.allowed,
                    });
                    next.by_key.insert(w.public_key, slot);
                    aliases.extend(w.next_key.map(|k| (k, slot)));
                    if endpoint != w.endpoint {
                        changes.moved.push((Arc::clone(peer), w.endpoint));
                    }
                }
                None => {
                    // Reserve the key now so a duplicate later in `want` is
                    // caught; the slot is chosen below.
                    next.by_key.insert(w.public_key, u32::MAX);
                    new_peers.push((i, w));
                }
            }
        }
        // Free slots, lowest first (a new peer takes the lowest free one).
        let mut free = next
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_none())
            .map(|(i, _)| i as u32)
            .rev()
            .collect::<Vec<u32>>();
        for (i, w) in new_peers {
            next.by_key.remove(&w.public_key);
            let slot = match free.last() {
                Some(&s) => s,
                None => {
                    next.slots.push(None);
                    free.push((next.slots.len() - 1) as u32);
                    (next.slots.len() - 1) as u32
                }
            };
            if let Err(other) = routes.insert(i, w.allowed, slot) {
                changes
                    .rejected
                    .push((w.public_key, overlap_reason(&next, other, w)));
                continue;
            }
            free.pop();
            let peer = make(w, next.index_of_slot(slot));
            changes.added.push(Arc::clone(&peer));
            next.slots[slot as usize] = Some(Entry {
                peer,
                allowed: w.allowed,
            });
            next.by_key.insert(w.public_key, slot);
            aliases.extend(w.next_key.map(|k| (k, slot)));
        }
        for (k, slot) in aliases {
            if &k != own_key {
                next.by_key.entry(k).or_insert(slot);
            }
        }
        next.routes = routes.finish();
        while matches!(next.slots.last(), Some(None)) {
            next.slots.pop();
        }
        for (slot, e) in self.slots.iter().enumerate() {
            let Some(e) = e else { continue };
            let kept = next
                .slots
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|n| Arc::ptr_eq(&n.peer, &e.peer));
            if !kept {
                changes.removed.push(Arc::clone(&e.peer));
            }
        }
        (next, changes)
    }
}

fn overlap_reason(t: &PeerTable, other_slot: u32, w: &Want) -> String {
    let other = t
        .slots
        .get(other_slot as usize)
        .and_then(Option::as_ref)
        .map(|e| {
            (
                super::key::key_to_base64(&e.peer.public_key()),
                e.allowed.to_string(),
            )
        })
        .unwrap_or_default();
    format!(
        "its allowed network {} overlaps {} of peer {}",
        w.allowed, other.1, other.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotate::DeviceKeys;
    use std::net::Ipv4Addr;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    #[test]
    fn routes_lookup_and_overlap() {
        let mut r = Routes::default();
        r.insert(net("10.42.3.0/24"), 3).unwrap();
        r.insert(net("10.42.1.0/24"), 1).unwrap();
        r.insert(net("10.42.8.0/22"), 8).unwrap();
        r.insert(net("10.42.0.7/32"), 0).unwrap();
        assert_eq!(r.lookup(ip("10.42.3.0")), Some(3));
        assert_eq!(r.lookup(ip("10.42.3.255")), Some(3));
        assert_eq!(r.lookup(ip("10.42.1.9")), Some(1));
        assert_eq!(r.lookup(ip("10.42.11.200")), Some(8));
        assert_eq!(r.lookup(ip("10.42.0.7")), Some(0));
        assert_eq!(r.lookup(ip("10.42.0.8")), None);
        assert_eq!(r.lookup(ip("10.42.2.1")), None);
        assert_eq!(r.lookup(ip("10.42.12.0")), None);
        assert_eq!(r.lookup(ip("0.0.0.0")), None);
        assert_eq!(r.lookup(ip("255.255.255.255")), None);
        assert_eq!(r.insert(net("10.42.3.128/25"), 9), Err(3));
        assert_eq!(r.insert(net("10.42.0.0/16"), 9), Err(0));
        assert_eq!(r.insert(net("10.42.9.0/24"), 9), Err(8));
        r.insert(net("10.42.2.0/24"), 2).unwrap();
        assert_eq!(r.lookup(ip("10.42.2.1")), Some(2));
    }

    #[test]
    fn routes_full_cluster_of_256_blocks() {
        let mut r = Routes::default();
        for b in (0..=255u32).rev() {
            r.insert(net(&format!("10.42.{b}.0/24")), b).unwrap();
        }
        for b in 0..=255u32 {
            assert_eq!(r.lookup(ip(&format!("10.42.{b}.77"))), Some(b));
        }
        assert_eq!(r.lookup(ip("10.43.0.1")), None);
        assert_eq!(r.lookup(ip("10.41.255.255")), None);
    }

    fn key(n: u8) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[0] = n;
        k
    }

    fn want(n: u8, allowed: &str) -> Want {
        Want {
            public_key: key(n),
            next_key: None,
            endpoint: SocketAddrV4::new(Ipv4Addr::new(192, 168, 77, n), 51820),
            allowed: net(allowed),
        }
    }

    fn make(private: [u8; 32]) -> impl FnMut(&Want, u32) -> Arc<Peer> {
        let keys = DeviceKeys::new(private);
        move |w, index| Arc::new(Peer::new(&keys, w.public_key, w.endpoint, None, index))
    }

    #[test]
    fn reconcile_adds_keeps_removes() {
        let own = [7u8; 32];
        let t0 = PeerTable::new(0xfffffe); // indices wrap around 2^24
        let (t1, c) = t0.reconcile(
            &[
                want(1, "10.42.1.0/24"),
                want(2, "10.42.2.0/24"),
                want(3, "10.42.3.0/24"),
            ],
            &[9u8; 32],
            make(own),
        );
        assert_eq!(c.added.len(), 3);
        assert!(c.removed.is_empty() && c.rejected.is_empty());
        assert_eq!(t1.len(), 3);
        let p2 = Arc::clone(&t1.by_dst(ip("10.42.2.200")).unwrap().peer);
        assert_eq!(p2.public_key(), key(2));
        // Distinct indices, each found again by receiver index.
        let mut indices: Vec<u32> = t1.entries().map(|e| e.peer.index).collect();
        indices.sort();
        indices.dedup();
        assert_eq!(indices.len(), 3);
        for e in t1.entries() {
            assert!(e.peer.index <= INDEX_MASK);
            let found = t1.by_receiver_idx(e.peer.index << 8 | 0x5a).unwrap();
            assert!(Arc::ptr_eq(&found.peer, &e.peer));
            assert!(Arc::ptr_eq(
                &t1.by_key(&e.peer.public_key()).unwrap().peer,
                &e.peer
            ));
        }
        assert!(t1.by_receiver_idx(0x1234_5600).is_none());
        assert!(t1.by_dst(ip("10.42.4.1")).is_none());

        // Peer 1 goes, 2 moves (endpoint and network), 3 stays, 4 comes.
        let mut w2 = want(2, "10.42.20.0/23");
        w2.endpoint = "192.168.78.2:4000".parse().unwrap();
        let (t2, c) = t1.reconcile(
            &[w2, want(3, "10.42.3.0/24"), want(4, "10.42.4.0/24")],
            &[9u8; 32],
            make(own),
        );
        assert_eq!(c.added.len(), 1);
        assert_eq!(c.added[0].public_key(), key(4));
        assert_eq!(c.removed.len(), 1);
        assert_eq!(c.removed[0].public_key(), key(1));
        assert_eq!(c.moved.len(), 1);
        assert_eq!(c.moved[0].1, "192.168.78.2:4000".parse().unwrap());
        let e2 = t2.by_dst(ip("10.42.21.1")).unwrap();
        assert!(
            Arc::ptr_eq(&e2.peer, &p2),
            "an existing peer keeps its state"
        );
        assert!(t2.by_dst(ip("10.42.2.1")).is_none());
        assert!(t2.by_dst(ip("10.42.1.1")).is_none());
        // The new peer reuses the freed slot, and lookups by index still work.
        let p4 = &t2.by_dst(ip("10.42.4.1")).unwrap().peer;
        assert!(Arc::ptr_eq(
            &t2.by_receiver_idx(p4.index << 8).unwrap().peer,
            p4
        ));
        assert!(Arc::ptr_eq(
            &t2.by_receiver_idx(p2.index << 8 | 3).unwrap().peer,
            &p2
        ));
        assert_eq!(t2.len(), 3);

        // Empty: everything removed.
        let (t3, c) = t2.reconcile(&[], &[9u8; 32], make(own));
        assert_eq!(c.removed.len(), 3);
        assert_eq!(t3.len(), 0);
        assert!(t3.by_receiver_idx(p2.index << 8).is_none());
    }

    #[test]
    fn reconcile_rejects_conflicts() {
        let own = [7u8; 32];
        let t0 = PeerTable::new(1);
        let (t1, c) = t0.reconcile(
            &[
                want(1, "10.42.1.0/24"),
                want(1, "10.42.5.0/24"),   // duplicate key
                want(2, "10.42.1.128/25"), // overlaps peer 1
                want(9, "10.42.9.0/24"),   // our own key
                want(3, "10.42.3.0/24"),
            ],
            &key(9),
            make(own),
        );
        assert_eq!(t1.len(), 2);
        assert_eq!(c.rejected.len(), 3, "{:?}", c.rejected);
        assert!(c.rejected.iter().any(|(_, why)| why.contains("overlaps")));
        assert!(t1.by_dst(ip("10.42.5.1")).is_none());
        assert_eq!(
            t1.by_dst(ip("10.42.1.200")).unwrap().peer.public_key(),
            key(1)
        );
    }

    #[test]
    fn the_first_of_overlapping_networks_wins_in_any_order() {
        let own = [7u8; 32];
        let wide = || want(1, "10.42.0.0/16");
        let (b, c, d) = (
            want(2, "10.42.1.0/24"),
            want(3, "10.42.2.0/24"),
            want(4, "10.43.0.0/24"),
        );
        let (t, ch) = PeerTable::new(0).reconcile(
            &[wide(), b.clone(), c.clone(), d.clone()],
            &key(9),
            make(own),
        );
        assert_eq!(ch.rejected.len(), 2, "{:?}", ch.rejected);
        assert_eq!(t.by_dst(ip("10.42.2.1")).unwrap().peer.public_key(), key(1));
        assert_eq!(t.by_dst(ip("10.43.0.1")).unwrap().peer.public_key(), key(4));
        let (t, ch) = PeerTable::new(0).reconcile(&[d, b, c, wide()], &key(9), make(own));
        assert_eq!(ch.rejected.len(), 1);
        assert_eq!(ch.rejected[0].0, key(1));
        assert_eq!(t.by_dst(ip("10.42.2.1")).unwrap().peer.public_key(), key(3));
        assert_eq!(t.by_dst(ip("10.42.1.1")).unwrap().peer.public_key(), key(2));
        assert!(t.by_dst(ip("10.42.3.1")).is_none());
        assert_eq!(
            overlapping(
                ["10.0.0.0/8", "11.0.0.0/24", "10.9.0.0/16", "12.0.0.0/8"]
                    .iter()
                    .map(|n| net(n))
            ),
            vec![true, false, true, false]
        );
    }

    #[test]
    fn freed_slots_are_reused_lowest_first() {
        let own = [7u8; 32];
        let all: Vec<Want> = (1..=6)
            .map(|n| want(n, &format!("10.42.{n}.0/24")))
            .collect();
        let (t1, _) = PeerTable::new(0).reconcile(&all, &key(9), make(own));
        let index = |t: &PeerTable, n: u8| t.by_key(&key(n)).unwrap().peer.index;
        // 2 and 4 leave; 7 and 8 come (8 overlaps 3 and is left out), 9 too.
        let mut w: Vec<Want> = all
            .iter()
            .filter(|w| ![2, 4].contains(&w.public_key[0]))
            .cloned()
            .collect();
        w.push(want(7, "10.42.7.0/24"));
        w.push(want(8, "10.42.3.128/25"));
        w.push(want(9, "10.42.9.0/24"));
        w.push(want(10, "10.42.10.0/24"));
        let (t2, c) = t1.reconcile(&w, &key(9 + 100), make(own));
        assert_eq!(
            (c.added.len(), c.removed.len(), c.rejected.len()),
            (3, 2, 1)
        );
        assert_eq!(index(&t2, 7), index(&t1, 2));
        assert_eq!(index(&t2, 9), index(&t1, 4));
        assert_eq!(index(&t2, 10), index(&t1, 6) + 1);
        assert_eq!(t2.len(), 7);
    }

    fn current_key(p: &Peer) -> ([u8; 32], Option<[u8; 32]>) {
        let st = p.lock();
        (st.key, st.next_key)
    }

    /// What `WgDevice::set_peers_with_next_keys` does with the changes.
    fn apply(c: &Changes, private: &[u8; 32]) {
        for (p, k) in &c.rekeyed {
            let mut st = p.lock();
            st.tunn = p.tunn_for(&DeviceKeys::new(*private), *k);
            st.key = *k;
        }
        for (p, k) in &c.next_keys {
            p.lock().next_key = *k;
        }
    }

    #[test]
    fn an_announced_next_key_is_an_alias_of_the_slot() {
        let own = [7u8; 32];
        let mut a = want(1, "10.42.1.0/24");
        let (t1, c) =
            PeerTable::new(5).reconcile(&[a.clone(), want(2, "10.42.2.0/24")], &key(9), make(own));
        apply(&c, &own);
        let p1 = Arc::clone(&t1.by_dst(ip("10.42.1.1")).unwrap().peer);
        assert!(t1.by_key(&key(11)).is_none());

        // Announce: K11 maps to the same slot; the peer is kept as it is.
        a.next_key = Some(key(11));
        let (t2, c) = t1.reconcile(&[a.clone(), want(2, "10.42.2.0/24")], &key(9), make(own));
        apply(&c, &own);
        assert!(c.added.is_empty() && c.removed.is_empty() && c.rekeyed.is_empty());
        assert!(Arc::ptr_eq(&t2.by_key(&key(11)).unwrap().peer, &p1));
        assert!(Arc::ptr_eq(&t2.by_key(&key(1)).unwrap().peer, &p1));
        assert_eq!(current_key(&p1), (key(1), Some(key(11))));
        assert_eq!(t2.len(), 2);

        // A handshake switched the peer over (what rotate::next_key_init
        // does); the store still says K1 with next K11: nothing changes.
        {
            let mut st = p1.lock();
            st.key = key(11);
            st.next_key = None;
        }
        let (t3, c) = t2.reconcile(&[a.clone()], &key(9), make(own));
        apply(&c, &own);
        assert!(c.rekeyed.is_empty() && c.added.is_empty() && c.next_keys.is_empty());
        assert_eq!(current_key(&p1), (key(11), None));
        assert!(Arc::ptr_eq(&t3.by_dst(ip("10.42.1.1")).unwrap().peer, &p1));

        // The store catches up: K11 with no next key. Same slot, index and
        // counters; the old key is forgotten.
        let mut b = want(11, "10.42.1.0/24");
        b.endpoint = a.endpoint;
        let (t4, c) = t3.reconcile(&[b.clone()], &key(9), make(own));
        apply(&c, &own);
        assert!(c.rekeyed.is_empty() && c.added.is_empty() && c.removed.is_empty());
        assert!(c.moved.is_empty());
        let e = t4.by_key(&key(11)).unwrap();
        assert!(Arc::ptr_eq(&e.peer, &p1));
        assert!(t4.by_key(&key(1)).is_none(), "the old key is dropped");
        assert!(Arc::ptr_eq(
            &t4.by_receiver_idx(p1.index << 8 | 1).unwrap().peer,
            &p1
        ));
        assert_eq!(t4.len(), 1);
    }

    #[test]
    fn a_key_changed_without_a_switch_keeps_the_slot_with_a_new_session() {
        let own = [7u8; 32];
        let mut a = want(1, "10.42.1.0/24");
        a.next_key = Some(key(11));
        let (t1, c) = PeerTable::new(0).reconcile(&[a], &key(9), make(own));
        let p1 = Arc::clone(&c.added[0]);
        p1.lock().next_key = Some(key(11));
        // No handshake came (it was lost); the peer now publishes K11.
        let (t2, c) = t1.reconcile(&[want(11, "10.42.1.0/24")], &key(9), make(own));
        assert!(c.added.is_empty() && c.removed.is_empty());
        assert_eq!(c.rekeyed.len(), 1);
        assert!(Arc::ptr_eq(&c.rekeyed[0].0, &p1));
        assert_eq!(c.rekeyed[0].1, key(11));
        assert_eq!(c.next_keys.len(), 1, "the next key is gone");
        apply(&c, &own);
        assert_eq!(current_key(&p1), (key(11), None));
        assert!(Arc::ptr_eq(&t2.by_key(&key(11)).unwrap().peer, &p1));
        assert!(t2.by_key(&key(1)).is_none());

        // A key nobody announced is a different peer: old one out, new in.
        let (t3, c) = t2.reconcile(&[want(12, "10.42.1.0/24")], &key(9), make(own));
        assert_eq!((c.added.len(), c.removed.len()), (1, 1));
        assert!(c.rekeyed.is_empty());
        assert!(!Arc::ptr_eq(&t3.by_dst(ip("10.42.1.1")).unwrap().peer, &p1));
    }

    #[test]
    fn a_current_key_wins_over_an_alias() {
        let own = [7u8; 32];
        // Peer 1 announces a next key that is peer 2's key, or ours.
        let mut a = want(1, "10.42.1.0/24");
        a.next_key = Some(key(2));
        let (t, c) =
            PeerTable::new(0).reconcile(&[a.clone(), want(2, "10.42.2.0/24")], &key(9), make(own));
        assert!(c.rejected.is_empty());
        assert_eq!(t.by_key(&key(2)).unwrap().peer.public_key(), key(2));
        a.next_key = Some(key(9));
        let (t, _) = PeerTable::new(0).reconcile(&[a], &key(9), make(own));
        assert!(t.by_key(&key(9)).is_none());
    }
}
