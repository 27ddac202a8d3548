//! The daemon: bootstrap ([`Daemon::start`]: store, block lease, underlay
//! and MTU, NAT backend, tunnel), the reconcile and maintenance loops
//! ([`Daemon::maintain`]: block renewal, store probe, underlay changes,
//! kernel state, weft's firewall state removed by another program:
//! `daemon/firewall.rs`), the mesh wiring ([`Daemon::run_mesh`]: host records in,
//! tunnel peers out), and the state the other modules read.
//!
//! The concerns themselves live apart: endpoint operations in
//! [`crate::endpoints`] (every change of this host's endpoints runs under
//! [`Daemon`]'s lock and ends with a NAT reconcile, so the published ports in
//! iptables always match the records), membership in [`crate::mesh`], the
//! tunnel drivers and the MTU in [`crate::tunnel`], the store's health in
//! [`crate::health`], netd's counters in [`crate::counters`] (exported by
//! [`crate::metrics`], which the daemon does not import), policy and
//! anti-spoofing enforcement in [`crate::enforce`] (fed by
//! [`Daemon::run_policy`], re-applied on the resync and after every change of
//! this host's endpoints, [`Daemon::enforce_local`]), the VIPs' load
//! balancing in [`crate::services::lb`] (fed by [`Daemon::run_balancer`],
//! written whole again on the resync).
//!
//! The mesh and key-rotation wiring (this host's record, the follower's
//! host records to the tunnel, `rotate-key`, the peers for the API) is in
//! [`mesh`] (`daemon/mesh.rs`).

mod firewall;
mod mesh;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ipnetwork::Ipv4Network;
use weft_api::{ApiError, Status};
use weft_ipam::{HostBlock, Ipam};
use weft_model::{EndpointRecord, HostId};
use weft_store::{DynStore, StoreError};

use crate::config::Config;
use crate::counters::NetdMetrics;
use crate::enforce::Enforcer;
use crate::health::StoreHealth;
use crate::host::{HostNet, Link};
use crate::mesh::{HostRecord, Peer};
use crate::nat::{Iptables, NatSpec, PublishedPort};
use crate::tunnel::{Tunnel, TunnelSpec};

pub struct Daemon {
    cfg: Config,
    host_id: HostId,
    store: DynStore,
    pub(crate) ipam: Ipam,
    block: HostBlock,
    mtu: u32,
    net: HostNet,
    nat: Arc<Iptables>,
    /// Whether the store is up: every store outcome goes here.
    health: StoreHealth,
    /// Serialises endpoint changes and the NAT reconcile that follows each.
    pub(crate) lock: tokio::sync::Mutex<()>,
    /// This host's endpoints in memory and the queue of changes to them.
    pub(crate) endpoints: crate::endpoints::Local,
    /// The underlay interface and address; re-detected while running, so a
    /// host whose address changes (roaming) updates its record in place.
    underlay: std::sync::Mutex<(Link, Ipv4Addr)>,
    /// The record this host publishes; the registration follows changes.
    record: tokio::sync::watch::Sender<Option<HostRecord>>,
    /// The host records last seen in the store, and the peers made of them.
    /// The lock also serialises data-plane changes.
    /// The host records the mesh follower last handed over (`None` until
    /// the first listing: nothing is applied before it, so a netd starting
    /// while the store is down keeps the routes it finds).
    mesh: tokio::sync::Mutex<Option<BTreeMap<String, HostRecord>>>,
    /// The hosts last left out of the mesh (logged when this changes).
    left_out: std::sync::Mutex<Vec<String>>,
    peers: std::sync::Mutex<Vec<Peer>>,
    /// The tunnel driver of the configured backend.
    tunnel: Tunnel,
    /// Counters netd keeps itself (store errors, reconcile runs).
    counters: NetdMetrics,
    /// weft's nf_tables tables: policy and anti-spoofing.
    enforcer: Arc<Enforcer>,
    /// Service records and VIPs ([`crate::services`]).
    services: Arc<crate::services::Services>,
    /// The VIPs' load balancing (`table ip weft_svc`, through the
    /// enforcer's nf_tables handle).
    balancer: Arc<crate::services::lb::Balancer>,
}

impl Daemon {
    /// Opens the store, leases this host's block, sets up the host and
    /// reconciles NAT with the endpoints recorded for this host.
    pub async fn start(cfg: Config) -> anyhow::Result<Arc<Daemon>> {
        let host_id = crate::config::host_id(&cfg).with_context(|| {
            format!(
                "reading or creating the host id in {}",
                cfg.state_dir.display()
            )
        })?;
        let host_id = HostId::new(host_id)
            .context("the host id (set host_id, or remove the host-id file in the state dir)")?;
        if let weft_store::StoreConfig::Sqlite { path } = &cfg.store {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating the store directory {}", dir.display()))?;
            }
        }
        let store = weft_store::open(&cfg.store)
            .await
            .context("opening the store")?;
        let ipam = Ipam::new(store.clone(), cfg.ipam.clone(), cfg.keys.root())
            .await
            .context("checking the address plan")?;
        let block = ipam
            .lease_block(&host_id)
            .await
            .with_context(|| format!("leasing a block for host {host_id}"))?;
        tracing::info!(host = %host_id, block = %block.block, store = %store.describe(), "block leased");

        let net = HostNet::connect().context("opening netlink")?;
        let (underlay_link, underlay) = net
            .underlay(cfg.mesh.underlay_addr)
            .await
            .context("finding the underlay interface")?
            .ok_or_else(|| match cfg.mesh.underlay_addr {
                Some(a) => {
                    anyhow::anyhow!("no interface holds the configured underlay address {a}")
                }
                None => anyhow::anyhow!(
                    "no default route with an IPv4 address to find the underlay from: \
                     set --underlay-addr (WEFT_UNDERLAY_ADDR)"
                ),
            })?;
        let mtu = cfg
            .mtu
            .unwrap_or_else(|| crate::tunnel::overlay_mtu(cfg.mesh.backend, underlay_link.mtu));
        tracing::info!(
            underlay = %underlay, interface = %underlay_link.name, underlay_mtu = underlay_link.mtu,
            backend = cfg.mesh.backend.as_str(), overlay_mtu = mtu, "underlay and MTU"
        );
        // The cluster and service ranges must not share an address with the
        // underlay's subnets (routes to containers or VIPs would shadow the
        // hosts' own network).
        let subnets = net
            .addresses(underlay_link.index)
            .await
            .context("reading the underlay's addresses")?;
        let what = format!("the underlay subnet of {}", underlay_link.name);
        cfg.ipam
            .check_no_overlap(subnets.iter().map(|n| (what.as_str(), *n)))
            .context("checking the address plan against the underlay")?;
        let nat = match cfg.iptables {
            Some(backend) => Iptables::with_backend(backend),
            None => tokio::task::spawn_blocking(Iptables::detect)
                .await
                .context("detecting the iptables backend")??,
        };
        let tunnel = Tunnel::start(&TunnelSpec {
            backend: cfg.mesh.backend,
            state_dir: &cfg.state_dir,
            wg_port: cfg.mesh.wg_port,
            wg_queues: cfg.mesh.wg_queues,
            vxlan_port: cfg.mesh.vxlan_port,
            vni: cfg.mesh.vni,
            vtep_mac: crate::mesh::vtep_mac(&host_id),
            mtu,
        })?;
        let counters = NetdMetrics::default();
        let enforcer = Arc::new(Enforcer::new(
            crate::nft::Nft::new(),
            &host_id,
            cfg.ipam.cluster_range,
            block.block,
            &cfg.state_dir,
        ));
        let health = StoreHealth::new(store.describe(), counters.store_errors.clone());
        let services = Arc::new(crate::services::Services::new(
            crate::services::Registry::new(store.clone(), cfg.keys.clone(), cfg.ipam.service_range),
            host_id.to_string(),
            cfg.services.grace,
        ));
        let balancer = Arc::new(crate::services::lb::Balancer::new(
            enforcer.nft().clone(),
            crate::conntrack::Conntrack::default(),
            cfg.keys.clone(),
            cfg.ipam.service_range,
        ));
        let daemon = Arc::new(Daemon {
            cfg,
            host_id,
            store,
            ipam,
            block,
            mtu,
            net,
            nat: Arc::new(nat),
            health,
            lock: tokio::sync::Mutex::new(()),
            endpoints: crate::endpoints::Local::default(),
            underlay: std::sync::Mutex::new((underlay_link, underlay)),
            record: tokio::sync::watch::Sender::new(None),
            mesh: tokio::sync::Mutex::new(None),
            left_out: std::sync::Mutex::new(Vec::new()),
            peers: std::sync::Mutex::new(Vec::new()),
            tunnel,
            counters,
            enforcer,
            services,
            balancer,
        });
        daemon.reconcile().await?;
        Ok(daemon)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    pub fn block(&self) -> &HostBlock {
        &self.block
    }

    pub fn store(&self) -> &DynStore {
        &self.store
    }

    /// netd's own counters.
    pub fn counters(&self) -> &NetdMetrics {
        &self.counters
    }

    /// Whether the store is up.
    pub fn health(&self) -> &StoreHealth {
        &self.health
    }

    /// The netlink handle of the host.
    pub fn net(&self) -> &HostNet {
        &self.net
    }

    /// The tunnel driver.
    pub fn tunnel(&self) -> &Tunnel {
        &self.tunnel
    }

    /// Service records and VIPs.
    pub fn services(&self) -> &Arc<crate::services::Services> {
        &self.services
    }

    /// Policy and anti-spoofing enforcement (its nf_tables handle reads the
    /// counters).
    pub fn enforcer(&self) -> &Enforcer {
        &self.enforcer
    }

    /// The overlay MTU in use.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Brings the kernel in line with what it should be: bridge, addresses,
    /// sysctls, iptables. Cheap when nothing changed.
    pub async fn reconcile(&self) -> anyhow::Result<()> {
        let result = self.reconcile_once().await;
        self.counters.reconciled("host", result.is_ok());
        result
    }

    async fn reconcile_once(&self) -> anyhow::Result<()> {
        let _guard = self.lock.lock().await;
        self.reconcile_host().await?;
        let endpoints = self
            .reload_endpoints()
            .await
            .context("reading this host's endpoints")?;
        self.apply_nat(&endpoints).await?;
        Ok(())
    }

    async fn reconcile_host(&self) -> anyhow::Result<()> {
        let bridge = self.net.ensure_bridge(&self.cfg.bridge, self.mtu).await?;
        let gateway = Ipv4Network::new(self.block.gateway, self.block.block.prefix())?;
        let dns = Ipv4Network::new(self.cfg.dns_addr, 32)?;
        let owned = [self.cfg.ipam.cluster_range, dns];
        self.net
            .ensure_addresses(&bridge, &[gateway, dns], &owned)
            .await?;
        let mut sysctls = vec![
            ("net/ipv4/ip_forward".to_owned(), "1".to_owned()),
            // Loose reverse-path filtering at least on the bridge: the
            // kernel uses the larger of `all` and the device's value.
            (
                format!("net/ipv4/conf/{}/rp_filter", self.cfg.bridge),
                "2".to_owned(),
            ),
        ];
        sysctls.extend(crate::nat::required_sysctls(&self.nat_spec(&[])));
        crate::enforce::load_bridge_netfilter()?;
        let (path, value) = crate::enforce::BRIDGE_NF_SYSCTL;
        sysctls.push((path.to_owned(), value.to_owned()));
        for (path, value) in sysctls {
            crate::host::ensure_sysctl(&path, &value)?;
        }
        Ok(())
    }

    fn nat_spec(&self, endpoints: &[EndpointRecord]) -> NatSpec {
        let mut ports = Vec::new();
        for ep in endpoints {
            for m in &ep.port_mappings {
                ports.push(PublishedPort {
                    container: ep.address.ip(),
                    mapping: m.clone(),
                });
            }
        }
        NatSpec {
            cluster_range: self.cfg.ipam.cluster_range,
            block: self.block.block,
            bridge: self.cfg.bridge.clone(),
            dns_addr: self.cfg.dns_addr,
            service_range: self.cfg.ipam.service_range,
            ports,
        }
    }

    pub(crate) async fn apply_nat(&self, endpoints: &[EndpointRecord]) -> anyhow::Result<()> {
        let spec = self.nat_spec(endpoints);
        let nat = self.nat.clone();
        tokio::task::spawn_blocking(move || nat.apply(&spec))
            .await
            .context("iptables task")??;
        Ok(())
    }

    /// Enforces policy and anti-spoofing for `local`, this host's endpoint
    /// records as just read or written (call under [`Daemon::lock`], before
    /// answering the plugin). An add or delete changes only elements of the
    /// tables the kernel has: one small transaction ([`crate::nft::Nft::apply`]).
    pub async fn enforce_local(&self, local: Vec<EndpointRecord>) -> anyhow::Result<()> {
        let took = self.enforcer.set_local(&self.cfg.keys, local).await?;
        self.counters.policy_applied(took);
        Ok(())
    }

    /// Follows the policy and every endpoint record until `stop` fires,
    /// enforcing each change ([`crate::enforce::follow`]).
    pub async fn run_policy(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        crate::enforce::follow(
            self.enforcer.clone(),
            self.store.clone(),
            self.cfg.keys.clone(),
            stop,
            move |took| me.counters.policy_applied(Some(took)),
        )
        .await;
    }

    /// Follows the service, endpoint and health records until `stop`
    /// fires, balancing each VIP over its healthy backends
    /// ([`crate::services::lb::follow`]).
    pub async fn run_balancer(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        crate::services::lb::follow(
            self.balancer.clone(),
            self.store.clone(),
            self.cfg.keys.clone(),
            stop,
            |_| {},
        )
        .await;
    }

    /// Probes this host's containers whose service has a health check and
    /// records their health until `stop` fires
    /// ([`crate::services::health::run`]).
    pub async fn run_health(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        crate::services::health::run(
            self.store.clone(),
            self.cfg.keys.clone(),
            self.host_id.to_string(),
            self.counters.health.clone(),
            stop,
        )
        .await;
    }

    pub(crate) fn note_store<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        self.health.observe(r)
    }

    pub async fn status(&self) -> Result<Status, ApiError> {
        let endpoints = self.endpoint_records().await.map(|e| e.len()).unwrap_or(0);
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            host_id: self.host_id.to_string(),
            block: self.block.block,
            gateway: self.block.gateway,
            bridge: self.cfg.bridge.clone(),
            mtu: self.mtu,
            cluster_range: self.cfg.ipam.cluster_range,
            store: self.store.describe(),
            store_ok: self.health.up(),
            endpoints,
            capacity: weft_ipam::plan::capacity(self.block.block),
            iptables: format!("{:?}", self.nat.backend()).to_lowercase(),
        })
    }

    /// Renews the block lease and reconciles the kernel until `stop` fires.
    pub async fn maintain(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let renew_every =
            (self.cfg.ipam.block_grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut renew = tokio::time::interval(renew_every);
        let mut reconcile = tokio::time::interval(Duration::from_secs(30));
        let mut underlay = tokio::time::interval(Duration::from_secs(2));
        let mut probe = tokio::time::interval(crate::health::PROBE_EVERY);
        let mut firewall = tokio::time::interval(crate::firewall::CHECK_EVERY);
        let mut firewall_watch = crate::firewall::Watch::default();
        firewall.tick().await;
        renew.tick().await;
        reconcile.tick().await;
        underlay.tick().await;
        probe.tick().await;
        let host_key = self.cfg.keys.host(&self.host_id);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = renew.tick() => {
                    match self.ipam.renew_block(&self.block).await {
                        Ok(()) => self.health.answered(),
                        Err(e) => {
                            self.health.failed(e.is_transient(), &e);
                            tracing::warn!(error = %e, "renewing the block lease failed");
                        }
                    }
                }
                _ = probe.tick() => self.health.probe(&self.store, &host_key).await,
                _ = firewall.tick() => self.check_firewall(&mut firewall_watch).await,
                _ = underlay.tick() => {
                    if let Err(e) = self.check_underlay().await {
                        tracing::warn!(error = %format!("{e:#}"), "checking the underlay address failed");
                    }
                }
                _ = reconcile.tick() => {
                    // Someone may have flushed the rules behind our back:
                    // compare with the kernel, not with what we applied last.
                    self.nat.invalidate();
                    if let Err(e) = self.reconcile().await {
                        tracing::warn!(error = %format!("{e:#}"), "reconcile failed");
                    }
                    if let Err(e) = self.apply_mesh(None, true).await {
                        tracing::warn!(error = %format!("{e:#}"), "reconciling the tunnel peers failed");
                    }
                    match self.enforcer.reapply().await {
                        Ok(took) => self.counters.policy_applied(took),
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "re-applying the policy failed"),
                    }
                    // After the enforcer's resync forgot what the kernel
                    // has: the services' table is written whole too.
                    if let Err(e) = self.balancer.reapply().await {
                        tracing::warn!(error = %format!("{e:#}"), "re-applying the services' table failed");
                    }
                    // What a burst of hosts (or this resync's dumps) freed
                    // leaves the RSS.
                    weft_sys::memory::release_free_memory();
                }
            }
        }
    }
}
