//! Clocks: the wall clock as weft stores it in records (milliseconds since
//! the Unix epoch: records' `*_ms` fields), and the machine's boot clock,
//! which the embedded store's leases count in so that a wall clock jump
//! (an NTP step, an operator's `date -s`) expires nothing.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch; 0 for a clock before the
/// epoch, `u64::MAX` past what fits.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Milliseconds since the machine booted, counting suspend
/// (`CLOCK_BOOTTIME`): the same for every process on the machine, never
/// stepped by the wall clock. 0 if the clock cannot be read.
pub fn boot_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

/// This boot of the machine, as a number: the first 15 hex digits of
/// `/proc/sys/kernel/random/boot_id` (different after every boot), so a
/// [`boot_ms`] recorded before a reboot can be told from one after. `None`
/// where the file cannot be read.
pub fn boot_tag() -> Option<i64> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    parse_boot_tag(&text)
}

fn parse_boot_tag(text: &str) -> Option<i64> {
    let hex: String = text
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(15)
        .collect();
    if hex.len() < 15 {
        return None;
    }
    i64::from_str_radix(&hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_2020_and_moves_forward() {
        let a = now_ms();
        // 2020-01-01T00:00:00Z.
        assert!(a > 1_577_836_800_000, "{a}");
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(now_ms() > a);
    }

    #[test]
    fn boot_clock_moves_forward_and_the_boot_has_a_tag() {
        let a = boot_ms();
        assert!(a > 0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(boot_ms() > a);
        assert!(boot_tag().is_some_and(|t| t > 0));
    }

    #[test]
    fn boot_tag_is_the_first_15_hex_digits() {
        assert_eq!(
            parse_boot_tag("0123abcd-ef01-2345-6789-abcdef012345\n"),
            Some(0x0012_3abc_def0_1234)
        );
        assert_eq!(parse_boot_tag("short"), None);
    }
}
