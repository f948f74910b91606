//! Who a request is for: the pod key and the container and NIC inside it.

use spiderpool_api::agent::{IpamAddArgs, IpamDelArgs};
use spiderpool_api::ValidationError;

use super::*;

/// Who a request is for.
pub(super) struct PodRef {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) container_id: String,
    pub(super) nic: String,
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
        if container_id.is_empty() {
            return Err(ValidationError::field("containerID", "", "is required").into());
        }
        if nic.is_empty() {
            return Err(ValidationError::field("ifName", "", "is required").into());
        }
        // A runtime that passes no K8S_POD_* args gets one endpoint per container.
        let (namespace, name) = match (namespace, name) {
            (_, "") => ("default".to_string(), container_id.to_string()),
            ("", n) => ("default".to_string(), n.to_string()),
            (ns, n) => (ns.to_string(), n.to_string()),
        };
        Ok(PodRef {
            namespace,
            name,
            container_id: container_id.to_string(),
            nic: nic.to_string(),
        })
    }

    pub(super) fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
