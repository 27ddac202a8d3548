//! Running weft itself in a lab: netd in a host namespace, the CNI plugin
//! invoked as a runtime would.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{Error, Lab, Netns, NsChild, Result};

static BUILD: Mutex<()> = Mutex::new(());

/// The path of one of weft's binaries (`netd`, `weft` = the CNI plugin) in
/// this build's target directory. Builds it (debug) if it is missing.
pub fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| Error::io("finding the test binary", e))?;
    // Tests run from target/<profile>/deps/, binaries (benches) from
    // target/<profile>/: the weft binaries are in target/<profile>/.
    let exe_dir = exe
        .parent()
        .ok_or_else(|| Error::Options(format!("unexpected binary path {}", exe.display())))?;
    let profile_dir = if exe_dir.ends_with("deps") {
        exe_dir.parent().unwrap_or(exe_dir)
    } else {
        exe_dir
    };
    let path = profile_dir.join(name);
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    if !path.exists() {
        let package = match name {
            "netd" => "weft-netd",
            "weft" => "weft-cni",
            "dnsd" => "weft-dnsd",
            other => return Err(Error::Options(format!("unknown weft binary {other}"))),
        };
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo.args(["build", "-p", package, "--bin", name]);
        if profile_dir.ends_with("release") {
            cargo.arg("--release");
        }
        let status = cargo
            .status()
            .map_err(|e| Error::io("running cargo build", e))?;
        if !status.success() || !path.exists() {
            return Err(Error::Options(format!(
                "cannot build {name} ({status}); run `cargo build --workspace` first"
            )));
        }
    }
    Ok(path)
}

/// A netd running in one lab host.
pub struct Netd {
    host: Netns,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<NsChild>,
}

impl Netd {
    /// Starts netd in host `index` of the lab with its state dir and socket
    /// under the lab's temp dir, the given store (`sqlite:PATH` or
    /// `etcd:URL`) and any extra flags; waits until it answers.
    pub fn start(lab: &Lab, index: usize, store: &str, extra: &[&str]) -> Result<Netd> {
        let host = lab.host(index).netns().clone();
        let dir = lab.dir().join(format!("netd-{index}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating the netd dir", e))?;
        let mut args = vec![
            "run".to_owned(),
            format!("--state-dir={}", dir.display()),
            format!("--socket={}", dir.join("netd.sock").display()),
            format!("--store={store}"),
            format!("--host-id=host{index}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut netd = Netd {
            host,
            dir,
            args,
            child: None,
        };
        netd.launch()?;
        Ok(netd)
    }

    fn launch(&mut self) -> Result<()> {
        // netd runs DNS as its child, the dnsd binary beside it.
        bin("dnsd")?;
        let bin = bin("netd")?;
        let mut argv = vec![bin.display().to_string()];
        argv.extend(self.args.iter().cloned());
        // A config file that does not exist at the default path is fine.
        let child = self.host.spawn(&argv)?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30))
    }

    /// Waits until the control socket answers a status request.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(out) = self.cli(&["status", "--json"]) {
                if out.status.success() {
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut() {
                if !child.is_running() {
                    return Err(Error::Options(format!(
                        "netd exited during start:\n{}",
                        child.stderr()
                    )));
                }
            }
            if Instant::now() > deadline {
                let log = self.child.as_ref().map(|c| c.stderr()).unwrap_or_default();
                return Err(Error::Options(format!(
                    "netd not ready after {timeout:?}:\n{log}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a netd CLI subcommand (status, endpoints, ...) against this netd.
    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        let bin = bin("netd")?;
        let mut argv = vec![bin.display().to_string()];
        argv.extend(args.iter().map(|s| s.to_string()));
        argv.push(format!("--socket={}", self.socket().display()));
        self.host.output(&argv)
    }

    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("netd.sock")
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host namespace netd runs in.
    pub fn host(&self) -> &Netns {
        &self.host
    }

    /// What netd has logged so far.
    pub fn log(&self) -> String {
        self.child.as_ref().map(|c| c.stderr()).unwrap_or_default()
    }

    /// SIGTERM and wait: the clean stop.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(child) = self.child.take() {
            let out = child.stop()?;
            if !out.status.success() {
                return Err(Error::Options(format!(
                    "netd did not stop cleanly ({}):\n{}",
                    out.status, out.stderr
                )));
            }
        }
        Ok(())
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = child.kill();
        }
    }

    /// Starts it again with the same settings (after `stop` or `kill`).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.launch()
    }

    /// Starts it again after `stop`/`kill` without waiting for readiness.
    pub fn start_again(&mut self) -> Result<()> {
        self.launch()
    }

    /// A CNI network config for this netd.
    pub fn cni_config(&self, version: &str) -> String {
        format!(
            r#"{{"cniVersion":"{version}","name":"weft","type":"weft","socket":"{}"}}"#,
            self.socket().display()
        )
    }
}

/// What one CNI plugin call returned.
#[derive(Debug)]
pub struct CniOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    /// The stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// The container's address in an ADD result: the first `ips` entry
    /// without its prefix length.
    pub fn address(&self) -> Result<Ipv4Addr> {
        self.json()["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                Error::CniResult(format!(
                    "no IPv4 address in ips[0].address (exit {}): {}{}",
                    self.code, self.stdout, self.stderr
                ))
            })
    }
}

/// Invokes the CNI plugin inside `host` as a runtime would.
pub struct CniCall<'a> {
    pub host: &'a Netns,
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
    pub args: &'a str,
    pub config: &'a str,
}

impl CniCall<'_> {
    /// Runs weft's plugin (the `type` in the config is not looked at).
    pub fn run(&self) -> Result<CniOutput> {
        let bin = bin("weft")?;
        let dir = bin
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        self.run_plugin(&bin, &dir)
    }

    /// Runs the plugin named by the config's `type` from `cni_path` (e.g.
    /// the reference plugins in /usr/lib/cni).
    pub fn run_with_path(&self, cni_path: &str) -> Result<CniOutput> {
        let config: serde_json::Value = serde_json::from_str(self.config)
            .map_err(|e| Error::Options(format!("CNI config is not JSON: {e}")))?;
        let kind = config["type"]
            .as_str()
            .ok_or_else(|| Error::Options("CNI config has no type".into()))?;
        let plugin = Path::new(cni_path).join(kind);
        self.run_plugin(&plugin, cni_path)
    }

    fn run_plugin(&self, bin: &Path, cni_path: &str) -> Result<CniOutput> {
        let mut cmd = self.host.command([bin.as_os_str()]);
        cmd.env("CNI_COMMAND", self.command)
            .env("CNI_CONTAINERID", self.container_id)
            .env("CNI_NETNS", self.netns)
            .env("CNI_IFNAME", self.ifname)
            .env("CNI_ARGS", self.args)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io("running the CNI plugin", e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(self.config.as_bytes())
                .map_err(|e| Error::io("writing CNI config", e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| Error::io("waiting for the CNI plugin", e))?;
        Ok(CniOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// Starts a TCP server on `port` in `ns` that answers every connection with
/// `<tag> <peer address>\n` and closes it (python3, present on Debian).
pub fn tcp_server(ns: &Netns, port: u16, tag: &str) -> Result<NsChild> {
    let script = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port}))\n\
         s.listen(64)\n\
         while True:\n\
         \x20   c, a = s.accept()\n\
         \x20   c.sendall(('{tag} ' + a[0] + '\\n').encode())\n\
         \x20   c.close()\n"
    );
    let child = ns.spawn(["python3", "-c", &script])?;
    // Wait until it listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = ns.output(["ss", "-ltnH", &format!("sport = :{port}")])?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(Error::Timeout(format!(
        "tcp server on port {port} in {}",
        ns.name()
    )))
}

/// Connects from `ns` to `addr:port` and returns the first line the server
/// sent (see [`tcp_server`]).
pub fn tcp_probe(ns: &Netns, addr: &str, port: u16) -> Result<String> {
    let script = format!(
        "import socket\n\
         s = socket.create_connection(('{addr}', {port}), timeout=3)\n\
         print(s.makefile().readline().strip())\n"
    );
    ns.exec(["python3", "-c", &script])
        .map(|s| s.trim().to_owned())
}

/// Sends `bytes` bytes over TCP from `from` to a sink on `to` (at `addr`,
/// `port`) that reads until EOF; returns what the sink counted and how long
/// the transfer took. Unlike iperf3's own counters, the count includes
/// every byte that arrived.
pub fn bulk_transfer(
    from: &Netns,
    to: &Netns,
    addr: &str,
    port: u16,
    bytes: u64,
) -> Result<(u64, Duration)> {
    let sink = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port}))\n\
         s.listen(1)\n\
         c, _ = s.accept()\n\
         n = 0\n\
         while True:\n\
         \x20   d = c.recv(1 << 20)\n\
         \x20   if not d:\n\
         \x20       break\n\
         \x20   n += len(d)\n\
         print(n, flush=True)\n\
         c.close()\n"
    );
    let mut server = to.spawn(["python3", "-c", &sink])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = to.output(["ss", "-ltnH", &format!("sport = :{port}")])?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!(
                "sink on port {port} in {}",
                to.name()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let source = format!(
        "import socket\n\
         s = socket.create_connection(('{addr}', {port}), timeout=60)\n\
         buf = b'w' * (1 << 18)\n\
         left = {bytes}\n\
         while left > 0:\n\
         \x20   n = min(left, len(buf))\n\
         \x20   s.sendall(buf[:n])\n\
         \x20   left -= n\n\
         s.shutdown(socket.SHUT_WR)\n\
         s.recv(1)\n"
    );
    let t = Instant::now();
    from.exec(["python3", "-c", &source])?;
    let status = server.wait_timeout(Duration::from_secs(60))?;
    let took = t.elapsed();
    if status.is_none() {
        return Err(Error::Timeout("the sink did not finish".into()));
    }
    let counted = server
        .stdout()
        .trim()
        .parse::<u64>()
        .map_err(|e| Error::Options(format!("sink output {:?}: {e}", server.stdout())))?;
    Ok((counted, took))
}

impl Netd {
    /// Attaches `container` through the CNI plugin (ADD, cniVersion 1.0.0,
    /// interface eth0, no metadata) and returns its address.
    pub fn attach(&self, container: &crate::Container, id: &str) -> Result<String> {
        let out = CniCall {
            host: self.host(),
            command: "ADD",
            container_id: id,
            netns: &container.path().display().to_string(),
            ifname: "eth0",
            args: "IgnoreUnknown=1",
            config: &self.cni_config("1.0.0"),
        }
        .run()?;
        if !out.ok() {
            return Err(Error::Options(format!(
                "CNI ADD {id} failed ({}): {}{}",
                out.code, out.stdout, out.stderr
            )));
        }
        Ok(out.address()?.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(stdout: &str) -> CniOutput {
        CniOutput {
            code: 0,
            stdout: stdout.to_owned(),
            stderr: String::new(),
        }
    }

    #[test]
    fn address_is_the_first_ip_without_its_prefix() {
        let out = output(
            r#"{"cniVersion":"1.0.0","ips":[{"address":"10.42.1.7/24","gateway":"10.42.1.1"}]}"#,
        );
        assert_eq!(out.address().unwrap(), Ipv4Addr::new(10, 42, 1, 7));
        for bad in ["{}", "not json", r#"{"ips":[{"address":"fd00::1/64"}]}"#] {
            let err = output(bad).address().unwrap_err().to_string();
            assert!(
                err.contains("no IPv4 address") && err.contains(bad),
                "{err}"
            );
        }
    }
}
