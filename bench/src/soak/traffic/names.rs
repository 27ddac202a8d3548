//! Which name a DNS client asks next, and what kind of name it is (so
//! `invariants::judge_dns` knows what the answer must be). The forms are
//! dnsd's (`dnsd/src/table/mod.rs` lists them):
//!
//! * a container's name (or alias): `<name>.<stack>.<domain>` and
//!   `<name>.<domain>` for any container; also `<name>.<stack>` and the
//!   bare `<name>` for a container of a *stable* stack (a probe's: never
//!   churned). A short name that no longer exists is not NXDOMAIN but
//!   forwarded upstream (nothing says it is ours once its stack is gone),
//!   so short names are only asked where they always exist;
//! * `tasks.<service>.<stack>.<domain>` (and `tasks.<service>.<stack>` for a
//!   stable stack): every container of the service;
//! * a name that never existed, in the domain or under a stable stack:
//!   NXDOMAIN.
//!
//! The service's own name is not asked: in `vip` mode it answers the VIP,
//! which no life records.
//!
//! Containers are picked among the live ones, and [`RECENT_SHARE`] of the
//! time among the recent ones (added, or deleted, within [`RECENT_MS`]),
//! so the checks around an ADD and a DEL get many queries.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::soak::rng::Rng;
use crate::soak::timeline::{DnsQuery, Life, Ms};

/// A container added or deleted this recently is "recent".
pub const RECENT_MS: Ms = 5_000;
/// Shares of the queries: names that never existed, `tasks.` names; the
/// rest are containers' names and aliases.
pub const ABSENT_SHARE: f64 = 0.1;
pub const TASKS_SHARE: f64 = 0.2;
/// Of the container queries: how many go to recent containers, and how
/// many ask an alias (of a container that has one).
pub const RECENT_SHARE: f64 = 0.4;
pub const ALIAS_SHARE: f64 = 0.25;
/// Names that never existed start with this (no container is named so).
pub const ABSENT_PREFIX: &str = "absent-";

/// The lives a client picks names from, indexed once per snapshot.
pub struct Pool {
    lives: Arc<Vec<Life>>,
    /// Indices of the containers with no DEL sent.
    live: Vec<usize>,
    /// Indices of the containers added or deleted within [`RECENT_MS`].
    recent: Vec<usize>,
    /// The services with a live or recent container: (service, stack).
    services: Vec<(String, Option<String>)>,
    /// The stacks of live probes: their short names always exist.
    stable: BTreeSet<String>,
}

impl Pool {
    /// The pool of `lives` (a snapshot) at `now_ms`.
    pub fn new(lives: Arc<Vec<Life>>, now_ms: Ms) -> Pool {
        let mut live = Vec::new();
        let mut recent = Vec::new();
        let mut services = BTreeSet::new();
        let mut stable = BTreeSet::new();
        for (i, l) in lives.iter().enumerate() {
            let is_live = l.del_sent_ms.is_none();
            let is_recent = if is_live {
                l.added_ms + RECENT_MS >= now_ms
            } else {
                l.deleted_ms.is_none_or(|d| d + RECENT_MS >= now_ms)
            };
            if is_live {
                live.push(i);
                if l.probe {
                    stable.extend(l.stack.clone());
                }
            }
            if is_recent {
                recent.push(i);
            }
            if is_live || is_recent {
                if let Some(svc) = &l.service {
                    services.insert((svc.clone(), l.stack.clone()));
                }
            }
        }
        Pool {
            lives,
            live,
            recent,
            services: services.into_iter().collect(),
            stable,
        }
    }

    /// The snapshot the pool was built from.
    pub fn lives(&self) -> &Arc<Vec<Life>> {
        &self.lives
    }

    /// The next name to ask in `domain`, and what it is.
    pub fn choose(&self, rng: &mut Rng, domain: &str) -> (String, DnsQuery) {
        let r = rng.unit();
        if r < TASKS_SHARE && !self.services.is_empty() {
            return self.tasks(rng, domain);
        }
        if r < TASKS_SHARE + ABSENT_SHARE || (self.live.is_empty() && self.recent.is_empty()) {
            return self.absent(rng, domain);
        }
        let from = if (rng.chance(RECENT_SHARE) && !self.recent.is_empty()) || self.live.is_empty()
        {
            &self.recent
        } else {
            &self.live
        };
        let life = &self.lives[from[rng.below(from.len() as u64) as usize]];
        self.container(rng, domain, life)
    }

    /// Whether `stack` is a stable stack (`None`: no stack is stable).
    fn is_stable(&self, stack: Option<&String>) -> bool {
        stack.is_some_and(|s| self.stable.contains(s))
    }

    fn container(&self, rng: &mut Rng, domain: &str, l: &Life) -> (String, DnsQuery) {
        let label = if !l.aliases.is_empty() && rng.chance(ALIAS_SHARE) {
            l.aliases[rng.below(l.aliases.len() as u64) as usize].as_str()
        } else if l.name.is_empty() {
            // dnsd names a container without a name by its short id.
            &l.id[..l.id.len().min(12)]
        } else {
            l.name.as_str()
        };
        let label = label.to_ascii_lowercase();
        let stable = l.probe && l.del_sent_ms.is_none() && self.is_stable(l.stack.as_ref());
        let mut forms = Vec::with_capacity(4);
        match &l.stack {
            Some(s) => {
                forms.push(format!("{label}.{s}.{domain}"));
                if stable {
                    forms.push(format!("{label}.{s}"));
                }
            }
            None => forms.push(format!("{label}.{domain}")),
        }
        // Every container named so, in any stack (an alias has no such form).
        if label == l.name.to_ascii_lowercase() {
            if l.stack.is_some() {
                forms.push(format!("{label}.{domain}"));
            }
            if stable {
                forms.push(label.clone());
            }
        }
        let name = forms.swap_remove(rng.below(forms.len() as u64) as usize);
        (name, DnsQuery::Container { id: l.id.clone() })
    }

    fn tasks(&self, rng: &mut Rng, domain: &str) -> (String, DnsQuery) {
        let (service, stack) = &self.services[rng.below(self.services.len() as u64) as usize];
        let name = match stack {
            Some(s) if self.is_stable(Some(s)) && rng.chance(0.5) => format!("tasks.{service}.{s}"),
            Some(s) => format!("tasks.{service}.{s}.{domain}"),
            None => format!("tasks.{service}.{domain}"),
        };
        let query = DnsQuery::Tasks {
            service: service.clone(),
            stack: stack.clone(),
        };
        (name, query)
    }

    fn absent(&self, rng: &mut Rng, domain: &str) -> (String, DnsQuery) {
        let label = format!("{ABSENT_PREFIX}{:08x}", rng.next_u64() as u32);
        let stable: Vec<&String> = self.stable.iter().collect();
        let name = match rng.below(3) {
            1 if !stable.is_empty() => {
                let s = stable[rng.below(stable.len() as u64) as usize];
                format!("{label}.{s}.{domain}")
            }
            2 if !stable.is_empty() => {
                let s = stable[rng.below(stable.len() as u64) as usize];
                format!("{label}.{s}")
            }
            _ => format!("{label}.{domain}"),
        };
        (name, DnsQuery::Absent)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const D: &str = "weft.internal";

    fn life(id: &str, stack: Option<&str>, probe: bool) -> Life {
        Life {
            id: id.into(),
            host: 0,
            name: format!("n-{id}"),
            service: Some("svc".into()),
            stack: stack.map(Into::into),
            aliases: vec![],
            ports: vec![],
            addr: "10.42.0.2".parse().unwrap(),
            add_sent_ms: 0,
            added_ms: 10,
            del_sent_ms: None,
            deleted_ms: None,
            probe,
        }
    }

    fn sample(pool: &Pool, n: usize) -> Vec<(String, DnsQuery)> {
        let mut rng = Rng::new(42, 0);
        (0..n).map(|_| pool.choose(&mut rng, D)).collect()
    }

    #[test]
    fn every_kind_is_asked_and_short_names_only_in_stable_stacks() {
        let mut churned = life("c1", Some("stack-a"), false);
        churned.aliases = vec!["www".into()];
        let mut old = life("c0", Some("stack-a"), false);
        old.del_sent_ms = Some(100);
        old.deleted_ms = Some(200);
        let lives = vec![life("p0", Some("soak"), true), churned, old];
        let pool = Pool::new(Arc::new(lives), 60_000);
        let got = sample(&pool, 2_000);
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for (name, q) in &got {
            *names.entry(name.as_str()).or_default() += 1;
            match q {
                DnsQuery::Absent => {
                    assert!(name.starts_with(ABSENT_PREFIX), "{name}");
                    assert!(name.ends_with(D) || name.ends_with(".soak"), "{name}");
                }
                DnsQuery::Tasks { service, stack } => {
                    assert_eq!(service, "svc");
                    let s = stack.as_deref().unwrap();
                    if s == "soak" {
                        assert!(name == "tasks.svc.soak" || name == "tasks.svc.soak.weft.internal");
                    } else {
                        assert_eq!(name, &format!("tasks.svc.{s}.{D}"));
                    }
                }
                DnsQuery::Container { id } => {
                    // Deleted a minute ago: neither live nor recent.
                    assert_ne!(id, "c0");
                    if id == "c1" {
                        assert!(name.ends_with(D), "churned short name {name}");
                    }
                }
            }
        }
        for want in [
            "n-p0.soak.weft.internal",
            "n-p0.soak",
            "n-p0.weft.internal",
            "n-p0",
            "n-c1.stack-a.weft.internal",
            "n-c1.weft.internal",
            "www.stack-a.weft.internal",
            "tasks.svc.stack-a.weft.internal",
            "tasks.svc.soak",
        ] {
            assert!(names.contains_key(want), "{want} never asked: {names:?}");
        }
        let share = |f: &dyn Fn(&DnsQuery) -> bool| {
            got.iter().filter(|(_, q)| f(q)).count() as f64 / got.len() as f64
        };
        let absent = share(&|q| matches!(q, DnsQuery::Absent));
        let tasks = share(&|q| matches!(q, DnsQuery::Tasks { .. }));
        assert!((0.06..0.14).contains(&absent), "absent {absent}");
        assert!((0.15..0.25).contains(&tasks), "tasks {tasks}");
    }

    #[test]
    fn recent_containers_get_their_share_and_deleted_ones_only_long_names() {
        // 20 old live containers, one just added, one just deleted.
        let mut lives: Vec<Life> = (0..20)
            .map(|i| life(&format!("old{i}"), Some("stack-a"), false))
            .collect();
        let mut new = life("new", Some("stack-b"), false);
        new.added_ms = 59_000;
        let mut gone = life("gone", Some("stack-b"), false);
        gone.del_sent_ms = Some(58_000);
        gone.deleted_ms = Some(58_500);
        lives.push(new);
        lives.push(gone);
        let pool = Pool::new(Arc::new(lives), 60_000);
        let got = sample(&pool, 4_000);
        let asked = |id: &str| {
            got.iter()
                .filter(|(_, q)| matches!(q, DnsQuery::Container { id: i } if i == id))
                .count()
        };
        let containers = got
            .iter()
            .filter(|(_, q)| matches!(q, DnsQuery::Container { .. }))
            .count();
        // Each recent one gets about RECENT_SHARE / 2 of the container
        // queries; an old one about 1/21 of the rest.
        for id in ["new", "gone"] {
            let share = asked(id) as f64 / containers as f64;
            assert!((0.15..0.25).contains(&share), "{id}: {share}");
        }
        assert!(asked("old3") < asked("new") / 3);
        for (name, q) in &got {
            if matches!(q, DnsQuery::Container { id } if id == "gone") {
                assert!(name.ends_with(D), "{name}");
            }
        }
        // Both stacks' services are asked while a container of each is live
        // or recent.
        assert!(got
            .iter()
            .any(|(n, _)| n == "tasks.svc.stack-b.weft.internal"));
    }

    #[test]
    fn with_no_containers_only_absent_names() {
        let pool = Pool::new(Arc::new(vec![]), 0);
        for (name, q) in sample(&pool, 100) {
            assert_eq!(q, DnsQuery::Absent);
            assert!(name.ends_with(D));
        }
    }
}
