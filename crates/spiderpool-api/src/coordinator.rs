//! SpiderCoordinator (`spiderpool.spidernet.io/v2beta1`, cluster scoped, usually one named
//! `default`): the settings of the chained `coordinator` CNI plugin — how an underlay pod
//! reaches its node and the cluster's Services. Upstream's defaults and webhook rules, with
//! messages naming the field and value (`../spec/spiderpool-reference.md` §2.6, §8).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::crd::API_VERSION;
use crate::meta::ObjectMeta;
use crate::ValidationError;

/// The modes of `spec.mode`.
pub const MODES: [&str; 4] = ["auto", "underlay", "overlay", "disabled"];
/// The values of `spec.podCIDRType`.
pub const POD_CIDR_TYPES: [&str; 5] = ["auto", "cluster", "calico", "cilium", "none"];
/// The values of `spec.podRPFilter` and `spec.hostRPFilter` that set the sysctl (a negative
/// value leaves it alone).
pub const RP_FILTERS: [i64; 3] = [0, 1, 2];
/// The default `spec.hostRuleTable`.
pub const DEFAULT_HOST_RULE_TABLE: i64 = 500;
/// The default `spec.vethMTU`.
pub const DEFAULT_VETH_MTU: i64 = 1500;
/// The name of the SpiderCoordinator the agent serves.
pub const DEFAULT_NAME: &str = "default";

/// A policy route: traffic to `dst` leaves through `gw`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct PolicyRoute {
    /// Destination CIDR.
    pub dst: String,
    /// Next hop, of the same family as `dst`.
    pub gw: String,
}

/// `SpiderCoordinator.spec`. With the `kube` feature it also defines the CRD (`deploy/crds/`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "spiderpool.spidernet.io",
        version = "v2beta1",
        kind = "SpiderCoordinator",
        root = "SpiderCoordinatorResource",
        plural = "spidercoordinators",
        shortname = "scc",
        category = "spiderpool",
        status = "CoordinatorStatus",
        printcolumn = r#"{"name":"MODE","type":"string","jsonPath":".spec.mode"}"#,
        printcolumn = r#"{"name":"PODCIDRTYPE","type":"string","jsonPath":".spec.podCIDRType"}"#,
        printcolumn = r#"{"name":"PHASE","type":"string","jsonPath":".status.phase"}"#
    )
)]
pub struct CoordinatorSpec {
    /// `auto` (default), `underlay`, `overlay` or `disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "kube",
        schemars(extend("enum" = ["auto", "underlay", "overlay", "disabled"]))
    )]
    pub mode: Option<String>,
    /// Where the cluster's pod CIDRs come from: `auto`, `cluster`, `calico`, `cilium` or
    /// `none`. Required.
    #[serde(
        default,
        rename = "podCIDRType",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(
        feature = "kube",
        schemars(extend("enum" = ["auto", "cluster", "calico", "cilium", "none"]))
    )]
    pub pod_cidr_type: Option<String>,
    /// Further CIDRs (or addresses) the pod reaches through its node.
    #[serde(default, rename = "hijackCIDR", skip_serializing_if = "Vec::is_empty")]
    pub hijack_cidr: Vec<String>,
    /// Routes added in the pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_routes: Vec<PolicyRoute>,
    /// The first two bytes of the pod's MAC address (`0a:1b`; unicast).
    #[serde(
        default,
        rename = "podMACPrefix",
        skip_serializing_if = "Option::is_none"
    )]
    pub pod_mac_prefix: Option<String>,
    /// Whether the pod's routes are tuned across its NICs (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tune_pod_routes: Option<bool>,
    /// The NIC of the pod's default route (the pod annotation
    /// `ipam.spidernet.io/default-route-nic` wins).
    #[serde(
        default,
        rename = "podDefaultRouteNIC",
        skip_serializing_if = "Option::is_none"
    )]
    pub pod_default_route_nic: Option<String>,
    /// The node's policy-routing table for pod traffic (default 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_rule_table: Option<i64>,
    /// The node's `rp_filter` (0, 1 or 2; negative: left alone; default 0).
    #[serde(
        default,
        rename = "hostRPFilter",
        skip_serializing_if = "Option::is_none"
    )]
    pub host_rp_filter: Option<i64>,
    /// The pod's `rp_filter` (0, 1 or 2; negative: left alone; default 0).
    #[serde(
        default,
        rename = "podRPFilter",
        skip_serializing_if = "Option::is_none"
    )]
    pub pod_rp_filter: Option<i64>,
    /// The veth's transmit queue length (0: the kernel's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_queue_len: Option<i64>,
    /// The address of the veth's node end (empty: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veth_link_address: Option<String>,
    /// The veth's MTU (default 1500).
    #[serde(default, rename = "vethMTU", skip_serializing_if = "Option::is_none")]
    pub veth_mtu: Option<i64>,
    /// Whether ADD probes the segment for the address before using it (default false).
    #[serde(
        default,
        rename = "detectIPConflict",
        skip_serializing_if = "Option::is_none"
    )]
    pub detect_ip_conflict: Option<bool>,
    /// Whether ADD checks that the gateway answers (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_gateway: Option<bool>,
}

/// `SpiderCoordinator.status`, written by the controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct CoordinatorStatus {
    /// `Synced` or `NotReady`.
    #[serde(default)]
    pub phase: String,
    /// Why it is not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The cluster's pod CIDRs.
    #[serde(default, rename = "overlayPodCIDR")]
    pub overlay_pod_cidr: Vec<String>,
    /// The cluster's Service CIDRs.
    #[serde(default, rename = "serviceCIDR")]
    pub service_cidr: Vec<String>,
}

/// A SpiderCoordinator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpiderCoordinator {
    /// Always [`API_VERSION`].
    #[serde(default)]
    pub api_version: String,
    /// Always `SpiderCoordinator`.
    #[serde(default)]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: CoordinatorSpec,
    /// Status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CoordinatorStatus>,
}

impl SpiderCoordinator {
    /// A SpiderCoordinator named `name` with `spec`.
    pub fn new(name: &str, spec: CoordinatorSpec) -> Self {
        SpiderCoordinator {
            api_version: API_VERSION.into(),
            kind: "SpiderCoordinator".into(),
            metadata: ObjectMeta {
                name: name.into(),
                ..Default::default()
            },
            spec,
            status: None,
        }
    }

    /// Upstream's mutations: every optional setting gets its default, and a bare address in
    /// `hijackCIDR` becomes a host CIDR (`/32`, `/128`). Values are not checked here.
    pub fn default_spec(&mut self) {
        let s = &mut self.spec;
        s.mode.get_or_insert_with(|| "auto".into());
        s.tune_pod_routes.get_or_insert(true);
        s.host_rule_table.get_or_insert(DEFAULT_HOST_RULE_TABLE);
        s.host_rp_filter.get_or_insert(0);
        s.pod_rp_filter.get_or_insert(0);
        s.tx_queue_len.get_or_insert(0);
        s.veth_mtu.get_or_insert(DEFAULT_VETH_MTU);
        s.detect_ip_conflict.get_or_insert(false);
        s.detect_gateway.get_or_insert(false);
        for c in &mut s.hijack_cidr {
            if !c.contains('/') {
                match c.trim().parse::<IpAddr>() {
                    Ok(IpAddr::V4(_)) => *c = format!("{}/32", c.trim()),
                    Ok(IpAddr::V6(_)) => *c = format!("{}/128", c.trim()),
                    Err(_) => {} // validation names it
                }
            }
        }
    }

    /// Upstream's webhook rules; the first broken one, naming the object, field and value.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.validate_spec()
            .map_err(|e| e.in_object("SpiderCoordinator", &self.metadata.name))
    }

    fn validate_spec(&self) -> Result<(), ValidationError> {
        check_spec(&self.spec, "spec", true)
    }
}

/// The rules of a coordinator spec whose fields are at `prefix` (`spec` of a SpiderCoordinator,
/// `spec.coordinator` of a SpiderMultusConfig, where `podCIDRType` may be left out).
pub(crate) fn check_spec(
    s: &CoordinatorSpec,
    prefix: &str,
    pod_cidr_type_required: bool,
) -> Result<(), ValidationError> {
    if let Some(m) = &s.mode {
        one_of(&format!("{prefix}.mode"), m, &MODES)?;
    }
    match &s.pod_cidr_type {
        None if !pod_cidr_type_required => {}
        None => {
            return Err(ValidationError::Invalid(format!(
                "{prefix}.podCIDRType is required (supported values: {})",
                quoted(&POD_CIDR_TYPES)
            )))
        }
        Some(t) => one_of(&format!("{prefix}.podCIDRType"), t, &POD_CIDR_TYPES)?,
    }
    for (i, c) in s.hijack_cidr.iter().enumerate() {
        let field = format!("{prefix}.hijackCIDR[{i}]");
        if c.parse::<ipnet::IpNet>().is_err() && c.parse::<IpAddr>().is_err() {
            return Err(ValidationError::field(
                &field,
                c,
                "is not an IP address or CIDR",
            ));
        }
    }
    for (i, r) in s.policy_routes.iter().enumerate() {
        let dst = r.dst.parse::<ipnet::IpNet>().map_err(|_| {
            ValidationError::field(
                &format!("{prefix}.policyRoutes[{i}].dst"),
                &r.dst,
                "is not a CIDR",
            )
        })?;
        let gw = r.gw.parse::<IpAddr>().map_err(|_| {
            ValidationError::field(
                &format!("{prefix}.policyRoutes[{i}].gw"),
                &r.gw,
                "is not an IP address",
            )
        })?;
        if dst.addr().is_ipv4() != gw.is_ipv4() {
            return Err(ValidationError::field(
                &format!("{prefix}.policyRoutes[{i}]"),
                format!("{} via {}", r.dst, r.gw),
                "is invalid: dst and gw must use the same IP family",
            ));
        }
    }
    if let Some(p) = s.pod_mac_prefix.as_deref().filter(|p| !p.is_empty()) {
        match parse_mac_prefix(p) {
            Ok(_) => {}
            Err(MacPrefixError::Multicast) => {
                return Err(ValidationError::field(
                    &format!("{prefix}.podMACPrefix"),
                    p,
                    "is not a unicast MAC: the lowest bit of the first byte must be 0",
                ))
            }
            Err(MacPrefixError::NotTwoBytes) => {
                return Err(ValidationError::field(
                    &format!("{prefix}.podMACPrefix"),
                    p,
                    "is not a valid MAC prefix (two bytes, e.g. 0a:1b)",
                ))
            }
        }
    }
    if let Some(n) = s.tx_queue_len.filter(|n| *n < 0) {
        return Err(ValidationError::field(
            &format!("{prefix}.txQueueLen"),
            n.to_string(),
            "is invalid: txQueueLen can't be less than 0",
        ));
    }
    for (field, v) in [
        (format!("{prefix}.podRPFilter"), s.pod_rp_filter),
        (format!("{prefix}.hostRPFilter"), s.host_rp_filter),
    ] {
        if let Some(n) = v.filter(|n| *n >= 0 && !RP_FILTERS.contains(n)) {
            return Err(ValidationError::field(
                    &field,
                    n.to_string(),
                    "is not supported (supported values: 0, 1, 2; a negative value leaves rp_filter alone)",
                ));
        }
    }
    if let Some(n) = s
        .host_rule_table
        .filter(|n| !(0..=i64::from(u32::MAX)).contains(n))
    {
        return Err(ValidationError::field(
            &format!("{prefix}.hostRuleTable"),
            n.to_string(),
            "is not a routing table number (0 to 4294967295)",
        ));
    }
    if let Some(a) = s.veth_link_address.as_deref().filter(|a| !a.is_empty()) {
        if a.parse::<IpAddr>().is_err() {
            return Err(ValidationError::field(
                &format!("{prefix}.vethLinkAddress"),
                a,
                "is invalid: vethLinkAddress is an invalid IP address",
            ));
        }
    }
    if let Some(n) = s.veth_mtu.filter(|n| *n <= 0) {
        return Err(ValidationError::field(
            &format!("{prefix}.vethMTU"),
            n.to_string(),
            "is invalid: vethMTU must be greater than 0",
        ));
    }
    Ok(())
}

/// Why a MAC prefix is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacPrefixError {
    /// Not two bytes of two hex digits each (`0a:1b`).
    NotTwoBytes,
    /// The lowest bit of the first byte is set: a multicast address.
    Multicast,
}

/// A pod MAC prefix (`0a:1b`): two bytes of a unicast address. Pure.
pub fn parse_mac_prefix(p: &str) -> Result<[u8; 2], MacPrefixError> {
    let bytes: Vec<Option<u8>> = p
        .split(':')
        .map(|b| {
            (b.len() == 2)
                .then(|| u8::from_str_radix(b, 16).ok())
                .flatten()
        })
        .collect();
    match bytes.as_slice() {
        [Some(a), Some(_)] if a & 1 != 0 => Err(MacPrefixError::Multicast),
        [Some(a), Some(b)] => Ok([*a, *b]),
        _ => Err(MacPrefixError::NotTwoBytes),
    }
}

fn quoted(values: &[&str]) -> String {
    values
        .iter()
        .map(|v| format!("{v:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn one_of(field: &str, value: &str, values: &[&str]) -> Result<(), ValidationError> {
    if values.contains(&value) {
        return Ok(());
    }
    Err(ValidationError::field(
        field,
        value,
        &format!("is not supported (supported values: {})", quoted(values)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coordinator(spec: serde_json::Value) -> SpiderCoordinator {
        serde_json::from_value(serde_json::json!({
            "apiVersion": API_VERSION, "kind": "SpiderCoordinator",
            "metadata": {"name": "default"}, "spec": spec}))
        .unwrap()
    }

    fn error(spec: serde_json::Value) -> String {
        let mut c = coordinator(spec);
        c.default_spec();
        c.validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_fill_every_setting_and_hijack_addresses_become_host_cidrs() {
        let mut c = coordinator(serde_json::json!({
            "podCIDRType": "cluster", "hijackCIDR": ["10.9.0.1", "fd00::1", "10.8.0.0/16"]}));
        c.default_spec();
        c.validate().unwrap();
        let s = &c.spec;
        assert_eq!(s.mode.as_deref(), Some("auto"));
        assert_eq!(s.tune_pod_routes, Some(true));
        assert_eq!(s.host_rule_table, Some(500));
        assert_eq!((s.pod_rp_filter, s.host_rp_filter), (Some(0), Some(0)));
        assert_eq!((s.tx_queue_len, s.veth_mtu), (Some(0), Some(1500)));
        assert_eq!(
            (s.detect_ip_conflict, s.detect_gateway),
            (Some(false), Some(false))
        );
        assert_eq!(s.hijack_cidr, ["10.9.0.1/32", "fd00::1/128", "10.8.0.0/16"]);
        // What is set stays.
        let mut c = coordinator(
            serde_json::json!({"podCIDRType": "none", "mode": "underlay",
            "vethMTU": 9000, "hostRuleTable": 600, "podRPFilter": -1}),
        );
        c.default_spec();
        assert_eq!(c.spec.mode.as_deref(), Some("underlay"));
        assert_eq!(
            (c.spec.veth_mtu, c.spec.host_rule_table),
            (Some(9000), Some(600))
        );
        assert_eq!(c.spec.pod_rp_filter, Some(-1));
        c.validate().unwrap();
    }

    #[test]
    fn each_rule_names_the_field_and_value() {
        let cases = [
            (serde_json::json!({}), "SpiderCoordinator \"default\": spec.podCIDRType is required (supported values: \"auto\", \"cluster\", \"calico\", \"cilium\", \"none\")"),
            (serde_json::json!({"podCIDRType": "flannel"}), "spec.podCIDRType \"flannel\" is not supported"),
            (serde_json::json!({"podCIDRType": "none", "mode": "bridge"}), "spec.mode \"bridge\" is not supported"),
            (serde_json::json!({"podCIDRType": "none", "hijackCIDR": ["10.0.0.0/33"]}), "spec.hijackCIDR[0] \"10.0.0.0/33\" is not an IP address or CIDR"),
            (serde_json::json!({"podCIDRType": "none", "policyRoutes": [{"dst": "10.0.0.0/8", "gw": "fd00::1"}]}), "dst and gw must use the same IP family"),
            (serde_json::json!({"podCIDRType": "none", "policyRoutes": [{"dst": "10.0.0.0", "gw": "10.0.0.1"}]}), "spec.policyRoutes[0].dst \"10.0.0.0\" is not a CIDR"),
            (serde_json::json!({"podCIDRType": "none", "podMACPrefix": "0a:1b:2c"}), "spec.podMACPrefix \"0a:1b:2c\" is not a valid MAC prefix"),
            (serde_json::json!({"podCIDRType": "none", "podMACPrefix": "zz:00"}), "is not a valid MAC prefix"),
            (serde_json::json!({"podCIDRType": "none", "podMACPrefix": "01:00"}), "spec.podMACPrefix \"01:00\" is not a unicast MAC"),
            (serde_json::json!({"podCIDRType": "none", "txQueueLen": -1}), "spec.txQueueLen \"-1\" is invalid: txQueueLen can't be less than 0"),
            (serde_json::json!({"podCIDRType": "none", "podRPFilter": 3}), "spec.podRPFilter \"3\" is not supported"),
            (serde_json::json!({"podCIDRType": "none", "hostRPFilter": 7}), "spec.hostRPFilter \"7\" is not supported"),
            (serde_json::json!({"podCIDRType": "none", "hostRuleTable": -5}), "spec.hostRuleTable \"-5\""),
            (serde_json::json!({"podCIDRType": "none", "vethLinkAddress": "169.254.300.1"}), "spec.vethLinkAddress \"169.254.300.1\" is invalid: vethLinkAddress is an invalid IP address"),
            (serde_json::json!({"podCIDRType": "none", "vethMTU": 0}), "spec.vethMTU \"0\" is invalid: vethMTU must be greater than 0"),
        ];
        for (spec, want) in cases {
            let got = error(spec.clone());
            assert!(got.contains(want), "{spec}: {got}");
        }
        // A unicast prefix and a link address pass.
        let mut c = coordinator(serde_json::json!({"podCIDRType": "calico",
            "podMACPrefix": "0a:1b", "vethLinkAddress": "169.254.200.1",
            "policyRoutes": [{"dst": "10.0.0.0/8", "gw": "10.6.0.1"}]}));
        c.default_spec();
        c.validate().unwrap();
    }
}
