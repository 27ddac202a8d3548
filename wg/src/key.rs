//! The host's WireGuard key pair and its file.

use std::fs::{self, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use boringtun::x25519;

use super::error::WgError;

/// Name of the private key file inside the state directory.
pub const KEY_FILE: &str = "wg.key";

/// A Curve25519 key pair. `Debug` never shows the private key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    private: [u8; 32],
    public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public_base64())
            .field("private", &"<redacted>")
            .finish()
    }
}

impl KeyPair {
    /// The pair for a private key (clamped as WireGuard does).
    pub fn from_private(private: [u8; 32]) -> KeyPair {
        let private = clamp(private);
        let public = public_key(&private);
        KeyPair { private, public }
    }

    /// A new random key pair from the kernel's random source.
    pub fn generate() -> Result<KeyPair, WgError> {
        let mut k = [0u8; 32];
        weft_sys::random::fill(&mut k)?;
        Ok(KeyPair::from_private(k))
    }

    /// The private key (handle with care: never log it).
    pub fn private_key(&self) -> [u8; 32] {
        self.private
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// The public key in WireGuard's base64 form (what `wg pubkey` prints).
    pub fn public_base64(&self) -> String {
        key_to_base64(&self.public)
    }
}

/// The public key of a private key.
pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
    let secret = x25519::StaticSecret::from(*private);
    x25519::PublicKey::from(&secret).to_bytes()
}

/// A key in WireGuard's base64 form.
pub fn key_to_base64(key: &[u8; 32]) -> String {
    B64.encode(key)
}

/// Parses a key in WireGuard's base64 form (44 characters).
pub fn key_from_base64(text: &str) -> Result<[u8; 32], WgError> {
    let bytes = B64
        .decode(text.trim())
        .map_err(|e| WgError::KeyText(format!("not base64: {e}")))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| WgError::KeyText(format!("{} bytes instead of 32", bytes.len())))
}

fn clamp(mut k: [u8; 32]) -> [u8; 32] {
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    k
}

/// Loads the host's private key from `<state_dir>/wg.key`, or creates it (a
/// new random key, base64, mode 0600) if there is none. Creation is atomic:
/// the key is written to a temporary file and linked into place, so a crash
/// never leaves a half-written key and two racing daemons end up with the
/// same key. A key file readable by others is tightened to 0600 with a
/// warning.
pub fn load_or_create_key(state_dir: &Path) -> Result<KeyPair, WgError> {
    let path = state_dir.join(KEY_FILE);
    match load_key(&path) {
        Ok(k) => return Ok(k),
        Err(WgError::KeyIo { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let io_err = |what: &str, source: io::Error| WgError::KeyIo {
        path: path.clone(),
        what: what.to_string(),
        source,
    };
    fs::create_dir_all(state_dir).map_err(|e| io_err("create the state directory", e))?;
    let key = KeyPair::generate()?;
    let nonce = weft_sys::random::u64()?;
    let tmp = state_dir.join(format!(
        ".{KEY_FILE}.tmp-{}-{nonce:016x}",
        std::process::id(),
    ));
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(key_to_base64(&key.private).as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("write a new key", e));
    }
    // link(2) never replaces an existing file: whoever links first wins.
    let linked = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(dir) = fs::File::open(state_dir) {
                let _ = dir.sync_all();
            }
            tracing::info!(path = %path.display(), public_key = %key.public_base64(),
                "generated a new WireGuard key");
            Ok(key)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => load_key(&path),
        Err(e) => Err(io_err("link the new key into place", e)),
    }
}

fn load_key(path: &Path) -> Result<KeyPair, WgError> {
    let io_err = |what: &str, source: io::Error| WgError::KeyIo {
        path: path.to_path_buf(),
        what: what.to_string(),
        source,
    };
    let f = fs::File::open(path).map_err(|e| io_err("open", e))?;
    let meta = f.metadata().map_err(|e| io_err("stat", e))?;
    if !meta.is_file() {
        return Err(WgError::KeyFormat {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    let mut text = String::new();
    f.take(1024)
        .read_to_string(&mut text)
        .map_err(|e| io_err("read", e))?;
    let private = key_from_base64(&text).map_err(|e| WgError::KeyFormat {
        path: path.to_path_buf(),
        reason: match e {
            WgError::KeyText(r) => r,
            other => other.to_string(),
        },
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the WireGuard key file is readable by others; setting mode 0600");
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err("chmod 0600", e))?;
    }
    Ok(KeyPair::from_private(private))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reloads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_key(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create_key(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.public_key(), public_key(&a.private_key()));
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(KEY_FILE)]);
        // The file holds base64 of the private key.
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(key_from_base64(&text).unwrap(), a.private_key());
    }

    #[test]
    fn creates_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        load_or_create_key(&sub).unwrap();
        assert!(sub.join(KEY_FILE).is_file());
    }

    #[test]
    fn tightens_loose_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_key(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let b = load_or_create_key(dir.path()).unwrap();
        assert_eq!(a, b);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn rejects_garbage_without_overwriting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::write(&path, "not a key\n").unwrap();
        let err = load_or_create_key(dir.path()).unwrap_err();
        assert!(matches!(err, WgError::KeyFormat { .. }), "{err}");
        assert!(err.to_string().contains("move it away"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a key\n");
        fs::write(&path, &key_to_base64(&[1u8; 32])[..20]).unwrap();
        assert!(load_or_create_key(dir.path()).is_err());
    }

    #[test]
    fn rfc7748_vector() {
        // RFC 7748 section 6.1, Alice's key pair.
        let private = hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let pair = KeyPair::from_private(private);
        assert_eq!(
            pair.public_key(),
            hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        assert_eq!(
            key_from_base64(&pair.public_base64()).unwrap(),
            pair.public_key()
        );
    }

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn debug_redacts_the_private_key() {
        let pair = KeyPair::generate().unwrap();
        let text = format!("{pair:?}");
        assert!(!text.contains(&key_to_base64(&pair.private_key())));
        assert!(text.contains(&pair.public_base64()));
    }

    #[test]
    fn generated_keys_differ_and_are_clamped() {
        let a = KeyPair::generate().unwrap();
        let b = KeyPair::generate().unwrap();
        assert_ne!(a.private_key(), b.private_key());
        let k = a.private_key();
        assert_eq!(k[0] & 7, 0);
        assert_eq!(k[31] & 0xc0, 0x40);
    }

    #[test]
    fn bad_base64_is_an_error() {
        assert!(key_from_base64("!!!").is_err());
        assert!(key_from_base64("AAAA").is_err());
    }
}
