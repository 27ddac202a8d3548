//! Applying one batch of this host's endpoint changes ([`Daemon::apply_batch`]).
//!
//! A batch costs one read of the IPAM block (none for a lone delete of a
//! recorded endpoint: its address is released by key), one store write per
//! endpoint and address (the records' issued together), at most one NAT update, at most one
//! nf_tables transaction and one conntrack pass, however many requests it
//! holds. Each request keeps its own answer: a failed step fails the
//! requests it belongs to, and the others go on. The deletes are answered
//! before the nf_tables step (their veths are gone already; its failure was
//! never theirs), the adds after it (anti-spoofing has no window); a batch
//! of deletes only leaves the step to a later batch or the idle worker
//! ([`super::batch::enforce_now`]).

use std::net::Ipv4Addr;

use weft_api::{ApiError, ErrorKind};
use weft_ipam::Owner;
use weft_model::{EndpointRecord, HostId, IfName};
use weft_sys::time::now_ms;

use super::batch::{enforce_now, plan, Change, Key, Set, Step};
use super::local::{Answer, Pending, Reply};
use super::{dns_config, enforce_error, ipam_error, store_error, NewEndpoint};
use crate::daemon::Daemon;

pub(super) fn key_of(r: &EndpointRecord) -> Key {
    (r.container_id.clone(), r.ifname.clone())
}

fn owner(key: &Key) -> Owner {
    Owner::new(key.0.as_str(), key.1.as_str())
}

fn internal(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Internal, msg)
}

/// One request of a batch while it is applied.
struct Job {
    step: Step,
    /// Taken when the answer is sent.
    reply: Option<Reply>,
    /// Decided: the answer (set at most once).
    answer: Option<Result<Answer, ApiError>>,
    /// Created by this batch: undone if a later step fails it.
    created: Option<EndpointRecord>,
    /// Its record was deleted from the store by this batch.
    removed: Option<EndpointRecord>,
}

impl Job {
    fn fail(&mut self, e: ApiError) {
        self.answer.get_or_insert(Err(e));
    }

    fn open(&self) -> bool {
        self.answer.is_none()
    }

    /// Sends the answer if it is decided and not sent yet.
    fn send(&mut self) {
        if let Some(answer) = &self.answer {
            if let Some(reply) = self.reply.take() {
                let _ = reply.send(answer.clone());
            }
        }
    }
}

/// Fails the jobs at `indices` with the one error of a step they shared
/// (an IPAM read or write for all of them).
fn fail_all(jobs: &mut [Job], indices: &[usize], e: ApiError) {
    for &i in indices {
        jobs[i].fail(e.clone());
    }
}

impl Daemon {
    /// Applies one batch and answers its requests. `deferred`: how many
    /// batches before it left the nf_tables step to it; returns how many
    /// have now (0 when it ran the step).
    pub(super) async fn apply_batch(&self, batch: Vec<Pending>, deferred: usize) -> usize {
        let set = match self.endpoint_set().await {
            Ok(set) => set,
            Err(e) => {
                for p in batch {
                    let _ = p.reply.send(Err(e.clone()));
                }
                return deferred;
            }
        };
        let changes: Vec<Change> = batch.iter().map(|p| p.change.clone()).collect();
        let mut jobs: Vec<Job> = plan(&set, &changes)
            .into_iter()
            .zip(batch)
            .map(|(step, p)| Job {
                step,
                reply: Some(p.reply),
                answer: None,
                created: None,
                removed: None,
            })
            .collect();
        let mut work = set;
        let mut certain = true;

        // Records out of the store, all at once.
        let deletes = jobs.iter().map(|job| async {
            match &job.step {
                Step::Remove(key, Some(_)) => {
                    let k = self.endpoint_key(&key.0, &key.1);
                    Some(self.note_store(self.store().delete(&k).await))
                }
                _ => None,
            }
        });
        let deleted = futures::future::join_all(deletes).await;
        for (job, result) in jobs.iter_mut().zip(deleted) {
            if let Step::Refuse(e) = &job.step {
                let e = e.clone();
                job.fail(e);
            }
            let (Step::Remove(key, Some(record)), Some(result)) = (&job.step, result) else {
                continue;
            };
            match result {
                Ok(_) => {
                    work.remove(key);
                    job.removed = Some(record.clone());
                }
                Err(e) => {
                    certain = false;
                    job.fail(store_error(e));
                }
            }
        }
        // Addresses and records of the new endpoints.
        self.create(&mut jobs, &mut work, &mut certain).await;
        // Published ports: one NAT update.
        self.publish(&mut jobs, &mut work).await;
        // Addresses of the deleted endpoints, and their conntrack entries.
        self.release(&mut jobs).await;
        // The deletes are answered here: their veths are gone (the plugin
        // deletes them first), so taking their ports out of the
        // anti-spoofing table was never part of their answer (a failure is
        // only logged).
        jobs.iter_mut().for_each(Job::send);
        // Anti-spoofing: one nf_tables transaction, which the adds wait
        // for; a batch of deletes only leaves it to a later batch or the
        // idle worker ([`enforce_now`]).
        let adds = jobs
            .iter()
            .any(|j| j.created.is_some() || matches!(j.step, Step::Existing(_)));
        let deferred = if enforce_now(adds, deferred) {
            self.enforce_batch(&mut jobs, &mut work).await;
            0
        } else {
            deferred + 1
        };
        self.keep_endpoints(work, certain);
        for mut job in jobs {
            job.fail(internal("the endpoint batch left a request unanswered"));
            job.send();
        }
        deferred
    }

    async fn create(&self, jobs: &mut [Job], work: &mut Set, certain: &mut bool) {
        let creating: Vec<usize> = (0..jobs.len())
            .filter(|&i| matches!(jobs[i].step, Step::Create(_)))
            .collect();
        if creating.is_empty() {
            return;
        }
        let owners: Vec<Owner> = creating
            .iter()
            .map(|&i| match &jobs[i].step {
                Step::Create(n) => Owner::new(n.container_id.as_str(), n.ifname.as_str()),
                _ => unreachable!("filtered to creates"),
            })
            .collect();
        let allocated = match self.ipam.allocate_all(self.block(), &owners).await {
            Ok(a) => a,
            Err(e) => return fail_all(jobs, &creating, ipam_error(e)),
        };
        for (&i, alloc) in creating.iter().zip(allocated) {
            let job = &mut jobs[i];
            let Step::Create(new) = &job.step else {
                continue;
            };
            let alloc = match alloc {
                Ok(a) => a,
                Err(e) => {
                    job.fail(ipam_error(e));
                    continue;
                }
            };
            let record = match self.record(new.clone(), alloc.cidr(), alloc.gateway) {
                Ok(r) => r,
                Err(e) => {
                    let _ = self
                        .ipam
                        .release_at(self.block(), alloc.addr, &alloc.owner)
                        .await;
                    job.fail(e);
                    continue;
                }
            };
            let key = self.endpoint_key(&record.container_id, &record.ifname);
            let written = match serde_json::to_vec(&record) {
                Ok(value) => self
                    .note_store(self.store().put(&key, &value, None).await)
                    .map_err(store_error),
                Err(e) => Err(internal(format!("encoding endpoint: {e}"))),
            };
            if let Err(e) = written {
                // Nothing half-made: give the address back (best effort;
                // GC catches it if the store is gone entirely).
                *certain = false;
                let _ = self
                    .ipam
                    .release_at(self.block(), alloc.addr, &alloc.owner)
                    .await;
                job.fail(e);
                continue;
            }
            work.insert(key_of(&record), record.clone());
            job.created = Some(record);
        }
    }

    /// The record of a new endpoint with its address.
    fn record(
        &self,
        new: NewEndpoint,
        address: ipnetwork::Ipv4Network,
        gateway: Ipv4Addr,
    ) -> Result<EndpointRecord, ApiError> {
        let cfg = self.config();
        let host_id =
            HostId::new(self.host_id()).map_err(|e| internal(format!("this host's id: {e}")))?;
        let bridge = IfName::new(cfg.bridge.as_str())
            .map_err(|e| internal(format!("the configured bridge: {e}")))?;
        let dns = dns_config(
            cfg.dns_addr,
            &cfg.domain,
            new.stack.as_deref(),
            new.service.as_deref(),
        );
        Ok(EndpointRecord {
            container_id: new.container_id,
            ifname: new.ifname,
            netns: new.netns,
            host_id,
            address,
            gateway,
            mtu: self.mtu(),
            bridge,
            name: new.name,
            service: new.service,
            stack: new.stack,
            aliases: new.aliases,
            port_mappings: new.port_mappings,
            dns,
            created_at_ms: now_ms(),
        })
    }

    /// Undoes a new endpoint of the batch: record and address (best effort).
    async fn undo(&self, job: &mut Job, work: &mut Set) {
        if let Some(record) = job.created.take() {
            let key = self.endpoint_key(&record.container_id, &record.ifname);
            let _ = self.store().delete(&key).await;
            let k = key_of(&record);
            let _ = self
                .ipam
                .release_at(self.block(), record.address.ip(), &owner(&k))
                .await;
            work.remove(&k);
        }
    }

    /// One NAT update when the batch changed published ports. If it fails,
    /// the batch's add that publishes ports (at most one) is undone and
    /// refused; if the remaining ports fail too, the deletes that took
    /// ports away fail (their addresses stay until a retried DEL).
    async fn publish(&self, jobs: &mut [Job], work: &mut Set) {
        let ports =
            |r: &Option<EndpointRecord>| r.as_ref().is_some_and(|r| !r.port_mappings.is_empty());
        if !jobs.iter().any(|j| ports(&j.created) || ports(&j.removed)) {
            return;
        }
        let all: Vec<EndpointRecord> = work.values().cloned().collect();
        let Err(e) = self.apply_nat(&all).await else {
            return;
        };
        let mut retry = false;
        for job in jobs.iter_mut().filter(|j| ports(&j.created)) {
            if let Some(r) = &job.created {
                tracing::error!(error = %format!("{e:#}"), container = %r.container_id, "publishing ports failed; undoing the endpoint");
            }
            self.undo(job, work).await;
            job.fail(internal(format!("publishing ports failed: {e:#}")));
            retry = true;
        }
        let still = if retry {
            let all: Vec<EndpointRecord> = work.values().cloned().collect();
            self.apply_nat(&all).await.err()
        } else {
            Some(e)
        };
        if let Some(e) = still {
            for job in jobs.iter_mut().filter(|j| ports(&j.removed)) {
                job.fail(internal(format!("updating published ports failed: {e:#}")));
            }
        }
    }

    /// One nf_tables transaction for the batch's endpoints; the adds are
    /// answered only after it. If it fails, the set without the batch's new
    /// endpoints is tried, then each new one in turn, so one that cannot be
    /// enforced does not fail the others; those that fail are undone.
    async fn enforce_batch(&self, jobs: &mut [Job], work: &mut Set) {
        let values = |s: &Set| s.values().cloned().collect::<Vec<_>>();
        let result = self.enforce_local(values(work)).await;
        if let Err(e) = result {
            let new: Vec<usize> = (0..jobs.len())
                .filter(|&i| jobs[i].created.is_some())
                .collect();
            let mut base = work.clone();
            for &i in &new {
                if let Some(r) = &jobs[i].created {
                    base.remove(&key_of(r));
                }
            }
            let base_ok = if new.is_empty() {
                Err(e)
            } else {
                self.enforce_local(values(&base)).await
            };
            match base_ok {
                Err(e) => {
                    // Nothing new can be enforced: refuse every add.
                    for &i in &new {
                        if let Some(r) = &jobs[i].created {
                            tracing::error!(error = %format!("{e:#}"), container = %r.container_id, "enforcing anti-spoofing failed; undoing the endpoint");
                        }
                        self.undo(&mut jobs[i], work).await;
                        jobs[i].fail(enforce_error(&e));
                    }
                    for job in jobs
                        .iter_mut()
                        .filter(|j| matches!(j.step, Step::Existing(_)))
                    {
                        job.fail(enforce_error(&e));
                    }
                    if jobs.iter().any(|j| j.removed.is_some()) {
                        tracing::warn!(error = %format!("{e:#}"), "removing deleted endpoints from weft's nf_tables rules failed; the resync retries");
                    }
                }
                Ok(()) => {
                    let mut enforced = base;
                    for &i in &new {
                        let Some(r) = jobs[i].created.clone() else {
                            continue;
                        };
                        let mut with = enforced.clone();
                        with.insert(key_of(&r), r.clone());
                        match self.enforce_local(values(&with)).await {
                            Ok(()) => enforced = with,
                            Err(e) => {
                                tracing::error!(error = %format!("{e:#}"), container = %r.container_id, "enforcing anti-spoofing failed; undoing the endpoint");
                                self.undo(&mut jobs[i], work).await;
                                jobs[i].fail(enforce_error(&e));
                            }
                        }
                    }
                }
            }
            // The enforcer keeps what it was last given: give it the set
            // that stays (nothing runs when the kernel has it).
            if let Err(e) = self.enforce_local(values(work)).await {
                tracing::warn!(error = %format!("{e:#}"), "re-enforcing this host's endpoints failed; the resync retries");
            }
            // A new endpoint undone here may have published ports.
            let all = values(work);
            if let Err(e) = self.apply_nat(&all).await {
                tracing::warn!(error = %format!("{e:#}"), "updating published ports failed; the resync retries");
            }
        }
        for job in jobs.iter_mut().filter(|j| j.open()) {
            match (&job.step, &job.created) {
                (Step::Existing(r), _) => job.answer = Some(Ok(Answer::Added(Box::new(r.clone())))),
                (Step::Create(_), Some(r)) => {
                    tracing::info!(
                        container = %r.container_id, ifname = %r.ifname, address = %r.address,
                        name = r.name.as_deref().unwrap_or(""), service = r.service.as_deref().unwrap_or(""),
                        stack = r.stack.as_deref().unwrap_or(""), ports = r.port_mappings.len(),
                        "endpoint added"
                    );
                    job.answer = Some(Ok(Answer::Added(Box::new(r.clone()))));
                }
                _ => {}
            }
        }
    }

    /// Releases the addresses of the batch's deletes (by key when it is one
    /// whose record names its address, else with one read of the block for
    /// all), then has their conntrack entries flushed in the background
    /// ([`super::Local::flush_conntrack`]): the answer does not wait for it.
    /// A released address is not handed out again soon (IPAM moves on), so
    /// nothing can inherit the old flows.
    async fn release(&self, jobs: &mut [Job]) {
        let open: Vec<usize> = (0..jobs.len())
            .filter(|&i| jobs[i].open() && matches!(jobs[i].step, Step::Remove(..)))
            .collect();
        let owners: Vec<Owner> = open
            .iter()
            .filter_map(|&i| match &jobs[i].step {
                Step::Remove(key, _) => Some(owner(key)),
                _ => None,
            })
            .collect();
        // One recorded address: by key (two store operations, no scan).
        // More, or one without a record: one read of the block for all
        // (one operation plus one per address, not two per address).
        let released = match (open.as_slice(), owners.as_slice()) {
            ([], _) => return,
            ([i], [o]) => match &jobs[*i].step {
                Step::Remove(_, Some(r)) => self
                    .ipam
                    .release_at(self.block(), r.address.ip(), o)
                    .await
                    .map(|a| vec![a]),
                _ => self.ipam.release_all(self.block(), &owners).await,
            },
            _ => self.ipam.release_all(self.block(), &owners).await,
        };
        let released = match released {
            Ok(r) => r,
            Err(e) => return fail_all(jobs, &open, ipam_error(e)),
        };
        let mut flushed = Vec::new();
        for (&i, addr) in open.iter().zip(released) {
            let Step::Remove(key, record) = &jobs[i].step else {
                continue;
            };
            // A record without an address record (released before): the
            // record's address is what went.
            let addr = addr.or(record.as_ref().map(|r| r.address.ip()));
            if let Some(addr) = addr {
                tracing::info!(container = %key.0, ifname = %key.1, %addr, "endpoint deleted");
                flushed.push(addr);
            }
            jobs[i].answer = Some(Ok(Answer::Deleted(addr)));
        }
        if !flushed.is_empty() {
            self.endpoints.flush_conntrack(flushed);
        }
    }
}
