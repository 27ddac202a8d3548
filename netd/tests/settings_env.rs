//! The layers in order, with real `WEFT_*` variables: built-in defaults <
//! TOML file < environment < flags. Its own test binary (one process), as
//! it sets environment variables.

use std::path::PathBuf;

use weft_model::TunnelBackend;
use weft_netd::config::{Config, Settings};
use weft_netd::install::CniSettings;
use weft_netd::layered::Overrides;

#[test]
fn defaults_then_file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("netd.toml");
    std::fs::write(
        &file,
        r#"
        bridge = "br-file"
        state_dir = "/tmp/from-file"
        [mesh]
        backend = "wireguard"
        vni = 1
        [dns]
        enabled = true
        ttl_secs = 7
        [cni]
        conf_name = "file.conflist"
        "#,
    )
    .unwrap();
    for (k, v) in [
        ("WEFT_BACKEND", "vxlan"),
        ("WEFT_VNI", "3"),
        ("WEFT_NO_DNS", "1"),
        ("WEFT_DNS_EXTRA_LISTEN", "127.0.0.1:5301,127.0.0.1:5302"),
        ("WEFT_CNI_WITH_PORTMAP", "true"),
        ("WEFT_CNI_CONF_NAME", "env.conflist"),
    ] {
        std::env::set_var(k, v);
    }
    let given = Overrides::<Settings>::parse_from(["--vni", "5"]).unwrap();
    let cni = Overrides::<CniSettings>::parse_from(["--with-tuning"]).unwrap();
    let c = Config::load(Some(&file), &given, Some(&cni)).unwrap();
    assert_eq!(c.bridge, "br-file", "file over default");
    assert_eq!(c.state_dir, PathBuf::from("/tmp/from-file"));
    assert_eq!(c.mesh.wg_port, 51820, "default where nobody says");
    assert_eq!(
        c.mesh.backend,
        TunnelBackend::Vxlan,
        "environment over file"
    );
    assert_eq!(c.mesh.vni, 5, "flag over environment");
    assert_eq!(c.dns, None, "WEFT_NO_DNS=1 turns off the file's DNS");
    assert_eq!(c.cni.conf_name, "env.conflist");
    assert!(c.cni.with_portmap && c.cni.with_tuning);

    std::env::set_var("WEFT_NO_DNS", "0");
    let given = Overrides::<Settings>::parse_from(["--vni", "5"]).unwrap();
    let c = Config::load(Some(&file), &given, None).unwrap();
    let dns = c.dns.expect("WEFT_NO_DNS=0 leaves DNS on");
    assert_eq!(dns.ttl.as_secs(), 7);
    assert_eq!(dns.extra_listen.len(), 2, "a comma-separated list");
    assert_eq!(
        c.cni.conf_name, "file.conflist",
        "no [cni] flags: the file's"
    );

    std::env::set_var("WEFT_VNI", "not-a-number");
    let e = Overrides::<Settings>::parse_from(Vec::<String>::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--vni"), "a bad variable names its setting: {e}");
    let e = Config::load(Some(&dir.path().join("missing.toml")), &given, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.toml"), "{e}");
}
