//! README's settings table against the settings structs: every setting in
//! code has its row (flag, variable, file key, default) and every row is a
//! setting. A failure prints the rows the code expects.
//!
//! The structs say it all: clap knows each field's flag, variable and
//! section (the group of its struct, named like its TOML table); serde's
//! view of the defaults gives each file key and its default value.

use std::collections::BTreeMap;

use clap::{Args, Command};
use serde_json::Value;

use super::Settings;
use crate::install::CniSettings;

const README: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
const HEADER: &str = "| flag / env | file key | default | what |";

/// One setting: how it is given, and its built-in default (`None`: none
/// that can be written down, e.g. found at start).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Row {
    flag: Option<String>,
    env: Option<String>,
    key: Option<String>,
    default: Option<String>,
}

impl Row {
    fn id(&self) -> (Option<String>, Option<String>, Option<String>) {
        (self.flag.clone(), self.env.clone(), self.key.clone())
    }

    fn expected_line(&self) -> String {
        let tick = |s: &Option<String>| s.as_ref().map_or("—".to_owned(), |s| format!("`{s}`"));
        let how = match (&self.flag, &self.env) {
            (None, None) => "—".to_owned(),
            _ => format!("{} / {}", tick(&self.flag), tick(&self.env)),
        };
        let default = self
            .default
            .as_ref()
            .map_or("(words)".to_owned(), |d| format!("`{d}`"));
        format!("| {how} | {} | {default} | ... |", tick(&self.key))
    }
}

/// Every file key with its default, from serde's view of the defaults.
fn file_keys() -> BTreeMap<String, Option<String>> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, Option<String>>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            leaf => {
                let shown = match leaf {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    Value::Array(a) if a.is_empty() => None,
                    other => Some(other.to_string()),
                };
                out.insert(prefix.to_owned(), shown);
            }
        }
    }
    let mut out = BTreeMap::new();
    let defaults = serde_json::to_value(Settings::default()).unwrap();
    walk("", &defaults, &mut out);
    out
}

/// The rows the code defines.
fn code_rows() -> Vec<Row> {
    let mut keys = file_keys();
    let cmd = CniSettings::augment_args(Settings::augment_args(Command::new("netd")));
    let section = |id: &str| {
        cmd.get_groups()
            .find(|g| g.get_args().any(|a| a.as_str() == id))
            .map(|g| g.get_id().as_str().to_owned())
    };
    let mut rows = Vec::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        let key = match section(id) {
            Some(s) => format!("{s}.{id}"),
            None => id.to_owned(),
        };
        let (key, default) = match keys.remove(&key) {
            Some(default) => (Some(key), default),
            None => (None, None),
        };
        rows.push(Row {
            flag: arg.get_long().map(|l| format!("--{l}")),
            env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
            key,
            default,
        });
    }
    // File-only keys (the `[store]` table's parts).
    for (key, default) in keys {
        rows.push(Row {
            flag: None,
            env: None,
            key: Some(key),
            default,
        });
    }
    rows.sort();
    rows
}

/// README's rows: the backticked flag, variable and key of each line of the
/// table, and its default cell as written.
fn readme_rows() -> Vec<(Row, String)> {
    let mut lines = README.lines().skip_while(|l| l.trim() != HEADER);
    assert!(
        lines.next().is_some(),
        "README has no settings table ({HEADER})"
    );
    let ticked = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    };
    lines
        .skip(1) // |---|---|
        .take_while(|l| l.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let how = ticked(cells.get(1).copied().unwrap_or(""));
            let find = |p: &str| how.iter().find(|t| t.starts_with(p)).cloned();
            let row = Row {
                flag: find("--"),
                env: find("WEFT_"),
                key: ticked(cells.get(2).copied().unwrap_or(""))
                    .into_iter()
                    .next(),
                default: None,
            };
            (row, cells.get(3).copied().unwrap_or("").to_owned())
        })
        .collect()
}

#[test]
fn readme_settings_table_matches_the_code() {
    let code = code_rows();
    let readme = readme_rows();
    let mut problems = Vec::new();
    for want in &code {
        match readme.iter().find(|(r, _)| r.id() == want.id()) {
            None => problems.push(format!("missing row: {}", want.expected_line())),
            Some((_, cell)) => match &want.default {
                Some(d) if !cell.contains(&format!("`{d}`")) => problems.push(format!(
                    "default of {:?} should say `{d}`, README says {cell:?}",
                    want.id()
                )),
                None if cell.is_empty() => {
                    problems.push(format!("default of {:?} is empty", want.id()))
                }
                _ => {}
            },
        }
    }
    for (r, _) in &readme {
        if !code.iter().any(|c| c.id() == r.id()) {
            problems.push(format!(
                "README row with no setting in code: flag {:?}, env {:?}, key {:?}",
                r.flag, r.env, r.key
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "README.md's settings table and netd/src/config/settings.rs disagree:\n{}\n\nrows the code expects:\n{HEADER}\n|---|---|---|---|\n{}",
        problems.join("\n"),
        code.iter().map(Row::expected_line).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn every_flag_is_in_a_section_or_at_the_top() {
    // Guards the join above: a flag whose id is not its TOML key would
    // show up as a row without a key.
    let rows = code_rows();
    let keyless: Vec<_> = rows
        .iter()
        .filter(|r| r.key.is_none())
        .filter_map(|r| r.flag.clone())
        .collect();
    assert_eq!(keyless, ["--store"], "only --store has no file key");
}
