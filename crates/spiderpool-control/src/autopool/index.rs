//! Finding an application's auto pools among all pools: by their labels and pod affinity (which
//! holds the application's name whole), and the workload keys they are reconciled under.

use spiderpool_api::autopool;
use spiderpool_api::keys::{LABEL_APP_KIND, LABEL_APP_NAMESPACE};
use spiderpool_api::{KubeObject, Object, SpiderIPPool};
use spiderpool_core::IpFamily;
use spiderpool_store::{typed, Kind, Revision, Store, StoreError};

/// A workload key `namespace/Kind/name`, split.
pub(super) fn split_key(key: &str) -> Option<(&str, &str, &str)> {
    let mut parts = key.splitn(3, '/');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// Whether `o` is owned by a controller of a kind that gets auto pools itself (a Deployment's
/// ReplicaSet, a CronJob's Job): then its pods are its owner's application.
pub(super) fn owned_by_app(o: &KubeObject) -> bool {
    o.metadata.controller().is_some_and(|r| {
        let (group, _) = autopool::split_api_version(&r.api_version);
        autopool::APP_KINDS
            .iter()
            .any(|(g, k)| *g == group && *k == r.kind)
    })
}

/// The pools of the application `kind` `namespace/name` (any UID), by their labels and pod
/// affinity (which holds the name and API group whole). `kind` is a workload key's kind part:
/// `Kind` for the kinds the controller knows, `Kind.version.group` for a third party's.
pub(super) fn pools_of<'a>(
    pools: &'a [(SpiderIPPool, Revision)],
    kind: &str,
    namespace: &str,
    name: &str,
) -> Vec<&'a (SpiderIPPool, Revision)> {
    let (kind, third_party) = autopool::split_key_kind(kind);
    let group = match third_party {
        Some((_, group)) => Some(group),
        None => autopool::APP_KINDS
            .iter()
            .find(|(_, k)| *k == kind)
            .map(|(g, _)| *g),
    };
    pools
        .iter()
        .filter(|(p, _)| {
            let l = &p.metadata.labels;
            let affinity = |k: &str| {
                p.spec
                    .pod_affinity
                    .as_ref()
                    .and_then(|a| a.match_labels.get(k))
                    .map(String::as_str)
            };
            autopool::is_auto(l)
                && l.get(LABEL_APP_KIND).map(String::as_str) == Some(kind)
                && l.get(LABEL_APP_NAMESPACE).map(String::as_str) == Some(namespace)
                && affinity(spiderpool_api::keys::APP_NAME) == Some(name)
                && group.is_none_or(|g| {
                    affinity(spiderpool_api::keys::APP_API_GROUP).unwrap_or("") == g
                })
        })
        .collect()
}

pub(super) fn label<'a>(p: &'a SpiderIPPool, key: &str) -> &'a str {
    p.metadata.labels.get(key).map(String::as_str).unwrap_or("")
}

pub(super) fn ip_version(family: IpFamily) -> String {
    format!("IPv{}", family.number())
}

pub(super) async fn all_pools(
    store: &dyn Store,
) -> Result<Vec<(SpiderIPPool, Revision)>, StoreError> {
    Ok(typed::list(store, Kind::IPPool)
        .await?
        .into_iter()
        .filter_map(|(o, r)| match o {
            Object::IPPool(p) => Some((p, r)),
            _ => None,
        })
        .collect())
}
