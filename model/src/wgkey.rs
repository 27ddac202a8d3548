//! [`WgKey`]: a WireGuard public key, 32 bytes, standard base64 (44
//! characters with padding) in JSON, as `wg` prints it.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// A WireGuard key that is not 32 bytes of standard base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid WireGuard key {value:?}: {why}; use 32 bytes in standard base64 (44 characters ending in '=', as `wg pubkey` prints)")]
pub struct WgKeyError {
    /// The value given, cut to 64 characters.
    pub value: String,
    pub why: String,
}

/// A WireGuard public key (Curve25519, 32 bytes). In JSON and in
/// [`Display`](fmt::Display) it is standard base64, as `wg` prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WgKey([u8; 32]);

impl WgKey {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        WgKey(bytes)
    }

    pub const fn to_bytes(self) -> [u8; 32] {
        self.0
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as standard base64.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl From<[u8; 32]> for WgKey {
    fn from(bytes: [u8; 32]) -> Self {
        WgKey(bytes)
    }
}

impl From<WgKey> for [u8; 32] {
    fn from(k: WgKey) -> Self {
        k.0
    }
}

impl FromStr for WgKey {
    type Err = WgKeyError;
    fn from_str(s: &str) -> Result<Self, WgKeyError> {
        let err = |why: String| WgKeyError {
            value: s.chars().take(64).collect(),
            why,
        };
        let bytes = STANDARD
            .decode(s.trim())
            .map_err(|e| err(format!("not base64 ({e})")))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| err(format!("{} bytes, not 32", b.len())))?;
        Ok(WgKey(bytes))
    }
}

impl TryFrom<String> for WgKey {
    type Error = WgKeyError;
    fn try_from(s: String) -> Result<Self, WgKeyError> {
        s.parse()
    }
}

impl From<WgKey> for String {
    fn from(k: WgKey) -> String {
        k.to_base64()
    }
}

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({})", self.to_base64())
    }
}

impl AsRef<[u8]> for WgKey {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        let text = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let k: WgKey = text.parse().unwrap();
        let mut want = [0u8; 32];
        for (i, b) in want.iter_mut().enumerate() {
            *b = i as u8;
        }
        assert_eq!(k.to_bytes(), want);
        assert_eq!(k.to_string(), text);
        assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{text}\""));
        assert_eq!(
            serde_json::from_str::<WgKey>(&format!("\"{text}\"")).unwrap(),
            k
        );
    }

    #[test]
    fn wrong_keys_say_what_is_allowed() {
        for bad in ["short", "", "AAAA", "not base64 at all!!"] {
            let e = bad.parse::<WgKey>().unwrap_err();
            assert!(e.to_string().contains("32 bytes in standard base64"), "{e}");
        }
        assert!(serde_json::from_str::<WgKey>(r#""AAAA""#).is_err());
    }
}
