//! The chained `coordinator` plugin's settings for a pod: the SpiderCoordinator (the one named
//! `default`, else the first by name) with upstream's defaults, the CIDRs its status records,
//! and the pod's `ipam.spidernet.io/default-route-nic` over `podDefaultRouteNIC`. In a cluster
//! the controller writes the status, and a coordinator that is not `Synced` is refused with
//! its reason; elsewhere (no controller) the spec is served as applied.

use spiderpool_api::agent::CoordinatorConfig;
use spiderpool_api::coordinator::DEFAULT_NAME;
use spiderpool_api::SpiderCoordinator;

use super::*;

impl IpamService {
    /// Upstream's detection switches: with `ip_conflict` (`gateway`) every coordinator probes
    /// for address conflicts (its gateways), whatever the SpiderCoordinator says.
    pub fn with_detection(mut self, ip_conflict: bool, gateway: bool) -> Self {
        self.detection = (ip_conflict, gateway);
        self
    }

    /// Upstream's switches (IP conflict, gateway): the `spiderpool` IPAM plugin probes when
    /// they are on, whatever plugin follows it.
    pub fn detection(&self) -> (bool, bool) {
        self.detection
    }

    /// The settings for the pod `namespace/name` (an empty name: a container without a pod).
    pub async fn coordinator_config(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<CoordinatorConfig> {
        let store = self.store.as_ref();
        let mut all: Vec<SpiderCoordinator> = typed::list(store, Kind::Coordinator)
            .await?
            .into_iter()
            .filter_map(|(o, _)| match o {
                Object::Coordinator(c) => Some(c),
                _ => None,
            })
            .collect();
        all.sort_by(|a, b| {
            (a.metadata.name != DEFAULT_NAME, &a.metadata.name)
                .cmp(&(b.metadata.name != DEFAULT_NAME, &b.metadata.name))
        });
        let Some(mut c) = all.into_iter().next() else {
            return Err(ServiceError::NoCoordinator);
        };
        let status = c.status.clone().unwrap_or_default();
        if store.mode().is_cluster() && status.phase != "Synced" {
            let why = status
                .reason
                .as_deref()
                .unwrap_or("the controller has not written its status yet");
            return Err(ServiceError::NotReady(format!(
                "spidercoordinator: {} not ready (phase {:?}): {why}",
                c.metadata.name, status.phase
            )));
        }
        c.default_spec();
        let mut nic = c.spec.pod_default_route_nic.clone().unwrap_or_default();
        if !name.is_empty() {
            let key = format!(
                "{}/{name}",
                if namespace.is_empty() {
                    "default"
                } else {
                    namespace
                }
            );
            match typed::get(store, Kind::Pod, &key).await? {
                Some((Object::Kube(_, pod), _)) => {
                    if let Some(n) = pod
                        .metadata
                        .annotations
                        .get(spiderpool_api::keys::DEFAULT_ROUTE_NIC)
                    {
                        spiderpool_api::names::interface_name(n).map_err(|e| {
                            ServiceError::BadArgs(ValidationError::Invalid(format!(
                                "pod {key}: annotation {}: {e}",
                                spiderpool_api::keys::DEFAULT_ROUTE_NIC
                            )))
                        })?;
                        nic = n.clone();
                    }
                }
                _ => {
                    tracing::debug!(pod = %key, "coordinator config: no Pod object; the coordinator's default-route NIC applies")
                }
            }
        }
        let s = c.spec;
        Ok(CoordinatorConfig {
            mode: s.mode.unwrap_or_default(),
            overlay_pod_cidr: status.overlay_pod_cidr,
            service_cidr: status.service_cidr,
            hijack_cidr: s.hijack_cidr,
            policy_routes: s.policy_routes,
            pod_mac_prefix: s.pod_mac_prefix.unwrap_or_default(),
            tune_pod_routes: s.tune_pod_routes.unwrap_or(true),
            pod_default_route_nic: nic,
            host_rule_table: s.host_rule_table.unwrap_or_default(),
            host_rp_filter: s.host_rp_filter.unwrap_or_default(),
            pod_rp_filter: s.pod_rp_filter.unwrap_or_default(),
            tx_queue_len: s.tx_queue_len.unwrap_or_default(),
            veth_link_address: s.veth_link_address.unwrap_or_default(),
            veth_mtu: s.veth_mtu.unwrap_or_default(),
            // The agent's switches are the IPAM plugin's (it probes before the coordinator
            // runs); the coordinator probes again only when its own settings say so.
            detect_ip_conflict: s.detect_ip_conflict.unwrap_or_default(),
            detect_gateway: s.detect_gateway.unwrap_or_default(),
        })
    }
}
