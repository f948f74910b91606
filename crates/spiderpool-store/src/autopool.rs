//! SpiderSubnet auto-created pools: one reconciler for every mode. The controller's leader runs
//! it on workload and pool events (Kubernetes); `spiderpoolctl` runs it on the workloads it
//! applies and deletes, and on `spiderpoolctl reconcile` (standalone, etcd).
//!
//! For each application (a Deployment, ReplicaSet, StatefulSet, DaemonSet, Job or CronJob that
//! no other of these owns) whose pod template names subnets with `ipam.spidernet.io/subnet(s)`,
//! it keeps one pool per NIC and family, carved from the subnet's lowest free addresses (not in
//! another pool of the subnet's CIDR, not reserved), and sized by
//! `ipam.spidernet.io/ippool-ip-number`. A scale-down gives back the highest addresses no pod
//! holds, never one in use. When the application goes (or another of the same name replaces
//! it), its pools are deleted once they hold nothing, unless `ipam.spidernet.io/ippool-reclaim`
//! is `"false"`: then the pool waits for the next application of the same kind, namespace and
//! name, which takes it over.
//!
//! Writers never carve the same addresses twice: with a datastore-wide revision (SQLite, etcd)
//! every carve also writes the subnet, guarded by the revision it was read at, so two carvers of
//! one subnet conflict and the later one plans again; in a cluster only the controller's leader
//! carves, and the admission rules refuse a pool whose addresses another pool of the CIDR has.

use std::collections::BTreeMap;
use std::fmt;

use spiderpool_api::autopool::{self, App, AutoConfig, LABEL_APP_KIND, LABEL_APP_NAMESPACE};
use spiderpool_api::crd::IPPoolSpec;
use spiderpool_api::{KubeObject, Object, ObjectMeta, SpiderIPPool, ValidationError};
use spiderpool_core::{IpFamily, IpSet, PoolNames};

use crate::admission::LABEL_OWNER_SUBNET;
use crate::objects::{plan_as, ApplyError, Who};
use crate::{typed, Expect, Kind, Op, Revision, Store, StoreError};

/// The reconciler's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Addresses beyond the replicas when the template has no `ippool-ip-number` (upstream's
    /// `defaultRedundantIPNumber`).
    pub default_redundancy: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            default_redundancy: 1,
        }
    }
}

/// What the reconciler did to one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Created with this many addresses.
    Created {
        /// The pool.
        pool: String,
        /// Its addresses.
        ips: u64,
    },
    /// Grown or shrunk.
    Scaled {
        /// The pool.
        pool: String,
        /// Addresses before.
        from: u64,
        /// Addresses after.
        to: u64,
    },
    /// A reserved pool (`ippool-reclaim: "false"`) taken over by a new application of the same
    /// kind, namespace and name.
    Adopted {
        /// The pool.
        pool: String,
        /// The UID of the application it served.
        from_uid: String,
    },
    /// Deleted with its application.
    Deleted {
        /// The pool.
        pool: String,
    },
    /// To be deleted once its pods have given their addresses back.
    Waiting {
        /// The pool.
        pool: String,
        /// Addresses still held.
        in_use: u64,
    },
    /// Kept for the next application of the same kind, namespace and name.
    Reserved {
        /// The pool.
        pool: String,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Created { pool, ips } => write!(f, "created SpiderIPPool {pool} with {ips} IPs"),
            Action::Scaled { pool, from, to } => {
                write!(f, "scaled SpiderIPPool {pool} from {from} to {to} IPs")
            }
            Action::Adopted { pool, from_uid } => write!(
                f,
                "took over reserved SpiderIPPool {pool} (it served UID {from_uid})"
            ),
            Action::Deleted { pool } => write!(f, "deleted SpiderIPPool {pool}"),
            Action::Waiting { pool, in_use } => write!(
                f,
                "SpiderIPPool {pool} is deleted once its {in_use} IPs in use are released"
            ),
            Action::Reserved { pool } => write!(
                f,
                "kept SpiderIPPool {pool} (ippool-reclaim: false) for the next application of the same kind and name"
            ),
        }
    }
}

/// What one application's reconcile did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The application, `Deployment default/web`.
    pub app: String,
    /// One entry per pool changed.
    pub actions: Vec<Action>,
}

/// Why an application could not be reconciled (its other pools are still done).
fn app_error(app: &str, e: impl fmt::Display) -> ApplyError {
    ApplyError::Invalid(ValidationError::Invalid(format!("{app}: {e}")))
}

/// A workload key `namespace/Kind/name`, split.
fn split_key(key: &str) -> Option<(&str, &str, &str)> {
    let mut parts = key.splitn(3, '/');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// Whether `o` is owned by a controller of a kind that gets auto pools itself (a Deployment's
/// ReplicaSet, a CronJob's Job): then its pods are its owner's application.
fn owned_by_app(o: &KubeObject) -> bool {
    o.metadata.controller().is_some_and(|r| {
        let (group, _) = autopool::split_api_version(&r.api_version);
        autopool::APP_KINDS
            .iter()
            .any(|(g, k)| *g == group && *k == r.kind)
    })
}

/// The pools of the application `kind` `namespace/name` (any UID), by their labels and pod
/// affinity (which holds the name whole).
fn pools_of<'a>(
    pools: &'a [(SpiderIPPool, Revision)],
    kind: &str,
    namespace: &str,
    name: &str,
) -> Vec<&'a (SpiderIPPool, Revision)> {
    pools
        .iter()
        .filter(|(p, _)| {
            let l = &p.metadata.labels;
            autopool::is_auto(l)
                && l.get(LABEL_APP_KIND).map(String::as_str) == Some(kind)
                && l.get(LABEL_APP_NAMESPACE).map(String::as_str) == Some(namespace)
                && p.spec
                    .pod_affinity
                    .as_ref()
                    .and_then(|a| a.match_labels.get(autopool::APP_NAME))
                    .map(String::as_str)
                    == Some(name)
        })
        .collect()
}

fn label<'a>(p: &'a SpiderIPPool, key: &str) -> &'a str {
    p.metadata.labels.get(key).map(String::as_str).unwrap_or("")
}

fn ip_version(family: IpFamily) -> String {
    format!("IPv{}", family.number())
}

async fn all_pools(store: &dyn Store) -> Result<Vec<(SpiderIPPool, Revision)>, StoreError> {
    Ok(typed::list(store, Kind::IPPool)
        .await?
        .into_iter()
        .filter_map(|(o, r)| match o {
            Object::IPPool(p) => Some((p, r)),
            _ => None,
        })
        .collect())
}

/// Reconciles the application under the workload key `namespace/Kind/name`: creates, scales,
/// takes over or deletes its auto pools. Errors name the application and what is wrong.
pub async fn reconcile(
    store: &dyn Store,
    key: &str,
    settings: Settings,
) -> Result<Report, ApplyError> {
    let Some((namespace, kind, name)) = split_key(key) else {
        return Err(app_error(key, "not a workload key namespace/Kind/name"));
    };
    let describe = format!("{kind} {namespace}/{name}");
    let workload = match typed::get(store, Kind::Workload, key).await? {
        Some((Object::Kube(_, w), _)) if w.metadata.deletion_timestamp.is_none() => Some(w),
        _ => None,
    };
    let mut actions = Vec::new();
    let mut wanted: Vec<String> = Vec::new();
    let mut failed = None;
    let app = workload.as_ref().map(App::of);
    if let (Some(w), Some(app)) = (&workload, &app) {
        let config = if owned_by_app(w) || autopool::host_network(w) {
            None
        } else {
            autopool::config(&autopool::template_annotations(w))
                .map_err(|e| app_error(&describe, format!("pod template {e}")))?
        };
        if let Some(config) = config {
            let desired = config.desired(autopool::replicas(w), settings.default_redundancy);
            for choice in &config.subnets {
                for family in [IpFamily::V4, IpFamily::V6] {
                    let Some(subnet) = choice.family(family) else {
                        continue;
                    };
                    let nic = &choice.interface;
                    match ensure(store, app, &config, nic, family, subnet, desired, settings).await
                    {
                        Ok((pool, action)) => {
                            wanted.push(pool);
                            actions.extend(action);
                        }
                        // The other pools are still reconciled; the first error is reported.
                        Err(e) => {
                            tracing::warn!(app = %describe, %nic, %subnet, error = %e, "auto pool");
                            failed = failed.or(Some(e));
                        }
                    }
                }
            }
        }
    }
    // Pools of this kind/namespace/name that no current application wants.
    let pools = all_pools(store).await?;
    for (p, rev) in pools_of(&pools, kind, namespace, name) {
        let pool = &p.metadata.name;
        if wanted.contains(pool) || p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let same_app = app
            .as_ref()
            .is_some_and(|a| label(p, autopool::LABEL_APP_UID) == a.uid);
        if label(p, autopool::LABEL_RECLAIM) == "false" {
            if !same_app {
                actions.push(Action::Reserved { pool: pool.clone() });
            }
            continue;
        }
        match remove(store, p, *rev).await {
            Ok(a) => actions.push(a),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    // Reserved pools are reported once, when their application goes.
    actions.retain(|a| !matches!(a, Action::Reserved { .. }) || workload.is_none());
    match failed {
        Some(e) => Err(e),
        None => Ok(Report {
            app: describe,
            actions,
        }),
    }
}

/// Deletes an auto pool that holds nothing; one in use waits.
async fn remove(store: &dyn Store, p: &SpiderIPPool, rev: Revision) -> Result<Action, ApplyError> {
    let pool = p.metadata.name.clone();
    let since = store.revision().await?;
    let in_use = store.allocations(&pool).await?.len() as u64;
    if in_use > 0 {
        return Ok(Action::Waiting { pool, in_use });
    }
    let mut ops = vec![Op::Delete {
        kind: Kind::IPPool,
        key: pool.clone(),
        expect: Expect::Revision(rev),
    }];
    if let Some(since) = since {
        ops.push(Op::NoClaimsSince {
            pool: pool.clone(),
            since,
        });
    }
    match store.commit(ops).await {
        Ok(_) => Ok(Action::Deleted { pool }),
        // Claimed or changed meanwhile: the next pass looks again.
        Err(StoreError::Conflict(_)) => Ok(Action::Waiting { pool, in_use: 0 }),
        Err(e) => Err(e.into()),
    }
}

/// How often a carve is planned again after another writer changed the subnet or pool.
const ATTEMPTS: u32 = 8;

/// Makes the application's pool for `family` on `nic` hold `desired` addresses of `subnet`;
/// returns its name and what was done.
#[allow(clippy::too_many_arguments)]
async fn ensure(
    store: &dyn Store,
    app: &App,
    config: &AutoConfig,
    nic: &str,
    family: IpFamily,
    subnet: &str,
    desired: u64,
    settings: Settings,
) -> Result<(String, Option<Action>), ApplyError> {
    let describe = app.describe();
    for attempt in 1..=ATTEMPTS {
        let Some((Object::Subnet(s), subnet_rev)) = typed::get(store, Kind::Subnet, subnet).await?
        else {
            return Err(app_error(
                &describe,
                format!("SpiderSubnet {subnet:?} named for interface {nic} does not exist"),
            ));
        };
        let sp = s.to_pool()?;
        if sp.family != family {
            return Err(app_error(
                &describe,
                format!(
                    "SpiderSubnet {subnet:?} ({}) is named as the {family} subnet of interface {nic}",
                    sp.subnet
                ),
            ));
        }
        if s.metadata.deletion_timestamp.is_some() {
            return Err(app_error(
                &describe,
                format!("SpiderSubnet {subnet:?} is being deleted"),
            ));
        }
        let pools = all_pools(store).await?;
        let candidates: Vec<&(SpiderIPPool, Revision)> =
            pools_of(&pools, &app.kind, &app.namespace, &app.name)
                .into_iter()
                .filter(|(p, _)| {
                    label(p, autopool::LABEL_INTERFACE) == nic
                        && label(p, autopool::LABEL_IP_VERSION) == ip_version(family)
                        && p.metadata.deletion_timestamp.is_none()
                })
                .collect();
        let current = candidates
            .iter()
            .find(|(p, _)| label(p, autopool::LABEL_APP_UID) == app.uid)
            .or_else(|| {
                candidates
                    .iter()
                    .find(|(p, _)| label(p, autopool::LABEL_RECLAIM) == "false")
            })
            .copied();
        if let Some((p, _)) = current {
            let owner = label(p, LABEL_OWNER_SUBNET);
            if owner != subnet {
                return Err(app_error(
                    &describe,
                    format!(
                        "ApplicationSubnetChanged: its SpiderIPPool {} of interface {nic} belongs to SpiderSubnet {owner:?}, \
                         the pod template now names {subnet:?}; the subnet of an application's pool cannot change \
                         (delete and recreate the application)",
                        p.metadata.name
                    ),
                ));
            }
        }
        // Addresses of the subnet no pool of its CIDR lists and no SpiderReservedIP reserves.
        let mut taken = IpSet::new();
        for (p, _) in &pools {
            if let Ok(pp) = p.to_pool() {
                if pp.subnet == sp.subnet {
                    taken = taken.union(&pp.ips);
                }
            }
        }
        for (o, _) in typed::list(store, Kind::ReservedIP).await? {
            if let Object::ReservedIP(r) = o {
                if let Ok(set) = r.to_set() {
                    taken = taken.union(&set);
                }
            }
        }
        let free = sp.usable().difference(&taken);
        let ip_number = config.ip_number_value(settings.default_redundancy);
        let (object, expect_new, action) = match current {
            None => {
                let free_now = free.len();
                if free_now < u128::from(desired) {
                    return Err(app_error(
                        &describe,
                        format!(
                            "insufficient subnet FreeIPs, required '{desired}' but only left '{free_now}' in SpiderSubnet {subnet:?}"
                        ),
                    ));
                }
                let name = app.pool_name(family, nic);
                let ips = free.lowest(u128::from(desired));
                let mut labels = app.pool_labels(family, nic, config.reclaim);
                labels.insert(LABEL_OWNER_SUBNET.into(), subnet.to_string());
                let pool = SpiderIPPool {
                    api_version: spiderpool_api::crd::API_VERSION.into(),
                    kind: "SpiderIPPool".into(),
                    metadata: ObjectMeta {
                        name: name.clone(),
                        labels,
                        annotations: BTreeMap::from([(
                            autopool::IP_NUMBER.to_string(),
                            ip_number.clone(),
                        )]),
                        ..Default::default()
                    },
                    spec: IPPoolSpec {
                        ip_version: Some(i64::from(family.number())),
                        subnet: sp.subnet.to_string(),
                        ips: ips.to_strings(),
                        gateway: s.spec.gateway.clone(),
                        routes: s.spec.routes.clone(),
                        vlan: s.spec.vlan,
                        pod_affinity: Some(app.affinity()),
                        ..Default::default()
                    },
                    status: None,
                };
                (
                    pool,
                    true,
                    Action::Created {
                        pool: name,
                        ips: desired,
                    },
                )
            }
            Some((p, _)) => {
                let mut pool = p.clone();
                let have = p.to_pool()?.ips;
                let before = u64::try_from(have.len()).unwrap_or(u64::MAX);
                let in_use = IpSet::from_ips(
                    store
                        .allocations(&p.metadata.name)
                        .await?
                        .into_iter()
                        .map(|a| a.ip),
                );
                let ips = if before < desired {
                    let add = free.lowest(u128::from(desired - before));
                    if add.len() < u128::from(desired - before) {
                        return Err(app_error(
                            &describe,
                            format!(
                                "insufficient subnet FreeIPs, required '{}' but only left '{}' in SpiderSubnet {subnet:?} to scale SpiderIPPool {}",
                                desired - before,
                                free.len(),
                                p.metadata.name
                            ),
                        ));
                    }
                    have.union(&add)
                } else if before > desired {
                    // The highest addresses no pod holds; never one in use.
                    let spare = have.difference(&in_use);
                    have.difference(&spare.highest(u128::from(before - desired)))
                } else {
                    have.clone()
                };
                let after = u64::try_from(ips.len()).unwrap_or(u64::MAX);
                let from_uid = label(p, autopool::LABEL_APP_UID).to_string();
                pool.spec.ips = ips.to_strings();
                pool.metadata
                    .labels
                    .extend(app.pool_labels(family, nic, config.reclaim));
                pool.metadata
                    .annotations
                    .insert(autopool::IP_NUMBER.into(), ip_number.clone());
                if pool == *p {
                    return Ok((p.metadata.name.clone(), None));
                }
                let action = if from_uid != app.uid {
                    Action::Adopted {
                        pool: p.metadata.name.clone(),
                        from_uid,
                    }
                } else {
                    Action::Scaled {
                        pool: p.metadata.name.clone(),
                        from: before,
                        to: after,
                    }
                };
                (pool, false, action)
            }
        };
        let name = object.metadata.name.clone();
        let planned = plan_as(store, Object::IPPool(object), Who::Reconciler).await?;
        let mut ops = planned.ops;
        if expect_new {
            for op in &mut ops {
                if let Op::Put { expect, .. } = op {
                    *expect = Expect::Absent;
                }
            }
        }
        // Carvers of one subnet are serialised on it (see the module comment).
        if store.revision().await?.is_some() {
            if let Some(stored) = store.get(Kind::Subnet, subnet).await? {
                if stored.revision == subnet_rev {
                    ops.push(Op::Put {
                        kind: Kind::Subnet,
                        key: subnet.to_string(),
                        value: stored.value,
                        expect: Expect::Revision(subnet_rev),
                    });
                } else {
                    continue;
                }
            }
        }
        match store.commit(ops).await {
            Ok(_) => return Ok((name, Some(action))),
            Err(StoreError::Conflict(m)) if attempt < ATTEMPTS => {
                tracing::debug!(app = %describe, conflict = %m, "auto pool: planning again");
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApplyError::Store(StoreError::Conflict(format!(
        "{describe}: the auto pool of interface {nic} kept changing while it was being carved"
    ))))
}

/// Every application that has or may want auto pools: each workload of a kind that gets them,
/// and each application an auto pool names.
pub async fn applications(store: &dyn Store) -> Result<Vec<String>, StoreError> {
    let mut keys = std::collections::BTreeSet::new();
    for (o, _) in typed::list(store, Kind::Workload).await? {
        if let Object::Kube(_, w) = &o {
            let app = App::of(w);
            if app.built_in() {
                keys.insert(app.key());
            }
        }
    }
    for (p, _) in all_pools(store).await? {
        let l = &p.metadata.labels;
        if !autopool::is_auto(l) {
            continue;
        }
        let name = p
            .spec
            .pod_affinity
            .as_ref()
            .and_then(|a| a.match_labels.get(autopool::APP_NAME));
        if let (Some(ns), Some(kind), Some(name)) =
            (l.get(LABEL_APP_NAMESPACE), l.get(LABEL_APP_KIND), name)
        {
            keys.insert(format!("{ns}/{kind}/{name}"));
        }
    }
    Ok(keys.into_iter().collect())
}

/// Reconciles every application; one's failure does not stop the others.
pub async fn reconcile_all(
    store: &dyn Store,
    settings: Settings,
) -> Result<Vec<Result<Report, ApplyError>>, StoreError> {
    let mut out = Vec::new();
    for key in applications(store).await? {
        out.push(reconcile(store, &key, settings).await);
    }
    Ok(out)
}

/// The top controller of a pod: its controller, and that one's controller while it is a
/// workload the datastore knows (a Deployment above a ReplicaSet, a CronJob above a Job).
/// `None` for a pod no controller owns.
pub async fn top_controller(
    store: &dyn Store,
    pod: &KubeObject,
) -> Result<Option<App>, StoreError> {
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let Some(mut owner) = pod.metadata.controller().cloned() else {
        return Ok(None);
    };
    for _ in 0..4 {
        let (group, _) = autopool::split_api_version(&owner.api_version);
        let known = autopool::APP_KINDS
            .iter()
            .any(|(g, k)| *g == group && *k == owner.kind);
        if !known {
            break;
        }
        let key = format!("{namespace}/{}/{}", owner.kind, owner.name);
        let Some((Object::Kube(_, w), _)) = typed::get(store, Kind::Workload, &key).await? else {
            break;
        };
        match w.metadata.controller() {
            Some(up) => owner = up.clone(),
            None => break,
        }
    }
    let (group, version) = autopool::split_api_version(&owner.api_version);
    Ok(Some(App {
        group,
        version,
        kind: owner.kind,
        namespace,
        name: owner.name,
        uid: owner.uid,
    }))
}

/// Why a pod's auto pools cannot serve it yet, or at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PodPoolsError {
    /// Wrong annotations, an orphan pod, a third party's controller: no retry helps.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The pool does not exist yet or has no free address yet: the reconciler is behind.
    #[error("{0}")]
    NotReady(String),
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The auto pools that serve `nic` of `pod`, when its annotations name subnets for that NIC
/// (`None`: they name none, and the other sources apply). Each must exist for the pod's
/// application (its UID), not be terminating, and have a free address.
pub async fn pod_pools(
    store: &dyn Store,
    pod: &KubeObject,
    nic: &str,
) -> Result<Option<PoolNames>, PodPoolsError> {
    let pod_key = format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name
    );
    let in_pod = |e: ValidationError| ValidationError::Invalid(format!("pod {pod_key}: {e}"));
    let Some(config) = autopool::config(&pod.metadata.annotations).map_err(in_pod)? else {
        return Ok(None);
    };
    let Some(choice) = config.nic(nic) else {
        return Ok(None);
    };
    let Some(app) = top_controller(store, pod).await? else {
        return Err(in_pod(ValidationError::Invalid(
            "SpiderSubnet feature doesn't support no-controller pod: annotation ipam.spidernet.io/subnet(s) needs a Deployment, ReplicaSet, StatefulSet, DaemonSet, Job or CronJob; name pools with ipam.spidernet.io/ippool instead".into(),
        ))
        .into());
    };
    if !app.built_in() {
        // Upstream's answer first: a third party's application needs a fixed size.
        let why = match config.ip_number {
            Some(autopool::IpNumber::Fixed(_)) => "is a third-party controller: this version carves auto pools for Deployments, ReplicaSets, StatefulSets, DaemonSets, Jobs and CronJobs only; name pools with ipam.spidernet.io/ippool instead",
            _ => "only supports fixed auto-created IPPool IP Number",
        };
        return Err(in_pod(ValidationError::Invalid(format!(
            "{}/{}/{} {why}",
            app.kind, app.namespace, app.name
        )))
        .into());
    }
    let pools = all_pools(store).await?;
    let mut names = PoolNames::default();
    for family in [IpFamily::V4, IpFamily::V6] {
        let Some(subnet) = choice.family(family) else {
            continue;
        };
        let found = pools_of(&pools, &app.kind, &app.namespace, &app.name)
            .into_iter()
            .find(|(p, _)| {
                label(p, autopool::LABEL_APP_UID) == app.uid
                    && label(p, autopool::LABEL_INTERFACE) == nic
                    && label(p, autopool::LABEL_IP_VERSION) == ip_version(family)
                    && p.metadata.deletion_timestamp.is_none()
            });
        let Some((p, _)) = found else {
            return Err(PodPoolsError::NotReady(format!(
                "no auto-created {family} IPPool of SpiderSubnet {subnet:?} for interface {nic} of {} (UID {}) yet",
                app.describe(),
                app.uid
            )));
        };
        let total = p.to_pool()?.usable().len();
        let held = store.allocations(&p.metadata.name).await?.len() as u128;
        if held >= total {
            return Err(PodPoolsError::NotReady(format!(
                "auto-created IPPool {} of {} has no free IP yet ({held} of {total} in use; it grows with the replicas)",
                p.metadata.name,
                app.describe()
            )));
        }
        match family {
            IpFamily::V4 => names.v4.push(p.metadata.name.clone()),
            IpFamily::V6 => names.v6.push(p.metadata.name.clone()),
        }
    }
    Ok(Some(names))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use crate::objects;
    use spiderpool_api::manifest::parse_documents;

    async fn apply(store: &dyn Store, yaml: &str) {
        for d in parse_documents(yaml).unwrap() {
            objects::apply(store, d.object).await.unwrap();
        }
    }

    const SUBNET: &str = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderSubnet\nmetadata: {name: subnet-6}\nspec: {subnet: 10.6.0.0/16, ips: [10.6.168.101-10.6.168.110], excludeIPs: [10.6.168.103], gateway: 10.6.0.1}\n";

    fn deployment(replicas: u64, annotations: &str) -> String {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: default, uid: 11111111-2222-3333-4444-9a2b3c4d5e6f}}\nspec:\n  replicas: {replicas}\n  template:\n    metadata:\n      annotations: {annotations}\n"
        )
    }

    async fn pool(store: &dyn Store, name: &str) -> Option<SpiderIPPool> {
        match typed::get(store, Kind::IPPool, name).await.unwrap() {
            Some((Object::IPPool(p), _)) => Some(p),
            _ => None,
        }
    }

    #[tokio::test]
    async fn carves_scales_and_reclaims() {
        let store = MemoryStore::new();
        apply(&store, SUBNET).await;
        apply(
            &store,
            "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderReservedIP\nmetadata: {name: r}\nspec: {ips: [10.6.168.102]}\n",
        )
        .await;
        let ann = r#"{ipam.spidernet.io/subnet: '{"ipv4": ["subnet-6"]}', ipam.spidernet.io/ippool-ip-number: "+1"}"#;
        apply(&store, &deployment(2, ann)).await;
        let key = "default/Deployment/web";
        let r = reconcile(&store, key, Settings::default()).await.unwrap();
        let name = "auto4-web-eth0-9a2b3";
        assert_eq!(
            r.actions,
            [Action::Created {
                pool: name.into(),
                ips: 3
            }]
        );
        let p = pool(&store, name).await.unwrap();
        // The lowest free addresses: .102 is reserved, .103 excluded by the subnet.
        assert_eq!(p.spec.ips, ["10.6.168.101", "10.6.168.104-10.6.168.105"]);
        assert_eq!(p.spec.gateway.as_deref(), Some("10.6.0.1"));
        assert_eq!(p.metadata.labels[LABEL_OWNER_SUBNET], "subnet-6");
        assert_eq!(p.metadata.annotations[autopool::IP_NUMBER], "+1");
        // Unchanged: nothing to do.
        let r = reconcile(&store, key, Settings::default()).await.unwrap();
        assert!(r.actions.is_empty(), "{r:?}");

        // Scale to 4: two more, the lowest free.
        apply(&store, &deployment(4, ann)).await;
        let r = reconcile(&store, key, Settings::default()).await.unwrap();
        assert_eq!(
            r.actions,
            [Action::Scaled {
                pool: name.into(),
                from: 3,
                to: 5
            }]
        );
        let p = pool(&store, name).await.unwrap();
        assert_eq!(p.spec.ips, ["10.6.168.101", "10.6.168.104-10.6.168.107"]);
        // Hold .107, scale to 1: the highest addresses nobody holds go, .107 stays.
        let pool_revision = store
            .get(Kind::IPPool, name)
            .await
            .unwrap()
            .unwrap()
            .revision;
        store
            .commit(vec![Op::Claim {
                pool: name.into(),
                ip: "10.6.168.107".parse().unwrap(),
                holder: crate::Holder {
                    pod: "default/web-1".into(),
                    container_id: "c1".into(),
                    nic: "eth0".into(),
                    ..Default::default()
                },
                pool_revision,
            }])
            .await
            .unwrap();
        apply(&store, &deployment(1, ann)).await;
        reconcile(&store, key, Settings::default()).await.unwrap();
        let p = pool(&store, name).await.unwrap();
        assert_eq!(p.spec.ips, ["10.6.168.101", "10.6.168.107"]);

        // Deleted: the pool waits for its address, then goes.
        objects::delete(&store, Kind::Workload, key).await.unwrap();
        let r = reconcile(&store, key, Settings::default()).await.unwrap();
        assert_eq!(
            r.actions,
            [Action::Waiting {
                pool: name.into(),
                in_use: 1
            }]
        );
        store
            .commit(vec![Op::Release {
                pool: name.into(),
                ip: "10.6.168.107".parse().unwrap(),
                container_id: "c1".into(),
                nic: "eth0".into(),
            }])
            .await
            .unwrap();
        let r = reconcile_all(&store, Settings::default()).await.unwrap();
        assert_eq!(
            r[0].as_ref().unwrap().actions,
            [Action::Deleted { pool: name.into() }]
        );
        assert!(pool(&store, name).await.is_none());
    }

    #[tokio::test]
    async fn a_reserved_pool_goes_to_the_next_application_of_that_name() {
        let store = MemoryStore::new();
        apply(&store, SUBNET).await;
        let ann = r#"{ipam.spidernet.io/subnet: '{"ipv4": ["subnet-6"]}', ipam.spidernet.io/ippool-ip-number: "2", ipam.spidernet.io/ippool-reclaim: "false"}"#;
        apply(&store, &deployment(1, ann)).await;
        let key = "default/Deployment/web";
        reconcile(&store, key, Settings::default()).await.unwrap();
        objects::delete(&store, Kind::Workload, key).await.unwrap();
        let r = reconcile(&store, key, Settings::default()).await.unwrap();
        let name = "auto4-web-eth0-9a2b3";
        assert_eq!(r.actions, [Action::Reserved { pool: name.into() }]);
        let again = deployment(1, ann).replace("9a2b3c4d5e6f", "77777c4d5e6f");
        apply(&store, &again).await;
        let r = reconcile(&store, key, Settings::default()).await.unwrap();
        assert_eq!(
            r.actions,
            [Action::Adopted {
                pool: name.into(),
                from_uid: "11111111-2222-3333-4444-9a2b3c4d5e6f".into()
            }]
        );
        let p = pool(&store, name).await.unwrap();
        assert_eq!(
            p.metadata.labels[autopool::LABEL_APP_UID],
            "11111111-2222-3333-4444-77777c4d5e6f"
        );
        // A StatefulSet of the same name is another application.
        apply(
            &store,
            &deployment(1, ann)
                .replace("Deployment", "StatefulSet")
                .replace("9a2b3c4d5e6f", "88888c4d5e6f"),
        )
        .await;
        let r = reconcile(&store, "default/StatefulSet/web", Settings::default())
            .await
            .unwrap();
        assert_eq!(
            r.actions,
            [Action::Created {
                pool: "auto4-web-eth0-88888".into(),
                ips: 2
            }]
        );
    }

    #[tokio::test]
    async fn refusals_name_the_application_and_the_value() {
        let store = MemoryStore::new();
        apply(&store, SUBNET).await;
        let key = "default/Deployment/web";
        apply(
            &store,
            &deployment(1, r#"{ipam.spidernet.io/subnet: '{"ipv4": ["nope"]}'}"#),
        )
        .await;
        let e = reconcile(&store, key, Settings::default())
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Deployment default/web: SpiderSubnet \"nope\" named for interface eth0 does not exist"
        );
        apply(
            &store,
            &deployment(1, r#"{ipam.spidernet.io/subnet: '{"ipv4": ["subnet-6"]}', ipam.spidernet.io/ippool-ip-number: "10"}"#),
        )
        .await;
        let e = reconcile(&store, key, Settings::default())
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("insufficient subnet FreeIPs, required '10' but only left '9'"),
            "{e}"
        );
        apply(
            &store,
            &deployment(1, r#"{ipam.spidernet.io/subnet: '{"ipv4": ["subnet-6"]}', ipam.spidernet.io/ippool-ip-number: "x"}"#),
        )
        .await;
        let e = reconcile(&store, key, Settings::default())
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Deployment default/web: pod template annotation ipam.spidernet.io/ippool-ip-number: \"x\""),
            "{e}"
        );
    }
}
