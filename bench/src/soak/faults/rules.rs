//! The rule-wiping faults, as "another tool" does them on one host:
//! * IptablesFlush: the jumps into weft's chains deleted, the chains
//!   flushed and deleted (`iptables -D/-F/-X`);
//! * IptablesRestore: a firewall reload: `iptables-save`, weft's chains,
//!   rules and jumps dropped ([`without_weft`]), `iptables-restore` of the
//!   rest (every table replaced whole);
//! * NftFlush: `nft flush ruleset` (every nf_tables table, iptables-nft's
//!   included).
//!
//! Healed when everything of weft's that was there before is back: its
//! chains, the jumps into them, rules in the chains that had some
//! ([`weft_items`]), and its nf_tables tables.
//! Chain, hook and table names are netd's ([`weft_netd::nat`],
//! [`weft_netd::nft`]), never spelled here.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use weft_netd::nat::{hooks, Backend, Iptables, CHAINS, CHAIN_PREFIX, DNAT_CHAIN};
use weft_tests::Netns;

use super::super::timeline::{Fault, FaultKind};
use super::super::World;
use super::wait_healed;

/// weft's iptables state in an `iptables-save` dump, as comparable items:
/// `<table> :<chain>` for each of weft's chains, `<table> <line>` for each
/// jump into them from another chain, and `<table> <chain> has rules` for
/// each of weft's chains with rules (except the DNAT chain, whose rules
/// come and go with the published ports).
pub fn weft_items(save: &str) -> BTreeSet<String> {
    let mut items = BTreeSet::new();
    let mut table = "";
    for line in save.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix('*') {
            table = t;
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if chain.starts_with(CHAIN_PREFIX) {
                items.insert(format!("{table} :{chain}"));
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            if chain.starts_with(CHAIN_PREFIX) {
                if chain != DNAT_CHAIN {
                    items.insert(format!("{table} {chain} has rules"));
                }
            } else if jumps_to_weft(line) {
                items.insert(format!("{table} {line}"));
            }
        }
    }
    items
}

/// Whether a rule jumps (`-j`) or goes (`-g`) to one of weft's chains.
fn jumps_to_weft(rule: &str) -> bool {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if matches!(w, "-j" | "--jump" | "-g" | "--goto")
            && words.next().is_some_and(|t| t.starts_with(CHAIN_PREFIX))
        {
            return true;
        }
    }
    false
}

/// An `iptables-save` dump without anything of weft's: its chain
/// declarations, the rules in its chains and every jump into them. What a
/// firewall reload that never heard of weft restores.
pub fn without_weft(save: &str) -> String {
    let mut out = String::new();
    for line in save.lines() {
        let l = line.trim();
        let weft = l
            .strip_prefix(':')
            .is_some_and(|d| d.starts_with(CHAIN_PREFIX))
            || l.strip_prefix("-A ")
                .is_some_and(|r| r.starts_with(CHAIN_PREFIX) || jumps_to_weft(l));
        if !weft {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// weft's nf_tables tables present in `ns` (`family name`).
fn nft_tables(ns: &Netns) -> Result<BTreeSet<String>> {
    let out = ns.exec(["nft", "list", "tables"])?;
    let ours: BTreeSet<String> = weft_netd::nft::TABLES
        .iter()
        .map(|(f, n)| format!("{f} {n}"))
        .collect();
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table "))
        .map(str::to_owned)
        .filter(|t| ours.contains(t))
        .collect())
}

/// The shell script of [`IptablesFlush`](FaultKind::IptablesFlush): `-D`
/// every jump into weft's chains (each copy), then `-F` and `-X` each
/// chain; a failed command prints `failed: <command>` after its error.
/// One script, so the wipe takes milliseconds, not one process spawn per
/// command (netd may restore between two commands either way: then a `-X`
/// fails on a chain in use and the script says so).
pub fn flush_script(iptables: &str) -> String {
    let mut s = String::new();
    for h in hooks() {
        let del = format!(
            "{iptables} -w -t {} -D {} {}",
            h.table,
            h.chain,
            h.rule.join(" ")
        );
        s.push_str(&format!(
            "for i in 1 2 3 4; do {del} 2>/dev/null || break; done\n"
        ));
    }
    for op in ["-F", "-X"] {
        for (table, chain) in CHAINS {
            let cmd = format!("{iptables} -w -t {table} {op} {chain}");
            s.push_str(&format!("{cmd} 2>&1 || echo 'failed: {cmd}'\n"));
        }
    }
    s
}

/// Runs [`flush_script`] in `ns`; what failed (empty: all done).
fn flush(ns: &Netns, backend: Backend) -> Result<Vec<String>> {
    let out = ns.output(["sh", "-c", &flush_script(backend.iptables())])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("failed: "))
        .map(str::to_owned)
        .collect())
}

/// `iptables-restore` of `dump` in `ns` (no `--noflush`: each table in the
/// dump replaced whole, as a firewall reload does).
fn restore(ns: &Netns, backend: Backend, dump: &str) -> Result<()> {
    let mut child = ns
        .command([backend.restore(), "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running iptables-restore")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(dump.as_bytes())
            .context("writing to iptables-restore")?;
    }
    let out = child
        .wait_with_output()
        .context("waiting for iptables-restore")?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            backend.restore(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Wipes weft's rules on host `h` by `kind` and waits until they are back.
pub(super) fn wipe(w: &World, kind: FaultKind, h: usize) -> Result<Option<Fault>> {
    let ns = w.lab.host(h).netns();
    let ipt = Iptables::detect_in_netns(ns.name()).context("finding the iptables backend")?;
    let backend = ipt.backend();
    let before = weft_items(&ipt.save()?);
    let tables_before = nft_tables(ns)?;
    let start_ms = w.rec.now_ms();
    let what = match kind {
        FaultKind::IptablesFlush => {
            let failed = flush(ns, backend)?;
            let mut s = format!("{} -D/-F/-X of weft's chains", backend.iptables());
            if !failed.is_empty() {
                s.push_str(&format!(
                    " ({} failed: {})",
                    failed.len(),
                    failed.join("; ")
                ));
            }
            s
        }
        FaultKind::IptablesRestore => {
            let dump = ipt.save()?;
            restore(ns, backend, &without_weft(&dump))?;
            format!("{} of the tables without weft", backend.restore())
        }
        FaultKind::NftFlush => {
            ns.exec(["nft", "flush", "ruleset"])?;
            "nft flush ruleset".to_owned()
        }
        other => bail!("{other:?} is not a rule wipe"),
    };
    let end_ms = w.rec.now_ms();
    let healed_ms = wait_healed(w, kind, end_ms, || {
        let Ok(save) = ipt.save() else { return false };
        let now = weft_items(&save);
        before.is_subset(&now) && nft_tables(ns).is_ok_and(|t| tables_before.is_subset(&t))
    });
    Ok(Some(Fault {
        kind,
        host: Some(h),
        start_ms,
        end_ms,
        healed_ms,
        detail: format!(
            "{what}; healed: {} iptables items of weft's and nft tables [{}] back",
            before.len(),
            tables_before.iter().cloned().collect::<Vec<_>>().join(", ")
        ),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
# Generated by iptables-nft-save v1.8.9
*mangle
:PREROUTING ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:WEFT-MSS - [0:0]
-A FORWARD -j WEFT-MSS
-A WEFT-MSS -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:WEFT-DNAT - [0:0]
:WEFT-PREROUTING - [0:0]
:DOCKER - [0:0]
-A PREROUTING -j WEFT-PREROUTING
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A WEFT-PREROUTING -m addrtype --dst-type LOCAL -j WEFT-DNAT
-A WEFT-DNAT -p tcp --dport 20001 -j DNAT --to-destination 10.42.0.5:80
-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE
COMMIT
";

    #[test]
    fn items_are_chains_jumps_and_non_empty_chains() {
        let items = weft_items(SAVE);
        let want: BTreeSet<String> = [
            "mangle :WEFT-MSS",
            "mangle -A FORWARD -j WEFT-MSS",
            "mangle WEFT-MSS has rules",
            "nat :WEFT-DNAT",
            "nat :WEFT-PREROUTING",
            "nat -A PREROUTING -j WEFT-PREROUTING",
            "nat WEFT-PREROUTING has rules",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        assert_eq!(items, want);
    }

    #[test]
    fn without_weft_keeps_everything_else() {
        let out = without_weft(SAVE);
        assert!(!out.contains("WEFT-"), "{out}");
        for keep in [
            "*mangle",
            ":FORWARD ACCEPT [0:0]",
            ":DOCKER - [0:0]",
            "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
            "-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE",
            "COMMIT",
        ] {
            assert!(out.lines().any(|l| l == keep), "{keep} lost:\n{out}");
        }
        assert!(weft_items(&out).is_empty());
        // Everything weft had is missing from it.
        assert!(!weft_items(SAVE).is_subset(&weft_items(&out)));
    }

    #[test]
    fn flush_script_removes_every_jump_and_chain() {
        let s = flush_script("iptables-nft");
        for h in hooks() {
            let del = format!(
                "iptables-nft -w -t {} -D {} {}",
                h.table,
                h.chain,
                h.rule.join(" ")
            );
            assert!(s.contains(&del), "{del} missing:\n{s}");
        }
        for (table, chain) in CHAINS {
            let f = format!("iptables-nft -w -t {table} -F {chain} ");
            let x = format!("iptables-nft -w -t {table} -X {chain} ");
            let (fi, xi) = (s.find(&f).unwrap(), s.find(&x).unwrap());
            // Every chain is flushed before any is deleted (they jump to
            // each other).
            assert!(s.rfind(" -F ").unwrap() < xi && fi < xi);
        }
    }

    #[test]
    fn jumps_are_only_jumps_to_weft() {
        assert!(jumps_to_weft("-A INPUT -j WEFT-INPUT"));
        assert!(jumps_to_weft("-A INPUT -g WEFT-INPUT"));
        assert!(!jumps_to_weft(
            "-A INPUT -j ACCEPT -m comment --comment WEFT-x"
        ));
        assert!(!jumps_to_weft("-A INPUT -j DOCKER"));
    }

    #[test]
    fn every_chain_netd_declares_is_an_item() {
        // The chains and hooks come from netd: a dump with all of them
        // yields an item for each.
        let mut save = String::new();
        for table in ["filter", "mangle", "nat"] {
            save.push_str(&format!("*{table}\n"));
            for (t, c) in CHAINS {
                if *t == table {
                    save.push_str(&format!(":{c} - [0:0]\n"));
                }
            }
            for h in hooks().iter().filter(|h| h.table == table) {
                save.push_str(&h.save_line());
                save.push('\n');
            }
            save.push_str("COMMIT\n");
        }
        assert_eq!(weft_items(&save).len(), CHAINS.len() + hooks().len());
        assert!(weft_items(&without_weft(&save)).is_empty());
    }
}
