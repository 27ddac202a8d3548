//! The `dnsd` binary's command line, defined once: the binary parses it
//! ([`DnsdArgs`] is a clap parser) and netd, which runs dnsd as its child,
//! builds it from a [`DnsConfig`] ([`DnsdArgs::from_config`]) and writes it
//! out ([`DnsdArgs::to_args`]) with every setting explicit, so the command
//! line alone says how a running dnsd is configured (netd compares it to
//! decide whether to keep a dnsd it finds running).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ipnetwork::{IpNetwork, Ipv4Network};
use weft_store::StoreConfig;

use crate::DnsConfig;

/// dnsd's flags (`dnsd --help`).
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(name = "dnsd", version, about = "weft's service-discovery DNS server")]
pub struct DnsdArgs {
    /// The store: sqlite:PATH or etcd:URL[,URL...].
    #[arg(long, env = "WEFT_STORE")]
    pub store: StoreConfig,
    /// Key prefix of weft's records in the store.
    #[arg(long, default_value = weft_model::DEFAULT_PREFIX)]
    pub store_prefix: String,
    /// Address and port to listen on, UDP and TCP (repeatable).
    #[arg(long = "listen", default_values_t = [crate::DEFAULT_LISTEN])]
    pub listen: Vec<SocketAddr>,
    /// The cluster domain.
    #[arg(long, default_value = crate::DEFAULT_DOMAIN)]
    pub domain: String,
    /// TTL of answers, in seconds (also the SOA minimum).
    #[arg(long, default_value_t = crate::DEFAULT_TTL.as_secs())]
    pub ttl: u64,
    /// resolv.conf naming the upstream resolvers (re-read when it changes).
    #[arg(long, default_value = crate::DEFAULT_RESOLV_CONF)]
    pub resolv_conf: PathBuf,
    /// The cluster range (PTR answers; these clients may recurse).
    #[arg(long, default_value_t = weft_model::DEFAULT_CLUSTER_RANGE)]
    pub cluster_range: Ipv4Network,
    /// The service range (PTR answers for the VIPs).
    #[arg(long, default_value_t = weft_model::DEFAULT_SERVICE_RANGE)]
    pub service_range: Ipv4Network,
    /// More networks whose clients may have other names forwarded.
    #[arg(long = "allow-recursion")]
    pub allow_recursion: Vec<IpNetwork>,
    /// Per-upstream timeout in milliseconds.
    #[arg(long, default_value_t = millis(crate::DEFAULT_UPSTREAM_TIMEOUT))]
    pub upstream_timeout_ms: u64,
    /// Port of the upstream resolvers (resolv.conf cannot name one).
    #[arg(long, default_value_t = crate::DEFAULT_UPSTREAM_PORT)]
    pub upstream_port: u16,
    /// TCP queries answered at once, at most (more get REFUSED).
    #[arg(long, default_value_t = crate::DEFAULT_MAX_TCP_CONNECTIONS)]
    pub max_tcp_connections: usize,
    /// Idle TCP connections are closed after this many seconds.
    #[arg(long, default_value_t = crate::DEFAULT_TCP_IDLE_TIMEOUT.as_secs())]
    pub tcp_idle_timeout: u64,
    /// UDP threads per listen address (0: one per core, at most 4).
    #[arg(long, default_value_t = crate::DEFAULT_UDP_THREADS)]
    pub udp_threads: usize,
    /// Forwarded answers cached at most.
    #[arg(long, default_value_t = crate::DEFAULT_CACHE_SIZE)]
    pub cache_size: usize,
    /// Serve Prometheus /metrics over plain HTTP on IP:PORT (off unless
    /// given).
    #[arg(long, env = "WEFT_DNS_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Once serving (every address bound, the first table from the store
    /// in place), write this process's id to this file (atomically), and
    /// remove it on exit if it still holds this id: the readiness signal
    /// and pidfile netd supervises dnsd by.
    #[arg(long)]
    pub pidfile: Option<PathBuf>,
}

/// A duration in whole milliseconds (for a flag's default).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl DnsdArgs {
    /// The command line that runs a dnsd with `cfg` on `store` (no metrics,
    /// no pidfile: set those fields after).
    pub fn from_config(cfg: &DnsConfig, store: StoreConfig) -> DnsdArgs {
        DnsdArgs {
            store,
            store_prefix: cfg.keys.root().to_owned(),
            listen: cfg.listen.clone(),
            domain: cfg.domain.clone(),
            ttl: cfg.ttl.as_secs(),
            resolv_conf: cfg.resolv_conf.clone(),
            cluster_range: cfg.cluster_range,
            service_range: cfg.service_range,
            allow_recursion: cfg.recursion_clients.clone(),
            upstream_timeout_ms: millis(cfg.upstream_timeout),
            upstream_port: cfg.upstream_port,
            max_tcp_connections: cfg.max_tcp_connections,
            tcp_idle_timeout: cfg.tcp_idle_timeout.as_secs(),
            udp_threads: cfg.udp_threads,
            cache_size: cfg.cache_size,
            metrics_addr: None,
            pidfile: None,
        }
    }

    /// The server's settings: the flags, and the library's defaults for
    /// what has no flag.
    pub fn dns_config(&self) -> DnsConfig {
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

    /// The arguments (after the program name) that parse back into `self`,
    /// every setting written out (`--flag=value`).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--store={}", self.store),
            format!("--store-prefix={}", self.store_prefix),
        ];
        a.extend(self.listen.iter().map(|l| format!("--listen={l}")));
        a.extend([
            format!("--domain={}", self.domain),
            format!("--ttl={}", self.ttl),
            format!("--resolv-conf={}", self.resolv_conf.display()),
            format!("--cluster-range={}", self.cluster_range),
            format!("--service-range={}", self.service_range),
        ]);
        a.extend(
            self.allow_recursion
                .iter()
                .map(|n| format!("--allow-recursion={n}")),
        );
        a.extend([
            format!("--upstream-timeout-ms={}", self.upstream_timeout_ms),
            format!("--upstream-port={}", self.upstream_port),
            format!("--max-tcp-connections={}", self.max_tcp_connections),
            format!("--tcp-idle-timeout={}", self.tcp_idle_timeout),
            format!("--udp-threads={}", self.udp_threads),
            format!("--cache-size={}", self.cache_size),
        ]);
        if let Some(m) = self.metrics_addr {
            a.push(format!("--metrics-addr={m}"));
        }
        if let Some(p) = &self.pidfile {
            a.push(format!("--pidfile={}", p.display()));
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_defaults_are_the_library_defaults() {
        let args = DnsdArgs::try_parse_from(["dnsd", "--store", "sqlite:/tmp/x.db"]).unwrap();
        assert_eq!(
            format!("{:?}", args.dns_config()),
            format!("{:?}", DnsConfig::default()),
            "dnsd's flags default to weft_dnsd's constants"
        );
    }

    #[test]
    fn a_bad_store_says_what_to_write() {
        let e = DnsdArgs::try_parse_from(["dnsd", "--store", "redis:x"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sqlite:PATH or etcd:URL"), "{e}");
    }

    #[test]
    fn written_args_parse_back_into_the_same_settings() {
        let cfg = DnsConfig {
            domain: "c.example".into(),
            ttl: Duration::from_secs(7),
            listen: vec![
                crate::DEFAULT_LISTEN,
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
            ],
            resolv_conf: "/tmp/r.conf".into(),
            keys: weft_model::Keys::new("/other"),
            cluster_range: "10.9.0.0/16".parse().unwrap(),
            service_range: "10.10.0.0/24".parse().unwrap(),
            upstream_timeout: Duration::from_millis(250),
            upstream_port: 5300,
            max_tcp_connections: 3,
            tcp_idle_timeout: Duration::from_secs(4),
            udp_threads: 2,
            cache_size: 9,
            recursion_clients: vec!["192.168.0.0/16".parse().unwrap()],
            ..DnsConfig::default()
        };
        let store: StoreConfig = "etcd:http://10.0.0.1:2379,http://10.0.0.2:2379"
            .parse()
            .unwrap();
        let mut args = DnsdArgs::from_config(&cfg, store);
        assert_eq!(
            format!("{:?}", args.dns_config()),
            format!("{cfg:?}"),
            "from_config then dns_config is the identity"
        );
        args.metrics_addr = Some("127.0.0.1:9543".parse().unwrap());
        args.pidfile = Some("/var/lib/weft/dnsd.pid".into());
        let argv = std::iter::once("dnsd".to_owned()).chain(args.to_args());
        assert_eq!(DnsdArgs::try_parse_from(argv).unwrap(), args);
        let defaults = DnsdArgs::from_config(&DnsConfig::default(), "sqlite:/x".parse().unwrap());
        let argv = std::iter::once("dnsd".to_owned()).chain(defaults.to_args());
        assert_eq!(DnsdArgs::try_parse_from(argv).unwrap(), defaults);
    }
}
