//! The agent's side of auto pools: a pod's top controller (its application) and the auto
//! pools that serve one of its NICs, or why they cannot yet.

use spiderpool_api::autopool::{self, App};
use spiderpool_api::{KubeObject, Object, ValidationError};
use spiderpool_core::{IpFamily, PoolNames};
use spiderpool_store::{typed, Kind, Store, StoreError};

use super::index::{all_pools, ip_version, label, pools_of};

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
    if !app.built_in() && !matches!(config.ip_number, Some(autopool::IpNumber::Fixed(_))) {
        // A third party's application has no replica count the controller can read.
        return Err(in_pod(ValidationError::Invalid(format!(
            "{}/{}/{} only supports fixed auto-created IPPool IP Number (annotation ipam.spidernet.io/ippool-ip-number: \"N\", not {:?})",
            app.kind,
            app.namespace,
            app.name,
            config.ip_number.map(|n| n.to_string()).unwrap_or_default()
        )))
        .into());
    }
    let pools = all_pools(store).await?;
    let mut names = PoolNames::default();
    for family in [IpFamily::V4, IpFamily::V6] {
        let Some(subnet) = choice.family(family) else {
            continue;
        };
        let found = pools_of(&pools, &app.key_kind(), &app.namespace, &app.name)
            .into_iter()
            .find(|(p, _)| {
                label(p, spiderpool_api::keys::LABEL_APP_UID) == app.uid
                    && label(p, spiderpool_api::keys::LABEL_INTERFACE) == nic
                    && label(p, spiderpool_api::keys::LABEL_IP_VERSION) == ip_version(family)
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
