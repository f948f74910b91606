//! The leader's finalizer reconciler: a terminating SpiderIPPool keeps the finalizer
//! `spiderpool.spidernet.io` until no address of it is held; a terminating SpiderSubnet deletes
//! the pools it owns and keeps its finalizer until none is left. Agents hand out nothing from a
//! terminating pool (and a claim planned before the deletion fails on the pool's new
//! generation), so once a pool is seen empty it stays empty.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::watcher;
use kube::Api;
use serde_json::json;
use spiderpool_store::admission::{FINALIZER, LABEL_OWNER_SUBNET};
use spiderpool_store::Store;

fn api(client: &kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("spiderpool.spidernet.io", "v2beta1", kind);
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

/// Runs until aborted: on every pool or subnet event, and every `resync`.
pub async fn run(client: kube::Client, store: Arc<dyn Store>, resync: Duration) {
    let pools = api(&client, "SpiderIPPool", "spiderippools");
    let subnets = api(&client, "SpiderSubnet", "spidersubnets");
    let mut events = futures_util::stream::select(
        watcher(pools.clone(), watcher::Config::default()).boxed(),
        watcher(subnets.clone(), watcher::Config::default()).boxed(),
    );
    let mut tick = tokio::time::interval(resync);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            ev = events.next() => match ev {
                Some(Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)))
                    if o.metadata.deletion_timestamp.is_some() => {}
                Some(_) => continue,
                None => return,
            },
        }
        if let Err(e) = reconcile(&pools, &subnets, store.as_ref()).await {
            tracing::warn!(error = %e, "finalizers: trying again at the next event");
        }
    }
}

fn has_finalizer(o: &DynamicObject) -> bool {
    o.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

/// Removes our finalizer, only from the version read (a 409 waits for the next event).
async fn release(api: &Api<DynamicObject>, o: &DynamicObject) -> Result<(), kube::Error> {
    let name = o.metadata.name.clone().unwrap_or_default();
    let rest: Vec<&String> = o
        .metadata
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != FINALIZER)
        .collect();
    let patch = json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": o.metadata.resource_version},
        {"op": "replace", "path": "/metadata/finalizers", "value": rest},
    ]);
    let patch: json_patch::Patch = serde_json::from_value(patch).expect("a JSON patch");
    api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map(|_| ())
}

async fn reconcile(
    pools: &Api<DynamicObject>,
    subnets: &Api<DynamicObject>,
    store: &dyn Store,
) -> anyhow::Result<()> {
    let all_pools = pools.list(&Default::default()).await?.items;
    for p in all_pools
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some() && has_finalizer(p))
    {
        let name = p.metadata.name.clone().unwrap_or_default();
        let held = store.allocations(&name).await?;
        if held.is_empty() {
            release(pools, p).await?;
            tracing::info!(pool = %name, "pool terminating with no address in use: finalizer removed");
        } else {
            tracing::debug!(pool = %name, held = held.len(), "pool terminating: waiting for its addresses");
        }
    }
    for s in subnets
        .list(&Default::default())
        .await?
        .items
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_some() && has_finalizer(s))
    {
        let name = s.metadata.name.clone().unwrap_or_default();
        let owned: Vec<&DynamicObject> = all_pools
            .iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_OWNER_SUBNET))
                    == Some(&name)
            })
            .collect();
        if owned.is_empty() {
            release(subnets, s).await?;
            tracing::info!(subnet = %name, "subnet terminating with no pool left: finalizer removed");
            continue;
        }
        for p in owned
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
        {
            let pool = p.metadata.name.clone().unwrap_or_default();
            tracing::info!(subnet = %name, %pool, "subnet terminating: deleting the pool it owns");
            match pools.delete(&pool, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
