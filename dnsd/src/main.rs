//! `dnsd`: weft's service-discovery DNS server, standalone (netd runs the
//! same library in-process).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ipnetwork::{IpNetwork, Ipv4Network};
use weft_dnsd::{DnsConfig, DnsServer};
use weft_store::{EtcdConfig, StoreConfig};

#[derive(Parser, Debug)]
#[command(name = "dnsd", version, about = "weft's service-discovery DNS server")]
struct Args {
    /// The store: sqlite:PATH or etcd:URL[,URL...].
    #[arg(long, env = "WEFT_STORE")]
    store: String,
    /// Key prefix of weft's records in the store.
    #[arg(long, default_value = weft_model::DEFAULT_PREFIX)]
    store_prefix: String,
    /// Address and port to listen on, UDP and TCP (repeatable).
    #[arg(long = "listen", default_value = "169.254.169.250:53")]
    listen: Vec<SocketAddr>,
    /// The cluster domain.
    #[arg(long, default_value = weft_dnsd::DEFAULT_DOMAIN)]
    domain: String,
    /// TTL of answers, in seconds (also the SOA minimum).
    #[arg(long, default_value_t = 1)]
    ttl: u32,
    /// resolv.conf naming the upstream resolvers (re-read when it changes).
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// The cluster range (PTR answers; these clients may recurse).
    #[arg(long, default_value = "10.42.0.0/16")]
    cluster_range: Ipv4Network,
    /// More networks whose clients may have other names forwarded.
    #[arg(long = "allow-recursion")]
    allow_recursion: Vec<IpNetwork>,
    /// Per-upstream timeout in milliseconds.
    #[arg(long, default_value_t = 1500)]
    upstream_timeout_ms: u64,
    /// Port of the upstream resolvers (resolv.conf cannot name one).
    #[arg(long, default_value_t = 53)]
    upstream_port: u16,
    /// Open TCP connections at most.
    #[arg(long, default_value_t = 256)]
    max_tcp_connections: usize,
    /// Idle TCP connections are closed after this many seconds.
    #[arg(long, default_value_t = 10)]
    tcp_idle_timeout: u64,
    /// UDP threads per listen address (0: one per core, at most 4).
    #[arg(long, default_value_t = 0)]
    udp_threads: usize,
    /// Forwarded answers cached at most.
    #[arg(long, default_value_t = 10_000)]
    cache_size: usize,
}

fn parse_store(spec: &str) -> Result<StoreConfig> {
    match spec.split_once(':') {
        Some(("sqlite", path)) if !path.is_empty() => Ok(StoreConfig::Sqlite { path: path.into() }),
        Some(("etcd", urls)) if !urls.is_empty() => Ok(StoreConfig::Etcd(EtcdConfig::new(
            urls.split(',').map(|s| s.trim().to_owned()).collect(),
        ))),
        _ => bail!("--store {spec:?}: use sqlite:PATH or etcd:URL[,URL...]"),
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
    let store_cfg = parse_store(&args.store)?;
    let store = weft_store::open(&store_cfg)
        .await
        .with_context(|| format!("opening the store {}", args.store))?;
    let cfg = DnsConfig {
        domain: args.domain,
        ttl: Duration::from_secs(args.ttl as u64),
        listen: args.listen,
        resolv_conf: args.resolv_conf,
        keys: weft_model::Keys::new(&args.store_prefix),
        cluster_range: args.cluster_range,
        upstream_timeout: Duration::from_millis(args.upstream_timeout_ms),
        upstream_port: args.upstream_port,
        max_tcp_connections: args.max_tcp_connections,
        tcp_idle_timeout: Duration::from_secs(args.tcp_idle_timeout),
        udp_threads: args.udp_threads,
        cache_size: args.cache_size,
        recursion_clients: args.allow_recursion,
        ..DnsConfig::default()
    };
    let server = DnsServer::start(cfg, store)
        .await
        .context("starting dnsd")?;
    weft_sys::signal::shutdown_signal()?.await;
    server.stop().await;
    Ok(())
}
