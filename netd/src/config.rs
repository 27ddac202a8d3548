//! netd's configuration: built-in defaults, then the TOML file
//! (`/etc/weft/netd.toml`), then `WEFT_*` environment variables, then flags
//! (see `netd run --help`). Every setting has a default that works on one
//! host with no file at all.
//!
//! * [`settings`]: every setting, declared once (TOML key, flag, variable,
//!   help, default); README's table is checked against it (`readme` tests).
//! * [`crate::layered`]: the merge of the layers.
//! * This module: [`Config::resolve`] checks the merged settings and turns
//!   them into what the daemon uses ([`Config`]), and the host id.

#[cfg(test)]
mod readme;
pub mod settings;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use weft_ipam::IpamConfig;
use weft_model::{DnsName, TunnelBackend};
use weft_store::StoreConfig;

use crate::install::CniSettings;
use crate::layered::Overrides;
use crate::nat::Backend;
pub use settings::{Settings, DEFAULT_CONFIG};

/// The settings of dnsd, netd's DNS child ([`crate::dns`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    pub ttl: Duration,
    pub resolv_conf: PathBuf,
    pub extra_listen: Vec<SocketAddr>,
    pub upstream_timeout: Duration,
    /// Where dnsd serves its own `/metrics` (`None`: off).
    pub metrics_addr: Option<SocketAddr>,
}

/// How this host joins the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    pub backend: TunnelBackend,
    pub underlay_addr: Option<Ipv4Addr>,
    pub host_ttl: Duration,
    pub wg_port: u16,
    /// WireGuard data-path workers per direction (0: one per CPU, at most 4).
    pub wg_queues: usize,
    pub vxlan_port: u16,
    pub vni: u32,
}

/// The WireGuard key's rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationConfig {
    /// Rotate automatically this often (`None`: only when asked).
    pub interval: Option<Duration>,
    /// Between announcing the next key and switching to it.
    pub settle: Duration,
}

/// Service records and their VIPs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicesConfig {
    /// How long a service keeps its record and VIP after its last
    /// container went.
    pub grace: Duration,
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
    /// DNS, served by netd's dnsd child (`None`: off).
    pub dns: Option<DnsSettings>,
    pub ipam: IpamConfig,
    pub services: ServicesConfig,
    pub rotation: RotationConfig,
    pub store: StoreConfig,
    /// The store key layout under the configured prefix (normalised).
    pub keys: weft_model::Keys,
    pub dns_addr: Ipv4Addr,
    /// Where to serve metrics and health (`None`: off).
    pub metrics_addr: Option<SocketAddr>,
    /// What `install-cni` installs.
    pub cni: CniSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause is part of the message (not a `source`), so `{:#}` does
    // not print it twice.
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path} is invalid: {error}")]
    Parse {
        path: PathBuf,
        error: Box<toml::de::Error>,
    },
    #[error("invalid setting {setting}: {why}")]
    Invalid { setting: &'static str, why: String },
    #[error("cannot apply the command line and environment: {0}")]
    Overrides(#[from] clap::Error),
    #[error(transparent)]
    Ipam(#[from] weft_ipam::ConfigError),
}

impl Config {
    /// Every layer in order: defaults, the file at `path` (`None`: the
    /// default path, which may be missing), then what the command line and
    /// environment gave (`cni`: the `[cni]` flags of `install-cni`).
    pub fn load(
        path: Option<&Path>,
        given: &Overrides<Settings>,
        cni: Option<&Overrides<CniSettings>>,
    ) -> Result<Config, ConfigError> {
        let mut settings = match path {
            Some(p) => Settings::load(p, true)?,
            None => Settings::load(Path::new(DEFAULT_CONFIG), false)?,
        };
        given.apply(&mut settings)?;
        if let Some(cni) = cni {
            cni.apply(&mut settings.cni)?;
        }
        Config::resolve(settings)
    }

    /// Checks the merged settings and turns them into the daemon's terms.
    pub fn resolve(s: Settings) -> Result<Config, ConfigError> {
        let invalid = |setting: &'static str, why: String| ConfigError::Invalid { setting, why };
        let backend = s.mesh.backend;
        if let Some(mtu) = s.mtu {
            crate::tunnel::check_mtu(backend, mtu).map_err(|e| invalid("mtu", e.to_string()))?;
        }
        let domain = s.domain.trim_end_matches('.').to_ascii_lowercase();
        if !DnsName::is_valid(&domain) {
            return Err(invalid("domain", format!("{domain:?} is not a DNS name")));
        }
        let iptables = match s.iptables.as_str() {
            "auto" => None,
            "legacy" => Some(Backend::Legacy),
            "nft" => Some(Backend::Nft),
            other => {
                return Err(invalid(
                    "iptables",
                    format!("{other:?}: use auto, legacy or nft"),
                ))
            }
        };
        let host_ttl = Duration::from_secs(s.mesh.host_ttl_secs);
        if host_ttl < settings::MIN_HOST_TTL {
            return Err(invalid(
                "host_ttl_secs",
                format!(
                    "must be at least {} seconds",
                    settings::MIN_HOST_TTL.as_secs()
                ),
            ));
        }
        let mesh = MeshConfig {
            backend,
            underlay_addr: s.mesh.underlay_addr,
            host_ttl,
            wg_port: s.mesh.wg_port,
            wg_queues: s.wireguard.queues,
            vxlan_port: s.mesh.vxlan_port,
            vni: s.mesh.vni,
        };
        let interval = s.wireguard.rotate_interval_secs;
        if interval != 0 && interval < settings::MIN_WG_ROTATE_INTERVAL_SECS {
            return Err(invalid(
                "rotate_interval_secs",
                format!(
                    "must be 0 (off) or at least {} seconds",
                    settings::MIN_WG_ROTATE_INTERVAL_SECS
                ),
            ));
        }
        let rotation = RotationConfig {
            interval: (interval != 0).then(|| Duration::from_secs(interval)),
            settle: Duration::from_millis(s.wireguard.rotate_settle_ms),
        };
        let dns = s.dns.enabled.then(|| DnsSettings {
            ttl: Duration::from_secs(s.dns.ttl_secs),
            resolv_conf: s.dns.resolv_conf,
            extra_listen: s.dns.extra_listen,
            upstream_timeout: Duration::from_millis(s.dns.upstream_timeout_ms),
            metrics_addr: s.dns.metrics_listen,
        });
        let ipam = IpamConfig {
            cluster_range: s.ipam.cluster_range,
            block_prefix: s.ipam.block_prefix,
            block_grace: Duration::from_secs(s.ipam.block_grace_secs),
            service_range: s.ipam.service_range,
        };
        ipam.validate()?;
        let keys = weft_model::Keys::new(&s.store.prefix);
        let store = s.store.resolve(&s.state_dir)?;
        let metrics_addr = match s.metrics_addr.as_deref().map(str::trim) {
            None | Some("" | "off" | "none") => None,
            Some(a) => Some(a.parse().map_err(|e| {
                invalid(
                    "metrics_addr",
                    format!("{a:?}: {e} (use IP:PORT, e.g. 127.0.0.1:9542, or off)"),
                )
            })?),
        };
        Ok(Config {
            host_id: s.host_id.map(weft_model::HostId::into_string),
            state_dir: s.state_dir,
            socket: s.socket,
            bridge: s.bridge.into_string(),
            mtu: s.mtu,
            domain,
            log_level: s.log_level,
            iptables,
            mesh,
            dns,
            ipam,
            services: ServicesConfig {
                grace: Duration::from_secs(s.services.grace_secs),
            },
            rotation,
            store,
            keys,
            dns_addr: weft_model::DNS_ADDR,
            metrics_addr,
            cni: s.cni,
        })
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
        if weft_model::HostId::is_valid(id) {
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

    fn resolve(file: &str, flags: &[&str]) -> Result<Config, ConfigError> {
        let mut s: Settings = toml::from_str(file).unwrap();
        Overrides::<Settings>::parse_from(flags)
            .unwrap()
            .apply(&mut s)
            .unwrap();
        Config::resolve(s)
    }

    #[test]
    fn defaults_work_without_a_file() {
        let c = resolve("", &[]).unwrap();
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
        assert_eq!(c.mesh.backend, TunnelBackend::Wireguard);
        assert_eq!(c.mesh.host_ttl, Duration::from_secs(15));
        assert_eq!(
            (c.mesh.wg_port, c.mesh.vxlan_port, c.mesh.vni),
            (51820, 4789, 42)
        );
        let dns = c.dns.expect("DNS is on by default");
        let lib = weft_dnsd::DnsConfig::default();
        assert_eq!(dns.ttl, lib.ttl, "netd's DNS defaults are dnsd's");
        assert_eq!(dns.resolv_conf, lib.resolv_conf);
        assert_eq!(dns.upstream_timeout, lib.upstream_timeout);
        assert_eq!(c.ipam.cluster_range, lib.cluster_range);
        assert_eq!(c.domain, lib.domain);
        assert_eq!(c.keys, weft_model::Keys::default());
    }

    #[test]
    fn key_rotation_settings() {
        let c = resolve("", &[]).unwrap();
        assert_eq!(
            c.rotation.interval, None,
            "no automatic rotation by default"
        );
        assert_eq!(c.rotation.settle, Duration::from_secs(3));
        let c = resolve(
            "[wireguard]\nrotate_interval_secs = 86400\nrotate_settle_ms = 500\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.rotation.interval, Some(Duration::from_secs(86400)));
        assert_eq!(c.rotation.settle, Duration::from_millis(500));
        let c = resolve(
            "[wireguard]\nrotate_interval_secs = 86400\n",
            &["--wg-rotate-interval-secs", "0"],
        )
        .unwrap();
        assert_eq!(c.rotation.interval, None);
        let e = resolve("[wireguard]\nrotate_interval_secs = 5\n", &[]).unwrap_err();
        assert!(e.to_string().contains("rotate_interval_secs"), "{e}");
    }

    #[test]
    fn metrics_address_and_cni_settings() {
        let file = r#"
            metrics_addr = "127.0.0.1:9542"
            [cni]
            bin_dir = "/host/opt/cni/bin"
            with_portmap = true
        "#;
        let c = resolve(file, &[]).unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9542".parse().unwrap()));
        assert_eq!(c.cni.bin_dir, PathBuf::from("/host/opt/cni/bin"));
        assert!(c.cni.with_portmap && !c.cni.with_tuning);
        let c = resolve(file, &["--metrics-addr", "off"]).unwrap();
        assert_eq!(c.metrics_addr, None, "off on the command line wins");
        let e = resolve("", &["--metrics-addr", "localhost"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics_addr") && e.contains("IP:PORT"), "{e}");
    }

    #[test]
    fn install_cni_flags_go_over_the_cni_table() {
        let file = "[cni]\nbin_dir = '/host/bin'\nconf_name = 'a.conflist'";
        let mut s: Settings = toml::from_str(file).unwrap();
        let cni =
            Overrides::<CniSettings>::parse_from(["--cni-bin-dir", "/x", "--with-tuning"]).unwrap();
        cni.apply(&mut s.cni).unwrap();
        let c = Config::resolve(s).unwrap();
        assert_eq!(c.cni.bin_dir, PathBuf::from("/x"));
        assert_eq!(c.cni.conf_name, "a.conflist");
        assert!(c.cni.with_tuning && !c.cni.with_portmap);
    }

    #[test]
    fn file_then_flags() {
        let file = r#"
            bridge = "br-file"
            state_dir = "/tmp/x"
            iptables = "legacy"
            [ipam]
            cluster_range = "10.50.0.0/16"
            block_prefix = 26
            [store]
            backend = "etcd"
            endpoints = ["http://127.0.0.1:2379"]
        "#;
        let c = resolve(file, &["--bridge", "br-flag"]).unwrap();
        assert_eq!(c.bridge, "br-flag");
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.ipam.block_prefix, 26);
        assert_eq!(c.iptables, Some(Backend::Legacy));
        assert!(matches!(c.store, StoreConfig::Etcd(_)));
        let c = resolve("state_dir = '/tmp/y'", &[]).unwrap();
        assert_eq!(
            c.store,
            StoreConfig::Sqlite {
                path: "/tmp/y/store.db".into()
            },
            "the embedded store follows the state dir"
        );
    }

    #[test]
    fn bad_settings_say_what_is_wrong() {
        let err = |file: &str, flags: &[&str]| resolve(file, flags).unwrap_err().to_string();
        let e = err("", &["--cluster-range", "10.42.0.1/16"]);
        assert!(e.contains("not a network address"), "{e}");
        let e = err("", &["--iptables", "ebpf"]);
        assert!(e.contains("auto, legacy or nft"), "{e}");
        let e = err("", &["--host-ttl-secs", "1"]);
        assert!(e.contains("at least 2 seconds"), "{e}");
        let e = err("", &["--domain", "bad domain"]);
        assert!(e.contains("not a DNS name"), "{e}");
        let e = err("", &["--mtu", "100"]);
        assert!(e.contains("mtu") && e.contains("576"), "{e}");
        let e = err("", &["--backend", "vxlan", "--mtu", "65500"]);
        assert!(e.contains("mtu"), "the range depends on the tunnel: {e}");
        assert!(resolve("", &["--mtu", "1400"]).is_ok());
        let e = toml::from_str::<Settings>("bridge = 'much-too-long-bridge'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("interface name"), "{e}");
        let e = Settings::load(Path::new("/nonexistent/netd.toml"), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/netd.toml"), "{e}");
        assert_eq!(
            Settings::load(Path::new("/nonexistent/netd.toml"), false).unwrap(),
            Settings::default(),
            "a missing file at the default path is all defaults"
        );
    }
}
