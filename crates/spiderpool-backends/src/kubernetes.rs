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
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use kube::api::{DynamicObject, ListParams};
use spiderpool_store::{
    Allocation, Changes, Kind, Mode, Op, Result, Retry, Revision, Store, StoreError, Stored,
};

mod allocated_ips;
mod commit;
mod migrate;
mod node_pods;
mod objects;
mod pool_status;
mod resources;
mod watch;

pub use allocated_ips::allocations_of;
use allocated_ips::{entries_of, Entry};
pub use migrate::{Hazard, LISTED};
pub use resources::{api_resource, key_of, rv_of, LOOKUP_ONLY, WORKLOADS};
use resources::{resource, third_party};

/// The most addresses one pool records by default: the pool object must stay well below the
/// API server's object size limit (upstream's `MaxAllocatedIPs`).
pub const DEFAULT_RECORD_CAP: usize = 5000;

/// How one object write is laid again on a fresh read after a 409.
const RELAY: Retry = Retry::RELAY;

/// Counts of what the backend did, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct KubeStats {
    /// Pool status writes that succeeded.
    pub status_writes: AtomicU64,
    /// Pool status writes refused with 409 (laid again on a fresh read).
    pub status_conflicts: AtomicU64,
    /// Other object writes (endpoints, …) that succeeded.
    pub object_writes: AtomicU64,
    /// Reads sent to the API server (GET, LIST, LIST at a revision).
    pub reads: AtomicU64,
}

/// Told of each object this store wrote, as the API server answered the write. Lets a cache
/// serve the writer's own writes before its watch delivers them.
pub type OnWrite = Arc<dyn Fn(Kind, &str, Written<'_>) + Send + Sync>;

/// What a write left, as [`OnWrite`] is told it.
#[derive(Debug, Clone, Copy)]
pub enum Written<'a> {
    /// The object as the API server returned it: created, replaced, its status written, or
    /// deleted but still there with a deletion timestamp (it has finalizers).
    Object(&'a DynamicObject),
    /// The object is gone; it was at `revision` when deleted (if the delete was conditional).
    Gone {
        /// Its last revision, where known.
        revision: Option<Revision>,
    },
}

struct Inner {
    client: kube::Client,
    server: String,
    cap: usize,
    /// Per pool, the generation it had at revisions seen: a claim planned at revision `r` is
    /// valid while the pool's generation is the one it had at `r`.
    generations: Mutex<HashMap<String, BTreeMap<Revision, i64>>>,
    stats: Arc<KubeStats>,
    on_write: Option<OnWrite>,
    /// The Pods of the agent's node, once [`Store::follow_pods_on`] started following them
    /// (shared by the stores rebuilt from this one).
    node_pods: Arc<std::sync::OnceLock<node_pods::NodePods>>,
}

/// A store on the Kubernetes API.
#[derive(Clone)]
pub struct KubeStore {
    inner: Arc<Inner>,
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
                on_write: None,
                node_pods: Arc::default(),
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
        self.rebuilt(cap, self.inner.on_write.clone(), self.inner.stats.clone())
    }

    /// The same store, telling `on_write` of every object it writes.
    pub fn on_write(self, on_write: OnWrite) -> Self {
        self.rebuilt(self.inner.cap, Some(on_write), self.inner.stats.clone())
    }

    /// The same store (same client) counting what it does apart from this one, so each user of
    /// a shared connection sees its own reads and writes in [`KubeStore::stats`].
    pub fn counted_apart(&self) -> Self {
        self.rebuilt(self.inner.cap, self.inner.on_write.clone(), Arc::default())
    }

    fn rebuilt(&self, cap: usize, on_write: Option<OnWrite>, stats: Arc<KubeStats>) -> Self {
        let i = &self.inner;
        KubeStore {
            inner: Arc::new(Inner {
                client: i.client.clone(),
                server: i.server.clone(),
                cap,
                generations: Mutex::default(),
                stats,
                on_write,
                node_pods: i.node_pods.clone(),
            }),
        }
    }

    /// What the backend has written so far.
    pub fn stats(&self) -> Arc<KubeStats> {
        self.inner.stats.clone()
    }

    /// Refuses the SpiderEndpoint CRD upstream Spiderpool installs: its schema has no
    /// `containerID` in a NIC, so the API server would drop what tells this project's DEL,
    /// CHECK and CNI GC which sandbox holds an address (helm never upgrades a chart's `crds/`,
    /// so a cluster moved from upstream keeps it until someone applies the project's). Where
    /// the caller may not read CRDs it says so and goes on.
    pub async fn check_schemas(&self) -> Result<()> {
        let crds: kube::Api<kube::api::DynamicObject> = kube::Api::all_with(
            self.inner.client.clone(),
            &kube::api::ApiResource::from_gvk_with_plural(
                &kube::api::GroupVersionKind::gvk(
                    "apiextensions.k8s.io",
                    "v1",
                    "CustomResourceDefinition",
                ),
                "customresourcedefinitions",
            ),
        );
        const NAME: &str = "spiderendpoints.spiderpool.spidernet.io";
        let crd = match crds.get_opt(NAME).await {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 403 => {
                tracing::warn!(crd = NAME, "may not read CRDs: cannot check that the SpiderEndpoint schema keeps containerID (kubectl apply -f deploy/crds/ after moving from upstream)");
                return Ok(());
            }
            Err(e) => return Err(self.inner.err(&format!("get CRD {NAME}"), e)),
        };
        match endpoint_schema_problem(&crd.data) {
            None => Ok(()),
            Some(why) => Err(StoreError::Config(format!(
                "CRD {NAME} is upstream Spiderpool's ({why}): the API server would drop the containerID this project records for each NIC. Apply the project's CRDs first (helm does not upgrade them): kubectl apply -f deploy/crds/"
            ))),
        }
    }
}

/// What is missing from a SpiderEndpoint CRD's `v2beta1` schema for this project's records,
/// or `None` when they are kept (the field is there, or unknown fields are preserved).
pub fn endpoint_schema_problem(crd: &serde_json::Value) -> Option<String> {
    let versions = crd.pointer("/spec/versions")?.as_array()?;
    let Some(v) = versions.iter().find(|v| v["name"] == "v2beta1") else {
        return Some("it serves no v2beta1".into());
    };
    let nic = v.pointer(
        "/schema/openAPIV3Schema/properties/status/properties/current/properties/ips/items",
    );
    let Some(nic) = nic else {
        return Some("its schema has no status.current.ips".into());
    };
    if nic["x-kubernetes-preserve-unknown-fields"] == true
        || nic.pointer("/properties/containerID").is_some()
    {
        None
    } else {
        Some("its schema of status.current.ips[] has no containerID".into())
    }
}

#[async_trait]
impl Store for KubeStore {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Stored>> {
        self.inner.get(kind, key).await
    }

    fn follow_pods_on(&self, node: &str) {
        let client = self.inner.client.clone();
        self.inner
            .node_pods
            .get_or_init(|| node_pods::NodePods::follow(client, node));
    }

    fn followed_pod(&self, key: &str) -> Option<Stored> {
        self.inner.node_pods.get()?.get(&self.inner, key)
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
        let mut out = spiderpool_store::skip_unreadable(
            items.into_iter().map(|o| self.inner.stored(kind, o)),
            "object",
        );
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn allocations(&self, pool: &str) -> Result<Vec<Allocation>> {
        match self.inner.get_object(Kind::IPPool, pool).await? {
            Some(o) => allocations_of(pool, &o),
            None => Ok(Vec::new()),
        }
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

    fn mode(&self) -> Mode {
        Mode::Cluster
    }

    fn write_counts(&self) -> spiderpool_store::WriteCounts {
        let s = &self.inner.stats;
        spiderpool_store::WriteCounts {
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
        watch::watch(&self.inner, after, kinds).await
    }
}
