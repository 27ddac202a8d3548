//! Validated names: each newtype holds one rule, checked when it is made
//! ([`FromStr`], `new`, and on deserialising, so a record read from the store
//! or a request body is checked like any other input). They serialise as
//! plain strings, so JSON stays as it was.
//!
//! The rules are the ones the outside world uses: a [`ContainerId`] as the CNI
//! spec defines it, an [`IfName`] as Linux and libcni accept it, a
//! [`DnsName`] as weft's DNS serves it.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A name that breaks its rule: what it was for, the value (cut to 64
/// characters) and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {allowed}")]
pub struct NameError {
    /// What the name is for, e.g. `container id`.
    pub what: &'static str,
    /// The value given, cut to 64 characters.
    pub value: String,
    /// What is allowed, in words.
    pub allowed: &'static str,
}

impl NameError {
    fn new(what: &'static str, value: &str, allowed: &'static str) -> Self {
        NameError {
            what,
            value: value.chars().take(64).collect(),
            allowed,
        }
    }
}

/// One store-key-safe id: a letter or digit first, then letters, digits,
/// `_`, `.` and `-`, at most 256 bytes (the CNI spec's container id rule,
/// with a bound).
fn id_ok(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && s.len() <= 256
}

/// An interface name as Linux and libcni accept it: 1–15 bytes, not `.` or
/// `..`, no `/`, `:`, whitespace or control characters.
fn ifname_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// A DNS name weft serves: dot-separated labels of letters, digits, `-` and
/// `_`, 1–63 bytes each, 253 in all.
fn dns_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $check:path, $allowed:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// What the name is for, as errors say it.
            pub const WHAT: &'static str = $what;
            /// What the rule allows, in words.
            pub const ALLOWED: &'static str = $allowed;

            /// Checks `value` against the rule.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                if $check(&value) {
                    Ok($name(value))
                } else {
                    Err(NameError::new($what, &value, $allowed))
                }
            }

            /// Whether `value` keeps the rule.
            pub fn is_valid(value: &str) -> bool {
                $check(value)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                $name::new(value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = NameError;
            fn try_from(value: &str) -> Result<Self, NameError> {
                $name::new(value)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $name::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

name_type!(
    /// A container id as the CNI spec defines it (`CNI_CONTAINERID`): a
    /// letter or digit, then letters, digits, `_`, `.` and `-`; weft also
    /// bounds it at 256 bytes. It is a store key segment, so it never holds
    /// `/`.
    ContainerId,
    "container id",
    id_ok,
    "1-256 characters: a letter or digit first, then letters, digits, '_', '.' or '-'"
);

name_type!(
    /// A host's id: the same rule as a [`ContainerId`] (it is a store key
    /// segment under `hosts/` and `endpoints/`).
    HostId,
    "host id",
    id_ok,
    "1-256 characters: a letter or digit first, then letters, digits, '_', '.' or '-'"
);

name_type!(
    /// A network interface name as Linux and libcni accept it (`CNI_IFNAME`,
    /// the bridge): 1–15 bytes, not `.` or `..`, no `/`, `:`, whitespace or
    /// control characters. Whitespace is what would let a name split an
    /// iptables rule, so a bridge name of this type is safe in weft's rules.
    IfName,
    "interface name",
    ifname_ok,
    "1-15 bytes, not '.' or '..', no '/', ':', spaces or control characters"
);

name_type!(
    /// A name weft's DNS serves (container, service, stack, alias, the
    /// cluster domain): dot-separated labels of letters, digits, `-` and
    /// `_`, 1–63 bytes each, at most 253 in all.
    DnsName,
    "DNS name",
    dns_name_ok,
    "labels of letters, digits, '-' and '_' (1-63 each, 253 in all) separated by single dots"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_follow_the_cni_rule() {
        for ok in ["abc123", "a-b_c.d", "0", &"x".repeat(256)] {
            ContainerId::new(ok).unwrap();
        }
        for bad in [
            "",
            "-abc",
            ".abc",
            "a/b",
            "a b",
            "../x",
            "a\nb",
            &"x".repeat(257),
        ] {
            let e = ContainerId::new(bad).unwrap_err();
            assert_eq!(e.what, "container id");
            assert!(e.to_string().contains("a letter or digit first"), "{e}");
        }
    }

    #[test]
    fn host_ids_follow_the_same_rule() {
        HostId::new("node-1.example").unwrap();
        HostId::new("host-0a1b2c").unwrap();
        assert!(HostId::new("-x").is_err());
        assert!(HostId::new("a/b").is_err());
    }

    #[test]
    fn ifnames_follow_linux_and_libcni() {
        for ok in ["eth0", "net1", "weft0", "br-x_1.2", "0123456789abcde", "é1"] {
            IfName::new(ok).unwrap();
        }
        for bad in [
            "",
            "0123456789abcdef",
            "a/b",
            "..",
            ".",
            "eth 0",
            "we\nft",
            "eth:0",
            "weft0 -j ACCEPT",
        ] {
            let e = IfName::new(bad).unwrap_err();
            assert!(e.to_string().contains("1-15 bytes"), "{e}");
        }
    }

    #[test]
    fn dns_names() {
        DnsName::new("web-1").unwrap();
        DnsName::new("web.shop").unwrap();
        DnsName::new("_svc").unwrap();
        for bad in ["", "a..b", "we b", ".a", "a.", &"x".repeat(64)] {
            assert!(DnsName::new(bad).is_err(), "{bad:?}");
        }
        DnsName::new("x".repeat(63)).unwrap();
    }

    #[test]
    fn names_are_plain_json_strings_checked_on_the_way_in() {
        let id: ContainerId = "abc".parse().unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""abc""#);
        assert_eq!(serde_json::from_str::<ContainerId>(r#""abc""#).unwrap(), id);
        let e = serde_json::from_str::<IfName>(r#""a/b""#).unwrap_err();
        assert!(e.to_string().contains("invalid interface name"), "{e}");
        assert_eq!(id, "abc");
        assert_eq!(id.as_ref(), "abc");
        assert_eq!(id.to_string(), "abc");
        assert_eq!(&*id, "abc");
    }
}
