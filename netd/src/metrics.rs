//! Prometheus metrics and health checks, over plain HTTP on a TCP address
//! (`--metrics-addr`, off by default):
//!
//! * `GET /metrics`: OpenMetrics text (prometheus-client). The tunnel and
//!   link counters are read at scrape time from where they live (the
//!   WireGuard data path, the kernel); netd's own counters are in
//!   [`crate::counters`] and the store's health in [`crate::health`].
//!   DNS is a process of its own (dnsd, [`crate::dns`]) and serves its
//!   `weft_dns_*` metrics itself (`[dns] metrics_listen`).
//! * `GET /healthz`: 200 while the process serves.
//! * `GET /readyz`: 200 when the store answers and the data path (bridge and
//!   tunnel device) is up; 503 with the reasons otherwise
//!   ([`crate::health::readiness`]).
//!
//! The metric names are listed in README.md ("Deploy").

use std::fmt;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use weft_dnsd::metrics::{counter, counters, gauge, gauges, l1, Labels, OPENMETRICS};

use crate::daemon::Daemon;
use crate::health::{Readiness, STORE_TIMEOUT};
use crate::host::LinkStats;
use crate::nft::policy::{ALLOW_PREFIX, DROPS_COUNTER};
use crate::nft::NamedCounter;

/// What a scrape reads asynchronously before encoding.
#[derive(Debug, Default, Clone)]
struct Snapshot {
    /// This host's endpoints (`None`: the store did not answer).
    endpoints: Option<usize>,
    /// Kernel counters of weft's devices, by name.
    links: Vec<(String, LinkStats)>,
    /// The named counters of weft's nf_tables tables (policy audit and
    /// drops, anti-spoofing drops).
    nft: Vec<NamedCounter>,
}

/// Everything the HTTP handlers need.
#[derive(Clone)]
pub struct MetricsState {
    daemon: Arc<Daemon>,
    registry: Arc<Registry>,
    snapshot: Arc<Mutex<Snapshot>>,
}

impl MetricsState {
    /// The registry with netd's counters and the scrape-time collector.
    pub fn new(daemon: Arc<Daemon>) -> MetricsState {
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        let mut registry = Registry::default();
        daemon.counters().register(&mut registry);
        registry.register_collector(Box::new(Live {
            daemon: daemon.clone(),
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
        // The read reports to the store's health itself; a timeout is
        // reported here.
        let endpoints = match tokio::time::timeout(STORE_TIMEOUT, d.own_endpoints()).await {
            Ok(Ok(eps)) => Some(eps.len()),
            Ok(Err(_)) => None,
            Err(_) => {
                d.health().timed_out(STORE_TIMEOUT);
                None
            }
        };
        let mut links = Vec::new();
        for dev in [d.config().bridge.as_str(), d.tunnel().device()] {
            match d.net().link_stats(dev).await {
                Ok(Some(s)) => links.push((dev.to_owned(), s)),
                Ok(None) => {}
                Err(e) => tracing::debug!(device = dev, error = %e, "reading link counters failed"),
            }
        }
        let nft = d.enforcer().nft().clone();
        let nft = match tokio::task::spawn_blocking(move || nft.counters()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "reading the nf_tables counters failed");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Snapshot {
            endpoints,
            links,
            nft,
        };
    }
}

/// Is the store up, and is the data path (bridge, tunnel device) up?
pub async fn readiness(d: &Daemon) -> Readiness {
    let devices = [d.config().bridge.as_str(), d.tunnel().device()];
    crate::health::readiness(d.health(), d.net(), &devices).await
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
    let body = r.report();
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
    snapshot: Arc<Mutex<Snapshot>>,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live")
            .field("host", &self.daemon.host_id())
            .finish_non_exhaustive()
    }
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
        encode_policy(&mut e, &snap)?;
        encode_spoof(&mut e, &snap)?;
        self.encode_links(&mut e, &snap)
    }
}

/// The policy's audit counters and drops, from the kernel's counters.
fn encode_policy(e: &mut DescriptorEncoder, snap: &Snapshot) -> fmt::Result {
    let policy = snap.nft.iter().filter(|c| c.family == "inet");
    let mut hits = Vec::new();
    let mut drops = 0;
    for c in policy {
        if c.name == DROPS_COUNTER {
            drops += c.packets;
        } else if let Some(name) = c.name.strip_prefix(ALLOW_PREFIX) {
            let rule = c.comment.clone().unwrap_or_else(|| name.to_owned());
            hits.push((l1("rule", rule), c.packets));
        }
    }
    counters(
        e,
        "weft_policy_rule_hits",
        "Packets to this host's containers the policy allowed (every packet in the original direction of a connection from inside the cluster is checked), by rule or built-in reason (within_service, within_stack, linked_stacks, stack_ingress, cluster_default)",
        &hits,
    )?;
    counter(
        e,
        "weft_policy_drops",
        "Packets to this host's containers the policy dropped",
        drops,
    )
}

/// `weft_spoof_drops_total{container}`: what anti-spoofing dropped on each
/// container's port ([`crate::nft::spoof::drops_by_container`]).
fn encode_spoof(e: &mut DescriptorEncoder, snap: &Snapshot) -> fmt::Result {
    let drops: Vec<(Labels, u64)> = crate::nft::spoof::drops_by_container(&snap.nft)
        .into_iter()
        .map(|(container, n)| (l1("container", container), n))
        .collect();
    counters(
        e,
        "weft_spoof_drops",
        "Frames this host's containers sent with an address or MAC weft did not assign them (anti-spoofing), dropped, by container id",
        &drops,
    )
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
            if d.health().up() { 1.0 } else { 0.0 },
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
        let tunnel = d.tunnel();
        let stats = tunnel.peer_stats();
        let stats = crate::tunnel::stats_by_key(&stats);
        let mut up_rows = Vec::new();
        let (mut up, mut down) = (0u64, 0u64);
        let mut age = Vec::new();
        let (mut rx_b, mut tx_b, mut rx_p, mut tx_p) = (vec![], vec![], vec![], vec![]);
        let mut drops = Vec::new();
        let mut hs_errors = Vec::new();
        let mut hs_failures = Vec::new();
        for p in &peers {
            let s = p.wg_public_key.and_then(|k| stats.get(&k).copied());
            let is_up = tunnel.peer_up(s);
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
            hs_failures.push((l1("peer", peer()), s.handshake_failures));
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
        let Some(w) = tunnel.wg() else {
            return Ok(());
        };
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
        counters(
            e,
            "weft_peer_handshake_failures",
            "Handshake initiations to a peer that got no answer (retried after 5 s, given up after 90 s)",
            &hs_failures,
        )?;
        {
            let s = w.device_stats();
            counters(
                e,
                "weft_wg_drops",
                "Packets the WireGuard device dropped that belong to no peer, by reason (no_peer: to an address no peer owns; unknown_peer: from an unknown key or index; malformed; handshake_budget: initiations over their source address's budget; non_ipv4; send; tun_read)",
                &[
                    (l1("reason", "no_peer"), s.drops_no_peer),
                    (l1("reason", "unknown_peer"), s.drops_unknown_peer),
                    (l1("reason", "malformed"), s.drops_malformed),
                    (l1("reason", "handshake_budget"), s.drops_handshake_budget),
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
                "weft_wg_handshake_failures",
                "Handshake initiations to any peer, also peers since removed, that got no answer",
                s.handshake_failures,
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
