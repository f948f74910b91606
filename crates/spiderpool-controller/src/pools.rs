//! The leader's reconciler of pools and subnets. Statuses: a pool's `totalIPCount` and
//! `allocatedIPCount` from the moment it exists (agents keep them as they allocate), a subnet's
//! `controlledIPPools`, `totalIPCount` and `allocatedIPCount` (the addresses its pools have).
//! Finalizers: a terminating SpiderIPPool keeps `spiderpool.spidernet.io` until no address of it
//! is held; a terminating SpiderSubnet deletes the pools it owns and keeps its finalizer until
//! none is left. Agents hand out nothing from a terminating pool (and a claim planned before the
//! deletion fails on the pool's new generation), so once a pool is seen empty it stays empty.
//! Events are coalesced: a burst of pool status writes costs one pass.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::Api;
use serde_json::{json, Value};
use spiderpool_api::keys::{FINALIZER, LABEL_OWNER_SUBNET};
use spiderpool_api::{Kind, Object, SpiderIPPool};
use spiderpool_store::Store;

use crate::cache::CachedKube;
use crate::metrics::Metrics;

/// The cluster-wide API of a `spiderpool.spidernet.io/v2beta1` kind.
pub(crate) fn api(client: &kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("spiderpool.spidernet.io", "v2beta1", kind);
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

/// Runs until aborted: after every burst of pool or subnet events, and every `resync`.
pub async fn run(client: kube::Client, store: CachedKube, resync: Duration, metrics: Arc<Metrics>) {
    let pools = api(&client, "SpiderIPPool", "spiderippools");
    let subnets = api(&client, "SpiderSubnet", "spidersubnets");
    let mut events = store.caches().events(&[Kind::IPPool, Kind::Subnet]);
    store.caches().synced().await;
    let mut tick = tokio::time::interval(resync);
    while crate::passes::next(&mut events, &mut tick, COALESCE).await {
        let before = store.api_reads();
        if let Err(e) = reconcile(&pools, &subnets, &store).await {
            tracing::warn!(error = %e, "pools and subnets: trying again at the next event");
        }
        metrics.pass("pools", store.api_reads() - before);
    }
}

/// How long events are gathered before one pass.
const COALESCE: Duration = Duration::from_millis(300);

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
    store: &CachedKube,
) -> anyhow::Result<()> {
    let objects = |kind| -> Vec<DynamicObject> {
        store
            .all(kind)
            .into_values()
            .map(|o| (*o).clone())
            .collect()
    };
    let all_pools = objects(Kind::IPPool);
    let all_subnets = objects(Kind::Subnet);
    tracing::debug!(
        pools = all_pools.len(),
        terminating = all_pools
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
            .count(),
        subnets = all_subnets.len(),
        "pools and subnets: a pass"
    );
    let typed_pools: Vec<SpiderIPPool> = all_pools
        .iter()
        .filter_map(|p| match typed(Kind::IPPool, p) {
            Some(Object::IPPool(p)) => Some(p),
            _ => None,
        })
        .collect();
    for (p, t) in all_pools.iter().zip(&typed_pools) {
        pool_counts(pools, p, t).await?;
    }
    for s in &all_subnets {
        let Some(Object::Subnet(t)) = typed(Kind::Subnet, s) else {
            continue;
        };
        let status = spiderpool_control::status::subnet_status(&t, &typed_pools);
        let want = serde_json::to_value(&status)?;
        let have = s.data.get("status").cloned().unwrap_or(Value::Null);
        if have != want {
            write_status(subnets, s, want).await?;
        }
    }
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
    for s in all_subnets
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

fn typed(kind: Kind, o: &DynamicObject) -> Option<Object> {
    Object::from_value(kind, serde_json::to_value(o).ok()?).ok()
}

/// A pool's counts, written when they are missing or wrong (a pool no agent has written yet,
/// or whose spec changed since). Its holders are kept exactly as read: the write is
/// conditional on the version read, and a 409 waits for the next pass.
async fn pool_counts(
    api: &Api<DynamicObject>,
    raw: &DynamicObject,
    pool: &SpiderIPPool,
) -> anyhow::Result<()> {
    let Ok(parsed) = pool.to_pool() else {
        return Ok(());
    };
    let status = raw.data.get("status").cloned().unwrap_or(json!({}));
    let held = status
        .get("allocatedIPs")
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str::<serde_json::Map<String, Value>>(s).ok())
        .map_or(0, |m| m.len() as u64);
    let total = parsed.total_ip_count();
    if status.get("totalIPCount").and_then(Value::as_u64) == Some(total)
        && status.get("allocatedIPCount").and_then(Value::as_u64) == Some(held)
    {
        return Ok(());
    }
    let mut want = if status.is_object() {
        status
    } else {
        json!({})
    };
    want["totalIPCount"] = json!(total);
    want["allocatedIPCount"] = json!(held);
    write_status(api, raw, want).await
}

/// Replaces an object's status, only over the version read.
async fn write_status(
    api: &Api<DynamicObject>,
    raw: &DynamicObject,
    status: Value,
) -> anyhow::Result<()> {
    let name = raw.metadata.name.clone().unwrap_or_default();
    let mut obj = raw.clone();
    obj.data["status"] = status;
    match api
        .replace_status(&name, &PostParams::default(), &obj)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
