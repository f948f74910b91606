//! Applying and deleting objects with the admission rules upstream's webhook enforces, and the
//! status the system computes for pools and subnets. Used by the CLI and, in later modes, by
//! the agent and controller, so every entry point guards the datastore the same way.

use std::collections::BTreeMap;
use std::sync::Arc;

use spiderpool_api::{Object, SpiderEndpoint, ValidationError};

use crate::admission;
use spiderpool_store::overlay::Staged;
use spiderpool_store::{typed, Expect, Kind, Op, Retry, Store, StoreError};

/// Why an apply or delete was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The object breaks a rule; the message names field and value.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The subnet of an application's auto pool would change (upstream's
    /// `ApplicationSubnetChanged`); the message names the application, pool and subnets.
    #[error("{0}")]
    SubnetChanged(String),
    /// Delete of something that does not exist.
    #[error("{kind} {key:?} not found")]
    NotFound {
        /// Kind.
        kind: Kind,
        /// Key.
        key: String,
    },
}

impl From<crate::multus::ApplyNadError> for ApplyError {
    fn from(e: crate::multus::ApplyNadError) -> Self {
        match e {
            crate::multus::ApplyNadError::Invalid(v) => ApplyError::Invalid(v),
            crate::multus::ApplyNadError::Store(s) => ApplyError::Store(s),
        }
    }
}

impl From<admission::AdmissionError> for ApplyError {
    fn from(e: admission::AdmissionError) -> Self {
        match e {
            admission::AdmissionError::Invalid(v) => ApplyError::Invalid(v),
            admission::AdmissionError::Store(s) => ApplyError::Store(s),
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The object was new.
    Created,
    /// The object replaced an earlier version.
    Configured,
    /// The object was identical to the stored one.
    Unchanged,
}

fn invalid(msg: String) -> ApplyError {
    ApplyError::Invalid(ValidationError::Invalid(msg))
}

/// kubectl's annotation of what it last applied, kept across `spiderpoolctl apply`.
const KUBECTL_LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What applying one object writes, and what that does to it.
pub(crate) struct Planned {
    pub(crate) ops: Vec<Op>,
    pub(crate) outcome: Applied,
}

/// Checks `object` against the admission rules on `store` and says what applying it writes.
/// The stored status, creation time and UID are kept; a new object gets them.
async fn plan(store: &dyn Store, object: Object) -> Result<Planned, ApplyError> {
    plan_as(store, object, Who::User).await
}

/// Who applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Who {
    /// A user, through `spiderpoolctl apply`.
    User,
    /// The auto-pool reconciler.
    Reconciler,
}

/// [`plan`] on behalf of `who`; the ops are `Put` (and for a pool `NoClaimsSince`).
pub(crate) async fn plan_as(
    store: &dyn Store,
    mut object: Object,
    who: Who,
) -> Result<Planned, ApplyError> {
    let kind = object.kind();
    let key = object.key();
    // A pool is checked against its holders; the commit fails if an address was claimed
    // after they were read (see `Op::NoClaimsSince`), and the check runs again.
    let since = store.revision().await?;
    let current = typed::get(store, kind, &key).await?;
    // What the system put on the stored object stays, as with kubectl apply: its finalizers
    // and owners (a document that names its own replaces them), and kubectl's record of what
    // it last applied.
    if let Some((old, _)) = &current {
        let old = old.metadata();
        let m = object.metadata_mut();
        if m.finalizers.is_empty() {
            m.finalizers = old.finalizers.clone();
        }
        if m.owner_references.is_empty() {
            m.owner_references = old.owner_references.clone();
        }
        if let Some(last) = old.annotations.get(KUBECTL_LAST_APPLIED) {
            m.annotations
                .entry(KUBECTL_LAST_APPLIED.to_string())
                .or_insert_with(|| last.clone());
        }
    }
    let by = match who {
        Who::User => admission::By::Apply,
        Who::Reconciler => admission::By::Reconciler {
            create: current.is_none(),
        },
    };
    admission::mutate(store, &mut object, by).await?;
    admission::validate(
        store,
        &object,
        current.as_ref().map(|(o, _)| o),
        &admission::Families::default(),
        by,
    )
    .await?;
    let (expect, outcome) = match &current {
        None => (Expect::Absent, Applied::Created),
        Some((_, rev)) => (Expect::Revision(*rev), Applied::Configured),
    };
    {
        let m = object.metadata_mut();
        let old = current.as_ref().map(|(o, _)| o.metadata());
        m.resource_version = None;
        m.creation_timestamp = old
            .and_then(|o| o.creation_timestamp.clone())
            .or_else(|| m.creation_timestamp.clone())
            .or_else(|| {
                Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string())
            });
        m.uid = m
            .uid
            .clone()
            .or_else(|| old.and_then(|o| o.uid.clone()))
            .or_else(|| Some(uuid::Uuid::new_v4().to_string()));
        if kind.namespaced() && m.namespace.is_none() {
            m.namespace = Some("default".into());
        }
    }
    let value = typed::to_stored_value(&object);
    if let Some((old, _)) = &current {
        // What the system writes (the status, the generation the API server counts) is no
        // change of the user's. A Pod's or Node's status is the user's when the document
        // carries one (outside a cluster nothing else writes it).
        let user_status =
            matches!(object, Object::Kube(..)) && value.get("status").is_some_and(|s| !s.is_null());
        let users = |mut v: serde_json::Value| {
            if let Some(o) = v.as_object_mut().filter(|_| !user_status) {
                o.remove("status");
            }
            if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                m.remove("generation");
            }
            v
        };
        let (mut was, now) = (users(typed::to_stored_value(old)), users(value.clone()));
        // Nor are the zero values a CRD's schema defaults fill in for fields left out.
        if let (Some(w), Some(n)) = (
            was.get_mut("spec").and_then(|s| s.as_object_mut()),
            now.get("spec").and_then(|s| s.as_object()),
        ) {
            let zero = |v: &serde_json::Value| match v {
                serde_json::Value::Null => true,
                serde_json::Value::Bool(b) => !b,
                serde_json::Value::String(s) => s.is_empty(),
                serde_json::Value::Array(a) => a.is_empty(),
                serde_json::Value::Object(o) => o.is_empty(),
                serde_json::Value::Number(_) => false,
            };
            w.retain(|k, v| n.contains_key(k) || !zero(v));
        }
        if was == now {
            return Ok(Planned {
                ops: Vec::new(),
                outcome: Applied::Unchanged,
            });
        }
    }
    // Outside a cluster the SpiderMultusConfig's NAD is written with it.
    let nad = match &object {
        Object::MultusConfig(c) if !store.mode().is_cluster() => {
            crate::multus::nad_ops(store, c).await?
        }
        _ => Vec::new(),
    };
    let mut ops = vec![Op::Put {
        kind,
        key: key.clone(),
        value,
        expect,
    }];
    ops.extend(nad);
    if let (Kind::IPPool, Some(since)) = (kind, since) {
        ops.push(Op::NoClaimsSince {
            pool: key.clone(),
            since,
        });
    }
    Ok(Planned { ops, outcome })
}

/// Creates or replaces `object` after checking the admission rules. The stored status,
/// creation time and UID are kept; a new object gets them.
pub async fn apply(store: &dyn Store, object: Object) -> Result<Applied, ApplyError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let Planned { ops, outcome } = plan(store, object.clone()).await?;
        if ops.is_empty() {
            return Ok(outcome);
        }
        match store.commit(ops).await {
            Ok(_) => return Ok(outcome),
            Err(e) => match Retry::APPLY.again(attempt, &e) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Err(e.into()),
            },
        }
    }
}

/// Why [`apply_all`] applied nothing: the object at `index` (0-based) was refused.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct ApplyAllError {
    /// The refused object's position in the input; `None` when no single object is to blame
    /// (the datastore failed, or the whole would not fit one transaction).
    pub index: Option<usize>,
    /// Why.
    pub error: ApplyError,
}

/// Applies every object or none: each is checked against the datastore as the objects before
/// it leave it, and all are written in one transaction (retried when another writer came
/// between). The same object may appear only once.
pub async fn apply_all(
    store: Arc<dyn Store>,
    objects: Vec<Object>,
) -> Result<Vec<Applied>, ApplyAllError> {
    apply_all_reporting(store, objects, &|_| {}).await
}

/// How far an [`apply_all_reporting`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// `done` of `total` objects checked.
    Checked {
        /// Checked so far.
        done: usize,
        /// All of them.
        total: usize,
    },
    /// Writing `ops` datastore operations.
    Writing {
        /// Operations in the transaction.
        ops: usize,
    },
}

/// [`apply_all`], telling `progress` after each object checked and before the write.
pub async fn apply_all_reporting(
    store: Arc<dyn Store>,
    objects: Vec<Object>,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Vec<Applied>, ApplyAllError> {
    let at = |index: usize| {
        move |error: ApplyError| ApplyAllError {
            index: Some(index),
            error,
        }
    };
    let whole = |error: ApplyError| ApplyAllError { index: None, error };
    let mut seen = BTreeMap::new();
    for (i, o) in objects.iter().enumerate() {
        if let Some(first) = seen.insert((o.kind(), o.key()), i) {
            return Err(at(i)(invalid(format!(
                "{} is also document {} of the input; name each object once",
                o.describe(),
                first + 1
            ))));
        }
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let staged = Arc::new(Staged::new(store.clone()));
        let mut ops = Vec::new();
        let mut outcomes = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            let planned = plan(staged.as_ref(), o.clone()).await.map_err(at(i))?;
            staged.stage(&planned.ops);
            ops.extend(planned.ops);
            outcomes.push(planned.outcome);
            progress(Progress::Checked {
                done: i + 1,
                total: objects.len(),
            });
        }
        if ops.is_empty() {
            return Ok(outcomes);
        }
        if ops.len() > store.max_ops() {
            return Err(whole(invalid(format!(
                "these {} objects need {} datastore operations, more than the {} this datastore \
                 commits at once; nothing was applied: apply them in smaller files",
                objects.len(),
                ops.len(),
                store.max_ops()
            ))));
        }
        progress(Progress::Writing { ops: ops.len() });
        match store.commit(ops).await {
            Ok(_) => return Ok(outcomes),
            Err(e) => match Retry::APPLY.again(attempt, &e) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Err(whole(e.into())),
            },
        }
    }
}

/// Deletes an object. A pool whose addresses are in use is kept, and the error names the pods.
/// Deleting a SpiderEndpoint releases the addresses it records in the same transaction (only
/// those its containers still hold), so none is left held without a record.
pub async fn delete(store: &dyn Store, kind: Kind, key: &str) -> Result<(), ApplyError> {
    let since = store.revision().await?;
    let Some((object, rev)) = typed::get(store, kind, key).await? else {
        return Err(ApplyError::NotFound {
            kind,
            key: key.to_string(),
        });
    };
    if kind == Kind::IPPool {
        let allocs = store.allocations(key).await?;
        if !allocs.is_empty() {
            let mut pods: Vec<&str> = allocs.iter().map(|a| a.holder.pod.as_str()).collect();
            pods.sort();
            pods.dedup();
            return Err(invalid(format!(
                "cannot delete SpiderIPPool {key:?} with {} allocated IPs (held by {})",
                allocs.len(),
                pods.join(", ")
            )));
        }
    }
    let mut ops = match &object {
        Object::Endpoint(ep) => ep
            .status
            .current
            .ips
            .iter()
            .flat_map(|n| Op::releases_of(n, &ep.status.current.uid))
            .collect(),
        Object::MultusConfig(c) if !store.mode().is_cluster() => {
            crate::multus::nad_delete_ops(store, c).await?
        }
        _ => Vec::new(),
    };
    ops.push(Op::Delete {
        kind,
        key: key.to_string(),
        expect: Expect::Revision(rev),
    });
    if let (Kind::IPPool, Some(since)) = (kind, since) {
        // A claim that came in after the holders were read keeps the pool.
        ops.push(Op::NoClaimsSince {
            pool: key.to_string(),
            since,
        });
    }
    store.commit(ops).await?;
    Ok(())
}

/// Whether the pod `namespace/pod` belongs to a StatefulSet that still wants it (its ordinal is
/// among the StatefulSet's, from `spec.ordinals.start` for `replicas`): such a pod keeps its
/// addresses across sandboxes and re-creations, and no reclaim takes them.
pub async fn stateful_member(
    store: &dyn Store,
    namespace: &str,
    pod: &str,
    owner_kind: &str,
    owner_name: &str,
) -> Result<bool, StoreError> {
    if owner_kind != "StatefulSet" {
        return Ok(false);
    }
    let Some(ordinal) = pod
        .strip_prefix(owner_name)
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|o| o.parse::<i64>().ok())
    else {
        return Ok(false);
    };
    let key = format!("{namespace}/StatefulSet/{owner_name}");
    Ok(match typed::get(store, Kind::Workload, &key).await? {
        Some((Object::Kube(_, w), _)) => w.ordinals().contains(&ordinal),
        _ => false,
    })
}

/// Whether the pod `namespace/pod`, owned by `owner_kind` `owner_name`, keeps its addresses
/// across sandboxes and re-creations: a StatefulSet's member ([`stateful_member`]), or a
/// KubeVirt VM's launcher pod (keyed by its VirtualMachineInstance's name) while the VM lives
/// ([`vm_lives`]).
pub async fn keeps_addresses(
    store: &dyn Store,
    namespace: &str,
    pod: &str,
    owner_kind: &str,
    owner_name: &str,
) -> Result<bool, StoreError> {
    if owner_kind == spiderpool_api::keys::VMI_KIND {
        return vm_lives(store, namespace, owner_name).await;
    }
    stateful_member(store, namespace, pod, owner_kind, owner_name).await
}

/// Whether the KubeVirt VM `namespace/name` lives: its VirtualMachineInstance exists and is not
/// being deleted, or its VirtualMachine does (a VM restarting has no VMI for a moment). Where
/// KubeVirt is not installed, none does.
pub async fn vm_lives(store: &dyn Store, namespace: &str, name: &str) -> Result<bool, StoreError> {
    for kind in [
        spiderpool_api::keys::VMI_KIND,
        spiderpool_api::keys::VM_KIND,
    ] {
        let key = format!("{namespace}/{kind}/{name}");
        if let Some((Object::Kube(_, o), _)) = typed::get(store, Kind::Workload, &key).await? {
            if o.metadata.deletion_timestamp.is_none() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Whether `ep` records `ip` of `pool` for `holder`: a NIC of it whose release would free the
/// address from that holder ([`spiderpool_store::Holder::released_by`]: the same container and
/// interface, or, for a record without a container as upstream writes them, the same pod
/// incarnation).
pub fn records(
    ep: &SpiderEndpoint,
    pool: &str,
    ip: std::net::IpAddr,
    holder: &spiderpool_store::Holder,
) -> bool {
    ep.status.current.ips.iter().any(|n| {
        holder.released_by(&n.container_id, &n.interface, &ep.status.current.uid)
            && n.held().contains(&(pool.to_string(), ip))
    })
}

/// Releases `ip` of `pool` when no endpoint records it for its holder: the repair for an
/// address held without a record. An address its pod's endpoint still records is refused
/// (release it with CNI DEL or by deleting the endpoint). Returns the holder released.
pub async fn release_unrecorded(
    store: &dyn Store,
    pool: &str,
    ip: std::net::IpAddr,
) -> Result<spiderpool_store::Holder, ApplyError> {
    release_unrecorded_by(store, pool, ip, |_| true).await
}

/// [`release_unrecorded`], only when the holder is one `expected` accepts (otherwise a
/// conflict naming the address: it changed hands).
pub async fn release_unrecorded_by(
    store: &dyn Store,
    pool: &str,
    ip: std::net::IpAddr,
    expected: impl Fn(&spiderpool_store::Holder) -> bool,
) -> Result<spiderpool_store::Holder, ApplyError> {
    let Some(a) = store
        .allocations(pool)
        .await?
        .into_iter()
        .find(|a| a.ip == ip)
    else {
        return Err(invalid(format!(
            "{ip} of SpiderIPPool {pool:?} is not held by anyone"
        )));
    };
    let h = &a.holder;
    if !expected(h) {
        return Err(invalid(format!(
            "{ip} of SpiderIPPool {pool:?} is held by pod {} (container {}, interface {}) now",
            h.pod, h.container_id, h.nic
        )));
    }
    if let Some((Object::Endpoint(ep), _)) = typed::get(store, Kind::Endpoint, &h.pod).await? {
        if records(&ep, pool, ip, h) {
            return Err(invalid(format!(
                "{ip} of SpiderIPPool {pool:?} is recorded in the endpoint of pod {} (container {}, interface {}): \
                 release it with CNI DEL or `spiderpoolctl delete endpoint {}`",
                h.pod, h.container_id, h.nic, h.pod
            )));
        }
    }
    // The release is owned by the holder read above: if the address has gone to someone else
    // since, nothing is freed. (A holder without a record never gains one: a repeated ADD of
    // its container finds no record and takes another address.)
    store
        .commit(vec![Op::Release {
            pool: pool.to_string(),
            ip,
            container_id: h.container_id.clone(),
            nic: h.nic.clone(),
            pod_uid: h.pod_uid.clone(),
        }])
        .await?;
    Ok(a.holder)
}
