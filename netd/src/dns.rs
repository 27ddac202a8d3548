//! DNS as netd's supervised child: the `dnsd` binary beside netd's own
//! executable, run in a session of its own, that outlives netd. dnsd
//! follows the store itself, so it needs nothing from netd while it runs;
//! netd's restarts (SIGTERM or SIGKILL) therefore cost DNS nothing.
//!
//! * Start ([`Dnsd::start`]): netd looks in /proc for the dnsd processes of
//!   this state dir (their command line names its pidfile) and decides
//!   ([`plan`], pure): a dnsd with exactly the command line netd would run,
//!   from the same binary, is adopted; otherwise a new one is started, and
//!   netd waits until it is ready (it writes its pid to the pidfile once
//!   its sockets are bound and its first table is in) before it SIGTERMs
//!   the others. dnsd binds with SO_REUSEPORT, so old and new overlap and
//!   no query goes unanswered.
//! * While netd runs ([`Dnsd::watch`]): the child is checked when it exits
//!   (a pidfd) and every [`CHECK_EVERY`], and started again if it died
//!   (`weft_dnsd_restarts_total`, one log line each).
//! * netd stopping leaves dnsd running, like the routes and rules;
//!   `netd teardown` and `[dns] enabled = false` stop it ([`stop_all`]).
//!
//! dnsd's stdout and stderr go to [`LOG_FILE`] in the state dir (never to
//! netd's: whoever reads netd's output until EOF must not wait for dnsd).
//! Its command line is built from netd's settings through
//! [`weft_dnsd::cli::DnsdArgs`], dnsd's own flag definitions; no `WEFT_*`
//! variable is passed on, so the command line is its whole configuration.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use prometheus_client::metrics::counter::Counter;

use crate::config::{Config, DnsSettings};

/// The binary's name, looked for beside netd's executable.
pub const DNSD_BIN: &str = "dnsd";
/// dnsd's pidfile in the state dir (written by dnsd when it is ready).
pub const PIDFILE: &str = "dnsd.pid";
/// dnsd's stdout and stderr, in the state dir (appended to).
pub const LOG_FILE: &str = "dnsd.log";
/// How often the child is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// How long a new dnsd may take to be ready (its first table waits up to
/// `weft_dnsd::DEFAULT_INITIAL_SYNC_TIMEOUT`).
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// SIGTERM, then SIGKILL after this long.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The dnsd netd wants running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub exe: PathBuf,
    /// The arguments after the program name.
    pub args: Vec<String>,
    pub pidfile: PathBuf,
    pub log: PathBuf,
}

impl Spec {
    /// The dnsd for netd's settings: the binary beside netd's executable.
    pub fn new(cfg: &Config, dns: &DnsSettings) -> anyhow::Result<Spec> {
        let netd = std::env::current_exe().context("finding netd's own executable")?;
        let dir = netd
            .parent()
            .with_context(|| format!("netd's executable {} has no directory", netd.display()))?;
        let exe = dir.join(DNSD_BIN);
        if !exe.is_file() {
            bail!(
                "no dnsd beside netd ({}): install the dnsd binary there, or turn DNS off \
                 (--no-dns, [dns] enabled = false)",
                exe.display()
            );
        }
        Ok(Spec::with_exe(exe, cfg, dns))
    }

    /// The spec with a given binary (pure: the command line from the
    /// settings).
    pub fn with_exe(exe: PathBuf, cfg: &Config, dns: &DnsSettings) -> Spec {
        let pidfile = pidfile(&cfg.state_dir);
        let mut listen = vec![std::net::SocketAddr::from((cfg.dns_addr, 53))];
        listen.extend(dns.extra_listen.iter().copied());
        let dns_cfg = weft_dnsd::DnsConfig {
            domain: cfg.domain.clone(),
            ttl: dns.ttl,
            listen,
            resolv_conf: dns.resolv_conf.clone(),
            keys: cfg.keys.clone(),
            cluster_range: cfg.ipam.cluster_range,
            service_range: cfg.ipam.service_range,
            upstream_timeout: dns.upstream_timeout,
            ..weft_dnsd::DnsConfig::default()
        };
        let mut args = weft_dnsd::cli::DnsdArgs::from_config(&dns_cfg, cfg.store.clone());
        args.metrics_addr = dns.metrics_addr;
        args.pidfile = Some(pidfile.clone());
        Spec {
            exe,
            args: args.to_args(),
            pidfile,
            log: cfg.state_dir.join(LOG_FILE),
        }
    }
}

/// The pidfile of the dnsd of the netd with this state dir.
pub fn pidfile(state_dir: &Path) -> PathBuf {
    state_dir.join(PIDFILE)
}

/// A dnsd process as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    /// Where /proc/PID/exe points (` (deleted)` when the binary was
    /// replaced since).
    pub exe: PathBuf,
    /// Its command line, program name first.
    pub argv: Vec<String>,
}

impl Proc {
    /// A dnsd of the netd whose pidfile is `pidfile`.
    fn belongs_to(&self, pidfile: &Path) -> bool {
        let flag = format!("--pidfile={}", pidfile.display());
        let name = self.exe.file_name().map(|n| n.to_string_lossy());
        let is_dnsd = name.is_some_and(|n| n.trim_end_matches(" (deleted)") == DNSD_BIN);
        is_dnsd && self.argv.contains(&flag)
    }

    /// Exactly what `spec` would run (a replaced binary is not).
    fn runs(&self, spec: &Spec) -> bool {
        self.exe == spec.exe && self.argv.get(1..) == Some(&spec.args[..])
    }
}

/// What to do with the dnsd processes found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Keep this one (`None`: start a new one).
    pub adopt: Option<u32>,
    /// Stop these (after the new one is ready).
    pub stop: Vec<u32>,
}

/// Decides, from the processes found and the pid in the pidfile, which
/// dnsd of this netd to keep: one that runs exactly `spec` (the one the
/// pidfile names first, it is known ready); every other one of this netd
/// is stopped. Processes of other netds (another pidfile) are left alone.
pub fn plan(spec: &Spec, found: &[Proc], pidfile_pid: Option<u32>) -> Plan {
    let ours: Vec<&Proc> = found
        .iter()
        .filter(|p| p.belongs_to(&spec.pidfile))
        .collect();
    let keep = ours
        .iter()
        .filter(|p| p.runs(spec))
        .min_by_key(|p| (Some(p.pid) != pidfile_pid, p.pid))
        .map(|p| p.pid);
    Plan {
        adopt: keep,
        stop: ours
            .iter()
            .map(|p| p.pid)
            .filter(|&p| Some(p) != keep)
            .collect(),
    }
}

/// The dnsd processes running now (any dnsd; [`plan`] picks this netd's).
pub fn scan() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(inspect)
        .collect()
}

/// Process `pid` if it is a live dnsd (zombies have no exe link).
fn inspect(pid: u32) -> Option<Proc> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let name = exe.file_name()?.to_string_lossy();
    if !name.starts_with(DNSD_BIN) {
        return None;
    }
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(Proc { pid, exe, argv })
}

/// The pid a pidfile holds.
fn read_pidfile(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The child as netd knows it.
#[derive(Debug)]
enum Running {
    /// Started by this netd (reaped by it).
    Child(Child),
    /// Found running and kept (another netd started it).
    Adopted(u32),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Child(c) => c.id(),
            Running::Adopted(p) => *p,
        }
    }
}

/// The supervised dnsd.
#[derive(Debug)]
pub struct Dnsd {
    spec: Spec,
    running: Mutex<Running>,
    restarts: Counter,
}

impl Dnsd {
    /// Adopts this netd's running dnsd if it runs `spec`, else starts one,
    /// waits until it is ready and stops the others (see the module docs).
    pub async fn start(spec: Spec, restarts: Counter) -> anyhow::Result<Arc<Dnsd>> {
        let s = spec.clone();
        let running = tokio::task::spawn_blocking(move || ensure(&s))
            .await
            .context("the dnsd start task")??;
        Ok(Arc::new(Dnsd {
            spec,
            running: Mutex::new(running),
            restarts,
        }))
    }

    /// The pid of the dnsd now supervised.
    pub fn pid(&self) -> u32 {
        self.lock().pid()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks the child every [`CHECK_EVERY`], and at once when it exits
    /// (a pidfd: an adopted dnsd is not netd's child), until `stop` fires,
    /// starting it again when it died. dnsd keeps running after.
    pub async fn watch(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let exited = exit_of(self.pid());
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
                _ = exited => {}
            }
            let me = self.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || me.check()).await {
                tracing::warn!(error = %format!("{e:#}"), log = %self.spec.log.display(),
                    "starting dnsd again failed; trying again in {CHECK_EVERY:?}");
            }
        }
    }

    /// Starts dnsd again if it died.
    fn check(&self) -> anyhow::Result<()> {
        let mut running = self.lock();
        let (pid, why) = match &mut *running {
            Running::Child(c) => match c.try_wait() {
                Ok(Some(status)) => (c.id(), status.to_string()),
                Ok(None) => return Ok(()),
                Err(e) => (c.id(), format!("cannot wait for it: {e}")),
            },
            Running::Adopted(pid) => match inspect(*pid) {
                Some(p) if p.belongs_to(&self.spec.pidfile) => return Ok(()),
                _ => (*pid, "gone".to_owned()),
            },
        };
        self.restarts.inc();
        tracing::warn!(pid, exit = %why, log = %self.spec.log.display(), "dnsd died; starting it again");
        *running = ensure(&self.spec)?;
        Ok(())
    }
}

/// Resolves when process `pid` exits (its pidfd turns readable), at once
/// if it is gone already; never where pidfds are missing (Linux < 5.3: the
/// periodic check remains).
async fn exit_of(pid: u32) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let Ok(id) = libc::pid_t::try_from(pid) else {
        return std::future::pending().await;
    };
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, id, 0) };
    if fd < 0 {
        if io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            return;
        }
        return std::future::pending().await;
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the AsyncFd owns the OwnedFd, which keeps the same open fd
    // until it is dropped with it.
    match unsafe { tokio::io::unix::AsyncFd::register(fd) } {
        Ok(fd) => {
            let _ = fd.readable().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// Adopt or start (then stop the others), blocking.
fn ensure(spec: &Spec) -> anyhow::Result<Running> {
    let plan = plan(spec, &scan(), read_pidfile(&spec.pidfile));
    let running = match plan.adopt {
        Some(pid) => {
            tracing::info!(pid, "dnsd already running with these settings; adopted");
            Running::Adopted(pid)
        }
        None => {
            let (child, took) = wait_ready(spec, spawn(spec)?)?;
            tracing::info!(pid = child.id(), ready_after = ?took, replaces = ?plan.stop,
                log = %spec.log.display(), "dnsd started");
            Running::Child(child)
        }
    };
    for pid in plan.stop {
        match terminate(pid) {
            Ok(()) => tracing::info!(pid, "stopped the dnsd it replaces"),
            Err(e) => tracing::warn!(pid, error = %e, "cannot stop an old dnsd"),
        }
    }
    Ok(running)
}

/// Starts `spec` in its own session, output to its log.
fn spawn(spec: &Spec) -> anyhow::Result<Child> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("opening dnsd's log {}", spec.log.display()))?;
    let err = log.try_clone().context("duplicating dnsd's log handle")?;
    let mut cmd = Command::new(&spec.exe);
    cmd.args(&spec.args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("WEFT_") {
            cmd.env_remove(key);
        }
    }
    // SAFETY: setsid is async-signal-safe and touches no memory of the
    // parent; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {}", spec.exe.display()))
}

/// Waits until `child` names itself in the pidfile (ready); kills it if it
/// is not ready in time.
fn wait_ready(spec: &Spec, mut child: Child) -> anyhow::Result<(Child, Duration)> {
    let t = Instant::now();
    loop {
        if read_pidfile(&spec.pidfile) == Some(child.id()) {
            return Ok((child, t.elapsed()));
        }
        if let Some(status) = child.try_wait().context("waiting for dnsd")? {
            bail!(
                "dnsd exited during start ({status}): {}",
                log_tail(&spec.log)
            );
        }
        if t.elapsed() > READY_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "dnsd not ready after {READY_TIMEOUT:?}: {}",
                log_tail(&spec.log)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The last lines of dnsd's log, for an error.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join("\n");
    format!("{} says:\n{tail}", path.display())
}

/// SIGTERM, up to [`STOP_GRACE`] to go, then SIGKILL.
fn terminate(pid: u32) -> io::Result<()> {
    let Ok(id) = i32::try_from(pid) else {
        return Ok(());
    };
    let signal = |sig| {
        // SAFETY: kill(2) has no memory-safety preconditions.
        if unsafe { libc::kill(id, sig) } == 0 {
            return Ok(());
        }
        match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            e => Err(e),
        }
    };
    signal(libc::SIGTERM)?;
    let deadline = Instant::now() + STOP_GRACE;
    while inspect(pid).is_some() {
        if Instant::now() > deadline {
            return signal(libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Stops every dnsd of the netd with this state dir (teardown, DNS turned
/// off) and removes its pidfile; how many were running.
pub async fn stop_all(state_dir: &Path) -> anyhow::Result<usize> {
    let pidfile = pidfile(state_dir);
    tokio::task::spawn_blocking(move || {
        let ours: Vec<u32> = scan()
            .into_iter()
            .filter(|p| p.belongs_to(&pidfile))
            .map(|p| p.pid)
            .collect();
        for &pid in &ours {
            terminate(pid).with_context(|| format!("stopping dnsd {pid}"))?;
            tracing::info!(pid, "stopped dnsd");
        }
        match std::fs::remove_file(&pidfile) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("removing dnsd's pidfile"),
        }
        Ok(ours.len())
    })
    .await
    .context("the dnsd stop task")?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        let mut cfg = Config::resolve(Default::default()).unwrap();
        cfg.state_dir = "/var/lib/weft".into();
        let dns = cfg.dns.clone().unwrap();
        Spec::with_exe("/usr/local/bin/dnsd".into(), &cfg, &dns)
    }

    fn proc(pid: u32, exe: &str, spec: &Spec) -> Proc {
        let mut argv = vec![exe.to_owned()];
        argv.extend(spec.args.iter().cloned());
        Proc {
            pid,
            exe: exe.into(),
            argv,
        }
    }

    #[test]
    fn the_command_line_comes_from_the_settings() {
        let s = spec();
        let argv = std::iter::once("dnsd".to_owned()).chain(s.args.iter().cloned());
        let args = <weft_dnsd::cli::DnsdArgs as clap::Parser>::try_parse_from(argv).unwrap();
        assert_eq!(args.listen, vec![weft_dnsd::DEFAULT_LISTEN]);
        assert_eq!(
            args.pidfile.as_deref(),
            Some(Path::new("/var/lib/weft/dnsd.pid"))
        );
        assert_eq!(args.store.to_string(), "sqlite:/var/lib/weft/store.db");
        assert_eq!(args.metrics_addr, None);
        assert_eq!(s.log, Path::new("/var/lib/weft/dnsd.log"));
    }

    #[test]
    fn a_dnsd_running_the_same_command_line_is_adopted() {
        let s = spec();
        let p = plan(&s, &[proc(10, "/usr/local/bin/dnsd", &s)], Some(10));
        assert_eq!(
            p,
            Plan {
                adopt: Some(10),
                stop: vec![]
            }
        );
        // Not yet in the pidfile (netd died while it started): kept too.
        let p = plan(&s, &[proc(10, "/usr/local/bin/dnsd", &s)], None);
        assert_eq!(p.adopt, Some(10));
    }

    #[test]
    fn other_settings_or_a_replaced_binary_mean_a_new_dnsd() {
        let s = spec();
        let mut changed = proc(10, "/usr/local/bin/dnsd", &s);
        for a in &mut changed.argv {
            if a.starts_with("--ttl=") {
                *a = "--ttl=5".into();
            }
        }
        let p = plan(&s, &[changed], Some(10));
        assert_eq!(
            p,
            Plan {
                adopt: None,
                stop: vec![10]
            }
        );
        let upgraded = proc(11, "/usr/local/bin/dnsd (deleted)", &s);
        assert_eq!(
            plan(&s, &[upgraded], Some(11)),
            Plan {
                adopt: None,
                stop: vec![11]
            }
        );
    }

    #[test]
    fn one_is_kept_the_pidfiles_first_and_the_rest_stopped() {
        let s = spec();
        let found = [
            proc(10, "/usr/local/bin/dnsd", &s),
            proc(12, "/usr/local/bin/dnsd", &s),
            proc(13, "/usr/local/bin/dnsd (deleted)", &s),
        ];
        assert_eq!(
            plan(&s, &found, Some(12)),
            Plan {
                adopt: Some(12),
                stop: vec![10, 13]
            }
        );
        assert_eq!(
            plan(&s, &found, None),
            Plan {
                adopt: Some(10),
                stop: vec![12, 13]
            }
        );
    }

    #[test]
    fn another_netds_dnsd_and_other_programs_are_left_alone() {
        let s = spec();
        let mut cfg = Config::resolve(Default::default()).unwrap();
        cfg.state_dir = "/srv/other".into();
        let dns = cfg.dns.clone().unwrap();
        let other = Spec::with_exe("/usr/local/bin/dnsd".into(), &cfg, &dns);
        let mut not_dnsd = proc(21, "/usr/bin/sleep", &s);
        not_dnsd.argv[0] = "sleep".into();
        let found = [proc(20, "/usr/local/bin/dnsd", &other), not_dnsd];
        assert_eq!(
            plan(&s, &found, None),
            Plan {
                adopt: None,
                stop: vec![]
            }
        );
    }
}
