//! Machine facts and measurements shared by every part: statistics, CPU time
//! (system-wide from /proc/stat, per process from /proc/PID/stat through
//! `weft_tests::proc`), load
//! average, the "busy" rule, tool versions, dates, and cleanup on a signal.

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
pub use weft_tests::proc::clk_tck;
use weft_tests::proc::process_ticks;

/// One figure: every run's value and their median (`None` when no run
/// produced a value).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Fig {
    pub median: Option<f64>,
    pub runs: Vec<f64>,
}

impl Fig {
    pub fn push(&mut self, v: f64) {
        if v.is_finite() {
            self.runs.push(v);
            self.median = Some(median(&self.runs));
        }
    }

    pub fn get(&self) -> Option<f64> {
        self.median
    }
}

/// The median (the mean of the middle two for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The `p` quantile (0..=1) by nearest rank of a sorted copy.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i.min(s.len() - 1)]
}

/// System-wide CPU time from the first line of /proc/stat, in ticks:
/// (busy, total). Busy is user + nice + system + irq + softirq + steal, so
/// kernel networking done in softirq context (VXLAN, veth, bridge) counts.
pub fn cpu_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return (0, 0);
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    let total = busy + get(3) + get(4);
    (busy, total)
}

/// The name of a process (`comm`).
pub fn proc_comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// CPU seconds used between two samples: the whole machine, and the given
/// processes together.
pub struct CpuMeter {
    sys: (u64, u64),
    pids: Vec<u32>,
    procs: u64,
}

impl CpuMeter {
    pub fn start(pids: &[u32]) -> CpuMeter {
        CpuMeter {
            sys: cpu_ticks(),
            pids: pids.to_vec(),
            procs: pids.iter().filter_map(|&p| process_ticks(p)).sum(),
        }
    }

    /// (machine busy CPU seconds, the processes' CPU seconds).
    pub fn stop(&self) -> (f64, f64) {
        let (busy, _) = cpu_ticks();
        let procs: u64 = self.pids.iter().filter_map(|&p| process_ticks(p)).sum();
        let hz = clk_tck();
        (
            busy.saturating_sub(self.sys.0) as f64 / hz,
            procs.saturating_sub(self.procs) as f64 / hz,
        )
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().filter_map(|x| x.parse().ok());
    [
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
    ]
}

/// The share (0..=1) of the machine's CPU that was busy during `window`
/// while the bench itself does nothing: what others use.
pub fn background_cpu(window: Duration) -> f64 {
    let (b0, t0) = cpu_ticks();
    std::thread::sleep(window);
    let (b1, t1) = cpu_ticks();
    if t1 <= t0 {
        return 0.0;
    }
    (b1 - b0) as f64 / (t1 - t0) as f64
}

/// The busy rule: a part is flagged when the machine was more than this
/// busy (share of all CPUs) in the quiet window just before or just after it.
pub const BUSY_BACKGROUND: f64 = 0.25;

/// How the machine looked around one part of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartInfo {
    pub name: String,
    pub seconds: f64,
    pub load_before: [f64; 3],
    pub load_after: [f64; 3],
    /// Share of all CPUs busy in the quiet window before / after the part.
    pub background_cpu_before: f64,
    pub background_cpu_after: f64,
    pub busy: bool,
    pub error: Option<String>,
}

/// Runs one part between two quiet windows and records load and timing.
pub fn part<T>(
    name: &str,
    window: Duration,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> (PartInfo, Option<T>) {
    eprintln!("weft-bench: part {name}: starting");
    let load_before = loadavg();
    let bg_before = background_cpu(window);
    let t = Instant::now();
    let result = f();
    let seconds = t.elapsed().as_secs_f64();
    // The kernel deletes namespaces asynchronously: let it finish with the
    // lab before looking at what others use.
    std::thread::sleep(window / 2);
    let load_after = loadavg();
    let bg_after = background_cpu(window);
    let busy = bg_before > BUSY_BACKGROUND || bg_after > BUSY_BACKGROUND;
    let (value, error) = match result {
        Ok(v) => (Some(v), None),
        Err(e) => {
            eprintln!("weft-bench: part {name} failed: {e:#}");
            (None, Some(format!("{e:#}")))
        }
    };
    eprintln!(
        "weft-bench: part {name}: {seconds:.0} s, background CPU {:.0} % / {:.0} %{}",
        bg_before * 100.0,
        bg_after * 100.0,
        if busy { " (busy)" } else { "" }
    );
    (
        PartInfo {
            name: name.to_owned(),
            seconds,
            load_before,
            load_after,
            background_cpu_before: bg_before,
            background_cpu_after: bg_after,
            busy,
            error,
        },
        value,
    )
}

/// Today's date (UTC) as YYYY-MM-DD, and the time as an RFC 3339 string.
pub fn now_utc() -> (String, String) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    let date = format!("{y:04}-{m:02}-{d:02}");
    let time = format!(
        "{date}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    (date, time)
}

/// What the machine is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub memory_gib: f64,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        memory_gib: (kib / 1_048_576.0 * 10.0).round() / 10.0,
    }
}

/// Installed versions of the Debian packages the bench drives.
pub fn tool_versions() -> Vec<(String, String)> {
    let pkgs = [
        "iperf3",
        "iputils-ping",
        "wireguard-go",
        "wireguard-tools",
        "dnsperf",
        "dnsmasq-base",
        "unbound",
        "containernetworking-plugins",
    ];
    pkgs.iter()
        .map(|p| {
            let v = Command::new("dpkg-query")
                .args(["-W", "-f", "${Version}", p])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "not installed".into());
            (p.to_string(), v)
        })
        .collect()
}

/// The commit the binaries were built from (read-only git), `+dirty` when
/// the work tree has changes.
pub fn commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let mut c = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    if dirty {
        c.push_str("+dirty");
    }
    Some(c)
}

/// Whether `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Processes in the root namespace that a signal must not leave behind
/// (the DNS servers); the lab namespaces are swept by name.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

pub fn register_child(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
}

pub fn unregister_child(pid: u32) {
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != pid);
}

/// Directories outside the labs' temp dirs that a signal must not leave
/// behind (a throwaway etcd's data dir).
static DIRS: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());

pub fn register_dir(dir: &std::path::Path) {
    DIRS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(dir.to_owned());
}

pub fn unregister_dir(dir: &std::path::Path) {
    DIRS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|d| d != dir);
}

/// Where wireguard-go puts its UAPI sockets (it makes the directory).
pub const WIREGUARD_GO_SOCKETS: &str = "/run/wireguard";

/// On SIGINT/SIGTERM: kill registered children, delete this process's lab
/// namespaces (and everything running in them), their temp dirs, the
/// registered directories and wireguard-go sockets.
pub fn cleanup_after_signal() {
    for pid in CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        // SAFETY: kill(2) with a pid we started.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
    let mine = format!(
        "{}{}",
        weft_tests::naming::TAG,
        weft_tests::naming::base36(u64::from(std::process::id()), 5)
    );
    if let Ok(names) = weft_tests::list_netns() {
        // Containers first, then hosts, then the underlay.
        let mut names: Vec<String> = names.into_iter().filter(|n| n.starts_with(&mine)).collect();
        names.sort_by_key(|n| std::cmp::Reverse(n.len()));
        for n in names {
            let _ = weft_tests::Netns::named(n).destroy();
        }
    }
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        let tag = format!("weft-tests-{mine}");
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&tag) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    // After the namespaces: what ran in them no longer writes there.
    for dir in DIRS.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
    if let Ok(dir) = std::fs::read_dir(WIREGUARD_GO_SOCKETS) {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&mine) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        let mut f = Fig::default();
        f.push(f64::NAN);
        assert_eq!(f.get(), None);
        f.push(2.0);
        f.push(4.0);
        assert_eq!(f.get(), Some(3.0));
    }

    #[test]
    fn dates() {
        let (d, t) = now_utc();
        assert_eq!(d.len(), 10);
        assert!(t.starts_with(&d) && t.ends_with('Z'));
    }
}
