//! Handing the allocator's free memory back to the kernel.
//!
//! glibc keeps memory freed by a thread in that thread's arena; after a burst
//! (netd applying thousands of hosts: records parsed, a route dump, the peer
//! table rebuilt) it stays in the process's RSS although nothing uses it.
//! Measured on netd with 5,000 peers a minute after the burst: 47.7 MB RSS,
//! 39.2 MB after one `malloc_trim(0)`.

/// Returns the allocator's free pages to the kernel (glibc's
/// `malloc_trim(0)`, every arena; a few milliseconds). Nothing elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only walks and trims the
    // allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn freed_memory_can_be_released() {
        // Many small blocks, freed: trimming must not disturb live ones.
        let keep: Vec<Vec<u8>> = (0..1000).map(|i| vec![i as u8; 64]).collect();
        let churn: Vec<Vec<u8>> = (0..100_000).map(|i| vec![i as u8; 100]).collect();
        drop(churn);
        super::release_free_memory();
        assert!(keep
            .iter()
            .enumerate()
            .all(|(i, v)| v.iter().all(|&b| b == i as u8)));
    }
}
