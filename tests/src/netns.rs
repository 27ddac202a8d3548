//! Network namespaces: running commands in them, background processes, teardown.
//!
//! Everything shells out to iproute2: `ip netns exec NS ...` to run a program
//! inside a namespace (the program is exec'd by `ip`, so the pid we hold is the
//! program's own), `ip -n NS ...` to configure one from outside.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Where iproute2 keeps named network namespaces (`/run/netns` on systems where
/// `/var/run` is a link to `/run`).
pub const NETNS_DIR: &str = "/var/run/netns";

/// Serialises `ip netns add`: the very first one on a machine sets up the
/// `/run/netns` mount, and two racing first ones can stack two mounts.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// A named network namespace (`ip netns` style). This is only a name: dropping it
/// does nothing; the [`crate::Lab`] that created it deletes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Refers to an existing (or future) namespace by name, e.g. one made by hand.
    pub fn named(name: impl Into<String>) -> Self {
        Netns { name: name.into() }
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its file, `/var/run/netns/<name>`, what CNI calls `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// Whether the namespace exists (is listed by `ip netns list`).
    pub fn exists(&self) -> bool {
        self.path().exists()
    }

    /// A `Command` that runs `argv` inside the namespace
    /// (`ip netns exec <name> argv...`), for callers that need stdin, env or
    /// other settings. Nothing is run yet.
    pub fn command<I, S>(&self, argv: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.arg("netns").arg("exec").arg(&self.name);
        cmd.args(argv);
        cmd
    }

    /// Runs `argv` inside the namespace and returns its output whatever its exit
    /// status (check `status.success()` yourself). Fails only if it cannot be run.
    pub fn output<I, S>(&self, argv: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let argv = collect(argv);
        let mut cmd = self.command(&argv);
        cmd.stdin(Stdio::null());
        cmd.output().map_err(|source| Error::Spawn {
            netns: self.name.clone(),
            cmd: display(&argv),
            source,
        })
    }

    /// Runs `argv` inside the namespace; its standard output if it exits 0, else
    /// an [`Error::Command`] naming the command, the namespace and its stderr.
    pub fn exec<I, S>(&self, argv: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let argv = collect(argv);
        let out = self.output(&argv)?;
        check(&self.name, &display(&argv), out)
    }

    /// Runs `ip -n <name> args...`: iproute2 from outside, talking netlink to this
    /// namespace (cheaper than `exec`, no mount namespace). Standard output on
    /// success.
    pub fn ip<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut argv: Vec<OsString> = vec!["-n".into(), self.name.clone().into()];
        argv.extend(collect(args));
        run_ip(&self.name, &argv)
    }

    /// Starts `argv` inside the namespace in the background. Its stdout and stderr
    /// go to anonymous temporary files (read them any time with
    /// [`NsChild::stdout`]); stdin is `/dev/null`. The process (and its process
    /// group) is killed when the handle is dropped.
    pub fn spawn<I, S>(&self, argv: I) -> Result<NsChild>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let argv = collect(argv);
        let cmd_str = display(&argv);
        let out = tempfile::tempfile().map_err(|e| Error::io("creating a temp file", e))?;
        let err = tempfile::tempfile().map_err(|e| Error::io("creating a temp file", e))?;
        let out_w = out
            .try_clone()
            .map_err(|e| Error::io("cloning a temp file", e))?;
        let err_w = err
            .try_clone()
            .map_err(|e| Error::io("cloning a temp file", e))?;
        let mut cmd = self.command(&argv);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w))
            .process_group(0);
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            netns: self.name.clone(),
            cmd: cmd_str.clone(),
            source,
        })?;
        Ok(NsChild {
            child,
            netns: self.name.clone(),
            cmd: cmd_str,
            stdout: out,
            stderr: err,
            status: None,
        })
    }

    /// The pids of all processes inside the namespace (`ip netns pids`).
    pub fn pids(&self) -> Result<Vec<u32>> {
        let out = run_ip(&self.name, ["netns", "pids", self.name.as_str()])?;
        Ok(out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// SIGKILLs every process inside the namespace, repeatedly until none is
    /// left (or 2 seconds have passed).
    pub fn kill_all(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "processes {pids:?} in netns {} survive SIGKILL",
                    self.name
                )));
            }
            for pid in pids {
                // A pid that vanished in between is fine; anything else shows up
                // again in the next round.
                let _ = send_signal(pid as i32, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The names of the interfaces inside the namespace (`lo`, `eth0`, ...).
    pub fn links(&self) -> Result<Vec<String>> {
        let out = self.ip(["-o", "link", "show"])?;
        Ok(parse_link_names(&out))
    }

    /// The MTU of interface `dev` in the namespace.
    pub fn link_mtu(&self, dev: &str) -> Result<u32> {
        let out = self.ip(["-o", "link", "show", "dev", dev])?;
        let mut words = out.split_whitespace();
        while let Some(w) = words.next() {
            if w == "mtu" {
                if let Some(v) = words.next().and_then(|v| v.parse().ok()) {
                    return Ok(v);
                }
            }
        }
        Err(Error::Command {
            netns: self.name.clone(),
            cmd: format!("ip -o link show dev {dev}"),
            status: "no mtu in output".into(),
            stdout: out,
            stderr: String::new(),
        })
    }

    /// Creates the namespace (`ip netns add`); fails if it exists already.
    pub(crate) fn create(name: &str) -> Result<Netns> {
        let _guard = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
        run_ip(name, ["netns", "add", name])?;
        Ok(Netns::named(name))
    }

    /// Kills every process inside, then deletes the namespace (which destroys the
    /// interfaces in it, and the veth peers of those). Deleting one that is
    /// already gone is not an error.
    pub fn destroy(&self) -> Result<()> {
        if !self.exists() {
            return Ok(());
        }
        let killed = self.kill_all();
        let mut last = None;
        for _ in 0..5 {
            match run_ip(&self.name, ["netns", "del", self.name.as_str()]) {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(_) if !self.exists() => {
                    last = None;
                    break;
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        match last {
            Some(e) => Err(e),
            None => killed,
        }
    }
}

impl std::fmt::Display for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Runs `f` on a new thread that has entered the network namespace at
/// `netns` (a path such as [`Netns::path`]); the calling thread never moves.
/// Sockets and devices `f` creates stay in that namespace whichever thread
/// uses them later. Panics (this is test code) if the namespace cannot be
/// entered, and passes a panic of `f` on.
pub fn in_netns<T: Send>(netns: impl AsRef<std::path::Path>, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    let path = netns.as_ref();
    let file = File::open(path)
        .unwrap_or_else(|e| panic!("opening network namespace {}: {e}", path.display()));
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) on a namespace fd that stays open for the
            // call; it changes only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns into {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Names of all named network namespaces (the entries of [`NETNS_DIR`]).
pub fn list_netns() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {NETNS_DIR}"), e)),
    };
    let mut names = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|e| Error::io(format!("listing {NETNS_DIR}"), e))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Interface names from `ip -o link show` output (`2: eth0@if3: <...> ...`).
pub(crate) fn parse_link_names(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|line| {
            let name = line.split(": ").nth(1)?;
            let name = name.split('@').next()?;
            Some(name.trim().to_string())
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// Runs `ip args...` (from the root namespace's point of view only as a
/// netlink/`ip netns` client); `label` names the namespace it concerns.
pub(crate) fn run_ip<I, S>(label: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut argv: Vec<OsString> = vec!["ip".into()];
    argv.extend(collect(args));
    let out = Command::new("ip")
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            netns: label.to_string(),
            cmd: display(&argv),
            source,
        })?;
    check(label, &display(&argv), out)
}

fn check(netns: &str, cmd: &str, out: Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    Err(Error::Command {
        netns: netns.to_string(),
        cmd: cmd.to_string(),
        status: out.status.to_string(),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn collect<I, S>(argv: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    argv.into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect()
}

fn display(argv: &[OsString]) -> String {
    argv.iter()
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sends `sig` to `pid` (a negative pid means a process group). A process that
/// is already gone is not an error.
pub(crate) fn send_signal(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        return Ok(());
    }
    Err(Error::io(format!("kill({pid}, {sig})"), e))
}

/// Whether a process with this pid exists (zombies included).
pub(crate) fn pid_alive(pid: u32) -> bool {
    pid != 0 && PathBuf::from(format!("/proc/{pid}")).exists()
}

/// How a background process ended and what it said.
#[derive(Debug, Clone)]
pub struct ChildOutput {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to standard output.
    pub stdout: String,
    /// Everything it wrote to standard error.
    pub stderr: String,
}

/// A process running in a namespace, started by [`Netns::spawn`]. It leads its own
/// process group; dropping the handle SIGKILLs the group and reaps the process.
#[derive(Debug)]
pub struct NsChild {
    child: Child,
    netns: String,
    cmd: String,
    stdout: File,
    stderr: File,
    status: Option<ExitStatus>,
}

fn read_file(f: &File) -> String {
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], done as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => done += n,
        }
    }
    buf.truncate(done);
    String::from_utf8_lossy(&buf).into_owned()
}

impl NsChild {
    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The namespace it runs in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Its command line.
    pub fn cmd(&self) -> &str {
        &self.cmd
    }

    /// What it has written to standard output so far.
    pub fn stdout(&self) -> String {
        read_file(&self.stdout)
    }

    /// What it has written to standard error so far.
    pub fn stderr(&self) -> String {
        read_file(&self.stderr)
    }

    /// Its exit status if it has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|e| Error::io(format!("waiting for `{}`", self.cmd), e))?;
        }
        Ok(self.status)
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for it to exit; `None` if it is still running then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends signal `sig` (e.g. [`crate::signal::SIGINT`]) to its process group. Does nothing
    /// once it has been reaped.
    pub fn signal(&self, sig: i32) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        let pid = i32::try_from(self.child.id())
            .map_err(|_| Error::Options(format!("pid {} out of range", self.child.id())))?;
        send_signal(-pid, sig)
    }

    /// Stops it politely: SIGTERM, up to 5 s to exit, then SIGKILL. Returns how it
    /// ended and everything it wrote (tcpdump, for one, flushes on SIGTERM).
    pub fn stop(self) -> Result<ChildOutput> {
        self.stop_with(libc::SIGTERM, Duration::from_secs(5))
    }

    /// Sends `sig`, waits up to `grace` for it to exit, then SIGKILLs it.
    pub fn stop_with(mut self, sig: i32, grace: Duration) -> Result<ChildOutput> {
        if self.try_wait()?.is_none() {
            self.signal(sig)?;
            if self.wait_timeout(grace)?.is_none() {
                self.signal(libc::SIGKILL)?;
            }
        }
        self.finish()
    }

    /// SIGKILLs it and returns how it ended and what it wrote.
    pub fn kill(mut self) -> Result<ChildOutput> {
        self.signal(libc::SIGKILL)?;
        self.finish()
    }

    /// Waits (without a time limit) for it to exit by itself.
    pub fn wait(mut self) -> Result<ChildOutput> {
        self.finish()
    }

    fn finish(&mut self) -> Result<ChildOutput> {
        let status = match self.status {
            Some(st) => st,
            None => {
                let st = self
                    .child
                    .wait()
                    .map_err(|e| Error::io(format!("waiting for `{}`", self.cmd), e))?;
                self.status = Some(st);
                st
            }
        };
        Ok(ChildOutput {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        })
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Polls `cond` every 20 ms until it returns true or `timeout` passes; then
/// [`Error::Timeout`] with `what` in the message.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout(format!("{what} (after {timeout:?})")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names() {
        let out = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n\
                   2: eth0@if3: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP\n";
        assert_eq!(parse_link_names(out), vec!["lo", "eth0"]);
    }

    #[test]
    fn display_quotes() {
        let argv: Vec<OsString> = vec!["sh".into(), "-c".into(), "echo hi".into()];
        assert_eq!(display(&argv), "sh -c 'echo hi'");
    }
}
