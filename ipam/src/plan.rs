//! Pure decisions: which block a host takes, which address an endpoint gets.
//! No store, no clock: the callers pass what they read.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::config::IpamConfig;

/// What is known about one block lease, as read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockState {
    pub block: Ipv4Network,
    pub host_id: String,
    /// Wall-clock milliseconds of the last renewal.
    pub renewed_at_ms: u64,
    /// The store revision of the record (for compare-and-swap).
    pub mod_revision: i64,
}

/// What a host should do to get its block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockChoice {
    /// The host already holds this block (e.g. after a restart): renew it.
    Keep(BlockState),
    /// Nobody holds this block: create its record.
    Claim(Ipv4Network),
    /// This block's host has been gone longer than the grace period: take it
    /// over (compare-and-swap on the old record).
    TakeOver(BlockState),
    /// Every block is held by a live host or is within its grace period.
    Exhausted,
}

/// Decides which block `host_id` gets, given the current leases.
/// Prefers, in order: the host's own block, the lowest free block, the
/// block whose host has been gone the longest (past grace).
pub fn choose_block(
    cfg: &IpamConfig,
    leases: &[BlockState],
    host_id: &str,
    now_ms: u64,
    skip: &BTreeSet<Ipv4Network>,
) -> BlockChoice {
    if let Some(own) = leases.iter().find(|l| l.host_id == host_id) {
        return BlockChoice::Keep(own.clone());
    }
    let held: BTreeSet<Ipv4Network> = leases.iter().map(|l| l.block).collect();
    let free = (0..cfg.block_count())
        .filter_map(|i| cfg.block(i))
        .find(|b| !held.contains(b) && !skip.contains(b));
    if let Some(block) = free {
        return BlockChoice::Claim(block);
    }
    let grace_ms = u64::try_from(cfg.block_grace.as_millis()).unwrap_or(u64::MAX);
    leases
        .iter()
        .filter(|l| {
            cfg.cluster_range.contains(l.block.network())
                && l.block.prefix() == cfg.block_prefix
                && !skip.contains(&l.block)
                && now_ms.saturating_sub(l.renewed_at_ms) > grace_ms
        })
        .min_by_key(|l| l.renewed_at_ms)
        .map(|l| BlockChoice::TakeOver(l.clone()))
        .unwrap_or(BlockChoice::Exhausted)
}

/// The addresses of a block that endpoints may use: everything except the
/// network address, the gateway (network + 1) and the broadcast address.
pub fn usable(block: Ipv4Network) -> impl Iterator<Item = Ipv4Addr> {
    let first = u32::from(block.network()).saturating_add(2);
    let last = u32::from(block.broadcast()).saturating_sub(1);
    (first..=last).map(Ipv4Addr::from)
}

/// How many endpoint addresses a block holds.
pub fn capacity(block: Ipv4Network) -> u32 {
    let size = 1u64 << (32 - u32::from(block.prefix()));
    u32::try_from(size.saturating_sub(3)).unwrap_or(u32::MAX)
}

/// The gateway address of a block (network + 1, held by the bridge).
pub fn gateway(block: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(block.network()).saturating_add(1))
}

/// The next free address after `after` (wrapping around), so a released
/// address is not handed out again at once; with `spread > 0`, the
/// `spread`-th free one after that (concurrent allocators that lost a race
/// spread out instead of all trying the same next address). Falls back to
/// the first free address when fewer are free. `None` when the block is full.
pub fn pick_address(
    block: Ipv4Network,
    used: &BTreeSet<Ipv4Addr>,
    after: Option<Ipv4Addr>,
    spread: usize,
) -> Option<Ipv4Addr> {
    let first = u32::from(block.network()).saturating_add(2);
    let last = u32::from(block.broadcast()).saturating_sub(1);
    let start = after
        .filter(|a| block.contains(*a))
        .map(|a| u32::from(a).saturating_add(1))
        .unwrap_or(first)
        .clamp(first, last.saturating_add(1));
    let free = || {
        (start..=last)
            .chain(first..start)
            .map(Ipv4Addr::from)
            .filter(|candidate| !used.contains(candidate))
    };
    free().nth(spread).or_else(|| free().next())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn lease(block: &str, host: &str, renewed_at_ms: u64) -> BlockState {
        BlockState {
            block: net(block),
            host_id: host.into(),
            renewed_at_ms,
            mod_revision: 7,
        }
    }

    fn small_cfg() -> IpamConfig {
        IpamConfig {
            cluster_range: net("10.42.0.0/23"),
            block_prefix: 24,
            block_grace: Duration::from_secs(10),
            ..IpamConfig::default()
        }
    }

    #[test]
    fn host_keeps_its_block() {
        let leases = [lease("10.42.1.0/24", "b", 0), lease("10.42.0.0/24", "a", 0)];
        let choice = choose_block(&small_cfg(), &leases, "a", 1_000_000, &BTreeSet::new());
        assert_eq!(choice, BlockChoice::Keep(leases[1].clone()));
    }

    #[test]
    fn lowest_free_block_first() {
        let leases = [lease("10.42.0.0/24", "a", 0)];
        let choice = choose_block(&small_cfg(), &leases, "b", 0, &BTreeSet::new());
        assert_eq!(choice, BlockChoice::Claim(net("10.42.1.0/24")));
        let choice = choose_block(&small_cfg(), &[], "b", 0, &BTreeSet::new());
        assert_eq!(choice, BlockChoice::Claim(net("10.42.0.0/24")));
        let skip = BTreeSet::from([net("10.42.0.0/24")]);
        let choice = choose_block(&small_cfg(), &[], "b", 0, &skip);
        assert_eq!(choice, BlockChoice::Claim(net("10.42.1.0/24")));
    }

    #[test]
    fn dead_host_block_kept_for_grace_then_reused() {
        let leases = [
            lease("10.42.0.0/24", "a", 1_000),
            lease("10.42.1.0/24", "b", 5_000),
        ];
        let cfg = small_cfg();
        // Within grace for both: exhausted.
        assert_eq!(
            choose_block(&cfg, &leases, "c", 11_000, &BTreeSet::new()),
            BlockChoice::Exhausted
        );
        // a's grace is over (10 s after 1 s), b's not yet.
        assert_eq!(
            choose_block(&cfg, &leases, "c", 11_001, &BTreeSet::new()),
            BlockChoice::TakeOver(leases[0].clone())
        );
        // Both over: the longest gone goes first.
        assert_eq!(
            choose_block(&cfg, &leases, "c", 60_000, &BTreeSet::new()),
            BlockChoice::TakeOver(leases[0].clone())
        );
    }

    #[test]
    fn leases_outside_the_plan_are_never_taken_over() {
        // A record from an older plan (different block size) is not reused.
        let leases = [
            lease("10.42.0.0/24", "a", 0),
            lease("10.42.1.0/24", "b", 0),
            lease("10.42.1.0/25", "old", 0),
        ];
        let cfg = small_cfg();
        let choice = choose_block(&cfg, &leases[2..], "c", 0, &BTreeSet::new());
        assert_eq!(choice, BlockChoice::Claim(net("10.42.0.0/24")));
        let only_old = [leases[0].clone(), leases[1].clone()];
        assert!(matches!(
            choose_block(&cfg, &only_old, "c", u64::MAX, &BTreeSet::new()),
            BlockChoice::TakeOver(_)
        ));
    }

    #[test]
    fn usable_skips_network_gateway_broadcast() {
        let b = net("10.42.3.0/29");
        let all: Vec<Ipv4Addr> = usable(b).collect();
        assert_eq!(
            all,
            [
                "10.42.3.2",
                "10.42.3.3",
                "10.42.3.4",
                "10.42.3.5",
                "10.42.3.6"
            ]
            .map(ip)
        );
        assert_eq!(capacity(b), 5);
        assert_eq!(capacity(net("10.42.3.0/24")), 253);
        assert_eq!(gateway(b), ip("10.42.3.1"));
        assert_eq!(usable(net("10.42.3.0/30")).count(), 1);
    }

    #[test]
    fn pick_continues_after_last_and_wraps() {
        let b = net("10.42.3.0/29");
        let mut used = BTreeSet::new();
        assert_eq!(pick_address(b, &used, None, 0), Some(ip("10.42.3.2")));
        used.insert(ip("10.42.3.2"));
        used.insert(ip("10.42.3.3"));
        // .4 was allocated last and released: do not hand it out again at once.
        assert_eq!(
            pick_address(b, &used, Some(ip("10.42.3.4")), 0),
            Some(ip("10.42.3.5"))
        );
        used.insert(ip("10.42.3.5"));
        used.insert(ip("10.42.3.6"));
        assert_eq!(
            pick_address(b, &used, Some(ip("10.42.3.6")), 0),
            Some(ip("10.42.3.4"))
        );
        used.insert(ip("10.42.3.4"));
        assert_eq!(pick_address(b, &used, Some(ip("10.42.3.6")), 0), None);
        // Spreading skips free addresses, and falls back to the first one.
        let used = BTreeSet::from([ip("10.42.3.3")]);
        assert_eq!(pick_address(b, &used, None, 2), Some(ip("10.42.3.5")));
        assert_eq!(pick_address(b, &used, None, 9), Some(ip("10.42.3.2")));
        // A hint outside the block is ignored.
        assert_eq!(
            pick_address(b, &BTreeSet::new(), Some(ip("10.1.1.1")), 0),
            Some(ip("10.42.3.2"))
        );
    }
}
