//! CHECK: the container's reservation for a NIC, as the record and the pools' holders say.

use spiderpool_api::agent::{IpamAddResponse, IpamDelArgs};

use super::*;

impl IpamService {
    /// CNI CHECK: the container's reservation for the NIC.
    pub async fn check(&self, args: &IpamDelArgs) -> Result<IpamAddResponse> {
        let pod = PodRef::of_del(args)?;
        let Some((key, _, _, nic)) = record_of(self.store.as_ref(), &pod).await? else {
            return Err(ServiceError::NoReservation {
                container_id: pod.container_id.clone(),
                nic: pod.nic.clone(),
                pod: pod.key(),
            });
        };
        // The record must still be backed by the pools' holders.
        for (pool, ip) in nic.held() {
            let allocs = self.store.allocations(&pool).await?;
            let ok = allocs.iter().any(|a| {
                a.ip == ip && a.holder.container_id == pod.container_id && a.holder.nic == pod.nic
            });
            if !ok {
                return Err(ServiceError::NotHeld {
                    container_id: pod.container_id.clone(),
                    nic: pod.nic.clone(),
                    pod: key,
                    ip,
                    pool,
                });
            }
        }
        Ok(response_of(&nic))
    }
}
