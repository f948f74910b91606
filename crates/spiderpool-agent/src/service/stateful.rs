//! Pods that keep their addresses across sandboxes and re-creations: a StatefulSet's members
//! (ordinals from `spec.ordinals.start`), and a KubeVirt VM's launcher pods while the VM lives.

use spiderpool_control::apply;

use super::*;

impl IpamService {
    /// A KubeVirt launcher pod (`pod_obj`: its Pod object, controlled by a
    /// VirtualMachineInstance) as its addresses are keyed: under the VMI's name. `None` for any
    /// other pod, or when `--enable-kubevirt-static-ip` is off.
    pub(super) fn vm_pod_of(
        &self,
        pod: &PodRef,
        pod_obj: Option<&spiderpool_api::k8s::KubeObject>,
    ) -> Option<PodRef> {
        let o = pod_obj?.metadata.controller()?;
        (self.kubevirt_static_ip
            && o.kind == spiderpool_api::keys::VMI_KIND
            && o.api_version.starts_with("kubevirt.io/"))
        .then(|| PodRef {
            namespace: pod.namespace.clone(),
            name: o.name.clone(),
            container_id: pod.container_id.clone(),
            nic: pod.nic.clone(),
            bare: false,
        })
    }

    /// [`IpamService::vm_pod_of`] with the Pod object read from the datastore (a DEL that
    /// found no record under the pod's own name).
    pub(super) async fn vm_pod(&self, pod: &PodRef) -> Result<Option<PodRef>> {
        if !self.kubevirt_static_ip || pod.bare {
            return Ok(None);
        }
        let obj = match typed::get(self.store.as_ref(), Kind::Pod, &pod.key()).await? {
            Some((Object::Kube(_, o), _)) => Some(o),
            _ => None,
        };
        Ok(self.vm_pod_of(pod, obj.as_ref()))
    }

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
