//! The policy CLI against a real netd: `netd policy apply` a TOML file,
//! read it back with `get` (TOML and JSON), edit it with `set`, ask
//! `check` what it decides and why, and see invalid documents refused with
//! the reason. Enforcement is tested in policy_enforce.rs and
//! policy_matrix.rs. Needs root (netd runs in a lab host).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use weft_api::client::ClientError;
use weft_api::{Action, ErrorKind, Policy, PolicyDoc, PutPolicy};
use weft_tests::weft::Netd;
use weft_tests::{Lab, LabOptions};

const POLICY: &str = r#"
default = "allow"

[stacks.shop]
within_stack = "allow"
linked = ["payments"]
ingress = "deny"

[stacks.payments]

[[rules]]
name = "web-to-api"
from = "shop/web"
to = "api"
ports = ["tcp/80", "udp/53"]
"#;

/// `POLICY` as the store holds it.
const POLICY_JSON: &str = r#"{"default":"allow","stacks":{"payments":{},"shop":{"within_stack":"allow","ingress":"deny","linked":["payments"]}},"rules":[{"name":"web-to-api","from":"shop/web","to":"api","ports":["tcp/80","udp/53"]}]}"#;

/// Runs `netd policy ARGS`; (success, stdout, stderr).
fn policy(netd: &Netd, args: &[&str]) -> (bool, String, String) {
    let mut argv = vec!["policy"];
    argv.extend_from_slice(args);
    let out = netd.cli(&argv).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(netd: &Netd, args: &[&str]) -> String {
    let (success, stdout, stderr) = policy(netd, args);
    assert!(success, "netd policy {args:?} failed: {stdout}{stderr}");
    stdout
}

fn stored(netd: &Netd) -> PolicyDoc {
    serde_json::from_str(&ok(netd, &["get", "--json"])).unwrap()
}

#[test]
fn apply_get_set_and_check_through_the_cli() {
    weft_tests::require_root!();
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let store = format!("sqlite:{}", lab.dir().join("store.db").display());
    let netd = Netd::start(&lab, 0, &store, &[]).unwrap();

    // Nothing stored: the default, allow everything.
    let doc = stored(&netd);
    assert_eq!((doc.policy, doc.revision), (Policy::default(), None));
    let out = ok(&netd, &["check", "a/x", "b/y", "tcp/80"]);
    assert!(
        out.contains("allow, decided by the cluster default"),
        "{out}"
    );

    // Apply a TOML file; get prints TOML that reads back as the same policy.
    let file = lab.dir().join("policy.toml");
    std::fs::write(&file, POLICY).unwrap();
    let out = ok(&netd, &["apply", file.to_str().unwrap()]);
    assert!(out.contains("policy applied"), "{out}");
    let want: Policy = serde_json::from_str(POLICY_JSON).unwrap();
    let doc = stored(&netd);
    assert_eq!(doc.policy, want);
    let applied = doc.revision.expect("a revision once stored");
    // get's TOML applies back to the same document.
    let toml_out = ok(&netd, &["get"]);
    assert!(
        toml_out.starts_with("# weft policy, revision "),
        "{toml_out}"
    );
    let again = lab.dir().join("again.toml");
    std::fs::write(&again, &toml_out).unwrap();
    ok(&netd, &["apply", again.to_str().unwrap()]);
    let doc = stored(&netd);
    assert_eq!(doc.policy, want);
    let first = doc.revision.unwrap();
    assert!(first > applied);

    // check explains each step that decides.
    let out = ok(&netd, &["check", "shop/web", "api", "tcp/80"]);
    assert!(
        out.contains("shop/web -> api tcp/80: allow, decided by rule \"web-to-api\" (rules[0])"),
        "{out}"
    );
    assert!(out.contains(&format!("revision {first}")), "{out}");
    let out = ok(&netd, &["check", "other/x", "shop/web", "udp/53"]);
    assert!(
        out.contains("deny, decided by the destination stack's ingress"),
        "{out}"
    );
    let out = ok(&netd, &["check", "payments/x", "shop/web"]);
    assert!(
        out.contains("(no port): allow, decided by linked stacks"),
        "{out}"
    );
    let verdict: serde_json::Value = serde_json::from_str(&ok(
        &netd,
        &["check", "shop/a", "shop/b", "tcp/1", "--json"],
    ))
    .unwrap();
    assert_eq!(verdict["decision"]["by"]["kind"], "within_stack");

    // set edits the stored document in place.
    ok(
        &netd,
        &["set", "default=deny", "stacks.shop.within_service=deny"],
    );
    let doc = stored(&netd);
    assert_eq!(doc.policy.default, Action::Deny);
    assert_eq!(doc.policy.stacks["shop"].within_service, Some(Action::Deny));
    assert_eq!(doc.policy.rules, want.rules);
    assert!(doc.revision.unwrap() > first);
    let out = ok(&netd, &["check", "a/x", "b/y", "tcp/80"]);
    assert!(
        out.contains("deny, decided by the cluster default"),
        "{out}"
    );

    // A dry run with a file leaves the stored policy alone.
    let out = ok(
        &netd,
        &[
            "check",
            "a/x",
            "b/y",
            "tcp/80",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("allow, decided by the cluster default"),
        "{out}"
    );

    // Invalid documents and edits are refused with the reason; nothing changes.
    let before = stored(&netd);
    let bad = lab.dir().join("bad.toml");
    std::fs::write(&bad, "[stacks.shop]\nlinked = [\"nowhere\"]\n").unwrap();
    let (success, _, stderr) = policy(&netd, &["apply", bad.to_str().unwrap()]);
    assert!(!success);
    assert!(
        stderr.contains("links \"nowhere\", which is not a stack"),
        "{stderr}"
    );
    let (success, _, stderr) = policy(&netd, &["set", "rules.x.from=shop"]);
    assert!(!success);
    assert!(stderr.contains("give both rules.x.from"), "{stderr}");
    let (success, _, stderr) = policy(&netd, &["check", "a b", "c"]);
    assert!(!success);
    assert!(stderr.contains("invalid party"), "{stderr}");
    assert_eq!(stored(&netd), before);

    // The API refuses the same on its own (the CLI checks before sending):
    // 400 with the reason, and 409 for a stale revision.
    let client = weft_api::client::Client::new(netd.socket());
    let mut invalid = before.policy.clone();
    invalid.rules.push(invalid.rules[0].clone());
    let err = client
        .put_policy(&PutPolicy {
            policy: invalid,
            expect_revision: None,
        })
        .unwrap_err();
    match err {
        ClientError::Api(e) => {
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
            assert!(e.message.contains("two rules are named"), "{}", e.message);
        }
        e => panic!("{e}"),
    }
    let err = client
        .put_policy(&PutPolicy {
            policy: Policy::default(),
            expect_revision: Some(first),
        })
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api(e) if e.kind == ErrorKind::Conflict),
        "{err}"
    );
    assert_eq!(stored(&netd), before);
}
