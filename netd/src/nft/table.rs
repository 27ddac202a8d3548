//! One of weft's nf_tables tables as plain data, and the two ways to make
//! the kernel's copy equal to it: write it whole ([`Table::replace`]) or
//! change only the elements and counters that differ ([`Table::update`]).
//!
//! A [`Table`] is counters, sets/maps with their elements, and chains. Its
//! *shape* is its family and name, the sets' names and types and the base
//! chains (those hooked into the stack). When the shape is the one the
//! kernel has, a change (a container added or deleted, a source address
//! joining a map, a service's backends changing) is a handful of element,
//! counter and regular-chain changes in one transaction: no table is
//! deleted, no hook re-registered, and the counters that stay keep counting.
//! Re-creating a table costs the kernel a table teardown and a hook
//! registration (~40 ms on the lab machine, against ~4 ms for an element
//! change), and every container add and delete used to pay it while the
//! plugin waited.
//!
//! Both are pure: [`super::Nft`] decides which to run (the update when it
//! knows what the kernel has, the replacement otherwise: first apply, after a
//! failure, on the resync) and runs it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A named set or map and its elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    /// `ipv4_addr`, `ifname . ether_addr`, `ipv4_addr : verdict`, ... or
    /// `typeof <expr> : <expr>`. One with ` : ` makes it a map.
    pub ty: String,
    /// Key -> value (maps) or key -> `None` (sets).
    pub elements: BTreeMap<String, Option<String>>,
}

impl Set {
    pub fn new(name: impl Into<String>, ty: impl Into<String>) -> Set {
        Set {
            name: name.into(),
            ty: ty.into(),
            elements: BTreeMap::new(),
        }
    }

    fn is_map(&self) -> bool {
        self.ty.contains(" : ")
    }

    /// Adds set element `key`.
    pub fn add(&mut self, key: impl Into<String>) {
        self.elements.insert(key.into(), None);
    }

    /// Adds map element `key : value`.
    pub fn map(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.elements.insert(key.into(), Some(value.into()));
    }

    fn element(key: &str, value: &Option<String>) -> String {
        match value {
            Some(v) => format!("{key} : {v}"),
            None => key.to_owned(),
        }
    }
}

/// A regular chain: its name and its lines (a base chain's first line is
/// its `type ... hook ...; policy ...;`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub lines: Vec<String>,
}

impl Chain {
    /// A base chain (hooked into the stack) has a `type ...` first line.
    fn is_base(&self) -> bool {
        self.lines.first().is_some_and(|l| l.starts_with("type "))
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "\tchain {} {{", self.name);
        for l in &self.lines {
            let _ = writeln!(out, "\t\t{l}");
        }
        out.push_str("\t}\n");
    }
}

/// `table <family> <name> { ... }` as data: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// `inet`, `bridge`, `ip`.
    pub family: &'static str,
    /// [`super::TABLE`] for the policy and anti-spoofing tables.
    pub name: &'static str,
    /// Named counters: name -> comment.
    pub counters: BTreeMap<String, String>,
    /// Sets and maps, declared in this order.
    pub sets: Vec<Set>,
    /// Chains, declared in this order (a chain that others jump to first).
    pub chains: Vec<Chain>,
}

impl Table {
    /// An empty `table <family> weft`.
    pub fn new(family: &'static str) -> Table {
        Table::named(family, super::TABLE)
    }

    /// An empty `table <family> <name>`.
    pub fn named(family: &'static str, name: &'static str) -> Table {
        Table {
            family,
            name,
            counters: BTreeMap::new(),
            sets: Vec::new(),
            chains: Vec::new(),
        }
    }

    /// The set or map `name`.
    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| s.name == name)
    }

    /// Adds chain `name` with `lines`.
    pub fn chain<S: Into<String>>(
        &mut self,
        name: impl Into<String>,
        lines: impl IntoIterator<Item = S>,
    ) {
        self.chains.push(Chain {
            name: name.into(),
            lines: lines.into_iter().map(Into::into).collect(),
        });
    }

    /// `table <family> weft { ... }`, whole.
    pub fn render(&self) -> String {
        let mut t = format!("table {} {} {{\n", self.family, self.name);
        for (name, comment) in &self.counters {
            let _ = writeln!(t, "\tcounter {name} {{\n\t\tcomment \"{comment}\"\n\t}}");
        }
        for s in &self.sets {
            let kind = if s.is_map() { "map" } else { "set" };
            // `ty` is a type, or `typeof <expression>` (a key nft derives
            // from an expression, e.g. a concatenation with numgen).
            let decl = if s.ty.starts_with("typeof ") {
                s.ty.clone()
            } else {
                format!("type {}", s.ty)
            };
            let _ = write!(t, "\t{kind} {} {{\n\t\t{decl}\n", s.name);
            if !s.elements.is_empty() {
                let items: Vec<String> =
                    s.elements.iter().map(|(k, v)| Set::element(k, v)).collect();
                let _ = write!(
                    t,
                    "\t\telements = {{\n\t\t\t{}\n\t\t}}\n",
                    items.join(",\n\t\t\t")
                );
            }
            t.push_str("\t}\n");
        }
        for c in &self.chains {
            c.render(&mut t);
        }
        t.push_str("}\n");
        t
    }

    /// The script that makes the kernel's table this one whatever it has:
    /// declare the table (so the delete cannot fail on a host without it),
    /// delete it, write it whole. One transaction with the rest of the
    /// input: the kernel switches from the old rules to the new ones at once,
    /// and a failing line leaves the old table in place.
    pub fn replace(&self) -> String {
        let mut s = format!(
            "table {f} {t} {{}}\ndelete table {f} {t}\n",
            f = self.family,
            t = self.name
        );
        s.push_str(&self.render());
        s
    }

    /// Whether `other` has this table's shape: the same family and name,
    /// the same sets and maps (names and types, in order) and the same base
    /// chains. Elements, counters and regular chains may differ.
    pub fn same_shape(&self, other: &Table) -> bool {
        let base = |t: &Table| -> Vec<Chain> {
            t.chains.iter().filter(|c| c.is_base()).cloned().collect()
        };
        self.family == other.family
            && self.name == other.name
            && base(self) == base(other)
            && self.sets.len() == other.sets.len()
            && self
                .sets
                .iter()
                .zip(&other.sets)
                .all(|(a, b)| a.name == b.name && a.ty == b.ty)
    }

    /// The script that turns the kernel's `old` into this table in place,
    /// or `None` when the shapes differ (then only [`Table::replace`] will
    /// do). Empty when nothing differs. In this order, so that nothing is
    /// deleted while something still refers to it and nothing refers to
    /// what does not exist yet: elements that go are deleted; regular chains
    /// that change or go are flushed (their rules let go of what they
    /// refer to); chains and counters that go are deleted; new counters and
    /// (empty) chains are added; the rules of new and changed chains are
    /// written; new elements are added. A map element whose value changed is
    /// deleted and added again.
    pub fn update(&self, old: &Table) -> Option<String> {
        if !self.same_shape(old) {
            return None;
        }
        let (f, t) = (self.family, self.name);
        let mut out = String::new();
        for (new, was) in self.sets.iter().zip(&old.sets) {
            let gone: Vec<&str> = was
                .elements
                .iter()
                .filter(|(k, v)| new.elements.get(*k) != Some(*v))
                .map(|(k, _)| k.as_str())
                .collect();
            if !gone.is_empty() {
                let _ = writeln!(
                    out,
                    "delete element {f} {t} {} {{ {} }}",
                    new.name,
                    gone.join(", ")
                );
            }
        }
        let find = |chains: &[Chain], name: &str| chains.iter().position(|c| c.name == name);
        let gone_chains: Vec<&Chain> = old
            .chains
            .iter()
            .filter(|c| find(&self.chains, &c.name).is_none())
            .collect();
        let changed: Vec<&Chain> = self
            .chains
            .iter()
            .filter(|c| !c.is_base())
            .filter(|c| match find(&old.chains, &c.name) {
                Some(i) => old.chains[i] != **c,
                None => false,
            })
            .collect();
        let added: Vec<&Chain> = self
            .chains
            .iter()
            .filter(|c| find(&old.chains, &c.name).is_none())
            .collect();
        for c in changed.iter().chain(&gone_chains) {
            let _ = writeln!(out, "flush chain {f} {t} {}", c.name);
        }
        for c in &gone_chains {
            let _ = writeln!(out, "delete chain {f} {t} {}", c.name);
        }
        for (name, comment) in &old.counters {
            if self.counters.get(name) != Some(comment) {
                let _ = writeln!(out, "delete counter {f} {t} {name}");
            }
        }
        for (name, comment) in &self.counters {
            if old.counters.get(name) != Some(comment) {
                let _ = writeln!(
                    out,
                    "add counter {f} {t} {name} {{ comment \"{comment}\" ; }}"
                );
            }
        }
        for c in &added {
            let _ = writeln!(out, "add chain {f} {t} {}", c.name);
        }
        if !added.is_empty() || !changed.is_empty() {
            // In the table's order: a chain that others jump to comes first.
            let _ = writeln!(out, "table {f} {t} {{");
            for c in self
                .chains
                .iter()
                .filter(|c| added.contains(c) || changed.contains(c))
            {
                c.render(&mut out);
            }
            out.push_str("}\n");
        }
        for (new, was) in self.sets.iter().zip(&old.sets) {
            let added: Vec<String> = new
                .elements
                .iter()
                .filter(|(k, v)| was.elements.get(*k) != Some(*v))
                .map(|(k, v)| Set::element(k, v))
                .collect();
            if !added.is_empty() {
                let _ = writeln!(
                    out,
                    "add element {f} {t} {} {{ {} }}",
                    new.name,
                    added.join(", ")
                );
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ports: &[(&str, &str)]) -> Table {
        let mut t = Table::new("bridge");
        let mut set = Set::new("ports", "ifname");
        let mut map = Set::new("drops", "ifname : counter");
        for (port, container) in ports {
            set.add(format!("\"{port}\""));
            map.map(format!("\"{port}\""), format!("\"c_{port}\""));
            t.counters
                .insert(format!("c_{port}"), (*container).to_owned());
        }
        t.sets = vec![set, map];
        t.chain(
            "pre",
            [
                "type filter hook prerouting priority -300; policy accept;",
                "iifname != @ports accept",
                "counter name iifname map @drops drop",
            ],
        );
        t
    }

    #[test]
    fn renders_counters_sets_then_chains() {
        let t = table(&[("p1", "a")]);
        assert_eq!(
            t.render(),
            "table bridge weft {\n\
             \tcounter c_p1 {\n\t\tcomment \"a\"\n\t}\n\
             \tset ports {\n\t\ttype ifname\n\t\telements = {\n\t\t\t\"p1\"\n\t\t}\n\t}\n\
             \tmap drops {\n\t\ttype ifname : counter\n\t\telements = {\n\t\t\t\"p1\" : \"c_p1\"\n\t\t}\n\t}\n\
             \tchain pre {\n\
             \t\ttype filter hook prerouting priority -300; policy accept;\n\
             \t\tiifname != @ports accept\n\
             \t\tcounter name iifname map @drops drop\n\t}\n\
             }\n"
        );
        assert!(t
            .replace()
            .starts_with("table bridge weft {}\ndelete table bridge weft\ntable bridge weft {\n"));
        // An empty set has no elements line (nft refuses `elements = { }`).
        assert!(!table(&[]).render().contains("elements"));
    }

    #[test]
    fn an_update_changes_only_what_differs_in_a_safe_order() {
        let old = table(&[("p1", "a"), ("p2", "b")]);
        let new = table(&[("p2", "b"), ("p3", "c")]);
        assert_eq!(
            new.update(&old).unwrap(),
            "delete element bridge weft ports { \"p1\" }\n\
             delete element bridge weft drops { \"p1\" }\n\
             delete counter bridge weft c_p1\n\
             add counter bridge weft c_p3 { comment \"c\" ; }\n\
             add element bridge weft ports { \"p3\" }\n\
             add element bridge weft drops { \"p3\" : \"c_p3\" }\n"
        );
        assert_eq!(new.update(&new).unwrap(), "");
        // A changed map value or counter comment: deleted, added again.
        let mut moved = new.clone();
        moved.sets[1].map("\"p2\"", "\"c_p3\"");
        moved.counters.insert("c_p3".into(), "d".into());
        assert_eq!(
            moved.update(&new).unwrap(),
            "delete element bridge weft drops { \"p2\" }\n\
             delete counter bridge weft c_p3\n\
             add counter bridge weft c_p3 { comment \"d\" ; }\n\
             add element bridge weft drops { \"p2\" : \"c_p3\" }\n"
        );
    }

    #[test]
    fn a_new_shape_needs_the_whole_table() {
        let old = table(&[("p1", "a")]);
        let mut rule = old.clone();
        rule.chains[0].lines.push("drop".into());
        assert!(rule.update(&old).is_none());
        let mut set = old.clone();
        set.sets.push(Set::new("more", "ipv4_addr"));
        assert!(set.update(&old).is_none());
        let mut ty = old.clone();
        ty.sets[0].ty = "ipv4_addr".into();
        assert!(ty.update(&old).is_none());
        let mut family = old.clone();
        family.family = "inet";
        assert!(family.update(&old).is_none());
        let mut name = old.clone();
        name.name = "other";
        assert!(name.update(&old).is_none());
    }

    /// Regular chains come, go and change in place: a service's backends
    /// changing is one chain rewritten, not a new table.
    #[test]
    fn regular_chains_change_in_place() {
        let mut old = Table::named("ip", "svc");
        let mut vips = Set::new("vips", "ipv4_addr : verdict");
        vips.map("10.43.0.2", "goto svc-a");
        old.sets.push(vips);
        old.chain("be-1", ["dnat to 10.42.0.5"]);
        old.chain("be-2", ["dnat to 10.42.0.6"]);
        old.chain(
            "svc-a",
            ["numgen random mod 2 vmap { 0 : goto be-1, 1 : goto be-2 }"],
        );
        old.chain(
            "prerouting",
            [
                "type nat hook prerouting priority dstnat; policy accept;",
                "ip daddr vmap @vips",
            ],
        );
        let mut new = old.clone();
        new.chains.remove(1);
        new.chains.insert(
            1,
            Chain {
                name: "be-3".into(),
                lines: vec!["dnat to 10.42.0.7".into()],
            },
        );
        new.chains[2].lines =
            vec!["numgen random mod 2 vmap { 0 : goto be-1, 1 : goto be-3 }".into()];
        assert_eq!(
            new.update(&old).unwrap(),
            "flush chain ip svc svc-a\n\
             flush chain ip svc be-2\n\
             delete chain ip svc be-2\n\
             add chain ip svc be-3\n\
             table ip svc {\n\
             \tchain be-3 {\n\t\tdnat to 10.42.0.7\n\t}\n\
             \tchain svc-a {\n\t\tnumgen random mod 2 vmap { 0 : goto be-1, 1 : goto be-3 }\n\t}\n\
             }\n"
        );
        assert_eq!(new.update(&new).unwrap(), "");
    }
}
