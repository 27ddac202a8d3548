//! WireGuard key rotation as an operator runs it (issue 14, "Key
//! rotation"): `netd rotate-key` on one host of a two-host WireGuard mesh
//! on the embedded store, while a TCP stream crosses the tunnel. Needs
//! root. (wg/tests/rotate.rs drives the data path alone, without netd and
//! the store; this is the flow through both.)
//!
//! * Two hosts with netd (`--backend=wireguard`, `--wg-rotate-settle-ms`
//!   [`SETTLE_MS`]) on one SQLite store, a container on each attached
//!   through the CNI plugin.
//! * A paced TCP stream from A's container to B's ([`SENDER`],
//!   [`RECEIVER`]: random bytes, 16 KiB every 2 ms) runs across two
//!   rotations of A's key: the first with `netd rotate-key --json`, the
//!   second started right after it; while the second waits for the peers
//!   (its announcement is in the store), a third call is refused (409,
//!   "already under way"). Each rotation's old key is the key before it,
//!   and after each B's last handshake with A is newer than the earliest
//!   moment A could have switched, under A's new key (B's
//!   `weft_peer_handshake_age_seconds`): the sessions moved over, the
//!   stream did not just ride on the old session.
//! * The stream has no error or reset, every byte arrives (count and
//!   SHA-256 at both ends) and the largest gap between received chunks is
//!   under [`MAX_GAP`] (printed, with when it happened relative to the
//!   switches).
//! * Afterwards A's host record in the store carries the last new key and
//!   no `wg_next_key`, no `wg.key.next` is left in A's state dir, and
//!   traffic flows both ways (ping, and a new connection from B to A).
//! * On a VXLAN host `netd rotate-key` fails and says why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant, SystemTime};

use weft_model::{HostRecord, Keys};
use weft_store::{SqliteStore, Store};
use weft_tests::weft::{bin, Netd};
use weft_tests::{Container, Lab, LabOptions, Netns, NsChild};

/// The rotation's settle time (the default is 3000 ms; lower keeps the
/// test short, and the SQLite store's watch sees a change within ~20 ms).
const SETTLE_MS: u64 = 500;
/// The issue's bound on the largest pause in the stream.
const MAX_GAP: Duration = Duration::from_secs(1);
/// How long the stream runs: covers both rotations with room after them.
const STREAM_SECS: f64 = 4.0;
const PORT: u16 = 5201;
/// B's metrics (in B's host namespace).
const METRICS_PORT: u16 = 9464;

/// Receives one connection and reports, as one JSON line at EOF or error:
/// bytes, their SHA-256, the largest gap between two received chunks, the
/// wall-clock time (epoch seconds) at which that gap ended, every gap over
/// 3 ms with its end (the sender writes every 2 ms), and any error.
const RECEIVER: &str = r#"
import hashlib, json, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', int(sys.argv[1])))
s.listen(1)
c, _ = s.accept()
h = hashlib.sha256()
n, gap, gap_end, last, err, gaps = 0, 0.0, None, None, None, []
try:
    while True:
        d = c.recv(1 << 16)
        now = time.monotonic()
        if not d:
            break
        if last is not None and now - last > 0.003:
            gaps.append([now - last, time.time()])
        if last is not None and now - last > gap:
            gap, gap_end = now - last, time.time()
        last = now
        n += len(d)
        h.update(d)
except Exception as e:
    err = repr(e)
print(json.dumps({'bytes': n, 'sha256': h.hexdigest(), 'max_gap_s': gap,
                  'gap_end': gap_end, 'gaps': gaps, 'error': err}), flush=True)
"#;

/// Connects and writes 16 KiB of random bytes every 2 ms for argv[3]
/// seconds, then half-closes and waits for the receiver to close; reports
/// bytes sent, their SHA-256 and any error as one JSON line.
const SENDER: &str = r#"
import hashlib, json, os, socket, sys, time
h = hashlib.sha256()
n, err = 0, None
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    end = time.monotonic() + float(sys.argv[3])
    nxt = time.monotonic()
    while time.monotonic() < end:
        d = os.urandom(16384)
        s.sendall(d)
        h.update(d)
        n += len(d)
        nxt += 0.002
        pause = nxt - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()
except Exception as e:
    err = repr(e)
print(json.dumps({'bytes': n, 'sha256': h.hexdigest(), 'error': err}), flush=True)
"#;

/// A container attached through the CNI plugin, with its address.
struct Ctr {
    c: Container,
    ip: String,
}

/// Pings until it answers.
fn ping_within(from: &Container, to: &str, within: Duration) {
    let t = Instant::now();
    while !from
        .output(["ping", "-c1", "-W1", to])
        .unwrap()
        .status
        .success()
    {
        assert!(t.elapsed() < within, "{to} not reachable within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Host records read straight from the lab's SQLite store.
struct Records {
    rt: tokio::runtime::Runtime,
    store: SqliteStore,
}

impl Records {
    fn open(lab: &Lab) -> Records {
        Records {
            rt: tokio::runtime::Runtime::new().unwrap(),
            store: SqliteStore::open(lab.dir().join("store.db")).unwrap(),
        }
    }

    fn host(&self, host: &str) -> HostRecord {
        let kv = self
            .rt
            .block_on(self.store.get(&Keys::default().host(host)))
            .unwrap()
            .unwrap_or_else(|| panic!("no record for {host} in the store"));
        serde_json::from_slice(&kv.value).unwrap()
    }

    /// Polls host `host`'s record until `cond` holds (the record is
    /// written by netd's publisher task, just after the API answered).
    fn wait_for(&self, host: &str, what: &str, cond: impl Fn(&HostRecord) -> bool) -> HostRecord {
        let t = Instant::now();
        loop {
            let rec = self.host(host);
            if cond(&rec) {
                return rec;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{host}'s record: {what} not seen within 5 s: {rec:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The public keys a successful `netd rotate-key --json` printed.
fn parse_rotation(out: &std::process::Output) -> (String, String) {
    assert!(
        out.status.success(),
        "netd rotate-key failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["old_public_key"].as_str().unwrap().to_owned(),
        v["new_public_key"].as_str().unwrap().to_owned(),
    )
}

/// `netd rotate-key --json` against `netd`'s control socket, started in
/// its host without waiting.
fn spawn_rotation(netd: &Netd) -> NsChild {
    netd.host()
        .spawn([
            bin("netd").unwrap().display().to_string(),
            "rotate-key".into(),
            "--json".into(),
            format!("--socket={}", netd.socket().display()),
        ])
        .unwrap()
}

/// B's last handshake with A happened after `switch_start` (an instant
/// before A's rotation could switch: its start plus the settle time), by
/// `weft_peer_handshake_age_seconds{peer="host0"}` on B. B's metrics list
/// a peer's session only under the key the store has for it, so this also
/// shows that B's data path took A's new key. Polls for up to 3 s after
/// `switch_start`; returns how long after it the handshake was at least.
fn b_handshook_after(b: &Netd, switch_start: Instant) -> Duration {
    let series = "weft_peer_handshake_age_seconds{peer=\"host0\"} ";
    let mut last = None;
    while switch_start.elapsed() < Duration::from_secs(3) {
        let asked = Instant::now();
        let text = scrape(b);
        let age = text
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok());
        if let Some(age) = age {
            // The handshake happened at or after `asked - age` (the answer
            // takes milliseconds: the request is made from this process).
            let since = asked.saturating_duration_since(switch_start);
            if since.as_secs_f64() > age {
                return since - Duration::from_secs_f64(age);
            }
        }
        last = Some(age);
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "no handshake between A's new key and B after the switch (last age on B: {last:?}); B's log:\n{}",
        b.log()
    );
}

/// GET /metrics from `netd` (in its host namespace, from this process).
fn scrape(netd: &Netd) -> String {
    use std::io::{Read, Write};
    weft_tests::in_netns(netd.host().path(), || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", METRICS_PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    })
}

fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Waits for a python script's one JSON line.
fn json_result(child: &mut NsChild, what: &str) -> serde_json::Value {
    let status = child.wait_timeout(Duration::from_secs(20)).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "{what} did not finish cleanly ({status:?}): {}",
        child.stderr()
    );
    serde_json::from_str(child.stdout().trim())
        .unwrap_or_else(|e| panic!("{what} printed {:?}: {e}", child.stdout()))
}

/// Waits until something listens on TCP `port` in `ns`.
fn wait_listening(ns: &Netns, port: u16) {
    weft_tests::wait_until(Duration::from_secs(10), "the receiver listening", || {
        let out = ns.output(["ss", "-ltnH", &format!("sport = :{port}")]);
        out.is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
    })
    .unwrap();
}

#[test]
fn rotate_key_keeps_a_tcp_stream_and_publishes_the_new_key() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(3)).unwrap();
    let store = format!("sqlite:{}", lab.dir().join("store.db").display());
    let settle_flag = format!("--wg-rotate-settle-ms={SETTLE_MS}");
    let flags = ["--backend=wireguard", settle_flag.as_str()];
    let a_netd = Netd::start(&lab, 0, &store, &flags).unwrap();
    let metrics = format!("--metrics-addr=127.0.0.1:{METRICS_PORT}");
    let b_netd = Netd::start(&lab, 1, &store, &[flags[0], flags[1], &metrics]).unwrap();
    let a = lab.container(0, "a").unwrap();
    let a = Ctr {
        ip: a_netd.attach(&a, "a").unwrap(),
        c: a,
    };
    let b = lab.container(1, "b").unwrap();
    let b = Ctr {
        ip: b_netd.attach(&b, "b").unwrap(),
        c: b,
    };
    ping_within(&a.c, &b.ip, Duration::from_secs(5));
    let records = Records::open(&lab);
    let k0 = records.host("host0");
    assert!(k0.wg_next_key.is_none(), "{k0:?}");
    let k0 = k0
        .wg_public_key
        .expect("a WireGuard host publishes its key");

    // The stream from A's container to B's.
    let mut receiver =
        b.c.spawn(["python3", "-c", RECEIVER, &PORT.to_string()])
            .unwrap();
    wait_listening(&b.c, PORT);
    let mut sender =
        a.c.spawn([
            "python3",
            "-c",
            SENDER,
            &b.ip,
            &PORT.to_string(),
            &STREAM_SECS.to_string(),
        ])
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));

    // Rotation 1, as an operator runs it.
    let t = Instant::now();
    let settle = Duration::from_millis(SETTLE_MS);
    let started1 = epoch_secs();
    let (old1, k1) = parse_rotation(&a_netd.cli(&["rotate-key", "--json"]).unwrap());
    let took1 = t.elapsed();
    assert_eq!(old1, k0.to_string(), "the old key is the published one");
    assert_ne!(k1, old1, "a new key");
    assert!(
        took1 >= Duration::from_millis(SETTLE_MS),
        "the rotation waits for the peers: {took1:?}"
    );
    let hs1 = b_handshook_after(&b_netd, t + settle);

    // Rotation 2 right after; while it waits for the peers (its next key
    // is in the store), a third is refused.
    let started2 = epoch_secs();
    let t2 = Instant::now();
    let mut second = spawn_rotation(&a_netd);
    let announced = records.wait_for("host0", "the second announcement", |r| {
        r.wg_next_key.is_some()
    });
    assert_eq!(
        announced.wg_public_key.map(|k| k.to_string()).as_deref(),
        Some(k1.as_str()),
        "announced while the first rotation's key is in use"
    );
    let third = a_netd.cli(&["rotate-key", "--json"]).unwrap();
    let third_err = String::from_utf8_lossy(&third.stderr);
    assert!(
        !third.status.success() && third_err.contains("already under way"),
        "a rotation during another is refused: {} {third_err}",
        third.status
    );
    let second_out = second.wait_timeout(Duration::from_secs(20)).unwrap();
    assert!(second_out.is_some(), "the second rotation did not finish");
    let second = second.wait().unwrap();
    assert!(
        second.status.success(),
        "second rotation: {}",
        second.stderr
    );
    let v: serde_json::Value = serde_json::from_str(&second.stdout).unwrap();
    let (old2, k2) = (
        v["old_public_key"].as_str().unwrap().to_owned(),
        v["new_public_key"].as_str().unwrap().to_owned(),
    );
    assert_eq!(old2, k1, "the second rotation starts from the first's key");
    assert_ne!(k2, k1);
    assert_ne!(k2, k0.to_string());
    assert_eq!(
        announced.wg_next_key.map(|k| k.to_string()).as_deref(),
        Some(k2.as_str()),
        "the key switched to is the one announced"
    );
    let hs2 = b_handshook_after(&b_netd, t2 + settle);
    eprintln!(
        "rotate-key: B's handshake with A's new key at least {hs1:?} / {hs2:?} after the earliest possible switch of rotation 1 / 2"
    );

    // The stream.
    let sent = json_result(&mut sender, "the sender");
    let got = json_result(&mut receiver, "the receiver");
    let gap = Duration::from_secs_f64(got["max_gap_s"].as_f64().unwrap());
    let gap_at = got["gap_end"].as_f64().map_or("-".to_owned(), |end| {
        format!(
            "ended {:+.3} s after rotation 1 started, {:+.3} s after rotation 2 started",
            end - started1,
            end - started2
        )
    });
    eprintln!(
        "rotate-key: {} bytes streamed across 2 rotations (rotation 1 took {took1:?}); largest gap between received chunks {:.1} ms ({gap_at})",
        got["bytes"],
        gap.as_secs_f64() * 1e3
    );
    // The largest gap from just before each switch to 300 ms after it.
    let gaps: Vec<(f64, f64)> = got["gaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g[0].as_f64().unwrap(), g[1].as_f64().unwrap()))
        .collect();
    for (i, start) in [started1, started2].into_iter().enumerate() {
        let switch = start + settle.as_secs_f64();
        let near = gaps
            .iter()
            .filter(|(_, end)| (switch - 0.05..switch + 0.3).contains(end))
            .map(|(g, _)| *g)
            .fold(0.0, f64::max);
        eprintln!(
            "rotate-key: rotation {}: largest gap from the switch to 300 ms after it {}",
            i + 1,
            if near > 0.0 {
                format!("{:.1} ms", near * 1e3)
            } else {
                "under 3 ms".to_owned()
            }
        );
    }
    assert!(sent["error"].is_null(), "sender: {sent}");
    assert!(got["error"].is_null(), "receiver: {got}");
    assert!(sent["bytes"].as_u64().unwrap() > 0, "{sent}");
    assert_eq!(sent["bytes"], got["bytes"], "every byte arrived");
    assert_eq!(sent["sha256"], got["sha256"], "the bytes arrived unchanged");
    assert!(gap < MAX_GAP, "largest gap {gap:?}");

    // The store has the new key and nothing announced; the next key file
    // became the key.
    let rec = records.wait_for("host0", "the last key, nothing announced", |r| {
        r.wg_next_key.is_none()
    });
    assert_eq!(
        rec.wg_public_key.map(|k| k.to_string()).as_deref(),
        Some(k2.as_str())
    );
    assert!(
        !a_netd.dir().join("wg.key.next").exists(),
        "wg.key.next left behind"
    );

    // Traffic both ways, and a new connection the other way.
    ping_within(&a.c, &b.ip, Duration::from_secs(3));
    ping_within(&b.c, &a.ip, Duration::from_secs(3));
    let bytes = 4 << 20;
    let (got, _) = weft_tests::weft::bulk_transfer(&b.c, &a.c, &a.ip, PORT + 1, bytes).unwrap();
    assert_eq!(
        got, bytes,
        "a new connection from B to A after the rotation"
    );

    // A VXLAN host (its own store: not part of the mesh) has no key.
    let vx_store = format!("sqlite:{}", lab.dir().join("vxlan.db").display());
    let vx = Netd::start(&lab, 2, &vx_store, &["--backend=vxlan"]).unwrap();
    let out = vx.cli(&["rotate-key"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("vxlan backend") && err.contains("no key"),
        "rotate-key on a VXLAN host: {} {err}",
        out.status
    );
    eprintln!("rotate-key on VXLAN: {}", err.trim());
}

/// A rotation asked for while the store is down is abandoned before the
/// switch (peers could not learn the new key, so switching would cut the
/// host off): the CLI says so, the key in use stays (on disk too) and
/// traffic keeps flowing; once the store is back a rotation works.
#[test]
fn rotate_key_during_a_store_outage_is_abandoned() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let mut etcd = weft_store::testing::EtcdServer::start_in_netns(
        lab.underlay().name(),
        lab.host(0).gateway(),
    )
    .unwrap();
    let store = format!("etcd:{}", etcd.endpoint());
    let settle_flag = format!("--wg-rotate-settle-ms={SETTLE_MS}");
    let flags = ["--backend=wireguard", settle_flag.as_str()];
    let a_netd = Netd::start(&lab, 0, &store, &flags).unwrap();
    let b_netd = Netd::start(&lab, 1, &store, &flags).unwrap();
    let a = lab.container(0, "a").unwrap();
    let a_ip = a_netd.attach(&a, "a").unwrap();
    let b = lab.container(1, "b").unwrap();
    let b_ip = b_netd.attach(&b, "b").unwrap();
    ping_within(&a, &b_ip, Duration::from_secs(5));
    let key_file = a_netd.dir().join(weft_wg::KEY_FILE);
    let key_before = std::fs::read_to_string(&key_file).unwrap();

    etcd.stop();
    let out = a_netd.cli(&["rotate-key"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("rotate-key with the store down: {}", err.trim());
    assert!(
        !out.status.success() && err.contains("abandoned") && err.contains("key in use stays"),
        "rotate-key with the store down: {} {err}",
        out.status
    );
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), key_before);
    assert!(!a_netd.dir().join(weft_wg::NEXT_KEY_FILE).exists());
    // The tunnel still uses the old key: traffic flows both ways.
    ping_within(&a, &b_ip, Duration::from_secs(3));
    ping_within(&b, &a_ip, Duration::from_secs(3));

    etcd.restart().unwrap();
    // netd's store client reconnects; a rotation then goes through.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = a_netd.cli(&["rotate-key", "--json"]).unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotate-key after the store came back: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_ne!(std::fs::read_to_string(&key_file).unwrap(), key_before);
    ping_within(&a, &b_ip, Duration::from_secs(5));
    ping_within(&b, &a_ip, Duration::from_secs(5));
}
