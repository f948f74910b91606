//! The NetworkAttachmentDefinition a SpiderMultusConfig generates: upstream's chain for its
//! cniType (`[ifacer] plugin [rdma] [chainCNIJsonData…] [coordinator] [tuning]`, the plugin's
//! `ipam` being `spiderpool` with the default pools), its name and annotations.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::*;
use crate::ValidationError;

/// The NAD's `apiVersion`.
pub const NAD_API_VERSION: &str = "k8s.cni.cncf.io/v1";
/// The annotation of a NAD's device plugin resource.
const RESOURCE_NAME: &str = "k8s.v1.cni.cncf.io/resourceName";
/// Not copied from the SpiderMultusConfig: kubectl's record of the SMC would make a later
/// `kubectl apply` of the NAD merge against the wrong object.
const KUBECTL_LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A generated NetworkAttachmentDefinition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nad {
    /// Its namespace (the SpiderMultusConfig's).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its annotations: the SpiderMultusConfig's, and the device plugin resource.
    pub annotations: BTreeMap<String, String>,
    /// `spec.config` (`None`: a `custom` config without `customCNI`).
    pub config: Option<String>,
}

impl Nad {
    /// The object, owned (as its controller) by the SpiderMultusConfig `owner_name` with UID
    /// `owner_uid`.
    pub fn to_object(&self, owner_name: &str, owner_uid: &str) -> Value {
        let mut spec = Map::new();
        if let Some(c) = &self.config {
            spec.insert("config".into(), Value::String(c.clone()));
        }
        json!({
            "apiVersion": NAD_API_VERSION,
            "kind": "NetworkAttachmentDefinition",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "annotations": self.annotations,
                "ownerReferences": [{
                    "apiVersion": API_VERSION, "kind": "SpiderMultusConfig",
                    "name": owner_name, "uid": owner_uid,
                    "controller": true, "blockOwnerDeletion": true}],
            },
            "spec": spec,
        })
    }
}

fn ipam(pools: Option<&SpiderpoolPools>, match_master: bool) -> Value {
    let mut o = Map::new();
    o.insert("type".into(), "spiderpool".into());
    if let Some(p) = pools {
        if !p.ipv4.is_empty() {
            o.insert("default_ipv4_ippool".into(), json!(p.ipv4));
        }
        if !p.ipv6.is_empty() {
            o.insert("default_ipv6_ippool".into(), json!(p.ipv6));
        }
        if match_master && p.match_master_subnet == Some(true) {
            o.insert("match_master_subnet".into(), true.into());
        }
    }
    Value::Object(o)
}

/// The master a macvlan, ipvlan or vlan NIC sits on (`bond` for several), and the `ifacer`
/// plugin that makes the bond or the VLAN sub-interface first, if one is needed.
fn master_of(m: &MasterConfig, vlan_in_name: bool) -> (String, Option<Value>) {
    let vlan = if vlan_in_name {
        m.vlan_id.unwrap_or(0)
    } else {
        0
    };
    let base = match (m.master.as_slice(), &m.bond) {
        ([one], _) => one.clone(),
        (_, Some(b)) => b.name.clone(),
        (many, None) => many.first().cloned().unwrap_or_default(),
    };
    let name = if vlan != 0 {
        format!("{base}.{vlan}")
    } else {
        base
    };
    if vlan == 0 && m.master.len() < 2 {
        return (name, None);
    }
    let mut ifacer = Map::new();
    if vlan != 0 {
        ifacer.insert("vlanID".into(), vlan.into());
    }
    ifacer.insert("type".into(), "ifacer".into());
    ifacer.insert("interfaces".into(), json!(m.master));
    if let Some(b) = &m.bond {
        ifacer.insert(
            "bond".into(),
            json!({"name": b.name, "mode": b.mode, "options": b.options.clone().unwrap_or_default()}),
        );
    }
    (name, Some(Value::Object(ifacer)))
}

/// The coordinator plugin from the SMC's `coordinator` (upstream's keys; `hostRuleTable` and
/// `podCIDRType` are the cluster's SpiderCoordinator's, never a NAD's).
fn coordinator(c: Option<&CoordinatorSpec>) -> Value {
    let mut o = Map::new();
    o.insert("type".into(), "coordinator".into());
    let Some(c) = c else {
        return Value::Object(o);
    };
    let mut put = |k: &str, v: Value| {
        o.insert(k.into(), v);
    };
    if let Some(m) = &c.mode {
        put("mode", m.as_str().into());
    }
    if !c.hijack_cidr.is_empty() {
        put("hijackCIDR", json!(c.hijack_cidr));
    }
    if !c.policy_routes.is_empty() {
        put("policyRoutes", json!(c.policy_routes));
    }
    for (k, v) in [
        ("podMACPrefix", &c.pod_mac_prefix),
        ("podDefaultRouteNic", &c.pod_default_route_nic),
        ("vethLinkAddress", &c.veth_link_address),
    ] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            put(k, v.into());
        }
    }
    for (k, v) in [
        ("vethMTU", c.veth_mtu),
        ("txQueueLen", c.tx_queue_len),
        ("podRPFilter", c.pod_rp_filter),
    ] {
        if let Some(v) = v {
            put(k, v.into());
        }
    }
    for (k, v) in [
        ("tunePodRoutes", c.tune_pod_routes),
        ("detectIPConflict", c.detect_ip_conflict),
        ("detectGateway", c.detect_gateway),
    ] {
        if let Some(v) = v {
            put(k, v.into());
        }
    }
    Value::Object(o)
}

fn missing(block: &str, kind: &str) -> ValidationError {
    ValidationError::Invalid(format!(
        "spec.{block} is required for cniType {kind:?} (no spec.{block} specified)"
    ))
}

impl SpiderMultusConfig {
    /// The NetworkAttachmentDefinition this SpiderMultusConfig generates (after
    /// [`Self::default_spec`]); an error names what cannot be rendered.
    pub fn render(&self) -> Result<Nad, ValidationError> {
        let s = &self.spec;
        let kind = self.cni_type();
        let name = self.nad_name().to_string();
        let mut annotations: BTreeMap<String, String> = self
            .metadata
            .annotations
            .iter()
            .filter(|(k, _)| *k != KUBECTL_LAST_APPLIED)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let nad = |annotations, config| Nad {
            namespace: self.namespace().to_string(),
            name: name.clone(),
            annotations,
            config,
        };
        if kind == "custom" {
            let config = s.custom_cni.clone().filter(|c| !c.trim().is_empty());
            return Ok(nad(annotations, config));
        }
        let with_ipam = !s.disable_ipam.unwrap_or(false);
        let mut plugins: Vec<Value> = Vec::new();
        let mut tail: Vec<Value> = Vec::new();
        let mut main = Map::new();
        let pools: Option<&SpiderpoolPools>;
        let mut match_master = false;
        match kind {
            "macvlan" | "ipvlan" | "vlan" => {
                let m = match kind {
                    "macvlan" => s.macvlan.as_ref(),
                    "ipvlan" => s.ipvlan.as_ref(),
                    _ => s.vlan.as_ref(),
                }
                .ok_or_else(|| missing(kind, kind))?;
                let (master, ifacer) = master_of(m, kind != "vlan");
                plugins.extend(ifacer);
                main.insert("type".into(), kind.into());
                main.insert("master".into(), master.into());
                match kind {
                    "macvlan" => {
                        main.insert("mode".into(), "bridge".into());
                    }
                    "vlan" => {
                        let mode = m.vlan_mode.clone().unwrap_or_else(|| "manual".into());
                        if mode == "manual" {
                            main.insert("vlanId".into(), m.vlan_id.unwrap_or(0).into());
                        }
                        main.insert("vlanMode".into(), mode.into());
                    }
                    _ => {}
                }
                main.insert("mtu".into(), m.mtu.unwrap_or(0).into());
                pools = m.ippools.as_ref();
            }
            "sriov" => {
                let c = s.sriov.as_ref().ok_or_else(|| missing("sriov", kind))?;
                main.insert("type".into(), "sriov".into());
                main.insert("vlan".into(), c.vlan_id.unwrap_or(0).into());
                main.insert("min_tx_rate".into(), c.min_tx_rate_mbps.unwrap_or(0).into());
                main.insert("max_tx_rate".into(), c.max_tx_rate_mbps.unwrap_or(0).into());
                if c.rdma_isolation == Some(true) {
                    tail.push(json!({"type": "rdma"}));
                }
                if let Some(r) = &c.resource_name {
                    annotations.insert(RESOURCE_NAME.into(), r.clone());
                }
                pools = c.ippools.as_ref();
                match_master = true;
            }
            "ib-sriov" => {
                let c = s.ibsriov.as_ref().ok_or_else(|| missing("ibsriov", kind))?;
                main.insert("type".into(), "ib-sriov".into());
                main.insert("pkey".into(), c.pkey.clone().unwrap_or_default().into());
                main.insert(
                    "link_state".into(),
                    c.link_state
                        .clone()
                        .unwrap_or_else(|| "enable".into())
                        .into(),
                );
                main.insert(
                    "rdmaIsolation".into(),
                    c.rdma_isolation.unwrap_or(true).into(),
                );
                main.insert(
                    "ibKubernetesEnabled".into(),
                    c.enable_ib_kubernetes.unwrap_or(false).into(),
                );
                if let Some(r) = &c.resource_name {
                    annotations.insert(RESOURCE_NAME.into(), r.clone());
                }
                pools = c.ippools.as_ref();
            }
            "ipoib" => {
                let c = s.ipoib.as_ref().ok_or_else(|| missing("ipoib", kind))?;
                main.insert("type".into(), "ipoib".into());
                main.insert("master".into(), c.master.clone().into());
                pools = c.ippools.as_ref();
            }
            "ovs" => {
                let c = s.ovs.as_ref().ok_or_else(|| missing("ovs", kind))?;
                main.insert("type".into(), "ovs".into());
                main.insert("bridge".into(), c.bridge.clone().into());
                main.insert("vlan".into(), c.vlan.unwrap_or(0).into());
                if let Some(d) = c.device_id.as_deref().filter(|d| !d.is_empty()) {
                    main.insert("deviceID".into(), d.into());
                    annotations.insert(
                        RESOURCE_NAME.into(),
                        format!("ovs-cni.network.kubevirt.io/{}", c.bridge),
                    );
                }
                if !c.trunk.is_empty() {
                    main.insert("trunk".into(), json!(c.trunk));
                }
                pools = c.ippools.as_ref();
            }
            other => {
                return Err(ValidationError::field(
                    "spec.cniType",
                    other,
                    &format!(
                        "is not supported (supported values: {})",
                        CNI_TYPES.join(", ")
                    ),
                ))
            }
        }
        if with_ipam {
            main.insert("ipam".into(), ipam(pools, match_master));
        }
        plugins.push(Value::Object(main));
        plugins.append(&mut tail);
        for (i, c) in s.chain_cni_json_data.iter().enumerate() {
            plugins.push(chain_plugin(i, c)?);
        }
        if s.enable_coordinator.unwrap_or(true) {
            plugins.push(coordinator(s.coordinator.as_ref()));
        }
        if let Some(mtu) = s.sriov.as_ref().and_then(|c| c.mtu).filter(|m| *m > 0) {
            if kind == "sriov" {
                plugins.push(json!({"type": "tuning", "mtu": mtu}));
            }
        }
        let version = self
            .metadata
            .annotations
            .get(CNI_VERSION)
            .cloned()
            .unwrap_or_else(|| DEFAULT_CNI_VERSION.into());
        let conf_name = self
            .metadata
            .annotations
            .get(CNI_CONFIG_NAME)
            .filter(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| name.clone());
        let config = json!({"cniVersion": version, "name": conf_name, "plugins": plugins});
        Ok(nad(annotations, Some(config.to_string())))
    }
}

/// The `i`th entry of `chainCNIJsonData`: one plugin object with a `type`.
pub(super) fn chain_plugin(i: usize, c: &str) -> Result<Value, ValidationError> {
    let field = format!("spec.chainCNIJsonData[{i}]");
    let v: Value = serde_json::from_str(c).map_err(|e| {
        ValidationError::field(&field, c, &format!("is not a CNI plugin config: {e}"))
    })?;
    match v.get("type").and_then(Value::as_str) {
        Some(t) if !t.is_empty() && v.is_object() => Ok(v),
        _ => Err(ValidationError::field(
            &field,
            c,
            "is not a CNI plugin config: missing 'type'",
        )),
    }
}
