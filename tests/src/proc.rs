//! CPU time from `/proc`, for tests and benches that measure what a
//! process or some of this process's threads spent: utime + stime read from
//! `stat(5)` (a process's `/proc/PID/stat`, a thread's
//! `/proc/self/task/TID/stat`), in clock ticks or seconds.

use std::io;

/// USER_HZ, the unit of `/proc` times (100 on Linux).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as f64
    } else {
        100.0
    }
}

/// The command name (`comm`, field 2) of the text of a `stat` file: what
/// stands between the first `(` and the last `)` (it may hold spaces and
/// parentheses itself).
pub fn stat_comm(stat: &str) -> Option<&str> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    stat.get(open + 1..close)
}

/// utime + stime (fields 14 and 15 of `stat(5)`), in ticks, of the text of
/// a `stat` file; `None` when it is not one.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    // The fields after the command name, which may hold spaces: state
    // (field 3) is index 0 here, utime and stime index 11 and 12.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// utime + stime of a process (all its threads, living and dead), in
/// ticks; `None` when it is gone or its `stat` cannot be read.
pub fn process_ticks(pid: u32) -> Option<u64> {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime, in ticks, of this process's living threads whose name
/// starts with `prefix`. A thread that ends while it is read is skipped; a
/// `stat` that cannot be parsed is an error.
pub fn thread_ticks(prefix: &str) -> io::Result<u64> {
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let path = task?.path().join("stat");
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        if !stat_comm(&stat).is_some_and(|c| c.starts_with(prefix)) {
            continue;
        }
        ticks += stat_ticks(&stat).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} has no utime and stime: {stat:?}", path.display()),
            )
        })?;
    }
    Ok(ticks)
}

/// CPU seconds used so far by this process's living threads whose name
/// starts with `prefix` (e.g. `weft-wg`: every WireGuard device thread).
pub fn thread_cpu_seconds(prefix: &str) -> io::Result<f64> {
    Ok(thread_ticks(prefix)? as f64 / clk_tck())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comm_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime ...
        let stat = "42 (weft-wg rx) 1) S 1 42 42 0 -1 4194560 10 0 0 0 7 5 0 0 20 0 3 0";
        assert_eq!(stat_comm(stat), Some("weft-wg rx) 1"));
        assert_eq!(stat_ticks(stat), Some(12));
        assert_eq!(stat_ticks("42 (x) S 1 2"), None);
        assert_eq!(stat_ticks("no parentheses"), None);
        assert_eq!(stat_comm("no parentheses"), None);
    }

    #[test]
    fn this_process_and_its_named_threads() {
        let me = process_ticks(std::process::id()).expect("our own stat");
        let busy = std::thread::Builder::new()
            .name("weft-proc-test".into())
            .spawn(|| {
                // Spin until this thread is charged a tick (10 ms of CPU).
                let t = std::time::Instant::now();
                let mut x = 0u64;
                while t.elapsed() < std::time::Duration::from_secs(10) {
                    for _ in 0..100_000 {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                    let ticks = thread_ticks("weft-proc-test").expect("our threads");
                    if ticks > 0 {
                        return ticks;
                    }
                }
                0
            })
            .expect("spawn");
        let ticks = busy.join().expect("join");
        assert!(ticks > 0, "a busy thread was charged no CPU in 10 s");
        assert!(process_ticks(std::process::id()).expect("our own stat") >= me);
        assert_eq!(thread_ticks("no-such-thread-name").expect("our threads"), 0);
        assert!(thread_cpu_seconds("no-such-thread-name").expect("our threads") == 0.0);
    }
}
