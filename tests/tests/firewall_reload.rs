//! Another program removes weft's firewall state while containers publish
//! ports and talk to each other: netd notices within seconds and restores
//! it (`netd/src/firewall.rs`), for both iptables backends. The faults, as
//! the soak injects them: weft's chains flushed (`iptables -F`), deleted
//! with their jumps (`-D`, `-F`, `-X`), a firewall reload that restores
//! each table without weft's lines (`iptables-save | grep -v WEFT |
//! iptables-restore`, as firewalld or ufw do), and `nft flush ruleset`.
//! Each must heal within 5 s (rules and traffic); the times are printed.
//! A foreign rule in a built-in chain and a foreign nf_tables table are
//! left alone. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use weft_tests::weft::{tcp_probe, tcp_server, Netd};
use weft_tests::{Lab, LabOptions, Netns};

/// How long a fault may take to heal.
const HEAL: Duration = Duration::from_secs(5);
const METRICS: &str = "127.0.0.1:9431";

/// A foreign rule in a built-in chain (another tool's).
const FOREIGN_RULE: &str =
    "-A INPUT -p tcp -m tcp --dport 9999 -m comment --comment foreign -j ACCEPT";

struct Ipt {
    iptables: &'static str,
    save: &'static str,
    restore: &'static str,
}

fn tools(backend: &str) -> Ipt {
    match backend {
        "legacy" => Ipt {
            iptables: "iptables-legacy",
            save: "iptables-legacy-save",
            restore: "iptables-legacy-restore",
        },
        _ => Ipt {
            iptables: "iptables-nft",
            save: "iptables-nft-save",
            restore: "iptables-nft-restore",
        },
    }
}

/// weft's iptables lines (chains, rules, hooks), in any order.
fn weft_lines(host: &Netns, ipt: &Ipt) -> BTreeSet<String> {
    host.exec([ipt.save])
        .unwrap()
        .lines()
        .filter(|l| l.contains("WEFT-") && !l.starts_with('#'))
        // Counters of declarations: `:WEFT-DNAT - [0:0]`.
        .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
        .collect()
}

/// weft's nf_tables tables (and the foreign one), as `family name`.
fn nft_tables(host: &Netns) -> BTreeSet<String> {
    host.exec(["nft", "list", "tables"])
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("table "))
        .map(str::to_owned)
        .collect()
}

/// Adds another tool's rule (`--dport port -m comment --comment foreign -j
/// ACCEPT`) to a built-in chain of the filter table; `place` is where, e.g.
/// `["-A", "INPUT"]` or `["-I", "FORWARD", "1"]`.
fn add_foreign_rule(host: &Netns, ipt: &Ipt, place: &[&str], proto: &str, port: &str) {
    let mut argv = vec![ipt.iptables, "-w"];
    argv.extend_from_slice(place);
    argv.extend(["-p", proto, "--dport", port]);
    argv.extend(["-m", "comment", "--comment", "foreign", "-j", "ACCEPT"]);
    host.exec(argv).unwrap();
}

fn count_foreign(host: &Netns, ipt: &Ipt) -> usize {
    host.exec([ipt.save])
        .unwrap()
        .lines()
        .filter(|l| *l == FOREIGN_RULE)
        .count()
}

fn metric(host: &Netns, series: &str) -> f64 {
    let out = host
        .exec(["curl", "-sf", &format!("http://{METRICS}/metrics")])
        .unwrap();
    out.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or_else(|| panic!("{series} not in\n{out}"))
}

/// Removes weft's state from `host` the way `fault` names.
fn inject(host: &Netns, ipt: &Ipt, fault: &str) {
    let tables = ["filter", "mangle", "nat"];
    match fault {
        "flush" => {
            for (t, c) in [("nat", "WEFT-DNAT"), ("filter", "WEFT-FORWARD")] {
                host.exec([ipt.iptables, "-w", "-t", t, "-F", c]).unwrap();
            }
        }
        "delete" => {
            let hooks = [
                ("filter", "INPUT", "WEFT-INPUT"),
                ("filter", "FORWARD", "WEFT-FORWARD"),
                ("mangle", "FORWARD", "WEFT-MSS"),
                ("nat", "PREROUTING", "WEFT-PREROUTING"),
                ("nat", "OUTPUT", "WEFT-OUTPUT"),
                ("nat", "POSTROUTING", "WEFT-POSTROUTING"),
            ];
            for (t, chain, target) in hooks {
                host.exec([ipt.iptables, "-w", "-t", t, "-D", chain, "-j", target])
                    .unwrap();
            }
            for t in tables {
                let chains: Vec<String> = host
                    .exec([ipt.iptables, "-w", "-t", t, "-S"])
                    .unwrap()
                    .lines()
                    .filter_map(|l| l.strip_prefix("-N WEFT-"))
                    .map(|c| format!("WEFT-{c}"))
                    .collect();
                for flag in ["-F", "-X"] {
                    for c in &chains {
                        host.exec([ipt.iptables, "-w", "-t", t, flag, c]).unwrap();
                    }
                }
            }
        }
        "reload" => {
            for t in tables {
                let saved = host.exec([ipt.save, "-t", t]).unwrap();
                let without: String = saved
                    .lines()
                    .filter(|l| !l.contains("WEFT"))
                    .map(|l| format!("{l}\n"))
                    .collect();
                let mut cmd = host.command([ipt.restore]);
                cmd.stdin(std::process::Stdio::piped());
                let mut child = cmd.spawn().unwrap();
                use std::io::Write as _;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(without.as_bytes())
                    .unwrap();
                assert!(child.wait().unwrap().success(), "{} failed", ipt.restore);
            }
        }
        "nft-flush-ruleset" => {
            host.exec(["nft", "flush", "ruleset"]).unwrap();
        }
        other => panic!("unknown fault {other}"),
    }
}

fn heals(backend: &str) {
    let lab = Lab::new(LabOptions::hosts(2)).unwrap();
    let (host, outside) = (lab.host(0), lab.host(1));
    let h = host.netns();
    let ipt = tools(backend);
    // Docker's FORWARD policy: without weft's FORWARD accept, containers
    // on the bridge (br_netfilter) and published ports are cut.
    h.exec([ipt.iptables, "-w", "-P", "FORWARD", "DROP"])
        .unwrap();
    let store = format!("sqlite:{}", lab.dir().join("store.db").display());
    let netd = Netd::start(
        &lab,
        0,
        &store,
        &[
            &format!("--iptables={backend}"),
            &format!("--metrics-addr={METRICS}"),
        ],
    )
    .unwrap();
    let a = lab.container(0, "a").unwrap();
    let b = lab.container(0, "b").unwrap();
    let cfg = format!(
        r#"{{"cniVersion":"1.0.0","name":"weft","type":"weft","socket":"{}","runtimeConfig":{{"portMappings":[{{"hostPort":8080,"containerPort":80,"protocol":"tcp"}}]}}}}"#,
        netd.socket().display()
    );
    let out = weft_tests::weft::CniCall {
        host: netd.host(),
        command: "ADD",
        container_id: "ctr-a",
        netns: &a.path().display().to_string(),
        ifname: "eth0",
        args: "IgnoreUnknown=1",
        config: &cfg,
    }
    .run()
    .unwrap();
    assert!(out.ok(), "ADD a: {} {}", out.stdout, out.stderr);
    let ip_b = netd.attach(&b, "ctr-b").unwrap();
    let _web = tcp_server(&a, 80, "web").unwrap();
    let _db = tcp_server(&b, 7000, "db").unwrap();
    let published = host.addr().to_string();
    let works = || {
        tcp_probe(outside, &published, 8080).is_ok_and(|s| s.starts_with("web "))
            && tcp_probe(&a, &ip_b, 7000).is_ok_and(|s| s.starts_with("db "))
    };
    assert!(works(), "traffic before any fault");

    // Another tool's rule in a built-in chain and its own table.
    add_foreign_rule(h, &ipt, &["-A", "INPUT"], "tcp", "9999");
    h.exec(["nft", "add", "table", "inet", "foreign"]).unwrap();
    h.exec([
        "nft",
        "add",
        "chain",
        "inet",
        "foreign",
        "in",
        "{ type filter hook input priority 10; policy accept; }",
    ])
    .unwrap();

    // The expected state, once netd settled (the balancer's table comes
    // once the store is listed).
    std::thread::sleep(Duration::from_secs(1));
    let want_ipt = weft_lines(h, &ipt);
    let want_nft = nft_tables(h);
    assert!(
        want_ipt.iter().any(|l| l.contains("--dport 8080")),
        "{want_ipt:?}"
    );
    for t in ["inet weft", "bridge weft", "inet foreign"] {
        assert!(want_nft.contains(t), "{t} not in {want_nft:?}");
    }
    let restores = |what: &str| {
        metric(
            h,
            &format!("weft_firewall_restores_total{{what=\"{what}\"}}"),
        )
    };
    assert_eq!((restores("iptables"), restores("nftables")), (0.0, 0.0));

    let mut incidents = (0.0, 0.0);
    for fault in ["flush", "delete", "reload", "nft-flush-ruleset"] {
        let flushes_nft = fault == "nft-flush-ruleset";
        inject(h, &ipt, fault);
        let injected = Instant::now();
        assert!(
            weft_lines(h, &ipt) != want_ipt || nft_tables(h) != want_nft,
            "{fault} removed nothing"
        );
        let mut rules_back = None;
        let mut traffic_back = None;
        while injected.elapsed() < HEAL {
            if rules_back.is_none() {
                let nft = nft_tables(h);
                let tables_back = want_nft
                    .iter()
                    .filter(|t| !(flushes_nft && *t == "inet foreign"))
                    .all(|t| nft.contains(t));
                if weft_lines(h, &ipt) == want_ipt && tables_back {
                    rules_back = Some(injected.elapsed());
                }
            }
            if rules_back.is_some() && works() {
                traffic_back = Some(injected.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (Some(rules), Some(traffic)) = (rules_back, traffic_back) else {
            panic!(
                "{backend}/{fault}: not healed within {HEAL:?} (rules back: {rules_back:?})\n\
                 iptables: {:?}\nwant {want_ipt:?}\nnft: {:?}\nnetd log:\n{}",
                weft_lines(h, &ipt),
                nft_tables(h),
                netd.log()
            )
        };
        println!(
            "firewall_reload {backend}/{fault}: weft's rules back after {} ms, traffic after {} ms",
            rules.as_millis(),
            traffic.as_millis()
        );
        // One incident counted per kind that was lost.
        let lost_nft = flushes_nft;
        let lost_ipt = !(flushes_nft && backend == "legacy");
        incidents.0 += f64::from(u8::from(lost_ipt));
        incidents.1 += f64::from(u8::from(lost_nft));
        assert_eq!(
            (restores("iptables"), restores("nftables")),
            incidents,
            "{backend}/{fault}: restores counted"
        );
        if !flushes_nft {
            assert_eq!(
                count_foreign(h, &ipt),
                1,
                "{fault}: the foreign rule stays, once"
            );
            assert!(nft_tables(h).contains("inet foreign"));
        }
    }

    // netd does not fight another tool: a foreign rule inserted above
    // weft's hook in a built-in chain after the restores stays, and no
    // further incident is counted.
    let above = "-A FORWARD -p udp -m udp --dport 9998 -m comment --comment foreign -j ACCEPT";
    add_foreign_rule(h, &ipt, &["-I", "FORWARD", "1"], "udp", "9998");
    std::thread::sleep(Duration::from_secs(5));
    let save = h.exec([ipt.save, "-t", "filter"]).unwrap();
    let forward: Vec<&str> = save
        .lines()
        .filter(|l| l.starts_with("-A FORWARD "))
        .collect();
    assert_eq!(forward.first(), Some(&above), "{save}");
    assert_eq!(forward.iter().filter(|l| **l == above).count(), 1, "{save}");
    assert_eq!(weft_lines(h, &ipt), want_ipt);
    assert_eq!(
        (restores("iptables"), restores("nftables")),
        incidents,
        "no restore without a fault"
    );
    let log = netd.log();
    let warned = log.matches("removed by another program").count();
    assert_eq!(warned, 4, "one warning per fault:\n{log}");
    assert!(works());
}

#[test]
fn heals_with_iptables_nft() {
    weft_tests::require_root!();
    heals("nft");
}

#[test]
fn heals_with_iptables_legacy() {
    weft_tests::require_root!();
    heals("legacy");
}
