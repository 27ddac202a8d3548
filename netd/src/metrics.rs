//! Prometheus metrics and health checks, over plain HTTP on a TCP address
//! (`--metrics-addr`, off by default):
//!
//! * `GET /metrics`: OpenMetrics text (prometheus-client). The tunnel, DNS
//!   and link counters are read at scrape time from where they live (the
//!   WireGuard data path, dnsd, the kernel); netd's own counters (store
//!   errors, reconcile runs) are kept in [`NetdMetrics`].
//! * `GET /healthz`: 200 while the process serves.
//! * `GET /readyz`: 200 when the store answers and the data path (bridge and
//!   tunnel device) is up; 503 with the reasons otherwise.
//!
//! The metric names are listed in README.md ("Deploy").

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::daemon::{Daemon, VXLAN_DEVICE, WG_DEVICE};
use crate::host::LinkStats;
use crate::mesh::TunnelBackend;

/// A WireGuard peer without a handshake for this long is down (the
/// protocol's REJECT_AFTER_TIME: its session no longer carries data).
pub const PEER_DOWN_AFTER: Duration = Duration::from_secs(180);
/// How long a scrape or readiness check waits for the store.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The label of the reconcile counters: `host` (bridge, addresses,
/// sysctls, iptables) or `mesh` (tunnel device, peers, routes).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Counters netd keeps itself.
#[derive(Debug)]
pub struct NetdMetrics {
    /// Store operations that failed (endpoint reads and writes, block
    /// renewals).
    pub store_errors: Counter,
    pub reconcile_runs: Family<KindLabel, Counter>,
    pub reconcile_failures: Family<KindLabel, Counter>,
}

impl Default for NetdMetrics {
    fn default() -> Self {
        let m = NetdMetrics {
            store_errors: Counter::default(),
            reconcile_runs: Family::default(),
            reconcile_failures: Family::default(),
        };
        // Both kinds show from the start, at zero.
        for kind in ["host", "mesh"] {
            let l = KindLabel { kind };
            drop(m.reconcile_runs.get_or_create(&l));
            drop(m.reconcile_failures.get_or_create(&l));
        }
        m
    }
}

impl NetdMetrics {
    /// Counts one reconcile run of `kind`.
    pub fn reconciled(&self, kind: &'static str, ok: bool) {
        let l = KindLabel { kind };
        self.reconcile_runs.get_or_create(&l).inc();
        if !ok {
            self.reconcile_failures.get_or_create(&l).inc();
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "weft_store_errors",
            "Store operations that failed",
            self.store_errors.clone(),
        );
        r.register(
            "weft_reconcile_runs",
            "Reconcile runs, by kind (host: bridge, sysctls, iptables; mesh: tunnel peers and routes)",
            self.reconcile_runs.clone(),
        );
        r.register(
            "weft_reconcile_failures",
            "Reconcile runs that failed, by kind",
            self.reconcile_failures.clone(),
        );
    }
}

/// What a scrape reads asynchronously before encoding.
#[derive(Debug, Default, Clone)]
struct Snapshot {
    /// This host's endpoints (`None`: the store did not answer).
    endpoints: Option<usize>,
    /// Kernel counters of weft's devices, by name.
    links: Vec<(String, LinkStats)>,
}

/// Everything the HTTP handlers need.
#[derive(Clone)]
pub struct MetricsState {
    daemon: Arc<Daemon>,
    registry: Arc<Registry>,
    snapshot: Arc<Mutex<Snapshot>>,
}

impl MetricsState {
    /// The registry with netd's counters and the scrape-time collector
    /// (with dnsd's counters when DNS runs).
    pub fn new(daemon: Arc<Daemon>, dns: Option<weft_dnsd::StatsHandle>) -> MetricsState {
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        let mut registry = Registry::default();
        daemon.metrics().register(&mut registry);
        registry.register_collector(Box::new(Live {
            daemon: daemon.clone(),
            dns,
            snapshot: snapshot.clone(),
        }));
        MetricsState {
            daemon,
            registry: Arc::new(registry),
            snapshot,
        }
    }

    /// The exposition text, read now.
    pub async fn render(&self) -> Result<String, fmt::Error> {
        self.refresh().await;
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    async fn refresh(&self) {
        let d = &self.daemon;
        let endpoints = match tokio::time::timeout(STORE_TIMEOUT, d.own_endpoints()).await {
            Ok(Ok(eps)) => Some(eps.len()),
            _ => None,
        };
        let mut links = Vec::new();
        for dev in [d.config().bridge.as_str(), tunnel_device(d)] {
            match d.net().link_stats(dev).await {
                Ok(Some(s)) => links.push((dev.to_owned(), s)),
                Ok(None) => {}
                Err(e) => tracing::debug!(device = dev, error = %e, "reading link counters failed"),
            }
        }
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Snapshot { endpoints, links };
    }
}

fn tunnel_device(d: &Daemon) -> &'static str {
    match d.config().mesh.backend {
        TunnelBackend::Wireguard => WG_DEVICE,
        TunnelBackend::Vxlan => VXLAN_DEVICE,
    }
}

/// The result of the readiness checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub store: Result<(), String>,
    pub datapath: Result<(), String>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.store.is_ok() && self.datapath.is_ok()
    }
}

/// Is the store reachable, and is the data path (bridge, tunnel device)
/// up?
pub async fn readiness(d: &Daemon) -> Readiness {
    let key = d.config().keys.host(d.host_id());
    let store = match tokio::time::timeout(STORE_TIMEOUT, d.store().get(&key)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("{}: {e}", d.store().describe())),
        Err(_) => Err(format!(
            "{}: no answer within {STORE_TIMEOUT:?}",
            d.store().describe()
        )),
    };
    let mut problems = Vec::new();
    for dev in [d.config().bridge.as_str(), tunnel_device(d)] {
        match d.net().link(dev).await {
            Ok(Some(l)) if l.up => {}
            Ok(Some(_)) => problems.push(format!("{dev} is down")),
            Ok(None) => problems.push(format!("{dev} does not exist")),
            Err(e) => problems.push(format!("{dev}: {e}")),
        }
    }
    if d.config().mesh.backend == TunnelBackend::Wireguard && d.wg().is_none() {
        problems.push("the WireGuard data path is not running".into());
    }
    let datapath = if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    };
    Readiness { store, datapath }
}

/// The HTTP routes.
pub fn router(state: MetricsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz or /readyz\n",
            )
        })
        .with_state(state)
}

/// Binds `addr` and serves until `stop` turns true.
pub async fn serve(
    addr: std::net::SocketAddr,
    state: MetricsState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok(tokio::spawn(async move {
        let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        if let Err(e) = server.await {
            tracing::error!(error = %e, "the metrics server failed");
        }
    }))
}

async fn metrics(State(s): State<MetricsState>) -> Response {
    match s.render().await {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

async fn readyz(State(s): State<MetricsState>) -> Response {
    let r = readiness(&s.daemon).await;
    let line = |what: &str, res: &Result<(), String>| match res {
        Ok(()) => format!("{what}: ok\n"),
        Err(e) => format!("{what}: {e}\n"),
    };
    let body = format!(
        "{}\n{}{}",
        if r.ready() { "ready" } else { "not ready" },
        line("store", &r.store),
        line("datapath", &r.datapath)
    );
    let status = if r.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body).into_response()
}

/// The collector that reads everything else at scrape time.
struct Live {
    daemon: Arc<Daemon>,
    dns: Option<weft_dnsd::StatsHandle>,
    snapshot: Arc<Mutex<Snapshot>>,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live")
            .field("host", &self.daemon.host_id())
            .finish_non_exhaustive()
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counters(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauges(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, f64)],
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn l1(k: &'static str, v: impl Into<String>) -> Labels {
    vec![(k, v.into())]
}

fn l2(k1: &'static str, v1: impl Into<String>, k2: &'static str, v2: impl Into<String>) -> Labels {
    vec![(k1, v1.into()), (k2, v2.into())]
}

impl Collector for Live {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snap = self
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.encode_host(&mut e, &snap)?;
        self.encode_peers(&mut e)?;
        self.encode_links(&mut e, &snap)?;
        if let Some(dns) = &self.dns {
            encode_dns(&mut e, dns)?;
        }
        Ok(())
    }
}

impl Live {
    fn encode_host(&self, e: &mut DescriptorEncoder, snap: &Snapshot) -> fmt::Result {
        let d = &self.daemon;
        let block = d.block().block;
        gauges(
            e,
            "weft_host_info",
            "This host: id, block, backend and version (always 1)",
            &[(
                vec![
                    ("host", d.host_id().to_owned()),
                    ("block", block.to_string()),
                    ("backend", d.config().mesh.backend.as_str().to_owned()),
                    ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ],
                1.0,
            )],
        )?;
        gauge(
            e,
            "weft_store_up",
            "Whether the store answered the last request (1) or not (0)",
            if snap.endpoints.is_some() { 1.0 } else { 0.0 },
        )?;
        if let Some(n) = snap.endpoints {
            gauge(
                e,
                "weft_endpoints",
                "Endpoints (container interfaces) on this host",
                n as f64,
            )?;
            gauge(
                e,
                "weft_block_used_addresses",
                "Addresses of this host's block in use by endpoints",
                n as f64,
            )?;
        }
        gauge(
            e,
            "weft_block_capacity_addresses",
            "Addresses of this host's block that endpoints can get",
            weft_ipam::plan::capacity(block) as f64,
        )?;
        gauge(e, "weft_mtu_bytes", "The overlay MTU", f64::from(d.mtu()))
    }

    fn encode_peers(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let d = &self.daemon;
        let peers = d.peers();
        let backend = d.config().mesh.backend;
        let stats = d.wg().map(|w| w.stats()).unwrap_or_default();
        let mut up_rows = Vec::new();
        let (mut up, mut down) = (0u64, 0u64);
        let mut age = Vec::new();
        let (mut rx_b, mut tx_b, mut rx_p, mut tx_p) = (vec![], vec![], vec![], vec![]);
        let mut drops = Vec::new();
        let mut hs_errors = Vec::new();
        for p in &peers {
            let s = stats.iter().find(|s| Some(s.public_key) == p.wg_public_key);
            let is_up = match backend {
                // VXLAN has no liveness of its own: a peer is up while its
                // host record is alive in the store.
                TunnelBackend::Vxlan => true,
                TunnelBackend::Wireguard => s
                    .and_then(|s| s.last_handshake)
                    .is_some_and(|a| a < PEER_DOWN_AFTER),
            };
            if is_up {
                up += 1;
            } else {
                down += 1;
            }
            let peer = || p.host_id.clone();
            up_rows.push((l1("peer", peer()), if is_up { 1.0 } else { 0.0 }));
            let Some(s) = s else { continue };
            if let Some(a) = s.last_handshake {
                age.push((l1("peer", peer()), a.as_secs_f64()));
            }
            rx_b.push((l1("peer", peer()), s.rx_bytes));
            tx_b.push((l1("peer", peer()), s.tx_bytes));
            rx_p.push((l1("peer", peer()), s.rx_packets));
            tx_p.push((l1("peer", peer()), s.tx_packets));
            for (reason, v) in [
                ("bad_source", s.drops_bad_source),
                ("decrypt", s.drops_decrypt),
                ("too_big", s.drops_oversize),
                ("tun_write", s.drops_tun_write),
            ] {
                drops.push((l2("peer", peer(), "reason", reason), v));
            }
            hs_errors.push((l1("peer", peer()), s.handshake_errors));
        }
        gauges(
            e,
            "weft_peers",
            "Peer hosts by state (wireguard: up = a handshake within 180 s; vxlan: up = in the mesh)",
            &[
                (l1("state", "up"), up as f64),
                (l1("state", "down"), down as f64),
            ],
        )?;
        gauges(
            e,
            "weft_peer_up",
            "Whether the tunnel to a peer host is up",
            &up_rows,
        )?;
        if d.wg().is_none() {
            return Ok(());
        }
        gauges(
            e,
            "weft_peer_handshake_age_seconds",
            "Time since the last WireGuard handshake with a peer",
            &age,
        )?;
        counters(
            e,
            "weft_peer_rx_bytes",
            "Bytes received from a peer (inner packets, decrypted)",
            &rx_b,
        )?;
        counters(
            e,
            "weft_peer_tx_bytes",
            "Bytes sent to a peer (inner packets, before encryption)",
            &tx_b,
        )?;
        counters(
            e,
            "weft_peer_rx_packets",
            "Packets received from a peer",
            &rx_p,
        )?;
        counters(e, "weft_peer_tx_packets", "Packets sent to a peer", &tx_p)?;
        counters(
            e,
            "weft_peer_drops",
            "Packets from or to a peer dropped, by reason (bad_source: outside the peer's block; decrypt: failed authentication or replay; too_big: over the MTU; tun_write)",
            &drops,
        )?;
        counters(
            e,
            "weft_peer_handshake_errors",
            "Handshake messages from a peer that were rejected",
            &hs_errors,
        )?;
        if let Some(w) = d.wg() {
            let s = w.device_stats();
            counters(
                e,
                "weft_wg_drops",
                "Packets the WireGuard device dropped that belong to no peer, by reason (no_peer: to an address no peer owns; unknown_peer: from an unknown key or index; malformed; non_ipv4; send; tun_read)",
                &[
                    (l1("reason", "no_peer"), s.drops_no_peer),
                    (l1("reason", "unknown_peer"), s.drops_unknown_peer),
                    (l1("reason", "malformed"), s.drops_malformed),
                    (l1("reason", "non_ipv4"), s.drops_non_ipv4),
                    (l1("reason", "send"), s.drops_send),
                    (l1("reason", "tun_read"), s.drops_tun_read),
                ],
            )?;
            counters(
                e,
                "weft_wg_datagrams",
                "UDP datagrams of the WireGuard device, by direction",
                &[
                    (l1("direction", "rx"), s.rx_datagrams),
                    (l1("direction", "tx"), s.tx_datagrams),
                ],
            )?;
            counters(
                e,
                "weft_wg_syscalls",
                "recvmmsg/sendmmsg calls of the WireGuard device, by direction",
                &[
                    (l1("direction", "rx"), s.rx_syscalls),
                    (l1("direction", "tx"), s.tx_syscalls),
                ],
            )?;
            counter(
                e,
                "weft_wg_cookies_sent",
                "Cookie replies sent under handshake load",
                s.cookies_sent,
            )?;
        }
        Ok(())
    }

    fn encode_links(&self, e: &mut DescriptorEncoder, snap: &Snapshot) -> fmt::Result {
        let rows = |f: fn(&LinkStats) -> u64| -> Vec<(Labels, u64)> {
            snap.links
                .iter()
                .map(|(dev, s)| (l1("device", dev.clone()), f(s)))
                .collect()
        };
        counters(
            e,
            "weft_link_rx_bytes",
            "Bytes received by weft's devices (bridge, tunnel), kernel counters",
            &rows(|s| s.rx_bytes),
        )?;
        counters(
            e,
            "weft_link_tx_bytes",
            "Bytes sent by weft's devices (bridge, tunnel), kernel counters",
            &rows(|s| s.tx_bytes),
        )?;
        counters(
            e,
            "weft_link_rx_packets",
            "Packets received by weft's devices",
            &rows(|s| s.rx_packets),
        )?;
        counters(
            e,
            "weft_link_tx_packets",
            "Packets sent by weft's devices",
            &rows(|s| s.tx_packets),
        )?;
        let mut dropped = Vec::new();
        for (dev, s) in &snap.links {
            dropped.push((l2("device", dev.clone(), "direction", "rx"), s.rx_dropped));
            dropped.push((l2("device", dev.clone(), "direction", "tx"), s.tx_dropped));
        }
        counters(
            e,
            "weft_link_dropped",
            "Packets weft's devices dropped (kernel counters)",
            &dropped,
        )
    }
}

fn encode_dns(e: &mut DescriptorEncoder, dns: &weft_dnsd::StatsHandle) -> fmt::Result {
    use std::sync::atomic::Ordering::Relaxed;
    use weft_dnsd::counters::{qtype_name, Path, RCODES};
    let s = dns.stats();
    let f = dns.forward_stats();
    counters(
        e,
        "weft_dns_queries",
        "DNS queries received, by transport",
        &[
            (l1("transport", "udp"), s.udp_queries.load(Relaxed)),
            (l1("transport", "tcp"), s.tcp_queries.load(Relaxed)),
        ],
    )?;
    let types: Vec<(Labels, u64)> = s
        .queries
        .by_type
        .iter()
        .enumerate()
        .map(|(i, c)| (l1("type", qtype_name(i)), c.load(Relaxed)))
        .collect();
    counters(
        e,
        "weft_dns_query_types",
        "DNS queries by question type",
        &types,
    )?;
    let rcodes: Vec<(Labels, u64)> = s
        .queries
        .by_rcode
        .iter()
        .zip(RCODES)
        .enumerate()
        // The common rcodes always, the rare ones once they happen.
        .filter(|(i, (c, _))| *i <= 5 || c.load(Relaxed) > 0)
        .map(|(_, (c, name))| (l1("rcode", name), c.load(Relaxed)))
        .collect();
    counters(
        e,
        "weft_dns_responses",
        "DNS answers sent, by rcode",
        &rcodes,
    )?;
    counter(
        e,
        "weft_dns_local_answers",
        "DNS answers from the cluster's table",
        s.local_answers.load(Relaxed),
    )?;
    counter(
        e,
        "weft_dns_forwarded",
        "DNS queries forwarded to an upstream resolver",
        f.forwarded.load(Relaxed),
    )?;
    counter(
        e,
        "weft_dns_cache_hits",
        "Forwarded names answered from the cache",
        f.cache_hits.load(Relaxed),
    )?;
    counter(
        e,
        "weft_dns_upstream_failures",
        "Forwarded queries no upstream answered (SERVFAIL sent)",
        f.servfail.load(Relaxed),
    )?;
    counters(
        e,
        "weft_dns_dropped",
        "DNS packets dropped without an answer, by where (listener: malformed or oversized; forwarder: too many in flight)",
        &[
            (l1("where", "listener"), s.dropped.load(Relaxed)),
            (l1("where", "forwarder"), f.dropped.load(Relaxed)),
        ],
    )?;
    counter(
        e,
        "weft_dns_tcp_refused",
        "DNS TCP connections refused at the connection limit",
        s.tcp_refused.load(Relaxed),
    )?;
    gauge(
        e,
        "weft_dns_cache_entries",
        "Answers in the forwarding cache",
        dns.cache_len() as f64,
    )?;
    let mut m = e.encode_descriptor(
        "weft_dns_request_duration_seconds",
        "Time from receiving a DNS query to sending its answer, by path (local: the cluster's table, timed per batch of UDP datagrams; cache: the forwarding cache; forward: an upstream resolver)",
        None,
        MetricType::Histogram,
    )?;
    for path in Path::ALL {
        let h = s.queries.latency(path).snapshot();
        let labels = l1("path", path.as_str());
        m.encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(h.sum_secs, h.count, &h.buckets, None)?;
    }
    Ok(())
}
