//! Tests of the namespace test harness itself. They need root; without it they
//! print `SKIP ...` and pass, unless WEFT_REQUIRE_ROOT_TESTS=1.

// Tests may unwrap, helpers included.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::sync::{Barrier, Mutex};

use weft_tests::naming::{self, Role};
use weft_tests::{require_root, Host, Lab, LabOptions, Netns, RouterOptions};

/// `ping -c1 -W1` from `from` to `to`; panics with ping's output if it fails.
fn ping(from: &Host, to: Ipv4Addr) {
    let to = to.to_string();
    if let Err(e) = from.exec(["ping", "-c1", "-W1", to.as_str()]) {
        panic!("{} ({}) cannot ping {to}: {e}", from.name(), from.addr());
    }
}

/// Output of a ping with DF set and `size` bytes of payload; Ok if it got an
/// answer.
fn ping_df(from: &Host, to: Ipv4Addr, size: u32) -> Result<String, String> {
    let out = from
        .output([
            "ping",
            "-c1",
            "-W1",
            "-M",
            "do",
            "-s",
            &size.to_string(),
            &to.to_string(),
        ])
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn ping_all_pairs(lab: &Lab) {
    for a in lab.hosts() {
        for b in lab.hosts() {
            if a.index() != b.index() {
                ping(a, b.addr());
            }
        }
    }
}

/// Names of links in the root namespace (read only).
fn root_links() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

fn netns_listed() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn with_prefix(names: &[String], prefix: &str) -> Vec<String> {
    names
        .iter()
        .filter(|n| n.contains(prefix))
        .cloned()
        .collect()
}

fn assert_gone(prefix: &str) {
    let left = with_prefix(&netns_listed(), prefix);
    assert!(left.is_empty(), "namespaces of {prefix} left: {left:?}");
    let links = with_prefix(&root_links(), prefix);
    assert!(links.is_empty(), "root links of {prefix}: {links:?}");
}

fn three_hosts(mtu: u32) {
    let lab = Lab::new(LabOptions::hosts(3).mtu(mtu)).unwrap();
    let prefix = lab.prefix().to_string();
    assert_eq!(prefix.len(), naming::PREFIX_LEN);
    assert_eq!(lab.hosts().len(), 3);

    // All namespaces exist, and are what `ip netns list` shows.
    let listed = netns_listed();
    let names: Vec<String> = lab
        .namespaces()
        .iter()
        .map(|n| n.name().to_string())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}"); // underlay + 3 hosts
    for n in &names {
        assert!(listed.contains(n), "{n} not in {listed:?}");
        assert!(Netns::named(n).exists());
        assert_eq!(naming::parse(n).unwrap().pid, std::process::id());
    }
    assert!(lab.underlay().exists());
    // Nothing of ours in the root namespace.
    assert!(with_prefix(&root_links(), &prefix).is_empty());

    for (i, h) in lab.hosts().iter().enumerate() {
        assert_eq!(h.index(), i);
        assert_eq!(h.name(), format!("{prefix}-h{i}"));
        assert_eq!(h.addr(), Ipv4Addr::new(192, 168, 77, 10 + i as u8));
        assert_eq!(h.mtu(), mtu);
        // eth0: requested MTU, our address; lo up; default route via the gateway.
        assert_eq!(h.link_mtu("eth0").unwrap(), mtu);
        let addrs = h
            .exec(["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
            .unwrap();
        assert!(addrs.contains(&h.cidr()), "{addrs}");
        let lo = h.ip(["-o", "link", "show", "lo"]).unwrap();
        assert!(lo.contains("UP"), "{lo}");
        let route = h.ip(["route", "show", "default"]).unwrap();
        assert!(
            route.contains(&format!("default via {} dev eth0", h.gateway())),
            "{route}"
        );
        let mut links = h.links().unwrap();
        links.sort();
        assert_eq!(links, vec!["eth0", "lo"]);
        // The bridge port carries the MTU too.
        assert_eq!(lab.underlay().link_mtu(h.underlay_port()).unwrap(), mtu);
        assert!(h.underlay_port().len() <= 15);
    }
    assert_eq!(
        lab.underlay()
            .link_mtu(lab.host(0).underlay_bridge())
            .unwrap(),
        mtu
    );

    ping_all_pairs(&lab);
    // The gateway (on the switch) answers.
    ping(lab.host(0), lab.host(0).gateway());
    // Full-size packets cross the underlay unfragmented; one byte more does not.
    let (a, b) = (lab.host(0), lab.host(2));
    ping_df(a, b.addr(), mtu - 28).unwrap();
    ping_df(a, b.addr(), mtu - 27).unwrap_err();

    drop(lab);
    assert_gone(&prefix);
}

#[test]
fn three_hosts_reach_each_other_mtu_1500() {
    require_root!();
    three_hosts(1500);
}

#[test]
fn three_hosts_reach_each_other_mtu_9000() {
    require_root!();
    three_hosts(9000);
}

#[test]
fn exec_errors_name_command_namespace_and_stderr() {
    require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let h = lab.host(0);
    let err = h.exec(["ip", "link", "show", "nosuchdev0"]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(h.name()), "{msg}");
    assert!(msg.contains("ip link show nosuchdev0"), "{msg}");
    assert!(err.stderr().unwrap().contains("nosuchdev0"), "{msg}");
    // Output of a successful command comes back.
    assert_eq!(h.exec(["echo", "hi"]).unwrap(), "hi\n");
    // Background processes: output readable, stop() collects it.
    let child = h
        .spawn(["sh", "-c", "echo out; echo err >&2; exec sleep 60"])
        .unwrap();
    weft_tests::wait_until(std::time::Duration::from_secs(5), "child output", || {
        child.stdout() == "out\n" && child.stderr() == "err\n"
    })
    .unwrap();
    assert!(h.pids().unwrap().contains(&child.pid()));
    let done = child.stop().unwrap();
    assert!(!done.status.success());
    assert_eq!(done.stdout, "out\n");
    assert!(h.pids().unwrap().is_empty());
}

#[test]
fn dropped_lab_leaves_nothing() {
    require_root!();
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let prefix = lab.prefix().to_string();
    let c = lab.container(1, "c1").unwrap();
    // Processes started behind the harness's back are killed by the drop too.
    let mut stray = lab.host(0).command(["sleep", "600"]).spawn().unwrap();
    let mut in_container = c.command(["sleep", "600"]).spawn().unwrap();
    let names: Vec<String> = lab
        .namespaces()
        .iter()
        .map(|n| n.name().to_string())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    weft_tests::wait_until(std::time::Duration::from_secs(5), "sleep started", || {
        lab.host(0).pids().is_ok_and(|p| p.len() == 1)
    })
    .unwrap();

    drop(lab);

    assert_gone(&prefix);
    for n in &names {
        assert!(!Netns::named(n).exists(), "{n}");
    }
    let st = stray.wait().unwrap();
    assert!(!st.success(), "host process not killed: {st}");
    let st = in_container.wait().unwrap();
    assert!(!st.success(), "container process not killed: {st}");
}

#[test]
fn panic_inside_a_test_still_cleans_up() {
    require_root!();
    let seen: Mutex<Option<(String, Vec<String>)>> = Mutex::new(None);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::new(LabOptions::hosts(2)).unwrap();
        let _c = lab.container(0, "doomed").unwrap();
        let _p = lab.host(1).spawn(["sleep", "600"]).unwrap();
        let names = lab
            .namespaces()
            .iter()
            .map(|n| n.name().to_string())
            .collect();
        *seen.lock().unwrap() = Some((lab.prefix().to_string(), names));
        panic!("deliberate panic with a live lab");
    }));
    assert!(result.is_err());
    let (prefix, names) = seen.lock().unwrap().take().unwrap();
    assert_eq!(names.len(), 4, "{names:?}");
    for n in &names {
        assert!(!Netns::named(n).exists(), "{n} survived the panic");
    }
    assert_gone(&prefix);
}

#[test]
fn parallel_labs_do_not_collide() {
    require_root!();
    let barrier = Barrier::new(2);
    let results: Vec<(String, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let lab = Lab::new(LabOptions::hosts(3)).unwrap();
                    // Both labs alive at once, both work.
                    barrier.wait();
                    ping_all_pairs(&lab);
                    // The switch has exactly this lab's ports.
                    let br = lab.host(0).underlay_bridge().to_string();
                    let ports = lab
                        .underlay()
                        .ip(["-o", "link", "show", "master", &br])
                        .unwrap();
                    let mut ports: Vec<String> = ports
                        .lines()
                        .filter_map(|l| l.split(": ").nth(1))
                        .map(|n| n.split('@').next().unwrap_or(n).to_string())
                        .collect();
                    ports.sort();
                    let mut want: Vec<String> = lab
                        .hosts()
                        .iter()
                        .map(|h| h.underlay_port().to_string())
                        .collect();
                    want.sort();
                    assert_eq!(ports, want);
                    barrier.wait();
                    let names = lab
                        .namespaces()
                        .iter()
                        .map(|n| n.name().to_string())
                        .collect();
                    (lab.prefix().to_string(), names)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (a, b) = (&results[0], &results[1]);
    assert_ne!(a.0, b.0);
    let na: HashSet<_> = a.1.iter().collect();
    assert!(b.1.iter().all(|n| !na.contains(n)));
    assert_gone(&a.0);
    assert_gone(&b.0);
}

#[test]
fn containers_are_empty_namespaces_removed_with_the_lab() {
    require_root!();
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let c1 = lab.container(1, "web").unwrap();
    let c2 = lab.container(1, "db.1").unwrap();
    for (c, name) in [(&c1, "web"), (&c2, "db.1")] {
        assert_eq!(c.host_index(), 1);
        assert_eq!(c.container_name(), name);
        assert_eq!(c.name(), format!("{}-h1-{name}", lab.prefix()));
        assert_eq!(
            c.path(),
            std::path::Path::new("/var/run/netns").join(c.name())
        );
        assert!(c.exists());
        assert!(netns_listed().contains(&c.name().to_string()));
        assert_eq!(c.links().unwrap(), vec!["lo"]);
        assert!(c.ip(["-o", "link", "show", "lo"]).unwrap().contains("UP"));
        assert_eq!(
            naming::parse(c.name()).unwrap().role,
            Role::Container {
                host: 1,
                name: name.to_string()
            }
        );
    }
    assert_eq!(lab.containers().len(), 2);
    // Same name on the same host: refused; on another host: fine.
    assert!(lab.container(1, "web").is_err());
    let c3 = lab.container(0, "web").unwrap();
    // Bad names and hosts are refused.
    for bad in ["", "-x", "a/b", "a b", &"x".repeat(41)] {
        assert!(lab.container(0, bad).is_err(), "{bad:?}");
    }
    assert!(lab.container(2, "nohost").is_err());
    // Removing one early works.
    lab.remove_container(&c3).unwrap();
    assert!(!c3.exists());
    assert_eq!(lab.containers().len(), 2);

    drop(lab);
    assert!(!c1.exists());
    assert!(!c2.exists());
}

/// Namespaces made by hand for the sweep test, deleted at the end whatever happens.
struct HandMade(Vec<String>);

impl HandMade {
    fn add(&mut self, name: String) -> Netns {
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        self.0.push(name.clone());
        Netns::named(name)
    }
}

impl Drop for HandMade {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Netns::named(n).destroy();
        }
    }
}

#[test]
fn stale_namespaces_of_dead_runs_are_swept() {
    require_root!();
    // A pid that is certainly dead: a child we reaped.
    let mut t = Command::new("true").spawn().unwrap();
    let dead = t.id();
    t.wait().unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{dead}")).exists());
    // Unique parts starting with 'z' are never used by real labs.
    let z = naming::UNIQUE_SPACE;
    let dead_prefix = naming::prefix(dead, z + 1);
    let reused_prefix = naming::prefix(std::process::id(), z + 2);
    let alive_prefix = naming::prefix(std::os::unix::process::parent_id(), z + 3);

    let mut made = HandMade(Vec::new());
    // Matching the scheme, creator dead: swept (with a process and a veth inside).
    let stale_ul = made.add(naming::netns_name(&dead_prefix, &Role::Underlay));
    let stale_h0 = made.add(naming::netns_name(&dead_prefix, &Role::Host(0)));
    let stale_c = made.add(naming::netns_name(
        &dead_prefix,
        &Role::Container {
            host: 0,
            name: "old".into(),
        },
    ));
    stale_h0
        .ip([
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &format!("{dead_prefix}p0"),
            "netns",
            stale_ul.name(),
        ])
        .unwrap();
    let mut sleeper = stale_h0.command(["sleep", "600"]).spawn().unwrap();
    // This process's pid but no live lab of ours: a reused pid, swept.
    let stale_reused = made.add(naming::netns_name(&reused_prefix, &Role::Router));
    // Creator alive: kept.
    let kept_alive = made.add(naming::netns_name(&alive_prefix, &Role::Host(3)));
    // Not the scheme: kept, whatever pid they seem to carry.
    let kept_other = [
        made.add(format!("{dead_prefix}-other")),
        made.add(format!("{dead_prefix}-h01")),
        made.add(format!("{dead_prefix}x-ul")),
        made.add(format!("weft{dead}-ul")),
    ];
    weft_tests::wait_until(
        std::time::Duration::from_secs(5),
        "sleeper in netns",
        || stale_h0.pids().is_ok_and(|p| !p.is_empty()),
    )
    .unwrap();

    let lab = Lab::new(LabOptions::hosts(1)).unwrap();

    for ns in [&stale_ul, &stale_h0, &stale_c, &stale_reused] {
        assert!(!ns.exists(), "{ns} not swept");
    }
    assert!(
        !sleeper.wait().unwrap().success(),
        "process in stale netns survived"
    );
    assert!(
        kept_alive.exists(),
        "{kept_alive} swept though its creator lives"
    );
    for ns in &kept_other {
        assert!(
            ns.exists(),
            "{ns} swept though it does not match the scheme"
        );
    }
    // The new lab itself is fine, and a sweep leaves live labs alone.
    assert!(lab.host(0).exists());
    let swept = weft_tests::sweep_stale().unwrap();
    assert!(
        swept.iter().all(|n| !n.starts_with(lab.prefix())),
        "{swept:?}"
    );
    assert!(lab.host(0).exists() && lab.underlay().exists());
}

#[test]
fn router_splits_two_subnets_with_a_smaller_far_mtu() {
    require_root!();
    let lab = Lab::new(LabOptions::hosts(4).mtu(1500).router(RouterOptions {
        near_hosts: 2,
        far_mtu: 1400,
    }))
    .unwrap();
    let rt = lab.router().unwrap();
    assert!(rt.exists());
    assert_eq!(rt.name(), format!("{}-rt", lab.prefix()));
    assert_eq!(rt.link_mtu("eth0").unwrap(), 1500);
    assert_eq!(rt.link_mtu("eth1").unwrap(), 1400);
    let (n0, n1, f2, f3) = (lab.host(0), lab.host(1), lab.host(2), lab.host(3));
    assert_eq!(n0.addr(), Ipv4Addr::new(192, 168, 77, 10));
    assert_eq!(f2.addr(), Ipv4Addr::new(192, 168, 78, 12));
    assert_eq!(n0.gateway(), rt.near_addr());
    assert_eq!(f3.gateway(), rt.far_addr());
    assert!(!n1.is_far() && f2.is_far());
    assert_eq!(n0.link_mtu("eth0").unwrap(), 1500);
    assert_eq!(f2.link_mtu("eth0").unwrap(), 1400);
    assert_eq!(lab.namespaces().len(), 6); // underlay, router, 4 hosts

    ping_all_pairs(&lab);
    // Near-to-near stays on the near switch at full size.
    ping_df(n0, n1.addr(), 1472).unwrap();
    // Across the router the path MTU is 1400: DF packets above it fail (the router
    // says "fragmentation needed"), packets that fit pass.
    let err = ping_df(n0, f2.addr(), 1472).unwrap_err();
    assert!(
        err.contains("mtu = 1400") || err.contains("too long"),
        "unexpected ping output: {err}"
    );
    ping_df(n0, f2.addr(), 1372).unwrap();
    ping_df(f3, n1.addr(), 1372).unwrap();
    ping_df(f3, n1.addr(), 1373).unwrap_err();
    // The far hosts really are behind a hop.
    let ttl = f2
        .exec(["ping", "-c1", "-W1", &n0.addr().to_string()])
        .unwrap();
    assert!(ttl.contains("ttl=63"), "{ttl}");
}

/// Run as non-root by `skips_or_fails_without_root`; as root it just passes.
#[test]
fn probe_requires_root() {
    require_root!();
    assert!(weft_tests::is_root());
}

#[test]
fn skips_or_fails_without_root() {
    require_root!();
    let exe = std::env::current_exe().unwrap();
    let run = |require: Option<&str>| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&exe)
            .args([
                "--exact",
                "probe_requires_root",
                "--nocapture",
                "--test-threads=1",
            ])
            .env_remove(weft_tests::REQUIRE_ROOT_ENV);
        if let Some(v) = require {
            cmd.env(weft_tests::REQUIRE_ROOT_ENV, v);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = run(None);
    assert!(ok, "{text}");
    assert!(
        text.contains("SKIP harness::probe_requires_root: needs root (run the tests as root"),
        "{text}"
    );
    assert!(text.contains("1 passed"), "{text}");
    let (ok, text) = run(Some("1"));
    assert!(!ok, "{text}");
    assert!(
        text.contains("WEFT_REQUIRE_ROOT_TESTS=1 forbids skipping"),
        "{text}"
    );
    assert!(text.contains("1 failed"), "{text}");
}
