//! weft's iptables rules: NAT out of the cluster, published ports, FORWARD
//! accept, MSS clamping.
//!
//! Two halves, kept apart:
//! * pure: [`NatSpec`] says what this host needs; [`render`] turns it into one
//!   `iptables-restore --noflush` batch; [`hooks`] lists the jumps from the
//!   built-in chains; [`required_sysctls`] the kernel settings the rules rely on;
//!   [`verify::missing`] what of the applied rules an `iptables-save` lacks
//!   (another tool flushed or reloaded the tables).
//! * effects: [`Iptables`] is the only thing that runs iptables (one backend,
//!   legacy or nft, picked like kube-proxy does), through
//!   [`crate::command::Runner`]. (`conntrack` is [`crate::conntrack`]'s.)
//!
//! All rules live in weft's own chains ([`CHAINS`]). Declaring a chain in a
//! `--noflush` restore batch (`:WEFT-DNAT - [0:0]`) creates or empties just that
//! chain, so every apply replaces weft's rules as a whole, atomically, and any
//! number of applies (or daemon restarts) leaves exactly one copy of each rule.
//! The jumps from the built-in chains cannot be written idempotently in a
//! restore batch, so they are checked with `iptables -C` and inserted (at the
//! top) only when missing.
//!
//! What the rules do, for cluster range `C`, this host's block `B`, bridge
//! `BR` and DNS address `D`:
//! * nat `WEFT-POSTROUTING`: MASQUERADE traffic from `C` to outside `C`;
//!   nothing for `C`→`C` or for `D`. Also MASQUERADE for two cases of published
//!   ports: hairpin (a container of `B` reaching a published port that leads
//!   back into `B`: the reply must come back through the host to be un-NATed)
//!   and `127.0.0.1:<port>` from the host itself (source `127.0.0.0/8` leaving
//!   through `BR`; needs `route_localnet` on `BR`, see [`required_sysctls`]).
//! * nat `WEFT-PREROUTING` / `WEFT-OUTPUT` → `WEFT-DNAT` for destinations of
//!   type LOCAL (any address of the host, from outside and from the host
//!   itself) except `D`: one DNAT rule per published port.
//! * filter `WEFT-FORWARD`: ACCEPT related/established and anything in or out
//!   of `BR` (containers work when the FORWARD policy is DROP, as Docker sets
//!   it). filter `WEFT-INPUT`: DROP packets from `BR` to `127.0.0.0/8` that are
//!   not replies (`route_localnet` must not open the host's loopback services
//!   to containers).
//! * mangle `WEFT-MSS`: clamp the MSS of TCP SYNs to or from `C` to the path
//!   MTU.
//!
//! Outside these rules, hairpin needs one more thing from whoever plugs
//! containers into the bridge: when `br_netfilter` is loaded
//! (`net.bridge.bridge-nf-call-iptables=1`, common with Docker/Kubernetes), a
//! container's DNATed packet to its own published port is *bridged* back out
//! of the port it came in on, which the bridge only does with hairpin mode on
//! that port (`ip link set <host veth> type bridge_slave hairpin on`). Without
//! br_netfilter the packet is routed and hairpin mode does not matter.

mod exec;
pub mod verify;

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use weft_model::{IfName, PortMapping, Protocol};

pub use exec::{ApplyOutcome, Backend, Iptables};
pub use verify::Missing;

/// nat: hooked from PREROUTING; sends traffic for local addresses to [`DNAT_CHAIN`].
pub const PREROUTING_CHAIN: &str = "WEFT-PREROUTING";
/// nat: hooked from OUTPUT; the same for traffic the host itself sends.
pub const OUTPUT_CHAIN: &str = "WEFT-OUTPUT";
/// nat: one DNAT rule per published port.
pub const DNAT_CHAIN: &str = "WEFT-DNAT";
/// nat: hooked from POSTROUTING; MASQUERADE.
pub const POSTROUTING_CHAIN: &str = "WEFT-POSTROUTING";
/// filter: hooked from FORWARD; ACCEPT for the bridge.
pub const FORWARD_CHAIN: &str = "WEFT-FORWARD";
/// filter: hooked from INPUT; guards 127.0.0.0/8 against containers.
pub const INPUT_CHAIN: &str = "WEFT-INPUT";
/// mangle: hooked from FORWARD; MSS clamping.
pub const MSS_CHAIN: &str = "WEFT-MSS";

/// Every chain name weft owns starts with this.
pub const CHAIN_PREFIX: &str = "WEFT-";

/// weft's chains as `(table, chain)`, in the order [`render`] declares them.
pub const CHAINS: &[(&str, &str)] = &[
    ("filter", INPUT_CHAIN),
    ("filter", FORWARD_CHAIN),
    ("mangle", MSS_CHAIN),
    ("nat", PREROUTING_CHAIN),
    ("nat", OUTPUT_CHAIN),
    ("nat", DNAT_CHAIN),
    ("nat", POSTROUTING_CHAIN),
];

/// A jump from a built-in chain into one of weft's chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    /// `nat`, `filter` or `mangle`.
    pub table: &'static str,
    /// The built-in chain, e.g. `PREROUTING`.
    pub chain: &'static str,
    /// The rule's arguments, e.g. `["-j", "WEFT-PREROUTING"]`.
    pub rule: &'static [&'static str],
}

impl Hook {
    /// The hook as `iptables-save` prints it, e.g. `-A PREROUTING -j WEFT-PREROUTING`.
    pub fn save_line(&self) -> String {
        format!("-A {} {}", self.chain, self.rule.join(" "))
    }
}

const HOOKS: &[Hook] = &[
    Hook {
        table: "filter",
        chain: "INPUT",
        rule: &["-j", INPUT_CHAIN],
    },
    Hook {
        table: "filter",
        chain: "FORWARD",
        rule: &["-j", FORWARD_CHAIN],
    },
    Hook {
        table: "mangle",
        chain: "FORWARD",
        rule: &["-j", MSS_CHAIN],
    },
    Hook {
        table: "nat",
        chain: "PREROUTING",
        rule: &["-j", PREROUTING_CHAIN],
    },
    Hook {
        table: "nat",
        chain: "OUTPUT",
        rule: &["-j", OUTPUT_CHAIN],
    },
    Hook {
        table: "nat",
        chain: "POSTROUTING",
        rule: &["-j", POSTROUTING_CHAIN],
    },
];

/// The jumps from the built-in chains into weft's chains. Each is inserted
/// at the top of its built-in chain, once, when missing.
pub fn hooks() -> &'static [Hook] {
    HOOKS
}

/// One published port: `mapping.host_port` on the host leads to
/// `container:mapping.container_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedPort {
    /// The container's address (in this host's block).
    pub container: Ipv4Addr,
    pub mapping: PortMapping,
}

impl PublishedPort {
    /// The host address the port is restricted to; `None` (also for a
    /// `0.0.0.0` host IP) means every address of the host.
    pub fn host_ip(&self) -> Option<Ipv4Addr> {
        self.mapping.host_addr()
    }

    /// Checks the port on its own: both port numbers non-zero, the container
    /// address inside `block`.
    pub fn validate(&self, block: Ipv4Network) -> Result<(), NatError> {
        let invalid = |reason: String| {
            Err(NatError::InvalidPort {
                port: self.to_string(),
                reason,
            })
        };
        if self.mapping.host_port == 0 {
            return invalid("the host port is 0; use 1 to 65535".into());
        }
        if self.mapping.container_port == 0 {
            return invalid("the container port is 0; use 1 to 65535".into());
        }
        if !block.contains(self.container) {
            return invalid(format!(
                "the container address is not in this host's block {}",
                canonical(block)
            ));
        }
        if self
            .host_ip()
            .is_some_and(|ip| ip.is_multicast() || ip.is_broadcast())
        {
            return invalid("the host IP is a multicast or broadcast address".into());
        }
        Ok(())
    }

    /// The key that orders DNAT rules deterministically.
    fn sort_key(&self) -> (Protocol, u16, Option<Ipv4Addr>, Ipv4Addr, u16) {
        (
            self.mapping.protocol,
            self.mapping.host_port,
            self.host_ip(),
            self.container,
            self.mapping.container_port,
        )
    }
}

impl fmt::Display for PublishedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip() {
            Some(ip) => write!(f, "{ip}:")?,
            None => f.write_str("*:")?,
        }
        write!(
            f,
            "{}/{} -> {}:{}",
            self.mapping.host_port,
            self.mapping.protocol.as_str(),
            self.container,
            self.mapping.container_port
        )
    }
}

/// Everything the rules of one host depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatSpec {
    /// The whole cluster range, e.g. 10.42.0.0/16.
    pub cluster_range: Ipv4Network,
    /// This host's block, e.g. 10.42.3.0/24.
    pub block: Ipv4Network,
    /// The containers' bridge, e.g. `weft0`.
    pub bridge: String,
    /// The service-discovery DNS address (169.254.169.250).
    pub dns_addr: Ipv4Addr,
    /// The services' VIP range (`table ip weft_svc` balances it and
    /// masquerades only a backend reaching its own VIP, so the hairpin rule
    /// here leaves it alone: a client keeps its address).
    pub service_range: Ipv4Network,
    /// The published ports of this host's containers (any order).
    pub ports: Vec<PublishedPort>,
}

impl NatSpec {
    /// Checks the spec: the block inside the cluster range, a bridge name
    /// that keeps [`IfName`]'s rule (the one netd's config checks, so a
    /// configured bridge never fails here), every port valid, and no two
    /// ports in conflict ([`PortMapping::conflicts_with`], the rule netd's
    /// endpoint checks use too). Exact duplicates are fine (they render
    /// once).
    pub fn validate(&self) -> Result<(), NatError> {
        let cluster = self.cluster_range;
        if self.block.prefix() < cluster.prefix() || !cluster.contains(self.block.network()) {
            return Err(NatError::InvalidSpec(format!(
                "the host block {} is not inside the cluster range {}",
                canonical(self.block),
                canonical(cluster)
            )));
        }
        if let Err(e) = IfName::new(self.bridge.as_str()) {
            return Err(NatError::InvalidSpec(format!("bridge: {e}")));
        }
        if cluster.contains(self.dns_addr) {
            return Err(NatError::InvalidSpec(format!(
                "the DNS address {} is inside the cluster range {}",
                self.dns_addr,
                canonical(cluster)
            )));
        }
        for p in &self.ports {
            p.validate(self.block)?;
        }
        let ports = self.sorted_ports();
        // Ports that share protocol and host port are adjacent after sorting.
        let mut by_port: BTreeMap<(Protocol, u16), Vec<&PublishedPort>> = BTreeMap::new();
        for p in &ports {
            by_port
                .entry((p.mapping.protocol, p.mapping.host_port))
                .or_default()
                .push(p);
        }
        for group in by_port.values() {
            for (i, a) in group.iter().enumerate() {
                for b in group.iter().skip(i + 1) {
                    if a.mapping.conflicts_with(&b.mapping) {
                        return Err(NatError::PortConflict {
                            first: a.to_string(),
                            second: b.to_string(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The ports in rule order, exact duplicates removed (the CNI plugin may
    /// send the same mapping twice, e.g. for a retried ADD).
    fn sorted_ports(&self) -> Vec<&PublishedPort> {
        let mut ports: Vec<&PublishedPort> = self.ports.iter().collect();
        ports.sort_by_key(|p| p.sort_key());
        ports.dedup_by_key(|p| p.sort_key());
        ports
    }
}

/// Errors of the NAT module. Command failures name the command, its exit
/// status and stderr, and what to check.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("invalid published port {port}: {reason}")]
    InvalidPort { port: String, reason: String },
    #[error("published ports conflict: {first} and {second} claim the same host port")]
    PortConflict { first: String, second: String },
    #[error("invalid NAT spec: {0}")]
    InvalidSpec(String),
    #[error("unknown iptables backend {0:?}: use \"legacy\" or \"nft\"")]
    UnknownBackend(String),
    /// iptables could not be started, or failed.
    #[error(transparent)]
    Command(#[from] crate::command::CommandError),
    #[error(
        "no usable iptables backend: iptables-legacy-save: {legacy}; iptables-nft-save: {nft} \
         (is the iptables package installed? Debian: apt-get install iptables)"
    )]
    NoBackend { legacy: String, nft: String },
}

/// The `iptables-restore --noflush` input for `spec`: declares (and so
/// empties) every weft chain and fills it, one `*table ... COMMIT` block per
/// table. Deterministic: the same spec, in any port order, renders the same
/// text. Rules are written the way `iptables-save` prints them.
pub fn render(spec: &NatSpec) -> Result<String, NatError> {
    spec.validate()?;
    let cluster = canonical(spec.cluster_range);
    let block = canonical(spec.block);
    let svc = canonical(spec.service_range);
    let br = spec.bridge.as_str();
    let dns = format!("{}/32", spec.dns_addr);
    let mut out = String::new();

    let mut table = |name: &str, rules: &[String]| {
        let _ = writeln!(out, "*{name}");
        for (t, chain) in CHAINS {
            if *t == name {
                let _ = writeln!(out, ":{chain} - [0:0]");
            }
        }
        for r in rules {
            let _ = writeln!(out, "{r}");
        }
        let _ = writeln!(out, "COMMIT");
    };

    table(
        "filter",
        &[
            // route_localnet on the bridge must not let containers reach the
            // host's loopback services (CVE-2020-8558); replies to the host's
            // own 127.0.0.1:<published port> connections still pass.
            format!(
                "-A {INPUT_CHAIN} ! -s 127.0.0.0/8 -d 127.0.0.0/8 -i {br} \
                 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
            ),
            format!("-A {FORWARD_CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
            format!("-A {FORWARD_CHAIN} -i {br} -j ACCEPT"),
            format!("-A {FORWARD_CHAIN} -o {br} -j ACCEPT"),
        ],
    );

    let clamp = "-p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu";
    table(
        "mangle",
        &[
            format!("-A {MSS_CHAIN} -s {cluster} {clamp}"),
            format!("-A {MSS_CHAIN} -d {cluster} {clamp}"),
        ],
    );

    let mut nat = vec![
        format!("-A {PREROUTING_CHAIN} -d {dns} -j RETURN"),
        format!("-A {PREROUTING_CHAIN} -m addrtype --dst-type LOCAL -j {DNAT_CHAIN}"),
        format!("-A {OUTPUT_CHAIN} -d {dns} -j RETURN"),
        format!("-A {OUTPUT_CHAIN} -m addrtype --dst-type LOCAL -j {DNAT_CHAIN}"),
    ];
    for p in spec.sorted_ports() {
        let proto = p.mapping.protocol.as_str();
        let dst = p
            .host_ip()
            .map(|ip| format!("-d {ip}/32 "))
            .unwrap_or_default();
        nat.push(format!(
            "-A {DNAT_CHAIN} {dst}-p {proto} -m {proto} --dport {} -j DNAT --to-destination {}:{}",
            p.mapping.host_port, p.container, p.mapping.container_port
        ));
    }
    nat.extend([
        // Hairpin: a container of this block reaching a published port that
        // leads back into the block. Without SNAT the reply would go straight
        // over the bridge and never be un-DNATed. Not for a service's VIP
        // (same-host clients would lose their address; br_netfilter un-DNATs
        // the replies of those).
        format!(
            "-A {POSTROUTING_CHAIN} -s {block} -d {block} -m conntrack --ctstate DNAT ! --ctorigdst {svc} -j MASQUERADE"
        ),
        // The host's own 127.0.0.1:<published port> (needs route_localnet).
        format!("-A {POSTROUTING_CHAIN} -s 127.0.0.0/8 -o {br} -j MASQUERADE"),
        format!("-A {POSTROUTING_CHAIN} -d {dns} -j RETURN"),
        format!("-A {POSTROUTING_CHAIN} -s {cluster} -d {cluster} -j RETURN"),
        format!("-A {POSTROUTING_CHAIN} -s {cluster} -j MASQUERADE"),
    ]);
    table("nat", &nat);
    Ok(out)
}

/// Sysctls the rules rely on, as `(path under /proc/sys, value)`, e.g.
/// `("net/ipv4/ip_forward", "1")`. `route_localnet` is set on the bridge
/// only (not `all`), so only the bridge accepts 127.0.0.0/8 traffic; it must
/// be set after the bridge exists (and again if the bridge is re-created).
pub fn required_sysctls(spec: &NatSpec) -> Vec<(String, String)> {
    vec![
        ("net/ipv4/ip_forward".to_owned(), "1".to_owned()),
        (
            format!("net/ipv4/conf/{}/route_localnet", spec.bridge),
            "1".to_owned(),
        ),
    ]
}

/// `a.b.c.d/n` with the host bits cleared, as iptables prints networks.
fn canonical(net: Ipv4Network) -> String {
    format!("{}/{}", net.network(), net.prefix())
}

#[cfg(test)]
mod tests;
