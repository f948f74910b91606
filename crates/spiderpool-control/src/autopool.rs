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

use std::fmt;

use spiderpool_api::autopool::{self, App};
use spiderpool_api::{Object, SpiderIPPool, ValidationError};
use spiderpool_core::IpFamily;

use crate::apply::ApplyError;

mod carve;
mod index;
mod pod;
#[cfg(test)]
mod tests;

use carve::Carve;
use index::{all_pools, label, owned_by_app, pools_of, split_key};
pub use pod::{pod_pools, top_controller, PodPoolsError};
use spiderpool_store::{typed, Expect, Kind, Op, Revision, Store, StoreError};

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
            if !app.built_in() && !matches!(config.ip_number, Some(autopool::IpNumber::Fixed(_))) {
                // A third party's replica count is not known: upstream's rule.
                return Err(app_error(
                    &describe,
                    "only supports fixed auto-created IPPool IP Number (ipam.spidernet.io/ippool-ip-number: \"N\")",
                ));
            }
            let desired = config.desired(autopool::replicas(w), settings.default_redundancy);
            for choice in &config.subnets {
                for family in [IpFamily::V4, IpFamily::V6] {
                    let Some(subnet) = choice.family(family) else {
                        continue;
                    };
                    let nic = &choice.interface;
                    let carve = Carve {
                        store,
                        app,
                        config: &config,
                        nic,
                        family,
                        subnet,
                        desired,
                        settings,
                    };
                    match carve.run().await {
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
            .is_some_and(|a| label(p, spiderpool_api::keys::LABEL_APP_UID) == a.uid);
        if label(p, spiderpool_api::keys::LABEL_RECLAIM) == "false" {
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
        let app = p
            .spec
            .pod_affinity
            .as_ref()
            .and_then(|a| App::from_affinity(&a.match_labels));
        if let Some(app) = app {
            keys.insert(app.key());
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
