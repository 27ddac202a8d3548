//! The store key layout, in one place. Every key weft reads or writes is
//! built here from the cluster's prefix, which [`Keys::new`] normalises (`/x`
//! and `/x/` are the same prefix), so no caller can glue a key together
//! differently from another.
//!
//! Under the prefix (default [`DEFAULT_PREFIX`]):
//! * `ipam/config` — the cluster's address plan.
//! * `ipam/blocks/<block>` — one lease per host block.
//! * `ipam/addrs/<block>/<addr>` — one record per endpoint address.
//! * `ipam/cursor/<block>` — the last address handed out in a block.
//! * `endpoints/<host>/<container>/<ifname>` — one endpoint record per
//!   container interface, read by dnsd on every host.
//! * `hosts/<host>` — one host record per live host, under a lease.
//! * `policy/cluster` — the network policy document (JSON of
//!   [`crate::Policy`]), written with compare-and-swap; every netd follows
//!   `policy/`.

/// The prefix every key lives under unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "/weft/";

/// The key layout under one normalised prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new(DEFAULT_PREFIX)
    }
}

impl Keys {
    /// The layout under `prefix`, normalised: surrounding whitespace is
    /// dropped and a missing trailing `/` added (`/x` → `/x/`; `` → `/`).
    pub fn new(prefix: &str) -> Self {
        let prefix = prefix.trim();
        let root = if prefix.ends_with('/') {
            prefix.to_owned()
        } else {
            format!("{prefix}/")
        };
        Keys { root }
    }

    /// The normalised prefix, ending in `/`.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The cluster's address plan.
    pub fn ipam_config(&self) -> String {
        format!("{}ipam/config", self.root)
    }

    /// Prefix of all block leases.
    pub fn ipam_blocks(&self) -> String {
        format!("{}ipam/blocks/", self.root)
    }

    /// The lease of block `block` (its id, e.g. `10.42.0.0-24`).
    pub fn ipam_block(&self, block: &str) -> String {
        format!("{}{block}", self.ipam_blocks())
    }

    /// Prefix of the address records of block `block`.
    pub fn ipam_addrs(&self, block: &str) -> String {
        format!("{}ipam/addrs/{block}/", self.root)
    }

    /// The allocation cursor of block `block`.
    pub fn ipam_cursor(&self, block: &str) -> String {
        format!("{}ipam/cursor/{block}", self.root)
    }

    /// Prefix of every endpoint record of the cluster (dnsd watches it).
    pub fn endpoints(&self) -> String {
        format!("{}endpoints/", self.root)
    }

    /// Prefix of the endpoint records of host `host`.
    pub fn host_endpoints(&self, host: &str) -> String {
        format!("{}{host}/", self.endpoints())
    }

    /// The endpoint record of `container`'s interface `ifname` on `host`.
    pub fn endpoint(&self, host: &str, container: &str, ifname: &str) -> String {
        format!("{}{container}/{ifname}", self.host_endpoints(host))
    }

    /// Prefix of every host record.
    pub fn hosts(&self) -> String {
        format!("{}hosts/", self.root)
    }

    /// The record of host `host`.
    pub fn host(&self, host: &str) -> String {
        format!("{}{host}", self.hosts())
    }

    /// Prefix of the network policy (every netd follows it).
    pub fn policy(&self) -> String {
        format!("{}policy/", self.root)
    }

    /// The cluster's policy document.
    pub fn policy_doc(&self) -> String {
        format!("{}cluster", self.policy())
    }

    /// Prefix of every service record ([`crate::ServiceRecord`]).
    pub fn services(&self) -> String {
        format!("{}services/", self.root)
    }

    /// The record of service `name`.
    pub fn service(&self, name: &crate::ServiceName) -> String {
        format!("{}{}", self.services(), name.key_suffix())
    }

    /// The service named by a key under [`Keys::services`], if it is one.
    pub fn service_of_key(&self, key: &str) -> Option<crate::ServiceName> {
        let suffix = key.strip_prefix(&self.services())?;
        crate::ServiceName::from_key_suffix(suffix).ok()
    }

    /// Prefix of the VIP claims.
    pub fn vips(&self) -> String {
        format!("{}vips/", self.root)
    }

    /// The claim of virtual IP `vip` (its value: the service's name);
    /// created by compare-and-swap, so an address has one service at most.
    pub fn vip(&self, vip: std::net::Ipv4Addr) -> String {
        format!("{}{vip}", self.vips())
    }

    /// Prefix of every health record ([`crate::HealthRecord`]).
    pub fn health(&self) -> String {
        format!("{}health/", self.root)
    }

    /// Prefix of the health records of host `host`'s containers.
    pub fn host_health(&self, host: &str) -> String {
        format!("{}{host}/", self.health())
    }

    /// The health of `container`'s interface `ifname` on `host`.
    pub fn health_of(&self, host: &str, container: &str, ifname: &str) -> String {
        format!("{}{container}/{ifname}", self.host_health(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_with_and_without_slash_is_the_same() {
        assert_eq!(Keys::new("/x"), Keys::new("/x/"));
        assert_eq!(Keys::new(" /x/ ").root(), "/x/");
        assert_eq!(Keys::new("").root(), "/");
        assert_eq!(Keys::default().root(), "/weft/");
    }

    #[test]
    fn every_key_is_under_the_prefix_after_a_slash() {
        for prefix in ["/x", "/x/", "/weft/", "cluster-a"] {
            let k = Keys::new(prefix);
            let root = k.root().to_owned();
            assert!(root.ends_with('/'), "{root}");
            for key in [
                k.ipam_config(),
                k.ipam_blocks(),
                k.ipam_block("10.42.0.0-24"),
                k.ipam_addrs("10.42.0.0-24"),
                k.ipam_cursor("10.42.0.0-24"),
                k.endpoints(),
                k.host_endpoints("h0"),
                k.endpoint("h0", "c1", "eth0"),
                k.hosts(),
                k.host("h0"),
                k.policy(),
                k.policy_doc(),
                k.services(),
                k.service(&"web.shop".parse().unwrap_or_else(|e| panic!("{e}"))),
                k.vips(),
                k.vip(std::net::Ipv4Addr::new(10, 43, 0, 2)),
                k.health(),
                k.host_health("h0"),
                k.health_of("h0", "c1", "eth0"),
            ] {
                let rest = key
                    .strip_prefix(&root)
                    .unwrap_or_else(|| panic!("{key} not under {root}"));
                assert!(
                    [
                        "ipam/",
                        "endpoints/",
                        "hosts/",
                        "policy/",
                        "services/",
                        "vips/",
                        "health/"
                    ]
                    .iter()
                    .any(|s| rest.starts_with(s)),
                    "{key}"
                );
            }
        }
        let k = Keys::new("/x");
        assert_eq!(k.endpoint("h0", "c1", "eth0"), "/x/endpoints/h0/c1/eth0");
        assert_eq!(k.host("h0"), "/x/hosts/h0");
        assert_eq!(k.ipam_config(), "/x/ipam/config");
        assert_eq!(k.policy_doc(), "/x/policy/cluster");
        assert!(k.policy_doc().starts_with(&k.policy()));
        let web = "web.shop".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(k.service(&web), "/x/services/shop/web");
        assert_eq!(k.service_of_key("/x/services/shop/web"), Some(web));
        assert_eq!(
            k.service_of_key("/x/services/db").map(|n| n.to_string()),
            Some("db".to_owned())
        );
        assert_eq!(k.service_of_key("/x/hosts/h0"), None);
        assert_eq!(
            k.vip(std::net::Ipv4Addr::new(10, 43, 0, 2)),
            "/x/vips/10.43.0.2"
        );
        assert_eq!(k.health_of("h0", "c1", "eth0"), "/x/health/h0/c1/eth0");
    }

    #[test]
    fn a_host_endpoints_prefix_does_not_cover_a_longer_host_name() {
        let k = Keys::default();
        assert!(!k
            .endpoint("h10", "c", "eth0")
            .starts_with(&k.host_endpoints("h1")));
    }
}
