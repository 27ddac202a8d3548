//! The servers under test as processes: start one on a free loopback port,
//! read its CPU time, wait until it answers and check it answers every kind
//! of query right (with a minimal hand-made query, see [`ask`]).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::workload::{query_for, Kind, Service};

/// A server process, killed when dropped.
pub(super) struct Server {
    pub(super) name: &'static str,
    pub(super) port: u16,
    pub(super) child: Child,
}

impl Server {
    pub(super) fn spawn(name: &'static str, port: u16, cmd: &mut Command) -> Result<Server> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        crate::sys::register_child(child.id());
        Ok(Server { name, port, child })
    }

    pub(super) fn cpu_ticks(&self) -> Result<u64> {
        let pid = self.child.id();
        weft_tests::proc::process_ticks(pid)
            .with_context(|| format!("no utime and stime in /proc/{pid}/stat of {}", self.name))
    }

    pub(super) fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        crate::sys::unregister_child(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn free_port() -> Result<u16> {
    // Free for both UDP and TCP, as far as one can tell without holding it.
    for _ in 0..50 {
        let u = UdpSocket::bind("127.0.0.1:0")?;
        let port = u.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port on 127.0.0.1")
}

/// Asks `server` one query; (rcode, answer count).
fn ask(server: SocketAddr, name: &str, qtype: &str) -> Result<(u8, u16)> {
    let t: u16 = if qtype == "PTR" { 12 } else { 1 };
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in name.split('.') {
        q.push(l.len() as u8);
        q.extend(l.as_bytes());
    }
    q.push(0);
    q.extend(t.to_be_bytes());
    q.extend(1u16.to_be_bytes());
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.send_to(&q, server)?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf)?;
    if n < 12 || buf[0..2] != q[0..2] {
        bail!("bad answer");
    }
    Ok((buf[3] & 0xF, u16::from_be_bytes([buf[6], buf[7]])))
}

pub(super) fn wait_ready(s: &mut Server, plan: &[Service]) -> Result<()> {
    let probe = &plan[plan.len() - 1];
    let (name, t) = query_for(Kind::ContainerFqdn, probe, 1, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((0, n)) = ask(s.addr(), &name, t) {
            if n > 0 {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = s.child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = s.child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            bail!("{} exited ({status}): {err}", s.name);
        }
        if Instant::now() > deadline {
            bail!("{} does not answer {name}", s.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every kind of query gets the right kind of answer.
pub(super) fn check_answers(s: &Server, plan: &[Service]) -> Result<()> {
    for (i, svc) in plan.iter().enumerate().step_by(plan.len() / 7 + 1) {
        for kind in [
            Kind::ServiceFqdn,
            Kind::ServiceShort,
            Kind::ContainerFqdn,
            Kind::Ptr,
            Kind::NxDomain,
        ] {
            let (name, t) = query_for(kind, svc, i % 2, i as u64);
            let (rcode, answers) = ask(s.addr(), &name, t)?;
            let want_answers = match kind {
                Kind::ServiceFqdn | Kind::ServiceShort => 2,
                Kind::NxDomain => 0,
                _ => 1,
            };
            let want_rcode = if kind == Kind::NxDomain { 3 } else { 0 };
            if rcode != want_rcode || answers != want_answers {
                bail!(
                    "{} answers {name} {t} with rcode {rcode} and {answers} records (want {want_rcode}, {want_answers})",
                    s.name
                );
            }
        }
    }
    Ok(())
}

pub(super) fn dnsd_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no exe dir")?;
    let path = dir.join("dnsd");
    if !path.exists() {
        let release = dir.ends_with("release");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-p", "weft-dnsd", "--bin", "dnsd"]);
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().context("running cargo build")?;
        if !st.success() || !path.exists() {
            bail!(
                "no dnsd at {}: cargo build --release -p weft-dnsd",
                path.display()
            );
        }
    }
    Ok(path)
}
