//! The leader's reclaim loop: a full scan of every address when leadership is won and every
//! `--gc-interval`, and a look every `--gc-trace-gap` at the pods that pod and node events
//! marked (deleted, terminating, finished, moved to a dead node) and at the leaks seen once.
//! The decisions and the guarded release are `spiderpool_control::reclaim`'s, shared with
//! `spiderpoolctl ipam gc`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use spiderpool_control::reclaim::{self, Leak, Outcome, Policy, Tracker};
use spiderpool_store::Kind;

use crate::cache::{CachedKube, Caches, Change};
use crate::invalid::{Bad, Invalid};

use crate::metrics::Metrics;

/// The leader's reclaimer.
pub struct Reclaimer {
    store: CachedKube,
    policy: Policy,
    metrics: Arc<Metrics>,
    invalid: Arc<Invalid>,
    leading: tokio::sync::watch::Receiver<bool>,
}

/// What the watches ask of the loop.
enum Mark {
    /// Look at this pod (`namespace/name`).
    Pod(String),
    /// Scan everything (a node went away or NotReady).
    All,
}

impl Reclaimer {
    /// A reclaimer that acts only while `leading` says so; the objects its full scans skip
    /// go to `invalid`.
    pub fn new(
        store: CachedKube,
        policy: Policy,
        metrics: Arc<Metrics>,
        invalid: Arc<Invalid>,
        leading: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Reclaimer {
            store,
            policy,
            metrics,
            invalid,
            leading,
        }
    }

    /// Runs until aborted.
    pub async fn run(self, interval: Duration, gap: Duration) {
        let (tx, mut marked_rx) = tokio::sync::mpsc::unbounded_channel();
        let watching = tokio::spawn(marks(self.store.caches().clone(), tx));
        let _stop_watching = AbortOnDrop(watching);
        self.store.caches().synced().await;
        let mut tracker = Tracker::new();
        let mut full = tokio::time::interval(interval);
        let mut trace = tokio::time::interval(gap);
        trace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        full.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut marked: BTreeSet<String> = BTreeSet::new();
        let mut scan_all = false;
        loop {
            tokio::select! {
                _ = full.tick() => scan_all = true,
                _ = trace.tick() => {}
                m = marked_rx.recv() => {
                    match m {
                        Some(Mark::Pod(p)) => { marked.insert(p); }
                        Some(Mark::All) => scan_all = true,
                        None => return,
                    }
                    continue;
                }
            }
            let now = SystemTime::now();
            let before = self.store.api_reads();
            let ripe = if scan_all {
                scan_all = false;
                marked.clear();
                match reclaim::scan(&self.store, &self.policy, None, now).await {
                    Ok(scan) => {
                        tracing::debug!(
                            leaks = scan.leaks.len(),
                            skipped = scan.unreadable.len(),
                            "full scan"
                        );
                        self.invalid.pass(
                            "reclaim",
                            scan.unreadable
                                .into_iter()
                                .map(|u| Bad::new(u.kind, u.name, u.problem))
                                .collect(),
                        );
                        tracker.full(scan.leaks, &self.policy, now)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "full scan failed; trying again at the next look");
                        scan_all = true;
                        continue;
                    }
                }
            } else {
                // The marked pods and those already seen leaked once.
                let mut pods = std::mem::take(&mut marked);
                pods.extend(tracker.pods());
                if pods.is_empty() {
                    continue;
                }
                match reclaim::scan(&self.store, &self.policy, Some(&pods), now).await {
                    Ok(scan) => tracker.partial(&pods, scan.leaks, &self.policy, now),
                    Err(e) => {
                        tracing::warn!(error = %e, "looking at marked pods failed");
                        marked = pods;
                        continue;
                    }
                }
            };
            if !ripe.is_empty() {
                self.take(&mut tracker, &ripe).await;
            }
            self.metrics.tracking(tracker.len());
            self.metrics
                .pass("reclaim", self.store.api_reads() - before);
        }
    }

    /// Reclaims the ripe leaks together: one status write per pool for all of them.
    async fn take(&self, tracker: &mut Tracker, ripe: &[Leak]) {
        if !*self.leading.borrow() {
            return;
        }
        let outcomes =
            match reclaim::reclaim_all(&self.store, &self.policy, ripe, SystemTime::now()).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(leaks = ripe.len(), error = %e,
                        "reclaiming failed; trying again at the next look");
                    self.metrics.failed();
                    return;
                }
            };
        for (leak, outcome) in ripe.iter().zip(outcomes) {
            match outcome {
                Outcome::Reclaimed(done) => {
                    tracing::info!(pod = %leak.pod, uid = %leak.uid, why = %leak.why,
                        released = ?done.released, endpoint_deleted = done.endpoint_deleted,
                        "reclaimed the addresses of a dead pod");
                    self.metrics
                        .reclaimed(leak.cause.label(), done.released.len() as u64);
                    tracker.forget(leak);
                }
                Outcome::NotLeaked => {
                    tracing::debug!(pod = %leak.pod, uid = %leak.uid, "no longer leaked");
                    tracker.forget(leak);
                }
                Outcome::Failed(e) => {
                    tracing::warn!(pod = %leak.pod, uid = %leak.uid, error = %e,
                        "reclaiming failed; trying again at the next look");
                    self.metrics.failed();
                }
            }
        }
    }
}

/// Marks every pod that was deleted, began terminating or finished, and asks for a full scan
/// when a Node is deleted or stops being Ready (or a watch missed events).
async fn marks(caches: Arc<Caches>, tx: tokio::sync::mpsc::UnboundedSender<Mark>) {
    let mut events = caches.events(&[Kind::Pod, Kind::Node]);
    while let Some(ev) = events.next().await {
        // A KubeVirt launcher pod that goes may have been its VM's last: the VM's addresses
        // (held under its VMI's name) are looked at too.
        if let (Kind::Pod, Change::Deleted(o)) = (ev.kind, &ev.change) {
            let vmi = o.metadata.owner_references.iter().flatten().find(|r| {
                r.controller == Some(true)
                    && r.kind == spiderpool_api::keys::VMI_KIND
                    && r.api_version.starts_with("kubevirt.io/")
            });
            if let (Some(r), Some(ns)) = (vmi, &o.metadata.namespace) {
                if tx.send(Mark::Pod(format!("{ns}/{}", r.name))).is_err() {
                    return;
                }
            }
        }
        let mark = match (ev.kind, &ev.change) {
            (_, Change::Relisted) => Some(Mark::All),
            (Kind::Pod, Change::Deleted(_)) => Some(Mark::Pod(ev.key)),
            (Kind::Pod, Change::Applied(o)) => {
                let finished = o
                    .data
                    .pointer("/status/phase")
                    .and_then(serde_json::Value::as_str)
                    .is_some_and(|p| p == "Succeeded" || p == "Failed");
                (finished || o.metadata.deletion_timestamp.is_some()).then_some(Mark::Pod(ev.key))
            }
            (Kind::Node, Change::Deleted(_)) => Some(Mark::All),
            (Kind::Node, Change::Applied(o)) => {
                let node: Option<Node> = (**o).clone().try_parse().ok();
                (!node.as_ref().is_some_and(ready)).then_some(Mark::All)
            }
            _ => None,
        };
        if let Some(m) = mark {
            if tx.send(m).is_err() {
                return;
            }
        }
    }
}

fn ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Aborts the task when dropped (the reclaimer's mark feed ends with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
