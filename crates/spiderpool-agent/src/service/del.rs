//! DEL: releases what a container holds on a NIC and drops it from the endpoint record.

use spiderpool_api::agent::IpamDelArgs;
use spiderpool_api::SpiderEndpoint;
use spiderpool_store::StoreError;

use super::*;
use crate::view::ViewCache;

impl IpamService {
    /// CNI DEL: releases what the container holds on the NIC; succeeds when there is nothing.
    pub async fn del(&self, args: &IpamDelArgs) -> Result<()> {
        let pod = PodRef::of_del(args)?;
        let mut cache = self.state.lock().await;
        retrying!(
            "release",
            Some(&self.metrics.release),
            self.try_del(&pod, &mut cache)
        )
    }

    pub(super) async fn try_del(&self, pod: &PodRef, cache: &mut ViewCache) -> Result<()> {
        let Some((key, ep, rev, nic)) = record_of(self.store.as_ref(), pod).await? else {
            tracing::info!(pod = %pod.key(), nic = %pod.nic, container_id = %pod.container_id, "nothing held by this container");
            return Ok(());
        };
        if nic.container_id.is_empty() && self.incarnation_lives(pod, &ep).await? {
            // A record that names no container cannot say whether this DEL is for the sandbox
            // that holds the addresses: while the pod incarnation lives they stay (a new
            // sandbox's ADD hands them back and allocates afresh; the pod's deletion releases
            // them).
            tracing::info!(pod = %key, nic = %pod.nic, container_id = %pod.container_id,
                "keeping a record without a container ID while its pod lives");
            return Ok(());
        }
        if self.keeps_addresses(pod, &ep).await? {
            tracing::info!(pod = %key, nic = %pod.nic, statefulset = %ep.status.owner_controller_name,
                "keeping the addresses of a StatefulSet member for its next sandbox");
            return Ok(());
        }
        let mut ops = Op::releases_of(&nic, &ep.status.current.uid);
        let mut kept = ep.clone();
        kept.status.current.ips.retain(|n| n.interface != pod.nic);
        ops.push(endpoint_write(key.clone(), &kept, Some(rev)));
        let revision = self.commit(ops).await?;
        cache.committed(revision, &[], &nic.held());
        tracing::info!(pod = %key, nic = %pod.nic, released = ?nic.held(), "released");
        Ok(())
    }

    /// Whether the pod incarnation `ep` records still lives: its Pod exists with the record's
    /// UID, is not being deleted and has not finished.
    async fn incarnation_lives(&self, pod: &PodRef, ep: &SpiderEndpoint) -> Result<bool> {
        let found = typed::get(self.store.as_ref(), Kind::Pod, &pod.key()).await?;
        let Some(p) = found.and_then(|(o, _)| kube_of(o)) else {
            return Ok(false);
        };
        let phase = p.status.get("phase").and_then(|v| v.as_str()).unwrap_or("");
        Ok(
            p.metadata.uid.as_deref() == Some(ep.status.current.uid.as_str())
                && p.metadata.deletion_timestamp.is_none()
                && !matches!(phase, "Succeeded" | "Failed"),
        )
    }
}
