//! Where each kind lives in the API (group, version, resource; the six workload kinds behind
//! `Kind::Workload`), how a port key maps to an API and name, and how API errors become
//! [`StoreError`]s.

use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use spiderpool_store::{Kind, Result, Revision, StoreError};

use super::*;

/// The workload kinds `Kind::Workload` covers (key `namespace/Kind/name`).
pub const WORKLOADS: [(&str, &str, &str); 6] = [
    ("apps", "StatefulSet", "statefulsets"),
    ("apps", "Deployment", "deployments"),
    ("apps", "DaemonSet", "daemonsets"),
    ("apps", "ReplicaSet", "replicasets"),
    ("batch", "Job", "jobs"),
    ("batch", "CronJob", "cronjobs"),
];

/// Kinds read one object at a time under `Kind::Workload` (never listed, watched or cached:
/// their CRDs may not be installed, and a get of a kind the API server does not serve finds
/// nothing): KubeVirt's VirtualMachineInstance, by whose name upstream keys a VM's addresses,
/// and VirtualMachine.
pub const LOOKUP_ONLY: [(&str, &str, &str); 2] = [
    (
        "kubevirt.io",
        "VirtualMachineInstance",
        "virtualmachineinstances",
    ),
    ("kubevirt.io", "VirtualMachine", "virtualmachines"),
];

/// A third party's workload key, `namespace/Kind.version.group/name` (read one object at a
/// time, its resource found through discovery): (namespace, its kind, name).
pub(super) fn third_party(kind: Kind, key: &str) -> Option<(&str, GroupVersionKind, &str)> {
    if kind != Kind::Workload {
        return None;
    }
    let mut parts = key.splitn(3, '/');
    let (ns, segment, name) = (parts.next()?, parts.next()?, parts.next()?);
    let (k, Some((version, group))) = spiderpool_api::autopool::split_key_kind(segment) else {
        return None;
    };
    Some((ns, GroupVersionKind::gvk(group, version, k), name))
}

pub(super) fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// The API resource of a kind (for workloads, of the `Kind` in the key).
pub fn api_resource(kind: Kind, workload: Option<&str>) -> Result<ApiResource> {
    let spider = |k: &str| resource("spiderpool.spidernet.io", "v2beta1", k, kind.resource());
    Ok(match kind {
        Kind::IPPool => spider("SpiderIPPool"),
        Kind::Subnet => spider("SpiderSubnet"),
        Kind::ReservedIP => spider("SpiderReservedIP"),
        Kind::Endpoint => spider("SpiderEndpoint"),
        Kind::Coordinator => spider("SpiderCoordinator"),
        Kind::MultusConfig => spider("SpiderMultusConfig"),
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
            let (group, k, plural) = WORKLOADS
                .iter()
                .chain(&LOOKUP_ONLY)
                .find(|(_, k, _)| *k == w)
                .ok_or_else(|| {
                    StoreError::Config(format!(
                        "workload kind {w:?} is not one of {}",
                        WORKLOADS.map(|w| w.1).join(", ")
                    ))
                })?;
            resource(group, "v1", k, plural)
        }
    })
}

/// The revision of an object: its `resourceVersion` as a number.
pub fn rv_of(o: &DynamicObject) -> Result<Revision> {
    let rv = o.metadata.resource_version.as_deref().unwrap_or_default();
    rv.parse().map_err(|_| StoreError::Corrupt {
        key: o.metadata.name.clone().unwrap_or_default(),
        message: format!("resourceVersion {rv:?} is not a number"),
    })
}

/// The key of an object of `kind` as the port names it.
pub fn key_of(kind: Kind, o: &DynamicObject) -> String {
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

impl Inner {
    /// The API of `kind` for `key`, and the object's name in it.
    pub(super) fn api(&self, kind: Kind, key: &str) -> Result<(Api<DynamicObject>, String)> {
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

    pub(super) fn err(&self, what: &str, e: kube::Error) -> StoreError {
        match e {
            kube::Error::Api(s) if s.code == 409 => {
                StoreError::changed(format!("{what}: {}", s.message))
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
}
