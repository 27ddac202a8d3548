//! `dnsd`: weft's service-discovery DNS server, standalone (netd runs the
//! same library in-process).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use ipnetwork::{IpNetwork, Ipv4Network};
use weft_dnsd::{DnsConfig, DnsServer};
use weft_store::StoreConfig;

#[derive(Parser, Debug)]
#[command(name = "dnsd", version, about = "weft's service-discovery DNS server")]
struct Args {
    /// The store: sqlite:PATH or etcd:URL[,URL...].
    #[arg(long, env = "WEFT_STORE")]
    store: StoreConfig,
    /// Key prefix of weft's records in the store.
    #[arg(long, default_value = weft_model::DEFAULT_PREFIX)]
    store_prefix: String,
    /// Address and port to listen on, UDP and TCP (repeatable).
    #[arg(long = "listen", default_values_t = [weft_dnsd::DEFAULT_LISTEN])]
    listen: Vec<SocketAddr>,
    /// The cluster domain.
    #[arg(long, default_value = weft_dnsd::DEFAULT_DOMAIN)]
    domain: String,
    /// TTL of answers, in seconds (also the SOA minimum).
    #[arg(long, default_value_t = weft_dnsd::DEFAULT_TTL.as_secs())]
    ttl: u64,
    /// resolv.conf naming the upstream resolvers (re-read when it changes).
    #[arg(long, default_value = weft_dnsd::DEFAULT_RESOLV_CONF)]
    resolv_conf: PathBuf,
    /// The cluster range (PTR answers; these clients may recurse).
    #[arg(long, default_value_t = weft_model::DEFAULT_CLUSTER_RANGE)]
    cluster_range: Ipv4Network,
    /// The service range (PTR answers for the VIPs).
    #[arg(long, default_value_t = weft_model::DEFAULT_SERVICE_RANGE)]
    service_range: Ipv4Network,
    /// More networks whose clients may have other names forwarded.
    #[arg(long = "allow-recursion")]
    allow_recursion: Vec<IpNetwork>,
    /// Per-upstream timeout in milliseconds.
    #[arg(long, default_value_t = millis(weft_dnsd::DEFAULT_UPSTREAM_TIMEOUT))]
    upstream_timeout_ms: u64,
    /// Port of the upstream resolvers (resolv.conf cannot name one).
    #[arg(long, default_value_t = weft_dnsd::DEFAULT_UPSTREAM_PORT)]
    upstream_port: u16,
    /// TCP queries answered at once, at most (more get REFUSED).
    #[arg(long, default_value_t = weft_dnsd::DEFAULT_MAX_TCP_CONNECTIONS)]
    max_tcp_connections: usize,
    /// Idle TCP connections are closed after this many seconds.
    #[arg(long, default_value_t = weft_dnsd::DEFAULT_TCP_IDLE_TIMEOUT.as_secs())]
    tcp_idle_timeout: u64,
    /// UDP threads per listen address (0: one per core, at most 4).
    #[arg(long, default_value_t = weft_dnsd::DEFAULT_UDP_THREADS)]
    udp_threads: usize,
    /// Forwarded answers cached at most.
    #[arg(long, default_value_t = weft_dnsd::DEFAULT_CACHE_SIZE)]
    cache_size: usize,
    /// Serve Prometheus /metrics over plain HTTP on IP:PORT (off unless
    /// given).
    #[arg(long, env = "WEFT_DNS_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

/// A duration in whole milliseconds (for a flag's default).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Args {
    /// The server's settings: the flags, and the library's defaults for
    /// what has no flag.
    fn dns_config(&self) -> DnsConfig {
        DnsConfig {
            domain: self.domain.clone(),
            ttl: Duration::from_secs(self.ttl),
            listen: self.listen.clone(),
            resolv_conf: self.resolv_conf.clone(),
            keys: weft_model::Keys::new(&self.store_prefix),
            cluster_range: self.cluster_range,
            service_range: self.service_range,
            upstream_timeout: Duration::from_millis(self.upstream_timeout_ms),
            upstream_port: self.upstream_port,
            max_tcp_connections: self.max_tcp_connections,
            tcp_idle_timeout: Duration::from_secs(self.tcp_idle_timeout),
            udp_threads: self.udp_threads,
            cache_size: self.cache_size,
            recursion_clients: self.allow_recursion.clone(),
            ..DnsConfig::default()
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let store = weft_store::open(&args.store)
        .await
        .with_context(|| format!("opening the store {}", args.store))?;
    let cfg = args.dns_config();
    let server = DnsServer::start(cfg, store)
        .await
        .context("starting dnsd")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics = match args.metrics_addr {
        Some(addr) => {
            let mut stop = stop_rx.clone();
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let (_, task) = weft_dnsd::metrics::serve(addr, server.stats_handle(), stopped)
                .await
                .context("serving metrics")?;
            Some(task)
        }
        None => None,
    };
    weft_sys::signal::shutdown_signal()?.await;
    let _ = stop_tx.send(true);
    if let Some(task) = metrics {
        let _ = task.await;
    }
    server.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_defaults_are_the_library_defaults() {
        let args = Args::try_parse_from(["dnsd", "--store", "sqlite:/tmp/x.db"]).unwrap();
        assert_eq!(
            format!("{:?}", args.dns_config()),
            format!("{:?}", DnsConfig::default()),
            "dnsd's flags default to weft_dnsd's constants"
        );
    }

    #[test]
    fn a_bad_store_says_what_to_write() {
        let e = Args::try_parse_from(["dnsd", "--store", "redis:x"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sqlite:PATH or etcd:URL"), "{e}");
    }
}
