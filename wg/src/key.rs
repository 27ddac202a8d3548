//! The host's WireGuard key pair and its files: `wg.key`, and during a key
//! rotation `wg.key.next` (the announced next key, [`write_next_key`]),
//! which replaces `wg.key` when the rotation completes
//! ([`promote_next_key`]). A next key found at start is an interrupted
//! rotation: [`load_or_create_key`] completes it (the peers that switched
//! already only accept the next key; the others follow the published
//! record).

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
/// Name of the next key's file (a key rotation under way).
pub const NEXT_KEY_FILE: &str = "wg.key.next";

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
/// warning. A next key left by an interrupted rotation is promoted first
/// ([`promote_next_key`]).
pub fn load_or_create_key(state_dir: &Path) -> Result<KeyPair, WgError> {
    if let Some(k) = promote_next_key(state_dir)? {
        tracing::warn!(public_key = %k.public_base64(),
            "completed an interrupted WireGuard key rotation: the next key is now the key");
        return Ok(k);
    }
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
    let tmp = write_temp(state_dir, KEY_FILE, &key).map_err(|e| io_err("write a new key", e))?;
    // link(2) never replaces an existing file: whoever links first wins.
    let linked = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(state_dir);
            tracing::info!(path = %path.display(), public_key = %key.public_base64(),
                "generated a new WireGuard key");
            Ok(key)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => load_key(&path),
        Err(e) => Err(io_err("link the new key into place", e)),
    }
}

/// Writes `key` to a new temporary file (mode 0600, synced) next to
/// `name` in `dir`, and returns its path.
fn write_temp(dir: &Path, name: &str, key: &KeyPair) -> io::Result<std::path::PathBuf> {
    let nonce = weft_sys::random::u64().map_err(io::Error::other)?;
    let tmp = dir.join(format!(".{name}.tmp-{}-{nonce:016x}", std::process::id()));
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
    match write() {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Makes a new random key and keeps it as the next key
/// (`<state_dir>/wg.key.next`, mode 0600, written atomically: a temporary
/// file renamed into place, replacing an earlier next key). The first phase
/// of a key rotation; the key in use does not change.
pub fn write_next_key(state_dir: &Path) -> Result<KeyPair, WgError> {
    let path = state_dir.join(NEXT_KEY_FILE);
    let io_err = |what: &str, source: io::Error| WgError::KeyIo {
        path: path.clone(),
        what: what.to_string(),
        source,
    };
    let key = KeyPair::generate()?;
    let tmp =
        write_temp(state_dir, NEXT_KEY_FILE, &key).map_err(|e| io_err("write a next key", e))?;
    if let Err(e) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("rename the next key into place", e));
    }
    sync_dir(state_dir);
    Ok(key)
}

/// Abandons a key rotation on disk: removes the next key (`wg.key.next`),
/// if there is one, so that a restart keeps the key in use.
pub fn remove_next_key(state_dir: &Path) -> Result<(), WgError> {
    let next = state_dir.join(NEXT_KEY_FILE);
    match fs::remove_file(&next) {
        Ok(()) => {
            sync_dir(state_dir);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(WgError::KeyIo {
            path: next,
            what: "remove".to_string(),
            source,
        }),
    }
}

/// Completes a key rotation on disk: the next key (`wg.key.next`), if there
/// is one, replaces the key (`wg.key`) in one rename and is returned.
/// `None` when there is no next key.
pub fn promote_next_key(state_dir: &Path) -> Result<Option<KeyPair>, WgError> {
    let next = state_dir.join(NEXT_KEY_FILE);
    let key = match load_key(&next) {
        Ok(k) => k,
        Err(WgError::KeyIo { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    fs::rename(&next, state_dir.join(KEY_FILE)).map_err(|source| WgError::KeyIo {
        path: next.clone(),
        what: format!("rename to {KEY_FILE}"),
        source,
    })?;
    sync_dir(state_dir);
    Ok(Some(key))
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
    fn next_key_is_kept_apart_then_promoted() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = load_or_create_key(dir.path()).unwrap();
        assert_eq!(promote_next_key(dir.path()).unwrap(), None);
        let k2 = write_next_key(dir.path()).unwrap();
        assert_ne!(k1, k2);
        let next = dir.path().join(NEXT_KEY_FILE);
        assert_eq!(
            fs::metadata(&next).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // The key in use is still K1 until the rotation completes.
        let text = fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(key_from_base64(&text).unwrap(), k1.private_key());
        // A second announcement replaces the first.
        let k3 = write_next_key(dir.path()).unwrap();
        assert_ne!(k2, k3);
        assert_eq!(promote_next_key(dir.path()).unwrap(), Some(k3.clone()));
        assert!(!next.exists());
        assert_eq!(load_or_create_key(dir.path()).unwrap(), k3);
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, vec![std::ffi::OsString::from(KEY_FILE)]);
    }

    #[test]
    fn an_abandoned_rotation_keeps_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = load_or_create_key(dir.path()).unwrap();
        write_next_key(dir.path()).unwrap();
        remove_next_key(dir.path()).unwrap();
        assert!(!dir.path().join(NEXT_KEY_FILE).exists());
        // Nothing to remove is fine; a restart keeps K1.
        remove_next_key(dir.path()).unwrap();
        assert_eq!(load_or_create_key(dir.path()).unwrap(), k1);
    }

    #[test]
    fn an_interrupted_rotation_completes_at_load() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create_key(dir.path()).unwrap();
        let k2 = write_next_key(dir.path()).unwrap();
        // netd stopped between announce and switch (or before the rename).
        assert_eq!(load_or_create_key(dir.path()).unwrap(), k2);
        assert!(!dir.path().join(NEXT_KEY_FILE).exists());
        assert_eq!(load_or_create_key(dir.path()).unwrap(), k2);
        // A next key without a key (state dir copied half) is taken too.
        let dir = tempfile::tempdir().unwrap();
        let k = write_next_key(dir.path()).unwrap();
        assert_eq!(load_or_create_key(dir.path()).unwrap(), k);
        // A damaged next key is an error, and nothing is replaced.
        let dir = tempfile::tempdir().unwrap();
        let k1 = load_or_create_key(dir.path()).unwrap();
        fs::write(dir.path().join(NEXT_KEY_FILE), "garbage\n").unwrap();
        assert!(matches!(
            load_or_create_key(dir.path()),
            Err(WgError::KeyFormat { .. })
        ));
        let text = fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(key_from_base64(&text).unwrap(), k1.private_key());
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
