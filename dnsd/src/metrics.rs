//! dnsd's metrics, in OpenMetrics text (prometheus-client): the counters of
//! the listeners ([`crate::Stats`]), of the forwarder
//! ([`crate::ForwardStats`]) and per query ([`crate::counters`]), read at
//! scrape time from a [`StatsHandle`].
//!
//! * [`DnsCollector`] goes into any registry: netd's exporter adds it to its
//!   own when it runs DNS in-process.
//! * [`serve`] answers `GET /metrics` on a TCP address: the standalone
//!   `dnsd` binary's `--metrics-addr`.
//!
//! The metric names (`weft_dns_*`) are listed in README.md ("Deploy").
//! The small const-metric helpers ([`counter`], [`counters`], [`gauge`],
//! [`gauges`]) are shared with netd's exporter.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::counters::{qtype_name, Path, RCODES};
use crate::{DnsError, StatsHandle};

/// The content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label pairs of one row of a metric family.
pub type Labels = Vec<(&'static str, String)>;

/// Encodes one counter without labels.
pub fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// Encodes one gauge without labels.
pub fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// Encodes a family of counters, one per label set.
pub fn counters(
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

/// Encodes a family of gauges, one per label set.
pub fn gauges(
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

/// One label.
pub fn l1(k: &'static str, v: impl Into<String>) -> Labels {
    vec![(k, v.into())]
}

/// Reads dnsd's counters at scrape time.
#[derive(Debug, Clone)]
pub struct DnsCollector(pub StatsHandle);

impl Collector for DnsCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        encode(&mut e, &self.0)
    }
}

/// A registry with dnsd's metrics only.
pub fn registry(handle: StatsHandle) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(DnsCollector(handle)));
    r
}

/// Serves `GET /metrics` on `addr` until `shutdown` completes; the address
/// bound (port 0 picks one) and the server task.
pub async fn serve(
    addr: SocketAddr,
    handle: StatsHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), DnsError> {
    let bind_err = |source| DnsError::Bind {
        addr,
        proto: "http",
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: try /metrics\n") })
        .with_state(Arc::new(registry(handle)));
    tracing::info!(addr = %bound, "serving /metrics");
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "the metrics server failed");
        }
    });
    Ok((bound, task))
}

async fn metrics(State(r): State<Arc<Registry>>) -> Response {
    let mut text = String::with_capacity(8 * 1024);
    match prometheus_client::encoding::text::encode(&mut text, &r) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

fn encode(e: &mut DescriptorEncoder, dns: &StatsHandle) -> fmt::Result {
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
        "weft_dns_merged",
        "Forwarded queries that waited for an identical one already asked upstream",
        f.merged.load(Relaxed),
    )?;
    counter(
        e,
        "weft_dns_cache_evictions",
        "Live answers evicted from the full forwarding cache (expired ones do not count)",
        f.evicted.load(Relaxed),
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
        "DNS TCP queries refused at the limit of TCP queries answered at once",
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
