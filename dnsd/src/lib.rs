//! weft's service-discovery DNS server (see DESIGN.md, "Names").
//!
//! dnsd answers, on 169.254.169.250:53 (UDP and TCP), the names of the
//! containers whose endpoints netd records in the store, and forwards every
//! other name to the host's upstream resolvers, with a cache. The `dnsd`
//! binary runs it ([`DnsServer::start`] / [`serve`]); netd starts that
//! binary as its child with the command line [`cli::DnsdArgs`] defines.
//!
//! ```no_run
//! # async fn run(store: weft_store::DynStore) -> Result<(), weft_dnsd::DnsError> {
//! use weft_dnsd::{DnsConfig, DnsServer};
//! let server = DnsServer::start(DnsConfig::default(), store).await?;
//! // ... until shutdown:
//! server.stop().await;
//! # Ok(()) }
//! ```
//!
//! Pieces:
//! * [`wire`]: parsing queries and writing answers by hand, no allocation.
//! * [`table`]: every name with its answer records in wire form, built from
//!   the endpoints, services (VIPs) and health records and swapped in
//!   atomically on every change.
//! * [`answer`]: one query against the table (the fast path).
//! * `server`: UDP threads with SO_REUSEPORT sockets and recvmmsg/sendmmsg
//!   batches.
//! * `tcp`: DNS over TCP on hickory-server, answered by the same code.
//! * [`forward`]: other names to the upstreams, cached, with failover.
//! * [`resolv`]: the upstreams from the host's resolv.conf, re-read on change.
//! * [`metrics`]: the counters as OpenMetrics text, the binary's `/metrics`.
//! * [`cli`]: the binary's flags, parsed by it and written by netd.
//! * `sync`: list-then-watch of the store's endpoints, service records and
//!   health records, with backoff.

pub mod answer;
pub mod cli;
pub mod counters;
pub mod forward;
pub mod metrics;
pub mod resolv;
mod server;
mod sync;
pub mod table;
mod tcp;
pub mod wire;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnetwork::{IpNetwork, Ipv4Network};
use weft_store::DynStore;

pub use answer::{Acl, Action};
pub use counters::{HistogramSnapshot, Path as AnswerPath, QueryCounters};
pub use forward::{ForwardStats, Forwarder};
pub use server::Stats;
pub use table::{Table, TableConfig};

use crate::server::Ctx;

/// The default cluster domain.
pub use weft_model::DEFAULT_DOMAIN;
/// The default TTL of dnsd's answers.
pub const DEFAULT_TTL: Duration = Duration::from_secs(1);
/// Where dnsd listens by default: the service address every container
/// resolves through, port 53.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(weft_model::DNS_ADDR), 53);
/// The host's resolv.conf, where the upstream resolvers are.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
/// How long to wait for one upstream before trying the next.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// The upstreams' port (resolv.conf cannot name another).
pub const DEFAULT_UPSTREAM_PORT: u16 = 53;
/// The TCP limit ([`DnsConfig::max_tcp_connections`]).
pub const DEFAULT_MAX_TCP_CONNECTIONS: usize = 256;
/// An idle TCP connection is closed after this long.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// UDP threads per listen address (0: one per core, at most 4).
pub const DEFAULT_UDP_THREADS: usize = 0;
/// Forwarded answers cached at most.
pub const DEFAULT_CACHE_SIZE: usize = 10_000;
/// How long starting waits for the first table from the store.
pub const DEFAULT_INITIAL_SYNC_TIMEOUT: Duration = Duration::from_secs(2);

/// How dnsd runs.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The cluster domain (`weft.internal`).
    pub domain: String,
    /// TTL of answers from the table (whole seconds), and the SOA minimum,
    /// so negative answers are cached no longer.
    pub ttl: Duration,
    /// Where to listen, UDP and TCP (default `169.254.169.250:53`). Port 0
    /// picks a free port (see [`DnsServer::local_addrs`]).
    pub listen: Vec<SocketAddr>,
    /// The host's resolv.conf: the upstream resolvers.
    pub resolv_conf: PathBuf,
    /// The store key layout netd uses (dnsd reads the endpoints, service
    /// records and health records: [`weft_model::Keys::endpoints`],
    /// [`weft_model::Keys::services`], [`weft_model::Keys::health`]).
    pub keys: weft_model::Keys,
    /// The cluster range: PTR answers for these addresses, and these
    /// clients may have other names forwarded.
    pub cluster_range: Ipv4Network,
    /// The service range (the VIPs): PTR answers for these addresses too.
    pub service_range: Ipv4Network,
    /// How long to wait for one upstream before trying the next.
    pub upstream_timeout: Duration,
    /// The port of the resolv.conf nameservers: 53 (resolv.conf cannot say
    /// otherwise); tests point it at unprivileged fake upstreams.
    pub upstream_port: u16,
    /// TCP queries being answered at once, at most; more are answered
    /// REFUSED. (hickory-server, which serves TCP, answers a connection's
    /// queries one at a time and has no limit on open connections.)
    pub max_tcp_connections: usize,
    /// A TCP connection with no complete query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// UDP threads per listen address (0: one per core, at most 4).
    pub udp_threads: usize,
    /// Forwarded answers cached at most.
    pub cache_size: usize,
    /// More clients (besides the cluster range and loopback) that may have
    /// names outside the domain forwarded. Everybody who can reach the
    /// listener gets the cluster's own names.
    pub recursion_clients: Vec<IpNetwork>,
    /// How long [`DnsServer::start`] waits for the first table from the
    /// store before it returns anyway (the table then fills in later).
    pub initial_sync_timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            domain: DEFAULT_DOMAIN.into(),
            ttl: DEFAULT_TTL,
            listen: vec![DEFAULT_LISTEN],
            resolv_conf: PathBuf::from(DEFAULT_RESOLV_CONF),
            keys: weft_model::Keys::default(),
            cluster_range: weft_model::DEFAULT_CLUSTER_RANGE,
            service_range: weft_model::DEFAULT_SERVICE_RANGE,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            upstream_port: DEFAULT_UPSTREAM_PORT,
            max_tcp_connections: DEFAULT_MAX_TCP_CONNECTIONS,
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
            udp_threads: DEFAULT_UDP_THREADS,
            cache_size: DEFAULT_CACHE_SIZE,
            recursion_clients: Vec::new(),
            initial_sync_timeout: DEFAULT_INITIAL_SYNC_TIMEOUT,
        }
    }
}

impl DnsConfig {
    /// Checks the settings; the first problem found.
    pub fn validate(&self) -> Result<(), DnsError> {
        let invalid = |setting: &'static str, why: String| Err(DnsError::Config { setting, why });
        let domain = self.domain.trim_end_matches('.');
        if domain.is_empty() || wire::name_from_str(domain).is_none() {
            return invalid("domain", format!("{:?} is not a DNS name", self.domain));
        }
        if self.listen.is_empty() {
            return invalid("listen", "no listen address".into());
        }
        if let Some(a) = self.listen.iter().find(|a| a.ip().is_unspecified()) {
            return invalid(
                "listen",
                format!("{a}: dnsd listens on given addresses only (it is not an open resolver)"),
            );
        }
        if self.ttl.as_secs() > u32::MAX as u64 {
            return invalid("ttl", format!("{:?} is too long", self.ttl));
        }
        if self.max_tcp_connections == 0 {
            return invalid("max_tcp_connections", "must be at least 1".into());
        }
        if self.upstream_timeout.is_zero() || self.tcp_idle_timeout.is_zero() {
            return invalid(
                "timeouts",
                "upstream and TCP idle timeouts must be above zero".into(),
            );
        }
        Ok(())
    }

    fn table_config(&self) -> TableConfig {
        TableConfig {
            domain: self.domain.trim_end_matches('.').to_ascii_lowercase(),
            ttl: self.ttl.as_secs() as u32,
            cluster_range: self.cluster_range,
            service_range: self.service_range,
        }
    }

    fn acl(&self) -> Acl {
        let mut nets = vec![
            IpNetwork::V4(self.cluster_range),
            IpNetwork::V4(Ipv4Network::from(Ipv4Addr::LOCALHOST)),
        ];
        if let Ok(lo) = "127.0.0.0/8".parse() {
            nets.push(lo);
        }
        if let Ok(lo6) = "::1/128".parse() {
            nets.push(lo6);
        }
        nets.extend(self.recursion_clients.iter().copied());
        Acl::new(nets)
    }

    fn threads(&self) -> usize {
        if self.udp_threads > 0 {
            return self.udp_threads;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4)
    }
}

/// What can stop dnsd from starting.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid DNS setting {setting}: {why}")]
    Config { setting: &'static str, why: String },
    /// A listen address cannot be bound (not on any interface yet, port in
    /// use, no permission for port 53).
    #[error("cannot listen on {addr} ({proto}): {source}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start a DNS thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A running dnsd. Dropping it stops it too (without waiting).
pub struct DnsServer {
    ctx: Arc<Ctx>,
    local_addrs: Vec<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl DnsServer {
    /// Binds every listen address (UDP and TCP), reads the upstreams, starts
    /// the store sync, waits (up to `initial_sync_timeout`) for the first
    /// table and only then answers (queries that arrive meanwhile wait in
    /// the sockets' queues). Needs a tokio runtime. If the store is down,
    /// dnsd starts with an empty table and fills it when the store returns.
    pub async fn start(cfg: DnsConfig, store: DynStore) -> Result<DnsServer, DnsError> {
        cfg.validate()?;
        let table_cfg = cfg.table_config();
        let table = Arc::new(ArcSwap::from_pointee(Table::empty(&table_cfg)));
        let fwd = Arc::new(Forwarder::new(
            cfg.upstream_timeout,
            cfg.cache_size,
            cfg.upstream_port,
        ));
        let ctx = Arc::new(Ctx {
            table: table.clone(),
            fwd: fwd.clone(),
            acl: cfg.acl(),
            stop: Default::default(),
            rt: tokio::runtime::Handle::current(),
            stats: Stats::default(),
            tcp_idle: cfg.tcp_idle_timeout,
            max_tcp: cfg.max_tcp_connections,
        });

        // Bind everything before starting anything.
        let threads_per_addr = cfg.threads();
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        let mut local_addrs = Vec::new();
        for &addr in &cfg.listen {
            let bind_err = |proto, source| DnsError::Bind {
                addr,
                proto,
                source,
            };
            let first = server::bind_udp(addr).map_err(|e| bind_err("udp", e))?;
            let bound = first.local_addr().map_err(|e| bind_err("udp", e))?;
            udp.push(first);
            for _ in 1..threads_per_addr {
                udp.push(server::bind_udp(bound).map_err(|e| bind_err("udp", e))?);
            }
            tcp.push(tcp::bind(bound).map_err(|e| bind_err("tcp", e))?);
            local_addrs.push(bound);
        }

        let resolv_version = resolv::load(&cfg.resolv_conf, &local_addrs, &fwd);
        let mut server = DnsServer {
            ctx: ctx.clone(),
            local_addrs: local_addrs.clone(),
            tasks: Vec::new(),
            threads: Vec::new(),
        };
        server.tasks.push(tokio::spawn(resolv::watch(
            cfg.resolv_conf.clone(),
            local_addrs.clone(),
            fwd.clone(),
            resolv_version,
        )));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let sync = sync::Sync {
            store,
            keys: cfg.keys.clone(),
            table_cfg,
            table,
        };
        server.tasks.push(tokio::spawn(sync.run(Some(ready_tx))));
        // Answer only once the first table is in: a dnsd started while
        // another one serves the same addresses (SO_REUSEPORT, a restart
        // with overlap) must not answer NXDOMAIN from an empty table. What
        // reaches the bound sockets meanwhile waits in their queues.
        if tokio::time::timeout(cfg.initial_sync_timeout, ready_rx)
            .await
            .is_err()
        {
            tracing::warn!(
                "no endpoints from the store yet; serving an empty table until it answers"
            );
        }
        server
            .tasks
            .push(tokio::spawn(tcp::serve(tcp, ctx.clone())));
        for (i, sock) in udp.into_iter().enumerate() {
            let sock = Arc::new(sock);
            let ctx = ctx.clone();
            let t = std::thread::Builder::new()
                .name(format!("dnsd-udp-{i}"))
                .spawn(move || server::udp_loop(sock, ctx))
                .map_err(DnsError::Thread)?;
            server.threads.push(t);
        }
        tracing::info!(listen = ?local_addrs, domain = %cfg.domain, "dnsd serving");
        Ok(server)
    }

    /// The addresses listened on (ports resolved when 0 was asked for).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The table now in use.
    pub fn table(&self) -> Arc<Table> {
        self.ctx.table.load_full()
    }

    /// Counters of the listeners.
    pub fn stats(&self) -> &Stats {
        &self.ctx.stats
    }

    /// Counters of the forwarding path.
    pub fn forward_stats(&self) -> &ForwardStats {
        &self.ctx.fwd.stats
    }

    /// A handle on the counters that outlives a borrow of the server (for
    /// a metrics exporter that reads them at scrape time).
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.ctx.clone())
    }

    /// Stops listening and waits for the UDP threads to end.
    pub async fn stop(mut self) {
        self.signal_stop();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        tracing::info!("dnsd stopped");
    }

    fn signal_stop(&mut self) {
        self.ctx.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// The counters of a running (or stopped) [`DnsServer`]; cheap to clone.
#[derive(Clone)]
pub struct StatsHandle(Arc<Ctx>);

impl std::fmt::Debug for StatsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsHandle").finish_non_exhaustive()
    }
}

impl StatsHandle {
    /// Counters of the listeners.
    pub fn stats(&self) -> &Stats {
        &self.0.stats
    }

    /// Counters of the forwarding path.
    pub fn forward_stats(&self) -> &ForwardStats {
        &self.0.fwd.stats
    }

    /// Answers in the forwarding cache.
    pub fn cache_len(&self) -> usize {
        self.0.fwd.cache_len()
    }

    /// Names in the table now.
    pub fn table(&self) -> Arc<Table> {
        self.0.table.load_full()
    }
}

/// Runs dnsd until `shutdown` completes.
pub async fn serve(
    cfg: DnsConfig,
    store: DynStore,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DnsError> {
    let server = DnsServer::start(cfg, store).await?;
    shutdown.await;
    server.stop().await;
    Ok(())
}
