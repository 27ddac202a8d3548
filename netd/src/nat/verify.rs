//! Is weft's iptables state still in the kernel? The pure comparison of
//! what [`super::render`] last applied with what `iptables-save` shows now
//! ([`missing`]); [`super::Iptables::verify`] runs the save.
//!
//! Only weft's own state counts: every chain of [`super::CHAINS`] the applied
//! rules declare must exist and hold as many rules as were applied, and
//! every hook ([`super::hooks`]) must be in its built-in chain. Anything
//! else in the tables (another tool's rules, a foreign rule in a built-in
//! chain, the order of the hooks among them) is none of weft's business.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::hooks;

/// One piece of weft's iptables state the kernel lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// A weft chain is gone (deleted, or its whole table flushed).
    Chain { table: String, chain: String },
    /// A weft chain holds another number of rules than weft applied
    /// (flushed, or changed by someone else).
    Rules {
        table: String,
        chain: String,
        have: usize,
        want: usize,
    },
    /// A jump from a built-in chain into weft's is gone.
    Hook {
        table: &'static str,
        chain: &'static str,
        target: String,
    },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Chain { table, chain } => write!(f, "{table} chain {chain}"),
            Missing::Rules {
                table,
                chain,
                have,
                want,
            } => write!(f, "{table} {chain} rules ({have} of {want})"),
            Missing::Hook {
                table,
                chain,
                target,
            } => write!(f, "{table} hook {chain} -> {target}"),
        }
    }
}

/// What one table of a save (or of a restore input) holds: its declared
/// chains, the number of rules of each chain, and its rules as printed.
#[derive(Debug, Default)]
struct Seen<'a> {
    chains: BTreeSet<&'a str>,
    rules: BTreeMap<&'a str, usize>,
    lines: BTreeSet<&'a str>,
}

fn tables(text: &str) -> BTreeMap<&str, Seen<'_>> {
    let mut out: BTreeMap<&str, Seen<'_>> = BTreeMap::new();
    let mut current: Option<&str> = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            let name = name.trim();
            out.entry(name).or_default();
            current = Some(name);
            continue;
        }
        let Some(t) = current.and_then(|c| out.get_mut(c)) else {
            continue;
        };
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next() {
                t.chains.insert(chain);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            if let Some(chain) = rule.split_whitespace().next() {
                *t.rules.entry(chain).or_default() += 1;
                t.lines.insert(line);
            }
        } else if line == "COMMIT" {
            current = None;
        }
    }
    out
}

/// What of `applied` (the `iptables-restore` input weft applied last, as
/// [`super::render`] wrote it) the kernel's `save` (`iptables-save` of the
/// tables weft uses) lacks: chains, rule counts of weft's chains, hooks. In
/// a stable order; empty when everything weft applied is there.
pub fn missing(applied: &str, save: &str) -> Vec<Missing> {
    let want = tables(applied);
    let have = tables(save);
    let empty = Seen::default();
    let mut out = Vec::new();
    for (table, w) in &want {
        let h = have.get(table).unwrap_or(&empty);
        for chain in &w.chains {
            if !h.chains.contains(chain) {
                out.push(Missing::Chain {
                    table: (*table).to_owned(),
                    chain: (*chain).to_owned(),
                });
                continue;
            }
            let (n_have, n_want) = (
                h.rules.get(chain).copied().unwrap_or(0),
                w.rules.get(chain).copied().unwrap_or(0),
            );
            if n_have != n_want {
                out.push(Missing::Rules {
                    table: (*table).to_owned(),
                    chain: (*chain).to_owned(),
                    have: n_have,
                    want: n_want,
                });
            }
        }
    }
    for hook in hooks() {
        if !want.contains_key(hook.table) {
            continue;
        }
        let line = hook.save_line();
        let present = have
            .get(hook.table)
            .is_some_and(|h| h.lines.contains(line.as_str()));
        if !present {
            out.push(Missing::Hook {
                table: hook.table,
                chain: hook.chain,
                target: hook.rule.last().copied().unwrap_or_default().to_owned(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::{render, NatSpec, PublishedPort};
    use weft_model::{PortMapping, Protocol};

    fn applied() -> String {
        let spec = NatSpec {
            cluster_range: "10.42.0.0/16".parse().unwrap(),
            block: "10.42.0.0/24".parse().unwrap(),
            bridge: "weft0".into(),
            dns_addr: "169.254.169.250".parse().unwrap(),
            service_range: "10.43.0.0/16".parse().unwrap(),
            ports: vec![PublishedPort {
                container: "10.42.0.5".parse().unwrap(),
                mapping: PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: Protocol::Tcp,
                    host_ip: None,
                },
            }],
        };
        render(&spec).unwrap()
    }

    /// What `iptables-save` prints once weft applied `applied()`, with
    /// another tool's rules around (as iptables-nft-save 1.8.9 prints it).
    fn healthy_save() -> String {
        let mut s = String::from(
            "# Generated by iptables-nft-save v1.8.9 (nf_tables) on Mon Jan  1 00:00:00 2024\n\
             *mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n\
             :OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:WEFT-MSS - [0:0]\n\
             -A FORWARD -j WEFT-MSS\n\
             -A WEFT-MSS -s 10.42.0.0/16 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu\n\
             -A WEFT-MSS -d 10.42.0.0/16 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu\n\
             COMMIT\n\
             *filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             :DOCKER - [0:0]\n:WEFT-FORWARD - [0:0]\n:WEFT-INPUT - [0:0]\n\
             -A INPUT -j WEFT-INPUT\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n\
             -A FORWARD -j WEFT-FORWARD\n-A FORWARD -j DOCKER\n\
             -A WEFT-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
             -A WEFT-FORWARD -i weft0 -j ACCEPT\n-A WEFT-FORWARD -o weft0 -j ACCEPT\n\
             -A WEFT-INPUT ! -s 127.0.0.0/8 -d 127.0.0.0/8 -i weft0 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
             COMMIT\n\
             *nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             :POSTROUTING ACCEPT [0:0]\n:WEFT-DNAT - [0:0]\n:WEFT-OUTPUT - [0:0]\n\
             :WEFT-POSTROUTING - [0:0]\n:WEFT-PREROUTING - [0:0]\n\
             -A PREROUTING -j WEFT-PREROUTING\n-A OUTPUT -j WEFT-OUTPUT\n\
             -A POSTROUTING -j WEFT-POSTROUTING\n-A POSTROUTING -o eth9 -j MASQUERADE\n",
        );
        for line in applied().lines() {
            let in_nat = line.starts_with("-A WEFT-PREROUTING")
                || line.starts_with("-A WEFT-OUTPUT")
                || line.starts_with("-A WEFT-DNAT")
                || line.starts_with("-A WEFT-POSTROUTING");
            if in_nat {
                s.push_str(line);
                s.push('\n');
            }
        }
        s.push_str("COMMIT\n");
        s
    }

    #[test]
    fn what_weft_applied_with_other_rules_around_is_complete() {
        assert_eq!(missing(&applied(), &healthy_save()), vec![]);
        // Nothing applied yet: nothing to miss.
        assert_eq!(missing("", ""), vec![]);
    }

    #[test]
    fn a_flushed_chain_is_missing_its_rules() {
        let save: String = healthy_save()
            .lines()
            .filter(|l| !l.starts_with("-A WEFT-DNAT"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            missing(&applied(), &save),
            vec![Missing::Rules {
                table: "nat".into(),
                chain: "WEFT-DNAT".into(),
                have: 0,
                want: 1
            }]
        );
        assert_eq!(
            missing(&applied(), &save)[0].to_string(),
            "nat WEFT-DNAT rules (0 of 1)"
        );
    }

    #[test]
    fn a_foreign_rule_in_a_weft_chain_is_a_difference() {
        let save = healthy_save().replace(
            "-A WEFT-FORWARD -i weft0 -j ACCEPT\n",
            "-A WEFT-FORWARD -i weft0 -j ACCEPT\n-A WEFT-FORWARD -j DROP\n",
        );
        assert_eq!(
            missing(&applied(), &save),
            vec![Missing::Rules {
                table: "filter".into(),
                chain: "WEFT-FORWARD".into(),
                have: 4,
                want: 3
            }]
        );
    }

    /// `iptables -D PREROUTING -j WEFT-PREROUTING` then `-F`/`-X` of the
    /// chains, as the soak's "another tool" does in the nat table.
    #[test]
    fn deleted_chains_and_hooks_are_named() {
        let save: String = healthy_save()
            .lines()
            .filter(|l| !(l.contains("WEFT-PREROUTING") || l.contains("WEFT-DNAT")))
            .map(|l| format!("{l}\n"))
            .collect();
        // WEFT-OUTPUT still jumps to WEFT-DNAT: its rule count drops too.
        let got: Vec<String> = missing(&applied(), &save)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "nat chain WEFT-DNAT",
                "nat WEFT-OUTPUT rules (1 of 2)",
                "nat chain WEFT-PREROUTING",
                "nat hook PREROUTING -> WEFT-PREROUTING",
            ]
        );
    }

    /// A firewall reload: `iptables-save | grep -v WEFT | iptables-restore`
    /// (every weft line gone, the other tool's rules stay).
    #[test]
    fn a_reload_without_weft_misses_every_chain_and_hook() {
        let save: String = healthy_save()
            .lines()
            .filter(|l| !l.contains("WEFT"))
            .map(|l| format!("{l}\n"))
            .collect();
        let got = missing(&applied(), &save);
        let chains = got
            .iter()
            .filter(|m| matches!(m, Missing::Chain { .. }))
            .count();
        let hooks = got
            .iter()
            .filter(|m| matches!(m, Missing::Hook { .. }))
            .count();
        assert_eq!((chains, hooks, got.len()), (7, 6, 13), "{got:?}");
    }

    /// `nft flush ruleset` with the nft backend: the tables themselves are
    /// gone, the save is empty.
    #[test]
    fn an_empty_save_misses_everything() {
        assert_eq!(missing(&applied(), "").len(), 13);
    }
}
