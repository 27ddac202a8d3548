//! A real CNI client: Debian's podman 4.3 with its CNI backend runs a
//! busybox container on the weft network (inside a lab host, next to netd).
//! Needs root, podman, runc and busybox-static (scripts/install-deps.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::symlink;
use std::path::Path;

use weft_tests::weft::{bin, Netd};
use weft_tests::{Lab, LabOptions};

/// A busybox-static root filesystem: `/bin/busybox` plus applet links.
fn busybox_rootfs(dir: &Path) {
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "run"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox-static is installed");
    for applet in [
        "sh", "ip", "cat", "ping", "sleep", "hostname", "nslookup", "wget",
    ] {
        symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
}

#[test]
fn podman_runs_a_container_on_weft() {
    weft_tests::require_root!();
    let podman = std::process::Command::new("podman")
        .arg("--version")
        .output();
    assert!(
        podman.as_ref().is_ok_and(|o| o.status.success()),
        "podman is not installed: run scripts/install-deps.sh"
    );
    // Declared first, dropped last: after every podman container is gone.
    let _podman_paths = weft_tests::MachinePaths::watch(weft_tests::MachinePaths::PODMAN);
    let lab = Lab::new(LabOptions::hosts(1)).unwrap();
    let netd = Netd::start(
        &lab,
        0,
        &format!("sqlite:{}", lab.dir().join("store.db").display()),
        &[],
    )
    .unwrap();
    let host = lab.host(0);
    let dir = lab.dir().join("podman");
    let rootfs = dir.join("rootfs");
    let cni_conf = dir.join("cni");
    let cni_bin = dir.join("cni-bin");
    std::fs::create_dir_all(&cni_conf).unwrap();
    std::fs::create_dir_all(&cni_bin).unwrap();
    busybox_rootfs(&rootfs);
    std::fs::copy(bin("weft").unwrap(), cni_bin.join("weft")).unwrap();
    std::fs::write(
        cni_conf.join("weft.conflist"),
        format!(
            r#"{{
  "cniVersion": "1.0.0",
  "name": "weft",
  "plugins": [
    {{"type": "weft", "socket": "{}", "capabilities": {{"portMappings": true, "aliases": true}}}}
  ]
}}"#,
            netd.socket().display()
        ),
    )
    .unwrap();
    // What podman 4.3 needs on this machine (see shared/notes/crates.md).
    let containers_conf = dir.join("containers.conf");
    std::fs::write(
        &containers_conf,
        format!(
            r#"[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
tmp_dir = "{}"
[network]
network_backend = "cni"
network_config_dir = "{}"
cni_plugin_dirs = ["{}", "/usr/lib/cni"]
"#,
            dir.join("tmp").display(),
            cni_conf.display(),
            cni_bin.display()
        ),
    )
    .unwrap();
    let podman = |args: &[&str]| {
        // nsenter, not `ip netns exec`: the latter remounts /sys, which
        // hides the cgroup mounts runc needs.
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", host.path().display()))
            .arg("podman")
            .arg(format!("--root={}", dir.join("root").display()))
            .arg(format!("--runroot={}", dir.join("runroot").display()))
            .args(["--cgroup-manager=cgroupfs", "--events-backend=file"])
            .args(args);
        cmd.env("CONTAINERS_CONF", &containers_conf);
        cmd.output().unwrap()
    };

    let rootfs_arg = rootfs.to_str().unwrap();
    let out = podman(&[
        "run",
        "--rm",
        "--name",
        "web-0",
        "--network",
        "weft",
        "--rootfs",
        rootfs_arg,
        "sh",
        "-c",
        "ip addr show eth0; cat /etc/resolv.conf",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "podman run failed: {stdout}\n{stderr}\nnetd:\n{}",
        netd.log()
    );
    assert!(
        stdout.contains("inet 10.42.0."),
        "no weft address:\n{stdout}"
    );
    assert!(
        stdout.contains("nameserver 169.254.169.250"),
        "no weft resolver:\n{stdout}"
    );
    // The container is gone, and podman's DEL released its address.
    let client = weft_api::client::Client::new(netd.socket());
    assert!(
        client.list_endpoints().unwrap().is_empty(),
        "{:?}",
        client.list_endpoints()
    );

    // A long-running one: netd knows it by the name podman passed.
    let out = podman(&[
        "run",
        "-d",
        "--name",
        "web-1",
        "--network",
        "weft",
        "--rootfs",
        rootfs_arg,
        "sleep",
        "60",
    ]);
    assert!(
        out.status.success(),
        "podman run -d: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let eps = client.list_endpoints().unwrap();
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(eps[0].name.as_deref(), Some("web-1"));
    host.exec(["ping", "-c1", "-W2", &eps[0].address.ip().to_string()])
        .unwrap();

    // Removing the container releases its address (podman calls DEL).
    let rm = podman(&["rm", "-f", "-t", "0", "web-1"]);
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    let eps = client.list_endpoints().unwrap();
    assert!(eps.is_empty(), "{eps:?}");
}
