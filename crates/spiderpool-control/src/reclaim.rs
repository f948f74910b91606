//! Reclaiming the addresses of dead pods: the decisions upstream's garbage collector makes
//! (`../spec/spiderpool-reference.md` §6), run by the controller's leader on Kubernetes and by
//! `spiderpoolctl ipam gc` over the applied objects elsewhere.
//!
//! A holder is a pod incarnation (`namespace/name` and UID) holding addresses in pools or
//! recorded by an endpoint. [`scan`] judges every holder and says which are leaked and from when
//! on; a [`Tracker`] releases a leak only once it was seen leaked twice, a grace period apart;
//! [`reclaim`] judges the holder once more right before it writes, and its releases are owned by
//! the holder's container and interface, so an address that has gone to the pod's next
//! incarnation (or anyone else) in between is never freed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use serde_json::Value;
use spiderpool_api::{KubeObject, Object, SpiderEndpoint};

use crate::apply;

mod tracker;
use spiderpool_store::{typed, Allocation, Expect, Kind, Op, Store, StoreError};
pub use tracker::Tracker;

/// How long the reclaim waits.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Added to every pod's own grace period, and the least time between the two sightings of
    /// one leak (upstream's `SPIDERPOOL_GC_ADDITIONAL_GRACE_DELAY`).
    pub grace_delay: Duration,
    /// How long a Node may stay NotReady before its terminating pods' addresses are taken
    /// without waiting for their own grace period.
    pub node_grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            grace_delay: Duration::from_secs(5),
            node_grace: Duration::from_secs(300),
        }
    }
}

/// One pod incarnation whose addresses are leaked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leak {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// The incarnation's UID.
    pub uid: String,
    /// What became of the pod.
    pub cause: Cause,
    /// Why its addresses are leaked, e.g. "pod default/a is gone".
    pub why: String,
    /// When the pod's own grace period ends, if it has one still to wait for (the grace delay
    /// comes on top).
    pub due: Option<SystemTime>,
}

/// What became of a leaked holder's pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    /// The Pod object is gone.
    Deleted,
    /// A Pod of the same name with another UID exists.
    Replaced,
    /// The pod is Succeeded or Failed.
    Finished,
    /// The pod is terminating and its grace period is over.
    Terminating,
    /// Its node is gone, or NotReady past the node grace period while the pod terminates.
    Node,
}

impl Cause {
    /// The metric label: `deleted`, `replaced`, `finished`, `terminating`, `node`.
    pub fn label(self) -> &'static str {
        match self {
            Cause::Deleted => "deleted",
            Cause::Replaced => "replaced",
            Cause::Finished => "finished",
            Cause::Terminating => "terminating",
            Cause::Node => "node",
        }
    }
}

/// What is read once per scan: the holders of addresses, the endpoints, and memoised pods,
/// nodes and StatefulSet answers.
struct Facts<'a> {
    store: &'a dyn Store,
    /// Whether every pod has a Pod object (a cluster), so a missing one is a deleted pod.
    cluster: bool,
    pods: HashMap<String, Option<KubeObject>>,
    nodes: HashMap<String, Option<KubeObject>>,
}

impl<'a> Facts<'a> {
    fn new(store: &'a dyn Store) -> Self {
        Facts {
            store,
            cluster: store.mode().is_cluster(),
            pods: HashMap::new(),
            nodes: HashMap::new(),
        }
    }

    async fn kube(
        store: &dyn Store,
        memo: &mut HashMap<String, Option<KubeObject>>,
        kind: Kind,
        key: &str,
    ) -> Result<Option<KubeObject>, StoreError> {
        if let Some(o) = memo.get(key) {
            return Ok(o.clone());
        }
        let o = match typed::get(store, kind, key).await? {
            Some((Object::Kube(_, k), _)) => Some(k),
            _ => None,
        };
        memo.insert(key.to_string(), o.clone());
        Ok(o)
    }

    /// Whether the holder `pod`/`uid` is leaked, why, and from when on.
    async fn judge(
        &mut self,
        pod: &str,
        uid: &str,
        endpoint: Option<&SpiderEndpoint>,
        policy: &Policy,
        now: SystemTime,
    ) -> Result<Option<Leak>, StoreError> {
        let leak = |cause: Cause, why: String, due: Option<SystemTime>| {
            Some(Leak {
                pod: pod.to_string(),
                uid: uid.to_string(),
                cause,
                why,
                due,
            })
        };
        let (ns, name) = pod.split_once('/').unwrap_or(("default", pod));
        // A StatefulSet member its StatefulSet still wants, and a KubeVirt VM that lives, keep
        // their addresses for their next incarnation, whatever became of this one.
        if let Some(ep) = endpoint {
            if apply::keeps_addresses(
                self.store,
                ns,
                name,
                &ep.status.owner_controller_type,
                &ep.status.owner_controller_name,
            )
            .await?
            {
                return Ok(None);
            }
        }
        let Some(p) = Self::kube(self.store, &mut self.pods, Kind::Pod, pod).await? else {
            // Outside a cluster a pod without a Pod object is a bare pod, not a deleted one.
            if !self.cluster {
                return Ok(None);
            }
            // Upstream keys a KubeVirt VM's addresses by its VirtualMachineInstance's name:
            // while that VMI exists they are its, whatever became of its launcher pods.
            if vmi_exists(self.store, pod).await? {
                return Ok(None);
            }
            return Ok(leak(Cause::Deleted, format!("pod {pod} is gone"), None));
        };
        let current = p.metadata.uid.clone().unwrap_or_default();
        if !uid.is_empty() && !current.is_empty() && current != uid {
            return Ok(leak(
                Cause::Replaced,
                format!("pod {pod} is another incarnation now (UID {current})"),
                None,
            ));
        }
        let phase = p.status.get("phase").and_then(Value::as_str).unwrap_or("");
        if matches!(phase, "Succeeded" | "Failed") {
            return Ok(leak(Cause::Finished, format!("pod {pod} is {phase}"), None));
        }
        let terminating = p
            .metadata
            .deletion_timestamp
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .map(|since| {
                let grace = p.metadata.deletion_grace_period_seconds.unwrap_or(30);
                (
                    since,
                    since + Duration::from_secs(u64::try_from(grace).unwrap_or(0)),
                )
            });
        if let Some(node) = p.node_name().map(str::to_string) {
            match Self::kube(self.store, &mut self.nodes, Kind::Node, &node).await? {
                None => {
                    return Ok(leak(
                        Cause::Node,
                        format!("node {node} of pod {pod} is gone"),
                        None,
                    ));
                }
                Some(n) => {
                    if let (Some(since), Some(_)) = (not_ready_since(&n), terminating) {
                        if since + policy.node_grace <= now {
                            return Ok(leak(
                                Cause::Node,
                                format!(
                                    "pod {pod} is terminating on node {node}, NotReady since {}",
                                    humantime::format_rfc3339_seconds(since)
                                ),
                                None,
                            ));
                        }
                    }
                }
            }
        }
        if let Some((since, due)) = terminating {
            return Ok(leak(
                Cause::Terminating,
                format!(
                    "pod {pod} is terminating since {}",
                    humantime::format_rfc3339_seconds(since)
                ),
                Some(due),
            ));
        }
        Ok(None)
    }
}

/// Since when a Node's Ready condition is not True, if it is not.
fn not_ready_since(node: &KubeObject) -> Option<SystemTime> {
    let ready = node
        .status
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))?;
    if ready.get("status").and_then(Value::as_str) == Some("True") {
        return None;
    }
    ready
        .get("lastTransitionTime")
        .and_then(Value::as_str)
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .or(Some(SystemTime::UNIX_EPOCH))
}

/// A pod's incarnation key.
type HolderKey = (String, String);

/// An object a scan could not judge (it skipped it and went on with the others), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// `SpiderIPPool` or `SpiderEndpoint`.
    pub kind: &'static str,
    /// Its name (`namespace/name` for an endpoint).
    pub name: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Whether `pod` is `namespace/name`, both parts there.
fn pod_key(pod: &str) -> bool {
    pod.split_once('/')
        .is_some_and(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
}

/// Every holder of an address (by pool) and every endpoint, keyed by pod incarnation.
struct Holders {
    held: BTreeMap<HolderKey, Vec<Allocation>>,
    endpoints: BTreeMap<String, (SpiderEndpoint, spiderpool_store::Revision)>,
    unreadable: Vec<Unreadable>,
}

async fn holders(
    store: &dyn Store,
    only: Option<&BTreeSet<String>>,
) -> Result<Holders, StoreError> {
    let wanted = |pod: &str| only.is_none_or(|o| o.contains(pod));
    let mut held: BTreeMap<HolderKey, Vec<Allocation>> = BTreeMap::new();
    let mut unreadable = Vec::new();
    for (o, _) in typed::list(store, Kind::IPPool).await? {
        let Object::IPPool(p) = o else { continue };
        let name = &p.metadata.name;
        // One pool that cannot be read is skipped (and said), never the scan of the others.
        let allocations = match store.allocations(name).await {
            Ok(a) => a,
            Err(e) if e.is_object_fault() => {
                unreadable.push(Unreadable {
                    kind: "SpiderIPPool",
                    name: name.clone(),
                    problem: e.to_string(),
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        for a in allocations {
            if wanted(&a.holder.pod) {
                held.entry((a.holder.pod.clone(), a.holder.pod_uid.clone()))
                    .or_default()
                    .push(a);
            }
        }
    }
    let mut endpoints = BTreeMap::new();
    let listed = match only {
        // A few pods: their endpoints one by one.
        Some(pods) if pods.len() < 16 => {
            let mut v = Vec::new();
            for pod in pods {
                match typed::get(store, Kind::Endpoint, pod).await {
                    Ok(Some(e)) => v.push(e),
                    Ok(None) => {}
                    Err(e) if e.is_object_fault() => unreadable.push(Unreadable {
                        kind: "SpiderEndpoint",
                        name: pod.clone(),
                        problem: e.to_string(),
                    }),
                    Err(e) => return Err(e),
                }
            }
            v
        }
        _ => typed::list(store, Kind::Endpoint).await?,
    };
    for (o, rev) in listed {
        let Object::Endpoint(ep) = o else { continue };
        let key = format!(
            "{}/{}",
            ep.metadata.namespace.as_deref().unwrap_or("default"),
            ep.metadata.name
        );
        if wanted(&key) {
            endpoints.insert(key, (ep, rev));
        }
    }
    Ok(Holders {
        held,
        endpoints,
        unreadable,
    })
}

/// What a [`scan`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// The leaked holders.
    pub leaks: Vec<Leak>,
    /// The objects it skipped: each is the fault of that object alone.
    pub unreadable: Vec<Unreadable>,
}

/// Judges every holder in `store` (or only those of the pods `only` names) and returns the
/// leaked ones. A pool or endpoint that cannot be read, or a holder that cannot be judged (an
/// entry naming no pod), is skipped and reported; only a datastore that fails fails the scan.
pub async fn scan(
    store: &dyn Store,
    policy: &Policy,
    only: Option<&BTreeSet<String>>,
    now: SystemTime,
) -> Result<Scan, StoreError> {
    let Holders {
        held,
        endpoints,
        mut unreadable,
    } = holders(store, only).await?;
    let mut keys: BTreeSet<HolderKey> = held.keys().cloned().collect();
    for (key, (ep, _)) in &endpoints {
        keys.insert((key.clone(), ep.status.current.uid.clone()));
    }
    let mut facts = Facts::new(store);
    let mut leaks = Vec::new();
    for (pod, uid) in keys {
        // In a cluster every holder names its pod `namespace/name`; an entry that does not
        // cannot be judged (nor reclaimed): said, and left to an admin.
        if facts.cluster && !pod_key(&pod) {
            if let Some(a) = held.get(&(pod.clone(), uid.clone())) {
                unreadable.push(Unreadable {
                    kind: "SpiderIPPool",
                    name: a[0].pool.clone(),
                    problem: format!(
                        "status.allocatedIPs[{}] names pod {pod:?} (UID {uid:?}), not namespace/name: it cannot be judged; `spiderpoolctl ipam release` frees it",
                        a[0].ip
                    ),
                });
            }
            continue;
        }
        let ep = endpoints
            .get(&pod)
            .map(|(e, _)| e)
            .filter(|e| e.status.current.uid == uid);
        match facts.judge(&pod, &uid, ep, policy, now).await {
            Ok(Some(l)) => leaks.push(l),
            Ok(None) => {}
            Err(e) if e.is_object_fault() => {
                let (kind, name, what) = match held.get(&(pod.clone(), uid.clone())) {
                    Some(a) => (
                        "SpiderIPPool",
                        a[0].pool.clone(),
                        format!("the holder of {}", a[0].ip),
                    ),
                    None => ("SpiderEndpoint", pod.clone(), "the endpoint".to_string()),
                };
                unreadable.push(Unreadable {
                    kind,
                    name,
                    problem: format!("{what} (pod {pod:?}, UID {uid:?}) cannot be judged: {e}"),
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Scan { leaks, unreadable })
}

/// What [`reclaim_all`] did for one leak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its addresses were released (and its endpoint deleted).
    Reclaimed(Reclaimed),
    /// Judged again, it is no longer leaked (or holds nothing).
    NotLeaked,
    /// A write failed; the leak is tried again at the next look.
    Failed(String),
}

/// What one reclaim did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// `address (pool)` of each address released.
    pub released: Vec<String>,
    /// Whether the pod's endpoint was deleted.
    pub endpoint_deleted: bool,
}

/// Whether the holder `namespace/name` is a KubeVirt VM that lives (upstream keys a VM's
/// addresses by its VirtualMachineInstance's name; no Pod has that name): see
/// [`crate::apply::vm_lives`].
pub(crate) async fn vmi_exists(store: &dyn Store, holder: &str) -> Result<bool, StoreError> {
    let (ns, name) = holder.split_once('/').unwrap_or(("default", holder));
    crate::apply::vm_lives(store, ns, name).await
}

/// Takes back what the holders of `leaks` hold, after judging each once more on what the
/// datastore says now, with one read of the pools and endpoints for all of them. The releases
/// are batched per pool (one status write per pool in Kubernetes mode, whatever the number of
/// dead holders), each owned by the holder's container and interface; then each endpoint is
/// deleted at the version read. Returns one outcome per leak, in order.
pub async fn reclaim_all(
    store: &dyn Store,
    policy: &Policy,
    leaks: &[Leak],
    now: SystemTime,
) -> Result<Vec<Outcome>, StoreError> {
    let only: BTreeSet<String> = leaks.iter().map(|l| l.pod.clone()).collect();
    let Holders {
        held, endpoints, ..
    } = holders(store, Some(&only)).await?;
    let mut facts = Facts::new(store);
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(leaks.len());
    // Per pool: (leak index, release); then per leak its endpoint's delete.
    let mut releases: BTreeMap<String, Vec<(usize, Op)>> = BTreeMap::new();
    let mut deletes: Vec<(usize, Op)> = Vec::new();
    for (i, leak) in leaks.iter().enumerate() {
        let ep = endpoints
            .get(&leak.pod)
            .filter(|(e, _)| e.status.current.uid == leak.uid);
        match facts
            .judge(&leak.pod, &leak.uid, ep.map(|(e, _)| e), policy, now)
            .await
        {
            Ok(Some(_)) => {}
            Ok(None) => {
                outcomes.push(Outcome::NotLeaked);
                continue;
            }
            Err(e) => {
                outcomes.push(Outcome::Failed(e.to_string()));
                continue;
            }
        }
        let mut done = Reclaimed::default();
        let mut seen = BTreeSet::new();
        let mut release = |op: Op| {
            if let Op::Release { pool, .. } = &op {
                releases.entry(pool.clone()).or_default().push((i, op));
            }
        };
        if let Some((e, rev)) = ep {
            for nic in &e.status.current.ips {
                for (pool, ip) in nic.held() {
                    seen.insert((pool.clone(), ip));
                    done.released.push(format!("{ip} ({pool})"));
                }
                Op::releases_of(nic, &e.status.current.uid)
                    .into_iter()
                    .for_each(&mut release);
            }
            deletes.push((
                i,
                Op::Delete {
                    kind: Kind::Endpoint,
                    key: leak.pod.clone(),
                    expect: Expect::Revision(*rev),
                },
            ));
            done.endpoint_deleted = true;
        }
        // Addresses the incarnation holds that no endpoint records (the endpoint was deleted
        // first, or never written): owned by the container and interface that hold them.
        for a in held
            .get(&(leak.pod.clone(), leak.uid.clone()))
            .into_iter()
            .flatten()
        {
            if seen.insert((a.pool.clone(), a.ip)) {
                done.released.push(format!("{} ({})", a.ip, a.pool));
                release(Op::Release {
                    pool: a.pool.clone(),
                    ip: a.ip,
                    container_id: a.holder.container_id.clone(),
                    nic: a.holder.nic.clone(),
                    pod_uid: a.holder.pod_uid.clone(),
                });
            }
        }
        done.released.sort();
        outcomes.push(if done.released.is_empty() && !done.endpoint_deleted {
            Outcome::NotLeaked
        } else {
            Outcome::Reclaimed(done)
        });
    }
    let fail = |outcomes: &mut Vec<Outcome>, i: usize, why: &str| {
        if matches!(outcomes[i], Outcome::Reclaimed(_)) {
            outcomes[i] = Outcome::Failed(why.to_string());
        }
    };
    // One pool's releases in as few commits as the store takes: one pool failing fails only
    // the leaks that held addresses in it.
    for (pool, ops) in releases {
        for chunk in ops.chunks(store.max_ops().max(1)) {
            let batch: Vec<Op> = chunk.iter().map(|(_, op)| op.clone()).collect();
            if let Err(e) = store.commit(batch).await {
                let why = format!("releasing in pool {pool}: {e}");
                for (i, _) in chunk {
                    fail(&mut outcomes, *i, &why);
                }
            }
        }
    }
    // The endpoints of the holders whose addresses all went back, side by side.
    let pending: Vec<(usize, Op)> = deletes
        .into_iter()
        .filter(|(i, _)| matches!(outcomes[*i], Outcome::Reclaimed(_)))
        .collect();
    let results: Vec<(usize, Result<_, StoreError>)> = futures_util::stream::iter(pending)
        .map(|(i, op)| async move { (i, store.commit(vec![op]).await) })
        .buffer_unordered(16)
        .collect()
        .await;
    for (i, r) in results {
        if let Err(e) = r {
            fail(&mut outcomes, i, &format!("deleting the endpoint: {e}"));
        }
    }
    Ok(outcomes)
}
