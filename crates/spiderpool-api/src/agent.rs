//! The agent's HTTP/JSON API on its unix socket (base path `/v1`), modelled on upstream's
//! OpenAPI: `GET /ipam/healthy`, `POST /ipam/ip`, `DELETE /ipam/ip`, plus `POST /ipam/check`.
//! Errors carry the CNI code the plugin should report.

use serde::{Deserialize, Serialize};

/// `GET` path of the health check.
pub const PATH_HEALTHY: &str = "/v1/ipam/healthy";
/// `POST` allocates, `DELETE` releases.
pub const PATH_IP: &str = "/v1/ipam/ip";
/// `POST` verifies a container's reservation (CNI CHECK).
pub const PATH_CHECK: &str = "/v1/ipam/check";
/// `POST` releases every reservation of a network not in a list (CNI GC).
pub const PATH_GC: &str = "/v1/ipam/gc";
/// `POST` answers whether ADD can be served (CNI STATUS).
pub const PATH_STATUS: &str = "/v1/ipam/status";
/// `DELETE`: upstream's batch release after an IP conflict ([`IpamBatchDelArgs`] in,
/// [`IpamBatchDelResponse`] out): the addresses found in conflict are held back from allocation
/// for a while, and with `isReleaseConflictIPs` the container's addresses on the interface are
/// released (a StatefulSet member keeps them).
pub const PATH_IPS: &str = "/v1/ipam/ips";
/// `POST`: the chained `coordinator` plugin's settings for a pod ([`CoordinatorConfigArgs`] in,
/// [`CoordinatorConfig`] out).
pub const PATH_COORDINATOR_CONFIG: &str = "/v1/coordinator/config";

/// Body of `POST /v1/ipam/gc`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamGcArgs {
    /// The CNI network's `name`.
    pub network: String,
    /// Attachments still in use.
    pub valid_attachments: Vec<crate::cni::Attachment>,
}

/// Answer of `POST /v1/ipam/gc`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamGcResponse {
    /// `namespace/pod interface address` of each released reservation.
    pub released: Vec<String>,
}

/// Body of `POST /v1/ipam/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamStatusArgs {
    /// CNI-config default IPv4 pools (all pools when both lists are empty).
    #[serde(default, rename = "defaultIPv4IPPool")]
    pub default_ipv4_ippool: Vec<String>,
    /// CNI-config default IPv6 pools.
    #[serde(default, rename = "defaultIPv6IPPool")]
    pub default_ipv6_ippool: Vec<String>,
}

/// Body of `POST /v1/ipam/ip`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamAddArgs {
    /// `CNI_CONTAINERID`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub if_name: String,
    /// `CNI_NETNS`.
    #[serde(default)]
    pub net_namespace: String,
    /// `K8S_POD_NAMESPACE`.
    #[serde(default)]
    pub pod_namespace: String,
    /// `K8S_POD_NAME`.
    #[serde(default)]
    pub pod_name: String,
    /// `K8S_POD_UID`.
    #[serde(default, rename = "podUID")]
    pub pod_uid: String,
    /// CNI-config default IPv4 pools.
    #[serde(default, rename = "defaultIPv4IPPool")]
    pub default_ipv4_ippool: Vec<String>,
    /// CNI-config default IPv6 pools.
    #[serde(default, rename = "defaultIPv6IPPool")]
    pub default_ipv6_ippool: Vec<String>,
    /// CNI-config `clean_gateway`.
    #[serde(default)]
    pub clean_gateway: bool,
    /// The CNI network's `name` (recorded so that CNI GC can be scoped to it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
}

/// One address handed out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpConfig {
    /// 4 or 6.
    pub version: u8,
    /// Address with the pool's prefix length.
    pub address: String,
    /// Interface it belongs to.
    pub nic: String,
    /// Pool it came from.
    #[serde(default, rename = "ipPool")]
    pub ip_pool: String,
    /// The pool's gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The pool's VLAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<i64>,
}

/// One route for an interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Interface.
    pub if_name: String,
    /// Destination CIDR.
    pub dst: String,
    /// Next hop.
    pub gw: String,
}

/// Answer of `POST /v1/ipam/ip` and `POST /v1/ipam/check`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamAddResponse {
    /// Addresses.
    pub ips: Vec<IpConfig>,
    /// Routes.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The IPAM plugin probes the segment for the addresses before the pod uses them (the
    /// agent's `--enable-ip-conflict-detection`, upstream's `enableIPConflictDetection`).
    #[serde(
        default,
        rename = "detectIPConflict",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub detect_ip_conflict: bool,
    /// The IPAM plugin checks that the gateways answer (`--enable-gateway-detection`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detect_gateway: bool,
}

/// Body of `DELETE /v1/ipam/ip` and `POST /v1/ipam/check`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamDelArgs {
    /// `CNI_CONTAINERID`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub if_name: String,
    /// `CNI_NETNS`.
    #[serde(default)]
    pub net_namespace: String,
    /// `K8S_POD_NAMESPACE`.
    #[serde(default)]
    pub pod_namespace: String,
    /// `K8S_POD_NAME`.
    #[serde(default)]
    pub pod_name: String,
    /// `K8S_POD_UID`.
    #[serde(default, rename = "podUID")]
    pub pod_uid: String,
}

/// Body of `DELETE /v1/ipam/ips`: upstream's `IpamBatchDelArgs`, with the interface and the
/// conflicts found (this project's additions).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamBatchDelArgs {
    /// `CNI_CONTAINERID`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME`: the interface whose addresses were found in conflict.
    #[serde(default)]
    pub if_name: String,
    /// `CNI_NETNS`.
    #[serde(default)]
    pub net_namespace: String,
    /// `K8S_POD_NAMESPACE`.
    #[serde(default)]
    pub pod_namespace: String,
    /// `K8S_POD_NAME`.
    #[serde(default)]
    pub pod_name: String,
    /// `K8S_POD_UID`.
    #[serde(default, rename = "podUID")]
    pub pod_uid: String,
    /// Release the container's addresses on the interface (upstream's flag).
    #[serde(default, rename = "isReleaseConflictIPs")]
    pub is_release_conflict_ips: bool,
    /// The container's addresses another host answered for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<IpConflict>,
}

/// An address of the container that another host of the segment answered for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConflict {
    /// The address.
    pub ip: std::net::IpAddr,
    /// The MAC address that answered.
    pub mac: String,
}

/// Answer of `DELETE /v1/ipam/ips`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamBatchDelResponse {
    /// Each address held back, the SpiderReservedIP that holds it and until when.
    pub held_back: Vec<HeldBack>,
    /// Whether the container's addresses were released (false: a StatefulSet member keeps
    /// them, or nothing was asked).
    pub released: bool,
}

/// An address held back from allocation after a conflict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldBack {
    /// The address.
    pub ip: std::net::IpAddr,
    /// The SpiderReservedIP holding it.
    pub reservation: String,
    /// RFC 3339: when it is tried again.
    pub until: String,
}

/// Error body of every endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The CNI error code the plugin reports.
    pub code: u32,
    /// What went wrong, naming the bad value.
    pub message: String,
}

/// Body of `POST /v1/coordinator/config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CoordinatorConfigArgs {
    /// `K8S_POD_NAMESPACE`.
    #[serde(default)]
    pub pod_namespace: String,
    /// `K8S_POD_NAME` (empty: a container without a pod; no annotation applies).
    #[serde(default)]
    pub pod_name: String,
}

/// The coordinator plugin's settings for one pod: the SpiderCoordinator's spec with its defaults,
/// the CIDRs of its status, and the pod's `ipam.spidernet.io/default-route-nic`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CoordinatorConfig {
    /// `auto`, `underlay`, `overlay` or `disabled`.
    pub mode: String,
    /// The cluster's overlay pod CIDRs.
    #[serde(rename = "overlayPodCIDR")]
    pub overlay_pod_cidr: Vec<String>,
    /// The cluster's Service CIDRs.
    #[serde(rename = "serviceCIDR")]
    pub service_cidr: Vec<String>,
    /// Further CIDRs reached through the node.
    #[serde(rename = "hijackCIDR")]
    pub hijack_cidr: Vec<String>,
    /// Routes added in the pod.
    pub policy_routes: Vec<crate::coordinator::PolicyRoute>,
    /// The first two bytes of the pod's MAC address (empty: unchanged).
    #[serde(rename = "podMACPrefix")]
    pub pod_mac_prefix: String,
    /// Whether routes are tuned across the pod's NICs.
    pub tune_pod_routes: bool,
    /// The NIC of the pod's default route (empty: the first).
    #[serde(rename = "podDefaultRouteNIC")]
    pub pod_default_route_nic: String,
    /// The node's policy-routing table for pod traffic.
    pub host_rule_table: i64,
    /// The node's `rp_filter` (negative: left alone).
    #[serde(rename = "hostRPFilter")]
    pub host_rp_filter: i64,
    /// The pod's `rp_filter` (negative: left alone).
    #[serde(rename = "podRPFilter")]
    pub pod_rp_filter: i64,
    /// The veth's transmit queue length (0: the kernel's default).
    pub tx_queue_len: i64,
    /// The address of the veth's node end (empty: none).
    pub veth_link_address: String,
    /// The veth's MTU.
    #[serde(rename = "vethMTU")]
    pub veth_mtu: i64,
    /// Whether ADD probes the segment for the address first.
    #[serde(rename = "detectIPConflict")]
    pub detect_ip_conflict: bool,
    /// Whether ADD checks that the gateway answers.
    pub detect_gateway: bool,
}
