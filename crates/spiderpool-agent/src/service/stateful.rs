//! Pods that keep their addresses across sandboxes and re-creations: a StatefulSet's members
//! (ordinals from `spec.ordinals.start`), and a KubeVirt VM's launcher pods while the VM lives.

use spiderpool_control::apply;

use super::*;

impl IpamService {
    /// Whether the pod belongs to a StatefulSet that still wants it, or is (keyed as) a KubeVirt
    /// VM that lives: such a pod keeps its addresses across sandboxes and re-creations.
    pub(super) async fn stateful_member(
        &self,
        namespace: &str,
        pod: &str,
        owner_kind: &str,
        owner_name: &str,
    ) -> Result<bool> {
        if owner_kind == spiderpool_api::keys::VMI_KIND && !self.kubevirt_static_ip {
            return Ok(false);
        }
        Ok(
            apply::keeps_addresses(self.store.as_ref(), namespace, pod, owner_kind, owner_name)
                .await?,
        )
    }

    /// [`IpamService::stateful_member`] for the pod `pod` of the endpoint record `ep`.
    pub(super) async fn keeps_addresses(
        &self,
        pod: &PodRef,
        ep: &spiderpool_api::SpiderEndpoint,
    ) -> Result<bool> {
        self.stateful_member(
            &pod.namespace,
            &pod.name,
            &ep.status.owner_controller_type,
            &ep.status.owner_controller_name,
        )
        .await
    }
}
