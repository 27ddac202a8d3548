//! A store under test on either backend, for contract and IPAM tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::testing::EtcdServer;
use crate::{DynStore, EtcdConfig, EtcdStore, Revision, SqliteStore};

/// A fresh store on one backend plus what keeps it alive: a temporary
/// SQLite file, or a throwaway etcd server. Panics on setup failure (it is
/// for tests).
pub struct TestStore {
    store: DynStore,
    backend: Backend,
}

enum Backend {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Etcd(EtcdServer),
}

impl TestStore {
    /// A new SQLite file in a temporary directory.
    pub async fn sqlite() -> TestStore {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("cannot create a temp dir: {e}"),
        };
        let path = dir.path().join("store.db");
        let store = match SqliteStore::open(&path) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        TestStore {
            store: Arc::new(store),
            backend: Backend::Sqlite { _dir: dir, path },
        }
    }

    /// A new etcd server on 127.0.0.1 (Debian's `etcd-server`).
    pub async fn etcd() -> TestStore {
        let server = match EtcdServer::start() {
            Ok(s) => s,
            Err(e) => panic!("cannot start etcd for the test: {e}"),
        };
        let store = match EtcdStore::connect(server.config()).await {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        TestStore {
            store: Arc::new(store),
            backend: Backend::Etcd(server),
        }
    }

    /// The shared handle.
    pub fn store(&self) -> DynStore {
        self.store.clone()
    }

    /// A second, independent handle on the same store (its own connection,
    /// as another process would have).
    pub async fn another_handle(&self) -> DynStore {
        match &self.backend {
            Backend::Sqlite { path, .. } => match SqliteStore::open(path) {
                Ok(s) => Arc::new(s),
                Err(e) => panic!("{e}"),
            },
            Backend::Etcd(server) => match EtcdStore::connect(server.config()).await {
                Ok(s) => Arc::new(s),
                Err(e) => panic!("{e}"),
            },
        }
    }

    /// The SQLite file, for the embedded backend.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Sqlite { path, .. } => Some(path),
            Backend::Etcd(_) => None,
        }
    }

    /// The client config, for the etcd backend.
    pub fn etcd_config(&self) -> Option<EtcdConfig> {
        match &self.backend {
            Backend::Etcd(server) => Some(server.config()),
            Backend::Sqlite { .. } => None,
        }
    }

    /// Discards the store's watch history before `revision` (etcd's
    /// compaction; `revision` itself stays watchable), so a watch from an
    /// earlier revision fails with [`crate::StoreError::Compacted`].
    pub async fn compact(&self, revision: Revision) {
        match &self.backend {
            Backend::Sqlite { path, .. } => {
                let store = match SqliteStore::open(path) {
                    Ok(s) => s,
                    Err(e) => panic!("{e}"),
                };
                if let Err(e) = store.compact(revision).await {
                    panic!("compacting {}: {e}", path.display());
                }
            }
            Backend::Etcd(server) => {
                let mut client = match etcd_client::Client::connect([server.endpoint()], None).await
                {
                    Ok(c) => c,
                    Err(e) => panic!("connecting to etcd to compact: {e}"),
                };
                if let Err(e) = client.compact(revision, None).await {
                    panic!("compacting etcd at {revision}: {e}");
                }
            }
        }
    }

    /// Another writer on the same store (another process's, or another
    /// host's etcd client) that writes batches of keys in one transaction.
    pub async fn batch_writer(&self) -> BatchWriter {
        match &self.backend {
            Backend::Sqlite { path, .. } => match SqliteStore::open(path) {
                Ok(s) => BatchWriter::Sqlite(s),
                Err(e) => panic!("{e}"),
            },
            Backend::Etcd(server) => {
                match etcd_client::Client::connect([server.endpoint()], None).await {
                    Ok(c) => BatchWriter::Etcd(Box::new(c)),
                    Err(e) => panic!("connecting to etcd to write batches: {e}"),
                }
            }
        }
    }

    /// The etcd server, to stop and restart it.
    pub fn etcd_server(&mut self) -> Option<&mut EtcdServer> {
        match &mut self.backend {
            Backend::Etcd(server) => Some(server),
            Backend::Sqlite { .. } => None,
        }
    }
}

/// Writes batches of keys, each in one transaction: see
/// [`TestStore::batch_writer`].
pub enum BatchWriter {
    Sqlite(SqliteStore),
    Etcd(Box<etcd_client::Client>),
}

impl BatchWriter {
    /// Writes every key of `kvs` in one transaction (one etcd txn of puts),
    /// as a burst of records arrives. Returns the last revision.
    pub async fn put(&mut self, kvs: Vec<(String, Vec<u8>)>) -> Revision {
        match self {
            BatchWriter::Sqlite(store) => match store.put_batch(kvs).await {
                Ok(rev) => rev,
                Err(e) => panic!("writing a batch to {}: {e}", store.path().display()),
            },
            BatchWriter::Etcd(client) => {
                let puts = kvs
                    .into_iter()
                    .map(|(k, v)| etcd_client::TxnOp::put(k, v, None))
                    .collect::<Vec<_>>();
                match client.txn(etcd_client::Txn::new().and_then(puts)).await {
                    Ok(resp) => resp.header().map_or(0, |h| h.revision()),
                    Err(e) => panic!("writing a batch to etcd: {e}"),
                }
            }
        }
    }
}
