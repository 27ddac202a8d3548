//! Watches on etcd: open a watch and wait for etcd to confirm it (failing
//! at once with [`StoreError::Compacted`] when the history is gone), then
//! forward its events into a [`Watch`] from a task of its own.

use std::time::Duration;

use etcd_client::{GetOptions, WatchOptions, WatchResponse, WatchStream};
use tokio::sync::mpsc;

use super::convert::Ctx;
use super::EtcdStore;
use crate::{Event, Result, Revision, StoreError, Watch};

/// How many watch events may wait in a [`Watch`] before the forwarding task
/// stops reading from etcd (back-pressure).
const WATCH_CHANNEL_CAPACITY: usize = 1024;

impl EtcdStore {
    /// A watch of `prefix` from `start` (0: from now on); see the module docs.
    pub(super) async fn start_watch(&self, prefix: &str, start: Revision) -> Result<Watch> {
        let (stream, watch_id, pending) = self.open_watch(prefix, start).await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let ctx = self.ctx.clone();
        tokio::spawn(forward_watch(ctx, stream, watch_id, start, pending, tx));
        Ok(Watch::new(rx))
    }

    /// Whether etcd's history before `start` is gone (compacted). A read at
    /// revision `start` fails with "required revision has been compacted"
    /// exactly when a watch from `start` would be canceled for compaction.
    async fn history_compacted(&self, start: Revision) -> Result<bool> {
        let options = GetOptions::new().with_count_only().with_revision(start);
        let result = self
            .call(None, |mut c| async move {
                c.get(b"\0".to_vec(), Some(options)).await
            })
            .await;
        match result {
            Ok(_) => Ok(false),
            Err(StoreError::Invalid { detail, .. }) if detail.contains("compacted") => Ok(true),
            // A future revision: fine for a watch, it waits for it.
            Err(StoreError::Invalid { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Opens an etcd watch and waits until etcd confirms it ("created"), so
    /// that every change after this returns is seen. Returns the stream, the
    /// watch id, and a response already read that must be handled first.
    async fn open_watch(
        &self,
        prefix: &str,
        start: Revision,
    ) -> Result<(WatchStream, i64, Option<WatchResponse>)> {
        // etcd confirms a watch from compacted history and cancels it only
        // afterwards (up to 100 ms later). Detect that case up front so that
        // watch_prefix itself fails with Compacted, as the SQLite backend
        // does; a compaction that happens later still ends the stream with
        // Compacted.
        let compacted = start > 0 && self.history_compacted(start).await?;
        let mut options = WatchOptions::new().with_prefix();
        if start > 0 {
            options = options.with_start_revision(start);
        }
        let key = prefix.as_bytes().to_vec();
        let (mut stream, first, second) = self
            .call(None, |mut client| async move {
                let mut stream = client.watch(key, Some(options)).await?;
                let first = stream.message().await?;
                let confirmed = first.as_ref().is_some_and(|f| f.created() && !f.canceled());
                let second = if compacted && confirmed {
                    stream.message().await?
                } else {
                    None
                };
                Ok((stream, first, second))
            })
            .await?;
        let Some(first) = first else {
            return Err(StoreError::Unavailable {
                store: self.ctx.name.clone(),
                detail: "watch stream closed before etcd confirmed the watch".into(),
            });
        };
        if first.canceled() {
            return Err(self.ctx.canceled_error(&first, start));
        }
        // etcd's first response on a new watch stream is always the
        // confirmation, without events.
        if !first.created() || !first.events().is_empty() {
            cancel_watch(&mut stream, first.watch_id(), self.cfg.request_timeout).await;
            return Err(StoreError::Etcd {
                store: self.ctx.name.clone(),
                detail: "etcd did not confirm the watch as expected".into(),
            });
        }
        if let Some(second) = &second {
            if second.canceled() && second.events().is_empty() {
                return Err(self.ctx.canceled_error(second, start));
            }
        }
        Ok((stream, first.watch_id(), second))
    }
}

/// Forwards etcd watch responses into `tx` until the receiver is dropped,
/// etcd cancels the watch, or the stream fails.
async fn forward_watch(
    ctx: Ctx,
    mut stream: WatchStream,
    watch_id: i64,
    start: Revision,
    mut pending: Option<WatchResponse>,
    tx: mpsc::Sender<Result<Event>>,
) {
    let stop = ctx.request_timeout;
    loop {
        let message = if let Some(resp) = pending.take() {
            Ok(Some(resp))
        } else {
            tokio::select! {
                message = stream.message() => message,
                () = tx.closed() => {
                    cancel_watch(&mut stream, watch_id, stop).await;
                    return;
                }
            }
        };
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                let _ = tx
                    .send(Err(StoreError::Unavailable {
                        store: ctx.name.clone(),
                        detail: "etcd closed the watch stream".into(),
                    }))
                    .await;
                return;
            }
            Err(e) => {
                // Whatever broke the stream, the watch is gone and the
                // caller must re-read and re-watch: report it as the store
                // being unreachable.
                let err = match ctx.map_err(e, None) {
                    StoreError::Etcd { store, detail } | StoreError::Invalid { store, detail } => {
                        StoreError::Unavailable { store, detail }
                    }
                    other => other,
                };
                tracing::debug!(store = %ctx.name, error = %err, "etcd watch stream ended");
                let _ = tx.send(Err(err)).await;
                return;
            }
        };
        for event in resp.events() {
            let Some(item) = ctx.convert_event(event) else {
                continue;
            };
            let last = item.is_err();
            if tx.send(item).await.is_err() || last {
                cancel_watch(&mut stream, watch_id, stop).await;
                return;
            }
        }
        if resp.canceled() {
            let _ = tx.send(Err(ctx.canceled_error(&resp, start))).await;
            return;
        }
    }
}

/// Best effort: asks etcd to cancel the watch; dropping the stream right
/// after closes it on the server side in any case.
async fn cancel_watch(stream: &mut WatchStream, watch_id: i64, limit: Duration) {
    let _ = tokio::time::timeout(limit, stream.cancel(watch_id)).await;
}
