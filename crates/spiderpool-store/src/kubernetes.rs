//! The Kubernetes backend: the objects are the cluster's own (SpiderIPPool, SpiderEndpoint,
//! Pod, Node, … through the API server), and the addresses a pool holds live in its
//! `status.allocatedIPs` in upstream Spiderpool's format, so a cluster can move between
//! upstream and this project:
//!
//! ```json
//! "status": {"allocatedIPs": "{\"10.6.0.10\":{\"pod\":\"default/web-0\",\"podUid\":\"0b6c…\"}}",
//!            "allocatedIPCount": 1, "totalIPCount": 254}
//! ```
//!
//! Each entry also carries `containerID`, `interface` and `node` (upstream ignores them), so a
//! release frees an address only for the container and NIC that hold it.
//!
//! Every write is conditional on the object's `resourceVersion`. A claim is guarded by the
//! pool's `metadata.generation` at the revision its plan was made on, not by the pool's
//! `resourceVersion`: other agents' claims change the status, not the spec, so they do not
//! invalidate a plan; on a 409 the claims are laid again on the pool's fresh status (an address
//! taken meanwhile is then a conflict naming it). All the claims and releases of one commit on
//! one pool are one status write, so an agent's group commit writes each pool once per batch.
//!
//! The API has no multi-object transactions. What stands in for "all or nothing":
//! - a commit runs to its end in a task of its own, even when its caller goes away;
//! - the pools are written first (each all or nothing); the objects after; when an object
//!   write fails, the commit's claims are taken back before the error is returned;
//! - a release is not undone: it only ever frees what its own container held, and repeating it
//!   is a no-op.
//!
//! There is no datastore-wide revision ([`Store::revision`] is `None`): revisions are the
//! objects' `resourceVersion`s (etcd revisions, compared as numbers).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, PostParams, Preconditions, VersionMatch,
    WatchEvent, WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use spiderpool_api::SpiderIPPool;

use crate::{
    check, claimed_since, Allocation, Change, Changes, Expect, Holder, Kind, Op, Result, Revision,
    Store, StoreError, Stored,
};

/// The most addresses one pool records by default: the pool object must stay well below the
/// API server's object size limit (upstream's `MaxAllocatedIPs`).
pub const DEFAULT_RECORD_CAP: usize = 5000;

/// How often one pool status write is laid again on a fresh read after a 409.
const STATUS_ATTEMPTS: u32 = 16;

/// The workload kinds `Kind::Workload` covers (key `namespace/Kind/name`).
const WORKLOADS: [(&str, &str, &str); 6] = [
    ("apps", "StatefulSet", "statefulsets"),
    ("apps", "Deployment", "deployments"),
    ("apps", "DaemonSet", "daemonsets"),
    ("apps", "ReplicaSet", "replicasets"),
    ("batch", "Job", "jobs"),
    ("batch", "CronJob", "cronjobs"),
];

/// One entry of `status.allocatedIPs`: upstream's `pod` and `podUid`, plus who exactly holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    pod: String,
    pod_uid: String,
    #[serde(
        default,
        rename = "containerID",
        skip_serializing_if = "String::is_empty"
    )]
    container_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    interface: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    node: String,
}

impl From<&Holder> for Entry {
    fn from(h: &Holder) -> Self {
        Entry {
            pod: h.pod.clone(),
            pod_uid: h.pod_uid.clone(),
            container_id: h.container_id.clone(),
            interface: h.nic.clone(),
            node: h.node.clone(),
        }
    }
}

impl From<Entry> for Holder {
    fn from(e: Entry) -> Self {
        Holder {
            pod: e.pod,
            pod_uid: e.pod_uid,
            container_id: e.container_id,
            nic: e.interface,
            node: e.node,
        }
    }
}

/// Counts of what the backend did, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct KubeStats {
    /// Pool status writes that succeeded.
    pub status_writes: AtomicU64,
    /// Pool status writes refused with 409 (laid again on a fresh read).
    pub status_conflicts: AtomicU64,
    /// Other object writes (endpoints, …) that succeeded.
    pub object_writes: AtomicU64,
}

struct Inner {
    client: kube::Client,
    server: String,
    cap: usize,
    /// Per pool, the generation it had at revisions seen: a claim planned at revision `r` is
    /// valid while the pool's generation is the one it had at `r`.
    generations: Mutex<HashMap<String, BTreeMap<Revision, i64>>>,
    stats: Arc<KubeStats>,
}

/// A store on the Kubernetes API.
#[derive(Clone)]
pub struct KubeStore {
    inner: Arc<Inner>,
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// The API resource of a kind (for workloads, of the `Kind` in the key).
fn api_resource(kind: Kind, workload: Option<&str>) -> Result<ApiResource> {
    let spider = |k: &str| resource("spiderpool.spidernet.io", "v2beta1", k, kind.resource());
    Ok(match kind {
        Kind::IPPool => spider("SpiderIPPool"),
        Kind::Subnet => spider("SpiderSubnet"),
        Kind::ReservedIP => spider("SpiderReservedIP"),
        Kind::Endpoint => spider("SpiderEndpoint"),
        Kind::Coordinator => spider("SpiderCoordinator"),
        Kind::Node => resource("", "v1", "Node", "nodes"),
        Kind::Namespace => resource("", "v1", "Namespace", "namespaces"),
        Kind::Pod => resource("", "v1", "Pod", "pods"),
        Kind::NetworkAttachment => resource(
            "k8s.cni.cncf.io",
            "v1",
            "NetworkAttachmentDefinition",
            "network-attachment-definitions",
        ),
        Kind::Workload => {
            let w = workload.unwrap_or_default();
            let (group, k, plural) =
                WORKLOADS.iter().find(|(_, k, _)| *k == w).ok_or_else(|| {
                    StoreError::Config(format!(
                        "workload kind {w:?} is not one of {}",
                        WORKLOADS.map(|w| w.1).join(", ")
                    ))
                })?;
            resource(group, "v1", k, plural)
        }
    })
}

fn rv_of(o: &DynamicObject) -> Result<Revision> {
    let rv = o.metadata.resource_version.as_deref().unwrap_or_default();
    rv.parse().map_err(|_| StoreError::Corrupt {
        key: o.metadata.name.clone().unwrap_or_default(),
        message: format!("resourceVersion {rv:?} is not a number"),
    })
}

/// The key of an object of `kind` as the port names it.
fn key_of(kind: Kind, o: &DynamicObject) -> String {
    let name = o.metadata.name.clone().unwrap_or_default();
    match (kind, &o.metadata.namespace) {
        (Kind::Workload, Some(ns)) => {
            let k = o.types.as_ref().map(|t| t.kind.as_str()).unwrap_or("");
            format!("{ns}/{k}/{name}")
        }
        (k, Some(ns)) if k.namespaced() => format!("{ns}/{name}"),
        _ => name,
    }
}

/// The address map of a pool object's `status.allocatedIPs` (absent: none).
fn entries_of(pool: &str, o: &Value) -> Result<BTreeMap<String, Entry>> {
    match o.pointer("/status/allocatedIPs") {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(BTreeMap::new()),
        Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
            key: format!("spiderippools/{pool} status.allocatedIPs"),
            message: e.to_string(),
        }),
        Some(other) => Err(StoreError::Corrupt {
            key: format!("spiderippools/{pool} status.allocatedIPs"),
            message: format!("not a JSON string: {other}"),
        }),
    }
}

fn parse_ip(pool: &str, s: &str) -> Result<IpAddr> {
    s.parse().map_err(|_| StoreError::Corrupt {
        key: format!("spiderippools/{pool} status.allocatedIPs"),
        message: format!("{s:?} is not an IP address"),
    })
}

impl KubeStore {
    /// Connects with `kubeconfig`, else `KUBECONFIG` or `~/.kube/config`, else the in-cluster
    /// service account, and checks that the API server answers.
    pub async fn connect(kubeconfig: Option<&Path>) -> Result<Self> {
        let config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    StoreError::Config(format!("kubeconfig {}: {e}", path.display()))
                })?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| {
                        StoreError::Config(format!("kubeconfig {}: {e}", path.display()))
                    })?
            }
            None => kube::Config::infer().await.map_err(|e| {
                StoreError::Config(format!(
                    "datastore kubernetes: no cluster to talk to (--kubeconfig, KUBECONFIG, ~/.kube/config or in-cluster): {e}"
                ))
            })?,
        };
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config)
            .map_err(|e| StoreError::Config(format!("kubernetes {server}: {e}")))?;
        let store = KubeStore {
            inner: Arc::new(Inner {
                client,
                server,
                cap: DEFAULT_RECORD_CAP,
                generations: Mutex::default(),
                stats: Arc::default(),
            }),
        };
        store.ping().await?;
        Ok(store)
    }

    /// The client this store talks to the API server with.
    pub fn client(&self) -> kube::Client {
        self.inner.client.clone()
    }

    /// The same store with another per-pool record cap.
    pub fn with_record_cap(self, cap: usize) -> Self {
        let i = &self.inner;
        KubeStore {
            inner: Arc::new(Inner {
                client: i.client.clone(),
                server: i.server.clone(),
                cap,
                generations: Mutex::default(),
                stats: i.stats.clone(),
            }),
        }
    }

    /// What the backend has written so far.
    pub fn stats(&self) -> Arc<KubeStats> {
        self.inner.stats.clone()
    }
}

impl Inner {
    /// The API of `kind` for `key`, and the object's name in it.
    fn api(&self, kind: Kind, key: &str) -> Result<(Api<DynamicObject>, String)> {
        let bad = |why: &str| StoreError::Config(format!("{kind}/{key}: {why}"));
        if kind == Kind::Workload {
            let mut parts = key.splitn(3, '/');
            let (Some(ns), Some(k), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad("a workload key is namespace/Kind/name"));
            };
            let ar = api_resource(kind, Some(k))?;
            return Ok((
                Api::namespaced_with(self.client.clone(), ns, &ar),
                name.into(),
            ));
        }
        let ar = api_resource(kind, None)?;
        if kind.namespaced() {
            let (ns, name) = key
                .split_once('/')
                .ok_or_else(|| bad("the key is namespace/name"))?;
            if spiderpool_api::names::dns1123_label("namespace", ns).is_err() {
                return Err(bad(&format!(
                    "{ns:?} is not a Kubernetes namespace (a container without K8S_POD_NAME has no place in the cluster)"
                )));
            }
            Ok((
                Api::namespaced_with(self.client.clone(), ns, &ar),
                name.into(),
            ))
        } else {
            Ok((Api::all_with(self.client.clone(), &ar), key.into()))
        }
    }

    fn err(&self, what: &str, e: kube::Error) -> StoreError {
        match e {
            kube::Error::Api(s) if s.code == 409 => {
                StoreError::Conflict(format!("{what}: {}", s.message))
            }
            kube::Error::Api(s) if s.code == 429 || s.code >= 500 => StoreError::Unavailable(
                format!("kubernetes {}: {what}: {}", self.server, s.message),
            ),
            kube::Error::Api(s) if s.code == 401 || s.code == 403 => StoreError::Config(format!(
                "kubernetes {}: {what}: {} (check the agent's RBAC)",
                self.server, s.message
            )),
            kube::Error::Api(s) => StoreError::Rejected(format!("{what}: {}", s.message)),
            other => {
                StoreError::Unavailable(format!("kubernetes {}: {what}: {other}", self.server))
            }
        }
    }

    fn observe(&self, kind: Kind, o: &DynamicObject) {
        if kind != Kind::IPPool {
            return;
        }
        let (Some(name), Some(generation), Ok(rv)) =
            (&o.metadata.name, o.metadata.generation, rv_of(o))
        else {
            return;
        };
        let mut g = self.generations.lock().expect("generations lock");
        let seen = g.entry(name.clone()).or_default();
        seen.insert(rv, generation);
        while seen.len() > 64 {
            seen.pop_first();
        }
    }

    fn stored(&self, kind: Kind, o: DynamicObject) -> Result<Stored> {
        self.observe(kind, &o);
        let revision = rv_of(&o)?;
        let key = key_of(kind, &o);
        let value = serde_json::to_value(&o).map_err(|e| StoreError::Corrupt {
            key: format!("{kind}/{key}"),
            message: e.to_string(),
        })?;
        Ok(Stored {
            key,
            value,
            revision,
        })
    }

    async fn get_object(&self, kind: Kind, key: &str) -> Result<Option<DynamicObject>> {
        let (api, name) = self.api(kind, key)?;
        let o = api
            .get_opt(&name)
            .await
            .map_err(|e| self.err(&format!("get {kind}/{key}"), e))?;
        if let Some(o) = &o {
            self.observe(kind, o);
        }
        Ok(o)
    }

    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Stored>> {
        self.get_object(kind, key)
            .await?
            .map(|o| self.stored(kind, o))
            .transpose()
    }

    /// The pool as of revision `rv` (`None`: it did not exist then).
    async fn pool_at(&self, pool: &str, rv: Revision) -> Result<Option<DynamicObject>> {
        let ar = api_resource(Kind::IPPool, None)?;
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        let lp = ListParams::default()
            .fields(&format!("metadata.name={pool}"))
            .at(&rv.to_string())
            .matching(VersionMatch::Exact);
        match api.list(&lp).await {
            Ok(list) => Ok(list.items.into_iter().next()),
            Err(kube::Error::Api(s)) if s.code == 410 => Err(StoreError::Conflict(format!(
                "spiderippools/{pool}: revision {rv} is no longer kept by the API server; read again"
            ))),
            Err(e) => Err(self.err(&format!("read spiderippools/{pool} at {rv}"), e)),
        }
    }

    /// The generation pool `pool` had at revision `rv`.
    async fn generation_at(&self, pool: &str, rv: Revision) -> Result<Option<i64>> {
        let known = self
            .generations
            .lock()
            .expect("generations lock")
            .get(pool)
            .and_then(|m| m.get(&rv).copied());
        if known.is_some() {
            return Ok(known);
        }
        let Some(o) = self.pool_at(pool, rv).await? else {
            return Ok(None);
        };
        let g = o.metadata.generation;
        if let Some(g) = g {
            self.generations
                .lock()
                .expect("generations lock")
                .entry(pool.into())
                .or_default()
                .insert(rv, g);
        }
        Ok(g)
    }

    /// Applies the releases and claims of one commit to one pool's status, as one write laid
    /// again on a fresh read after each 409. Returns the revision written, if anything was.
    async fn update_pool(&self, pool: &str, ops: &[Op]) -> Result<Option<Revision>> {
        let (api, _) = self.api(Kind::IPPool, pool)?;
        let claims = ops.iter().any(|o| matches!(o, Op::Claim { .. }));
        for _ in 0..STATUS_ATTEMPTS {
            let Some(mut obj) = self.get_object(Kind::IPPool, pool).await? else {
                if claims {
                    return Err(StoreError::Conflict(format!(
                        "spiderippools/{pool} no longer exists"
                    )));
                }
                return Ok(None);
            };
            let generation = obj.metadata.generation;
            let mut value = serde_json::to_value(&obj).map_err(|e| StoreError::Corrupt {
                key: format!("spiderippools/{pool}"),
                message: e.to_string(),
            })?;
            let mut entries = entries_of(pool, &value)?;
            let mut changed = false;
            let mut planned_at: Vec<Revision> = Vec::new();
            for op in ops {
                match op {
                    Op::Release {
                        ip,
                        container_id,
                        nic,
                        ..
                    } => {
                        let key = ip.to_string();
                        if entries
                            .get(&key)
                            .is_some_and(|e| &e.container_id == container_id && &e.interface == nic)
                        {
                            entries.remove(&key);
                            changed = true;
                        }
                    }
                    Op::Claim {
                        ip,
                        holder,
                        pool_revision,
                        ..
                    } => {
                        let key = ip.to_string();
                        if entries.contains_key(&key) {
                            return Err(StoreError::held(ip, pool));
                        }
                        entries.insert(key, Entry::from(holder));
                        changed = true;
                        if !planned_at.contains(pool_revision) {
                            planned_at.push(*pool_revision);
                        }
                    }
                    _ => {}
                }
            }
            // The spec the claims were planned on must still be the pool's.
            for rv in planned_at {
                let then = self.generation_at(pool, rv).await?;
                if then != generation {
                    return Err(StoreError::Conflict(format!(
                        "spiderippools/{pool} changed since revision {rv} (generation {} is now {}): the addresses were chosen on its earlier spec",
                        then.map_or("-".into(), |g| g.to_string()),
                        generation.map_or("-".into(), |g| g.to_string()),
                    )));
                }
            }
            if !changed {
                return Ok(None);
            }
            if claims && entries.len() > self.cap {
                return Err(StoreError::Full(format!(
                    "pool {pool} would record {} addresses, more than the {} one SpiderIPPool may hold in Kubernetes mode (the object must fit the API server's size limit); split the pool",
                    entries.len(),
                    self.cap
                )));
            }
            let status = value
                .as_object_mut()
                .expect("an object")
                .entry("status")
                .or_insert_with(|| Value::Object(Default::default()));
            if !status.is_object() {
                *status = Value::Object(Default::default());
            }
            let status = status.as_object_mut().expect("an object");
            if entries.is_empty() {
                status.remove("allocatedIPs");
            } else {
                status.insert(
                    "allocatedIPs".into(),
                    Value::String(serde_json::to_string(&entries).expect("entries serialise")),
                );
            }
            status.insert("allocatedIPCount".into(), entries.len().into());
            // totalIPCount as upstream's controller writes it, from the spec.
            if let Ok(p) = serde_json::from_value::<SpiderIPPool>(value.clone()) {
                if let Ok(core) = p.to_pool() {
                    let total = core.total_ip_count();
                    value["status"]["totalIPCount"] = total.into();
                }
            }
            obj = serde_json::from_value(value).map_err(|e| StoreError::Corrupt {
                key: format!("spiderippools/{pool}"),
                message: e.to_string(),
            })?;
            match api.replace_status(pool, &PostParams::default(), &obj).await {
                Ok(written) => {
                    self.stats.status_writes.fetch_add(1, Ordering::Relaxed);
                    self.observe(Kind::IPPool, &written);
                    return rv_of(&written).map(Some);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    self.stats.status_conflicts.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(kube::Error::Api(s)) if s.code == 404 && !claims => return Ok(None),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    return Err(StoreError::Conflict(format!(
                        "spiderippools/{pool} no longer exists"
                    )))
                }
                Err(e) => return Err(self.err(&format!("write spiderippools/{pool} status"), e)),
            }
        }
        Err(StoreError::Conflict(format!(
            "spiderippools/{pool}: the status kept changing under {STATUS_ATTEMPTS} writes"
        )))
    }

    /// Fails when an address of `pool` was claimed after revision `since`; returns the pool's
    /// current revision (a write of the pool guarded by it sees no later claim either).
    async fn no_claims_since(&self, pool: &str, since: Revision) -> Result<Option<Revision>> {
        let Some(now) = self.get_object(Kind::IPPool, pool).await? else {
            return Ok(None);
        };
        let rv = rv_of(&now)?;
        if rv <= since {
            return Ok(Some(rv));
        }
        let before = match self.pool_at(pool, since).await? {
            Some(o) => entries_of(pool, &serde_json::to_value(&o).unwrap_or_default())?,
            None => BTreeMap::new(),
        };
        let after = entries_of(pool, &serde_json::to_value(&now).unwrap_or_default())?;
        if after.iter().any(|(ip, e)| before.get(ip) != Some(e)) {
            return Err(claimed_since(pool, since));
        }
        Ok(Some(rv))
    }

    /// The object JSON to send for a write of `value` as `kind`/`key`.
    fn prepare(
        &self,
        kind: Kind,
        key: &str,
        name: &str,
        value: Value,
        rv: Option<Revision>,
    ) -> Result<DynamicObject> {
        let workload = (kind == Kind::Workload).then(|| key.split('/').nth(1).unwrap_or_default());
        let ar = api_resource(kind, workload)?;
        let mut value = match value {
            Value::Object(m) => Value::Object(m),
            _ => Value::Object(Default::default()),
        };
        value["apiVersion"] = ar.api_version.clone().into();
        value["kind"] = ar.kind.clone().into();
        if !value.get("metadata").is_some_and(Value::is_object) {
            value["metadata"] = Value::Object(Default::default());
        }
        let meta = value["metadata"].as_object_mut().expect("an object");
        meta.insert("name".into(), name.into());
        if kind.namespaced() {
            let ns = key.split('/').next().unwrap_or_default();
            meta.insert("namespace".into(), ns.into());
        }
        match rv {
            Some(rv) => {
                meta.insert("resourceVersion".into(), rv.to_string().into());
            }
            None => {
                for k in ["resourceVersion", "uid", "creationTimestamp", "generation"] {
                    meta.remove(k);
                }
            }
        }
        meta.remove("managedFields");
        // An endpoint is owned by its pod (not a StatefulSet member's, whose record outlives
        // the pod), as upstream's.
        if kind == Kind::Endpoint && !meta.contains_key("ownerReferences") {
            let uid = value.pointer("/status/current/uid").and_then(Value::as_str);
            let owner = value
                .pointer("/status/ownerControllerType")
                .and_then(Value::as_str);
            if let (Some(uid), false) =
                (uid.filter(|u| !u.is_empty()), owner == Some("StatefulSet"))
            {
                let pod = serde_json::json!([{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}]);
                value["metadata"]["ownerReferences"] = pod;
            }
        }
        serde_json::from_value(value)
            .map_err(|e| StoreError::Rejected(format!("{kind}/{key}: {e}")))
    }

    /// The current revision of `kind`/`key`, to say which condition failed.
    async fn current_rv(&self, kind: Kind, key: &str) -> Option<Revision> {
        match self.get_object(kind, key).await {
            Ok(Some(o)) => rv_of(&o).ok(),
            _ => None,
        }
    }

    async fn put(&self, kind: Kind, key: &str, value: Value, expect: Expect) -> Result<Revision> {
        let (api, name) = self.api(kind, key)?;
        let what = format!("{kind}/{key}");
        let pp = PostParams::default();
        for _ in 0..STATUS_ATTEMPTS {
            let (rv, create) = match expect {
                Expect::Absent => (None, true),
                Expect::Revision(r) => (Some(r), false),
                Expect::Any => match self.get_object(kind, key).await? {
                    Some(o) => (Some(rv_of(&o)?), false),
                    None => (None, true),
                },
            };
            let obj = self.prepare(kind, key, &name, value.clone(), rv)?;
            let r = if create {
                api.create(&pp, &obj).await
            } else {
                api.replace(&name, &pp, &obj).await
            };
            match r {
                Ok(o) => {
                    self.stats.object_writes.fetch_add(1, Ordering::Relaxed);
                    self.observe(kind, &o);
                    return rv_of(&o);
                }
                // Creating in a namespace that does not exist.
                Err(kube::Error::Api(s)) if s.code == 404 && create => {
                    return Err(StoreError::Rejected(format!("{what}: {}", s.message)))
                }
                Err(kube::Error::Api(s))
                    if (s.code == 409 || s.code == 404) && expect == Expect::Any =>
                {
                    continue
                }
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                    let current = self.current_rv(kind, key).await;
                    check(expect, current, &what)?;
                    return Err(StoreError::Conflict(format!("{what}: {}", s.message)));
                }
                Err(e) => return Err(self.err(&format!("write {what}"), e)),
            }
        }
        Err(StoreError::Conflict(format!("{what} kept changing")))
    }

    async fn delete(&self, kind: Kind, key: &str, expect: Expect) -> Result<()> {
        let (api, name) = self.api(kind, key)?;
        let what = format!("{kind}/{key}");
        let dp = match expect {
            Expect::Revision(r) => DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: Some(r.to_string()),
                    uid: None,
                }),
                ..Default::default()
            },
            _ => DeleteParams::default(),
        };
        match api.delete(&name, &dp).await {
            Ok(_) => {
                self.stats.object_writes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => check(expect, None, &what),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let current = self.current_rv(kind, key).await;
                check(expect, current, &what)?;
                Err(StoreError::Conflict(format!("{what}: {}", s.message)))
            }
            Err(e) => Err(self.err(&format!("delete {what}"), e)),
        }
    }

    /// One commit, run to its end (see the module comment for what stands in for atomicity).
    async fn apply(&self, ops: Vec<Op>) -> Result<Revision> {
        let mut pools: BTreeMap<String, Vec<Op>> = BTreeMap::new();
        let mut quiet: Vec<(String, Revision)> = Vec::new();
        let mut objects: Vec<Op> = Vec::new();
        let mut claimed = std::collections::HashSet::new();
        for op in ops {
            match &op {
                Op::Claim { pool, ip, .. } => {
                    if !claimed.insert((pool.clone(), *ip)) {
                        return Err(StoreError::held(ip, pool));
                    }
                    pools.entry(pool.clone()).or_default().push(op);
                }
                Op::Release { pool, .. } => pools.entry(pool.clone()).or_default().push(op),
                Op::NoClaimsSince { pool, since } => quiet.push((pool.clone(), *since)),
                Op::Put { .. } | Op::Delete { .. } => objects.push(op),
            }
        }
        let mut last: Revision = 0;
        // Checks first: they write nothing.
        let mut guarded: HashMap<String, Revision> = HashMap::new();
        for (pool, since) in &quiet {
            if let Some(rv) = self.no_claims_since(pool, *since).await? {
                guarded.insert(pool.clone(), rv);
            }
        }
        // The pools, each in one write; on a failure, what was claimed already goes back.
        let mut written: Vec<&str> = Vec::new();
        for (pool, pool_ops) in &pools {
            match self.update_pool(pool, pool_ops).await {
                Ok(rv) => {
                    last = last.max(rv.unwrap_or(0));
                    written.push(pool);
                }
                Err(e) => {
                    self.undo_claims(&pools, &written).await;
                    return Err(e);
                }
            }
        }
        // Then the objects: one key's ops in order, different keys side by side.
        let mut by_key: Vec<((Kind, String), Vec<Op>)> = Vec::new();
        for op in objects {
            let k = match &op {
                Op::Put { kind, key, .. } | Op::Delete { kind, key, .. } => (*kind, key.clone()),
                _ => unreachable!("only object ops"),
            };
            match by_key.iter_mut().find(|(kk, _)| *kk == k) {
                Some((_, v)) => v.push(op),
                None => by_key.push((k, vec![op])),
            }
        }
        let results: Vec<Result<Revision>> = futures_util::stream::iter(by_key)
            .map(|(_, ops)| {
                let guarded = &guarded;
                async move {
                    let mut last = 0;
                    for op in ops {
                        match op {
                            Op::Put {
                                kind,
                                key,
                                value,
                                expect,
                            } => {
                                // A pool changed under NoClaimsSince is guarded by the revision
                                // that check saw.
                                let expect = match (kind, expect, guarded.get(&key)) {
                                    (Kind::IPPool, Expect::Any, Some(rv)) => Expect::Revision(*rv),
                                    (_, e, _) => e,
                                };
                                last = self.put(kind, &key, value, expect).await?;
                            }
                            Op::Delete { kind, key, expect } => {
                                self.delete(kind, &key, expect).await?
                            }
                            _ => {}
                        }
                    }
                    Ok(last)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut failed = None;
        for r in results {
            match r {
                Ok(rv) => last = last.max(rv),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            self.undo_claims(&pools, &written).await;
            return Err(e);
        }
        Ok(last)
    }

    /// Takes back the claims of `pools` already written (`written`), each by its own holder.
    async fn undo_claims(&self, pools: &BTreeMap<String, Vec<Op>>, written: &[&str]) {
        for pool in written {
            let releases: Vec<Op> = pools[*pool]
                .iter()
                .filter_map(|op| match op {
                    Op::Claim {
                        pool, ip, holder, ..
                    } => Some(Op::Release {
                        pool: pool.clone(),
                        ip: *ip,
                        container_id: holder.container_id.clone(),
                        nic: holder.nic.clone(),
                    }),
                    _ => None,
                })
                .collect();
            if releases.is_empty() {
                continue;
            }
            if let Err(e) = self.update_pool(pool, &releases).await {
                tracing::error!(%pool, error = %e, "could not take back the claims of a failed commit; `spiderpoolctl ipam release` frees them");
            }
        }
    }

    async fn list_objects(
        &self,
        kind: Kind,
        lp: &ListParams,
    ) -> Result<(Vec<DynamicObject>, Revision)> {
        let apis: Vec<Api<DynamicObject>> = if kind == Kind::Workload {
            WORKLOADS
                .iter()
                .map(|(g, k, p)| Api::all_with(self.client.clone(), &resource(g, "v1", k, p)))
                .collect()
        } else {
            vec![Api::all_with(
                self.client.clone(),
                &api_resource(kind, None)?,
            )]
        };
        let mut out = Vec::new();
        let mut rv = 0;
        for api in apis {
            let list = api
                .list(lp)
                .await
                .map_err(|e| self.err(&format!("list {kind}"), e))?;
            rv = list
                .metadata
                .resource_version
                .as_deref()
                .and_then(|r| r.parse().ok())
                .unwrap_or(rv);
            out.extend(list.items);
        }
        Ok((out, rv))
    }
}

#[async_trait]
impl Store for KubeStore {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Stored>> {
        self.inner.get(kind, key).await
    }

    async fn get_many(&self, keys: &[(Kind, String)]) -> Result<Vec<Option<Stored>>> {
        let inner = &self.inner;
        futures_util::stream::iter(keys.iter().cloned())
            .map(|(kind, key)| async move { inner.get(kind, &key).await })
            .buffered(16)
            .try_collect()
            .await
    }

    async fn list(&self, kind: Kind) -> Result<Vec<Stored>> {
        let (items, _) = self
            .inner
            .list_objects(kind, &ListParams::default())
            .await?;
        let mut out = crate::skip_unreadable(
            items.into_iter().map(|o| self.inner.stored(kind, o)),
            "object",
        );
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn allocations(&self, pool: &str) -> Result<Vec<Allocation>> {
        let Some(o) = self.inner.get_object(Kind::IPPool, pool).await? else {
            return Ok(Vec::new());
        };
        let revision = rv_of(&o)?;
        let value = serde_json::to_value(&o).unwrap_or_default();
        let mut out = Vec::new();
        for (ip, e) in entries_of(pool, &value)? {
            out.push(Allocation {
                pool: pool.to_string(),
                ip: parse_ip(pool, &ip)?,
                holder: e.into(),
                revision,
            });
        }
        Ok(out)
    }

    async fn allocation_counts(&self) -> Result<BTreeMap<String, u64>> {
        let (items, _) = self
            .inner
            .list_objects(Kind::IPPool, &ListParams::default())
            .await?;
        let mut out = BTreeMap::new();
        for o in items {
            let name = o.metadata.name.clone().unwrap_or_default();
            let value = serde_json::to_value(&o).unwrap_or_default();
            match entries_of(&name, &value) {
                Ok(e) if e.is_empty() => {}
                Ok(e) => {
                    out.insert(name, e.len() as u64);
                }
                Err(e) => tracing::error!(error = %e, "skipping an unreadable pool status"),
            }
        }
        Ok(out)
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<Revision> {
        // Run to the end even when the caller goes away, so no commit stops half way.
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.apply(ops).await })
            .await
            .map_err(|e| StoreError::Unavailable(format!("a commit did not finish: {e}")))?
    }

    async fn revision(&self) -> Result<Option<Revision>> {
        Ok(None)
    }

    fn owns_nodes(&self) -> bool {
        false
    }

    fn write_counts(&self) -> crate::WriteCounts {
        let s = &self.inner.stats;
        crate::WriteCounts {
            pool_writes: s.status_writes.load(Ordering::Relaxed),
            pool_conflicts: s.status_conflicts.load(Ordering::Relaxed),
            object_writes: s.object_writes.load(Ordering::Relaxed),
        }
    }

    async fn ping(&self) -> Result<()> {
        self.inner
            .client
            .apiserver_version()
            .await
            .map(|_| ())
            .map_err(|e| self.inner.err("version", e))
    }

    async fn watch(&self, after: Revision, kinds: &[Kind]) -> Result<Option<Changes>> {
        let inner = &self.inner;
        // The pools as of the start: what their holders' changes are told against.
        let (pools, start) = if after == 0 {
            inner
                .list_objects(Kind::IPPool, &ListParams::default())
                .await?
        } else {
            let lp = ListParams::default()
                .at(&after.to_string())
                .matching(VersionMatch::Exact);
            let (items, _) = inner.list_objects(Kind::IPPool, &lp).await?;
            (items, after)
        };
        let mut baseline: HashMap<String, (Option<i64>, BTreeMap<String, Entry>)> = HashMap::new();
        for o in &pools {
            let name = o.metadata.name.clone().unwrap_or_default();
            let entries = entries_of(&name, &serde_json::to_value(o).unwrap_or_default())?;
            baseline.insert(name, (o.metadata.generation, entries));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut watched: Vec<Kind> = vec![Kind::IPPool];
        watched.extend(
            kinds
                .iter()
                .filter(|k| **k != Kind::IPPool && **k != Kind::Workload),
        );
        for kind in watched {
            let ar = api_resource(kind, None)?;
            let api: Api<DynamicObject> = Api::all_with(inner.client.clone(), &ar);
            let tx = tx.clone();
            let report_pools = kinds.contains(&Kind::IPPool);
            let mut baseline = if kind == Kind::IPPool {
                std::mem::take(&mut baseline)
            } else {
                HashMap::new()
            };
            // What of each object the watchers care about, as of the start: a Node's status
            // heartbeat, say, is no change of its labels.
            let mut seen: HashMap<String, String> = HashMap::new();
            if kind != Kind::IPPool {
                let lp = ListParams::default()
                    .at(&start.to_string())
                    .matching(VersionMatch::Exact);
                let (items, _) = inner.list_objects(kind, &lp).await?;
                for o in &items {
                    seen.insert(key_of(kind, o), fingerprint(kind, o));
                }
            }
            let inner = inner.clone();
            tokio::spawn(async move {
                let mut rv = start.to_string();
                loop {
                    let wp = WatchParams::default().timeout(290);
                    let stream = tokio::select! {
                        s = api.watch(&wp, &rv) => s,
                        () = tx.closed() => return,
                    };
                    let mut stream = match stream {
                        Ok(s) => s.boxed(),
                        Err(e) => {
                            let _ = tx.send(Err(inner.err(&format!("watch {kind}"), e))).await;
                            return;
                        }
                    };
                    loop {
                        let ev = tokio::select! {
                            e = stream.next() => e,
                            () = tx.closed() => return,
                        };
                        let batch = match ev {
                            None => break, // the server's timeout: watch again from `rv`
                            Some(Err(e)) => Err(inner.err(&format!("watch {kind}"), e)),
                            Some(Ok(WatchEvent::Error(s))) => {
                                Err(StoreError::Unavailable(format!(
                                    "kubernetes {}: watch {kind} ended: {} ({})",
                                    inner.server, s.message, s.code
                                )))
                            }
                            Some(Ok(WatchEvent::Bookmark(b))) => {
                                rv = b.metadata.resource_version;
                                continue;
                            }
                            Some(Ok(WatchEvent::Added(o) | WatchEvent::Modified(o))) => {
                                rv = o.metadata.resource_version.clone().unwrap_or(rv);
                                Ok(changes_of(
                                    &inner,
                                    kind,
                                    &o,
                                    false,
                                    &mut baseline,
                                    &mut seen,
                                    report_pools,
                                ))
                            }
                            Some(Ok(WatchEvent::Deleted(o))) => {
                                rv = o.metadata.resource_version.clone().unwrap_or(rv);
                                Ok(changes_of(
                                    &inner,
                                    kind,
                                    &o,
                                    true,
                                    &mut baseline,
                                    &mut seen,
                                    report_pools,
                                ))
                            }
                        };
                        let last = batch.is_err();
                        if matches!(&batch, Ok(c) if c.is_empty()) {
                            continue;
                        }
                        if tx.send(batch).await.is_err() || last {
                            return;
                        }
                    }
                }
            });
        }
        Ok(Some(rx))
    }
}

/// What of an object its watchers care about: a Node's labels, a Namespace's labels and
/// annotations, a custom resource's spec (its generation); of anything else, every change.
fn fingerprint(kind: Kind, o: &DynamicObject) -> String {
    let m = &o.metadata;
    match kind {
        Kind::Node => serde_json::to_string(&m.labels).unwrap_or_default(),
        Kind::Namespace => serde_json::to_string(&(&m.labels, &m.annotations)).unwrap_or_default(),
        // (A pool's changes are told from its generation and its holders, not here.)
        Kind::Subnet | Kind::ReservedIP => {
            format!("{:?}/{:?}", m.generation, m.deletion_timestamp)
        }
        _ => m.resource_version.clone().unwrap_or_default(),
    }
}

/// What one watch event means: for a pool, the addresses that changed (against what the watch
/// knew) and, when its spec changed or it came or went, the pool itself; for anything else,
/// the object.
fn changes_of(
    inner: &Inner,
    kind: Kind,
    o: &DynamicObject,
    deleted: bool,
    known: &mut HashMap<String, (Option<i64>, BTreeMap<String, Entry>)>,
    seen: &mut HashMap<String, String>,
    report_pools: bool,
) -> Vec<Change> {
    let Ok(revision) = rv_of(o) else {
        return Vec::new();
    };
    let key = key_of(kind, o);
    if kind != Kind::IPPool {
        let changed = if deleted {
            seen.remove(&key);
            true
        } else {
            let now = fingerprint(kind, o);
            seen.insert(key.clone(), now.clone()) != Some(now)
        };
        if !changed {
            return Vec::new();
        }
        return vec![Change::Object {
            kind,
            key,
            revision,
        }];
    }
    inner.observe(kind, o);
    let entries = if deleted {
        BTreeMap::new()
    } else {
        match entries_of(&key, &serde_json::to_value(o).unwrap_or_default()) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "watch: skipping an unreadable pool status");
                return Vec::new();
            }
        }
    };
    let (old_gen, old) = known
        .remove(&key)
        .map(|(g, e)| (Some(g), e))
        .unwrap_or((None, BTreeMap::new()));
    let mut out = Vec::new();
    let spec_changed = deleted || old_gen != Some(o.metadata.generation);
    if spec_changed && report_pools {
        out.push(Change::Object {
            kind,
            key: key.clone(),
            revision,
        });
    }
    for (ip, e) in &entries {
        if old.get(ip) != Some(e) {
            if let Ok(ip) = ip.parse() {
                out.push(Change::Allocation {
                    pool: key.clone(),
                    ip,
                    held: true,
                    revision,
                });
            }
        }
    }
    for ip in old.keys().filter(|ip| !entries.contains_key(*ip)) {
        if let Ok(ip) = ip.parse() {
            out.push(Change::Allocation {
                pool: key.clone(),
                ip,
                held: false,
                revision,
            });
        }
    }
    if !deleted {
        known.insert(key, (o.metadata.generation, entries));
    }
    out
}
