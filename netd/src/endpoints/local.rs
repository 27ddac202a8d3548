//! The group commit of this host's endpoint changes: the queue, its
//! worker, and this host's endpoints in memory.
//!
//! A request joins a queue ([`Daemon::submit`]); one worker task at a time
//! takes what has queued up as one batch ([`super::batch::take`]), applies
//! it under [`Daemon`]'s lock ([`super::apply`]), answers every request of
//! it, and goes on with what queued up meanwhile. The worker is a task of
//! its own, so a caller that goes away (the plugin timed out) cannot leave
//! a batch half applied.
//!
//! This host's endpoint records are kept in memory ([`Local`]): netd is the
//! only writer of its host's records, so after a write the set is what the
//! store holds. It is read from the store at start, on every resync
//! ([`Daemon::reload_endpoints`]) and after a store write whose outcome is
//! unknown; the store stays the truth across restarts.
//!
//! Released addresses' conntrack entries are deleted in the background by
//! one flusher at a time, which takes every address released meanwhile
//! ([`Local::flush_conntrack`]).

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;
use weft_api::{ApiError, ErrorKind};
use weft_model::EndpointRecord;

use super::apply::key_of;
use super::batch::{take, when_idle, Change, Idle, Set, LINGER};
use crate::daemon::Daemon;

/// What a request of a batch gets.
#[derive(Debug, Clone)]
pub enum Answer {
    /// The endpoint, new or as recorded before (a retried add).
    Added(Box<EndpointRecord>),
    /// The address released, if any.
    Deleted(Option<Ipv4Addr>),
}

pub(super) type Reply = oneshot::Sender<Result<Answer, ApiError>>;

pub(super) struct Pending {
    pub(super) change: Change,
    pub(super) reply: Reply,
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) pending: VecDeque<Pending>,
    /// Whether a worker task is running (it takes what queues up).
    worker: bool,
}

/// This host's endpoints in memory, and the queue of changes to them.
#[derive(Default)]
pub struct Local {
    queue: Mutex<Queue>,
    /// The records by key as the store holds them; `None` until read, and
    /// after a store write whose outcome is unknown. Read and written only
    /// under [`Daemon`]'s lock.
    set: Mutex<Option<Set>>,
    /// Released addresses whose conntrack entries are still to go.
    flushes: Arc<Mutex<Flushes>>,
    /// Wakes a lingering worker ([`super::batch::Idle::Linger`]).
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct Flushes {
    addrs: Vec<Ipv4Addr>,
    /// Whether a flusher task is running (it takes what queues up).
    running: bool,
}

impl Local {
    pub(super) fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cached(&self) -> Option<Set> {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn keep(&self, set: Option<Set>) {
        *self.set.lock().unwrap_or_else(PoisonError::into_inner) = set;
    }

    /// Deletes the conntrack entries of `addrs` (released addresses) in the
    /// background: the answers do not wait for it. One flush runs at a
    /// time, and it takes every address released meanwhile, so a burst of
    /// deletes costs one or two conntrack listings, not one each.
    pub(crate) fn flush_conntrack(&self, addrs: Vec<Ipv4Addr>) {
        let start = {
            let mut f = self.flushes.lock().unwrap_or_else(PoisonError::into_inner);
            f.addrs.extend(addrs);
            !f.addrs.is_empty() && !std::mem::replace(&mut f.running, true)
        };
        if !start {
            return;
        }
        let flushes = self.flushes.clone();
        tokio::spawn(async move {
            loop {
                let addrs = {
                    let mut f = flushes.lock().unwrap_or_else(PoisonError::into_inner);
                    if f.addrs.is_empty() {
                        f.running = false;
                        return;
                    }
                    std::mem::take(&mut f.addrs)
                };
                super::flush_conntrack(addrs).await;
            }
        });
    }
}

/// Resets the worker flag if the worker panics, so the next request starts
/// another one.
struct WorkerGuard<'a>(&'a Local);

impl Drop for WorkerGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.queue().worker = false;
        }
    }
}

impl Daemon {
    /// Queues `change` and waits for the batch that applies it.
    pub(crate) async fn submit(self: &Arc<Self>, change: Change) -> Result<Answer, ApiError> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut q = self.endpoints.queue();
            q.pending.push_back(Pending { change, reply });
            !std::mem::replace(&mut q.worker, true)
        };
        if start {
            tokio::spawn(self.clone().run_batches());
        } else {
            // A worker lingering for more requests takes this one now.
            self.endpoints.wake.notify_one();
        }
        answer.await.unwrap_or_else(|_| {
            Err(ApiError::new(
                ErrorKind::TryAgainLater,
                "netd's endpoint batch ended without an answer; retry",
            ))
        })
    }

    async fn run_batches(self: Arc<Self>) {
        let _guard = WorkerGuard(&self.endpoints);
        let mut deferred = 0;
        let mut lingered = false;
        loop {
            let lock = self.lock.lock().await;
            let batch: Vec<Pending> = {
                let mut q = self.endpoints.queue();
                let n = take(q.pending.iter().map(|p| &p.change));
                if n == 0 && when_idle(deferred, lingered) == Idle::Exit {
                    q.worker = false;
                    return;
                }
                q.pending.drain(..n).collect()
            };
            if !batch.is_empty() {
                lingered = false;
                deferred = self.apply_batch(batch, deferred).await;
                continue;
            }
            match when_idle(deferred, lingered) {
                Idle::Exit => {}
                Idle::Linger => {
                    // Batches of deletes left the nf_tables step: give the
                    // rest of a burst a moment to arrive first.
                    drop(lock);
                    let _ = tokio::time::timeout(LINGER, self.endpoints.wake.notified()).await;
                    lingered = true;
                }
                Idle::Enforce => {
                    self.enforce_owed().await;
                    deferred = 0;
                    lingered = false;
                }
            }
        }
    }

    /// This host's endpoints: the set in memory, read from the store when
    /// there is none (call under [`Daemon::lock`]).
    pub(crate) async fn endpoint_set(&self) -> Result<Set, ApiError> {
        if let Some(set) = self.endpoints.cached() {
            return Ok(set);
        }
        self.reload_endpoints()
            .await
            .map(|records| records.into_iter().map(|r| (key_of(&r), r)).collect())
    }

    /// Reads this host's endpoint records from the store and keeps them as
    /// the set in memory (call under [`Daemon::lock`]: the resync does).
    pub(crate) async fn reload_endpoints(&self) -> Result<Vec<EndpointRecord>, ApiError> {
        let records = self.endpoint_records().await?;
        self.endpoints.keep(Some(
            records.iter().map(|r| (key_of(r), r.clone())).collect(),
        ));
        Ok(records)
    }

    /// Keeps `set` as the set in memory, or forgets it when a store write's
    /// outcome is unknown.
    pub(crate) fn keep_endpoints(&self, set: Set, certain: bool) {
        self.endpoints.keep(certain.then_some(set));
    }

    /// Enforces this host's endpoints that earlier batches of deletes left
    /// to the idle worker ([`super::batch::when_idle`]).
    async fn enforce_owed(&self) {
        let result = match self.endpoint_set().await {
            Ok(set) => self.enforce_local(set.into_values().collect()).await,
            Err(e) => Err(anyhow::anyhow!(e)),
        };
        if let Err(e) = result {
            tracing::warn!(error = %format!("{e:#}"), "removing deleted endpoints from weft's nf_tables rules failed; the resync retries");
        }
    }
}
