//! weft's address plan over the store.
//!
//! * The cluster range (default 10.42.0.0/16) is cut into host blocks
//!   (default /24). A host leases one block by compare-and-swap; the same
//!   host id gets the same block back after a restart, and a block whose host
//!   stopped renewing it is kept for a grace period before another host may
//!   take it.
//! * Inside its block a host hands out endpoint addresses: never the network
//!   address, the gateway (.1) or the broadcast address. Allocation is
//!   idempotent per (container id, interface), so a retried CNI ADD gets the
//!   same address; garbage collection frees every endpoint not in a live set.
//!
//! Store layout, under a root prefix (default `/weft/`; the keys are built by
//! [`weft_model::Keys`], the one home of the key layout):
//! * `ipam/config` — the cluster plan (cluster range, block size, service
//!   range), written by the first host; every other host must use the same
//!   plan. A plan written before services gets the first checking host's
//!   service range.
//! * `ipam/blocks/<net>-<len>` — one [`BlockRecord`] per leased block.
//! * `ipam/addrs/<net>-<len>/<addr>` — one [`AddressRecord`] per endpoint.
//! * `ipam/cursor/<net>-<len>` — the last address handed out (a hint that
//!   keeps released addresses from being reused at once).
//!
//! The decisions are pure functions in [`plan`]; this module reads, decides,
//! and writes with compare-and-swap, retrying on conflicts.

mod config;
use weft_model::{ContainerId, HostId, IfName, Keys, NameError};
pub mod plan;

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use weft_store::{CasOutcome, DynStore, Expect, KeyValue, StoreError};
use weft_sys::time::now_ms;

pub use config::{
    overlaps, ConfigError, IpamConfig, DEFAULT_BLOCK_GRACE, DEFAULT_BLOCK_PREFIX, MAX_BLOCK_PREFIX,
};
use plan::{BlockChoice, BlockState};

/// Give up after this many compare-and-swap conflicts in one call; only
/// reached under pathological contention.
const MAX_ATTEMPTS: usize = 64;

/// What went wrong, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("invalid address plan: {0}")]
    Config(#[from] ConfigError),
    #[error(
        "this host's address plan (range {local_range}, blocks /{local_prefix}) differs from the \
         cluster's (range {cluster_range}, blocks /{cluster_prefix}) recorded in the store: \
         every host must use the same cluster range and block size"
    )]
    PlanMismatch {
        local_range: Ipv4Network,
        local_prefix: u8,
        cluster_range: Ipv4Network,
        cluster_prefix: u8,
    },
    #[error(
        "this host's service range {local} differs from the cluster's ({cluster}) recorded in \
         the store: every host must use the same service range ([ipam] service_range, \
         --service-range), or hosts would hand out VIPs from different ranges"
    )]
    ServiceRangeMismatch {
        local: Ipv4Network,
        cluster: Ipv4Network,
    },
    #[error(
        "no free host block in cluster range {range} (/{block_prefix} blocks): every block is \
         held by a live host or within its grace period; remove dead hosts, shorten the grace \
         period or use a larger range"
    )]
    NoFreeBlock {
        range: Ipv4Network,
        block_prefix: u8,
    },
    #[error(
        "block {block} is full: all {capacity} container addresses are in use; remove \
         containers or run GC"
    )]
    BlockFull { block: Ipv4Network, capacity: u32 },
    #[error("block {block} is no longer held by host {host_id} (now held by {holder}); lease a block again")]
    BlockLost {
        block: Ipv4Network,
        host_id: String,
        holder: String,
    },
    #[error("address {addr} is not inside block {block}")]
    NotInBlock { addr: Ipv4Addr, block: Ipv4Network },
    /// A host id, container id or interface name that breaks its rule
    /// (the rules are weft-model's).
    #[error(transparent)]
    InvalidId(#[from] NameError),
    #[error("gave up on {what} after {MAX_ATTEMPTS} conflicting concurrent updates; retry")]
    Contention { what: String },
    #[error("store record {key} is corrupt ({detail}); delete it or restore the store")]
    Corrupt { key: String, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IpamError {
    /// True when retrying later may succeed (store down, heavy contention).
    pub fn is_transient(&self) -> bool {
        match self {
            IpamError::Store(e) => e.is_transient(),
            IpamError::Contention { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T, E = IpamError> = std::result::Result<T, E>;

/// Who holds an endpoint address: a container's interface.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

impl Owner {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Self {
        Self {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }
}

/// A host's block lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub block: Ipv4Network,
    pub host_id: String,
    pub leased_at_ms: u64,
    pub renewed_at_ms: u64,
}

/// A block a host holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBlock {
    pub block: Ipv4Network,
    pub host_id: String,
    /// The bridge's address (network + 1).
    pub gateway: Ipv4Addr,
}

/// An endpoint address as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressRecord {
    pub container_id: String,
    pub ifname: String,
    pub host_id: String,
    pub allocated_at_ms: u64,
}

/// An allocated endpoint address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub addr: Ipv4Addr,
    pub block: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub owner: Owner,
}

impl Allocation {
    /// The address with the block's prefix, as the container interface gets it.
    pub fn cidr(&self) -> Ipv4Network {
        Ipv4Network::new(self.addr, self.block.prefix())
            .unwrap_or_else(|_| unreachable!("block prefix is a valid prefix"))
    }
}

/// The address plan over a store.
#[derive(Clone)]
pub struct Ipam {
    store: DynStore,
    cfg: IpamConfig,
    keys: Keys,
}

impl Ipam {
    /// Validates the plan and checks it against the one recorded in the store
    /// (recording it if this is the first host). `root` is the key prefix of
    /// the cluster, e.g. `/weft/`.
    pub async fn new(store: DynStore, cfg: IpamConfig, root: &str) -> Result<Self> {
        cfg.validate()?;
        let keys = Keys::new(root);
        let ipam = Self { store, cfg, keys };
        ipam.check_plan().await?;
        Ok(ipam)
    }

    pub fn config(&self) -> &IpamConfig {
        &self.cfg
    }

    /// Records this host's plan in the store if none is, or checks it
    /// against the recorded one: the cluster range, the block size and the
    /// service range must match (the grace is local). A plan recorded
    /// before services existed has no service range: the first host that
    /// checks it records its own (compare-and-swap), later ones must match.
    async fn check_plan(&self) -> Result<()> {
        #[derive(Serialize, Deserialize)]
        struct Plan {
            cluster_range: Ipv4Network,
            block_prefix: u8,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            service_range: Option<Ipv4Network>,
        }
        let key = self.keys.ipam_config();
        let mine = Plan {
            cluster_range: self.cfg.cluster_range,
            block_prefix: self.cfg.block_prefix,
            service_range: Some(self.cfg.service_range),
        };
        let value = to_json(&mine);
        let mut expect = Expect::Absent;
        for _ in 0..MAX_ATTEMPTS {
            let current = match self
                .store
                .compare_and_swap(&key, expect, &value, None)
                .await?
            {
                CasOutcome::Done(_) => return Ok(()),
                CasOutcome::Conflict(current) => current,
            };
            let Some(kv) = current else {
                // Deleted meanwhile: record ours.
                expect = Expect::Absent;
                continue;
            };
            let theirs: Plan = from_json(&kv)?;
            if theirs.cluster_range != mine.cluster_range
                || theirs.block_prefix != mine.block_prefix
            {
                return Err(IpamError::PlanMismatch {
                    local_range: mine.cluster_range,
                    local_prefix: mine.block_prefix,
                    cluster_range: theirs.cluster_range,
                    cluster_prefix: theirs.block_prefix,
                });
            }
            match theirs.service_range {
                Some(cluster) if Some(cluster) != mine.service_range => {
                    return Err(IpamError::ServiceRangeMismatch {
                        local: self.cfg.service_range,
                        cluster,
                    })
                }
                Some(_) => return Ok(()),
                // Recorded before services: add ours.
                None => expect = Expect::ModRevision(kv.mod_revision),
            }
        }
        Err(IpamError::Contention { what: key })
    }

    fn blocks_prefix(&self) -> String {
        self.keys.ipam_blocks()
    }

    fn block_key(&self, block: Ipv4Network) -> String {
        self.keys.ipam_block(&block_id(block))
    }

    fn addrs_prefix(&self, block: Ipv4Network) -> String {
        self.keys.ipam_addrs(&block_id(block))
    }

    fn cursor_key(&self, block: Ipv4Network) -> String {
        self.keys.ipam_cursor(&block_id(block))
    }

    /// Every block lease in the store, in key order.
    pub async fn block_leases(&self) -> Result<Vec<BlockRecord>> {
        Ok(self
            .read_blocks()
            .await?
            .into_iter()
            .map(|(record, _)| record)
            .collect())
    }

    async fn read_blocks(&self) -> Result<Vec<(BlockRecord, KeyValue)>> {
        let range = self.store.get_prefix(&self.blocks_prefix()).await?;
        range
            .kvs
            .into_iter()
            .map(|kv| Ok((from_json(&kv)?, kv)))
            .collect()
    }

    /// Gets this host's block: the one it already holds (renewed), else a free
    /// one, else one whose host has been gone past the grace period.
    pub async fn lease_block(&self, host_id: &str) -> Result<HostBlock> {
        HostId::new(host_id)?;
        let mut skip = BTreeSet::new();
        for _ in 0..MAX_ATTEMPTS {
            let blocks = self.read_blocks().await?;
            let states: Vec<BlockState> = blocks
                .iter()
                .map(|(r, kv)| BlockState {
                    block: r.block,
                    host_id: r.host_id.clone(),
                    renewed_at_ms: r.renewed_at_ms,
                    mod_revision: kv.mod_revision,
                })
                .collect();
            let now = now_ms();
            let (block, expect, leased_at_ms) =
                match plan::choose_block(&self.cfg, &states, host_id, now, &skip) {
                    BlockChoice::Keep(s) => {
                        let leased_at = blocks
                            .iter()
                            .find(|(r, _)| r.block == s.block)
                            .map_or(now, |(r, _)| r.leased_at_ms);
                        (s.block, Expect::ModRevision(s.mod_revision), leased_at)
                    }
                    BlockChoice::Claim(block) => (block, Expect::Absent, now),
                    BlockChoice::TakeOver(s) => {
                        tracing::info!(
                            block = %s.block, previous_host = %s.host_id, host = %host_id,
                            "taking over the block of a host gone past the grace period"
                        );
                        (s.block, Expect::ModRevision(s.mod_revision), now)
                    }
                    BlockChoice::Exhausted => {
                        return Err(IpamError::NoFreeBlock {
                            range: self.cfg.cluster_range,
                            block_prefix: self.cfg.block_prefix,
                        })
                    }
                };
            let record = BlockRecord {
                block,
                host_id: host_id.to_owned(),
                leased_at_ms,
                renewed_at_ms: now,
            };
            let key = self.block_key(block);
            match self
                .store
                .compare_and_swap(&key, expect, &to_json(&record), None)
                .await?
            {
                CasOutcome::Done(_) => {
                    tracing::debug!(%block, host = %host_id, "block leased");
                    return Ok(host_block(block, host_id));
                }
                CasOutcome::Conflict(Some(kv)) => {
                    // Someone else got there first; unless it is us (a
                    // concurrent start of the same host), look elsewhere.
                    let theirs: BlockRecord = from_json(&kv)?;
                    if theirs.host_id != host_id {
                        skip.insert(block);
                    }
                }
                CasOutcome::Conflict(None) => {}
            }
        }
        Err(IpamError::Contention {
            what: format!("block lease for host {host_id}"),
        })
    }

    /// Marks the host's block as alive now. Call it well within the grace
    /// period. Fails with [`IpamError::BlockLost`] if another host took it.
    pub async fn renew_block(&self, block: &HostBlock) -> Result<()> {
        let key = self.block_key(block.block);
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.store.get(&key).await? else {
                return Err(IpamError::BlockLost {
                    block: block.block,
                    host_id: block.host_id.clone(),
                    holder: "nobody".into(),
                });
            };
            let mut record: BlockRecord = from_json(&kv)?;
            if record.host_id != block.host_id {
                return Err(IpamError::BlockLost {
                    block: block.block,
                    host_id: block.host_id.clone(),
                    holder: record.host_id,
                });
            }
            record.renewed_at_ms = now_ms();
            let expect = Expect::ModRevision(kv.mod_revision);
            if self
                .store
                .compare_and_swap(&key, expect, &to_json(&record), None)
                .await?
                .is_done()
            {
                return Ok(());
            }
        }
        Err(IpamError::Contention {
            what: format!("renewal of block {}", block.block),
        })
    }

    /// Gives the block back (the host leaves the cluster for good). Its
    /// endpoint records are deleted too.
    pub async fn release_block(&self, block: &HostBlock) -> Result<()> {
        let key = self.block_key(block.block);
        if let Some(kv) = self.store.get(&key).await? {
            let record: BlockRecord = from_json(&kv)?;
            if record.host_id != block.host_id {
                return Err(IpamError::BlockLost {
                    block: block.block,
                    host_id: block.host_id.clone(),
                    holder: record.host_id,
                });
            }
            for kv in self
                .store
                .get_prefix(&self.addrs_prefix(block.block))
                .await?
                .kvs
            {
                self.store.delete(&kv.key).await?;
            }
            self.store.delete(&self.cursor_key(block.block)).await?;
            self.store.compare_and_delete(&key, kv.mod_revision).await?;
        }
        Ok(())
    }

    async fn read_addrs(
        &self,
        block: Ipv4Network,
    ) -> Result<Vec<(Ipv4Addr, AddressRecord, KeyValue)>> {
        let prefix = self.addrs_prefix(block);
        let range = self.store.get_prefix(&prefix).await?;
        range
            .kvs
            .into_iter()
            .map(|kv| {
                let addr =
                    kv.key[prefix.len()..]
                        .parse::<Ipv4Addr>()
                        .map_err(|e| IpamError::Corrupt {
                            key: kv.key.clone(),
                            detail: format!("not an address: {e}"),
                        })?;
                let record = from_json(&kv)?;
                Ok((addr, record, kv))
            })
            .collect()
    }

    /// Gives `owner` an address in `block`; the same owner always gets the
    /// address it already has.
    pub async fn allocate(&self, block: &HostBlock, owner: &Owner) -> Result<Allocation> {
        ContainerId::new(owner.container_id.as_str())?;
        IfName::new(owner.ifname.as_str())?;
        let record = AddressRecord {
            container_id: owner.container_id.clone(),
            ifname: owner.ifname.clone(),
            host_id: block.host_id.clone(),
            allocated_at_ms: now_ms(),
        };
        let value = to_json(&record);
        let prefix = self.addrs_prefix(block.block);
        let cursor_key = self.cursor_key(block.block);
        let mut spread = 0;
        for attempt in 0..MAX_ATTEMPTS {
            // Read the block fresh on every attempt: a lost race means others
            // allocated since the last read.
            let existing = self.read_addrs(block.block).await?;
            if let Some((addr, _, _)) = existing
                .iter()
                .find(|(_, r, _)| r.container_id == owner.container_id && r.ifname == owner.ifname)
            {
                return Ok(allocation(block, *addr, owner));
            }
            let used: BTreeSet<Ipv4Addr> = existing.iter().map(|(a, _, _)| *a).collect();
            let after = self
                .store
                .get(&cursor_key)
                .await?
                .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok());
            let Some(addr) = plan::pick_address(block.block, &used, after, spread) else {
                return Err(IpamError::BlockFull {
                    block: block.block,
                    capacity: plan::capacity(block.block),
                });
            };
            let key = format!("{prefix}{addr}");
            if self
                .store
                .compare_and_swap(&key, Expect::Absent, &value, None)
                .await?
                .is_done()
            {
                // A hint only: a lost race here costs nothing.
                self.store
                    .put(&cursor_key, addr.to_string().as_bytes(), None)
                    .await?;
                tracing::debug!(%addr, container = %owner.container_id, ifname = %owner.ifname, "address allocated");
                return Ok(allocation(block, addr, owner));
            }
            // Taken concurrently. Racers all aim at the same next address;
            // spread out by a per-owner amount so they stop colliding.
            spread = spread_for(owner, attempt);
        }
        Err(IpamError::Contention {
            what: format!("address allocation in block {}", block.block),
        })
    }

    /// Frees the address of `owner`. Returns it, or `None` if the owner had
    /// none (releasing twice is fine).
    pub async fn release(&self, block: &HostBlock, owner: &Owner) -> Result<Option<Ipv4Addr>> {
        for (addr, record, kv) in self.read_addrs(block.block).await? {
            if record.container_id == owner.container_id && record.ifname == owner.ifname {
                return Ok(self
                    .store
                    .compare_and_delete(&kv.key, kv.mod_revision)
                    .await?
                    .is_done()
                    .then_some(addr));
            }
        }
        Ok(None)
    }

    /// Gives each of `owners` an address in `block`, like [`Ipam::allocate`]
    /// but with one read of the block for all of them (a batch of
    /// concurrent CNI ADDs): an owner that has an address keeps it, the
    /// others get the next free ones after the cursor, which is written
    /// once at the end. An owner whose compare-and-swap loses a race falls
    /// back to [`Ipam::allocate`]. Each owner gets its own result; the outer
    /// error is the read every owner depends on.
    pub async fn allocate_all(
        &self,
        block: &HostBlock,
        owners: &[Owner],
    ) -> Result<Vec<Result<Allocation>>> {
        let existing = self.read_addrs(block.block).await?;
        let cursor_key = self.cursor_key(block.block);
        let mut after = self
            .store
            .get(&cursor_key)
            .await?
            .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok());
        let mut used: BTreeSet<Ipv4Addr> = existing.iter().map(|(a, _, _)| *a).collect();
        let prefix = self.addrs_prefix(block.block);
        let mut moved = false;
        // What this call handed out, so an owner listed twice gets one.
        let mut granted: Vec<Allocation> = Vec::new();
        let mut out = Vec::with_capacity(owners.len());
        for owner in owners {
            if let Err(e) = ContainerId::new(owner.container_id.as_str())
                .and_then(|_| IfName::new(owner.ifname.as_str()))
            {
                out.push(Err(e.into()));
                continue;
            }
            if let Some((addr, _, _)) = existing
                .iter()
                .find(|(_, r, _)| r.container_id == owner.container_id && r.ifname == owner.ifname)
            {
                out.push(Ok(allocation(block, *addr, owner)));
                continue;
            }
            if let Some(a) = granted.iter().find(|a| a.owner == *owner) {
                out.push(Ok(a.clone()));
                continue;
            }
            let Some(addr) = plan::pick_address(block.block, &used, after, 0) else {
                out.push(Err(IpamError::BlockFull {
                    block: block.block,
                    capacity: plan::capacity(block.block),
                }));
                continue;
            };
            let record = AddressRecord {
                container_id: owner.container_id.clone(),
                ifname: owner.ifname.clone(),
                host_id: block.host_id.clone(),
                allocated_at_ms: now_ms(),
            };
            let key = format!("{prefix}{addr}");
            let result = match self
                .store
                .compare_and_swap(&key, Expect::Absent, &to_json(&record), None)
                .await
            {
                Ok(CasOutcome::Done(_)) => {
                    tracing::debug!(%addr, container = %owner.container_id, ifname = %owner.ifname, "address allocated");
                    Ok(allocation(block, addr, owner))
                }
                // Taken meanwhile: the careful way, which reads again.
                Ok(CasOutcome::Conflict(_)) => self.allocate(block, owner).await,
                Err(e) => Err(e.into()),
            };
            if let Ok(a) = &result {
                used.insert(a.addr);
                after = Some(a.addr);
                moved = true;
                granted.push(a.clone());
            }
            out.push(result);
        }
        if let (true, Some(addr)) = (moved, after) {
            // A hint only: a lost race here costs nothing.
            self.store
                .put(&cursor_key, addr.to_string().as_bytes(), None)
                .await?;
        }
        Ok(out)
    }

    /// Frees `addr` if `owner` holds it, by its key: one read and one
    /// delete, no scan of the block (the caller knows the address from the
    /// endpoint's record). Returns it, or `None` when the key is free; when
    /// another owner holds `addr` (the caller's view was stale), releases
    /// `owner`'s address wherever it is ([`Ipam::release`]).
    pub async fn release_at(
        &self,
        block: &HostBlock,
        addr: Ipv4Addr,
        owner: &Owner,
    ) -> Result<Option<Ipv4Addr>> {
        if !block.block.contains(addr) {
            return Err(IpamError::NotInBlock {
                addr,
                block: block.block,
            });
        }
        let key = format!("{}{addr}", self.addrs_prefix(block.block));
        let Some(kv) = self.store.get(&key).await? else {
            return Ok(None);
        };
        let record: AddressRecord = from_json(&kv)?;
        if record.container_id != owner.container_id || record.ifname != owner.ifname {
            return self.release(block, owner).await;
        }
        Ok(self
            .store
            .compare_and_delete(&kv.key, kv.mod_revision)
            .await?
            .is_done()
            .then_some(addr))
    }

    /// Frees the addresses of every owner in `owners` with one read of the
    /// block ([`Ipam::release`] for many): for each owner its address, or
    /// `None` if it had none.
    pub async fn release_all(
        &self,
        block: &HostBlock,
        owners: &[Owner],
    ) -> Result<Vec<Option<Ipv4Addr>>> {
        let addrs = self.read_addrs(block.block).await?;
        let mut out = Vec::with_capacity(owners.len());
        for owner in owners {
            let mut released = None;
            if let Some((addr, _, kv)) = addrs
                .iter()
                .find(|(_, r, _)| r.container_id == owner.container_id && r.ifname == owner.ifname)
            {
                if self
                    .store
                    .compare_and_delete(&kv.key, kv.mod_revision)
                    .await?
                    .is_done()
                {
                    released = Some(*addr);
                }
            }
            out.push(released);
        }
        Ok(out)
    }

    /// Every address allocated in `block`, in address order.
    pub async fn list(&self, block: &HostBlock) -> Result<Vec<Allocation>> {
        Ok(self
            .read_addrs(block.block)
            .await?
            .into_iter()
            .map(|(addr, r, _)| allocation(block, addr, &Owner::new(r.container_id, r.ifname)))
            .collect())
    }

    /// Frees every address in `block` whose owner is not in `live` (CNI GC's
    /// valid attachments). Returns what was freed.
    pub async fn gc(&self, block: &HostBlock, live: &HashSet<Owner>) -> Result<Vec<Allocation>> {
        let mut freed = Vec::new();
        for (addr, r, kv) in self.read_addrs(block.block).await? {
            let owner = Owner::new(r.container_id, r.ifname);
            if live.contains(&owner) {
                continue;
            }
            if self
                .store
                .compare_and_delete(&kv.key, kv.mod_revision)
                .await?
                .is_done()
            {
                tracing::info!(%addr, container = %owner.container_id, ifname = %owner.ifname, "address garbage-collected");
                freed.push(allocation(block, addr, &owner));
            }
        }
        Ok(freed)
    }
}

/// A small, per-owner, per-attempt offset in 0..8.
fn spread_for(owner: &Owner, attempt: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (owner, attempt).hash(&mut h);
    (h.finish() % 8) as usize
}

fn host_block(block: Ipv4Network, host_id: &str) -> HostBlock {
    HostBlock {
        block,
        host_id: host_id.to_owned(),
        gateway: plan::gateway(block),
    }
}

fn allocation(block: &HostBlock, addr: Ipv4Addr, owner: &Owner) -> Allocation {
    Allocation {
        addr,
        block: block.block,
        gateway: block.gateway,
        owner: owner.clone(),
    }
}

/// `10.42.3.0/24` → `10.42.3.0-24`, a key segment without a slash.
fn block_id(block: Ipv4Network) -> String {
    format!("{}-{}", block.network(), block.prefix())
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers always serialise.
    serde_json::to_vec(value).unwrap_or_default()
}

fn from_json<T: for<'de> Deserialize<'de>>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| IpamError::Corrupt {
        key: kv.key.clone(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_by_the_model_rules() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store: DynStore = std::sync::Arc::new(
                weft_store::SqliteStore::open(dir.path().join("s.db")).unwrap(),
            );
            let ipam = Ipam::new(store, IpamConfig::default(), "/weft/")
                .await
                .unwrap();
            for bad in ["", "-h", "a b", "a/b"] {
                let e = ipam.lease_block(bad).await.unwrap_err();
                assert!(matches!(e, IpamError::InvalidId(_)), "{bad:?}: {e}");
            }
            let block = ipam.lease_block("h-1").await.unwrap();
            ipam.allocate(&block, &Owner::new("abc-123_x.y", "eth0"))
                .await
                .unwrap();
            for (id, ifname, what) in [
                ("", "eth0", "container id"),
                ("a b", "eth0", "container id"),
                ("../x", "eth0", "container id"),
                (&"x".repeat(300), "eth0", "container id"),
                ("abc", "eth\n0", "interface name"),
                ("abc", "0123456789abcdef", "interface name"),
            ] {
                let e = ipam
                    .allocate(&block, &Owner::new(id, ifname))
                    .await
                    .unwrap_err();
                assert!(matches!(e, IpamError::InvalidId(_)), "{e}");
                assert!(e.to_string().contains(what), "{e}");
            }
        });
    }

    #[test]
    fn block_ids_have_no_slash() {
        assert_eq!(block_id("10.42.3.0/24".parse().unwrap()), "10.42.3.0-24");
    }
}
