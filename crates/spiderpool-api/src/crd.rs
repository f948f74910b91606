//! The `spiderpool.spidernet.io/v2beta1` objects in their Kubernetes form: SpiderIPPool,
//! SpiderSubnet, SpiderReservedIP and SpiderEndpoint, and their conversion into validated core
//! pools with errors that name the field and value.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use spiderpool_core::{IpFamily, IpSet, LabelSelector, Pool, Route};

use crate::meta::ObjectMeta;
use crate::ValidationError;

/// API group and version of the Spider objects.
pub const API_VERSION: &str = "spiderpool.spidernet.io/v2beta1";

/// A route entry of a pool or subnet spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct RouteSpec {
    /// Destination CIDR.
    pub dst: String,
    /// Next hop.
    pub gw: String,
}

/// `SpiderIPPool.spec`. With the `kube` feature it also defines the CRD (`deploy/crds/`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "spiderpool.spidernet.io",
        version = "v2beta1",
        kind = "SpiderIPPool",
        root = "SpiderIPPoolResource",
        plural = "spiderippools",
        shortname = "sp",
        category = "spiderpool",
        status = "IPPoolStatus",
        printcolumn = r#"{"name":"VERSION","type":"string","jsonPath":".spec.ipVersion"}"#,
        printcolumn = r#"{"name":"SUBNET","type":"string","jsonPath":".spec.subnet"}"#,
        printcolumn = r#"{"name":"ALLOCATED-IP-COUNT","type":"integer","jsonPath":".status.allocatedIPCount"}"#,
        printcolumn = r#"{"name":"TOTAL-IP-COUNT","type":"integer","jsonPath":".status.totalIPCount"}"#,
        printcolumn = r#"{"name":"DEFAULT","type":"boolean","jsonPath":".spec.default"}"#,
        printcolumn = r#"{"name":"DISABLE","type":"boolean","jsonPath":".spec.disable"}"#,
        printcolumn = r#"{"name":"NodeName","type":"string","jsonPath":".spec.nodeName","priority":10}"#,
        printcolumn = r#"{"name":"MultusName","type":"string","jsonPath":".spec.multusName","priority":10}"#,
        printcolumn = r#"{"name":"APP-NAMESPACE","type":"string","jsonPath":".spec.podAffinity.matchLabels['ipam\\.spidernet\\.io/app\\-namespace']","priority":10}"#
    )
)]
pub struct IPPoolSpec {
    /// 4 or 6; derived from `subnet` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<i64>,
    /// The pool's subnet, e.g. `10.6.0.0/16`.
    #[serde(default)]
    pub subnet: String,
    /// Addresses and `a-b` ranges.
    #[serde(default, rename = "ips", skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// Addresses never handed out.
    #[serde(default, rename = "excludeIPs", skip_serializing_if = "Vec::is_empty")]
    pub exclude_ips: Vec<String>,
    /// Default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Extra routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    /// VLAN id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<i64>,
    /// Pods whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "kube",
        schemars(with = "Option<crate::schema::LabelSelectorSchema>")
    )]
    pub pod_affinity: Option<LabelSelector>,
    /// Namespaces whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "kube",
        schemars(with = "Option<crate::schema::LabelSelectorSchema>")
    )]
    pub namespace_affinity: Option<LabelSelector>,
    /// Namespaces by name (replaces `namespaceAffinity`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace_name: Vec<String>,
    /// Nodes whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "kube",
        schemars(with = "Option<crate::schema::LabelSelectorSchema>")
    )]
    pub node_affinity: Option<LabelSelector>,
    /// Nodes by name (replaces `nodeAffinity`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_name: Vec<String>,
    /// Multus networks (`namespace/name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub multus_name: Vec<String>,
    /// A cluster default pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(extend("default" = false)))]
    pub default: Option<bool>,
    /// Hands out nothing while true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(extend("default" = false)))]
    pub disable: Option<bool>,
}

/// `SpiderIPPool.status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct IPPoolStatus {
    /// Upstream's form: a JSON object, as a string, mapping address to holder.
    #[serde(
        default,
        rename = "allocatedIPs",
        skip_serializing_if = "Option::is_none"
    )]
    pub allocated_ips: Option<String>,
    /// |ips − excludeIPs|.
    #[serde(
        default,
        rename = "totalIPCount",
        skip_serializing_if = "Option::is_none"
    )]
    pub total_ip_count: Option<u64>,
    /// Addresses in use.
    #[serde(
        default,
        rename = "allocatedIPCount",
        skip_serializing_if = "Option::is_none"
    )]
    pub allocated_ip_count: Option<u64>,
}

/// One holder of an address in `status.allocatedIPs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolIPAllocation {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// Pod UID.
    pub pod_uid: String,
    /// Interface inside the pod.
    pub interface: String,
}

/// A SpiderIPPool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpiderIPPool {
    /// Always [`API_VERSION`].
    #[serde(default)]
    pub api_version: String,
    /// Always `SpiderIPPool`.
    #[serde(default)]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: IPPoolSpec,
    /// Status (written by the system only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<IPPoolStatus>,
}

/// `SpiderSubnet.spec`. With the `kube` feature it also defines the CRD (`deploy/crds/`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "spiderpool.spidernet.io",
        version = "v2beta1",
        kind = "SpiderSubnet",
        root = "SpiderSubnetResource",
        plural = "spidersubnets",
        shortname = "ss",
        category = "spiderpool",
        status = "SubnetStatus",
        printcolumn = r#"{"name":"VERSION","type":"string","jsonPath":".spec.ipVersion"}"#,
        printcolumn = r#"{"name":"SUBNET","type":"string","jsonPath":".spec.subnet"}"#,
        printcolumn = r#"{"name":"ALLOCATED-IP-COUNT","type":"integer","jsonPath":".status.allocatedIPCount"}"#,
        printcolumn = r#"{"name":"TOTAL-IP-COUNT","type":"integer","jsonPath":".status.totalIPCount"}"#
    )
)]
pub struct SubnetSpec {
    /// 4 or 6; derived from `subnet` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<i64>,
    /// The subnet, e.g. `10.6.0.0/16`.
    #[serde(default)]
    pub subnet: String,
    /// Addresses and `a-b` ranges.
    #[serde(default, rename = "ips", skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// Addresses never handed out.
    #[serde(default, rename = "excludeIPs", skip_serializing_if = "Vec::is_empty")]
    pub exclude_ips: Vec<String>,
    /// Default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Extra routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    /// VLAN id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<i64>,
}

/// `SpiderSubnet.status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct SubnetStatus {
    /// Upstream's form: JSON (as a string) of pool name to the addresses it holds.
    #[serde(
        default,
        rename = "controlledIPPools",
        skip_serializing_if = "Option::is_none"
    )]
    pub controlled_ip_pools: Option<String>,
    /// |ips − excludeIPs|.
    #[serde(
        default,
        rename = "totalIPCount",
        skip_serializing_if = "Option::is_none"
    )]
    pub total_ip_count: Option<u64>,
    /// Addresses given to pools.
    #[serde(
        default,
        rename = "allocatedIPCount",
        skip_serializing_if = "Option::is_none"
    )]
    pub allocated_ip_count: Option<u64>,
}

/// A SpiderSubnet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpiderSubnet {
    /// Always [`API_VERSION`].
    #[serde(default)]
    pub api_version: String,
    /// Always `SpiderSubnet`.
    #[serde(default)]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: SubnetSpec,
    /// Status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SubnetStatus>,
}

/// `SpiderReservedIP.spec`. With the `kube` feature it also defines the CRD (`deploy/crds/`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "spiderpool.spidernet.io",
        version = "v2beta1",
        kind = "SpiderReservedIP",
        root = "SpiderReservedIPResource",
        plural = "spiderreservedips",
        shortname = "sr",
        category = "spiderpool",
        printcolumn = r#"{"name":"VERSION","type":"string","jsonPath":".spec.ipVersion"}"#
    )
)]
pub struct ReservedIPSpec {
    /// 4 or 6; derived from `ips[0]` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<i64>,
    /// Addresses and `a-b` ranges never handed out by any pool.
    #[serde(default, rename = "ips")]
    pub ips: Vec<String>,
}

/// A SpiderReservedIP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpiderReservedIP {
    /// Always [`API_VERSION`].
    #[serde(default)]
    pub api_version: String,
    /// Always `SpiderReservedIP`.
    #[serde(default)]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: ReservedIPSpec,
}

/// One NIC of a SpiderEndpoint (upstream's `IPAllocationDetail`): what it holds and where
/// from. `containerID` and `network` are this project's additions (upstream ignores them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct EndpointInterface {
    /// Interface name inside the pod.
    pub interface: String,
    /// Container (sandbox) the NIC belongs to (empty in records upstream wrote).
    #[serde(
        default,
        rename = "containerID",
        skip_serializing_if = "String::is_empty"
    )]
    pub container_id: String,
    /// CNI network (the config's `name`) that attached the NIC; CNI GC is per network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// IPv4 address with prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    /// IPv6 address with prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    /// Pool of `ipv4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_pool: Option<String>,
    /// Pool of `ipv6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_pool: Option<String>,
    /// Gateway of `ipv4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_gateway: Option<String>,
    /// Gateway of `ipv6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_gateway: Option<String>,
    /// VLAN of the pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<i64>,
    /// Whether the pod's default route was left out (set when a gateway is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_gateway: Option<bool>,
    /// Routes given to the NIC (default route included unless clean gateway).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
}

impl EndpointInterface {
    /// The addresses this NIC record holds, each with its pool.
    pub fn held(&self) -> Vec<(String, IpAddr)> {
        [(&self.ipv4_pool, &self.ipv4), (&self.ipv6_pool, &self.ipv6)]
            .into_iter()
            .filter_map(|(pool, addr)| {
                let ip = addr.as_deref()?.split('/').next()?.parse().ok()?;
                Some((pool.clone()?, ip))
            })
            .collect()
    }
}

/// `SpiderEndpoint.status`, in upstream's shape: `current{uid,node,ips[]}` and the pod's top
/// owner.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct EndpointStatus {
    /// What the pod holds now.
    #[serde(default)]
    pub current: EndpointAllocation,
    /// Owner kind (`StatefulSet`, `DaemonSet`, … or `Pod`).
    #[serde(default)]
    pub owner_controller_type: String,
    /// Owner name.
    #[serde(default)]
    pub owner_controller_name: String,
}

/// `SpiderEndpoint.status.current`: the holder and its NICs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct EndpointAllocation {
    /// Pod UID of the holder.
    #[serde(default)]
    pub uid: String,
    /// Node of the pod.
    #[serde(default)]
    pub node: String,
    /// The NICs and their addresses.
    #[serde(default)]
    pub ips: Vec<EndpointInterface>,
}

/// Rewrites a SpiderEndpoint stored by an earlier version of this project
/// (`status{uid,node,current:[NIC…]}`) into upstream's shape (`status.current{uid,node,ips}`);
/// anything else is left as it is.
pub fn upgrade_legacy_endpoint(v: &mut serde_json::Value) {
    let Some(status) = v.get_mut("status").and_then(|s| s.as_object_mut()) else {
        return;
    };
    if !status.get("current").is_some_and(|c| c.is_array()) {
        return;
    }
    let ips = status.remove("current").unwrap_or_default();
    let uid = status.remove("uid").unwrap_or_default();
    let node = status.remove("node").unwrap_or_default();
    status.insert(
        "current".into(),
        serde_json::json!({"uid": uid, "node": node, "ips": ips}),
    );
}

/// A SpiderEndpoint: which addresses a pod holds, per NIC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpiderEndpoint {
    /// Always [`API_VERSION`].
    #[serde(default)]
    pub api_version: String,
    /// Always `SpiderEndpoint`.
    #[serde(default)]
    pub kind: String,
    /// Metadata (namespace and name of the pod).
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Status.
    #[serde(default)]
    pub status: EndpointStatus,
}

impl SpiderEndpoint {
    /// The addresses the record holds on every NIC, each with its pool.
    pub fn held(&self) -> Vec<(String, IpAddr)> {
        self.status
            .current
            .ips
            .iter()
            .flat_map(EndpointInterface::held)
            .collect()
    }
}

fn parse_family(field: &str, v: Option<i64>) -> Result<Option<IpFamily>, ValidationError> {
    v.map(|n| {
        IpFamily::from_number(n)
            .ok_or_else(|| ValidationError::field(field, n.to_string(), "must be 4 or 6"))
    })
    .transpose()
}

fn parse_subnet(field: &str, s: &str) -> Result<ipnet::IpNet, ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::field(
            field,
            s,
            "is required, e.g. 10.6.0.0/16",
        ));
    }
    s.parse()
        .map_err(|_| ValidationError::field(field, s, "is not a CIDR like 10.6.0.0/16"))
}

fn parse_ip(field: &str, s: &str) -> Result<IpAddr, ValidationError> {
    s.trim()
        .parse()
        .map_err(|_| ValidationError::field(field, s, "is not an IP address"))
}

fn parse_list(field: &str, v: &[String], family: IpFamily) -> Result<IpSet, ValidationError> {
    IpSet::parse_list(v, Some(family))
        .map_err(|e| ValidationError::Invalid(format!("{field}: {e}")))
}

fn parse_routes(routes: &[RouteSpec]) -> Result<Vec<Route>, ValidationError> {
    routes
        .iter()
        .map(|r| {
            Ok(Route {
                dst: r.dst.parse().map_err(|_| {
                    ValidationError::field("spec.routes[].dst", &r.dst, "is not a CIDR")
                })?,
                gw: parse_ip("spec.routes[].gw", &r.gw)?,
            })
        })
        .collect()
}

impl SpiderIPPool {
    /// The validated core pool, or the first rule it breaks, naming field and value.
    pub fn to_pool(&self) -> Result<Pool, ValidationError> {
        self.to_pool_as("SpiderIPPool", "pool")
    }

    /// [`SpiderIPPool::to_pool`] for a spec that belongs to another kind of object (a
    /// SpiderSubnet's), so errors name that object.
    fn to_pool_as(&self, kind: &str, object: &'static str) -> Result<Pool, ValidationError> {
        let name = &self.metadata.name;
        let ctx = |e: ValidationError| e.in_object(kind, name);
        let declared = parse_family("spec.ipVersion", self.spec.ip_version).map_err(ctx)?;
        let subnet = parse_subnet("spec.subnet", &self.spec.subnet).map_err(ctx)?;
        let mut pool = Pool::new(name.clone(), subnet);
        if let Some(d) = declared {
            if d != pool.family {
                return Err(ctx(ValidationError::field(
                    "spec.ipVersion",
                    d.number().to_string(),
                    &format!("does not match spec.subnet {subnet}"),
                )));
            }
        }
        pool.ips = parse_list("spec.ips", &self.spec.ips, pool.family).map_err(ctx)?;
        pool.exclude =
            parse_list("spec.excludeIPs", &self.spec.exclude_ips, pool.family).map_err(ctx)?;
        pool.gateway = self
            .spec
            .gateway
            .as_deref()
            .filter(|g| !g.is_empty())
            .map(|g| parse_ip("spec.gateway", g))
            .transpose()
            .map_err(ctx)?;
        pool.routes = parse_routes(&self.spec.routes).map_err(ctx)?;
        pool.vlan = self.spec.vlan;
        pool.default = self.spec.default.unwrap_or(false);
        pool.disable = self.spec.disable.unwrap_or(false);
        pool.terminating = self.metadata.deletion_timestamp.is_some();
        pool.node_name = self.spec.node_name.clone();
        pool.node_affinity = self.spec.node_affinity.clone();
        pool.namespace_name = self.spec.namespace_name.clone();
        pool.namespace_affinity = self.spec.namespace_affinity.clone();
        pool.pod_affinity = self.spec.pod_affinity.clone();
        pool.multus_name = self.spec.multus_name.clone();
        for (field, sel) in [
            ("spec.nodeAffinity", &pool.node_affinity),
            ("spec.namespaceAffinity", &pool.namespace_affinity),
            ("spec.podAffinity", &pool.pod_affinity),
        ] {
            if let Some(s) = sel {
                s.validate()
                    .map_err(|e| ctx(ValidationError::Invalid(format!("{field}: {e}"))))?;
            }
        }
        pool.validate_as(object, declared)
            .map_err(|e| ValidationError::Invalid(e.to_string()))?;
        Ok(pool)
    }
}

impl SpiderSubnet {
    /// The subnet's parsed spec as a pool (same rules: canonical subnet, ips inside it, gateway
    /// outside its ips, valid routes).
    pub fn to_pool(&self) -> Result<Pool, ValidationError> {
        let as_pool = SpiderIPPool {
            metadata: self.metadata.clone(),
            spec: IPPoolSpec {
                ip_version: self.spec.ip_version,
                subnet: self.spec.subnet.clone(),
                ips: self.spec.ips.clone(),
                exclude_ips: self.spec.exclude_ips.clone(),
                gateway: self.spec.gateway.clone(),
                routes: self.spec.routes.clone(),
                vlan: self.spec.vlan,
                ..Default::default()
            },
            ..Default::default()
        };
        as_pool.to_pool_as("SpiderSubnet", "subnet")
    }
}

impl SpiderReservedIP {
    /// The reserved addresses.
    pub fn to_set(&self) -> Result<IpSet, ValidationError> {
        let name = &self.metadata.name;
        let ctx = |e: ValidationError| e.in_object("SpiderReservedIP", name);
        let declared = parse_family("spec.ipVersion", self.spec.ip_version).map_err(ctx)?;
        let family = match declared {
            Some(f) => f,
            None => match self.spec.ips.first() {
                None => {
                    return Err(ctx(ValidationError::field(
                        "spec.ips",
                        "[]",
                        "is not generated correctly, 'spec.ips' is empty or 'spec.ips[0]' may be invalid",
                    )))
                }
                Some(first) => first
                    .parse::<spiderpool_core::IpRange>()
                    .map_err(|e| ctx(ValidationError::Invalid(format!("spec.ips: {e}"))))?
                    .family(),
            },
        };
        parse_list("spec.ips", &self.spec.ips, family).map_err(ctx)
    }
}

/// The allocations map of `status.allocatedIPs`, serialised the way upstream stores it.
pub fn allocated_ips_string(map: &BTreeMap<String, PoolIPAllocation>) -> String {
    serde_json::to_string(map).expect("plain map serialises")
}

#[cfg(test)]
mod tests;
