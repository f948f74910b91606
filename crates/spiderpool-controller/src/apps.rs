//! The leader's SpiderSubnet auto-pool loop: every Deployment, ReplicaSet, StatefulSet,
//! DaemonSet, Job and CronJob event, and every event of an auto pool, queues its application;
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
/// How soon a failed application is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// What an event asks of the loop.
enum Queued {
    App(String),
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
    let name = o
        .data
        .pointer("/spec/podAffinity/matchLabels")?
        .get(spiderpool_api::keys::APP_NAME)?
        .as_str()?;
    Some(format!(
        "{}/{}/{name}",
        labels.get(spiderpool_api::keys::LABEL_APP_NAMESPACE)?,
        labels.get(spiderpool_api::keys::LABEL_APP_KIND)?
    ))
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
        _ => Vec::new(),
    }
}

fn take(
    q: Vec<Queued>,
    queue: &mut BTreeSet<String>,
    failed: &BTreeMap<String, tokio::time::Instant>,
    all: &mut bool,
) {
    for x in q {
        match x {
            Queued::App(k) => {
                queue.insert(k);
            }
            Queued::Subnet => queue.extend(failed.keys().cloned()),
            Queued::All => *all = true,
        }
    }
}

/// The application under a workload key, as an event's object.
fn reference(key: &str) -> Option<ObjectReference> {
    let mut parts = key.splitn(3, '/');
    let (namespace, kind, name) = (parts.next()?, parts.next()?, parts.next()?);
    let group = autopool::APP_KINDS.iter().find(|(_, k)| *k == kind)?.0;
    Some(ObjectReference {
        api_version: Some(format!("{group}/v1")),
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
    let mut events = store
        .caches()
        .events(&[Kind::Workload, Kind::IPPool, Kind::Subnet]);
    store.caches().synced().await;

    let mut queue: BTreeSet<String> = BTreeSet::new();
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
                take(queued(&ev), &mut queue, &failed, &mut all);
                let quiet = tokio::time::sleep(COALESCE);
                tokio::pin!(quiet);
                loop {
                    tokio::select! {
                        _ = &mut quiet => break,
                        ev = events.next() => match ev {
                            Some(ev) => take(queued(&ev), &mut queue, &failed, &mut all),
                            None => return,
                        },
                    }
                }
            }
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
        for key in std::mem::take(&mut queue) {
            match reconcile(&store, &key, settings).await {
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
