#![allow(clippy::unwrap_used)]
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU16, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use weft_model::{HealthCheck, Probe, ServiceName, ServiceSpec};
use weft_store::testing::TestStore;
use weft_store::EventKind;

use super::*;

fn endpoint(host: &str, container: &str, addr: &str, service: Option<&str>) -> EndpointRecord {
    serde_json::from_value(serde_json::json!({
        "container_id": container, "ifname": "eth0", "netns": "/n",
        "host_id": host, "address": format!("{addr}/24"), "gateway": "10.42.0.1",
        "mtu": 1400, "bridge": "weft0", "service": service, "stack": "shop",
        "dns": {"nameservers": [], "domain": "weft", "search": []}, "created_at_ms": 0
    }))
    .unwrap()
}

fn service(name: &str, health: Option<&str>) -> ServiceRecord {
    ServiceRecord {
        name: name.parse().unwrap(),
        vip: None,
        spec: ServiceSpec {
            health: health.map(|p| HealthCheck::new(p.parse().unwrap())),
            ..ServiceSpec::default()
        },
        empty_since_ms: None,
    }
}

fn fast(probe: Probe) -> HealthCheck {
    HealthCheck {
        probe,
        interval_ms: 100,
        timeout_ms: 80,
        rise: 2,
        fall: 2,
    }
}

#[test]
fn targets_are_this_hosts_endpoints_of_services_with_a_valid_check() {
    let keys = Keys::default();
    let name = |s: &str| s.parse::<ServiceName>().unwrap();
    let mut services = BTreeMap::new();
    services.insert(
        keys.service(&name("web.shop")),
        Some(service("web.shop", Some("http:80/ok"))),
    );
    services.insert(
        keys.service(&name("db.shop")),
        Some(service("db.shop", None)),
    );
    let mut bad = service("api.shop", Some("tcp:9"));
    if let Some(h) = bad.spec.health.as_mut() {
        h.timeout_ms = 0;
    }
    services.insert(keys.service(&name("api.shop")), Some(bad));
    services.insert(keys.service(&name("junk.shop")), None);
    let mut endpoints = BTreeMap::new();
    for (host, c, addr, svc) in [
        ("h0", "c1", "10.42.0.2", Some("web")),
        ("h0", "c2", "10.42.0.3", Some("db")),
        ("h0", "c3", "10.42.0.4", Some("api")),
        ("h0", "c4", "10.42.0.5", None),
        ("h1", "c5", "10.42.1.2", Some("web")),
    ] {
        endpoints.insert(
            keys.endpoint(host, c, "eth0"),
            Some(endpoint(host, c, addr, svc)),
        );
    }
    endpoints.insert(keys.endpoint("h0", "c6", "eth0"), None);
    let t = targets(&keys, "h0", &endpoints, &services);
    assert_eq!(t.len(), 1, "{t:?}");
    let (key, target) = t.iter().next().unwrap();
    assert_eq!(key, &keys.health_of("h0", "c1", "eth0"));
    assert_eq!(target.addr, Ipv4Addr::new(10, 42, 0, 2));
    assert_eq!(target.service, name("web.shop"));
    assert_eq!(target.check.probe.to_string(), "http:80/ok");
}

#[test]
fn plans_start_stop_restart_and_delete() {
    let t = |port| Target {
        service: "web.shop".parse().unwrap(),
        container: "c".into(),
        ifname: "eth0".into(),
        addr: Ipv4Addr::new(10, 42, 0, 2),
        check: HealthCheck::new(Probe::Tcp { port }),
    };
    let map = |items: &[(&str, u16)]| -> BTreeMap<String, Target> {
        items
            .iter()
            .map(|(k, p)| ((*k).to_owned(), t(*p)))
            .collect()
    };
    let running = map(&[("a", 80), ("b", 80), ("c", 80)]);
    let wanted = map(&[("a", 80), ("b", 81), ("d", 80)]);
    let stored: Vec<String> = ["a", "c", "e"].iter().map(|s| (*s).to_owned()).collect();
    let p = plan(&running, &wanted, &stored);
    assert_eq!(
        p,
        Plan {
            stop: vec!["b".into(), "c".into()],
            start: vec!["b".into(), "d".into()],
            delete: vec!["c".into(), "e".into()],
        }
    );
    // Nothing to do when all is in place.
    assert_eq!(plan(&wanted, &wanted, &stored[..1]), Plan::default());
}

#[test]
fn first_probes_spread_over_the_interval_and_stay_put() {
    let interval = Duration::from_millis(500);
    let keys = Keys::default();
    let mut buckets = [0u32; 5];
    for i in 0..500 {
        let key = keys.health_of("h0", &format!("container-{i}"), "eth0");
        let d = first_probe_after(&key, interval);
        assert!(d < interval);
        assert_eq!(d, first_probe_after(&key, interval), "stable");
        buckets[usize::try_from(d.as_millis() / 100).unwrap()] += 1;
    }
    // 100 expected per 100 ms; a herd would pile into one bucket.
    assert!(
        buckets.iter().all(|n| (60..=140).contains(n)),
        "{buckets:?}"
    );
    assert_eq!(first_probe_after("k", Duration::ZERO), Duration::ZERO);
}

#[test]
fn the_tracker_writes_once_per_transition_and_retries_failed_writes() {
    let check = fast(Probe::Tcp { port: 1 });
    // No record: healthy; successes write nothing.
    let mut t = Tracker::new(None, &check);
    let none = Step {
        turned: None,
        write: None,
    };
    assert_eq!(t.observe(true, &check), none);
    assert_eq!(t.observe(false, &check), none);
    let down = Step {
        turned: Some(false),
        write: Some(false),
    };
    assert_eq!(t.observe(false, &check), down);
    // The write failed: the next probe asks again, with no new transition.
    let again = Step {
        turned: None,
        write: Some(false),
    };
    assert_eq!(t.observe(false, &check), again);
    t.written(false);
    assert_eq!(t.observe(false, &check), none);
    assert_eq!(t.observe(true, &check), none);
    let up = Step {
        turned: Some(true),
        write: Some(true),
    };
    assert_eq!(t.observe(true, &check), up);
    t.written(true);
    assert_eq!(t.observe(true, &check), none);

    // A stored unhealthy record: starts unhealthy, `rise` successes heal.
    let rec = HealthRecord {
        healthy: false,
        since_ms: 1,
        detail: String::new(),
    };
    let mut t = Tracker::new(Some(Some(&rec)), &check);
    assert!(!t.healthy());
    assert_eq!(t.observe(false, &check), none);
    assert_eq!(t.observe(true, &check), none);
    assert_eq!(t.observe(true, &check), up);
    // An unreadable record is written anew by the first probe.
    let mut t = Tracker::new(Some(None), &check);
    assert_eq!(
        t.observe(true, &check),
        Step {
            turned: None,
            write: Some(true)
        }
    );
}

#[test]
fn http_status_lines_parse() {
    assert_eq!(http_status(b"HTTP/1.1 200 OK\r\nX: y\r\n"), Ok(200));
    assert_eq!(http_status(b"HTTP/1.0 503 Busy\n"), Ok(503));
    assert!(http_status(b"").unwrap_err().contains("closed"));
    assert!(http_status(b"SSH-2.0-OpenSSH\r\n")
        .unwrap_err()
        .contains("not an HTTP answer"));
    let req = http_request(Ipv4Addr::new(10, 42, 0, 2), 8080, "/ok");
    assert!(req.starts_with("GET /ok HTTP/1.1\r\nHost: 10.42.0.2:8080\r\n"));
    assert!(req.ends_with("\r\n\r\n"));
}

/// An HTTP server on 127.0.0.1 answering `status` (0: never answers) to
/// GETs of `/ok`, 404 to other paths.
async fn http_server(status: Arc<AtomicU16>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let status = status.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let code = match status.load(Ordering::SeqCst) {
                    0 => return tokio::time::sleep(Duration::from_secs(5)).await,
                    _ if !got.starts_with(b"GET /ok HTTP/1.1\r\n") => 404,
                    c => c,
                };
                let answer = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn probes_see_tcp_and_http_answers() {
    let local = Ipv4Addr::LOCALHOST;
    let timeout = Duration::from_millis(300);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = probe(local, &Probe::Tcp { port }, timeout).await;
    assert_eq!(
        seen,
        Seen {
            ok: true,
            detail: "connected".into()
        }
    );
    drop(listener);
    let seen = probe(local, &Probe::Tcp { port }, timeout).await;
    assert!(!seen.ok);
    assert_eq!(seen.detail, "connection refused");

    let status = Arc::new(AtomicU16::new(200));
    let port = http_server(status.clone()).await;
    let ok = Probe::Http {
        port,
        path: "/ok".into(),
    };
    assert_eq!(probe(local, &ok, timeout).await.detail, "HTTP 200");
    status.store(302, Ordering::SeqCst);
    assert!(probe(local, &ok, timeout).await.ok, "3xx is healthy");
    status.store(503, Ordering::SeqCst);
    let seen = probe(local, &ok, timeout).await;
    assert_eq!((seen.ok, seen.detail.as_str()), (false, "HTTP 503"));
    status.store(200, Ordering::SeqCst);
    let other = Probe::Http {
        port,
        path: "/other".into(),
    };
    assert_eq!(probe(local, &other, timeout).await.detail, "HTTP 404");
    // A server that accepts and never answers fails by the timeout.
    status.store(0, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let seen = probe(local, &ok, timeout).await;
    assert_eq!(
        (seen.ok, seen.detail.as_str()),
        (false, "timed out after 300 ms")
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Every health record write and delete from revision `from` on.
async fn health_events(store: &DynStore, keys: &Keys, from: i64) -> Vec<(EventKind, bool)> {
    let mut watch = store.watch_prefix(&keys.health(), from).await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(300), watch.recv()).await {
        let ev = ev.unwrap();
        let healthy = serde_json::from_slice::<HealthRecord>(&ev.kv.value)
            .map(|r| r.healthy)
            .unwrap_or(false);
        out.push((ev.kind, healthy));
    }
    out
}

/// Waits (at most 10 s) until `$probe` is `Some`, and gives its value.
macro_rules! wait_for {
    ($what:expr, $probe:expr) => {{
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = $probe {
                break v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {}",
                $what
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }};
}

async fn record(store: &DynStore, key: &str) -> Option<HealthRecord> {
    let kv = store.get(key).await.unwrap()?;
    Some(serde_json::from_slice(&kv.value).unwrap())
}

async fn put_json<T: serde::Serialize>(store: &DynStore, key: &str, value: &T) {
    store
        .put(key, &serde_json::to_vec(value).unwrap(), None)
        .await
        .unwrap();
}

#[tokio::test]
async fn records_are_written_on_transitions_only_and_deleted_with_the_check() {
    let t = TestStore::sqlite().await;
    let store = t.store();
    let keys = Keys::default();
    let status = Arc::new(AtomicU16::new(200));
    let http_port = http_server(status.clone()).await;
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();

    // web (http) has one container on h0 and one on h1; db (tcp) one on h0.
    let web: ServiceName = "web.shop".parse().unwrap();
    let db: ServiceName = "db.shop".parse().unwrap();
    let mut web_rec = service("web.shop", None);
    web_rec.spec.health = Some(fast(format!("http:{http_port}/ok").parse().unwrap()));
    let mut db_rec = service("db.shop", None);
    db_rec.spec.health = Some(fast(Probe::Tcp { port: tcp_port }));
    put_json(&store, &keys.service(&web), &web_rec).await;
    put_json(&store, &keys.service(&db), &db_rec).await;
    for (host, c, svc) in [("h0", "w1", "web"), ("h0", "d1", "db"), ("h1", "w2", "web")] {
        let ep = endpoint(host, c, "127.0.0.1", Some(svc));
        put_json(&store, &keys.endpoint(host, c, "eth0"), &ep).await;
    }
    // A leftover record of a container that is gone.
    let gone = keys.health_of("h0", "old", "eth0");
    let stale = HealthRecord {
        healthy: false,
        since_ms: 1,
        detail: String::new(),
    };
    put_json(&store, &gone, &stale).await;
    let from = store.revision().await.unwrap() + 1;

    let counters = HealthCounters::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(run(
        store.clone(),
        keys.clone(),
        "h0".into(),
        counters.clone(),
        stop_rx,
    ));
    let w1 = keys.health_of("h0", "w1", "eth0");
    let d1 = keys.health_of("h0", "d1", "eth0");
    wait_for!(
        "the leftover record deleted",
        record(&store, &gone).await.is_none().then_some(())
    );
    // Healthy from the start: probes run, nothing is written.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(counters.checks.get_or_create(&ok_label()).get() >= 6);
    assert_eq!(record(&store, &w1).await, None);
    assert_eq!(record(&store, &d1).await, None);
    assert_eq!(counters.unhealthy.get(), 0);

    // web answers 503 and db stops listening: both turn unhealthy.
    status.store(503, Ordering::SeqCst);
    drop(tcp);
    let r = wait_for!("w1 unhealthy", record(&store, &w1).await);
    assert_eq!((r.healthy, r.detail.as_str()), (false, "HTTP 503"));
    let r = wait_for!("d1 unhealthy", record(&store, &d1).await);
    assert_eq!(
        (r.healthy, r.detail.as_str()),
        (false, "connection refused")
    );
    wait_for!(
        "the gauge at 2",
        (counters.unhealthy.get() == 2).then_some(())
    );
    // ...and stay so for several probes without another write.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // web recovers.
    status.store(200, Ordering::SeqCst);
    wait_for!(
        "w1 healthy",
        record(&store, &w1).await.filter(|r| r.healthy)
    );
    wait_for!(
        "the gauge at 1",
        (counters.unhealthy.get() == 1).then_some(())
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // db's check is removed: its record goes; w1's endpoint goes: its too.
    put_json(&store, &keys.service(&db), &service("db.shop", None)).await;
    store
        .delete(&keys.endpoint("h0", "w1", "eth0"))
        .await
        .unwrap();
    wait_for!(
        "both records deleted",
        (record(&store, &w1).await.is_none() && record(&store, &d1).await.is_none()).then_some(())
    );
    wait_for!(
        "the gauge at 0",
        (counters.unhealthy.get() == 0).then_some(())
    );
    // h1's container is h1's netd's business.
    assert_eq!(
        record(&store, &keys.health_of("h1", "w2", "eth0")).await,
        None
    );
    let _ = stop_tx.send(true);
    runner.await.unwrap();

    // The whole history: the leftover deleted, one write per transition
    // (w1 and d1 down, w1 up), then the two deletes.
    let events = health_events(&store, &keys, from).await;
    let puts: Vec<bool> = events
        .iter()
        .filter(|(k, _)| *k == EventKind::Put)
        .map(|(_, h)| *h)
        .collect();
    assert_eq!(puts.iter().filter(|h| !**h).count(), 2, "{events:?}");
    assert_eq!(puts.iter().filter(|h| **h).count(), 1, "{events:?}");
    let deletes = events
        .iter()
        .filter(|(k, _)| *k == EventKind::Delete)
        .count();
    assert_eq!(deletes, 3, "{events:?}");
}

fn ok_label() -> crate::counters::ResultLabel {
    crate::counters::ResultLabel { result: "ok" }
}

#[tokio::test]
async fn a_restart_starts_from_the_stored_record() {
    let t = TestStore::sqlite().await;
    let store = t.store();
    let keys = Keys::default();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let db: ServiceName = "db.shop".parse().unwrap();
    let mut rec = service("db.shop", None);
    rec.spec.health = Some(fast(Probe::Tcp { port }));
    put_json(&store, &keys.service(&db), &rec).await;
    let ep = endpoint("h0", "d1", "127.0.0.1", Some("db"));
    put_json(&store, &keys.endpoint("h0", "d1", "eth0"), &ep).await;
    // A previous netd found it unhealthy; it listens now.
    let key = keys.health_of("h0", "d1", "eth0");
    let was = HealthRecord {
        healthy: false,
        since_ms: 1,
        detail: "connection refused".into(),
    };
    put_json(&store, &key, &was).await;
    let counters = HealthCounters::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(run(
        store.clone(),
        keys.clone(),
        "h0".into(),
        counters.clone(),
        stop_rx,
    ));
    let r = wait_for!(
        "d1 healthy again",
        record(&store, &key).await.filter(|r| r.healthy)
    );
    assert_eq!(r.detail, "connected");
    assert_eq!(counters.unhealthy.get(), 0);
    let _ = stop_tx.send(true);
    runner.await.unwrap();
}
