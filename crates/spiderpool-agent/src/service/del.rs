//! DEL: releases what a container holds on a NIC and drops it from the endpoint record.

use spiderpool_api::agent::IpamDelArgs;
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
        if self.keeps_addresses(pod, &ep).await? {
            tracing::info!(pod = %key, nic = %pod.nic, statefulset = %ep.status.owner_controller_name,
                "keeping the addresses of a StatefulSet member for its next sandbox");
            return Ok(());
        }
        let mut ops = Op::releases_of(&nic);
        let mut kept = ep.clone();
        kept.status.current.ips.retain(|n| n.interface != pod.nic);
        ops.push(endpoint_write(key.clone(), &kept, Some(rev)));
        let revision = self.commit(ops).await?;
        cache.committed(revision, &[], &nic.held());
        tracing::info!(pod = %key, nic = %pod.nic, released = ?nic.held(), "released");
        Ok(())
    }
}
