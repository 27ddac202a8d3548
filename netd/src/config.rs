//! netd's configuration: defaults, then a TOML file, then environment
//! variables and flags (see `netd run --help`). Every setting has a default
//! that works on one host with no file at all.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde::Deserialize;
use weft_ipam::IpamConfig;
use weft_store::{EtcdConfig, StoreConfig};

use crate::mesh::TunnelBackend;
use crate::nat::Backend;

pub const DEFAULT_CONFIG: &str = "/etc/weft/netd.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/weft";
pub const DEFAULT_BRIDGE: &str = "weft0";
pub const DEFAULT_DOMAIN: &str = "weft.internal";
pub use weft_model::DEFAULT_PREFIX;

/// The TOML file. Every field is optional.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub host_id: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub bridge: Option<String>,
    pub mtu: Option<u32>,
    pub domain: Option<String>,
    pub log_level: Option<String>,
    /// `auto`, `legacy` or `nft`.
    pub iptables: Option<String>,
    /// Where to serve /metrics, /healthz and /readyz over HTTP, e.g.
    /// "127.0.0.1:9542" (default: off; "off" turns it off).
    pub metrics_addr: Option<String>,
    #[serde(default)]
    pub mesh: FileMesh,
    #[serde(default)]
    pub cni: FileCni,
    #[serde(default)]
    pub dns: FileDns,
    #[serde(default)]
    pub ipam: FileIpam,
    #[serde(default)]
    pub store: FileStore,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileDns {
    /// Serve DNS at 169.254.169.250 (default true).
    pub enabled: Option<bool>,
    /// Answer TTL in seconds (default 1).
    pub ttl_secs: Option<u64>,
    /// Where the host's upstream resolvers are (default /etc/resolv.conf).
    pub resolv_conf: Option<PathBuf>,
    /// More addresses to answer on, e.g. "127.0.0.1:5353".
    pub extra_listen: Option<Vec<std::net::SocketAddr>>,
    pub upstream_timeout_ms: Option<u64>,
}

/// What `netd install-cni` (and `netd sidecar`) puts on the host.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileCni {
    /// The host's CNI plugin directory (default /opt/cni/bin).
    pub bin_dir: Option<PathBuf>,
    /// The host's CNI config directory (default /etc/cni/net.d).
    pub conf_dir: Option<PathBuf>,
    /// The conflist's file name (default 10-weft.conflist).
    pub conf_name: Option<String>,
    /// The plugin binary to install (default: `weft` next to netd).
    pub plugin: Option<PathBuf>,
    /// Chain the reference `portmap` plugin after weft (it then publishes
    /// the ports instead of weft).
    pub with_portmap: Option<bool>,
    /// Chain the reference `tuning` plugin after weft.
    pub with_tuning: Option<bool>,
    /// Where to take `portmap`/`tuning` from when the host has none
    /// (default /usr/lib/cni).
    pub extra_plugins_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileMesh {
    /// `wireguard` (default) or `vxlan`.
    pub backend: Option<String>,
    /// This host's underlay address (default: the address of the interface
    /// of the default route).
    pub underlay_addr: Option<Ipv4Addr>,
    /// Seconds a host stays in the mesh after its netd stops renewing.
    pub host_ttl_secs: Option<u64>,
    pub wg_port: Option<u16>,
    pub vxlan_port: Option<u16>,
    pub vni: Option<u32>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileIpam {
    pub cluster_range: Option<Ipv4Network>,
    pub block_prefix: Option<u8>,
    pub block_grace_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileStore {
    /// `sqlite` (default) or `etcd`.
    pub backend: Option<String>,
    /// The SQLite file (default `<state_dir>/store.db`).
    pub path: Option<PathBuf>,
    /// etcd endpoints, e.g. `["http://10.0.0.1:2379"]`.
    pub endpoints: Option<Vec<String>>,
    /// Key prefix of the cluster in the store.
    pub prefix: Option<String>,
}

/// Values given on the command line or in the environment; they win over
/// the file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Host id (default: generated on first start, kept in the state dir).
    #[arg(long, env = "WEFT_HOST_ID")]
    pub host_id: Option<String>,
    /// Directory for the host id, keys and the embedded store.
    #[arg(long, env = "WEFT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The control socket.
    #[arg(long, env = "WEFT_SOCKET")]
    pub socket: Option<PathBuf>,
    /// The bridge containers attach to.
    #[arg(long, env = "WEFT_BRIDGE")]
    pub bridge: Option<String>,
    /// MTU of the bridge and container interfaces (default: from the
    /// default-route interface, minus the tunnel overhead).
    #[arg(long, env = "WEFT_MTU")]
    pub mtu: Option<u32>,
    /// DNS domain of the cluster.
    #[arg(long, env = "WEFT_DOMAIN")]
    pub domain: Option<String>,
    /// Log filter, e.g. `info` or `weft_netd=debug`.
    #[arg(long, env = "WEFT_LOG")]
    pub log_level: Option<String>,
    /// iptables backend: auto, legacy or nft.
    #[arg(long, env = "WEFT_IPTABLES")]
    pub iptables: Option<String>,
    /// Serve Prometheus /metrics, /healthz and /readyz over plain HTTP on
    /// this address, e.g. 127.0.0.1:9542 (default: off; `off` turns off
    /// an address set in the file).
    #[arg(long, env = "WEFT_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Tunnel backend: wireguard (encrypted, default) or vxlan (plain).
    #[arg(long, env = "WEFT_BACKEND")]
    pub backend: Option<String>,
    /// This host's underlay address (default: from the default route).
    #[arg(long, env = "WEFT_UNDERLAY_ADDR")]
    pub underlay_addr: Option<Ipv4Addr>,
    /// Seconds a host stays in the mesh after its netd stops renewing.
    #[arg(long, env = "WEFT_HOST_TTL_SECS")]
    pub host_ttl_secs: Option<u64>,
    /// WireGuard UDP port.
    #[arg(long, env = "WEFT_WG_PORT")]
    pub wg_port: Option<u16>,
    /// VXLAN UDP port.
    #[arg(long, env = "WEFT_VXLAN_PORT")]
    pub vxlan_port: Option<u16>,
    /// VXLAN network identifier.
    #[arg(long, env = "WEFT_VNI")]
    pub vni: Option<u32>,
    /// Do not serve DNS at 169.254.169.250.
    #[arg(long, env = "WEFT_NO_DNS")]
    pub no_dns: bool,
    /// DNS answer TTL in seconds.
    #[arg(long, env = "WEFT_DNS_TTL_SECS")]
    pub dns_ttl_secs: Option<u64>,
    /// The host's resolv.conf with the upstream resolvers.
    #[arg(long, env = "WEFT_DNS_RESOLV_CONF")]
    pub dns_resolv_conf: Option<PathBuf>,
    /// Another address for DNS to answer on (repeatable), e.g. 127.0.0.1:5353.
    #[arg(long, env = "WEFT_DNS_EXTRA_LISTEN", value_delimiter = ',')]
    pub dns_extra_listen: Vec<std::net::SocketAddr>,
    /// How long to wait for an upstream resolver, in milliseconds.
    #[arg(long, env = "WEFT_DNS_UPSTREAM_TIMEOUT_MS")]
    pub dns_upstream_timeout_ms: Option<u64>,
    /// Cluster range, e.g. 10.42.0.0/16.
    #[arg(long, env = "WEFT_CLUSTER_RANGE")]
    pub cluster_range: Option<Ipv4Network>,
    /// Prefix length of each host's block, e.g. 24.
    #[arg(long, env = "WEFT_BLOCK_PREFIX")]
    pub block_prefix: Option<u8>,
    /// Seconds a dead host's block is kept before another host may take it.
    #[arg(long, env = "WEFT_BLOCK_GRACE_SECS")]
    pub block_grace_secs: Option<u64>,
    /// Store: `sqlite:PATH` or `etcd:URL[,URL...]`.
    #[arg(long, env = "WEFT_STORE")]
    pub store: Option<String>,
    /// Key prefix of the cluster in the store.
    #[arg(long, env = "WEFT_STORE_PREFIX")]
    pub store_prefix: Option<String>,
}

/// The embedded DNS server's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    pub ttl: Duration,
    pub resolv_conf: PathBuf,
    pub extra_listen: Vec<std::net::SocketAddr>,
    pub upstream_timeout: Duration,
}

/// How this host joins the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    pub backend: TunnelBackend,
    pub underlay_addr: Option<Ipv4Addr>,
    pub host_ttl: Duration,
    pub wg_port: u16,
    pub vxlan_port: u16,
    pub vni: u32,
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub host_id: Option<String>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub bridge: String,
    pub mtu: Option<u32>,
    pub domain: String,
    pub log_level: String,
    pub iptables: Option<Backend>,
    pub mesh: MeshConfig,
    /// The embedded DNS server (`None`: off).
    pub dns: Option<DnsSettings>,
    pub ipam: IpamConfig,
    pub store: StoreConfig,
    /// The store key layout under the configured prefix (normalised).
    pub keys: weft_model::Keys,
    pub dns_addr: Ipv4Addr,
    /// Where to serve metrics and health (`None`: off).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// What `install-cni` installs.
    pub cni: crate::install::CniSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting {setting}: {why}")]
    Invalid { setting: &'static str, why: String },
    #[error(transparent)]
    Ipam(#[from] weft_ipam::ConfigError),
}

impl FileConfig {
    /// Reads the file; a missing file at the default path is an empty config.
    pub fn load(path: &Path, explicit: bool) -> Result<FileConfig, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(FileConfig::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            source: Box::new(e),
        })
    }
}

impl Config {
    /// Defaults, then the file, then the overrides.
    pub fn resolve(file: FileConfig, o: Overrides) -> Result<Config, ConfigError> {
        let state_dir = o
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let socket = o
            .socket
            .or(file.socket)
            .unwrap_or_else(|| weft_api::DEFAULT_SOCKET.into());
        let bridge = o
            .bridge
            .or(file.bridge)
            .unwrap_or_else(|| DEFAULT_BRIDGE.into());
        if !weft_api::valid_ifname(&bridge) {
            return Err(ConfigError::Invalid {
                setting: "bridge",
                why: format!("{bridge:?} is not a valid interface name (1-15 characters, no '/', ':' or spaces)"),
            });
        }
        let mtu = o.mtu.or(file.mtu);
        if let Some(m) = mtu {
            if !(576..=65535).contains(&m) {
                return Err(ConfigError::Invalid {
                    setting: "mtu",
                    why: format!("{m} is outside 576..=65535"),
                });
            }
        }
        let domain = o
            .domain
            .or(file.domain)
            .unwrap_or_else(|| DEFAULT_DOMAIN.into())
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if !weft_api::valid_dns_name(&domain) {
            return Err(ConfigError::Invalid {
                setting: "domain",
                why: format!("{domain:?} is not a DNS name"),
            });
        }
        let iptables = match o.iptables.or(file.iptables).as_deref() {
            None | Some("auto") => None,
            Some("legacy") => Some(Backend::Legacy),
            Some("nft") => Some(Backend::Nft),
            Some(other) => {
                return Err(ConfigError::Invalid {
                    setting: "iptables",
                    why: format!("{other:?}: use auto, legacy or nft"),
                })
            }
        };
        let backend = match o.backend.or(file.mesh.backend) {
            None => TunnelBackend::Wireguard,
            Some(b) => b.parse().map_err(|why| ConfigError::Invalid {
                setting: "backend",
                why,
            })?,
        };
        let host_ttl =
            Duration::from_secs(o.host_ttl_secs.or(file.mesh.host_ttl_secs).unwrap_or(15));
        if host_ttl < Duration::from_secs(2) {
            return Err(ConfigError::Invalid {
                setting: "host_ttl_secs",
                why: "must be at least 2 seconds".into(),
            });
        }
        let mesh = MeshConfig {
            backend,
            underlay_addr: o.underlay_addr.or(file.mesh.underlay_addr),
            host_ttl,
            wg_port: o.wg_port.or(file.mesh.wg_port).unwrap_or(51820),
            vxlan_port: o.vxlan_port.or(file.mesh.vxlan_port).unwrap_or(4789),
            vni: o.vni.or(file.mesh.vni).unwrap_or(42),
        };
        let dns_enabled = !o.no_dns && file.dns.enabled.unwrap_or(true);
        let dns = dns_enabled.then(|| DnsSettings {
            ttl: Duration::from_secs(o.dns_ttl_secs.or(file.dns.ttl_secs).unwrap_or(1)),
            resolv_conf: o
                .dns_resolv_conf
                .or(file.dns.resolv_conf)
                .unwrap_or_else(|| "/etc/resolv.conf".into()),
            extra_listen: if o.dns_extra_listen.is_empty() {
                file.dns.extra_listen.unwrap_or_default()
            } else {
                o.dns_extra_listen
            },
            upstream_timeout: Duration::from_millis(
                o.dns_upstream_timeout_ms
                    .or(file.dns.upstream_timeout_ms)
                    .unwrap_or(1500),
            ),
        });
        let defaults = IpamConfig::default();
        let ipam = IpamConfig {
            cluster_range: o
                .cluster_range
                .or(file.ipam.cluster_range)
                .unwrap_or(defaults.cluster_range),
            block_prefix: o
                .block_prefix
                .or(file.ipam.block_prefix)
                .unwrap_or(defaults.block_prefix),
            block_grace: o
                .block_grace_secs
                .or(file.ipam.block_grace_secs)
                .map(Duration::from_secs)
                .unwrap_or(defaults.block_grace),
        };
        ipam.validate()?;
        let store = match o.store {
            Some(spec) => parse_store(&spec)?,
            None => match file.store.backend.as_deref() {
                None | Some("sqlite") => StoreConfig::Sqlite {
                    path: file
                        .store
                        .path
                        .unwrap_or_else(|| state_dir.join("store.db")),
                },
                Some("etcd") => {
                    StoreConfig::Etcd(EtcdConfig::new(file.store.endpoints.unwrap_or_default()))
                }
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        setting: "store.backend",
                        why: format!("{other:?}: use sqlite or etcd"),
                    })
                }
            },
        };
        if let StoreConfig::Etcd(e) = &store {
            if e.endpoints.is_empty() {
                return Err(ConfigError::Invalid {
                    setting: "store.endpoints",
                    why: "the etcd backend needs at least one endpoint".into(),
                });
            }
        }
        let keys = weft_model::Keys::new(
            &o.store_prefix
                .or(file.store.prefix)
                .unwrap_or_else(|| DEFAULT_PREFIX.into()),
        );
        let metrics_addr = match o.metrics_addr.or(file.metrics_addr) {
            None => None,
            Some(a) if matches!(a.trim(), "" | "off" | "none") => None,
            Some(a) => Some(a.trim().parse().map_err(|e| ConfigError::Invalid {
                setting: "metrics_addr",
                why: format!("{a:?}: {e} (use IP:PORT, e.g. 127.0.0.1:9542, or off)"),
            })?),
        };
        let cni = crate::install::CniSettings::from_file(file.cni);
        let host_id = o.host_id.or(file.host_id);
        if let Some(id) = &host_id {
            if !weft_api::valid_container_id(id) {
                return Err(ConfigError::Invalid {
                    setting: "host_id",
                    why: format!("{id:?}: use letters, digits, '.', '_' and '-'"),
                });
            }
        }
        Ok(Config {
            host_id,
            state_dir,
            socket,
            bridge,
            mtu,
            domain,
            log_level: o
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            iptables,
            mesh,
            dns,
            ipam,
            store,
            keys,
            dns_addr: weft_api::DNS_ADDR,
            metrics_addr,
            cni,
        })
    }
}

/// `sqlite:/path` or `etcd:http://a:2379,http://b:2379`.
pub fn parse_store(spec: &str) -> Result<StoreConfig, ConfigError> {
    match spec.split_once(':') {
        Some(("sqlite", path)) if !path.is_empty() => Ok(StoreConfig::Sqlite { path: path.into() }),
        Some(("etcd", urls)) if !urls.is_empty() => Ok(StoreConfig::Etcd(EtcdConfig::new(
            urls.split(',').map(|s| s.trim().to_owned()).collect(),
        ))),
        _ => Err(ConfigError::Invalid {
            setting: "store",
            why: format!("{spec:?}: use sqlite:PATH or etcd:URL[,URL...]"),
        }),
    }
}

/// The host id: configured, or kept in `<state_dir>/host-id`, or made up
/// from the hostname and a random suffix on first start.
pub fn host_id(cfg: &Config) -> std::io::Result<String> {
    if let Some(id) = &cfg.host_id {
        return Ok(id.clone());
    }
    let path = cfg.state_dir.join("host-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if weft_api::valid_container_id(id) {
            return Ok(id.to_owned());
        }
    }
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_else(|_| "host".into())
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect::<String>();
    let mut random = [0u8; 3];
    weft_sys::random::fill(&mut random)?;
    let id = format!(
        "{}-{:02x}{:02x}{:02x}",
        if hostname.is_empty() {
            "host"
        } else {
            &hostname
        },
        random[0],
        random[1],
        random[2]
    );
    std::fs::create_dir_all(&cfg.state_dir)?;
    std::fs::write(&path, format!("{id}\n"))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_without_a_file() {
        let c = Config::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.bridge, "weft0");
        assert_eq!(c.socket, PathBuf::from("/run/weft/netd.sock"));
        assert_eq!(c.ipam, IpamConfig::default());
        assert_eq!(
            c.store,
            StoreConfig::Sqlite {
                path: "/var/lib/weft/store.db".into()
            }
        );
        assert_eq!(c.domain, "weft.internal");
        assert_eq!(c.iptables, None);
        assert_eq!(c.metrics_addr, None, "metrics are off by default");
        assert_eq!(c.cni.bin_dir, PathBuf::from("/opt/cni/bin"));
        assert_eq!(c.cni.conf_dir, PathBuf::from("/etc/cni/net.d"));
    }

    #[test]
    fn metrics_address_and_cni_settings() {
        let file: FileConfig = toml::from_str(
            r#"
            metrics_addr = "127.0.0.1:9542"
            [cni]
            bin_dir = "/host/opt/cni/bin"
            with_portmap = true
            "#,
        )
        .unwrap();
        let c = Config::resolve(file, Overrides::default()).unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9542".parse().unwrap()));
        assert_eq!(c.cni.bin_dir, PathBuf::from("/host/opt/cni/bin"));
        assert!(c.cni.with_portmap && !c.cni.with_tuning);
        let file: FileConfig = toml::from_str(r#"metrics_addr = "127.0.0.1:9542""#).unwrap();
        let o = Overrides {
            metrics_addr: Some("off".into()),
            ..Overrides::default()
        };
        assert_eq!(Config::resolve(file, o).unwrap().metrics_addr, None);
        let e = Config::resolve(
            FileConfig::default(),
            Overrides {
                metrics_addr: Some("localhost".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("metrics_addr"), "{e}");
    }

    #[test]
    fn file_then_flags() {
        let file: FileConfig = toml::from_str(
            r#"
            bridge = "br-file"
            state_dir = "/tmp/x"
            iptables = "legacy"
            [ipam]
            cluster_range = "10.50.0.0/16"
            block_prefix = 26
            [store]
            backend = "etcd"
            endpoints = ["http://127.0.0.1:2379"]
            "#,
        )
        .unwrap();
        let o = Overrides {
            bridge: Some("br-flag".into()),
            ..Overrides::default()
        };
        let c = Config::resolve(file, o).unwrap();
        assert_eq!(c.bridge, "br-flag");
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.ipam.block_prefix, 26);
        assert_eq!(c.iptables, Some(Backend::Legacy));
        assert!(matches!(c.store, StoreConfig::Etcd(_)));
    }

    #[test]
    fn bad_settings_say_what_is_wrong() {
        let err = |o: Overrides| {
            Config::resolve(FileConfig::default(), o)
                .unwrap_err()
                .to_string()
        };
        let e = err(Overrides {
            cluster_range: Some("10.42.0.1/16".parse().unwrap()),
            ..Overrides::default()
        });
        assert!(e.contains("not a network address"), "{e}");
        let e = err(Overrides {
            bridge: Some("much-too-long-bridge".into()),
            ..Overrides::default()
        });
        assert!(e.contains("bridge"), "{e}");
        let e = err(Overrides {
            store: Some("redis:x".into()),
            ..Overrides::default()
        });
        assert!(e.contains("sqlite:PATH"), "{e}");
        let e = err(Overrides {
            iptables: Some("ebpf".into()),
            ..Overrides::default()
        });
        assert!(e.contains("auto, legacy or nft"), "{e}");
        assert!(
            toml::from_str::<FileConfig>("brige = 'x'").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn store_specs() {
        assert_eq!(
            parse_store("sqlite:/a/b.db").unwrap(),
            StoreConfig::Sqlite {
                path: "/a/b.db".into()
            }
        );
        let StoreConfig::Etcd(e) = parse_store("etcd:http://a:1,http://b:2").unwrap() else {
            panic!()
        };
        assert_eq!(e.endpoints, ["http://a:1", "http://b:2"]);
        assert!(parse_store("etcd:").is_err());
    }
}
