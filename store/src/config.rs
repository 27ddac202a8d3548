//! Which store to open: [`StoreConfig`], and its one-line form
//! (`sqlite:PATH`, `etcd:URL[,URL...]`) that netd's `--store` / `WEFT_STORE`
//! and dnsd's `--store` both parse here.

use std::path::PathBuf;
use std::str::FromStr;

use crate::EtcdConfig;

/// Which backend to open, as the daemons' settings name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// One SQLite file (created if missing).
    Sqlite { path: PathBuf },
    /// An etcd v3 cluster.
    Etcd(EtcdConfig),
}

/// A store setting that names no store weft can open, with what to write
/// instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreSpecError {
    #[error("{0:?}: use sqlite:PATH or etcd:URL[,URL...]")]
    Form(String),
    #[error("the etcd backend needs at least one endpoint (etcd:http://HOST:2379[,URL...])")]
    NoEndpoints,
}

impl StoreConfig {
    /// An etcd cluster at `endpoints` (with the default timeouts); refuses
    /// an empty list or an empty URL.
    pub fn etcd(endpoints: Vec<String>) -> Result<StoreConfig, StoreSpecError> {
        let endpoints: Vec<String> = endpoints.into_iter().map(|u| u.trim().to_owned()).collect();
        if endpoints.is_empty() || endpoints.iter().any(String::is_empty) {
            return Err(StoreSpecError::NoEndpoints);
        }
        Ok(StoreConfig::Etcd(EtcdConfig::new(endpoints)))
    }
}

/// `sqlite:/var/lib/weft/store.db` or `etcd:http://a:2379,http://b:2379`.
impl FromStr for StoreConfig {
    type Err = StoreSpecError;

    fn from_str(spec: &str) -> Result<StoreConfig, StoreSpecError> {
        match spec.trim().split_once(':') {
            Some(("sqlite", path)) if !path.is_empty() => {
                Ok(StoreConfig::Sqlite { path: path.into() })
            }
            Some(("etcd", urls)) if !urls.trim().is_empty() => {
                StoreConfig::etcd(urls.split(',').map(str::to_owned).collect())
            }
            _ => Err(StoreSpecError::Form(spec.to_owned())),
        }
    }
}

/// The one-line form again (`sqlite:PATH`, `etcd:URL,URL`), for logs and
/// status.
impl std::fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreConfig::Sqlite { path } => write!(f, "sqlite:{}", path.display()),
            StoreConfig::Etcd(e) => write!(f, "etcd:{}", e.endpoints.join(",")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            "sqlite:/a/b.db".parse::<StoreConfig>(),
            Ok(StoreConfig::Sqlite {
                path: "/a/b.db".into()
            })
        );
        let Ok(StoreConfig::Etcd(e)) = "etcd:http://a:1, http://b:2".parse::<StoreConfig>() else {
            panic!("an etcd spec")
        };
        assert_eq!(e.endpoints, ["http://a:1", "http://b:2"]);
        assert_eq!(
            "etcd:".parse::<StoreConfig>(),
            Err(StoreSpecError::Form("etcd:".into()))
        );
        assert_eq!(
            "etcd:http://a:1,".parse::<StoreConfig>(),
            Err(StoreSpecError::NoEndpoints)
        );
        let e = "redis:x".parse::<StoreConfig>().unwrap_err().to_string();
        assert!(e.contains("sqlite:PATH"), "{e}");
        assert!("sqlite:".parse::<StoreConfig>().is_err());
        assert!("/var/lib/weft/store.db".parse::<StoreConfig>().is_err());
    }

    #[test]
    fn display_is_the_spec() {
        for spec in ["sqlite:/a/b.db", "etcd:http://a:1,http://b:2"] {
            let c: StoreConfig = spec.parse().unwrap();
            assert_eq!(c.to_string(), spec);
        }
    }
}
