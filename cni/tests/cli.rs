#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The plugin binary's answers to bad input, VERSION, STATUS and DEL,
//! without netd (or with the fake netd of `common`). Nothing here creates
//! any interface; the few tests that need a real second network namespace
//! need root and use a lab.

mod common;

use common::{conf, FakeNetd, Invocation, Mode};
use serde_json::json;

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const NO_NETD: &str = "/nonexistent/weft/netd.sock";

fn conf_str(version: &str, socket: &str) -> String {
    conf(version, socket).to_string()
}

#[test]
fn version_answers_in_each_version() {
    for v in VERSIONS {
        let run = Invocation::new("VERSION", json!({"cniVersion": v}).to_string()).run();
        run.ok();
        assert_eq!(
            run.json(),
            json!({"cniVersion": v, "supportedVersions": VERSIONS}),
            "{run:?}"
        );
    }
    // No, broken or unsupported input: the newest version answers.
    for stdin in [
        "",
        "not json",
        r#"{"cniVersion": "0.2.0"}"#,
        r#"{"cniVersion": "9.0.0"}"#,
    ] {
        let run = Invocation::new("VERSION", stdin).run();
        run.ok();
        assert_eq!(
            run.json(),
            json!({"cniVersion": "1.1.0", "supportedVersions": VERSIONS})
        );
    }
}

#[test]
fn malformed_config_is_code_6() {
    for cmd in ["ADD", "DEL", "CHECK", "GC", "STATUS"] {
        for stdin in ["", "{", "[1,2]", r#"{"cniVersion": 1, "name": "w"}"#] {
            let run = Invocation::new(cmd, stdin)
                .container("abc", "eth0")
                .netns("/nonexistent")
                .run();
            assert_eq!(run.error_code(), 6, "{cmd} {stdin:?}: {run:?}");
        }
    }
    // A broken prevResult is a decode error too.
    let mut c = conf("1.0.0", NO_NETD);
    c["prevResult"] = json!({"ips": [{"address": "not-an-ip"}]});
    let run = Invocation::new("DEL", c.to_string())
        .container("abc", "eth0")
        .run();
    assert_eq!(run.error_code(), 6, "{run:?}");
}

#[test]
fn missing_or_unknown_command_is_code_4() {
    let mut inv = Invocation::new("ADD", conf_str("1.0.0", NO_NETD));
    inv.command = None;
    let run = inv.run();
    assert_eq!(run.error_code(), 4);
    assert!(run.msg().contains("CNI_COMMAND"), "{run:?}");
    assert_eq!(run.json()["cniVersion"], "1.0.0");
    let run = Invocation::new("UPDATE", conf_str("0.4.0", NO_NETD)).run();
    assert_eq!(run.error_code(), 4);
    assert!(run.msg().contains("UPDATE"), "{run:?}");
}

#[test]
fn unsupported_version_is_code_1_and_lists_the_supported_ones() {
    for stdin in [
        json!({"cniVersion": "0.2.0", "name": "w", "type": "weft"}),
        json!({"cniVersion": "2.0.0", "name": "w", "type": "weft"}),
        json!({"name": "w", "type": "weft"}),
    ] {
        let run = Invocation::new("ADD", stdin.to_string())
            .container("abc", "eth0")
            .netns("/nonexistent")
            .run();
        assert_eq!(run.error_code(), 1, "{run:?}");
        assert!(
            run.msg().contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"),
            "{run:?}"
        );
    }
    // Commands newer than the configuration's version.
    let run = Invocation::new("CHECK", conf_str("0.3.1", NO_NETD))
        .container("abc", "eth0")
        .netns("/nonexistent")
        .run();
    assert_eq!(run.error_code(), 1, "{run:?}");
    for cmd in ["GC", "STATUS"] {
        let run = Invocation::new(cmd, conf_str("1.0.0", NO_NETD)).run();
        assert_eq!(run.error_code(), 1, "{cmd}: {run:?}");
        assert!(run.msg().contains("1.1.0"), "{run:?}");
    }
}

#[test]
fn invalid_config_values_are_code_7() {
    let mut c = conf("1.0.0", NO_NETD);
    c["runtimeConfig"] =
        json!({"portMappings": [{"hostPort": 80, "containerPort": 80, "protocol": "sctp"}]});
    let run = Invocation::new("ADD", c.to_string())
        .container("abc", "eth0")
        .netns("/nonexistent")
        .run();
    assert_eq!(run.error_code(), 7, "{run:?}");
    assert!(run.msg().contains("sctp"), "{run:?}");
    let run = Invocation::new(
        "ADD",
        json!({"cniVersion": "1.0.0", "type": "weft"}).to_string(),
    )
    .container("abc", "eth0")
    .netns("/nonexistent")
    .run();
    assert_eq!(run.error_code(), 7, "{run:?}");
    // GC never runs without the list of valid attachments.
    let run = Invocation::new("GC", conf_str("1.1.0", NO_NETD)).run();
    assert_eq!(run.error_code(), 7, "{run:?}");
    assert!(run.msg().contains("valid-attachments"), "{run:?}");
    // CHECK needs prevResult.
    let run = Invocation::new("CHECK", conf_str("1.0.0", NO_NETD))
        .container("abc", "eth0")
        .netns("/nonexistent")
        .run();
    assert_eq!(run.error_code(), 7, "{run:?}");
    assert!(run.msg().contains("prevResult"), "{run:?}");
}

#[test]
fn missing_environment_is_code_4() {
    let c = conf_str("1.0.0", NO_NETD);
    let cases: [(&str, Invocation, &str); 6] = [
        (
            "ADD",
            Invocation::new("ADD", c.clone()).netns("/x").args(""),
            "CNI_CONTAINERID",
        ),
        (
            "ADD",
            {
                let mut i = Invocation::new("ADD", c.clone()).container("abc", "eth0");
                i.ifname = None;
                i.netns("/x")
            },
            "CNI_IFNAME",
        ),
        (
            "ADD",
            Invocation::new("ADD", c.clone()).container("abc", "eth0"),
            "CNI_NETNS",
        ),
        ("DEL", Invocation::new("DEL", c.clone()), "CNI_CONTAINERID"),
        (
            "DEL",
            {
                let mut i = Invocation::new("DEL", c.clone()).container("abc", "eth0");
                i.ifname = None;
                i
            },
            "CNI_IFNAME",
        ),
        (
            "CHECK",
            {
                let mut i = Invocation::new("CHECK", c.clone()).container("abc", "eth0");
                i.stdin = json!({"cniVersion": "1.0.0", "name": "w", "prevResult": {}}).to_string();
                i
            },
            "CNI_NETNS",
        ),
    ];
    for (cmd, inv, var) in cases {
        let run = inv.run();
        assert_eq!(run.error_code(), 4, "{cmd}: {run:?}");
        assert!(run.msg().contains(var), "{cmd} should name {var}: {run:?}");
    }
}

#[test]
fn invalid_container_id_or_ifname_is_code_4() {
    let c = conf_str("1.0.0", NO_NETD);
    for (id, ifname, var) in [
        ("-abc", "eth0", "CNI_CONTAINERID"),
        ("a/b", "eth0", "CNI_CONTAINERID"),
        ("a b", "eth0", "CNI_CONTAINERID"),
        ("abc", "0123456789abcdef", "CNI_IFNAME"),
        ("abc", "eth 0", "CNI_IFNAME"),
        ("abc", "..", "CNI_IFNAME"),
        ("abc", "a/b", "CNI_IFNAME"),
    ] {
        for cmd in ["ADD", "DEL"] {
            let run = Invocation::new(cmd, c.clone())
                .container(id, ifname)
                .netns("/nonexistent")
                .run();
            assert_eq!(run.error_code(), 4, "{cmd} {id:?} {ifname:?}: {run:?}");
            assert!(run.msg().contains(var), "{run:?}");
        }
    }
}

#[test]
fn missing_or_bogus_netns_is_code_4() {
    let c = conf_str("1.0.0", NO_NETD);
    let run = Invocation::new("ADD", c.clone())
        .container("abc", "eth0")
        .netns("/var/run/netns/weft-cni-test-does-not-exist")
        .run();
    assert_eq!(run.error_code(), 4, "{run:?}");
    assert!(run.msg().contains("CNI_NETNS"), "{run:?}");
    assert!(run.msg().contains("does not exist"), "{run:?}");
    let file = tempfile::NamedTempFile::new().unwrap();
    let run = Invocation::new("ADD", c)
        .container("abc", "eth0")
        .netns(file.path())
        .run();
    assert_eq!(run.error_code(), 4, "{run:?}");
    assert!(run.msg().contains("not a network namespace"), "{run:?}");
}

#[test]
fn cni_args_unknown_keys_need_ignore_unknown() {
    let c = conf_str("1.0.0", NO_NETD);
    let run = Invocation::new("ADD", c.clone())
        .container("abc", "eth0")
        .netns("/nonexistent")
        .args("FOO=bar")
        .run();
    assert_eq!(run.error_code(), 4, "{run:?}");
    assert!(run.msg().contains("FOO"), "{run:?}");
    // With IgnoreUnknown=1 the arguments pass; the namespace is what fails.
    let run = Invocation::new("ADD", c)
        .container("abc", "eth0")
        .netns("/nonexistent")
        .args("IgnoreUnknown=1;FOO=bar;K8S_POD_NAME=web")
        .run();
    assert_eq!(run.error_code(), 4, "{run:?}");
    assert!(run.msg().contains("CNI_NETNS"), "{run:?}");
}

#[test]
fn status_reports_netd() {
    let run = Invocation::new("STATUS", conf_str("1.1.0", NO_NETD)).run();
    assert_eq!(run.error_code(), 50, "{run:?}");
    assert!(run.msg().contains("netd"), "{run:?}");
    let netd = FakeNetd::start();
    let run = Invocation::new("STATUS", conf("1.1.0", &netd.socket).to_string()).run();
    run.ok();
    assert_eq!(run.stdout, "");
    netd.set_mode(Mode::StoreDown);
    let run = Invocation::new("STATUS", conf("1.1.0", &netd.socket).to_string()).run();
    assert_eq!(run.error_code(), 50, "{run:?}");
}

#[test]
fn del_with_netd_down_is_try_again() {
    // Nothing exists for this container; but the address may still be held
    // by netd, so DEL cannot succeed until netd answers.
    let run = Invocation::new("DEL", conf_str("1.0.0", NO_NETD))
        .container("weft-cni-test-del-down", "eth0")
        .run();
    assert_eq!(run.error_code(), 11, "{run:?}");
    let netd = FakeNetd::start();
    netd.set_mode(Mode::TryAgain);
    let run = Invocation::new("DEL", conf("0.4.0", &netd.socket).to_string())
        .container("weft-cni-test-del-busy", "eth0")
        .run();
    assert_eq!(run.error_code(), 11, "{run:?}");
    assert_eq!(run.json()["cniVersion"], "0.4.0");
}

#[test]
fn del_of_unknown_container_succeeds() {
    let netd = FakeNetd::start();
    for v in VERSIONS {
        let mut c = conf(v, &netd.socket);
        c["prevResult"] = json!({"cniVersion": v});
        // No netns at all, a netns that is gone, or a half-made container.
        for netns in [None, Some("/var/run/netns/weft-cni-test-gone")] {
            let mut inv = Invocation::new("DEL", c.to_string())
                .container("weft-cni-test-unknown", "eth0")
                .args("IgnoreUnknown=1;K8S_POD_NAME=x");
            inv.netns = netns.map(str::to_string);
            let run = inv.run();
            run.ok();
            assert_eq!(run.stdout, "", "{run:?}");
        }
    }
    assert!(netd
        .requests()
        .iter()
        .all(|(m, p, _)| m == "DELETE" && p == "/v1/endpoints/weft-cni-test-unknown/eth0"));
}

#[test]
fn check_with_netd_down_is_try_again() {
    let mut c = conf("1.0.0", NO_NETD);
    c["prevResult"] = json!({"cniVersion": "1.0.0"});
    let run = Invocation::new("CHECK", c.to_string())
        .container("abc", "eth0")
        .netns("/nonexistent")
        .run();
    assert_eq!(run.error_code(), 11, "{run:?}");
}

#[test]
fn check_of_unknown_endpoint_fails() {
    let netd = FakeNetd::start();
    let mut c = conf("1.1.0", &netd.socket);
    c["prevResult"] = json!({"cniVersion": "1.1.0"});
    let run = Invocation::new("CHECK", c.to_string())
        .container("abc", "eth0")
        .netns("/nonexistent")
        .run();
    assert_eq!(run.error_code(), 104, "{run:?}");
    assert!(run.msg().contains("no endpoint"), "{run:?}");
}
