//! The effects: running iptables (one backend), through [`crate::command`].

use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};

use crate::command::{Hint, Runner};

use super::verify::{missing, Missing};
use super::{hooks, render, NatError, NatSpec, CHAIN_PREFIX};

/// Seconds to wait for the xtables lock (legacy backend) before failing.
const LOCK_WAIT_SECS: &str = "30";

const IPTABLES_HINT: Hint = Hint {
    install: "is the iptables package installed? Debian: apt-get install iptables",
    diagnose: failure_hint,
};

/// Which iptables implementation to drive. Both speak the same rule language;
/// a host must use one of them, or rules of one are invisible to the other
/// (and both run in the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `iptables-legacy*`: the x_tables kernel interface.
    Legacy,
    /// `iptables-nft*`: the same rules as nf_tables (Debian's default).
    Nft,
}

impl Backend {
    /// `legacy` or `nft`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }

    /// `iptables-legacy` or `iptables-nft`.
    pub fn iptables(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy",
            Backend::Nft => "iptables-nft",
        }
    }

    /// `iptables-legacy-restore` or `iptables-nft-restore`.
    pub fn restore(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-restore",
            Backend::Nft => "iptables-nft-restore",
        }
    }

    /// `iptables-legacy-save` or `iptables-nft-save`.
    pub fn save(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-save",
            Backend::Nft => "iptables-nft-save",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = NatError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "legacy" => Ok(Backend::Legacy),
            "nft" | "nf_tables" => Ok(Backend::Nft),
            _ => Err(NatError::UnknownBackend(s.to_owned())),
        }
    }
}

/// What [`Iptables::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The rules were (re)written and the hooks checked.
    Applied,
    /// The rendered rules equal the last applied ones; nothing was run.
    Unchanged,
}

/// What to do about a failed iptables command, from its stderr.
fn failure_hint(stderr: &str, default: &'static str) -> String {
    let s = stderr.to_ascii_lowercase();
    let hint = if s.contains("permission denied") || s.contains("must be root") {
        "netd needs root (CAP_NET_ADMIN and CAP_NET_RAW)"
    } else if s.contains("xtables lock") {
        "another program held the xtables lock too long; retry"
    } else if s.contains("couldn't load")
        || s.contains("no chain/target/match")
        || s.contains("does not exist")
        || s.contains("extension")
        || s.contains("protocol not supported")
    {
        "a kernel module may be missing (iptable_nat, nf_nat, xt_conntrack, xt_addrtype, xt_TCPMSS, xt_MASQUERADE, or nf_tables for the nft backend): check dmesg, or pick the other backend"
    } else if s.contains("exec of") && s.contains("failed") {
        default
    } else {
        return format!("see the message above; {default}");
    };
    hint.to_owned()
}

/// netd's handle on the host's iptables: one backend, one place that runs it.
/// Cheap to keep for the daemon's lifetime; shareable between threads.
#[derive(Debug)]
pub struct Iptables {
    backend: Backend,
    runner: Runner,
    /// The restore input last applied successfully (hooks verified with it).
    last: Mutex<Option<String>>,
    /// The same, kept through [`Iptables::invalidate`] (cleared by
    /// [`Iptables::teardown`]): what [`Iptables::verify`] expects.
    applied: Mutex<Option<String>>,
}

impl Iptables {
    /// Picks the backend the host already uses, like kube-proxy: count the
    /// rules (plus built-in chains with a non-ACCEPT policy) that
    /// `iptables-legacy-save` and `iptables-nft-save` show; the one with more
    /// wins, a tie goes to nft (Debian's default). A backend whose save
    /// command fails does not count; both failing is an error.
    pub fn detect() -> Result<Iptables, NatError> {
        Self::detect_with(Runner::default())
    }

    /// [`Iptables::detect`], run inside network namespace `netns`; the
    /// result runs every command there too.
    pub fn detect_in_netns(netns: &str) -> Result<Iptables, NatError> {
        Self::detect_with(Runner::new(Some(netns)))
    }

    fn detect_with(runner: Runner) -> Result<Iptables, NatError> {
        let score = |b: Backend| {
            runner
                .check(b.save(), &[], None, IPTABLES_HINT)
                .map(|out| usage_score(&out))
        };
        let legacy = score(Backend::Legacy);
        let nft = score(Backend::Nft);
        let backend = match (&legacy, &nft) {
            (Ok(l), Ok(n)) => {
                if l > n {
                    Backend::Legacy
                } else {
                    Backend::Nft
                }
            }
            (Ok(_), Err(_)) => Backend::Legacy,
            (Err(_), Ok(_)) => Backend::Nft,
            (Err(l), Err(n)) => {
                return Err(NatError::NoBackend {
                    legacy: l.to_string(),
                    nft: n.to_string(),
                })
            }
        };
        tracing::info!(
            %backend,
            legacy = ?legacy.as_ref().ok(),
            nft = ?nft.as_ref().ok(),
            "iptables backend detected"
        );
        Ok(Iptables {
            backend,
            runner,
            last: Mutex::new(None),
            applied: Mutex::new(None),
        })
    }

    /// Uses `backend` (the operator's override).
    pub fn with_backend(backend: Backend) -> Iptables {
        Iptables {
            backend,
            runner: Runner::default(),
            last: Mutex::new(None),
            applied: Mutex::new(None),
        }
    }

    /// Runs every command inside network namespace `netns`
    /// (`ip netns exec <netns> ...`) instead of the host's. For tests.
    pub fn in_netns(mut self, netns: impl Into<String>) -> Iptables {
        self.runner.netns = Some(netns.into());
        self
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The network namespace commands run in, if not the host's.
    pub fn netns(&self) -> Option<&str> {
        self.runner.netns.as_deref()
    }

    /// Makes weft's rules those of `spec`: one `iptables-restore --noflush`
    /// batch (all weft chains replaced at once), then the hooks from the
    /// built-in chains, inserted where missing. Skips everything when the
    /// rendered rules equal the last ones this handle applied; call
    /// [`Iptables::invalidate`] to force a full re-apply (e.g. periodically,
    /// in case someone flushed the tables).
    pub fn apply(&self, spec: &NatSpec) -> Result<ApplyOutcome, NatError> {
        let rules = render(spec)?;
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.as_deref() == Some(rules.as_str()) {
            return Ok(ApplyOutcome::Unchanged);
        }
        // Until both steps succeed the kernel state is unknown.
        *last = None;
        self.restore(&rules)?;
        self.ensure_hooks()?;
        tracing::debug!(backend = %self.backend, ports = spec.ports.len(), "iptables rules applied");
        *self.applied.lock().unwrap_or_else(PoisonError::into_inner) = Some(rules.clone());
        *last = Some(rules);
        Ok(ApplyOutcome::Applied)
    }

    /// What of weft's rules, as last applied, the kernel lacks now (one
    /// `iptables-save`; [`super::verify`] compares). Empty before the first
    /// apply and after a teardown. Waits for an apply under way, so it never
    /// compares the kernel with rules it has not finished writing.
    pub fn verify(&self) -> Result<Vec<Missing>, NatError> {
        let _applying = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let applied = self
            .applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(applied) = applied else {
            return Ok(Vec::new());
        };
        Ok(missing(&applied, &self.save()?))
    }

    /// Forgets the last applied rules, so the next [`Iptables::apply`] runs
    /// in full.
    pub fn invalidate(&self) {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Removes every jump into a weft chain, then every weft chain
    /// (`WEFT-*`), in all tables. Idempotent: with nothing there it does
    /// nothing.
    pub fn teardown(&self) -> Result<(), NatError> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        *last = None;
        *self.applied.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let saved = self.save()?;
        let tables = parse_save(&saved);
        for t in &tables {
            for (chain, args) in &t.jumps_into_weft {
                let mut argv: Vec<&str> = vec!["-w", LOCK_WAIT_SECS, "-t", &t.name, "-D", chain];
                argv.extend(args.iter().map(String::as_str));
                self.runner
                    .check(self.backend.iptables(), &argv, None, IPTABLES_HINT)?;
            }
        }
        let mut batch = String::new();
        for t in tables.iter().filter(|t| !t.weft_chains.is_empty()) {
            batch.push_str(&format!("*{}\n", t.name));
            for c in &t.weft_chains {
                batch.push_str(&format!(":{c} - [0:0]\n"));
            }
            for c in &t.weft_chains {
                batch.push_str(&format!("-X {c}\n"));
            }
            batch.push_str("COMMIT\n");
        }
        if !batch.is_empty() {
            self.restore(&batch)?;
        }
        tracing::debug!(backend = %self.backend, "weft's iptables chains removed");
        Ok(())
    }

    /// `iptables-<backend>-save`: all tables, as text.
    pub fn save(&self) -> Result<String, NatError> {
        Ok(self
            .runner
            .check(self.backend.save(), &[], None, IPTABLES_HINT)?)
    }

    fn restore(&self, input: &str) -> Result<(), NatError> {
        self.runner.check(
            self.backend.restore(),
            &["--noflush", "--wait", LOCK_WAIT_SECS],
            Some(input),
            IPTABLES_HINT,
        )?;
        Ok(())
    }

    fn ensure_hooks(&self) -> Result<(), NatError> {
        let ipt = self.backend.iptables();
        for h in hooks() {
            let mut check = vec!["-w", LOCK_WAIT_SECS, "-t", h.table, "-C", h.chain];
            check.extend_from_slice(h.rule);
            let out = self.runner.run(ipt, &check, None, IPTABLES_HINT)?;
            match out.status.code() {
                Some(0) => continue,
                // "Bad rule (does a matching rule exist in that chain?)"
                Some(1) => {}
                _ => {
                    return Err(self
                        .runner
                        .failed(ipt, &check, &out, None, IPTABLES_HINT)
                        .into())
                }
            }
            let mut insert = vec!["-w", LOCK_WAIT_SECS, "-t", h.table, "-I", h.chain, "1"];
            insert.extend_from_slice(h.rule);
            self.runner.check(ipt, &insert, None, IPTABLES_HINT)?;
            tracing::info!(table = h.table, chain = h.chain, rule = %h.rule.join(" "), "inserted iptables hook");
        }
        Ok(())
    }
}

/// How much a backend is in use, from its save output: rules, plus built-in
/// chains whose policy is not ACCEPT (Docker's `FORWARD DROP` alone counts).
pub(super) fn usage_score(save: &str) -> usize {
    save.lines()
        .filter(|l| {
            if l.starts_with("-A ") {
                return true;
            }
            let mut words = l.strip_prefix(':').unwrap_or("").split_whitespace();
            let _chain = words.next();
            matches!(words.next(), Some(policy) if policy != "-" && policy != "ACCEPT")
        })
        .count()
}

/// One table of `iptables-save` output, as far as teardown cares.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct SavedTable {
    pub name: String,
    /// Chains named `WEFT-*`.
    pub weft_chains: Vec<String>,
    /// Rules in other chains that jump (`-j`/`-g`) into a weft chain:
    /// `(chain, rule args)`.
    pub jumps_into_weft: Vec<(String, Vec<String>)>,
}

pub(super) fn parse_save(save: &str) -> Vec<SavedTable> {
    let mut tables: Vec<SavedTable> = Vec::new();
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            tables.push(SavedTable {
                name: name.trim().to_owned(),
                ..SavedTable::default()
            });
            continue;
        }
        let Some(t) = tables.last_mut() else { continue };
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next() {
                if chain.starts_with(CHAIN_PREFIX) {
                    t.weft_chains.push(chain.to_owned());
                }
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let mut words = split_rule(rule);
            if words.is_empty() {
                continue;
            }
            let chain = words.remove(0);
            if chain.starts_with(CHAIN_PREFIX) {
                continue;
            }
            let jumps = words.windows(2).any(|w| {
                (w[0] == "-j" || w[0] == "-g" || w[0] == "--jump" || w[0] == "--goto")
                    && w[1].starts_with(CHAIN_PREFIX)
            });
            if jumps {
                t.jumps_into_weft.push((chain, words));
            }
        }
    }
    tables
}

/// Splits a saved rule into arguments: whitespace separated, double quotes
/// group (as in `--comment "a b"`), backslash escapes the next character.
fn split_rule(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = rule.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::CommandError;

    #[test]
    fn backend_names_and_parse() {
        assert_eq!("legacy".parse::<Backend>().unwrap(), Backend::Legacy);
        assert_eq!("NFT".parse::<Backend>().unwrap(), Backend::Nft);
        assert!(matches!(
            "ebpf".parse::<Backend>(),
            Err(NatError::UnknownBackend(s)) if s == "ebpf"
        ));
        assert_eq!(Backend::Legacy.restore(), "iptables-legacy-restore");
        assert_eq!(Backend::Nft.save(), "iptables-nft-save");
        assert_eq!(Backend::Nft.iptables(), "iptables-nft");
        assert_eq!(Backend::Legacy.to_string(), "legacy");
    }

    #[test]
    fn score_counts_rules_and_non_accept_policies() {
        let save = "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n\
                    :OUTPUT ACCEPT [0:0]\n:DOCKER - [0:0]\n-A FORWARD -j DOCKER\n-A DOCKER -j RETURN\nCOMMIT\n";
        assert_eq!(usage_score(save), 3);
        assert_eq!(usage_score(""), 0);
    }

    #[test]
    fn parse_save_finds_weft_chains_and_jumps() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:WEFT-PREROUTING - [0:0]\n:WEFT-OLD - [0:0]\n\
                    -A PREROUTING -j WEFT-PREROUTING\n\
                    -A PREROUTING -m comment --comment \"old \\\"weft\\\" hook\" -j WEFT-OLD\n\
                    -A PREROUTING -j DOCKER\n-A WEFT-PREROUTING -j WEFT-DNAT\nCOMMIT\n\
                    *filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n";
        let t = parse_save(save);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "nat");
        assert_eq!(t[0].weft_chains, vec!["WEFT-PREROUTING", "WEFT-OLD"]);
        assert_eq!(
            t[0].jumps_into_weft,
            vec![
                (
                    "PREROUTING".to_owned(),
                    vec!["-j".to_owned(), "WEFT-PREROUTING".to_owned()]
                ),
                (
                    "PREROUTING".to_owned(),
                    [
                        "-m",
                        "comment",
                        "--comment",
                        "old \"weft\" hook",
                        "-j",
                        "WEFT-OLD"
                    ]
                    .map(String::from)
                    .to_vec()
                ),
            ]
        );
        assert_eq!(
            t[1],
            SavedTable {
                name: "filter".into(),
                ..SavedTable::default()
            }
        );
    }

    #[test]
    fn missing_program_is_a_spawn_error_with_a_hint() {
        let r = Runner::default();
        let e: NatError = r
            .check("weft-no-such-program", &[], None, IPTABLES_HINT)
            .unwrap_err()
            .into();
        let msg = e.to_string();
        assert!(
            matches!(e, NatError::Command(CommandError::Spawn { .. })),
            "{msg}"
        );
        assert!(
            msg.contains("weft-no-such-program") && msg.contains("iptables package"),
            "{msg}"
        );
    }

    #[test]
    fn iptables_failures_say_what_to_do() {
        let hint = |stderr| failure_hint(stderr, IPTABLES_HINT.install);
        assert!(hint("iptables: Permission denied (you must be root)").contains("root"));
        assert!(hint("Another app is currently holding the xtables lock").contains("retry"));
        assert!(hint("Couldn't load target `MASQUERADE'").contains("kernel module"));
        assert_eq!(hint("exec of iptables-nft failed"), IPTABLES_HINT.install);
        assert_eq!(
            hint("odd"),
            format!("see the message above; {}", IPTABLES_HINT.install)
        );
    }
}
