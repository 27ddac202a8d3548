//! Every netd setting, declared once: one struct per section of the TOML
//! file, each field carrying its TOML key (the field name), its flag and
//! `WEFT_*` variable, its help text and its default (a named constant).
//! [`crate::layered`] merges the layers; [`super::Config::resolve`] checks
//! the values and turns them into what the daemon uses. README's settings
//! table is checked against these structs by a test (`config::readme`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::{BoolishValueParser, TypedValueParser};
use ipnetwork::Ipv4Network;
use serde::Deserialize;
use weft_model::{HostId, IfName, TunnelBackend};
use weft_store::StoreConfig;

use super::ConfigError;
use crate::install::CniSettings;
use crate::layered;

/// Where netd looks for its settings file (a missing file there means all
/// defaults; `--config` / `WEFT_CONFIG` names another, which must exist).
pub const DEFAULT_CONFIG: &str = "/etc/weft/netd.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/weft";
pub const DEFAULT_BRIDGE: &str = "weft0";
pub const DEFAULT_LOG: &str = "info";
/// `auto`: the iptables backend the host already uses.
pub const DEFAULT_IPTABLES: &str = "auto";
pub const DEFAULT_BACKEND: TunnelBackend = TunnelBackend::Wireguard;
/// A host that stops renewing leaves the mesh after this long.
pub const DEFAULT_HOST_TTL: Duration = Duration::from_secs(15);
/// The shortest host TTL netd accepts (it renews at a third of it).
pub const MIN_HOST_TTL: Duration = Duration::from_secs(2);
/// WireGuard's registered port.
pub const DEFAULT_WG_PORT: u16 = 51820;
/// VXLAN's IANA port.
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
pub const DEFAULT_VNI: u32 = 42;
/// No automatic key rotation.
pub const DEFAULT_WG_ROTATE_INTERVAL_SECS: u64 = 0;
/// Between announcing a next WireGuard key and switching to it.
pub const DEFAULT_WG_ROTATE_SETTLE_MS: u64 = 3000;
/// The shortest automatic rotation interval netd accepts.
pub const MIN_WG_ROTATE_INTERVAL_SECS: u64 = 60;
/// The embedded store's backend when the file names none.
pub const DEFAULT_STORE_BACKEND: &str = "sqlite";
/// The embedded store's file in the state dir.
pub const STORE_FILE: &str = "store.db";

/// The settings file: top-level keys, then one table per section. Also the
/// flags and variables of `run`, `install-cni`, `sidecar` and `teardown`
/// (the `[cni]` table's flags belong to `install-cni` and `sidecar` only).
#[derive(Debug, Clone, PartialEq, Deserialize, clap::Args)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
#[group(skip)]
pub struct Settings {
    /// This host's name in the cluster (default: generated on first start,
    /// kept in the state dir).
    #[arg(long, env = "WEFT_HOST_ID")]
    pub host_id: Option<HostId>,
    /// Directory for the host id, keys and the embedded store.
    #[arg(long, env = "WEFT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The control socket.
    #[arg(long, env = "WEFT_SOCKET", default_value = weft_api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The bridge containers attach to.
    #[arg(long, env = "WEFT_BRIDGE", default_value = DEFAULT_BRIDGE)]
    pub bridge: IfName,
    /// MTU of the bridge and container interfaces (default: from the
    /// default-route interface, minus the tunnel overhead).
    #[arg(long, env = "WEFT_MTU")]
    pub mtu: Option<u32>,
    /// DNS domain of the cluster.
    #[arg(long, env = "WEFT_DOMAIN", default_value = weft_model::DEFAULT_DOMAIN)]
    pub domain: String,
    /// Log filter, e.g. `info` or `weft_netd=debug`.
    #[arg(long, env = "WEFT_LOG", default_value = DEFAULT_LOG)]
    pub log_level: String,
    /// iptables backend: auto, legacy or nft.
    #[arg(long, env = "WEFT_IPTABLES", default_value = DEFAULT_IPTABLES)]
    pub iptables: String,
    /// Serve Prometheus /metrics, /healthz and /readyz over plain HTTP on
    /// this address, e.g. 127.0.0.1:9542 (default: off; `off` turns off
    /// an address set in the file).
    #[arg(long, env = "WEFT_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    #[command(flatten)]
    pub mesh: MeshSection,
    #[command(flatten)]
    pub dns: DnsSection,
    #[command(flatten)]
    pub ipam: IpamSection,
    #[command(flatten)]
    pub services: ServicesSection,
    #[command(flatten)]
    pub wireguard: WireguardSection,
    #[command(flatten)]
    pub store: StoreSection,
    /// `[cni]`: what `install-cni` puts on the host (its flags are on
    /// `install-cni` and `sidecar`).
    #[arg(skip)]
    pub cni: CniSettings,
}

/// `[mesh]`: how this host joins the others.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, clap::Args)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
#[group(id = "mesh")]
#[command(next_help_heading = "Mesh ([mesh] in the file)")]
pub struct MeshSection {
    /// Tunnel backend: wireguard (encrypted) or vxlan (plain).
    #[arg(long, env = "WEFT_BACKEND", default_value = DEFAULT_BACKEND.as_str())]
    #[serde(deserialize_with = "parsed")]
    pub backend: TunnelBackend,
    /// This host's underlay address (default: the address of the interface
    /// of the default route).
    #[arg(long, env = "WEFT_UNDERLAY_ADDR")]
    pub underlay_addr: Option<Ipv4Addr>,
    /// Seconds a host stays in the mesh after its netd stops renewing.
    #[arg(long, env = "WEFT_HOST_TTL_SECS", default_value_t = DEFAULT_HOST_TTL.as_secs())]
    pub host_ttl_secs: u64,
    /// WireGuard UDP port.
    #[arg(long, env = "WEFT_WG_PORT", default_value_t = DEFAULT_WG_PORT)]
    pub wg_port: u16,
    /// VXLAN UDP port.
    #[arg(long, env = "WEFT_VXLAN_PORT", default_value_t = DEFAULT_VXLAN_PORT)]
    pub vxlan_port: u16,
    /// VXLAN network identifier.
    #[arg(long, env = "WEFT_VNI", default_value_t = DEFAULT_VNI)]
    pub vni: u32,
}

/// `[dns]`: the DNS server, the `dnsd` binary netd runs as its child
/// ([`crate::dns`]; the defaults are dnsd's).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, clap::Args)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
#[group(id = "dns")]
#[command(next_help_heading = "DNS ([dns] in the file)")]
pub struct DnsSection {
    /// Serve DNS at 169.254.169.250 (the flag is the opposite: `--no-dns`
    /// or `WEFT_NO_DNS=1` turns it off).
    #[arg(long = "no-dns", env = "WEFT_NO_DNS", action = clap::ArgAction::SetTrue,
          help = "Do not serve DNS at 169.254.169.250 (in the file: enabled = false)",
          value_parser = BoolishValueParser::new().map(|no: bool| !no))]
    pub enabled: bool,
    /// DNS answer TTL in seconds.
    #[arg(long = "dns-ttl-secs", env = "WEFT_DNS_TTL_SECS",
          default_value_t = weft_dnsd::DEFAULT_TTL.as_secs())]
    pub ttl_secs: u64,
    /// The host's resolv.conf with the upstream resolvers.
    #[arg(long = "dns-resolv-conf", env = "WEFT_DNS_RESOLV_CONF",
          default_value = weft_dnsd::DEFAULT_RESOLV_CONF)]
    pub resolv_conf: PathBuf,
    /// Another address for DNS to answer on (repeatable, or a
    /// comma-separated list), e.g. 127.0.0.1:5353.
    #[arg(
        long = "dns-extra-listen",
        env = "WEFT_DNS_EXTRA_LISTEN",
        value_delimiter = ','
    )]
    pub extra_listen: Vec<SocketAddr>,
    /// How long to wait for an upstream resolver, in milliseconds.
    #[arg(long = "dns-upstream-timeout-ms", env = "WEFT_DNS_UPSTREAM_TIMEOUT_MS",
          default_value_t = millis(weft_dnsd::DEFAULT_UPSTREAM_TIMEOUT))]
    pub upstream_timeout_ms: u64,
    /// Where dnsd serves its Prometheus `weft_dns_*` metrics over plain
    /// HTTP, e.g. 127.0.0.1:9543 (default: off; dnsd is a process of its
    /// own, netd's /metrics does not have them).
    /// (The key is not `metrics_addr`: that is netd's own, top level.)
    #[arg(long = "dns-metrics-addr", env = "WEFT_DNS_METRICS_ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// `[ipam]`: the cluster's address plan (the defaults are IPAM's).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, clap::Args)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
#[group(id = "ipam")]
#[command(next_help_heading = "Addresses ([ipam] in the file)")]
pub struct IpamSection {
    /// Cluster range: every container address comes from it.
    #[arg(long, env = "WEFT_CLUSTER_RANGE", default_value_t = weft_model::DEFAULT_CLUSTER_RANGE)]
    pub cluster_range: Ipv4Network,
    /// Prefix length of each host's block, e.g. 24.
    #[arg(long, env = "WEFT_BLOCK_PREFIX", default_value_t = weft_ipam::DEFAULT_BLOCK_PREFIX)]
    pub block_prefix: u8,
    /// Seconds a dead host's block is kept before another host may take it.
    #[arg(long, env = "WEFT_BLOCK_GRACE_SECS",
          default_value_t = weft_ipam::DEFAULT_BLOCK_GRACE.as_secs())]
    pub block_grace_secs: u64,
    /// Service range: every service's virtual IP comes from it.
    #[arg(long, env = "WEFT_SERVICE_RANGE", default_value_t = weft_model::DEFAULT_SERVICE_RANGE)]
    pub service_range: Ipv4Network,
}

/// `[services]`: service records and their virtual IPs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, clap::Args)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
#[group(id = "services")]
#[command(next_help_heading = "Services ([services] in the file)")]
pub struct ServicesSection {
    /// Seconds a service keeps its record and VIP after its last container
    /// went.
    #[arg(long = "service-grace-secs", env = "WEFT_SERVICE_GRACE_SECS",
          default_value_t = weft_model::DEFAULT_SERVICE_GRACE.as_secs())]
    pub grace_secs: u64,
}

/// `[wireguard]`: the WireGuard key's rotation (`netd rotate-key`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, clap::Args)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
#[group(id = "wireguard")]
#[command(next_help_heading = "WireGuard ([wireguard] in the file)")]
pub struct WireguardSection {
    /// Rotate the WireGuard key every this many seconds (0: only on
    /// `netd rotate-key`).
    #[arg(long = "wg-rotate-interval-secs", env = "WEFT_WG_ROTATE_INTERVAL_SECS",
          default_value_t = DEFAULT_WG_ROTATE_INTERVAL_SECS)]
    pub rotate_interval_secs: u64,
    /// Milliseconds between announcing the next key and switching to it
    /// (every peer must have read the announcement by then).
    #[arg(long = "wg-rotate-settle-ms", env = "WEFT_WG_ROTATE_SETTLE_MS",
          default_value_t = DEFAULT_WG_ROTATE_SETTLE_MS)]
    pub rotate_settle_ms: u64,
    /// Data-path workers per direction (TUN queues, sockets on the port);
    /// 0: one per CPU, at most 4.
    #[arg(long = "wg-queues", env = "WEFT_WG_QUEUES", default_value_t = 0)]
    pub queues: usize,
}

/// `[store]`: where the cluster's state lives. The file names it in parts
/// (`backend`, `path`, `endpoints`); the command line and the environment
/// in one value, `--store` / `WEFT_STORE`, which wins.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, clap::Args)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
#[group(id = "store")]
#[command(next_help_heading = "Store ([store] in the file)")]
pub struct StoreSection {
    /// Store: `sqlite:PATH` or `etcd:URL[,URL...]` (default: SQLite in the
    /// state dir).
    #[arg(long = "store", env = "WEFT_STORE", value_name = "SPEC")]
    #[serde(skip)]
    pub spec: Option<StoreConfig>,
    /// `sqlite` or `etcd` (file only).
    #[arg(skip = DEFAULT_STORE_BACKEND.to_owned())]
    pub backend: String,
    /// The SQLite file (file only; default `<state_dir>/store.db`).
    #[arg(skip)]
    pub path: Option<PathBuf>,
    /// etcd client URLs, e.g. `["http://10.0.0.1:2379"]` (file only).
    #[arg(skip)]
    pub endpoints: Vec<String>,
    /// Key prefix of the cluster in the store.
    #[arg(long = "store-prefix", env = "WEFT_STORE_PREFIX", default_value = weft_model::DEFAULT_PREFIX)]
    pub prefix: String,
}

macro_rules! builtin_default {
    ($($t:ty),*) => {$(
        /// The built-in defaults (each field's `default_value`).
        impl Default for $t {
            fn default() -> Self {
                layered::builtin()
            }
        }
    )*};
}
builtin_default!(
    Settings,
    MeshSection,
    DnsSection,
    IpamSection,
    ServicesSection,
    WireguardSection,
    StoreSection
);

impl Settings {
    /// Reads the settings file over the built-in defaults. A missing file is
    /// all defaults unless it was named `explicit`ly.
    pub fn load(path: &Path, explicit: bool) -> Result<Settings, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Settings::default())
            }
            Err(error) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    error,
                })
            }
        };
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            error: Box::new(e),
        })
    }
}

impl StoreSection {
    /// The store to open: `--store` / `WEFT_STORE`, else the `[store]`
    /// table, else SQLite in `state_dir`.
    pub fn resolve(self, state_dir: &Path) -> Result<StoreConfig, ConfigError> {
        if let Some(spec) = self.spec {
            return Ok(spec);
        }
        match self.backend.as_str() {
            "sqlite" => Ok(StoreConfig::Sqlite {
                path: self.path.unwrap_or_else(|| state_dir.join(STORE_FILE)),
            }),
            "etcd" => StoreConfig::etcd(self.endpoints).map_err(|e| ConfigError::Invalid {
                setting: "store.endpoints",
                why: e.to_string(),
            }),
            other => Err(ConfigError::Invalid {
                setting: "store.backend",
                why: format!("{other:?}: use sqlite or etcd"),
            }),
        }
    }
}

/// A value the file gives as a string, parsed like its flag (same rule,
/// same message).
fn parsed<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// A duration in whole milliseconds (for a default).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layered::Overrides;

    /// The file, then these flags (the environment as the test runs).
    fn layered(file: &str, flags: &[&str]) -> Settings {
        let mut s: Settings = toml::from_str(file).unwrap();
        Overrides::<Settings>::parse_from(flags)
            .unwrap()
            .apply(&mut s)
            .unwrap();
        s
    }

    #[test]
    fn every_section_has_its_defaults() {
        let s = Settings::default();
        assert_eq!(s.bridge.as_str(), DEFAULT_BRIDGE);
        assert_eq!(s.mesh.backend, TunnelBackend::Wireguard);
        assert_eq!(s.mesh.wg_port, DEFAULT_WG_PORT);
        assert!(s.dns.enabled, "DNS is on by default");
        assert_eq!(s.dns.ttl_secs, 1);
        assert_eq!(s.dns.upstream_timeout_ms, 1500);
        assert_eq!(s.ipam.cluster_range, weft_model::DEFAULT_CLUSTER_RANGE);
        assert_eq!(s.ipam.service_range, weft_model::DEFAULT_SERVICE_RANGE);
        assert_eq!(s.services.grace_secs, 600);
        assert_eq!(s.store.backend, "sqlite");
        assert_eq!(s.store.spec, None);
        assert_eq!(s.cni, CniSettings::default());
        assert_eq!(
            toml::from_str::<Settings>("").unwrap(),
            s,
            "an empty file is all defaults"
        );
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file = r#"
            bridge = "br-file"
            state_dir = "/tmp/x"
            [mesh]
            backend = "vxlan"
            vni = 7
            [dns]
            enabled = false
            [cni]
            with_portmap = true
        "#;
        let s = layered(file, &[]);
        assert_eq!(s.bridge.as_str(), "br-file");
        assert_eq!(s.mesh.backend, TunnelBackend::Vxlan);
        assert_eq!(s.mesh.vni, 7);
        assert_eq!(
            s.mesh.wg_port, DEFAULT_WG_PORT,
            "untouched keys keep defaults"
        );
        assert!(!s.dns.enabled);
        assert!(s.cni.with_portmap);
        let s = layered(file, &["--bridge", "br-flag", "--vni", "9", "--wg-port=1"]);
        assert_eq!(s.bridge.as_str(), "br-flag");
        assert_eq!(s.mesh.vni, 9);
        assert_eq!(s.mesh.wg_port, 1);
        assert_eq!(
            s.state_dir,
            PathBuf::from("/tmp/x"),
            "not given: the file's"
        );
        assert!(!s.dns.enabled, "a flag not given does not reset the file");
        assert!(s.cni.with_portmap, "run's flags leave [cni] alone");
    }

    #[test]
    fn no_dns_turns_dns_off() {
        assert!(!layered("", &["--no-dns"]).dns.enabled);
        assert!(layered("", &[]).dns.enabled);
        let mut cmd = <Overrides<Settings> as clap::Args>::augment_args(
            clap::Command::new("netd").no_binary_name(true),
        );
        let help = cmd.render_long_help().to_string();
        assert!(help.contains("--no-dns"), "{help}");
    }

    #[test]
    fn bad_values_name_the_flag_and_what_to_use() {
        let e = |flags: &[&str]| {
            Overrides::<Settings>::parse_from(flags)
                .unwrap_err()
                .to_string()
        };
        let msg = e(&["--bridge", "much-too-long-bridge"]);
        assert!(msg.contains("--bridge") && msg.contains("1-15"), "{msg}");
        let msg = e(&["--backend", "ipip"]);
        assert!(msg.contains("use wireguard or vxlan"), "{msg}");
        let msg = e(&["--store", "redis:x"]);
        assert!(msg.contains("sqlite:PATH"), "{msg}");
        let msg = toml::from_str::<Settings>("[mesh]\nbackend = 'ipip'")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("use wireguard or vxlan"), "{msg}");
        assert!(
            toml::from_str::<Settings>("brige = 'x'").is_err(),
            "unknown keys are refused"
        );
        assert!(toml::from_str::<Settings>("[mesh]\nwg_prot = 1").is_err());
    }

    #[test]
    fn the_store_comes_from_the_flag_or_the_table() {
        let dir = Path::new("/var/lib/weft");
        assert_eq!(
            StoreSection::default().resolve(dir).unwrap(),
            StoreConfig::Sqlite {
                path: dir.join("store.db")
            }
        );
        let file = "[store]\nbackend = 'etcd'\nendpoints = ['http://127.0.0.1:2379']";
        let s = layered(file, &[]);
        assert!(matches!(s.store.resolve(dir), Ok(StoreConfig::Etcd(_))));
        let s = layered(file, &["--store", "sqlite:/tmp/s.db"]);
        assert_eq!(
            s.store.resolve(dir).unwrap(),
            StoreConfig::Sqlite {
                path: "/tmp/s.db".into()
            }
        );
        let e = layered("[store]\nbackend = 'etcd'", &[])
            .store
            .resolve(dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least one endpoint"), "{e}");
        let e = layered("[store]\nbackend = 'redis'", &[])
            .store
            .resolve(dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("use sqlite or etcd"), "{e}");
    }
}
