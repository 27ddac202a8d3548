//! The wall clock jump: the machine's CLOCK_REALTIME moved ahead, then set
//! back to the true time. The true time is kept as the offset between
//! CLOCK_REALTIME and CLOCK_MONOTONIC taken before the jump, so the restore
//! is right however long the jump lasted; [`ClockJump`] restores it on drop,
//! so a panic in between still leaves the machine on the right time.

use std::io;
use std::time::Duration;

/// Nanoseconds on `clock`.
fn now_ns(clock: libc::clockid_t) -> io::Result<i128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid `ts`.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
}

fn set_realtime_ns(ns: i128) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns.div_euclid(1_000_000_000)) as libc::time_t,
        tv_nsec: (ns.rem_euclid(1_000_000_000)) as libc::c_long,
    };
    // SAFETY: clock_settime reads one valid timespec.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A jump in progress; the true time comes back with [`ClockJump::restore`]
/// or on drop.
pub struct ClockJump {
    /// CLOCK_REALTIME - CLOCK_MONOTONIC before the jump.
    offset_ns: i128,
    restored: bool,
}

impl ClockJump {
    /// Moves the wall clock `by` ahead (needs CAP_SYS_TIME).
    pub fn ahead(by: Duration) -> io::Result<ClockJump> {
        let mono = now_ns(libc::CLOCK_MONOTONIC)?;
        let real = now_ns(libc::CLOCK_REALTIME)?;
        // Nothing to put back if the jump itself fails.
        let mut jump = ClockJump {
            offset_ns: real - mono,
            restored: true,
        };
        set_realtime_ns(now_ns(libc::CLOCK_REALTIME)? + by.as_nanos() as i128)?;
        jump.restored = false;
        Ok(jump)
    }

    /// Sets the wall clock back to the true time (monotonic + the offset).
    pub fn restore(mut self) -> io::Result<()> {
        self.put_back()
    }

    fn put_back(&mut self) -> io::Result<()> {
        if self.restored {
            return Ok(());
        }
        set_realtime_ns(now_ns(libc::CLOCK_MONOTONIC)? + self.offset_ns)?;
        self.restored = true;
        Ok(())
    }
}

impl Drop for ClockJump {
    fn drop(&mut self) {
        if let Err(e) = self.put_back() {
            eprintln!(
                "soak: CANNOT SET THE WALL CLOCK BACK: {e}; fix it by hand (e.g. chronyc makestep)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::now_ns;

    #[test]
    fn clocks_read() {
        let a = now_ns(libc::CLOCK_MONOTONIC).unwrap();
        let b = now_ns(libc::CLOCK_MONOTONIC).unwrap();
        assert!(b >= a);
        // After 2001.
        assert!(now_ns(libc::CLOCK_REALTIME).unwrap() > 1_000_000_000 * 1_000_000_000);
    }
}
