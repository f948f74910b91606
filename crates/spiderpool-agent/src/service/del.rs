//! DEL: releases what a container holds on a NIC and drops it from the endpoint record.

use spiderpool_api::agent::IpamDelArgs;
use std::net::IpAddr;

use spiderpool_api::crd::EndpointInterface;
use spiderpool_api::SpiderEndpoint;
use spiderpool_store::{Revision, StoreError};

use tokio::sync::oneshot;

use super::*;
use crate::view::{RecordBook, ViewCache};

/// A DEL waiting to be served.
pub(super) struct PendingDel {
    pod: PodRef,
    reply: oneshot::Sender<Result<()>>,
}

/// How many records a batch of DELs reads at once.
const PREPARE_AT_ONCE: usize = 16;

/// The addresses of a NIC, each with its pool.
type Held = Vec<(String, IpAddr)>;

/// A NIC's record as read: the endpoint's key, the endpoint, its revision and the NIC.
type Record = (String, SpiderEndpoint, Revision, EndpointInterface);

/// What a record holds once its NIC's addresses are dropped from it.
fn left_of((_, ep, _, nic): &Record) -> Held {
    let gone = nic.held();
    ep.held()
        .into_iter()
        .filter(|a| !gone.contains(a))
        .collect()
}

/// What a DEL is to do.
enum PreparedDel {
    /// Nothing to release, or what the container holds stays (said in the log).
    Done,
    /// These ops release the NIC's addresses and drop it from its record (as read).
    Commit { ops: Vec<Op>, record: Box<Record> },
    /// The record was deleted before this DEL (by the garbage collector once its Pod was
    /// gone, which a force-deleted pod or a grace period of 0 lets happen first): these ops
    /// release what it named, where this container still holds it on this NIC.
    Departed { ops: Vec<Op>, named: Held },
}

/// The pod's record as the book keeps it whole (this node's, followed by a watch), when it
/// holds the request's NIC: the DEL writes it back guarded by the copy's revision.
fn known_record(book: Option<&RecordBook>, pod: &PodRef) -> Option<Record> {
    let key = pod.key();
    let (ep, rev) = book?.whole(&key)?;
    let nic = nic_of(&ep, pod)?;
    Some((key, ep, rev, nic))
}

impl IpamService {
    /// CNI DEL: releases what the container holds on the NIC; succeeds when there is nothing.
    /// Group commit, as ADD: the request joins the queue, and whoever holds the lock serves
    /// every DEL queued so far with one transaction (one status write per pool).
    pub async fn del(&self, args: &IpamDelArgs) -> Result<()> {
        let pod = PodRef::of_del(args)?;
        let (tx, mut rx) = oneshot::channel();
        let first = {
            let mut q = self.del_queue.lock().expect("queue lock");
            q.push(PendingDel { pod, reply: tx });
            q.len() == 1
        };
        // While release commits meet conflicts, the DEL that found the queue empty waits for
        // others to join it; those that joined wait for its answer (and serve themselves if
        // it does not come).
        let window = self.gather.window();
        // While the window is open the pool writes are what is slow: they are held back and
        // go in one write per pool later (deferred.rs); the DEL does not wait for company.
        let defer = self.deferred.now(window);
        if !window.is_zero() && !defer {
            if first {
                tokio::time::sleep(window).await;
            } else if let Ok(Ok(r)) =
                tokio::time::timeout(window * 2 + Duration::from_millis(100), &mut rx).await
            {
                return r;
            }
        }
        let mut cache = self.state.lock().await;
        if let Ok(r) = rx.try_recv() {
            return r;
        }
        let batch: Vec<PendingDel> =
            std::mem::take(&mut *self.del_queue.lock().expect("queue lock"));
        let ((), conflicts) = self
            .counting_conflicts(self.del_batch(batch, &mut cache, defer))
            .await;
        drop(cache);
        // Held-back releases are judged by their flushes.
        if !defer {
            self.observe_release_conflicts(conflicts);
        }
        rx.try_recv().unwrap_or_else(|_| {
            Err(
                StoreError::Unavailable("the request was abandoned while queued; try again".into())
                    .into(),
            )
        })
    }

    /// `work`'s outcome, and how many pool writes it saw refused (409) and laid again.
    pub(super) async fn counting_conflicts<T>(
        &self,
        work: impl std::future::Future<Output = T>,
    ) -> (T, u64) {
        let before = self.store.write_counts().pool_conflicts;
        let r = work.await;
        let after = self.store.write_counts().pool_conflicts;
        (r, after.saturating_sub(before))
    }

    /// A release commit (or flush) met `conflicts`: the gather window and its gauge follow.
    pub(super) fn observe_release_conflicts(&self, conflicts: u64) {
        let window = self.gather.observe(conflicts);
        self.metrics
            .release_gather_seconds
            .set(window.as_secs_f64());
    }

    /// Serves queued DELs: their releases and record updates in one transaction; when it
    /// fails (a conflict on a record, a corrupt pool), each is served alone with its retries.
    /// With `defer`, only the records are written now and the releases are held back.
    async fn del_batch(&self, batch: Vec<PendingDel>, cache: &mut ViewCache, defer: bool) {
        let mut alone = Vec::new();
        let mut staged: Vec<(PendingDel, String, Held, Held)> = Vec::new();
        let mut ops: Vec<Op> = Vec::new();
        let mut keys = std::collections::HashSet::new();
        let max_ops = self.store.max_ops();
        let started = std::time::Instant::now();
        let requests = batch.len();
        if batch.len() == 1 && !defer {
            alone = batch;
        } else {
            // The records are read side by side (a round trip each on Kubernetes), a chunk at
            // a time.
            let mut prepared = Vec::with_capacity(batch.len());
            let book = cache.records();
            for chunk in batch.chunks(PREPARE_AT_ONCE) {
                prepared.extend(
                    futures_util::future::join_all(
                        chunk
                            .iter()
                            .map(|p| self.prepare_del(&p.pod, book.as_deref())),
                    )
                    .await,
                );
            }
            for (p, prepared) in batch.into_iter().zip(prepared) {
                match prepared {
                    Ok(PreparedDel::Done) => {
                        let _ = p.reply.send(Ok(()));
                    }
                    // One record per transaction, and no more ops than it takes.
                    Ok(PreparedDel::Commit { ops: o, record })
                        if keys.insert(record.0.clone()) && ops.len() + o.len() <= max_ops =>
                    {
                        ops.extend(o);
                        let left = left_of(&record);
                        staged.push((p, record.0, record.3.held(), left));
                    }
                    Ok(PreparedDel::Commit { .. } | PreparedDel::Departed { .. }) | Err(_) => {
                        alone.push(p)
                    }
                }
            }
        }
        if staged.len() == 1 && !defer {
            alone.extend(staged.drain(..).map(|(p, _, _, _)| p));
        }
        let prepared_us = started.elapsed().as_micros() as u64;
        let held_back: Vec<Op> = if defer {
            let (releases, records) = ops
                .into_iter()
                .partition(|o| matches!(o, Op::Release { .. }));
            ops = records;
            releases
        } else {
            Vec::new()
        };
        if !staged.is_empty() {
            match self.commit(ops).await {
                Ok(revision) => {
                    let released: Vec<(String, IpAddr)> = if defer {
                        // Held by the old container in the pool until the flush.
                        self.deferred.hold(held_back);
                        Vec::new()
                    } else {
                        staged
                            .iter()
                            .flat_map(|(_, _, r, _)| r.iter().cloned())
                            .collect()
                    };
                    cache.committed(revision, &[], &released);
                    self.metrics.del_batch_size.observe(staged.len() as f64);
                    tracing::debug!(
                        requests,
                        committed = staged.len(),
                        alone = alone.len(),
                        prepared_us,
                        committed_us = started.elapsed().as_micros() as u64,
                        "committed a batch of releases"
                    );
                    let book = cache.records();
                    for (p, key, released, left) in staged {
                        if let Some(book) = &book {
                            book.correct(&key, left);
                        }
                        tracing::info!(pod = %key, nic = %p.pod.nic, released = ?released,
                            pool_write_held_back = defer, "released");
                        let _ = p.reply.send(Ok(()));
                    }
                }
                Err(e) => {
                    tracing::debug!(requests = staged.len(), error = %e,
                        "a batch of releases failed; serving each alone");
                    cache.invalidate();
                    // A copy of a record a moment behind fails its write: each reads afresh.
                    if let Some(book) = cache.records() {
                        for (_, key, _, _) in &staged {
                            book.forget(key);
                        }
                    }
                    alone.extend(staged.into_iter().map(|(p, _, _, _)| p));
                }
            }
        }
        for p in alone {
            let r = retrying!(
                "release",
                Some(&self.metrics.release),
                self.try_del(&p.pod, cache)
            );
            let _ = p.reply.send(r);
        }
    }

    /// What the DEL of `pod` is to do, on what the datastore says now.
    async fn prepare_del(&self, pod: &PodRef, book: Option<&RecordBook>) -> Result<PreparedDel> {
        // A KubeVirt launcher pod's addresses are the VMI's: released here once neither the
        // VMI nor its VM lives (and only by the container that holds them, so the source of a
        // live migration never releases what the target holds).
        let vm;
        let (pod, found) = match known_record(book, pod) {
            Some(r) => (pod, Some(r)),
            None => match record_of(self.store.as_ref(), pod).await? {
                Some(r) => (pod, Some(r)),
                None => match self.vm_pod(pod).await? {
                    Some(v) => {
                        vm = v;
                        let r = record_of(self.store.as_ref(), &vm).await?;
                        (&vm, r)
                    }
                    None => (pod, None),
                },
            },
        };
        let Some((key, ep, rev, nic)) = found else {
            let departed = book
                .and_then(|b| b.departed(&pod.key()))
                .filter(|_| !pod.container_id.is_empty());
            if let Some(named) = departed {
                // Each release is owned by this container and NIC: an address another holder
                // has now is left alone.
                let ops = named
                    .iter()
                    .map(|(pool, ip)| Op::Release {
                        pool: pool.clone(),
                        ip: *ip,
                        container_id: pod.container_id.clone(),
                        nic: pod.nic.clone(),
                        pod_uid: String::new(),
                    })
                    .collect();
                return Ok(PreparedDel::Departed { ops, named });
            }
            tracing::info!(pod = %pod.key(), nic = %pod.nic, container_id = %pod.container_id, "nothing held by this container");
            return Ok(PreparedDel::Done);
        };
        if nic.container_id.is_empty() && self.incarnation_lives(pod, &ep).await? {
            // A record that names no container cannot say whether this DEL is for the sandbox
            // that holds the addresses: while the pod incarnation lives they stay (a new
            // sandbox's ADD hands them back and allocates afresh; the pod's deletion releases
            // them).
            tracing::info!(pod = %key, nic = %pod.nic, container_id = %pod.container_id,
                "keeping a record without a container ID while its pod lives");
            return Ok(PreparedDel::Done);
        }
        if self.keeps_addresses(pod, &ep).await? {
            tracing::info!(pod = %key, nic = %pod.nic, owner = %ep.status.owner_controller_name,
                "keeping the addresses of a StatefulSet member or a live VM for its next sandbox");
            return Ok(PreparedDel::Done);
        }
        let mut ops = Op::releases_of(&nic, &ep.status.current.uid);
        let mut kept = ep.clone();
        kept.status.current.ips.retain(|n| n.interface != pod.nic);
        ops.push(endpoint_write(key.clone(), &kept, Some(rev)));
        Ok(PreparedDel::Commit {
            ops,
            record: Box::new((key, ep, rev, nic)),
        })
    }

    pub(super) async fn try_del(&self, pod: &PodRef, cache: &mut ViewCache) -> Result<()> {
        let book = cache.records();
        let (ops, record) = match self.prepare_del(pod, book.as_deref()).await? {
            PreparedDel::Done => return Ok(()),
            PreparedDel::Commit { ops, record } => (ops, record),
            PreparedDel::Departed { ops, named } => {
                let revision = self.commit(ops).await?;
                // What was released is not known here (only what this container held): the
                // view learns it afresh.
                cache.committed(revision, &[], &[]);
                cache.invalidate();
                tracing::info!(pod = %pod.key(), nic = %pod.nic, container_id = %pod.container_id,
                    named = ?named,
                    "the record was deleted before this DEL; released what it named that this container held");
                return Ok(());
            }
        };
        let left = left_of(&record);
        let revision = match self.commit(ops).await {
            Ok(r) => r,
            Err(e @ StoreError::Corrupt { .. }) => {
                return self.del_around_corrupt(pod, cache, *record, e).await
            }
            Err(e) => {
                // Its retry reads the record afresh (the copy may have been behind).
                if let Some(book) = &book {
                    book.forget(&record.0);
                }
                return Err(e.into());
            }
        };
        let (key, _, _, nic) = *record;
        cache.committed(revision, &[], &nic.held());
        if let Some(book) = &book {
            book.correct(&key, left);
        }
        tracing::info!(pod = %key, nic = %pod.nic, released = ?nic.held(), "released");
        Ok(())
    }

    /// A DEL whose release failed because a pool's status cannot be read: what the readable
    /// pools hold is released, the rest stays recorded on the endpoint (the controller takes it
    /// back once the pool is mended and the pod is gone), and the teardown goes on.
    async fn del_around_corrupt(
        &self,
        pod: &PodRef,
        cache: &mut ViewCache,
        (key, ep, rev, nic): Record,
        cause: StoreError,
    ) -> Result<()> {
        let mut unreadable = std::collections::BTreeSet::new();
        for (pool, _) in nic.held() {
            if let Err(StoreError::Corrupt { .. }) = self.store.allocations(&pool).await {
                unreadable.insert(pool);
            }
        }
        if unreadable.is_empty() {
            return Err(cause.into());
        }
        // The NIC's record keeps only the addresses of the unreadable pools.
        let mut rest = nic.clone();
        if rest
            .ipv4_pool
            .as_ref()
            .is_none_or(|p| !unreadable.contains(p))
        {
            (rest.ipv4, rest.ipv4_pool, rest.ipv4_gateway) = (None, None, None);
        }
        if rest
            .ipv6_pool
            .as_ref()
            .is_none_or(|p| !unreadable.contains(p))
        {
            (rest.ipv6, rest.ipv6_pool, rest.ipv6_gateway) = (None, None, None);
        }
        let released: Held = nic
            .held()
            .into_iter()
            .filter(|(p, _)| !unreadable.contains(p))
            .collect();
        tracing::warn!(pod = %key, nic = %pod.nic, error = %cause, unreadable = ?unreadable,
            released = ?released,
            "releasing what the readable pools hold; the rest stays recorded for the controller");
        if released.is_empty() {
            return Ok(());
        }
        let mut ops: Vec<Op> = Op::releases_of(&nic, &ep.status.current.uid)
            .into_iter()
            .filter(|op| !matches!(op, Op::Release { pool, .. } if unreadable.contains(pool)))
            .collect();
        let mut kept = ep.clone();
        for n in kept.status.current.ips.iter_mut() {
            if n.interface == pod.nic {
                *n = rest.clone();
            }
        }
        ops.push(endpoint_write(key, &kept, Some(rev)));
        let revision = self.commit(ops).await?;
        cache.committed(revision, &[], &released);
        Ok(())
    }

    /// Whether the pod incarnation `ep` records still lives: its Pod exists with the record's
    /// UID, is not being deleted and has not finished.
    async fn incarnation_lives(&self, pod: &PodRef, ep: &SpiderEndpoint) -> Result<bool> {
        let found = typed::get(self.store.as_ref(), Kind::Pod, &pod.key()).await?;
        let Some(p) = found.and_then(|(o, _)| kube_of(o)) else {
            return Ok(false);
        };
        let phase = p.status.get("phase").and_then(|v| v.as_str()).unwrap_or("");
        Ok(
            p.metadata.uid.as_deref() == Some(ep.status.current.uid.as_str())
                && p.metadata.deletion_timestamp.is_none()
                && !matches!(phase, "Succeeded" | "Failed"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spiderpool_api::agent::IpamAddArgs;
    use spiderpool_store::memory::MemoryStore;
    use spiderpool_store::Expect;

    #[tokio::test]
    async fn a_del_guarded_by_a_copy_behind_its_record_reads_the_record_and_releases() {
        let store = Arc::new(MemoryStore::new());
        store
            .commit(vec![Op::Put {
                kind: Kind::IPPool,
                key: "p".into(),
                value: serde_json::json!({
                    "apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
                    "metadata": {"name": "p"},
                    "spec": {"subnet": "10.9.0.0/24", "ips": ["10.9.0.1-10.9.0.4"]}}),
                expect: Expect::Absent,
            }])
            .await
            .unwrap();
        let svc = IpamService::new(
            store.clone(),
            NodeIdentity {
                name: "n1".into(),
                labels: Default::default(),
            },
        );
        let add = IpamAddArgs {
            container_id: "c1".into(),
            if_name: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: "web-0".into(),
            default_ipv4_ippool: vec!["p".into()],
            ..Default::default()
        };
        svc.add(&add).await.unwrap();
        assert_eq!(store.allocations("p").await.unwrap().len(), 1);
        let key = "default/web-0";
        let (o, rev) = typed::get(store.as_ref(), Kind::Endpoint, key)
            .await
            .unwrap()
            .unwrap();
        // The book keeps the record as a watch told it; then someone else rewrites it, and
        // the watch has not told that yet.
        let book = svc.records.clone().unwrap();
        book.told_whole(key, endpoint_of(o).unwrap(), rev);
        let mut touched = store.get(Kind::Endpoint, key).await.unwrap().unwrap().value;
        touched["metadata"]["annotations"] = serde_json::json!({"touched": "yes"});
        store
            .commit(vec![Op::Put {
                kind: Kind::Endpoint,
                key: key.into(),
                value: touched,
                expect: Expect::Revision(rev),
            }])
            .await
            .unwrap();
        let del = IpamDelArgs {
            container_id: "c1".into(),
            if_name: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: "web-0".into(),
            ..Default::default()
        };
        svc.del(&del).await.unwrap();
        // The write guarded by the copy was refused, the copy dropped, and the retry read the
        // record: the address is released and the record gone.
        assert!(book.whole(key).is_none());
        assert!(store.allocations("p").await.unwrap().is_empty());
        assert!(store.get(Kind::Endpoint, key).await.unwrap().is_none());
    }
}
