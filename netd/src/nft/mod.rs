//! weft's nf_tables tables, and the one thing that runs `nft`.
//!
//! weft owns three tables ([`TABLES`]):
//! * `table inet weft`: the policy (ingress to this host's containers),
//!   rendered by [`policy::compile`];
//! * `table bridge weft`: anti-spoofing on the container ports, rendered by
//!   [`spoof::render`];
//! * `table ip weft_svc`: the services' virtual IPs, balanced over their
//!   healthy backends (issue 12).
//!
//! [`crate::enforce`] decides when to apply them and from what.
//!
//! Two halves, kept apart:
//! * pure: each table is plain data ([`Table`]) that can be written whole
//!   ([`Table::replace`]: declared, deleted and written again in one `nft -f`
//!   input, one transaction, so the kernel switches from the old rules to the
//!   new ones at once and a failing line leaves the old table in place) or
//!   changed by its elements and counters only ([`Table::update`], also one
//!   transaction);
//! * effects: [`Nft`] runs `nft` (on the host or, for tests, inside a named
//!   network namespace, like [`crate::nat::Iptables::in_netns`]). It keeps
//!   the tables it applied last, so [`Nft::apply`] sends only what changed
//!   when the kernel has the same shape, and replaces the tables otherwise
//!   (first apply, a new shape, after a failure, on the resync). It also reads
//!   the named counters (`nft -j list counters`), names the tables it
//!   applied that the kernel lost ([`Nft::missing_tables`], for
//!   [`crate::firewall`]), deletes the tables on teardown, and [`Nft::cut`]
//!   deletes the conntrack entries of address pairs that lost reach.
//!
//! Re-creating a table resets its counters, so [`Nft`] adds what the kernel
//! counted before each replacement to a base it keeps, and [`Nft::counters`]
//! reports base + kernel: the counters only ever grow while netd runs.
//!
//! These tables coexist with the iptables rules of [`crate::nat`] and with
//! other tools' tables: every packet passes every table hooked at its hook,
//! and an `accept` here is final only for this table.

pub mod policy;
pub mod services;
pub mod spoof;
pub mod table;

pub use table::{Chain, Set, Table};

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Output;
use std::sync::{Mutex, PoisonError};

use serde::Deserialize;

use crate::command::{CommandError, Hint, Runner};
use crate::conntrack::Conntrack;

/// The name of both of weft's tables.
pub const TABLE: &str = "weft";
/// The families weft has a [`TABLE`] in, in the order [`script`] writes them.
pub const FAMILIES: [&str; 2] = ["inet", "bridge"];
/// The name of the services' table (`table ip weft_svc`: VIPs and their
/// backends).
pub const SERVICES_TABLE: &str = "weft_svc";
/// Every table weft owns: (family, name).
pub const TABLES: [(&str, &str); 3] = [("inet", TABLE), ("bridge", TABLE), ("ip", SERVICES_TABLE)];

const NFT_HINT: Hint = Hint {
    install: "is nftables installed? Debian: apt-get install nftables",
    diagnose: failure_hint,
};

/// What went wrong running `nft` or `conntrack`; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` or `conntrack` could not be started, or failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// Listing or deleting conntrack entries failed.
    #[error(transparent)]
    Conntrack(#[from] crate::conntrack::ConntrackError),
    #[error("cannot read the JSON of `{cmd}`: {source} (nft 0.9.3 or newer is needed for -j)")]
    Json {
        cmd: String,
        #[source]
        source: serde_json::Error,
    },
}

/// weft's tables as they should be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// `table inet weft` ([`policy::compile`]); `None` leaves the inet
    /// table as it is (while the policy is not known yet).
    pub policy: Option<Table>,
    /// `table bridge weft` ([`spoof::render`]); `None` leaves the bridge
    /// table as it is.
    pub spoof: Option<Table>,
    /// `table ip weft_svc`: the services' VIPs; `None` leaves it as it is.
    pub services: Option<Table>,
}

impl Desired {
    fn tables(&self) -> impl Iterator<Item = &Table> {
        self.policy
            .iter()
            .chain(self.spoof.iter())
            .chain(self.services.iter())
    }
}

/// One transaction that makes weft's tables those of `d` whatever the
/// kernel has: each is replaced whole ([`Table::replace`]).
pub fn script(d: &Desired) -> String {
    d.tables().map(Table::replace).collect()
}

/// The transaction that deletes both of weft's tables (nothing else).
pub fn teardown_script() -> String {
    TABLES
        .iter()
        .map(|(f, t)| format!("table {f} {t} {{}}\ndelete table {f} {t}\n"))
        .collect()
}

/// What [`Nft::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// At least one table was written whole.
    Replaced,
    /// Only elements and counters changed ([`Table::update`]).
    Updated,
    /// The tables equal those applied last; nothing was run.
    Unchanged,
}

/// A named counter object of one of weft's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedCounter {
    /// `inet` or `bridge`.
    pub family: String,
    pub name: String,
    /// What the counter counts, as the renderer labelled it.
    pub comment: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}

/// netd's handle on nf_tables: one per daemon (or per test namespace).
#[derive(Debug, Default)]
pub struct Nft {
    runner: Runner,
    /// The tables the kernel has, by family, as this handle last applied
    /// them (forgotten after a failure and by [`Nft::invalidate`]).
    last: Mutex<BTreeMap<(&'static str, &'static str), Table>>,
    /// Every table this handle applied, kept through invalidation (cleared
    /// by [`Nft::teardown`]): what [`Nft::missing_tables`] expects.
    applied: Mutex<BTreeSet<(&'static str, &'static str)>>,
    /// What the counters counted in tables since replaced, by (family, name).
    base: Mutex<BTreeMap<(String, String), (u64, u64)>>,
}

impl Nft {
    /// Runs `nft` in the host's network namespace.
    pub fn new() -> Nft {
        Nft::default()
    }

    /// Runs every command inside network namespace `netns`
    /// (`ip netns exec <netns> ...`). For tests.
    pub fn in_netns(mut self, netns: impl Into<String>) -> Nft {
        self.runner.netns = Some(netns.into());
        self
    }

    /// Makes weft's tables those of `desired` in one transaction: a table
    /// whose shape the kernel has (as this handle last applied it) gets
    /// only its element and counter changes ([`Table::update`]), any other
    /// is replaced whole. Nothing runs when nothing differs. When the
    /// changes fail (someone else changed the table: an element to delete
    /// is gone), every table is replaced at once.
    pub fn apply(&self, desired: &Desired) -> Result<ApplyOutcome, NftError> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let mut input = String::new();
        let mut replaced = false;
        for t in desired.tables() {
            match last.get(&(t.family, t.name)).and_then(|old| t.update(old)) {
                Some(changes) => input.push_str(&changes),
                None => {
                    input.push_str(&t.replace());
                    replaced = true;
                }
            }
        }
        if input.is_empty() {
            return Ok(ApplyOutcome::Unchanged);
        }
        for t in desired.tables() {
            last.remove(&(t.family, t.name));
        }
        if !replaced {
            match self.check("nft", &["-f", "-"], Some(&input), NFT_HINT) {
                Ok(_) => {
                    for t in desired.tables() {
                        last.insert((t.family, t.name), t.clone());
                    }
                    return Ok(ApplyOutcome::Updated);
                }
                Err(e) => {
                    tracing::info!(error = %e, "changing weft's nf_tables elements failed; replacing the tables")
                }
            }
        }
        // A replaced table's counters start again from zero: keep what they
        // counted.
        let before = self.kernel_counters().unwrap_or_default();
        self.check("nft", &["-f", "-"], Some(&script(desired)), NFT_HINT)?;
        let mut base = self.base.lock().unwrap_or_else(PoisonError::into_inner);
        for c in before {
            let b = base.entry((c.family, c.name)).or_default();
            b.0 += c.packets;
            b.1 += c.bytes;
        }
        for t in desired.tables() {
            last.insert((t.family, t.name), t.clone());
        }
        self.applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(desired.tables().map(|t| (t.family, t.name)));
        Ok(ApplyOutcome::Replaced)
    }

    /// Runs `script` as one transaction, whatever it is (for tests, and
    /// for tables netd does not keep). The kernel then differs from what
    /// [`Nft::apply`] knows, so its next run replaces every table.
    pub fn run_script(&self, script: &str) -> Result<(), NftError> {
        self.invalidate();
        self.check("nft", &["-f", "-"], Some(script), NFT_HINT)?;
        Ok(())
    }

    /// Forgets what the kernel has, so the next [`Nft::apply`] replaces
    /// every table (the resync: someone may have changed or deleted them).
    pub fn invalidate(&self) {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Forgets what the kernel has of table `name` in `family` only.
    pub fn invalidate_table(&self, family: &str, name: &str) {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(f, n), _| !(*f == family && *n == name));
    }

    /// Whether the kernel has table `name` in `family`.
    pub fn has_table(&self, family: &str, name: &str) -> Result<bool, NftError> {
        Ok(self.tables()?.iter().any(|(f, n)| f == family && n == name))
    }

    /// The tables the kernel has, as (family, name) (`nft -j list tables`:
    /// names only, cheap whatever the tables hold).
    pub fn tables(&self) -> Result<Vec<(String, String)>, NftError> {
        let args = ["-j", "list", "tables"];
        let out = self.check("nft", &args, None, NFT_HINT)?;
        parse_tables(&out).map_err(|source| NftError::Json {
            cmd: self.display("nft", &args),
            source,
        })
    }

    /// The tables this handle applied that the kernel no longer has
    /// (deleted, or the ruleset flushed by another tool), as (family,
    /// name); one `nft -j list tables`. Each is forgotten as well, so the
    /// next [`Nft::apply`] writes it whole instead of changing elements of
    /// a table that is not there. Waits for an apply under way.
    pub fn missing_tables(&self) -> Result<Vec<(&'static str, &'static str)>, NftError> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let applied = self
            .applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if applied.is_empty() {
            return Ok(Vec::new());
        }
        let gone = missing(&applied, &self.tables()?);
        for key in &gone {
            last.remove(key);
        }
        Ok(gone)
    }

    /// The named counters of weft's tables: what the kernel counts now plus
    /// what replaced tables counted before.
    pub fn counters(&self) -> Result<Vec<NamedCounter>, NftError> {
        let mut now = self.kernel_counters()?;
        let base = self.base.lock().unwrap_or_else(PoisonError::into_inner);
        for c in &mut now {
            if let Some((p, b)) = base.get(&(c.family.clone(), c.name.clone())) {
                c.packets += p;
                c.bytes += b;
            }
        }
        Ok(now)
    }

    fn kernel_counters(&self) -> Result<Vec<NamedCounter>, NftError> {
        let args = ["-j", "list", "counters"];
        let out = self.check("nft", &args, None, NFT_HINT)?;
        parse_counters(&out).map_err(|source| NftError::Json {
            cmd: self.display("nft", &args),
            source,
        })
    }

    /// `nft list table <family> weft`, as text (empty when there is no
    /// such table).
    pub fn list(&self, family: &str) -> Result<String, NftError> {
        self.list_table(family, TABLE)
    }

    /// `nft list table <family> <name>`, as text (empty when there is no
    /// such table).
    pub fn list_table(&self, family: &str, name: &str) -> Result<String, NftError> {
        let out = self.run("nft", &["list", "table", family, name], None, NFT_HINT)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Ok(String::new())
        }
    }

    /// Deletes every table of weft's ([`TABLES`]). Idempotent.
    pub fn teardown(&self) -> Result<(), NftError> {
        self.invalidate();
        self.applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.check("nft", &["-f", "-"], Some(&teardown_script()), NFT_HINT)?;
        Ok(())
    }

    /// Deletes the conntrack entries of the connections each pair of `lost`
    /// (original direction) may no longer have: those on what it keeps
    /// stay. Returns how many went ([`Conntrack::cut`]: one listing, then a
    /// netlink delete of each entry it picks).
    pub fn cut(&self, lost: &[policy::Lost]) -> Result<usize, NftError> {
        let keep: std::collections::HashMap<(Ipv4Addr, Ipv4Addr), &weft_model::Reach> =
            lost.iter().map(|l| ((l.src, l.dst), &l.keep)).collect();
        let pairs: Vec<(Ipv4Addr, Ipv4Addr)> = keep.keys().copied().collect();
        Ok(Conntrack::new(self.runner.clone()).cut(&pairs, |pair, l4| {
            keep.get(&pair).is_some_and(|r| r.allows(l4).is_some())
        })?)
    }

    fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
        hint: Hint,
    ) -> Result<Output, NftError> {
        Ok(self.runner.run(program, args, stdin, hint)?)
    }

    fn check(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
        hint: Hint,
    ) -> Result<String, NftError> {
        Ok(self.runner.check(program, args, stdin, hint)?)
    }

    fn display(&self, program: &str, args: &[&str]) -> String {
        self.runner.display(program, args)
    }
}

/// What to do about a failed `nft`, from its stderr.
fn failure_hint(stderr: &str, default: &'static str) -> String {
    let s = stderr.to_ascii_lowercase();
    if s.contains("operation not permitted") || s.contains("permission denied") {
        "netd needs root (CAP_NET_ADMIN)"
    } else if s.contains("not supported") || s.contains("could not process rule") {
        "a kernel module may be missing (nf_tables, nft_chain_nat, nf_conntrack, br_netfilter): check dmesg"
    } else {
        default
    }
    .to_owned()
}

#[derive(Deserialize)]
struct ListOutput {
    nftables: Vec<serde_json::Value>,
}

/// The tables in `nft -j list tables` output, as (family, name).
fn parse_tables(json: &str) -> Result<Vec<(String, String)>, serde_json::Error> {
    let list: ListOutput = serde_json::from_str(json)?;
    Ok(list
        .nftables
        .iter()
        .filter_map(|i| i.get("table"))
        .filter_map(|t| {
            let field = |k: &str| t.get(k).and_then(|v| v.as_str()).map(str::to_owned);
            Some((field("family")?, field("name")?))
        })
        .collect())
}

/// Which of the `applied` tables are not among the kernel's `present` ones.
fn missing(
    applied: &BTreeSet<(&'static str, &'static str)>,
    present: &[(String, String)],
) -> Vec<(&'static str, &'static str)> {
    applied
        .iter()
        .filter(|(f, n)| !present.iter().any(|(pf, pn)| pf == f && pn == n))
        .copied()
        .collect()
}

#[derive(Deserialize)]
struct JsonCounter {
    family: String,
    name: String,
    table: String,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    packets: u64,
    #[serde(default)]
    bytes: u64,
}

/// The counters of weft's tables in `nft -j list counters` output.
fn parse_counters(json: &str) -> Result<Vec<NamedCounter>, serde_json::Error> {
    let list: ListOutput = serde_json::from_str(json)?;
    let mut out = Vec::new();
    for item in list.nftables {
        let Some(c) = item.get("counter") else {
            continue;
        };
        let c: JsonCounter = serde_json::from_value(c.clone())?;
        if TABLES.contains(&(c.family.as_str(), c.table.as_str())) {
            out.push(NamedCounter {
                family: c.family,
                name: c.name,
                comment: c.comment,
                packets: c.packets,
                bytes: c.bytes,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_replaces_each_table_in_one_input() {
        let d = Desired {
            policy: Some(Table::new("inet")),
            spoof: None,
            services: None,
        };
        assert_eq!(
            script(&d),
            "table inet weft {}\ndelete table inet weft\ntable inet weft {\n}\n"
        );
        let d = Desired {
            spoof: Some(Table::new("bridge")),
            ..d
        };
        assert!(script(&d)
            .ends_with("table bridge weft {}\ndelete table bridge weft\ntable bridge weft {\n}\n"));
        let spoof_only = Desired { policy: None, ..d };
        assert_eq!(
            script(&spoof_only),
            "table bridge weft {}\ndelete table bridge weft\ntable bridge weft {\n}\n"
        );
        assert_eq!(script(&Desired::default()), "");
        assert_eq!(
            teardown_script(),
            "table inet weft {}\ndelete table inet weft\n\
             table bridge weft {}\ndelete table bridge weft\n\
             table ip weft_svc {}\ndelete table ip weft_svc\n"
        );
    }

    #[test]
    fn counters_of_weft_tables_only() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"counter": {"family": "inet", "name": "allow-web", "table": "weft", "handle": 5, "comment": "web", "packets": 3, "bytes": 180}},
            {"counter": {"family": "inet", "name": "drops", "table": "weft", "handle": 6, "packets": 0, "bytes": 0}},
            {"counter": {"family": "ip", "name": "x", "table": "other", "handle": 1, "packets": 9, "bytes": 9}}]}"#;
        let c = parse_counters(json).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0],
            NamedCounter {
                family: "inet".into(),
                name: "allow-web".into(),
                comment: Some("web".into()),
                packets: 3,
                bytes: 180
            }
        );
        assert_eq!(c[1].comment, None);
        assert!(parse_counters("not json").is_err());
    }

    /// `nft -j list tables` (nft 1.0.6) after `nft flush ruleset` and a
    /// restart of another tool: weft's tables gone, the tool's back.
    #[test]
    fn tables_the_kernel_lost_are_missing() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "weft", "handle": 7}},
            {"table": {"family": "ip", "name": "filter", "handle": 9}},
            {"table": {"family": "ip", "name": "weft", "handle": 10}}]}"#;
        let present = parse_tables(json).unwrap();
        assert_eq!(present.len(), 3);
        assert_eq!(present[0], ("inet".to_owned(), "weft".to_owned()));
        let applied: BTreeSet<(&str, &str)> = TABLES.into_iter().collect();
        // A table of the same name in another family does not count.
        assert_eq!(
            missing(&applied, &present),
            vec![("bridge", TABLE), ("ip", SERVICES_TABLE)]
        );
        assert_eq!(missing(&applied, &[]).len(), 3);
        assert_eq!(missing(&BTreeSet::new(), &[]), vec![]);
        let empty =
            r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}]}"#;
        assert_eq!(parse_tables(empty).unwrap(), vec![]);
        assert!(parse_tables("").is_err());
    }

    #[test]
    fn errors_say_what_to_do() {
        assert!(failure_hint(
            "Error: Could not process rule: Operation not permitted",
            NFT_HINT.install
        )
        .contains("root"));
        assert!(failure_hint(
            "Error: Could not process rule: No such file",
            NFT_HINT.install
        )
        .contains("kernel module"));
        assert_eq!(
            failure_hint("syntax error", NFT_HINT.install),
            NFT_HINT.install
        );
        let nft = Nft::new().in_netns("t-h0");
        assert_eq!(
            nft.display("nft", &["-f", "-"]),
            "ip netns exec t-h0 nft -f -"
        );
        let e = Nft::new()
            .run("weft-no-such-nft", &[], None, NFT_HINT)
            .unwrap_err();
        assert!(e.to_string().contains("apt-get install nftables"), "{e}");
    }
}
