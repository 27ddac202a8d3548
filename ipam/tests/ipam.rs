//! IPAM over both store backends: block leases, endpoint addresses, GC,
//! 8 processes allocating concurrently, and a property test against a model.
//! Test names say the backend (`sqlite::…`, `etcd::…`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use weft_ipam::{plan, Ipam, IpamConfig, IpamError, Owner};
use weft_store::testing::TestStore;
use weft_store::{EtcdConfig, EtcdStore, SqliteStore};

fn cfg(range: &str, block_prefix: u8, grace: Duration) -> IpamConfig {
    IpamConfig {
        cluster_range: range.parse().unwrap(),
        block_prefix,
        block_grace: grace,
        ..IpamConfig::default()
    }
}

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

async fn same_host_same_block_after_restart(t: TestStore) {
    let c = IpamConfig::default();
    let a = Ipam::new(t.store(), c.clone(), "/weft/").await.unwrap();
    let block_a = a.lease_block("host-a").await.unwrap();
    let block_b = a.lease_block("host-b").await.unwrap();
    assert_eq!(block_a.block, net("10.42.0.0/24"));
    assert_eq!(block_a.gateway, "10.42.0.1".parse::<Ipv4Addr>().unwrap());
    assert_eq!(block_b.block, net("10.42.1.0/24"));
    // "Restart": a new handle, a new Ipam; same host id, same block.
    let again = Ipam::new(t.another_handle().await, c, "/weft/")
        .await
        .unwrap();
    assert_eq!(again.lease_block("host-a").await.unwrap(), block_a);
    assert_eq!(again.lease_block("host-b").await.unwrap(), block_b);
    let leases = again.block_leases().await.unwrap();
    assert_eq!(leases.len(), 2);
}

async fn dead_host_block_kept_for_grace(t: TestStore) {
    // Two /24 blocks in the range, 1.5 s grace.
    let c = cfg("10.42.0.0/23", 24, Duration::from_millis(1500));
    let ipam = Ipam::new(t.store(), c, "/weft/").await.unwrap();
    let a = ipam.lease_block("a").await.unwrap();
    let b = ipam.lease_block("b").await.unwrap();
    // Full: a third host gets a clear error naming the range.
    let e = ipam.lease_block("c").await.unwrap_err();
    assert!(matches!(e, IpamError::NoFreeBlock { .. }), "{e}");
    assert!(e.to_string().contains("10.42.0.0/23"), "{e}");

    // a keeps renewing; b dies. Within grace nothing is reused.
    tokio::time::sleep(Duration::from_millis(800)).await;
    ipam.renew_block(&a).await.unwrap();
    assert!(matches!(
        ipam.lease_block("c").await,
        Err(IpamError::NoFreeBlock { .. })
    ));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ipam.renew_block(&a).await.unwrap();
    // b is past grace: c takes its block, never a's.
    let c_block = ipam.lease_block("c").await.unwrap();
    assert_eq!(c_block.block, b.block);
    // b coming back finds its block gone.
    let e = ipam.renew_block(&b).await.unwrap_err();
    assert!(e.to_string().contains("now held by c"), "{e}");
    // And a still has its own.
    assert_eq!(ipam.lease_block("a").await.unwrap(), a);
}

async fn plan_mismatch_is_refused(t: TestStore) {
    Ipam::new(t.store(), IpamConfig::default(), "/weft/")
        .await
        .unwrap();
    let other = cfg("10.42.0.0/16", 26, Duration::from_secs(60));
    let e = Ipam::new(t.store(), other, "/weft/").await.err().unwrap();
    assert!(matches!(e, IpamError::PlanMismatch { .. }), "{e}");
    assert!(e.to_string().contains("/26"), "{e}");
    // The same plan (grace is local) is accepted.
    let same = cfg("10.42.0.0/16", 24, Duration::from_secs(5));
    Ipam::new(t.store(), same, "/weft/").await.unwrap();
}

async fn service_range_mismatch_is_refused(t: TestStore) {
    Ipam::new(t.store(), IpamConfig::default(), "/weft/")
        .await
        .unwrap();
    let other = IpamConfig {
        service_range: net("10.44.0.0/16"),
        ..IpamConfig::default()
    };
    let e = Ipam::new(t.store(), other.clone(), "/weft/")
        .await
        .err()
        .unwrap();
    assert!(matches!(e, IpamError::ServiceRangeMismatch { .. }), "{e}");
    // It says what is configured and what is stored.
    let msg = e.to_string();
    assert!(msg.contains("service range 10.44.0.0/16"), "{msg}");
    assert!(msg.contains("cluster's (10.43.0.0/16)"), "{msg}");

    // A plan stored before services (no service range): the first host
    // records its range, the next must match it.
    let old = weft_model::Keys::new("/old/").ipam_config();
    t.store()
        .put(
            &old,
            br#"{"cluster_range":"10.42.0.0/16","block_prefix":24}"#,
            None,
        )
        .await
        .unwrap();
    Ipam::new(t.store(), other.clone(), "/old/").await.unwrap();
    Ipam::new(t.store(), other, "/old/").await.unwrap();
    let e = Ipam::new(t.store(), IpamConfig::default(), "/old/")
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("cluster's (10.44.0.0/16)"), "{e}");
    // The cluster range is still checked first.
    let e = Ipam::new(
        t.store(),
        cfg("10.50.0.0/16", 24, Duration::from_secs(60)),
        "/old/",
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(e, IpamError::PlanMismatch { .. }), "{e}");
}

async fn addresses_idempotent_full_release_gc(t: TestStore) {
    let ipam = Ipam::new(
        t.store(),
        cfg("10.42.0.0/24", 28, Duration::from_secs(60)),
        "/weft/",
    )
    .await
    .unwrap();
    let block = ipam.lease_block("h").await.unwrap();
    assert_eq!(block.block, net("10.42.0.0/28"));
    let mut got = BTreeSet::new();
    for i in 0..13 {
        let owner = Owner::new(format!("c{i}"), "eth0");
        let a = ipam.allocate(&block, &owner).await.unwrap();
        // A retried ADD gets the same address.
        assert_eq!(ipam.allocate(&block, &owner).await.unwrap(), a);
        assert_eq!(a.cidr().prefix(), 28);
        assert!(got.insert(a.addr));
    }
    let expected: BTreeSet<Ipv4Addr> = plan::usable(block.block).collect();
    assert_eq!(
        got, expected,
        "all 13 usable addresses, never .0, .1 or .15"
    );
    let e = ipam
        .allocate(&block, &Owner::new("c13", "eth0"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, IpamError::BlockFull { capacity: 13, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("10.42.0.0/28"), "{e}");
    // Another interface of a known container is another owner.
    assert!(ipam
        .allocate(&block, &Owner::new("c0", "eth1"))
        .await
        .is_err());

    let freed = ipam
        .release(&block, &Owner::new("c5", "eth0"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ipam.release(&block, &Owner::new("c5", "eth0"))
            .await
            .unwrap(),
        None
    );
    let again = ipam
        .allocate(&block, &Owner::new("c13", "eth0"))
        .await
        .unwrap();
    assert_eq!(again.addr, freed, "the only free address");

    // GC keeps exactly the live set.
    let live: HashSet<Owner> = ["c1", "c2", "c13"]
        .iter()
        .map(|c| Owner::new(*c, "eth0"))
        .collect();
    let freed = ipam.gc(&block, &live).await.unwrap();
    assert_eq!(freed.len(), 10);
    let left: HashSet<Owner> = ipam
        .list(&block)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.owner)
        .collect();
    assert_eq!(left, live);
    assert!(ipam.gc(&block, &live).await.unwrap().is_empty());
}

async fn released_address_not_reused_at_once(t: TestStore) {
    let ipam = Ipam::new(t.store(), IpamConfig::default(), "/weft/")
        .await
        .unwrap();
    let block = ipam.lease_block("h").await.unwrap();
    let a = ipam
        .allocate(&block, &Owner::new("a", "eth0"))
        .await
        .unwrap();
    ipam.release(&block, &Owner::new("a", "eth0"))
        .await
        .unwrap();
    let b = ipam
        .allocate(&block, &Owner::new("b", "eth0"))
        .await
        .unwrap();
    assert_ne!(a.addr, b.addr, "a just-released address waits its turn");
    // Other hosts' blocks are separate.
    let other = ipam.lease_block("h2").await.unwrap();
    let c = ipam
        .allocate(&other, &Owner::new("a", "eth0"))
        .await
        .unwrap();
    assert!(other.block.contains(c.addr));
    assert_eq!(ipam.list(&block).await.unwrap().len(), 1);
}

/// Where a worker process finds its store.
/// The batch calls agree with the one-by-one ones: one read for many
/// owners, each its own result, the same owner twice one address, release
/// by key only of the owner's own address.
async fn batches_allocate_and_release(t: TestStore) {
    let ipam = Ipam::new(
        t.store(),
        cfg("10.42.0.0/24", 28, Duration::from_secs(60)),
        "/weft/",
    )
    .await
    .unwrap();
    let block = ipam.lease_block("h").await.unwrap();
    let kept = ipam
        .allocate(&block, &Owner::new("old", "eth0"))
        .await
        .unwrap();
    let owners: Vec<Owner> = ["old", "a", "b", "a", "-bad", "c"]
        .iter()
        .map(|c| Owner::new(*c, "eth0"))
        .collect();
    let got = ipam.allocate_all(&block, &owners).await.unwrap();
    assert_eq!(got.len(), 6);
    assert_eq!(
        got[0].as_ref().unwrap(),
        &kept,
        "an owner keeps its address"
    );
    assert_eq!(got[1].as_ref().unwrap(), got[3].as_ref().unwrap());
    assert!(
        matches!(got[4], Err(IpamError::InvalidId(_))),
        "{:?}",
        got[4]
    );
    let addrs: BTreeSet<Ipv4Addr> = [0, 1, 2, 5]
        .iter()
        .map(|&i| got[i].as_ref().unwrap().addr)
        .collect();
    assert_eq!(addrs.len(), 4, "distinct addresses: {got:?}");
    // The store agrees, and the one-by-one call finds the same address.
    assert_eq!(ipam.list(&block).await.unwrap().len(), 4);
    assert_eq!(
        ipam.allocate(&block, &Owner::new("b", "eth0"))
            .await
            .unwrap(),
        *got[2].as_ref().unwrap()
    );
    // The cursor moved past the batch: the next address is a new one.
    let d = ipam
        .allocate(&block, &Owner::new("d", "eth0"))
        .await
        .unwrap();
    assert!(!addrs.contains(&d.addr));
    // Full: the rest of the batch gets BlockFull, the first ones their
    // addresses.
    let many: Vec<Owner> = (0..12)
        .map(|i| Owner::new(format!("m{i}"), "eth0"))
        .collect();
    let got_many = ipam.allocate_all(&block, &many).await.unwrap();
    assert_eq!(got_many.iter().filter(|r| r.is_ok()).count(), 13 - 5);
    assert!(matches!(
        got_many.last().unwrap(),
        Err(IpamError::BlockFull { .. })
    ));

    // Release by key: only the owner's own address.
    let a = got[1].as_ref().unwrap().addr;
    assert_eq!(
        ipam.release_at(&block, a, &Owner::new("a", "eth0"))
            .await
            .unwrap(),
        Some(a)
    );
    assert_eq!(
        ipam.release_at(&block, a, &Owner::new("a", "eth0"))
            .await
            .unwrap(),
        None,
        "twice is fine"
    );
    // A stale address: the owner's real one is released, the other
    // owner's stays.
    let b = got[2].as_ref().unwrap().addr;
    assert_eq!(
        ipam.release_at(&block, b, &Owner::new("c", "eth0"))
            .await
            .unwrap(),
        Some(got[5].as_ref().unwrap().addr)
    );
    assert!(ipam.list(&block).await.unwrap().iter().any(|x| x.addr == b));
    let outside = "10.42.1.5".parse().unwrap();
    assert!(matches!(
        ipam.release_at(&block, outside, &Owner::new("b", "eth0"))
            .await,
        Err(IpamError::NotInBlock { .. })
    ));
    // Release many with one read.
    let gone = ipam
        .release_all(
            &block,
            &[
                Owner::new("b", "eth0"),
                Owner::new("nobody", "eth0"),
                Owner::new("old", "eth0"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(gone, [Some(b), None, Some(kept.addr)]);
    let left: HashSet<Owner> = ipam
        .list(&block)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.owner)
        .collect();
    assert!(!left.contains(&Owner::new("b", "eth0")));
    assert!(left.contains(&Owner::new("d", "eth0")));
}

fn store_spec(t: &TestStore) -> String {
    match t.etcd_config() {
        Some(cfg) => format!("etcd={}", cfg.endpoints.join(",")),
        None => format!("sqlite={}", t.sqlite_path().unwrap().display()),
    }
}

const WORKERS: usize = 8;
const PER_WORKER: usize = 100;

/// 8 processes × 100 allocations for the same host against one store: 800
/// distinct addresses, each recorded for its owner, none lost.
async fn eight_processes_allocate(t: TestStore) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..WORKERS)
        .map(|w| {
            let out = dir.path().join(format!("worker-{w}.txt"));
            let child = Command::new(&exe)
                .args([
                    "--exact",
                    "alloc_worker",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(
                    "WEFT_IPAM_WORKER",
                    format!("{}|{w}|{}", store_spec(&t), out.display()),
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (child, out)
        })
        .collect();
    let mut by_addr: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for (child, out) in children {
        let output = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            output.status.success(),
            "worker failed: {}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text.lines().count(), PER_WORKER, "{}", out.display());
        for line in text.lines() {
            let (addr, owner) = line.split_once(' ').unwrap();
            let prev = by_addr.insert(addr.parse().unwrap(), owner.to_owned());
            assert!(
                prev.is_none(),
                "{addr} handed out twice: {prev:?} and {owner}"
            );
        }
    }
    assert_eq!(by_addr.len(), WORKERS * PER_WORKER);

    let ipam = Ipam::new(t.store(), worker_cfg(), "/weft/").await.unwrap();
    let block = ipam.lease_block("shared-host").await.unwrap();
    let stored: BTreeMap<Ipv4Addr, String> = ipam
        .list(&block)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.addr, a.owner.container_id))
        .collect();
    assert_eq!(
        stored, by_addr,
        "the store holds exactly what the workers were given"
    );
    assert_eq!(
        ipam.block_leases().await.unwrap().len(),
        1,
        "one host, one block"
    );
}

fn worker_cfg() -> IpamConfig {
    // A /22 block holds 1021 endpoints: room for all 800 in one host block.
    cfg("10.42.0.0/16", 22, Duration::from_secs(60))
}

/// The body of one worker process (run by `eight_processes_allocate`).
#[test]
#[ignore = "run as a child process by eight_processes_allocate"]
fn alloc_worker() {
    let spec = std::env::var("WEFT_IPAM_WORKER").expect("WEFT_IPAM_WORKER");
    let mut parts = spec.split('|');
    let (store, index, out) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store: weft_store::DynStore = match store.split_once('=').unwrap() {
            ("sqlite", path) => Arc::new(SqliteStore::open(path).unwrap()),
            ("etcd", endpoints) => Arc::new(
                EtcdStore::connect(EtcdConfig::new(
                    endpoints.split(',').map(String::from).collect(),
                ))
                .await
                .unwrap(),
            ),
            other => panic!("unknown store {other:?}"),
        };
        let ipam = Ipam::new(store, worker_cfg(), "/weft/").await.unwrap();
        let block = ipam.lease_block("shared-host").await.unwrap();
        let mut lines = String::new();
        for i in 0..PER_WORKER {
            let owner = Owner::new(format!("w{index}-c{i}"), "eth0");
            let a = ipam.allocate(&block, &owner).await.unwrap();
            lines.push_str(&format!("{} {}\n", a.addr, owner.container_id));
        }
        std::fs::write(out, lines).unwrap();
    });
}

macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(weft_store::testing::TestStore::sqlite().await).await
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(weft_store::testing::TestStore::etcd().await).await
                }
            )*
        }
    };
}

on_both_backends!(
    same_host_same_block_after_restart,
    dead_host_block_kept_for_grace,
    plan_mismatch_is_refused,
    service_range_mismatch_is_refused,
    addresses_idempotent_full_release_gc,
    released_address_not_reused_at_once,
    eight_processes_allocate,
    batches_allocate_and_release,
);

/// Property test: random allocate / release / GC sequences against a plain
/// model, on both backends.
mod model {
    use std::collections::{BTreeMap, HashSet};
    use std::net::Ipv4Addr;

    use proptest::prelude::*;
    use weft_ipam::{plan, Ipam, IpamError, Owner};
    use weft_store::testing::TestStore;

    #[derive(Debug, Clone)]
    enum Op {
        Allocate(u8, u8),
        Release(u8, u8),
        Gc(Vec<(u8, u8)>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u8..20, 0u8..2).prop_map(|(c, i)| Op::Allocate(c, i)),
            3 => (0u8..20, 0u8..2).prop_map(|(c, i)| Op::Release(c, i)),
            1 => proptest::collection::vec((0u8..20, 0u8..2), 0..12).prop_map(Op::Gc),
        ]
    }

    fn owner(c: u8, i: u8) -> Owner {
        Owner::new(format!("ctr{c}"), format!("eth{i}"))
    }

    async fn check(t: &TestStore, root: &str, ops: Vec<Op>) {
        // A /28: 13 addresses for up to 40 owners, so the block fills up.
        let cfg = super::cfg("10.42.0.0/24", 28, std::time::Duration::from_secs(60));
        let ipam = Ipam::new(t.store(), cfg, root).await.unwrap();
        let block = ipam.lease_block("h").await.unwrap();
        let capacity = plan::capacity(block.block) as usize;
        let mut model: BTreeMap<Owner, Ipv4Addr> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Allocate(c, i) => {
                    let o = owner(c, i);
                    match (ipam.allocate(&block, &o).await, model.get(&o)) {
                        (Ok(a), Some(known)) => assert_eq!(a.addr, *known, "idempotent"),
                        (Ok(a), None) => {
                            assert!(model.len() < capacity);
                            assert!(
                                plan::usable(block.block).any(|u| u == a.addr),
                                "{} usable",
                                a.addr
                            );
                            assert!(
                                !model.values().any(|v| *v == a.addr),
                                "{} already taken",
                                a.addr
                            );
                            model.insert(o, a.addr);
                        }
                        (Err(IpamError::BlockFull { .. }), None) => {
                            assert_eq!(model.len(), capacity)
                        }
                        (r, m) => panic!("allocate {o:?}: {r:?} with model {m:?}"),
                    }
                }
                Op::Release(c, i) => {
                    let o = owner(c, i);
                    assert_eq!(ipam.release(&block, &o).await.unwrap(), model.remove(&o));
                }
                Op::Gc(live) => {
                    let live: HashSet<Owner> = live.into_iter().map(|(c, i)| owner(c, i)).collect();
                    let mut freed: Vec<Owner> = ipam
                        .gc(&block, &live)
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|a| a.owner)
                        .collect();
                    freed.sort();
                    let expected: Vec<Owner> = model
                        .keys()
                        .filter(|o| !live.contains(*o))
                        .cloned()
                        .collect();
                    assert_eq!(freed, expected);
                    model.retain(|o, _| live.contains(o));
                }
            }
            let listed: BTreeMap<Owner, Ipv4Addr> = ipam
                .list(&block)
                .await
                .unwrap()
                .into_iter()
                .map(|a| (a.owner, a.addr))
                .collect();
            assert_eq!(listed, model, "store and model agree");
        }
    }

    fn run(t: TestStore, cases: u32) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let t = std::sync::Arc::new(t);
        let counter = std::sync::atomic::AtomicU64::new(0);
        let config = ProptestConfig {
            cases,
            ..ProptestConfig::default()
        };
        proptest!(config, |(ops in proptest::collection::vec(op(), 1..40))| {
            // Every case gets its own key space in the one store.
            let root = format!("/case-{}/", counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            rt.block_on(check(&t, &root, ops));
        });
    }

    #[test]
    fn sqlite_allocate_release_gc_matches_model() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        run(rt.block_on(TestStore::sqlite()), 48);
    }

    #[test]
    fn etcd_allocate_release_gc_matches_model() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        run(rt.block_on(TestStore::etcd()), 24);
    }
}
