//! DNS answers through netd's restarts (issue 15): netd runs DNS as its
//! child, the `dnsd` binary, which outlives netd. One lab host with netd
//! and a container; a client in the container asks for a container's name
//! every 10 ms (one UDP query each, 300 ms to answer) while netd is
//! (a) SIGTERMed and started again, (b) SIGKILLed and started again,
//! (c) left alone while its dnsd is SIGKILLed (netd notices at once and
//! starts a new one: a gap, measured), and (d) restarted with another
//! DNS setting (a new dnsd overlaps the old one, which is then stopped).
//! (a), (b) and (d) must not lose one query. Exactly one dnsd runs after
//! each step and none after `netd teardown`. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use weft_tests::weft::{bin, CniCall, Netd};
use weft_tests::{Lab, LabOptions, Netns, NsChild};

const NAME: &str = "web-1.shop.weft.internal";

/// The client: one query (a new socket, so a new source port, each time)
/// every 10 ms; prints `<unix ms> ok` or `<unix ms> fail <why>` per query.
const CLIENT: &str = r#"
import socket, struct, sys, time
name, want, dns = sys.argv[1], socket.inet_aton(sys.argv[2]), sys.argv[3]
q = b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\0'
qid = 0
nxt = time.monotonic()
while True:
    qid = (qid + 1) & 0xffff
    t = time.time()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.3)
    why = None
    try:
        s.sendto(struct.pack('>HHHHHH', qid, 0x0100, 1, 0, 0, 0) + q + b'\0\x01\0\x01', (dns, 53))
        while True:
            data, _ = s.recvfrom(4096)
            if struct.unpack('>H', data[:2])[0] == qid:
                break
        rcode, ancount = data[3] & 0x0f, struct.unpack('>H', data[6:8])[0]
        if rcode != 0 or ancount < 1 or want not in data:
            why = 'rcode=%d answers=%d' % (rcode, ancount)
    except socket.timeout:
        why = 'timeout'
    except OSError as e:
        why = 'error:' + str(e.errno)
    s.close()
    print('%d %s' % (int(t * 1000), 'ok' if why is None else 'fail ' + why), flush=True)
    nxt += 0.01
    time.sleep(max(0.0, nxt - time.monotonic()))
"#;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// What the client saw between two instants.
#[derive(Debug)]
struct Window {
    queries: usize,
    failed: usize,
    /// From the first failed query to the first answered one after the
    /// last failure (0 without failures).
    gap_ms: u64,
    reasons: Vec<String>,
}

fn window(client: &NsChild, from: u64, to: u64) -> Window {
    let mut w = Window {
        queries: 0,
        failed: 0,
        gap_ms: 0,
        reasons: Vec::new(),
    };
    let (mut first_fail, mut last_fail_end) = (None, None);
    for line in client.stdout().lines() {
        let mut f = line.splitn(2, ' ');
        let (Some(t), Some(what)) = (f.next().and_then(|t| t.parse::<u64>().ok()), f.next()) else {
            continue;
        };
        if t < from || t > to {
            continue;
        }
        w.queries += 1;
        if what == "ok" {
            if let (Some(_), None) = (first_fail, last_fail_end) {
                last_fail_end = Some(t);
            }
        } else {
            w.failed += 1;
            first_fail.get_or_insert(t);
            last_fail_end = None;
            if w.reasons.len() < 5 {
                w.reasons.push(format!("{t} {what}"));
            }
        }
    }
    if let Some(start) = first_fail {
        w.gap_ms = last_fail_end.unwrap_or(to) - start;
    }
    w
}

/// The dnsd processes of the netd whose state dir is `dir`.
fn dnsds(dir: &Path) -> Vec<u32> {
    let flag = format!("--pidfile={}", dir.join("dnsd.pid").display());
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            continue;
        };
        if !exe
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("dnsd"))
        {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|a| a == flag.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// The one dnsd of `dir` (panics unless exactly one runs).
fn one_dnsd(dir: &Path, when: &str) -> u32 {
    let pids = dnsds(dir);
    assert_eq!(pids.len(), 1, "{when}: dnsds running: {pids:?}");
    pids[0]
}

/// The TTL of the first answer `dig` gets for `name` in `ns`.
fn ttl(ns: &Netns, name: &str) -> Option<u32> {
    let out = ns
        .exec([
            "dig",
            "+time=1",
            "+tries=3",
            "+noall",
            "+answer",
            "@169.254.169.250",
            name,
        ])
        .ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

/// Lets the client run `d` more, then the window since `from`.
fn settle(client: &NsChild, from: u64, d: Duration) -> Window {
    std::thread::sleep(d);
    window(client, from, now_ms())
}

#[test]
fn dns_answers_through_netd_restarts() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let store = format!("sqlite:{}", lab.dir().join("store.db").display());
    let mut netd = Netd::start(&lab, 0, &store, &[]).unwrap();
    let dir: PathBuf = netd.dir().to_path_buf();

    let c = lab.container(0, "a").unwrap();
    let out = CniCall {
        host: netd.host(),
        command: "ADD",
        container_id: "ctr-a",
        netns: &c.path().display().to_string(),
        ifname: "eth0",
        args: "IgnoreUnknown=1;K8S_POD_NAME=web-1;WEFT_SERVICE=web;WEFT_STACK=shop;WEFT_SERVICE_MODE=dnsrr",
        config: &netd.cni_config("1.0.0"),
    }
    .run()
    .unwrap();
    assert!(out.ok(), "ADD: {} {}", out.stdout, out.stderr);
    let ip = out.address().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ttl(&c, NAME).is_none() {
        assert!(
            Instant::now() < deadline,
            "{NAME} never answered:\n{}",
            netd.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ttl(&c, NAME), Some(1), "the default TTL");
    let first = one_dnsd(&dir, "after start");

    let client = c
        .spawn(["python3", "-c", CLIENT, NAME, &ip, "169.254.169.250"])
        .unwrap();
    let t = now_ms();
    let w = settle(&client, t, Duration::from_secs(1));
    assert!(w.queries > 50 && w.failed == 0, "baseline: {w:?}");

    // (a) SIGTERM, start again.
    let t = now_ms();
    netd.stop().unwrap();
    let stopped = Instant::now();
    netd.start_again().unwrap();
    let down = stopped.elapsed();
    let a = settle(&client, t, Duration::from_secs(1));
    assert_eq!(
        one_dnsd(&dir, "(a)"),
        first,
        "(a): the running dnsd is adopted"
    );
    eprintln!("(a) SIGTERM + start (netd down {down:?}): {a:?}");

    // (b) SIGKILL, start again.
    let t = now_ms();
    netd.kill();
    let killed = Instant::now();
    netd.start_again().unwrap();
    let down = killed.elapsed();
    let b = settle(&client, t, Duration::from_secs(1));
    assert_eq!(
        one_dnsd(&dir, "(b)"),
        first,
        "(b): the running dnsd is adopted"
    );
    eprintln!("(b) SIGKILL + start (netd down {down:?}): {b:?}");

    // (c) dnsd SIGKILLed: netd sees it exit (pidfd; else its 2 s check)
    // and starts another.
    let t = now_ms();
    let killed = Instant::now();
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        let pids = dnsds(&dir);
        if let [p] = pids[..] {
            if p != first {
                break p;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new dnsd: {pids:?}\n{}",
            netd.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let replaced = killed.elapsed();
    let cw = settle(&client, t, Duration::from_secs(1));
    assert!(
        netd.log().contains("dnsd died; starting it again"),
        "{}",
        netd.log()
    );
    eprintln!("(c) dnsd SIGKILLed, netd started {second} (seen after {replaced:?}): {cw:?}");
    assert!(cw.gap_ms < 1500, "(c) gap: {cw:?}");
    assert_eq!(one_dnsd(&dir, "(c)"), second);

    // (d) another DNS setting: a new dnsd, with an overlap, the old stopped.
    let t = now_ms();
    netd.stop().unwrap();
    let mut netd = Netd::start(&lab, 0, &store, &["--dns-ttl-secs=2"]).unwrap();
    let d = settle(&client, t, Duration::from_secs(1));
    let third = one_dnsd(&dir, "(d)");
    assert_ne!(third, second, "(d): a new dnsd for the new setting");
    assert_eq!(ttl(&c, NAME), Some(2), "(d): the new dnsd answers");
    eprintln!("(d) restart with --dns-ttl-secs=2 (dnsd {second} -> {third}): {d:?}");

    let total = window(&client, 0, u64::MAX);
    eprintln!("all: {} queries, {} failed", total.queries, total.failed);
    drop(client);
    assert_eq!(a.failed, 0, "(a) SIGTERM restart lost queries: {a:?}");
    assert_eq!(b.failed, 0, "(b) SIGKILL restart lost queries: {b:?}");
    assert_eq!(
        d.failed, 0,
        "(d) restart with a new setting lost queries: {d:?}"
    );

    // netd stopping leaves dnsd; teardown stops it.
    netd.stop().unwrap();
    assert_eq!(one_dnsd(&dir, "netd stopped"), third);
    let host = lab.host(0);
    host.exec([
        bin("netd").unwrap().to_str().unwrap(),
        "teardown",
        &format!("--state-dir={}", dir.display()),
        &format!("--socket={}", netd.socket().display()),
        &format!("--store={store}"),
        "--host-id=host0",
    ])
    .unwrap();
    assert_eq!(dnsds(&dir), Vec::<u32>::new(), "teardown stops dnsd");
    assert!(!dir.join("dnsd.pid").exists());
}
