//! GC (CNI 1.1): releases the reservations of a network on this node that the runtime no
//! longer lists as valid attachments.

use std::collections::HashSet;
use std::net::IpAddr;

use spiderpool_api::cni::Attachment;
use spiderpool_api::crd::EndpointInterface;
use spiderpool_store::{typed, Kind, Op, StoreError};

use super::*;

impl IpamService {
    /// CNI GC: releases every reservation of `network` on this node whose (container,
    /// interface) is not in `valid`, except a StatefulSet member's. Keeps going after errors
    /// and reports them all.
    pub async fn gc(&self, network: &str, valid: &[Attachment]) -> Result<Vec<String>> {
        let mut cache = self.state.lock().await;
        let store = self.store.as_ref();
        let valid: HashSet<(&str, &str)> = valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        let mut released = Vec::new();
        let mut errors = Vec::new();
        for (o, rev) in typed::list(store, Kind::Endpoint).await? {
            let Some(ep) = endpoint_of(o) else { continue };
            if ep.status.current.node != self.node.name {
                continue;
            }
            let ns = ep.metadata.namespace.clone().unwrap_or_default();
            let key = format!("{ns}/{}", ep.metadata.name);
            let (stale, kept): (Vec<EndpointInterface>, Vec<EndpointInterface>) =
                ep.status.current.ips.iter().cloned().partition(|n| {
                    // A NIC whose record names no container (upstream's, or pruned by an old
                    // CRD schema) cannot be matched to an attachment: the controller's
                    // reclaim judges it by its pod instead.
                    !n.container_id.is_empty()
                        && n.network.as_deref().is_none_or(|net| net == network)
                        && !valid.contains(&(n.container_id.as_str(), n.interface.as_str()))
                });
            if stale.is_empty() {
                continue;
            }
            match self
                .stateful_member(
                    &ns,
                    &ep.metadata.name,
                    &ep.status.owner_controller_type,
                    &ep.status.owner_controller_name,
                )
                .await
            {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    errors.push(format!("{key}: {e}"));
                    continue;
                }
            }
            let mut ops: Vec<Op> = stale
                .iter()
                .flat_map(|n| Op::releases_of(n, &ep.status.current.uid))
                .collect();
            let mut rest = ep.clone();
            rest.status.current.ips = kept;
            ops.push(endpoint_write(key.clone(), &rest, Some(rev)));
            let freed: Vec<(String, IpAddr)> =
                stale.iter().flat_map(EndpointInterface::held).collect();
            match self.commit(ops).await {
                Ok(r) => {
                    cache.committed(r, &[], &freed);
                    for n in &stale {
                        for (pool, ip) in n.held() {
                            released.push(format!("{key} {} {ip} ({pool})", n.interface));
                        }
                    }
                }
                Err(e) => {
                    cache.invalidate();
                    errors.push(format!("{key}: {e}"));
                }
            }
        }
        tracing::info!(network, released = ?released, errors = ?errors, "garbage collected");
        if errors.is_empty() {
            Ok(released)
        } else {
            Err(StoreError::Unavailable(format!(
                "GC released {} reservations but failed for: {}",
                released.len(),
                errors.join("; ")
            ))
            .into())
        }
    }
}
