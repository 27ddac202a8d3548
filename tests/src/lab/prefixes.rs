//! Lab name prefixes: each lab gets one no other lab of this process and no
//! existing namespace uses ([`alloc_prefix`]), and [`sweep_stale`] deletes
//! what runs that died without cleaning up left behind (namespaces, temp
//! dirs), by the [`naming`] scheme.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::naming::{self, Role};
use crate::netns::{list_netns, pid_alive, Netns};

/// Lab temp dirs are `<tmp>/weft-tests-<prefix>-XXXXXX`.
pub(super) const TEMP_DIR_TAG: &str = "weft-tests-";

/// Prefixes of the labs alive in this process. A namespace carrying this
/// process's pid whose prefix is not here is left over from an earlier process
/// that had the same pid.
static LIVE: Mutex<Option<HashSet<String>>> = Mutex::new(None);
static COUNTER: AtomicU32 = AtomicU32::new(0);
static OFFSET: OnceLock<u32> = OnceLock::new();

fn live() -> std::sync::MutexGuard<'static, Option<HashSet<String>>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Picks a prefix that no lab of this process uses and no namespace has, and
/// registers it as live.
pub(super) fn alloc_prefix() -> Result<String> {
    let pid = std::process::id();
    let offset = *OFFSET.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        ((nanos ^ (nanos >> 17)) % u128::from(naming::UNIQUE_SPACE)) as u32
    });
    let existing = list_netns()?;
    for _ in 0..naming::UNIQUE_SPACE {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let unique = offset.wrapping_add(n) % naming::UNIQUE_SPACE;
        let prefix = naming::prefix(pid, unique);
        let taken = existing
            .iter()
            .any(|ns| ns.len() > prefix.len() && ns.starts_with(&prefix));
        if taken {
            continue;
        }
        if live()
            .get_or_insert_with(HashSet::new)
            .insert(prefix.clone())
        {
            return Ok(prefix);
        }
    }
    Err(Error::Options(
        "no free lab prefix left in this process".into(),
    ))
}

pub(super) fn unregister(prefix: &str) {
    if let Some(set) = live().as_mut() {
        set.remove(prefix);
    }
}

/// Deletes namespaces left behind by harness runs that died without cleaning up
/// (SIGKILL, abort): those whose name follows [`naming`] exactly and whose creator
/// pid is gone — or is this very process but not one of its live labs (a reused
/// pid). Processes inside them are killed first. Returns the names deleted.
/// [`Lab::new`] calls this; nothing outside the naming scheme is ever touched.
pub fn sweep_stale() -> Result<Vec<String>> {
    let names = list_netns()?;
    let me = std::process::id();
    let is_stale = |p: &naming::ParsedName, live: &Option<HashSet<String>>| {
        if p.pid == me {
            !live.as_ref().is_some_and(|s| s.contains(&p.prefix))
        } else {
            !pid_alive(p.pid)
        }
    };
    let stale: Vec<String> = {
        let guard = live();
        names
            .into_iter()
            .filter(|name| naming::parse(name).is_some_and(|p| is_stale(&p, &guard)))
            .collect()
    };
    // Temp dirs of dead labs (`<tmp>/weft-tests-<prefix>-XXXXXX`) go too.
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in dir.flatten() {
            let file_name = entry.file_name();
            let Some(rest) = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(TEMP_DIR_TAG))
            else {
                continue;
            };
            let Some(prefix) = rest.get(..naming::PREFIX_LEN) else {
                continue;
            };
            if rest.as_bytes().get(naming::PREFIX_LEN) != Some(&b'-') {
                continue;
            }
            let parsed = naming::parse(&naming::netns_name(prefix, &Role::Underlay));
            if parsed.is_some_and(|p| is_stale(&p, &live())) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let mut swept = Vec::new();
    for name in stale {
        let ns = Netns::named(&name);
        match ns.destroy() {
            Ok(()) => {
                eprintln!("weft-tests: deleted stale netns {name} (its creator is gone)");
                swept.push(name);
            }
            Err(e) => eprintln!("weft-tests: could not delete stale netns {name}: {e}"),
        }
    }
    Ok(swept)
}
