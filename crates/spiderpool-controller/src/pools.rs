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

use futures_util::StreamExt;

use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::Api;
use serde_json::{json, Value};
use spiderpool_api::keys::{FINALIZER, LABEL_OWNER_SUBNET};
use spiderpool_api::{Kind, Object, SpiderIPPool};
use spiderpool_store::Store;

use crate::cache::CachedKube;
use crate::invalid::{Bad, Invalid};
use crate::metrics::Metrics;

/// The cluster-wide API of a `spiderpool.spidernet.io/v2beta1` kind.
pub(crate) fn api(client: &kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("spiderpool.spidernet.io", "v2beta1", kind);
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

/// Runs until aborted: after every burst of pool or subnet events, and every `resync`. An
/// object that cannot be read or written is reported to `invalid` and skipped; one whose write
/// failed for another reason (the API server busy) makes the next pass come within `RETRY`.
pub async fn run(
    client: kube::Client,
    store: CachedKube,
    resync: Duration,
    metrics: Arc<Metrics>,
    invalid: Arc<Invalid>,
) {
    let pools = api(&client, "SpiderIPPool", "spiderippools");
    let subnets = api(&client, "SpiderSubnet", "spidersubnets");
    let mut events = store.caches().events(&[Kind::IPPool, Kind::Subnet]);
    store.caches().synced().await;
    let mut tick = tokio::time::interval(resync);
    while crate::passes::next(&mut events, &mut tick, COALESCE).await {
        let before = store.api_reads();
        let mut pass = Pass::default();
        reconcile(&pools, &subnets, &store, &mut pass).await;
        invalid.pass("pools", pass.bad);
        if pass.retry {
            tick.reset_after(RETRY);
        }
        metrics.pass("pools", store.api_reads() - before);
    }
}

/// How soon a pass whose write failed (not for its object's fault) is made again.
const RETRY: Duration = Duration::from_secs(5);

/// What one pass met: the objects it skipped, and whether a write should be tried again soon.
#[derive(Default)]
struct Pass {
    bad: Vec<Bad>,
    retry: bool,
}

impl Pass {
    /// Notes the failure of one object's step: its own fault (refused as invalid, unreadable)
    /// makes it bad; any other is tried again soon. Either way the pass goes on.
    fn failed(&mut self, kind: &'static str, name: &str, what: &str, e: anyhow::Error) {
        if object_fault(&e) {
            self.bad
                .push(Bad::new(kind, name, format!("{what}: {e:#}")));
        } else {
            tracing::warn!(kind, object = %name, error = %e, "{what}: trying again soon");
            self.retry = true;
        }
    }
}

/// Whether an error is the fault of the object (the API server refused it as invalid, or its
/// stored value does not parse) rather than of the moment.
fn object_fault(e: &anyhow::Error) -> bool {
    if let Some(kube::Error::Api(s)) = e.downcast_ref::<kube::Error>() {
        return matches!(s.code, 400 | 422);
    }
    if let Some(e) = e.downcast_ref::<spiderpool_store::StoreError>() {
        return e.is_object_fault();
    }
    e.downcast_ref::<serde_json::Error>().is_some()
        || e.downcast_ref::<spiderpool_api::ValidationError>()
            .is_some()
}

/// How long events are gathered before one pass.
const COALESCE: Duration = Duration::from_millis(300);

/// How many finalizer removals are in flight at once.
const FINALIZERS_AT_ONCE: usize = 8;

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
    pass: &mut Pass,
) {
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
    let name_of = |o: &DynamicObject| o.metadata.name.clone().unwrap_or_default();
    let mut typed_pools: Vec<SpiderIPPool> = Vec::new();
    for p in &all_pools {
        match typed(Kind::IPPool, p) {
            Ok(Object::IPPool(t)) => {
                if let Err(e) = pool_counts(pools, p, &t).await {
                    pass.failed("SpiderIPPool", &name_of(p), "writing its counts", e);
                }
                typed_pools.push(t);
            }
            Ok(_) => {}
            Err(e) => pass.failed("SpiderIPPool", &name_of(p), "reading it", e),
        }
    }
    // Terminating pools that hold nothing lose the finalizer side by side: each removal is a
    // write the admission webhook reviews, and one after the other they made the last of a
    // burst of deleted pools wait for all the others.
    let mut empty = Vec::new();
    for p in all_pools
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some() && has_finalizer(p))
    {
        let name = name_of(p);
        match store.allocations(&name).await {
            Ok(held) if held.is_empty() => empty.push((name, p)),
            Ok(held) => {
                tracing::debug!(pool = %name, held = held.len(), "pool terminating: waiting for its addresses")
            }
            Err(e) => pass.failed("SpiderIPPool", &name, "reading its addresses", e.into()),
        }
    }
    let removals: Vec<_> = empty
        .into_iter()
        .map(|(name, p)| {
            let api = pools.clone();
            let p = p.clone();
            async move {
                let r = release(&api, &p).await;
                (name, r)
            }
        })
        .collect();
    let removed: Vec<(String, Result<(), kube::Error>)> = futures_util::stream::iter(removals)
        .buffer_unordered(FINALIZERS_AT_ONCE)
        .collect()
        .await;
    for (name, r) in removed {
        match r {
            Ok(()) => {
                tracing::info!(pool = %name, "pool terminating with no address in use: finalizer removed")
            }
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => pass.failed("SpiderIPPool", &name, "removing its finalizer", e.into()),
        }
    }
    for s in &all_subnets {
        let t = match typed(Kind::Subnet, s) {
            Ok(Object::Subnet(t)) => t,
            Ok(_) => continue,
            Err(e) => {
                pass.failed("SpiderSubnet", &name_of(s), "reading it", e);
                continue;
            }
        };
        let status = spiderpool_control::status::subnet_status(&t, &typed_pools);
        let want = serde_json::to_value(&status).unwrap_or(Value::Null);
        let have = s.data.get("status").cloned().unwrap_or(Value::Null);
        if have != want {
            if let Err(e) = write_status(subnets, s, want).await {
                pass.failed("SpiderSubnet", &name_of(s), "writing its status", e);
            }
        }
    }
    for s in all_subnets
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_some() && has_finalizer(s))
    {
        let name = name_of(s);
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
            match release(subnets, s).await {
                Ok(()) => {
                    tracing::info!(subnet = %name, "subnet terminating with no pool left: finalizer removed")
                }
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
                Err(e) => pass.failed("SpiderSubnet", &name, "removing its finalizer", e.into()),
            }
            continue;
        }
        for p in owned
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
        {
            let pool = name_of(p);
            tracing::info!(subnet = %name, %pool, "subnet terminating: deleting the pool it owns");
            match pools.delete(&pool, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => pass.failed(
                    "SpiderIPPool",
                    &pool,
                    "deleting it with its subnet",
                    e.into(),
                ),
            }
        }
    }
}

fn typed(kind: Kind, o: &DynamicObject) -> anyhow::Result<Object> {
    Ok(Object::from_value(kind, serde_json::to_value(o)?)?)
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
    let held: Vec<std::net::IpAddr> = status
        .get("allocatedIPs")
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str::<serde_json::Map<String, Value>>(s).ok())
        .map(|m| m.keys().filter_map(|ip| ip.parse().ok()).collect())
        .unwrap_or_default();
    let held = parsed.allocated_ip_count(&held);
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
