//! The leader's shared caches: one reflector per kind the reconcilers read (pools, subnets,
//! reserved IPs, endpoints, pods, nodes and the six workload kinds), each a single watch with
//! kube's default backoff, so an API-server outage is retried gently instead of hammered. The
//! reconcilers read the objects from memory and learn of changes from one broadcast of the
//! watches' events; no pass LISTs the API again.
//!
//! [`CachedKube`] is the [`Store`] over those caches that the shared decision code
//! (`spiderpool_control`'s auto pools and reclaim) runs on unchanged: reads come from memory,
//! writes go to the API through the Kubernetes backend. A write is seen by the writer's next
//! read at once: the backend tells the cache of each object it wrote (as the API server answered
//! it), and the cache serves that copy until its watch has delivered the write or something
//! newer. Each loop has its own `CachedKube` whose backend counts the API reads it still makes
//! (kinds not cached, and the reads inside a commit), for the per-pass metric.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use spiderpool_backends::kubernetes::{
    allocations_of, api_resource, key_of, rv_of, KubeStore, OnWrite, Written, LOOKUP_ONLY,
    WORKLOADS,
};
use spiderpool_store::{
    Allocation, Kind, Mode, Op, Result, Revision, Store, StoreError, Stored, WriteCounts,
};
use tokio::sync::broadcast;

/// The kinds the caches hold (each workload kind of [`WORKLOADS`] under `Kind::Workload`).
pub const CACHED: [Kind; 7] = [
    Kind::IPPool,
    Kind::Subnet,
    Kind::ReservedIP,
    Kind::Endpoint,
    Kind::Pod,
    Kind::Node,
    Kind::Workload,
];

/// How long a write of the leader's own is served before its watch delivered it, at most (a
/// watch that is down that long has relisted by then, or the write was overtaken).
const OWN_WRITE_TTL: Duration = Duration::from_secs(30);

/// What changed, as a watch told it.
#[derive(Debug, Clone)]
pub enum Change {
    /// An object was created or changed (or was listed again after the watch restarted).
    Applied(Arc<DynamicObject>),
    /// An object was deleted.
    Deleted(Arc<DynamicObject>),
    /// The watch listed everything again: deletions in between were not told one by one.
    Relisted,
}

/// One event of one kind.
#[derive(Debug, Clone)]
pub struct Event {
    /// The kind.
    pub kind: Kind,
    /// The object's key as the Store names it (`namespace/Kind/name` for a workload); empty
    /// for `Relisted`.
    pub key: String,
    /// What happened.
    pub change: Change,
}

/// The Store key of `o`, an object of `kind` (and of the workload Kind `workload`).
fn key_in(kind: Kind, workload: Option<&str>, o: &DynamicObject) -> String {
    match (workload, &o.metadata.namespace) {
        (Some(w), Some(ns)) => format!("{ns}/{w}/{}", o.name_any()),
        _ => key_of(kind, o),
    }
}

/// One API resource's reflector.
struct Resource {
    kind: Kind,
    /// For `Kind::Workload`: the workload's Kind (`Deployment`, …).
    workload: Option<&'static str>,
    ar: ApiResource,
    reader: reflector::Store<DynamicObject>,
    /// The highest `resourceVersion` the watch has delivered.
    seen: Arc<AtomicU64>,
}

/// The reflectors, their watch tasks (stopped when the caches are dropped) and the broadcast
/// of their events.
pub struct Caches {
    resources: Vec<Resource>,
    events: broadcast::Sender<Event>,
    /// `true` once every reflector has listed its resource.
    synced: tokio::sync::watch::Receiver<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Drop for Caches {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Events a slow reconciler may fall behind by before it is told to look at everything.
const BROADCAST: usize = 4096;

impl Caches {
    /// Starts one watch per cached resource.
    pub fn start(client: &kube::Client) -> Arc<Caches> {
        let (events, _) = broadcast::channel(BROADCAST);
        let (synced_tx, synced) = tokio::sync::watch::channel(false);
        let mut caches = Caches {
            resources: Vec::new(),
            events,
            synced,
            tasks: tokio::task::JoinSet::new(),
        };
        for kind in CACHED {
            if kind == Kind::Workload {
                for (_, k, _) in WORKLOADS {
                    let ar = api_resource(kind, Some(k)).expect("a workload kind");
                    caches.watch(client, kind, Some(k), ar);
                }
            } else {
                let ar = api_resource(kind, None).expect("a cached kind");
                caches.watch(client, kind, None, ar);
            }
        }
        // One waiter per reflector: a reflector's readiness wakes only its last waiter, so the
        // loops wait on this instead.
        let readers: Vec<_> = caches.resources.iter().map(|r| r.reader.clone()).collect();
        caches.tasks.spawn(async move {
            for r in readers {
                let _ = r.wait_until_ready().await;
            }
            let _ = synced_tx.send(true);
        });
        Arc::new(caches)
    }

    fn watch(
        &mut self,
        client: &kube::Client,
        kind: Kind,
        workload: Option<&'static str>,
        ar: ApiResource,
    ) {
        let writer = reflector::store::Writer::new(ar.clone());
        let reader = writer.as_reader();
        let seen = Arc::new(AtomicU64::new(0));
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let events = self.events.clone();
        let seen_by_task = seen.clone();
        let what = workload.map_or_else(|| kind.to_string(), str::to_string);
        self.tasks.spawn(async move {
            tracing::debug!(resource = %what, "cache: watching");
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(|o| o.managed_fields_mut().clear());
            let mut stream = reflector::reflector(writer, stream).boxed();
            while let Some(ev) = stream.next().await {
                let change = match ev {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                        Change::Applied(Arc::new(o))
                    }
                    Ok(watcher::Event::Delete(o)) => Change::Deleted(Arc::new(o)),
                    Ok(watcher::Event::InitDone) => {
                        tracing::debug!(resource = %what, "cache: listed");
                        Change::Relisted
                    }
                    Ok(watcher::Event::Init) => continue,
                    Err(e) => {
                        tracing::warn!(resource = %what, error = %e, "cache: the watch failed; retrying with backoff");
                        continue;
                    }
                };
                let key = match &change {
                    Change::Applied(o) | Change::Deleted(o) => {
                        if let Ok(rv) = rv_of(o) {
                            seen_by_task.fetch_max(rv, Ordering::SeqCst);
                        }
                        key_in(kind, workload, o)
                    }
                    Change::Relisted => String::new(),
                };
                // Nobody listening (between passes, say) is fine.
                let _ = events.send(Event { kind, key, change });
            }
        });
        self.resources.push(Resource {
            kind,
            workload,
            ar,
            reader,
            seen,
        });
    }

    /// Waits until every reflector has listed its resource once.
    pub async fn synced(&self) {
        let mut synced = self.synced.clone();
        let _ = synced.wait_for(|s| *s).await;
    }

    /// The events of every watch from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The events of `kinds` from now on, as a stream. A reader that fell behind the broadcast
    /// is told `Relisted` (it missed events: look at everything).
    pub fn events(
        &self,
        kinds: &'static [Kind],
    ) -> futures_util::stream::BoxStream<'static, Event> {
        futures_util::stream::unfold(self.subscribe(), move |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(ev) if kinds.contains(&ev.kind) => return Some((ev, rx)),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let ev = Event {
                            kind: kinds[0],
                            key: String::new(),
                            change: Change::Relisted,
                        };
                        return Some((ev, rx));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }

    /// Whether `kind` is cached.
    pub fn covers(kind: Kind) -> bool {
        CACHED.contains(&kind)
    }

    /// The resource that holds `kind`/`key` and the object's name and namespace in it.
    fn locate<'k>(
        &self,
        kind: Kind,
        key: &'k str,
    ) -> Option<(&Resource, ObjectRef<DynamicObject>)> {
        let (resource, ns, name): (&Resource, Option<&'k str>, &'k str) = if kind == Kind::Workload
        {
            let mut parts = key.splitn(3, '/');
            let (ns, k, name) = (parts.next()?, parts.next()?, parts.next()?);
            let r = self
                .resources
                .iter()
                .find(|r| r.kind == kind && r.workload == Some(k))?;
            (r, Some(ns), name)
        } else {
            let r = self.resources.iter().find(|r| r.kind == kind)?;
            match (kind.namespaced(), key.split_once('/')) {
                (true, Some((ns, name))) => (r, Some(ns), name),
                (true, None) => return None,
                (false, _) => (r, None, key),
            }
        };
        let mut oref = ObjectRef::new_with(name, resource.ar.clone());
        if let Some(ns) = ns {
            oref = oref.within(ns);
        }
        Some((resource, oref))
    }

    /// The cached object `kind`/`key` (`None`: not there, or `kind` is not cached).
    pub fn get(&self, kind: Kind, key: &str) -> Option<Arc<DynamicObject>> {
        let (r, oref) = self.locate(kind, key)?;
        r.reader.get(&oref)
    }

    /// Every cached object of `kind`, with its key.
    pub fn list(&self, kind: Kind) -> Vec<(String, Arc<DynamicObject>)> {
        self.resources
            .iter()
            .filter(|r| r.kind == kind)
            .flat_map(|r| {
                r.reader
                    .state()
                    .into_iter()
                    .map(|o| (key_in(r.kind, r.workload, &o), o))
            })
            .collect()
    }

    /// The highest revision the watch of `kind`/`key`'s resource has delivered.
    fn seen(&self, kind: Kind, key: &str) -> u64 {
        self.locate(kind, key)
            .map_or(0, |(r, _)| r.seen.load(Ordering::SeqCst))
    }
}

/// A write of the leader's own, until the watch delivers it.
struct Own {
    /// The object as written (`None`: deleted).
    object: Option<Arc<DynamicObject>>,
    /// Its revision; for a delete, the revision of the copy the cache held then.
    revision: u64,
    at: Instant,
}

/// The leader's own writes not yet confirmed by the watches.
#[derive(Default)]
pub struct OwnWrites {
    writes: Mutex<HashMap<(Kind, String), Own>>,
}

impl OwnWrites {
    /// Records a write of `kind`/`key` (`None`: deleted) at `revision`.
    fn record(&self, kind: Kind, key: &str, object: Option<Arc<DynamicObject>>, revision: u64) {
        self.writes.lock().expect("own writes").insert(
            (kind, key.to_string()),
            Own {
                object,
                revision,
                at: Instant::now(),
            },
        );
    }

    /// The hook the Kubernetes backend calls after each write.
    pub fn hook(self: &Arc<Self>, caches: &Arc<Caches>) -> OnWrite {
        let own = self.clone();
        let caches = caches.clone();
        Arc::new(move |kind, key, written| {
            if !Caches::covers(kind) {
                return;
            }
            let (object, revision) = match written {
                Written::Object(o) => (Some(Arc::new(o.clone())), rv_of(o).unwrap_or(0)),
                // Without the revision deleted, the cache's copy as of now is the one to hide
                // (a newer copy the watch delivers later is someone else's write).
                Written::Gone { revision } => (
                    None,
                    revision.unwrap_or_else(|| {
                        caches
                            .get(kind, key)
                            .and_then(|c| rv_of(&c).ok())
                            .unwrap_or(0)
                    }),
                ),
            };
            tracing::trace!(%kind, %key, deleted = object.is_none(), revision, "cache: own write");
            own.record(kind, key, object, revision);
        })
    }

    /// What the reader of `kind`/`key` is to see, given the cache's copy: the own write while
    /// the watch has not delivered it (or anything newer), else the cache's.
    /// `seen` is the highest revision the watch of the object's resource has delivered.
    fn merge(
        &self,
        seen: u64,
        kind: Kind,
        key: &str,
        cached: Option<Arc<DynamicObject>>,
    ) -> Option<Arc<DynamicObject>> {
        let mut writes = self.writes.lock().expect("own writes");
        let Some(own) = writes.get(&(kind, key.to_string())) else {
            return cached;
        };
        let cached_rv = cached.as_ref().and_then(|c| rv_of(c).ok());
        let confirmed = own.at.elapsed() > OWN_WRITE_TTL
            || match &own.object {
                Some(_) => seen >= own.revision || cached_rv.is_some_and(|r| r >= own.revision),
                None => cached.is_none() || cached_rv.is_some_and(|r| r > own.revision),
            };
        if confirmed {
            writes.remove(&(kind, key.to_string()));
            return cached;
        }
        tracing::trace!(%kind, %key, seen, ?cached_rv, own = own.revision, deleted = own.object.is_none(), "cache: own write served");
        own.object.clone()
    }

    /// Own writes of `kind` (key, object or deletion), for a list.
    fn of_kind(&self, kind: Kind) -> Vec<(String, Option<Arc<DynamicObject>>)> {
        self.writes
            .lock()
            .expect("own writes")
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, key), own)| (key.clone(), own.object.clone()))
            .collect()
    }
}

/// The [`Store`] the leader's reconcilers run on: cached kinds read from memory (with the
/// leader's own writes), everything else and every write through the Kubernetes backend.
#[derive(Clone)]
pub struct CachedKube {
    caches: Arc<Caches>,
    own: Arc<OwnWrites>,
    kube: KubeStore,
}

impl CachedKube {
    /// A store over `caches` writing through `kube`, whose API reads are counted apart from
    /// other loops' (give each loop its own).
    pub fn new(caches: Arc<Caches>, own: Arc<OwnWrites>, kube: &KubeStore) -> CachedKube {
        let kube = kube.counted_apart().on_write(own.hook(&caches));
        CachedKube { caches, own, kube }
    }

    /// The API reads this store has made so far.
    pub fn api_reads(&self) -> u64 {
        self.kube.stats().reads.load(Ordering::Relaxed)
    }

    /// The caches it reads.
    pub fn caches(&self) -> &Arc<Caches> {
        &self.caches
    }

    fn current(&self, kind: Kind, key: &str) -> Option<Arc<DynamicObject>> {
        let cached = self.caches.get(kind, key);
        self.own
            .merge(self.caches.seen(kind, key), kind, key, cached)
    }

    /// Every object of the cached `kind` (with the leader's own writes), by key.
    pub fn all(&self, kind: Kind) -> BTreeMap<String, Arc<DynamicObject>> {
        let mut out: BTreeMap<String, Arc<DynamicObject>> = BTreeMap::new();
        for (key, o) in self.caches.list(kind) {
            out.insert(key, o);
        }
        for (key, _) in self.own.of_kind(kind) {
            let cached = out.remove(&key);
            let seen = self.caches.seen(kind, &key);
            if let Some(o) = self.own.merge(seen, kind, &key, cached) {
                out.insert(key, o);
            }
        }
        out
    }
}

fn stored(kind: Kind, key: &str, o: &DynamicObject) -> Result<Stored> {
    Ok(Stored {
        key: key.to_string(),
        value: serde_json::to_value(o).map_err(|e| StoreError::Corrupt {
            key: format!("{kind}/{}", o.name_any()),
            message: e.to_string(),
        })?,
        revision: rv_of(o)?,
    })
}

#[async_trait]
impl Store for CachedKube {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Stored>> {
        // Kinds not cached, and workload kinds read one at a time (LOOKUP_ONLY, and a third
        // party's `Kind.version.group`), from the API.
        let lookup_only = kind == Kind::Workload
            && key
                .split('/')
                .nth(1)
                .is_some_and(|w| w.contains('.') || LOOKUP_ONLY.iter().any(|(_, k, _)| *k == w));
        if !Caches::covers(kind) || lookup_only {
            return self.kube.get(kind, key).await;
        }
        self.current(kind, key)
            .map(|o| stored(kind, key, &o))
            .transpose()
    }

    async fn list(&self, kind: Kind) -> Result<Vec<Stored>> {
        if !Caches::covers(kind) {
            return self.kube.list(kind).await;
        }
        Ok(spiderpool_store::skip_unreadable(
            self.all(kind).iter().map(|(key, o)| stored(kind, key, o)),
            "object",
        ))
    }

    async fn allocations(&self, pool: &str) -> Result<Vec<Allocation>> {
        match self.current(Kind::IPPool, pool) {
            Some(o) => allocations_of(pool, &o),
            None => Ok(Vec::new()),
        }
    }

    async fn held_ips(&self, pool: &str) -> Result<Vec<IpAddr>> {
        Ok(self
            .allocations(pool)
            .await?
            .into_iter()
            .map(|a| a.ip)
            .collect())
    }

    async fn allocation_counts(&self) -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for (name, o) in self.all(Kind::IPPool) {
            match allocations_of(&name, &o) {
                Ok(a) if a.is_empty() => {}
                Ok(a) => {
                    out.insert(name, a.len() as u64);
                }
                Err(e) => tracing::error!(error = %e, "skipping an unreadable pool status"),
            }
        }
        Ok(out)
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<Revision> {
        self.kube.commit(ops).await
    }

    fn max_ops(&self) -> usize {
        self.kube.max_ops()
    }

    async fn revision(&self) -> Result<Option<Revision>> {
        Ok(None)
    }

    async fn ping(&self) -> Result<()> {
        self.kube.ping().await
    }

    fn mode(&self) -> Mode {
        Mode::Cluster
    }

    fn write_counts(&self) -> WriteCounts {
        self.kube.write_counts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(rv: u64, ips: &str) -> Arc<DynamicObject> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
                "metadata": {"name": "p", "resourceVersion": rv.to_string()},
                "spec": {"ips": [ips]}
            }))
            .unwrap(),
        )
    }

    fn ips(o: &Option<Arc<DynamicObject>>) -> Option<String> {
        o.as_ref()
            .map(|o| o.data["spec"]["ips"][0].as_str().unwrap().to_string())
    }

    #[test]
    fn an_own_write_is_read_until_the_watch_delivers_it_or_something_newer() {
        let own = OwnWrites::default();
        own.record(Kind::IPPool, "p", Some(pool(10, "new")), 10);
        // The watch is behind: the cache has the old copy.
        let seen = own.merge(8, Kind::IPPool, "p", Some(pool(8, "old")));
        assert_eq!(ips(&seen).as_deref(), Some("new"));
        // Nothing cached yet (a create the watch has not delivered).
        assert_eq!(
            ips(&own.merge(9, Kind::IPPool, "p", None)).as_deref(),
            Some("new")
        );
        // The watch delivered it: the cache's copy, and the own write is forgotten.
        let seen = own.merge(10, Kind::IPPool, "p", Some(pool(10, "new")));
        assert_eq!(ips(&seen).as_deref(), Some("new"));
        assert!(own.of_kind(Kind::IPPool).is_empty());
        // Someone else's newer write wins over an own write the watch has passed.
        own.record(Kind::IPPool, "p", Some(pool(12, "mine")), 12);
        let seen = own.merge(15, Kind::IPPool, "p", Some(pool(15, "theirs")));
        assert_eq!(ips(&seen).as_deref(), Some("theirs"));
        // Deleted by someone after the own write: the watch passed it, nothing is resurrected.
        own.record(Kind::IPPool, "p", Some(pool(16, "mine")), 16);
        assert_eq!(own.merge(17, Kind::IPPool, "p", None), None);
    }

    #[test]
    fn an_own_delete_hides_the_cached_copy_until_the_watch_removes_or_replaces_it() {
        let own = OwnWrites::default();
        own.record(Kind::IPPool, "p", None, 20);
        assert_eq!(
            own.merge(20, Kind::IPPool, "p", Some(pool(20, "old"))),
            None
        );
        // Terminating (a finalizer): the watch delivers the newer copy, which is shown.
        let seen = own.merge(21, Kind::IPPool, "p", Some(pool(21, "terminating")));
        assert_eq!(ips(&seen).as_deref(), Some("terminating"));
        own.record(Kind::IPPool, "p", None, 21);
        assert_eq!(own.merge(21, Kind::IPPool, "p", None), None);
        assert!(own.of_kind(Kind::IPPool).is_empty());
    }
}
