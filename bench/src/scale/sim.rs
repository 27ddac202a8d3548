//! The simulated hosts: host records as other netds would write them
//! (WireGuard backend, a real public key, a block of the cluster range
//! that is not netd's own, an underlay address that leads nowhere), and
//! the writer that puts them in the store: etcd transactions, or SQLite
//! puts through the store crate.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipnetwork::Ipv4Network;
use weft_model::{HostId, HostRecord, Keys, TunnelBackend, WgKey};
use weft_store::{SqliteStore, Store};

/// The first simulated underlay address: 198.18.0.0/15 is the benchmark
/// range (RFC 2544); nothing in the lab routes it anywhere.
pub const SIM_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The block size netd and the simulated hosts use.
pub const BLOCK_PREFIX: u8 = 26;
/// The first address of the cluster range.
const CLUSTER_BASE: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 0);

/// A cluster range that holds `hosts` blocks of [`BLOCK_PREFIX`]: at least
/// a /13 (8,192 blocks), larger when more are needed.
pub fn cluster_range(hosts: usize) -> Result<Ipv4Network> {
    let bits = usize::BITS - hosts.max(2).saturating_sub(1).leading_zeros();
    let prefix = (u32::from(BLOCK_PREFIX).saturating_sub(bits)).min(13);
    if prefix < 10 {
        bail!("{hosts} hosts do not fit 10.64.0.0/10 in /{BLOCK_PREFIX} blocks");
    }
    Ok(Ipv4Network::new(CLUSTER_BASE, prefix as u8)?)
}

/// The first `count` blocks of `range` other than `mine`.
pub fn blocks(range: Ipv4Network, mine: Ipv4Network, count: usize) -> Result<Vec<Ipv4Network>> {
    let size = 1u32 << (32 - u32::from(BLOCK_PREFIX));
    let first = u32::from(range.network());
    let total = 1u64 << (u32::from(BLOCK_PREFIX) - u32::from(range.prefix()));
    let out: Vec<Ipv4Network> = (0..total)
        .filter_map(|i| {
            Ipv4Network::new(Ipv4Addr::from(first + i as u32 * size), BLOCK_PREFIX).ok()
        })
        .filter(|b| *b != mine)
        .take(count)
        .collect();
    if out.len() < count {
        bail!("{range} holds only {} blocks besides {mine}", out.len());
    }
    Ok(out)
}

/// One simulated host: its key in the store, its block, its record's JSON.
#[derive(Debug, Clone)]
pub struct SimHost {
    pub key: String,
    pub block: Ipv4Network,
    pub value: Vec<u8>,
}

impl SimHost {
    /// An address in its block (what `ip route get` looks up).
    pub fn probe_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.block.network()) + 1)
    }
}

/// Simulated host `i` with `block`: a fresh key pair (only the public half
/// is published), a unique underlay address in 198.18.0.0/15.
pub fn sim_host(i: usize, block: Ipv4Network) -> Result<SimHost> {
    let id = format!("sim-{i}");
    let pair = weft_wg::KeyPair::generate().context("generating a WireGuard key")?;
    let record = HostRecord {
        host_id: HostId::new(id.as_str())?,
        underlay: Ipv4Addr::from(u32::from(SIM_UNDERLAY) + i as u32),
        block,
        backend: TunnelBackend::Wireguard,
        wg_public_key: Some(WgKey::from_bytes(pair.public_key())),
        wg_next_key: None,
        wg_port: 51820,
        vtep_mac: String::new(),
        vxlan_port: 4789,
        vni: 42,
        mtu: 1420,
        version: "weft-bench scale".into(),
    };
    Ok(SimHost {
        key: Keys::default().host(&id),
        block,
        value: serde_json::to_vec(&record)?,
    })
}

/// Writes to the store netd runs on, without leases (the records stay
/// through netd's restart).
pub enum Writer {
    Sqlite(Arc<SqliteStore>),
    Etcd(Box<etcd_client::Client>),
}

impl Writer {
    /// Writes `hosts` in batches of `batch`: one etcd transaction each, or
    /// `batch` concurrent SQLite puts (the embedded store has no batch
    /// write; each put is its own transaction); `pace` apart.
    pub async fn burst(&mut self, hosts: &[SimHost], batch: usize, pace: Duration) -> Result<()> {
        for (i, chunk) in hosts.chunks(batch.max(1)).enumerate() {
            if i > 0 && !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
            match self {
                Writer::Etcd(c) => {
                    let ops: Vec<etcd_client::TxnOp> = chunk
                        .iter()
                        .map(|h| etcd_client::TxnOp::put(h.key.as_str(), h.value.clone(), None))
                        .collect();
                    c.txn(etcd_client::Txn::new().and_then(ops))
                        .await
                        .context("an etcd transaction of host records")?;
                }
                Writer::Sqlite(s) => {
                    let mut set = tokio::task::JoinSet::new();
                    for h in chunk {
                        let (s, h) = (Arc::clone(s), h.clone());
                        set.spawn(async move { s.put(&h.key, &h.value, None).await });
                    }
                    while let Some(r) = set.join_next().await {
                        r??;
                    }
                }
            }
        }
        Ok(())
    }

    pub async fn put(&mut self, h: &SimHost) -> Result<()> {
        match self {
            Writer::Etcd(c) => {
                c.put(h.key.as_str(), h.value.clone(), None).await?;
            }
            Writer::Sqlite(s) => {
                s.put(&h.key, &h.value, None).await?;
            }
        }
        Ok(())
    }

    pub async fn delete(&mut self, key: &str) -> Result<()> {
        match self {
            Writer::Etcd(c) => {
                c.delete(key, None).await?;
            }
            Writer::Sqlite(s) => {
                s.delete(key).await?;
            }
        }
        Ok(())
    }

    /// The record of host `id`, if there is one.
    pub async fn host(&mut self, id: &str) -> Result<Option<HostRecord>> {
        let key = Keys::default().host(id);
        let value = match self {
            Writer::Etcd(c) => c
                .get(key.as_str(), None)
                .await?
                .kvs()
                .first()
                .map(|kv| kv.value().to_vec()),
            Writer::Sqlite(s) => s.get(&key).await?.map(|kv| kv.value),
        };
        value
            .map(|v| serde_json::from_slice(&v).context("netd's host record"))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_range_fits_the_hosts_and_blocks_skip_netds() {
        assert_eq!(cluster_range(100).unwrap().to_string(), "10.64.0.0/13");
        assert_eq!(cluster_range(8191).unwrap().to_string(), "10.64.0.0/13");
        assert_eq!(cluster_range(8193).unwrap().to_string(), "10.64.0.0/12");
        assert!(cluster_range(1 << 20).is_err());
        let range = cluster_range(10).unwrap();
        let mine: Ipv4Network = "10.64.0.64/26".parse().unwrap();
        let b = blocks(range, mine, 3).unwrap();
        let want: Vec<Ipv4Network> = ["10.64.0.0/26", "10.64.0.128/26", "10.64.0.192/26"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(b, want);
        assert!(blocks(range, mine, 8191).is_ok());
        assert!(blocks(range, mine, 8192).is_err());
    }

    #[test]
    fn a_simulated_host_is_a_usable_wireguard_peer() {
        let h = sim_host(300, "10.64.1.0/26".parse().unwrap()).unwrap();
        let r: HostRecord = serde_json::from_slice(&h.value).unwrap();
        assert_eq!(h.key, Keys::default().host("sim-300"));
        assert_eq!(r.host_id.to_string(), "sim-300");
        assert_eq!(r.underlay, Ipv4Addr::new(198, 18, 1, 45));
        assert_eq!(r.backend, TunnelBackend::Wireguard);
        assert!(r.wg_public_key.is_some());
        assert_eq!(h.probe_addr(), Ipv4Addr::new(10, 64, 1, 1));
    }
}
