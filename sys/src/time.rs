//! The wall clock as weft stores it: milliseconds since the Unix epoch
//! (records' `*_ms` fields, leases' expiry).

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch; 0 for a clock before the
/// epoch, `u64::MAX` past what fits.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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
}
