//! Who a request is for: the pod key and the container and NIC inside it. Every part is checked
//! before it becomes a key (Kubernetes' name rules, libcni's container-ID and interface rules),
//! so two different requests can never share one key, and a container without Kubernetes
//! arguments lives in a key space of its own that no pod can name.

use spiderpool_api::agent::{IpamAddArgs, IpamDelArgs};
use spiderpool_api::names;

use super::*;

/// The namespace part of a bare container's key: not a DNS-1123 label, so no pod can have it.
pub(super) const BARE_NAMESPACE: &str = "_container";

/// Who a request is for.
pub(super) struct PodRef {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) container_id: String,
    pub(super) nic: String,
    /// No `K8S_POD_NAME` came: the container is its own "pod", keyed by its ID.
    pub(super) bare: bool,
}

impl PodRef {
    /// Who an ADD is for.
    pub(super) fn of_add(args: &IpamAddArgs) -> Result<Self> {
        Self::new(
            &args.container_id,
            &args.if_name,
            &args.pod_namespace,
            &args.pod_name,
        )
    }

    /// Who a DEL or CHECK is for.
    pub(super) fn of_del(args: &IpamDelArgs) -> Result<Self> {
        Self::new(
            &args.container_id,
            &args.if_name,
            &args.pod_namespace,
            &args.pod_name,
        )
    }

    fn new(container_id: &str, nic: &str, namespace: &str, name: &str) -> Result<Self> {
        names::container_id(container_id).map_err(ServiceError::BadArgs)?;
        names::interface_name(nic).map_err(ServiceError::BadArgs)?;
        let bare = name.is_empty();
        let (namespace, name) = if bare {
            (BARE_NAMESPACE.to_string(), container_id.to_string())
        } else {
            let namespace = if namespace.is_empty() {
                "default"
            } else {
                namespace
            };
            names::dns1123_label("K8S_POD_NAMESPACE", namespace).map_err(ServiceError::BadArgs)?;
            names::dns1123_subdomain("K8S_POD_NAME", name).map_err(ServiceError::BadArgs)?;
            (namespace.to_string(), name.to_string())
        };
        Ok(PodRef {
            namespace,
            name,
            container_id: container_id.to_string(),
            nic: nic.to_string(),
            bare,
        })
    }

    pub(super) fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Where an earlier version kept this bare container's record (`default/<container ID>`),
    /// so that its addresses can still be released and checked.
    pub(super) fn legacy_key(&self) -> Option<String> {
        self.bare.then(|| format!("default/{}", self.container_id))
    }
}
