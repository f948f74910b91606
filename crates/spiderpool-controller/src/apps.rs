//! The leader's SpiderSubnet auto-pool loop: every Deployment, ReplicaSet, StatefulSet,
//! DaemonSet, Job and CronJob event, and every event of an auto pool, queues its application;
//! each queued application is reconciled by `spiderpool_store::autopool` (the same reconciler
//! `spiderpoolctl` runs outside a cluster). Applications that failed (a subnet full or missing)
//! are tried again on every subnet event and after a back-off; every application is looked at
//! again each resync.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::Api;
use spiderpool_api::autopool;
use spiderpool_store::autopool::{reconcile, Action, Settings};
use spiderpool_store::Store;

/// How long events are gathered before one pass.
const COALESCE: Duration = Duration::from_millis(200);
/// How soon a failed application is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// What an event asks of the loop.
enum Queued {
    App(String),
    /// A subnet changed: failed applications may succeed now.
    Subnet,
}

fn key_of_workload(o: &DynamicObject, kind: &str) -> Option<String> {
    let ns = o.metadata.namespace.as_deref()?;
    let name = o.metadata.name.as_deref()?;
    Some(format!("{ns}/{kind}/{name}"))
}

fn key_of_pool(o: &DynamicObject) -> Option<String> {
    let labels = o.metadata.labels.as_ref()?;
    if !autopool::is_auto(labels) {
        return None;
    }
    let name = o
        .data
        .pointer("/spec/podAffinity/matchLabels")?
        .get(autopool::APP_NAME)?
        .as_str()?;
    Some(format!(
        "{}/{}/{name}",
        labels.get(autopool::LABEL_APP_NAMESPACE)?,
        labels.get(autopool::LABEL_APP_KIND)?
    ))
}

fn events<F>(api: Api<DynamicObject>, f: F) -> futures_util::stream::BoxStream<'static, Vec<Queued>>
where
    F: Fn(&DynamicObject) -> Vec<Queued> + Send + Sync + 'static,
{
    watcher(api, watcher::Config::default())
        .map(move |ev| match ev {
            Ok(
                watcher::Event::Apply(o) | watcher::Event::Delete(o) | watcher::Event::InitApply(o),
            ) => f(&o),
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::debug!(error = %e, "auto pools: a watch restarts");
                Vec::new()
            }
        })
        .boxed()
}

fn take(
    q: Vec<Queued>,
    queue: &mut BTreeSet<String>,
    failed: &BTreeMap<String, tokio::time::Instant>,
) {
    for x in q {
        match x {
            Queued::App(k) => {
                queue.insert(k);
            }
            Queued::Subnet => queue.extend(failed.keys().cloned()),
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
fn event_of(action: &Action) -> Option<Event> {
    let reason = match action {
        Action::Created { .. } => "CreateIPPool",
        Action::Scaled { .. } => "ScaleIPPool",
        Action::Adopted { .. } => "TakeOverIPPool",
        Action::Deleted { .. } => "DeleteIPPool",
        Action::Reserved { .. } => "KeepIPPool",
        Action::Waiting { .. } => return None,
    };
    Some(Event {
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
    mut events: tokio::sync::mpsc::UnboundedReceiver<(String, Event)>,
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
    store: Arc<dyn Store>,
    settings: Settings,
    resync: Duration,
    identity: String,
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
    let mut streams = Vec::new();
    for (group, kind) in autopool::APP_KINDS {
        let plural = format!("{}s", kind.to_ascii_lowercase());
        let gvk = GroupVersionKind::gvk(group, "v1", kind);
        let api = Api::all_with(
            client.clone(),
            &ApiResource::from_gvk_with_plural(&gvk, &plural),
        );
        streams.push(events(api, move |o| {
            key_of_workload(o, kind)
                .map(Queued::App)
                .into_iter()
                .collect()
        }));
    }
    let spider = |kind: &str, plural: &str| {
        let gvk = GroupVersionKind::gvk("spiderpool.spidernet.io", "v2beta1", kind);
        Api::<DynamicObject>::all_with(
            client.clone(),
            &ApiResource::from_gvk_with_plural(&gvk, plural),
        )
    };
    streams.push(events(spider("SpiderIPPool", "spiderippools"), |o| {
        key_of_pool(o).map(Queued::App).into_iter().collect()
    }));
    streams.push(events(spider("SpiderSubnet", "spidersubnets"), |_| {
        vec![Queued::Subnet]
    }));
    let mut events = futures_util::stream::select_all(streams);

    let mut queue: BTreeSet<String> = BTreeSet::new();
    let mut failed: BTreeMap<String, tokio::time::Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(resync);
    let mut retry = tokio::time::interval(RETRY);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match spiderpool_store::autopool::applications(store.as_ref()).await {
                    Ok(all) => queue.extend(all),
                    Err(e) => tracing::warn!(error = %e, "auto pools: listing the applications"),
                }
            }
            _ = retry.tick() => {
                let now = tokio::time::Instant::now();
                queue.extend(failed.iter().filter(|(_, at)| **at <= now).map(|(k, _)| k.clone()));
            }
            ev = events.next() => {
                let Some(q) = ev else { return };
                take(q, &mut queue, &failed);
                let quiet = tokio::time::sleep(COALESCE);
                tokio::pin!(quiet);
                loop {
                    tokio::select! {
                        _ = &mut quiet => break,
                        ev = events.next() => match ev {
                            Some(q) => take(q, &mut queue, &failed),
                            None => return,
                        },
                    }
                }
            }
        }
        for key in std::mem::take(&mut queue) {
            match reconcile(store.as_ref(), &key, settings).await {
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
                    let reason = if message.contains("ApplicationSubnetChanged") {
                        "ApplicationSubnetChanged"
                    } else {
                        "AutoPoolFailed"
                    };
                    let ev = Event {
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
    }
}
