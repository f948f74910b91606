//! Group commit: concurrent ADDs queued on one agent are prepared on one view and committed
//! in one transaction; what loses a race or needs a commit of its own is served alone.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use spiderpool_api::agent::{IpamAddArgs, IpamAddResponse};
use spiderpool_store::{typed, Kind, Op, StoreError};
use tokio::sync::oneshot;

use super::*;
use crate::view::ViewCache;

/// An ADD waiting to be served.
pub(super) struct PendingAdd {
    pub(super) pod: PodRef,
    pub(super) args: IpamAddArgs,
    pub(super) reply: oneshot::Sender<Result<IpamAddResponse>>,
    /// Its Pod object and endpoint record, read before it queued (while an earlier batch
    /// committed), if that read succeeded.
    pub(super) prefetched: Option<Prefetched>,
}

impl IpamService {
    /// Serves a batch of queued ADDs: their claims and endpoint records go into one
    /// transaction (addresses picked one after the other on the same view, so they differ).
    /// When that transaction loses a race, each request is retried on its own.
    pub(super) async fn add_batch(&self, batch: Vec<PendingAdd>, cache: &mut ViewCache) {
        let mut pending = batch;
        let mut alone = Vec::new();
        let max_ops = self.store.max_ops();
        // A batch that loses a race is prepared again on a fresh view: each round some agent's
        // batch wins whole, so rounds are few even when every agent contends. A batch larger
        // than one transaction may hold continues in the next round. A batch of one goes the
        // same way, so the ADDs queued while it lost a race join its next round instead of
        // waiting for it to win alone (every agent's first ADD races for the same lowest free
        // address when a burst begins).
        let mut attempt = 0;
        let mut prefetched: HashMap<String, Prefetched> = HashMap::new();
        let take_prefetched = |pending: &mut [PendingAdd], into: &mut HashMap<_, _>| {
            for p in pending {
                if let Some(read) = p.prefetched.take() {
                    into.insert(p.pod.key(), read);
                }
            }
        };
        take_prefetched(&mut pending, &mut prefetched);
        while !pending.is_empty() && attempt < Retry::CONFLICTS.attempts {
            // Start each round on the current state.
            if let Err(e) = cache.current(self.store.as_ref()).await {
                let msg = reason(&e);
                for p in pending.drain(..) {
                    let _ = p
                        .reply
                        .send(Err(StoreError::Unavailable(msg.clone()).into()));
                }
                break;
            }
            // The pod and endpoint of every member not read yet, in one round trip. A round
            // lost to an address another agent took wrote no object, so what the earlier
            // rounds read still holds.
            let round = std::time::Instant::now();
            let unread: Vec<&PendingAdd> = pending
                .iter()
                .filter(|p| !prefetched.contains_key(&p.pod.key()))
                .collect();
            let keys: Vec<(Kind, String)> = unread
                .iter()
                .flat_map(|p| [(Kind::Pod, p.pod.key()), (Kind::Endpoint, p.pod.key())])
                .collect();
            if !keys.is_empty() {
                // On an error each member reads for itself.
                if let Ok(read) = typed::get_many(self.store.as_ref(), &keys).await {
                    let mut it = read.into_iter();
                    for p in &unread {
                        prefetched.insert(p.pod.key(), (it.next().flatten(), it.next().flatten()));
                    }
                }
            }
            let read_us = round.elapsed().as_micros() as u64;
            let mut staged: Vec<(PendingAdd, Commit)> = Vec::new();
            let mut staged_ops = 0;
            let mut next = Vec::new();
            let mut endpoints = HashSet::new();
            for p in std::mem::take(&mut pending) {
                if staged_ops >= max_ops / 2 {
                    next.push(p);
                    continue;
                }
                if !endpoints.insert(p.pod.key()) {
                    alone.push(p); // one endpoint record per transaction
                    continue;
                }
                let pre = prefetched.get(&p.pod.key()).cloned();
                match self.prepare_add(&p.pod, &p.args, cache, true, pre).await {
                    Ok(Prepared::Done(resp)) => {
                        let _ = p.reply.send(Ok(resp));
                    }
                    Ok(Prepared::Commit(c)) if staged_ops + c.ops.len() > max_ops => next.push(p),
                    Ok(Prepared::Commit(c)) => {
                        staged_ops += c.ops.len();
                        cache.stage(&c.claimed, &c.released);
                        staged.push((p, c));
                    }
                    // Refusals on a followed view are made final on its own, on a fresh view
                    // (see try_add).
                    Ok(Prepared::Alone) | Err(ServiceError::Store(StoreError::Conflict(_))) => {
                        alone.push(p)
                    }
                    Err(ServiceError::Alloc(_)) if self.refusal_may_lift(cache) => alone.push(p),
                    Err(e) => {
                        let _ = p.reply.send(Err(e));
                    }
                }
            }
            pending = next;
            if staged.is_empty() {
                break; // what is left (if anything) goes one by one below
            }
            let ops: Vec<Op> = staged
                .iter()
                .flat_map(|(_, c)| c.ops.iter().cloned())
                .collect();
            let prepared_us = round.elapsed().as_micros() as u64;
            let (committed, raced) = self.counting_conflicts(self.commit(ops)).await;
            match committed {
                Ok(revision) => {
                    cache.staged_committed(revision);
                    if raced > 0 {
                        // Won, but other agents are writing the same pools.
                        cache.raced(round.elapsed());
                    }
                    self.metrics.batch_size.observe(staged.len() as f64);
                    tracing::debug!(
                        requests = staged.len(),
                        read_us,
                        prepared_us,
                        committed_us = round.elapsed().as_micros() as u64,
                        "committed a batch"
                    );
                    for (p, c) in staged {
                        c.recorded(self.records.as_deref());
                        c.log(&p.pod);
                        let _ = p.reply.send(Ok(c.resp));
                    }
                }
                Err(e @ StoreError::Conflict(_)) => {
                    attempt += 1;
                    if e.taken().is_none() {
                        // Some object may have been written or refused: read them again.
                        prefetched.clear();
                    }
                    self.metrics.allocation.conflict();
                    cache.conflicted(e.taken(), round.elapsed());
                    tracing::debug!(attempt, requests = staged.len(), conflict = %e, "batch: retrying after a conflict");
                    pending.extend(staged.into_iter().map(|(p, _)| p));
                    let jitter = u64::from(std::process::id() % 7) + u64::from(attempt);
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt) + jitter)).await;
                    // What queued meanwhile joins the next round (rounds stay bounded by the
                    // attempts, so the lock's holder does not serve an endless stream).
                    let mut joined = std::mem::take(&mut *self.queue.lock().expect("queue lock"));
                    take_prefetched(&mut joined, &mut prefetched);
                    pending.append(&mut joined);
                }
                Err(e) => {
                    cache.invalidate();
                    let msg = reason(&e);
                    for (p, _) in staged {
                        let _ = p
                            .reply
                            .send(Err(StoreError::Unavailable(msg.clone()).into()));
                    }
                }
            }
        }
        for p in pending.into_iter().chain(alone) {
            let r = retrying!(
                "allocate",
                Some(&self.metrics.allocation),
                self.try_add(&p.pod, &p.args, cache)
            );
            let _ = p.reply.send(r);
        }
    }
}

/// What an error says, for each member of a batch it failed (an unavailable datastore's
/// reason without its prefix, which the error each member gets says again).
fn reason(e: &StoreError) -> String {
    match e {
        StoreError::Unavailable(m) => m.clone(),
        other => other.to_string(),
    }
}
