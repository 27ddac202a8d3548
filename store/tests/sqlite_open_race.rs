//! Many processes opening one brand-new SQLite store file at the same moment
//! (the demo starts three `netd`s on one fresh file) must all succeed: none
//! may fail with "database is locked" while another creates the file, turns
//! on WAL or creates the schema.
//!
//! Processes, not threads: SQLite's locking between connections of one
//! process differs from that between processes. The test binary re-executes
//! itself: a child runs only [`open_race_child`], which does nothing unless
//! [`CHILD_ENV`] names the store file. Children block reading their stdin
//! until the parent closes it, which it does only once every child has said
//! it is ready, so all of them open the store at the same instant.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft_store::{SqliteStore, Store};

/// Processes per round.
const PROCS: usize = 16;
/// Rounds, each on a new file. Override with [`ROUNDS_ENV`] for a longer
/// soak: against the store before this test existed, about one round in ten
/// failed on a 2-core machine.
const ROUNDS: usize = 50;
const ROUNDS_ENV: &str = "WEFT_STORE_OPEN_RACE_ROUNDS";
/// Set in a child: the store file to open.
const CHILD_ENV: &str = "WEFT_STORE_OPEN_RACE_FILE";
/// Set in a child: its number within the round.
const CHILD_ID_ENV: &str = "WEFT_STORE_OPEN_RACE_ID";
/// Set in a child: the file it creates once it waits at the barrier.
const CHILD_READY_ENV: &str = "WEFT_STORE_OPEN_RACE_READY";
/// How long a round may take before the test gives up on it.
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);

/// The child side. Without [`CHILD_ENV`] (a normal test run) it does nothing.
#[test]
fn open_race_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let id = std::env::var(CHILD_ID_ENV).unwrap();
    let ready = std::env::var_os(CHILD_READY_ENV).unwrap();

    // The barrier: say we are here, then block until the parent closes our
    // stdin (EOF), which it does for every child at once.
    std::fs::write(&ready, b"").unwrap();
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest).unwrap();

    let store = match SqliteStore::open(&path) {
        Ok(s) => s,
        Err(e) => panic!("child {id}: open failed: {e}"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let key = format!("/race/{id}");
        let rev = match store.put(&key, id.as_bytes(), None).await {
            Ok(r) => r,
            Err(e) => panic!("child {id}: put failed: {e}"),
        };
        let kv = match store.get(&key).await {
            Ok(Some(kv)) => kv,
            Ok(None) => panic!("child {id}: {key} missing right after its put"),
            Err(e) => panic!("child {id}: get failed: {e}"),
        };
        assert_eq!(kv.value, id.as_bytes(), "child {id}");
        assert_eq!(kv.mod_revision, rev, "child {id}");
    });
}

/// One child waiting at the barrier.
fn spawn_child(exe: &Path, dir: &Path, store: &Path, id: usize) -> Child {
    Command::new(exe)
        .args([
            "open_race_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, store)
        .env(CHILD_ID_ENV, id.to_string())
        .env(CHILD_READY_ENV, dir.join(format!("ready-{id}")))
        // The panic message is what matters; a backtrace per child is noise.
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start a child process")
}

/// Runs one round on a new file; returns a description of every child that
/// failed (empty when all succeeded).
fn round(exe: &Path, n: usize) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    let mut children: Vec<Child> = (0..PROCS)
        .map(|id| spawn_child(exe, dir.path(), &store, id))
        .collect();

    // Wait until every child sits at the barrier (or one died early).
    let started = Instant::now();
    let mut failures = Vec::new();
    loop {
        let ready = (0..PROCS)
            .filter(|id| dir.path().join(format!("ready-{id}")).exists())
            .count();
        if ready == PROCS {
            break;
        }
        let died = children
            .iter_mut()
            .any(|c| matches!(c.try_wait(), Ok(Some(_))));
        if died || started.elapsed() > ROUND_TIMEOUT {
            failures.push(format!(
                "round {n}: only {ready} of {PROCS} children reached the barrier"
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    // Release them all at once: close every stdin back to back.
    let stdins: Vec<_> = children.iter_mut().map(|c| c.stdin.take()).collect();
    drop(stdins);

    for (id, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().expect("cannot wait for a child");
        if !out.status.success() {
            failures.push(format!(
                "round {n}, child {id}: {}\n--- stderr ---\n{}--- stdout ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout),
            ));
        }
    }
    failures
}

/// 16 processes open one new store file at the same instant, 50 times; every
/// one of them must open it, write and read back.
#[test]
fn sixteen_processes_open_one_new_file() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let rounds = match std::env::var(ROUNDS_ENV) {
        Ok(n) => n
            .parse()
            .unwrap_or_else(|e| panic!("{ROUNDS_ENV}={n:?}: {e}")),
        Err(_) => ROUNDS,
    };
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let mut failed_rounds = 0;
    let mut failed_children = 0;
    let mut report = Vec::new();
    for n in 0..rounds {
        let failures = round(&exe, n);
        if !failures.is_empty() {
            failed_rounds += 1;
            failed_children += failures.len();
            // Keep the report readable: the first few failures in full.
            report.extend(failures.into_iter().take(2));
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "open race: {failed_rounds} of {rounds} rounds failed \
         ({failed_children} of {} children) in {elapsed:.1?}",
        rounds * PROCS
    );
    assert!(
        failed_rounds == 0,
        "{failed_rounds} of {rounds} rounds had a child fail ({failed_children} of {} children); \
         the first failures:\n{}",
        rounds * PROCS,
        report
            .iter()
            .take(6)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
