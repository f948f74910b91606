//! The leader's SpiderSubnet auto-pool loop: every Deployment, ReplicaSet, StatefulSet,
//! DaemonSet, Job and CronJob event, every event of an auto pool, and every event of a pod
//! asking for subnets whose top controller is a third party's (an OpenKruise CloneSet, say:
//! its pools have the fixed size the pod's annotations give) queues its application;
//! each queued application is reconciled by `spiderpool_control::autopool` (the same reconciler
//! `spiderpoolctl` runs outside a cluster). Applications that failed (a subnet full or missing)
//! are tried again on every subnet event and after a back-off; every application is looked at
//! again each resync.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::DynamicObject;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use spiderpool_api::autopool;
use spiderpool_control::apply::ApplyError;
use spiderpool_control::autopool::{reconcile, Action, Settings};
use spiderpool_store::Kind;

use crate::cache::{CachedKube, Change, Event};
use crate::metrics::Metrics;

/// How long events are gathered before one pass.
const COALESCE: Duration = Duration::from_millis(200);
/// How many gone applications have their pools deleted at once.
const REMOVALS_AT_ONCE: usize = 8;
/// How soon a failed application is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// What an event asks of the loop.
enum Queued {
    App(String),
    /// A pod asks for auto pools: its application, when a third party's.
    Pod(Arc<DynamicObject>),
    /// A subnet changed: failed applications may succeed now.
    Subnet,
    /// A watch missed events: every application.
    All,
}

fn key_of_pool(o: &DynamicObject) -> Option<String> {
    let labels = o.metadata.labels.as_ref()?;
    if !autopool::is_auto(labels) {
        return None;
    }
    let affinity = o.data.pointer("/spec/podAffinity/matchLabels")?;
    let affinity: BTreeMap<String, String> = serde_json::from_value(affinity.clone()).ok()?;
    Some(autopool::App::from_affinity(&affinity)?.key())
}

/// Whether a pod names subnets and has a controller (its application may be a third party's).
fn asks_for_auto_pools(o: &DynamicObject) -> bool {
    let named = o.metadata.annotations.as_ref().is_some_and(|a| {
        a.contains_key(spiderpool_api::keys::SUBNET)
            || a.contains_key(spiderpool_api::keys::SUBNETS)
    });
    named
        && o.metadata
            .owner_references
            .as_ref()
            .is_some_and(|r| r.iter().any(|r| r.controller == Some(true)))
}

/// The application of a pod that asks for auto pools, when a third party's.
async fn third_party_app(store: &CachedKube, o: &DynamicObject) -> Option<String> {
    let pod: spiderpool_api::KubeObject = serde_json::to_value(o)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())?;
    let app = spiderpool_control::autopool::top_controller(store, &pod)
        .await
        .ok()??;
    (!app.built_in()).then(|| app.key())
}

/// What a cache event asks of the loop.
fn queued(ev: &Event) -> Vec<Queued> {
    match (&ev.change, ev.kind) {
        (Change::Relisted, _) => vec![Queued::All],
        (_, Kind::Subnet) => vec![Queued::Subnet],
        (Change::Applied(o) | Change::Deleted(o), Kind::IPPool) => {
            key_of_pool(o).map(Queued::App).into_iter().collect()
        }
        (_, Kind::Workload) => vec![Queued::App(ev.key.clone())],
        (Change::Applied(o) | Change::Deleted(o), Kind::Pod) if asks_for_auto_pools(o) => {
            vec![Queued::Pod(o.clone())]
        }
        _ => Vec::new(),
    }
}

fn take(
    q: Vec<Queued>,
    queue: &mut BTreeSet<String>,
    pods: &mut Vec<Arc<DynamicObject>>,
    failed: &BTreeMap<String, tokio::time::Instant>,
    all: &mut bool,
) {
    for x in q {
        match x {
            Queued::App(k) => {
                queue.insert(k);
            }
            Queued::Pod(o) => pods.push(o),
            Queued::Subnet => queue.extend(failed.keys().cloned()),
            Queued::All => *all = true,
        }
    }
}

/// The application under a workload key, as an event's object.
fn reference(key: &str) -> Option<ObjectReference> {
    let mut parts = key.splitn(3, '/');
    let (namespace, kind, name) = (parts.next()?, parts.next()?, parts.next()?);
    let api_version = match autopool::split_key_kind(kind) {
        (_, Some((version, ""))) => version.to_string(),
        (_, Some((version, group))) => format!("{group}/{version}"),
        (k, None) => format!(
            "{}/v1",
            autopool::APP_KINDS.iter().find(|(_, x)| *x == k)?.0
        ),
    };
    let kind = autopool::split_key_kind(kind).0;
    Some(ObjectReference {
        api_version: Some(api_version),
        kind: Some(kind.to_string()),
        namespace: Some(namespace.to_string()),
        name: Some(name.to_string()),
        ..Default::default()
    })
}

/// The event of an action on one of the application's pools (`kubectl describe deployment`
/// shows them); none while a pool waits for its addresses.
fn event_of(action: &Action) -> Option<KubeEvent> {
    let reason = match action {
        Action::Created { .. } => "CreateIPPool",
        Action::Scaled { .. } => "ScaleIPPool",
        Action::Adopted { .. } => "TakeOverIPPool",
        Action::Deleted { .. } => "DeleteIPPool",
        Action::Reserved { .. } => "KeepIPPool",
        Action::Waiting { .. } => return None,
    };
    Some(KubeEvent {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(action.to_string()),
        action: reason.into(),
        secondary: None,
    })
}

/// Publishes the events sent on the channel, in order, on their applications; logs (does not
/// fail) when one cannot be published. A task of its own, so reconciling never waits for it.
async fn publish(
    recorder: Recorder,
    mut events: tokio::sync::mpsc::UnboundedReceiver<(String, KubeEvent)>,
) {
    while let Some((key, event)) = events.recv().await {
        let Some(r) = reference(&key) else { continue };
        if let Err(e) = recorder.publish(&event, &r).await {
            tracing::debug!(app = %key, error = %e, "auto pools: publishing an event");
        }
    }
}

/// Whether the application `key` is one of the kinds the cache holds and its workload is gone
/// or going (a third party's is read from the API, so it is never taken for gone).
fn gone(store: &CachedKube, key: &str) -> bool {
    let built_in = key
        .split('/')
        .nth(1)
        .is_some_and(|kind| autopool::APP_KINDS.iter().any(|(_, k)| *k == kind));
    built_in
        && store
            .caches()
            .get(Kind::Workload, key)
            .is_none_or(|w| w.metadata.deletion_timestamp.is_some())
}

/// Runs until aborted; events are published as the controller `identity`.
pub async fn run(
    client: kube::Client,
    store: CachedKube,
    settings: Settings,
    resync: Duration,
    identity: String,
    metrics: Arc<Metrics>,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "spiderpool-controller".into(),
            instance: Some(identity),
        },
    );
    let (to_publish, published) = tokio::sync::mpsc::unbounded_channel();
    // Ends when `to_publish` is dropped with this future.
    tokio::spawn(publish(recorder, published));
    let mut events =
        store
            .caches()
            .events(&[Kind::Workload, Kind::IPPool, Kind::Subnet, Kind::Pod]);
    store.caches().synced().await;

    let mut queue: BTreeSet<String> = BTreeSet::new();
    let mut pods: Vec<Arc<DynamicObject>> = Vec::new();
    let mut failed: BTreeMap<String, tokio::time::Instant> = BTreeMap::new();
    let mut all = false;
    let mut tick = tokio::time::interval(resync);
    let mut retry = tokio::time::interval(RETRY);
    loop {
        tokio::select! {
            _ = tick.tick() => all = true,
            _ = retry.tick() => {
                let now = tokio::time::Instant::now();
                queue.extend(failed.iter().filter(|(_, at)| **at <= now).map(|(k, _)| k.clone()));
            }
            ev = events.next() => {
                let Some(ev) = ev else { return };
                take(queued(&ev), &mut queue, &mut pods, &failed, &mut all);
                let quiet = tokio::time::sleep(COALESCE);
                tokio::pin!(quiet);
                loop {
                    tokio::select! {
                        _ = &mut quiet => break,
                        ev = events.next() => match ev {
                            Some(ev) => take(queued(&ev), &mut queue, &mut pods, &failed, &mut all),
                            None => return,
                        },
                    }
                }
            }
        }
        if all {
            // Pods waiting for a third party's pools that no pool names yet.
            pods.extend(
                store
                    .caches()
                    .list(Kind::Pod)
                    .into_iter()
                    .map(|(_, o)| o)
                    .filter(|o| asks_for_auto_pools(o)),
            );
        }
        for o in std::mem::take(&mut pods) {
            queue.extend(third_party_app(&store, &o).await);
        }
        if queue.is_empty() && !all {
            continue;
        }
        let before = store.api_reads();
        tracing::debug!(queued = queue.len(), all, "auto pools: a pass");
        if std::mem::take(&mut all) {
            match spiderpool_control::autopool::applications(&store).await {
                Ok(every) => queue.extend(every),
                Err(e) => tracing::warn!(error = %e, "auto pools: listing the applications"),
            }
        }
        // Applications that are gone only lose pools, side by side; the others may carve from a
        // subnet they share, one after the other (two carves at once would pick the same
        // addresses, and the admission webhook would refuse the second).
        let (gone, live): (Vec<String>, Vec<String>) = std::mem::take(&mut queue)
            .into_iter()
            .partition(|key| gone(&store, key));
        let removals: Vec<_> = gone
            .into_iter()
            .map(|key| {
                let store = store.clone();
                async move {
                    let r = reconcile(&store, &key, settings).await;
                    (key, r)
                }
            })
            .collect();
        let mut results: Vec<_> = futures_util::stream::iter(removals)
            .buffer_unordered(REMOVALS_AT_ONCE)
            .collect()
            .await;
        for key in live {
            let r = reconcile(&store, &key, settings).await;
            results.push((key, r));
        }
        for (key, r) in results {
            match r {
                Ok(report) => {
                    failed.remove(&key);
                    for a in &report.actions {
                        tracing::info!(app = %report.app, "{a}");
                        if let Some(ev) = event_of(a) {
                            let _ = to_publish.send((key.clone(), ev));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(app = %key, error = %e, "auto pools: trying again");
                    let message = e.to_string();
                    let reason = match e {
                        ApplyError::SubnetChanged(_) => "ApplicationSubnetChanged",
                        _ => "AutoPoolFailed",
                    };
                    let ev = KubeEvent {
                        type_: EventType::Warning,
                        reason: reason.into(),
                        note: Some(message.chars().take(1000).collect()),
                        action: "ReconcileIPPool".into(),
                        secondary: None,
                    };
                    let _ = to_publish.send((key.clone(), ev));
                    failed.insert(key, tokio::time::Instant::now() + RETRY);
                }
            }
        }
        metrics.pass("autopool", store.api_reads() - before);
    }
}
