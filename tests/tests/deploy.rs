//! weft deployed the way operators run it: netd as a sidecar container
//! (podman, host network, NET_ADMIN) that installs its CNI plugin and
//! conflist onto the host, serves Prometheus metrics and health checks; and
//! the per-peer counters measured against a real cross-host transfer.
//! Needs root, podman, runc, busybox-static and python3
//! (scripts/install-deps.sh).
//!
//! No image can be pulled here, so the sidecar runs from a root filesystem
//! that `deploy/build-rootfs.sh` assembles from this build's binaries and the
//! machine's Debian packages (what the Containerfile builds). The "host" of
//! the sidecar is a lab host: its network namespace, and directories in the
//! lab's temp dir standing in for its /opt/cni/bin, /etc/cni/net.d,
//! /run/weft and /var/lib/weft.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use weft_tests::weft::{bin, Netd};
use weft_tests::{Container, Lab, LabOptions, MachinePaths, Netns};

const METRICS_PORT: u16 = 9542;
/// Where the sidecar's dnsd serves its own `weft_dns_*` metrics.
const DNS_METRICS_PORT: u16 = 9543;

/// GET `url` from inside `ns` (python3's urllib; curl is not a test
/// dependency): the status code and the body.
fn http_get(ns: &Netns, url: &str) -> Option<(u16, String)> {
    let script = "import sys, urllib.request, urllib.error\n\
                  try:\n\
                  \x20   r = urllib.request.urlopen(sys.argv[1], timeout=5)\n\
                  \x20   code, body = r.status, r.read()\n\
                  except urllib.error.HTTPError as e:\n\
                  \x20   code, body = e.code, e.read()\n\
                  sys.stdout.write(str(code) + '\\n' + body.decode())\n";
    let out = ns.output(["python3", "-c", script, url]).ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, body) = text.split_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_owned()))
}

fn url(path: &str) -> String {
    format!("http://127.0.0.1:{METRICS_PORT}{path}")
}

/// The value of one series, e.g. `weft_peer_tx_bytes_total{peer="host1"}`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A busybox-static root filesystem for the workload container.
fn busybox_rootfs(dir: &Path) {
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "run"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox-static is installed");
    for applet in ["sh", "ip", "cat", "nslookup", "sleep"] {
        symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
}

/// podman with its state in `dir` (what podman 4.3 needs on this machine:
/// see shared/notes/crates.md), run inside a lab host's network namespace.
struct Podman {
    dir: PathBuf,
    conf: PathBuf,
    netns: PathBuf,
}

impl Podman {
    fn new(dir: PathBuf, netns: PathBuf, network: Option<(&Path, &Path)>) -> Podman {
        std::fs::create_dir_all(&dir).unwrap();
        let mut conf = String::from(
            "[containers]\n\
             default_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
             [engine]\n\
             cgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\n\
             runtime = \"runc\"\n",
        );
        // libpod's temporary state in the test's directory, not /run/libpod.
        conf.push_str(&format!("tmp_dir = \"{}\"\n", dir.join("tmp").display()));
        if let Some((conf_dir, bin_dir)) = network {
            conf.push_str(&format!(
                "[network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\n\
                 cni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\n",
                conf_dir.display(),
                bin_dir.display()
            ));
        }
        let path = dir.join("containers.conf");
        std::fs::write(&path, conf).unwrap();
        Podman {
            dir,
            conf: path,
            netns: netns.to_path_buf(),
        }
    }

    /// `nsenter --net=<host> [prefix...] podman <args>`. nsenter, not `ip
    /// netns exec`: the latter remounts /sys, which hides the cgroup mounts
    /// runc needs.
    fn command(&self, prefix: &[&str], args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .args(prefix)
            .arg("podman")
            .arg(format!("--root={}", self.dir.join("root").display()))
            .arg(format!("--runroot={}", self.dir.join("run").display()))
            .args(["--cgroup-manager=cgroupfs", "--events-backend=file"])
            .args(args)
            .env("CONTAINERS_CONF", &self.conf);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(&[], args).output().unwrap()
    }
}

/// Removes the sidecar container however the test ends.
struct Sidecar<'a> {
    podman: &'a Podman,
    name: String,
}

impl Sidecar<'_> {
    fn logs(&self) -> String {
        let out = self.podman.run(&["logs", &self.name]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        // The logs are colored when podman gives the container a terminal.
        let mut plain = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        plain
    }
}

impl Drop for Sidecar<'_> {
    fn drop(&mut self) {
        let _ = self.podman.run(&["rm", "-f", "-t", "0", &self.name]);
    }
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn sidecar_container_installs_cni_and_serves_health_and_metrics() {
    weft_tests::require_root!();
    // Declared first, dropped last: after every podman container is gone.
    let _podman_paths = MachinePaths::watch(MachinePaths::PODMAN);
    let started = Instant::now();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let host = lab.host(0);

    // The image's root filesystem, from this build's binaries.
    let bin_dir = bin("netd").unwrap().parent().unwrap().to_path_buf();
    bin("weft").unwrap();
    bin("dnsd").unwrap();
    let rootfs = lab.dir().join("sidecar-rootfs");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/build-rootfs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&rootfs)
        .arg(&bin_dir)
        .output()
        .unwrap();
    ok(&out, "deploy/build-rootfs.sh");

    // The host's directories the sidecar mounts.
    let fake = lab.dir().join("host");
    let cni_bin = fake.join("opt/cni/bin");
    let cni_conf = fake.join("etc/cni/net.d");
    let run_weft = fake.join("run/weft");
    let state = fake.join("var/lib/weft");
    for d in [&cni_bin, &cni_conf, &run_weft, &state] {
        std::fs::create_dir_all(d).unwrap();
    }
    // An operator's conflist from before, with a plugin of their own.
    std::fs::write(
        cni_conf.join("10-weft.conflist"),
        r#"{"cniVersion": "1.0.0", "name": "weft", "plugins": [
            {"type": "weft", "socket": "/somewhere/else.sock"},
            {"type": "bandwidth", "capabilities": {"bandwidth": true}}]}"#,
    )
    .unwrap();

    let podman = Podman::new(lab.dir().join("ps"), host.path(), None);
    let name = format!("{}-netd", lab.prefix());
    let mount = |from: &Path, to: &str| format!("{}:{to}", from.display());
    let (m1, m2, m3, m4) = (
        mount(&cni_bin, "/opt/cni/bin"),
        mount(&cni_conf, "/etc/cni/net.d"),
        mount(&run_weft, "/run/weft"),
        mount(&state, "/var/lib/weft"),
    );
    let metrics_env = format!("WEFT_METRICS_ADDR=127.0.0.1:{METRICS_PORT}");
    let dns_metrics_env = format!("WEFT_DNS_METRICS_ADDR=127.0.0.1:{DNS_METRICS_PORT}");
    let rootfs_arg = rootfs.display().to_string();
    // What the README tells operators to run (with an image instead of
    // --rootfs).
    let out = podman.run(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "--cap-add",
        "NET_ADMIN,NET_RAW",
        "--device",
        "/dev/net/tun",
        "--security-opt",
        "unmask=/proc/sys",
        "-v",
        &m1,
        "-v",
        &m2,
        "-v",
        &m3,
        "-v",
        &m4,
        "-v",
        "/var/run/netns:/var/run/netns:rslave",
        "-e",
        "WEFT_HOST_ID=host0",
        "-e",
        &metrics_env,
        "-e",
        &dns_metrics_env,
        "--rootfs",
        &rootfs_arg,
        "/usr/local/bin/netd",
        "sidecar",
    ]);
    let sidecar = Sidecar {
        podman: &podman,
        name: name.clone(),
    };
    ok(&out, "podman run (sidecar)");

    // Alive, then ready.
    let (code, body) = wait_for("/healthz", Duration::from_secs(30), || {
        http_get(host, &url("/healthz"))
    });
    assert_eq!((code, body.trim()), (200, "ok"), "{}", sidecar.logs());
    let (code, body) = wait_for("/readyz", Duration::from_secs(15), || {
        http_get(host, &url("/readyz")).filter(|(c, _)| *c == 200)
    });
    assert_eq!(code, 200);
    assert!(
        body.contains("store: ok") && body.contains("datapath: ok"),
        "{body}"
    );

    // The installer put the plugin and the conflist on the host.
    let installed = cni_bin.join("weft");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(bin("weft").unwrap()).unwrap(),
        "the installed plugin is this build's"
    );
    let conflist_path = cni_conf.join("10-weft.conflist");
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&conflist_path).unwrap()).unwrap();
    let plugins = conflist["plugins"].as_array().unwrap();
    assert_eq!(plugins[0]["type"], "weft", "{conflist}");
    assert_eq!(plugins[0]["socket"], "/run/weft/netd.sock", "{conflist}");
    assert_eq!(
        plugins[1]["type"], "bandwidth",
        "the operator's plugin stays"
    );
    assert_eq!(plugins.len(), 2, "{conflist}");
    let logs = sidecar.logs();
    assert!(logs.contains("CNI plugin installed"), "{logs}");

    // Installing again changes nothing (same bytes, not rewritten).
    let before = std::fs::metadata(&conflist_path)
        .unwrap()
        .modified()
        .unwrap();
    let again = podman.run(&["exec", &name, "/usr/local/bin/netd", "install-cni"]);
    let text = String::from_utf8_lossy(&again.stderr).into_owned();
    assert!(again.status.success(), "{text}");
    assert!(
        text.contains("CNI plugin unchanged") && text.contains("CNI conflist unchanged"),
        "{text}"
    );
    assert_eq!(
        std::fs::metadata(&conflist_path)
            .unwrap()
            .modified()
            .unwrap(),
        before
    );

    // A container started through CNI with what the installer put there:
    // podman (the CNI backend) on the lab host, with the host's view of
    // /run/weft (the conflist's socket) in a private mount namespace.
    let _run_weft = MachinePaths::dir("/run/weft").unwrap();
    let workload = Podman::new(
        lab.dir().join("pw"),
        host.path(),
        Some((&cni_conf, &cni_bin)),
    );
    let busybox = lab.dir().join("busybox");
    busybox_rootfs(&busybox);
    let bind = format!(
        "mount --bind {} /run/weft && exec \"$0\" \"$@\"",
        run_weft.display()
    );
    let out = workload
        .command(
            &[
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &bind,
            ],
            &[
                "run",
                "--rm",
                "--name",
                "app-0",
                "--network",
                "weft",
                "--rootfs",
                &busybox.display().to_string(),
                "sh",
                "-c",
                "ip -4 addr show eth0; nslookup app-0.weft.internal 169.254.169.250",
            ],
        )
        .output()
        .unwrap();
    let stdout = ok(
        &out,
        "podman run (workload through the installed CNI plugin)",
    );
    assert!(
        stdout.contains("inet 10.42.0."),
        "no weft address:\n{stdout}\n{}",
        sidecar.logs()
    );

    // The metrics saw it: a DNS query, an endpoint added and removed.
    let (_, text) = http_get(host, &url("/metrics")).unwrap();
    assert_eq!(
        metric(
            &text,
            r#"weft_host_info{host="host0",block="10.42.0.0/24",backend="wireguard",version="0.1.0"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "weft_store_up"), Some(1.0), "{text}");
    assert_eq!(
        metric(&text, "weft_endpoints"),
        Some(0.0),
        "DEL released it"
    );
    assert_eq!(metric(&text, "weft_block_capacity_addresses"), Some(253.0));
    assert_eq!(
        metric(&text, "weft_dnsd_restarts_total"),
        Some(0.0),
        "{text}"
    );
    // DNS counters: dnsd, netd's child, serves them itself.
    let (_, dns_text) = http_get(
        host,
        &format!("http://127.0.0.1:{DNS_METRICS_PORT}/metrics"),
    )
    .unwrap();
    assert!(
        metric(&dns_text, r#"weft_dns_query_types_total{type="A"}"#).unwrap_or(0.0) >= 1.0,
        "{dns_text}"
    );
    assert!(
        metric(&dns_text, r#"weft_dns_responses_total{rcode="NOERROR"}"#).unwrap_or(0.0) >= 1.0,
        "{dns_text}"
    );
    assert!(
        metric(
            &dns_text,
            r#"weft_dns_request_duration_seconds_count{path="local"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{dns_text}"
    );
    assert!(
        metric(&text, r#"weft_reconcile_runs_total{kind="host"}"#).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );

    // Not ready while the data path is down.
    host.ip(["link", "set", "weft0", "down"]).unwrap();
    let (code, body) = http_get(host, &url("/readyz")).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("weft0 is down"), "{body}");
    assert_eq!(http_get(host, &url("/healthz")).unwrap().0, 200);
    host.ip(["link", "set", "weft0", "up"]).unwrap();
    assert_eq!(http_get(host, &url("/readyz")).unwrap().0, 200);

    // SIGTERM stops it cleanly.
    let out = podman.run(&["stop", "-t", "10", &name]);
    ok(&out, "podman stop");
    let out = podman.run(&["inspect", &name, "--format", "{{.State.ExitCode}}"]);
    assert_eq!(ok(&out, "podman inspect").trim(), "0", "{}", sidecar.logs());
    eprintln!("sidecar test took {:?}", started.elapsed());
}

/// A container attached through the plugin, with its address.
fn attach(netd: &Netd, c: Container, id: &str) -> (Container, String) {
    let ip = netd.attach(&c, id).unwrap();
    (c, ip)
}

#[test]
fn per_peer_byte_counters_follow_a_cross_host_transfer() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let store = format!("sqlite:{}", lab.dir().join("store.db").display());
    let metrics_flag = format!("--metrics-addr=127.0.0.1:{METRICS_PORT}");
    let netds: Vec<Netd> = (0..2)
        .map(|i| Netd::start(&lab, i, &store, &[&metrics_flag]).unwrap())
        .collect();
    let (c0, _ip0) = attach(&netds[0], lab.container(0, "c0").unwrap(), "h0c0");
    let (c1, ip1) = attach(&netds[1], lab.container(1, "c1").unwrap(), "h1c1");
    wait_for("cross-host ping", Duration::from_secs(10), || {
        c0.output(["ping", "-c1", "-W1", &ip1])
            .unwrap()
            .status
            .success()
            .then_some(())
    });
    let scrape = |i: usize| http_get(lab.host(i), &url("/metrics")).unwrap().1;
    let tx0 = r#"weft_peer_tx_bytes_total{peer="host1"}"#;
    let rx1 = r#"weft_peer_rx_bytes_total{peer="host0"}"#;
    let (before0, before1) = (scrape(0), scrape(1));
    let (tx_before, rx_before) = (
        metric(&before0, tx0).expect("host0 counts bytes to host1"),
        metric(&before1, rx1).expect("host1 counts bytes from host0"),
    );

    // 40 MiB from host0's container to host1's: a sink that reads to the
    // end and says how much it got (iperf3 -n stops counting with bytes
    // still in flight, which are then never sent).
    const MIB: f64 = 1_048_576.0;
    let sink = "import socket\n\
                s = socket.socket()\n\
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                s.bind(('0.0.0.0', 5201))\n\
                s.listen(1)\n\
                c, _ = s.accept()\n\
                n = 0\n\
                while True:\n\
                \x20   b = c.recv(1 << 20)\n\
                \x20   if not b:\n\
                \x20       break\n\
                \x20   n += len(b)\n\
                c.sendall(str(n).encode())\n\
                c.close()\n";
    let _server = c1.spawn(["python3", "-c", sink]).unwrap();
    let source = format!(
        "import socket, time\n\
         for _ in range(50):\n\
         \x20   try:\n\
         \x20       s = socket.create_connection(('{ip1}', 5201), timeout=10)\n\
         \x20       break\n\
         \x20   except OSError:\n\
         \x20       time.sleep(0.1)\n\
         buf = b'x' * (1 << 20)\n\
         for _ in range(40):\n\
         \x20   s.sendall(buf)\n\
         s.shutdown(socket.SHUT_WR)\n\
         print(s.recv(64).decode())\n"
    );
    let got: f64 = c0
        .exec(["python3", "-c", &source])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let sent = 40.0 * MIB;
    assert_eq!(got, sent, "the sink got every byte");

    let (after0, after1) = (scrape(0), scrape(1));
    let tx = metric(&after0, tx0).unwrap() - tx_before;
    let rx = metric(&after1, rx1).unwrap() - rx_before;
    eprintln!(
        "transferred {sent} bytes of TCP payload; host0 tx to host1 +{tx} ({:.3}x), \
         host1 rx from host0 +{rx} ({:.3}x)",
        tx / sent,
        rx / sent
    );
    // Inner packets: the payload plus IP and TCP headers (about 4% at this
    // MTU) and the iperf3 control connection.
    for (what, delta) in [("host0 tx", tx), ("host1 rx", rx)] {
        assert!(
            (0.8..=1.2).contains(&(delta / sent)),
            "{what} grew by {delta} for {sent} bytes sent"
        );
    }
    // Packets moved too, the peers are up with a recent handshake.
    for (text, peer) in [(&after0, "host1"), (&after1, "host0")] {
        assert_eq!(
            metric(text, &format!(r#"weft_peer_up{{peer="{peer}"}}"#)),
            Some(1.0),
            "{text}"
        );
        assert_eq!(metric(text, r#"weft_peers{state="up"}"#), Some(1.0));
        let age = metric(
            text,
            &format!(r#"weft_peer_handshake_age_seconds{{peer="{peer}"}}"#),
        )
        .unwrap();
        assert!(age < 60.0, "handshake {age} s ago");
        assert_eq!(
            metric(
                text,
                &format!(r#"weft_peer_drops_total{{peer="{peer}",reason="decrypt"}}"#)
            ),
            Some(0.0),
            "{text}"
        );
    }
    assert!(
        metric(&after0, r#"weft_peer_tx_packets_total{peer="host1"}"#).unwrap()
            > metric(&before0, r#"weft_peer_tx_packets_total{peer="host1"}"#).unwrap() + 1000.0
    );
    // The tunnel device's kernel counters moved by at least as much.
    let link = r#"weft_link_tx_bytes_total{device="weft-wg"}"#;
    let link_tx = metric(&after0, link).unwrap() - metric(&before0, link).unwrap();
    assert!(link_tx >= 0.8 * sent, "weft-wg tx +{link_tx}");
    drop(c0);
}
