//! The leader's reclaim loop: a full scan of every address when leadership is won and every
//! `--gc-interval`, and a look every `--gc-trace-gap` at the pods that pod and node events
//! marked (deleted, terminating, finished, moved to a dead node) and at the leaks seen once.
//! The decisions and the guarded release are `spiderpool_store::reclaim`'s, shared with
//! `spiderpoolctl ipam gc`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::watcher;
use kube::Api;
use spiderpool_store::reclaim::{self, Leak, Policy, Tracker};
use spiderpool_store::Store;

use crate::metrics::Metrics;

/// The leader's reclaimer.
pub struct Reclaimer {
    client: kube::Client,
    store: Arc<dyn Store>,
    policy: Policy,
    metrics: Arc<Metrics>,
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
    /// A reclaimer that acts only while `leading` says so.
    pub fn new(
        client: kube::Client,
        store: Arc<dyn Store>,
        policy: Policy,
        metrics: Arc<Metrics>,
        leading: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Reclaimer {
            client,
            store,
            policy,
            metrics,
            leading,
        }
    }

    /// Runs until aborted.
    pub async fn run(self, interval: Duration, gap: Duration) {
        let (tx, mut marks) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(watch_pods(self.client.clone(), tx.clone()));
        tokio::spawn(watch_nodes(self.client.clone(), tx));
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
                m = marks.recv() => {
                    match m {
                        Some(Mark::Pod(p)) => { marked.insert(p); }
                        Some(Mark::All) => scan_all = true,
                        None => return,
                    }
                    continue;
                }
            }
            let now = SystemTime::now();
            let ripe = if scan_all {
                scan_all = false;
                marked.clear();
                match reclaim::scan(self.store.as_ref(), &self.policy, None, now).await {
                    Ok(leaks) => {
                        tracing::debug!(leaks = leaks.len(), "full scan");
                        tracker.full(leaks, &self.policy, now)
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
                match reclaim::scan(self.store.as_ref(), &self.policy, Some(&pods), now).await {
                    Ok(leaks) => tracker.partial(&pods, leaks, &self.policy, now),
                    Err(e) => {
                        tracing::warn!(error = %e, "looking at marked pods failed");
                        marked = pods;
                        continue;
                    }
                }
            };
            for leak in ripe {
                self.take(&mut tracker, &leak).await;
            }
            self.metrics.tracking(tracker.len());
        }
    }

    async fn take(&self, tracker: &mut Tracker, leak: &Leak) {
        if !*self.leading.borrow() {
            return;
        }
        match reclaim::reclaim(self.store.as_ref(), &self.policy, leak, SystemTime::now()).await {
            Ok(Some(done)) => {
                tracing::info!(pod = %leak.pod, uid = %leak.uid, why = %leak.why,
                    released = ?done.released, endpoint_deleted = done.endpoint_deleted,
                    "reclaimed the addresses of a dead pod");
                self.metrics
                    .reclaimed(leak.cause.label(), done.released.len() as u64);
                tracker.forget(leak);
            }
            Ok(None) => {
                tracing::debug!(pod = %leak.pod, uid = %leak.uid, "no longer leaked");
                tracker.forget(leak);
            }
            Err(e) => {
                tracing::warn!(pod = %leak.pod, uid = %leak.uid, error = %e,
                    "reclaiming failed; trying again at the next look");
                self.metrics.failed();
            }
        }
    }
}

/// Marks every pod that was deleted, began terminating or finished.
async fn watch_pods(client: kube::Client, tx: tokio::sync::mpsc::UnboundedSender<Mark>) {
    let pods: Api<Pod> = Api::all(client);
    let mut events = watcher(pods, watcher::Config::default()).boxed();
    while let Some(ev) = events.next().await {
        let (pod, gone) = match ev {
            Ok(watcher::Event::Apply(p)) => (p, false),
            Ok(watcher::Event::Delete(p)) => (p, true),
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "pod watch");
                continue;
            }
        };
        let finished = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        if gone || finished || pod.metadata.deletion_timestamp.is_some() {
            let key = format!(
                "{}/{}",
                pod.metadata.namespace.unwrap_or_default(),
                pod.metadata.name.unwrap_or_default()
            );
            if tx.send(Mark::Pod(key)).is_err() {
                return;
            }
        }
    }
}

/// Asks for a full scan when a Node is deleted or stops being Ready.
async fn watch_nodes(client: kube::Client, tx: tokio::sync::mpsc::UnboundedSender<Mark>) {
    let nodes: Api<Node> = Api::all(client);
    let mut events = watcher(nodes, watcher::Config::default()).boxed();
    while let Some(ev) = events.next().await {
        let interesting = match ev {
            Ok(watcher::Event::Delete(_)) => true,
            Ok(watcher::Event::Apply(n)) => !ready(&n),
            _ => false,
        };
        if interesting && tx.send(Mark::All).is_err() {
            return;
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
