//! Every key Spiderpool writes or reads on objects, in one place: the pod, namespace and
//! pod-template annotations users set, the labels and annotations the system puts on pools,
//! subnets and reserved IPs, the pod-affinity keys of auto pools, Multus's annotations and the
//! finalizer. The names and values are upstream's (`../spec/spiderpool-reference.md` §3, §5).

/// The finalizer on pools, subnets and endpoints: removed once nothing is in use.
pub const FINALIZER: &str = "spiderpool.spidernet.io";

// Pod annotations.

/// Pod annotation: one pool group for the NIC being added.
pub const IPPOOL: &str = "ipam.spidernet.io/ippool";
/// Pod annotation: pool groups per NIC.
pub const IPPOOLS: &str = "ipam.spidernet.io/ippools";
/// Pod annotation: one subnet group (auto pools).
pub const SUBNET: &str = "ipam.spidernet.io/subnet";
/// Pod annotation: subnet groups per NIC (auto pools).
pub const SUBNETS: &str = "ipam.spidernet.io/subnets";
/// Pod annotation: extra routes, each for the NIC whose subnet holds its gateway.
pub const ROUTES: &str = "ipam.spidernet.io/routes";
/// Pod annotation: the one NIC that gets the default route (also the coordinator's
/// `podDefaultRouteNIC` for that pod).
pub const DEFAULT_ROUTE_NIC: &str = "ipam.spidernet.io/default-route-nic";
/// Pod-template annotation: how many addresses the auto pool holds, `"+N"` (replicas + N) or
/// `"N"` (exactly N).
pub const IPPOOL_IP_NUMBER: &str = "ipam.spidernet.io/ippool-ip-number";
/// Pod-template annotation: whether the auto pool goes with its application (default `true`).
pub const IPPOOL_RECLAIM: &str = "ipam.spidernet.io/ippool-reclaim";

// Namespace annotations.

/// Namespace annotation: default IPv4 pools.
pub const NS_DEFAULT_IPV4: &str = "ipam.spidernet.io/default-ipv4-ippool";
/// Namespace annotation: default IPv6 pools.
pub const NS_DEFAULT_IPV6: &str = "ipam.spidernet.io/default-ipv6-ippool";

// Multus.

/// Multus: the network of the first NIC.
pub const MULTUS_DEFAULT_NETWORK: &str = "v1.multus-cni.io/default-network";
/// Multus: the networks of the extra NICs.
pub const MULTUS_NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";

// Labels on pools and subnets.

/// Label: a pool's subnet, as a label value (`10-6-0-0-16`).
pub const LABEL_POOL_CIDR: &str = "ipam.spidernet.io/ippool-cidr";
/// Label: a subnet's CIDR, as a label value.
pub const LABEL_SUBNET_CIDR: &str = "ipam.spidernet.io/subnet-cidr";
/// Label: the SpiderSubnet that owns a pool.
pub const LABEL_OWNER_SUBNET: &str = "ipam.spidernet.io/owner-spider-subnet";
/// Label: the application's API group and version, `apps_v1` (`v1` for the core group).
pub const LABEL_APP_GV: &str = "ipam.spidernet.io/owner-application-gv";
/// Label: the application's kind.
pub const LABEL_APP_KIND: &str = "ipam.spidernet.io/owner-application-kind";
/// Label: the application's namespace.
pub const LABEL_APP_NAMESPACE: &str = "ipam.spidernet.io/owner-application-namespace";
/// Label: the application's name (cut to a label value's 63 characters; the pod affinity
/// holds it whole).
pub const LABEL_APP_NAME: &str = "ipam.spidernet.io/owner-application-name";
/// Label: the UID of the application the pool serves now.
pub const LABEL_APP_UID: &str = "ipam.spidernet.io/owner-application-uid";
/// Label: the pod interface the pool serves.
pub const LABEL_INTERFACE: &str = "ipam.spidernet.io/interface";
/// Label: `IPv4` or `IPv6`.
pub const LABEL_IP_VERSION: &str = "ipam.spidernet.io/ip-version";
/// Label: `true` when the pool goes with its application.
pub const LABEL_RECLAIM: &str = "ipam.spidernet.io/ippool-reclaim";

// Pod-affinity keys of auto pools: matched against the pod's top controller, never against
// the pod's own labels.

/// Pod-affinity key: the application's API group (empty for the core group).
pub const APP_API_GROUP: &str = "ipam.spidernet.io/app-api-group";
/// Pod-affinity key: the application's API version.
pub const APP_API_VERSION: &str = "ipam.spidernet.io/app-api-version";
/// Pod-affinity key: the application's kind.
pub const APP_KIND: &str = "ipam.spidernet.io/app-kind";
/// Pod-affinity key: the application's namespace.
pub const APP_NAMESPACE: &str = "ipam.spidernet.io/app-namespace";
/// Pod-affinity key: the application's name.
pub const APP_NAME: &str = "ipam.spidernet.io/app-name";
/// The prefix every pod-affinity key of an application shares.
pub const APP_PREFIX: &str = "ipam.spidernet.io/app-";

// SpiderReservedIPs that hold back an address found in conflict.

/// The name prefix of the SpiderReservedIPs that hold back addresses found in conflict (the
/// only ones an agent may create, change or delete).
pub const CONFLICT_PREFIX: &str = "ip-conflict-";
/// Label of the SpiderReservedIPs that hold back addresses found in conflict.
pub const LABEL_IP_CONFLICT: &str = "ipam.spidernet.io/ip-conflict";
/// Annotation: the MAC address that answered for the address.
pub const CONFLICT_MAC: &str = "ipam.spidernet.io/ip-conflict-mac";
/// Annotation: the pod whose probe found the conflict (`namespace/name`).
pub const CONFLICT_POD: &str = "ipam.spidernet.io/ip-conflict-pod";
/// Annotation: RFC 3339, when the address is tried again.
pub const CONFLICT_UNTIL: &str = "ipam.spidernet.io/ip-conflict-until";

/// KubeVirt's VirtualMachineInstance kind: upstream keys a VM's addresses by its name (the
/// store reads one as workload `namespace/VirtualMachineInstance/name`).
pub const VMI_KIND: &str = "VirtualMachineInstance";
/// KubeVirt's VirtualMachine kind: while it lives (not being deleted) a restarting VM keeps its
/// addresses though its VMI is gone for a moment.
pub const VM_KIND: &str = "VirtualMachine";
