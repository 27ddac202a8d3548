//! The traffic on a real lab (root, netd built: `cargo build -p weft-netd
//! -p weft-cni -p weft-dnsd`): two hosts, two probes each, 3 s of DNS and
//! flows, with a 300 ms outage of one probe's input
//! halfway: each flow into it has one gap covering it, nothing else is lost. Ignored by default (a lab and three netds
//! in a unit test run): `cargo test -p weft-bench traffic -- --ignored`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use weft_tests::weft::Netd;
use weft_tests::{Lab, LabOptions};

use super::{run_between, Ctx};
use crate::soak::timeline::{DnsSecond, FlowKind, Gap, Life, Recorder};
use crate::soak::Probe;

#[test]
#[ignore = "root lab test: cargo test -p weft-bench traffic -- --ignored"]
fn an_outage_is_one_gap_per_flow_kind_and_nothing_else_is_lost() {
    if !weft_tests::root_or_skip("an_outage_is_one_gap_per_flow_kind_and_nothing_else_is_lost") {
        return;
    }
    let lab = Lab::new(LabOptions::hosts(2)).expect("lab");
    let store = format!("sqlite:{}", lab.dir().join("store.db").display());
    let netds: Vec<Netd> = (0..2)
        .map(|h| Netd::start(&lab, h, &store, &[]).expect("netd"))
        .collect();
    let rec = Recorder::new();
    let mut probes = Vec::new();
    for (h, netd) in netds.iter().enumerate() {
        for k in 0..2 {
            let id = format!("smoke{h}{k}0000000000000");
            let container = lab.container(h, &format!("p{h}{k}")).expect("container");
            let addr = netd.attach(&container, &id).expect("attach");
            // No name given at ADD: dnsd names it by its short id.
            let life = Life {
                id,
                host: h,
                name: String::new(),
                service: None,
                stack: None,
                aliases: vec![],
                ports: vec![],
                addr: addr.parse().expect("address"),
                add_sent_ms: 0,
                added_ms: rec.now_ms(),
                del_sent_ms: None,
                deleted_ms: None,
                probe: true,
            };
            rec.with(|t| t.lives.push(life.clone()));
            probes.push(Probe { container, life });
        }
    }
    let stop = AtomicBool::new(false);
    let ctx = Ctx {
        rec: &rec,
        stop: &stop,
    };
    // Halfway, the last probe of host 1 (the far end of the flow from host
    // 0) drops everything it receives for 300 ms.
    let dropper = probes[3].container.clone();
    let rule = ["iptables", "-w", "INPUT", "-j", "DROP"];
    let with = |op: &str| {
        let mut argv = rule.to_vec();
        argv.insert(2, op);
        let before = rec.now_ms();
        dropper.exec(argv).expect("iptables in the probe");
        (before, rec.now_ms())
    };
    let mut outage = ((0, 0), (0, 0));
    std::thread::scope(|s| {
        let outage = &mut outage;
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(1_500));
            let down = with("-I");
            std::thread::sleep(Duration::from_millis(300));
            *outage = (down, with("-D"));
            std::thread::sleep(Duration::from_millis(1_500));
            stop.store(true, Ordering::Relaxed);
        });
        run_between(&ctx, &probes, 200, 1).expect("traffic");
    });
    // When the drop rule went in and out: (before, after) the command.
    let (down, up) = outage;
    let t = rec.snapshot();
    eprintln!("outage {down:?}..{up:?} ms; gaps {:?}", t.gaps);
    assert_eq!(t.stream_errors, vec![], "stream errors");
    // One gap per kind on the flow into the dropping probe, covering the
    // outage (TCP's retransmission may take a little longer); none on the
    // other flow.
    let into = format!("->{}", probes[3].life.id);
    for kind in [FlowKind::Ping, FlowKind::Udp, FlowKind::Tcp] {
        let g: Vec<&Gap> = t.gaps.iter().filter(|g| g.kind == kind).collect();
        assert_eq!(g.len(), 1, "{kind:?}: {g:?}");
        let end = g[0].end_ms.expect("the flow came back");
        assert!(g[0].flow.ends_with(&into), "{:?}", g[0]);
        assert!(
            down.0 <= g[0].start_ms + 30 && g[0].start_ms <= down.1,
            "{:?}",
            g[0]
        );
        assert!(up.0 <= end && end <= up.1 + 1_000, "{:?}", g[0]);
    }
    let sum = |f: fn(&DnsSecond) -> u64| -> u64 { t.dns_seconds.iter().map(f).sum() };
    let (sent, right, wrong, failed) = (
        sum(|d| d.sent),
        sum(|d| d.right),
        sum(|d| d.wrong),
        sum(|d| d.failed),
    );
    eprintln!("{sent} queries: {right} right, {wrong} wrong, {failed} failed");
    assert!(sent >= 600, "{sent} queries in 3.3 s at 200/s");
    assert_eq!(right + wrong + failed, sent);
    assert_eq!(wrong, 0, "{:#?}", t.dns_kept);
    // Only the dropping probe's queries in the outage failed (its
    // answers were dropped).
    assert!(failed > 0 && failed <= 25, "{failed} failed");
    for s in &t.dns_kept {
        assert_eq!(s.host, 1, "{s:?}");
        assert!(s.sent_ms + 1_000 >= down.0 && s.sent_ms <= up.1, "{s:?}");
    }
}
