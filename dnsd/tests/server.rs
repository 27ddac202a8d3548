//! dnsd as a whole on 127.0.0.1 (no root needed): names from a real store
//! over UDP and TCP, following store changes, forwarding with cache,
//! failover and SERVFAIL, merged identical queries, cache eviction,
//! resolv.conf reloads, TCP limits, serving on while the store is down, and
//! following the service (VIP) and health records.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RData;
use weft_dnsd::{DnsConfig, DnsServer};
use weft_store::{DynStore, SqliteStore};

const A: u16 = 1;
const PTR: u16 = 12;
const AAAA: u16 = 28;

fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        p.push(label.len() as u8);
        p.extend(label.as_bytes());
    }
    p.push(0);
    p.extend(qtype.to_be_bytes());
    p.extend(1u16.to_be_bytes());
    p
}

fn udp(server: SocketAddr, name: &str, qtype: u16) -> Message {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let id = 0x4242;
    s.send_to(&query(id, name, qtype), server).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.recv(&mut buf).expect("no answer over UDP");
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, id);
    m
}

fn addrs(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn endpoint_json(id: &str, ip: &str, name: &str, service: &str, stack: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "container_id": id, "ifname": "eth0", "netns": "", "host_id": "h0",
        "address": format!("{ip}/24"), "gateway": "10.42.0.1", "mtu": 1420,
        "bridge": "weft0", "name": name, "service": service, "stack": stack,
        "aliases": [], "dns": {"nameservers": [], "domain": "", "search": []},
        "created_at_ms": 0
    }))
    .unwrap()
}

fn key(id: &str) -> String {
    weft_model::Keys::default().endpoint("h0", id, "eth0")
}

fn config(resolv: &Path) -> DnsConfig {
    DnsConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        resolv_conf: resolv.to_path_buf(),
        udp_threads: 2,
        upstream_timeout: Duration::from_millis(300),
        ..DnsConfig::default()
    }
}

async fn sqlite(dir: &Path) -> DynStore {
    Arc::new(SqliteStore::open(dir.join("store.db")).unwrap())
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_from_the_store_over_udp_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    store
        .put(
            &key("c1"),
            &endpoint_json("c1", "10.42.0.2", "web-1", "web", "shop"),
            None,
        )
        .await
        .unwrap();
    store
        .put(
            &key("c2"),
            &endpoint_json("c2", "10.42.1.2", "web-2", "web", "shop"),
            None,
        )
        .await
        .unwrap();
    let server = DnsServer::start(config(&dir.path().join("none")), store.clone())
        .await
        .unwrap();
    let at = server.local_addrs()[0];
    assert_eq!(
        server.table().endpoints(),
        2,
        "the first table is in place when start returns"
    );

    let m = tokio::task::spawn_blocking(move || udp(at, "WEB.shop.weft.internal", A))
        .await
        .unwrap();
    assert_eq!(addrs(&m), vec!["10.42.0.2", "10.42.1.2"]);
    let m = tokio::task::spawn_blocking(move || udp(at, "web-2", A))
        .await
        .unwrap();
    assert_eq!(addrs(&m), vec!["10.42.1.2"]);
    let m = tokio::task::spawn_blocking(move || udp(at, "web.shop", AAAA))
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    let m = tokio::task::spawn_blocking(move || udp(at, "2.0.42.10.in-addr.arpa", PTR))
        .await
        .unwrap();
    match &m.answers[0].data {
        RData::PTR(p) => assert_eq!(p.0.to_string(), "web-1.shop.weft.internal."),
        other => panic!("{other:?}"),
    }
    let m = tokio::task::spawn_blocking(move || udp(at, "nope.weft.internal", A))
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities.len(), 1);

    // TCP: three pipelined queries on one connection, three answers.
    let answers = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(at).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut burst = Vec::new();
        for (i, name) in ["web.shop", "web-1.shop.weft.internal", "nope.weft.internal"]
            .iter()
            .enumerate()
        {
            let q = query(100 + i as u16, name, A);
            burst.extend((q.len() as u16).to_be_bytes());
            burst.extend(q);
        }
        s.write_all(&burst).unwrap();
        let mut out = Vec::new();
        for _ in 0..3 {
            let mut len = [0u8; 2];
            s.read_exact(&mut len).unwrap();
            let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut buf).unwrap();
            out.push(Message::from_vec(&buf).unwrap());
        }
        out
    })
    .await
    .unwrap();
    assert_eq!(answers.len(), 3);
    let by_id = |id| answers.iter().find(|m| m.metadata.id == id).unwrap();
    assert_eq!(addrs(by_id(100)).len(), 2);
    assert_eq!(addrs(by_id(101)), vec!["10.42.0.2"]);
    assert_eq!(by_id(102).metadata.response_code, ResponseCode::NXDomain);
    assert!(server.stats().udp_queries.load(Ordering::Relaxed) >= 5);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_store_changes_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    let server = DnsServer::start(config(&dir.path().join("none")), store.clone())
        .await
        .unwrap();
    let at = server.local_addrs()[0];
    let ask = move || udp(at, "db.shop.weft.internal", A);

    store
        .put(
            &key("c9"),
            &endpoint_json("c9", "10.42.3.9", "db-1", "db", "shop"),
            None,
        )
        .await
        .unwrap();
    let took = wait_for("new endpoint resolvable", Duration::from_secs(1), || {
        addrs(&ask()) == vec!["10.42.3.9"]
    })
    .await;
    eprintln!("added endpoint resolvable after {took:?}");
    store.delete(&key("c9")).await.unwrap();
    let took = wait_for("deleted endpoint gone", Duration::from_secs(1), || {
        ask().metadata.response_code == ResponseCode::NXDomain
    })
    .await;
    eprintln!("deleted endpoint NXDOMAIN after {took:?}");
    server.stop().await;
}

fn service_json(name: &str, vip: Option<&str>, mode: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"name": name, "vip": vip, "spec": {"mode": mode}}))
        .unwrap()
}

fn health_json(healthy: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"healthy": healthy, "since_ms": 1})).unwrap()
}

fn ptr_names(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::PTR(p) => Some(p.0.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_service_and_health_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    let keys = weft_model::Keys::default();
    let web: weft_model::ServiceName = "web.shop".parse().unwrap();
    for (id, ip, name) in [("c1", "10.42.3.2", "web-1"), ("c2", "10.42.3.3", "web-2")] {
        store
            .put(&key(id), &endpoint_json(id, ip, name, "web", "shop"), None)
            .await
            .unwrap();
    }
    // The record is there before dnsd starts: the first table has the VIP.
    store
        .put(
            &keys.service(&web),
            &service_json("web.shop", Some("10.43.0.5"), "vip"),
            None,
        )
        .await
        .unwrap();
    let server = DnsServer::start(config(&dir.path().join("none")), store.clone())
        .await
        .unwrap();
    let at = server.local_addrs()[0];
    let ask = move |name: &str| addrs(&udp(at, name, A));
    let both = vec!["10.42.3.2", "10.42.3.3"];
    assert_eq!(ask("web.shop.weft.internal"), vec!["10.43.0.5"]);
    assert_eq!(ask("web.shop"), vec!["10.43.0.5"]);
    assert_eq!(ask("tasks.web.shop.weft.internal"), both);
    assert_eq!(ask("tasks.web.shop"), both);
    assert_eq!(
        ptr_names(&udp(at, "5.0.43.10.in-addr.arpa", PTR)),
        vec!["web.shop.weft.internal."]
    );

    // web-2 turns unhealthy: out of tasks.*, its own name answers.
    let sick = keys.health_of("h0", "c2", "eth0");
    store.put(&sick, &health_json(false), None).await.unwrap();
    let took = wait_for("unhealthy container out", Duration::from_secs(1), || {
        ask("tasks.web.shop") == vec!["10.42.3.2"]
    })
    .await;
    eprintln!("unhealthy container left tasks.web.shop after {took:?}");
    assert_eq!(ask("web-2.shop"), vec!["10.42.3.3"]);
    assert_eq!(ask("web.shop"), vec!["10.43.0.5"]);

    // dnsrr: the round robin, without the unhealthy one; no VIP PTR.
    store
        .put(
            &keys.service(&web),
            &service_json("web.shop", Some("10.43.0.5"), "dnsrr"),
            None,
        )
        .await
        .unwrap();
    wait_for("dnsrr mode", Duration::from_secs(1), || {
        ask("web.shop") == vec!["10.42.3.2"]
    })
    .await;
    let m = udp(at, "5.0.43.10.in-addr.arpa", PTR);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // Healthy again (the record goes), then no record at all: as before.
    store.delete(&sick).await.unwrap();
    wait_for("healthy again", Duration::from_secs(1), || {
        ask("web.shop") == both
    })
    .await;
    store.delete(&keys.service(&web)).await.unwrap();
    store
        .put(
            &keys.health_of("h0", "c1", "eth0"),
            &health_json(true),
            None,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ask("web.shop"), both);
    assert_eq!(ask("tasks.web.shop"), both);
    server.stop().await;
}

/// A fake upstream on `ip:port` (UDP and TCP) answering every A query with
/// 192.0.2.1, TTL 300, counting the queries; or never answering.
fn fake_upstream(
    addr: SocketAddr,
    answer: bool,
) -> (Arc<AtomicUsize>, Vec<std::thread::JoinHandle<()>>) {
    fake_upstream_after(addr, answer, Duration::ZERO)
}

/// [`fake_upstream`] that waits `delay` before each answer.
fn fake_upstream_after(
    addr: SocketAddr,
    answer: bool,
    delay: Duration,
) -> (Arc<AtomicUsize>, Vec<std::thread::JoinHandle<()>>) {
    let count = Arc::new(AtomicUsize::new(0));
    let sock = UdpSocket::bind(addr).unwrap();
    let tcp = std::net::TcpListener::bind(addr).unwrap();
    let respond = |q: &[u8]| -> Vec<u8> {
        let qend = 12 + q[12..].iter().position(|&b| b == 0).unwrap() + 1 + 4;
        let mut a = q[..qend].to_vec();
        a[2] = 0x81;
        a[3] = 0x80;
        a[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
        a.extend([0xC0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 192, 0, 2, 1]);
        a
    };
    let c = count.clone();
    let u = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            c.fetch_add(1, Ordering::Relaxed);
            if answer {
                std::thread::sleep(delay);
                let _ = sock.send_to(&respond(&buf[..n]), from);
            }
        }
    });
    let c = count.clone();
    let t = std::thread::spawn(move || {
        for s in tcp.incoming() {
            let Ok(mut s) = s else { break };
            c.fetch_add(1, Ordering::Relaxed);
            let mut len = [0u8; 2];
            if s.read_exact(&mut len).is_err() {
                continue;
            }
            let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
            if s.read_exact(&mut q).is_err() || !answer {
                continue;
            }
            std::thread::sleep(delay);
            let a = respond(&q);
            let _ = s.write_all(&(a.len() as u16).to_be_bytes());
            let _ = s.write_all(&a);
        }
    });
    (count, vec![u, t])
}

/// A free port on `ip` (for a fake upstream).
fn free_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A query and its answer over one TCP connection.
fn tcp_ask(s: &mut TcpStream, q: &[u8]) -> Message {
    s.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
    s.write_all(q).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).unwrap();
    Message::from_vec(&buf).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_with_cache_failover_and_servfail() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    // Two fake upstreams on one free port: 127.0.0.2 never answers,
    // 127.0.0.3 does.
    let port = UdpSocket::bind("127.0.0.3:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (silent, _t1) = fake_upstream(SocketAddr::new("127.0.0.2".parse().unwrap(), port), false);
    let (good, _t2) = fake_upstream(SocketAddr::new("127.0.0.3".parse().unwrap(), port), true);
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 169.254.169.250\nnameserver 127.0.0.2\nnameserver 127.0.0.3\n",
    )
    .unwrap();
    let cfg = DnsConfig {
        upstream_port: port,
        ..config(&resolv)
    };
    let server = DnsServer::start(cfg, store).await.unwrap();
    let at = server.local_addrs()[0];

    let t = Instant::now();
    let m = tokio::task::spawn_blocking(move || udp(at, "www.example.test", A))
        .await
        .unwrap();
    assert_eq!(addrs(&m), vec!["192.0.2.1"]);
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "the silent upstream was tried first"
    );
    assert_eq!(silent.load(Ordering::Relaxed), 1);
    assert_eq!(good.load(Ordering::Relaxed), 1);
    // Cached: no new upstream query; the question keeps the client's case.
    let m = tokio::task::spawn_blocking(move || udp(at, "WWW.example.test", A))
        .await
        .unwrap();
    assert_eq!(addrs(&m), vec!["192.0.2.1"]);
    assert_eq!(m.queries[0].name().to_string(), "WWW.example.test.");
    assert!(m.answers[0].ttl <= 300);
    assert_eq!(good.load(Ordering::Relaxed), 1);
    assert_eq!(server.forward_stats().cache_hits.load(Ordering::Relaxed), 1);
    // The upstream that answered is now asked first.
    let m = tokio::task::spawn_blocking(move || udp(at, "other.example.test", A))
        .await
        .unwrap();
    assert_eq!(addrs(&m), vec!["192.0.2.1"]);
    assert_eq!(silent.load(Ordering::Relaxed), 1);
    // Over TCP, forwarded over TCP.
    let m = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(at).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tcp_ask(&mut s, &query(7, "tcp.example.test", A))
    })
    .await
    .unwrap();
    assert_eq!(addrs(&m), vec!["192.0.2.1"]);

    // resolv.conf now names only the silent one: SERVFAIL, without restart.
    std::fs::write(&resolv, "# changed\nnameserver 127.0.0.2\n").unwrap();
    let took = wait_for("resolv.conf reloaded", Duration::from_secs(5), || {
        udp(at, &format!("x{}.example.test", rand_label()), A)
            .metadata
            .response_code
            == ResponseCode::ServFail
    })
    .await;
    eprintln!("resolv.conf change in effect after {took:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_queries_go_upstream_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    let port = free_port("127.0.0.4");
    // The upstream takes 300 ms: every client below asks while the first
    // query is in flight.
    let (asked, _t) = fake_upstream_after(
        SocketAddr::new("127.0.0.4".parse().unwrap(), port),
        true,
        Duration::from_millis(300),
    );
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.4\n").unwrap();
    let cfg = DnsConfig {
        upstream_port: port,
        upstream_timeout: Duration::from_secs(2),
        ..config(&resolv)
    };
    let server = DnsServer::start(cfg, store).await.unwrap();
    let at = server.local_addrs()[0];
    let clients: Vec<_> = (0..20)
        .map(|i| {
            std::thread::spawn(move || {
                // Case differs per client; each gets its own back.
                let name = if i % 2 == 0 {
                    "same.example.test"
                } else {
                    "SAME.example.test"
                };
                let m = udp(at, name, A);
                assert_eq!(m.queries[0].name().to_string(), format!("{name}."));
                addrs(&m)
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), vec!["192.0.2.1"]);
    }
    assert_eq!(
        asked.load(Ordering::Relaxed),
        1,
        "one upstream query for 20 clients"
    );
    let f = server.forward_stats();
    assert_eq!(f.forwarded.load(Ordering::Relaxed), 1);
    assert_eq!(
        f.merged.load(Ordering::Relaxed) + f.cache_hits.load(Ordering::Relaxed),
        19
    );
    assert!(f.merged.load(Ordering::Relaxed) >= 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_evicts_one_answer_not_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    let port = free_port("127.0.0.5");
    let (asked, _t) = fake_upstream(SocketAddr::new("127.0.0.5".parse().unwrap(), port), true);
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.5\n").unwrap();
    let cfg = DnsConfig {
        upstream_port: port,
        cache_size: 2,
        ..config(&resolv)
    };
    let server = DnsServer::start(cfg, store).await.unwrap();
    let at = server.local_addrs()[0];
    let stats = server.stats_handle();
    let ask = move |name: &'static str| async move {
        let m = tokio::task::spawn_blocking(move || udp(at, name, A))
            .await
            .unwrap();
        assert_eq!(addrs(&m), vec!["192.0.2.1"]);
    };
    for name in ["a.example.test", "b.example.test", "c.example.test"] {
        ask(name).await;
    }
    assert_eq!(asked.load(Ordering::Relaxed), 3);
    // Full at 2: "a" (the first to expire) made room for "c"; "b" stayed.
    assert_eq!(stats.cache_len(), 2);
    assert_eq!(server.forward_stats().evicted.load(Ordering::Relaxed), 1);
    ask("b.example.test").await;
    ask("c.example.test").await;
    assert_eq!(asked.load(Ordering::Relaxed), 3, "b and c still cached");
    ask("a.example.test").await;
    assert_eq!(asked.load(Ordering::Relaxed), 4, "a was evicted");
    assert_eq!(stats.cache_len(), 2);
    server.stop().await;
}

fn rand_label() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// hickory-server serves TCP: it closes connections without a whole query
/// within the idle timeout, and has no limit on open connections; dnsd
/// bounds the TCP queries being answered at once (REFUSED beyond).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_idle_connections_closed_and_busy_queries_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    store
        .put(
            &key("c1"),
            &endpoint_json("c1", "10.42.0.2", "web-1", "web", "shop"),
            None,
        )
        .await
        .unwrap();
    // An upstream that answers too late: forwarded queries take the timeout.
    let port = free_port("127.0.0.6");
    let (_late, _t) = fake_upstream_after(
        SocketAddr::new("127.0.0.6".parse().unwrap(), port),
        true,
        Duration::from_secs(2),
    );
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.6\n").unwrap();
    let cfg = DnsConfig {
        max_tcp_connections: 2,
        tcp_idle_timeout: Duration::from_millis(500),
        upstream_port: port,
        upstream_timeout: Duration::from_millis(800),
        ..config(&resolv)
    };
    let server = DnsServer::start(cfg, store).await.unwrap();
    let at = server.local_addrs()[0];
    tokio::task::spawn_blocking(move || {
        // Two slow clients: one idle, one sending half a query.
        let idle = TcpStream::connect(at).unwrap();
        let mut slow = TcpStream::connect(at).unwrap();
        slow.write_all(&[0, 40, 0x12]).unwrap();
        // Both are closed after the idle timeout...
        let mut b = [0u8; 1];
        for mut s in [idle, slow] {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let t = Instant::now();
            assert_eq!(s.read(&mut b).unwrap(), 0, "closed");
            assert!(t.elapsed() < Duration::from_secs(2));
        }
        // Two queries waiting on the upstream fill the limit of 2...
        let busy: Vec<_> = (0..2)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect(at).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    tcp_ask(&mut s, &query(20 + i, &format!("slow{i}.example.test"), A))
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        // ... so a third is refused at once.
        let mut s = TcpStream::connect(at).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let t = Instant::now();
        let m = tcp_ask(&mut s, &query(9, "web.shop", A));
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(t.elapsed() < Duration::from_millis(400));
        for b in busy {
            assert_eq!(
                b.join().unwrap().metadata.response_code,
                ResponseCode::ServFail
            );
        }
        // With the slow ones answered, a client is served again.
        let mut s = TcpStream::connect(at).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let m = tcp_ask(&mut s, &query(10, "web.shop", A));
        assert_eq!(addrs(&m), vec!["10.42.0.2"]);
    })
    .await
    .unwrap();
    assert_eq!(server.stats().tcp_refused.load(Ordering::Relaxed), 1);
    assert!(server.stats().tcp_queries.load(Ordering::Relaxed) >= 4);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_udp_gets_formerr_or_nothing_and_server_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    store
        .put(
            &key("c1"),
            &endpoint_json("c1", "10.42.0.2", "web-1", "web", "shop"),
            None,
        )
        .await
        .unwrap();
    let server = DnsServer::start(config(&dir.path().join("none")), store)
        .await
        .unwrap();
    let at = server.local_addrs()[0];
    tokio::task::spawn_blocking(move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 4096];
        // Too short: dropped.
        s.send_to(&[1, 2, 3], at).unwrap();
        assert!(s.recv(&mut buf).is_err());
        // A truncated question: FORMERR.
        let q = query(77, "web.shop", A);
        s.send_to(&q[..q.len() - 3], at).unwrap();
        let n = s.recv(&mut buf).unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // A flood of junk, then a real query still works.
        for i in 0..2000u32 {
            let junk: Vec<u8> = (0..(i % 300))
                .map(|j| (i.wrapping_mul(31) ^ (j * 7)) as u8)
                .collect();
            s.send_to(&junk, at).unwrap();
        }
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let m = udp(at, "web.shop", A);
        assert_eq!(addrs(&m), vec!["10.42.0.2"]);
    })
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_serving_while_the_store_is_down() {
    use weft_store::testing::EtcdServer;
    let mut etcd = EtcdServer::start().expect("etcd (Debian etcd-server) is needed");
    let store: DynStore = Arc::new(weft_store::EtcdStore::connect(etcd.config()).await.unwrap());
    store
        .put(
            &key("c1"),
            &endpoint_json("c1", "10.42.0.2", "web-1", "web", "shop"),
            None,
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = DnsServer::start(config(&dir.path().join("none")), store.clone())
        .await
        .unwrap();
    let at = server.local_addrs()[0];
    let ask = move |name: &'static str| tokio::task::spawn_blocking(move || udp(at, name, A));
    assert_eq!(addrs(&ask("web.shop").await.unwrap()), vec!["10.42.0.2"]);

    etcd.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The last table keeps answering.
    assert_eq!(addrs(&ask("web.shop").await.unwrap()), vec!["10.42.0.2"]);

    etcd.restart().unwrap();
    // Re-listed and re-watched after the store returns.
    let mut put = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !put {
        put = store
            .put(
                &key("c2"),
                &endpoint_json("c2", "10.42.0.3", "web-2", "web", "shop"),
                None,
            )
            .await
            .is_ok();
        if !put {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(put, "etcd did not come back");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = addrs(&ask("web.shop").await.unwrap());
        if got == vec!["10.42.0.2", "10.42.0.3"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dnsd did not resync after the store came back: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}
