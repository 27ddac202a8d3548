//! Randomness from the kernel (getrandom(2), blocking only until the kernel's
//! pool is first initialised, which happens early in boot).

use std::io;

/// The kernel would not give random bytes.
#[derive(Debug, thiserror::Error)]
#[error("cannot get random bytes from the kernel (getrandom(2)): {0} (the kernel must be 3.17 or newer; a seccomp filter may block the call)")]
pub struct RandomError(#[source] pub io::Error);

impl From<RandomError> for io::Error {
    fn from(e: RandomError) -> io::Error {
        io::Error::new(e.0.kind(), e)
    }
}

/// Fills `buf` with random bytes.
pub fn fill(buf: &mut [u8]) -> Result<(), RandomError> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe a live, writable slice.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RandomError(e));
        }
        done += n as usize;
    }
    Ok(())
}

/// A random `u16`.
pub fn u16() -> Result<u16, RandomError> {
    let mut b = [0u8; 2];
    fill(&mut b)?;
    Ok(u16::from_ne_bytes(b))
}

/// A random `u32`.
pub fn u32() -> Result<u32, RandomError> {
    let mut b = [0u8; 4];
    fill(&mut b)?;
    Ok(u32::from_ne_bytes(b))
}

/// A random `u64`.
pub fn u64() -> Result<u64, RandomError> {
    let mut b = [0u8; 8];
    fill(&mut b)?;
    Ok(u64::from_ne_bytes(b))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fills_large_buffers_and_draws_differ() {
        // More than one getrandom call may be needed past 256 bytes.
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        fill(&mut a).unwrap();
        fill(&mut b).unwrap();
        assert_ne!(a, b);
        assert!(a.iter().any(|&x| x != 0));
        fill(&mut []).unwrap();
        let draws: std::collections::HashSet<u64> = (0..64).map(|_| u64().unwrap()).collect();
        assert_eq!(draws.len(), 64);
        let small: std::collections::HashSet<u16> = (0..64).map(|_| u16().unwrap()).collect();
        assert!(small.len() > 32);
        assert_ne!(u32().unwrap(), u32().unwrap());
    }

    #[test]
    fn error_converts_to_io_with_its_kind_and_advice() {
        let e: io::Error = RandomError(io::Error::from_raw_os_error(libc::ENOSYS)).into();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("getrandom"), "{e}");
    }
}
