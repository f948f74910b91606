//! SpiderMultusConfig (`spiderpool.spidernet.io/v2beta1`, namespaced, short name `smc`): one
//! CNI type's settings from which the NetworkAttachmentDefinition of the same namespace is
//! generated (the plugin, `spiderpool` IPAM with its pools, then the coordinator), as upstream
//! does (`../spec/spiderpool-reference.md` §2.5). Upstream's defaults ([`SpiderMultusConfig::
//! default_spec`]), its webhook rules with messages naming the field and value
//! ([`SpiderMultusConfig::validate`]), and the NAD ([`SpiderMultusConfig::render`]).

mod render;
#[cfg(test)]
mod tests;
mod validate;

use serde::{Deserialize, Serialize};

pub use render::{Nad, NAD_API_VERSION};

use crate::coordinator::CoordinatorSpec;
use crate::crd::API_VERSION;
use crate::meta::ObjectMeta;

/// The values of `spec.cniType`.
pub const CNI_TYPES: [&str; 8] = [
    "macvlan", "ipvlan", "vlan", "sriov", "ovs", "ib-sriov", "ipoib", "custom",
];
/// The CNI versions a generated NAD may declare (annotation [`CNI_VERSION`]).
pub const CNI_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The CNI version of a generated NAD without the [`CNI_VERSION`] annotation.
pub const DEFAULT_CNI_VERSION: &str = "0.3.1";
/// Annotation: the generated NAD's name (default: the SpiderMultusConfig's).
pub const CR_NAME: &str = "multus.spidernet.io/cr-name";
/// Annotation: the generated chain's `cniVersion`.
pub const CNI_VERSION: &str = "multus.spidernet.io/cni-version";
/// Annotation: the generated chain's `name` (default: the NAD's name).
pub const CNI_CONFIG_NAME: &str = "cni.spidernet.io/cniconfig-name";
/// Annotations that ask the pod webhook to inject an SMC's network and RDMA resources (copied
/// to labels of the same key by the mutation, as upstream).
pub const INJECT_ANNOTATIONS: [&str; 2] = [
    "cni.spidernet.io/rdma-resource-inject",
    "cni.spidernet.io/network-resource-inject",
];

/// The pools a generated `spiderpool` IPAM config names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct SpiderpoolPools {
    /// Take the pool whose subnet is the master interface's (sriov only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_master_subnet: Option<bool>,
    /// IPv4 pools (names or wildcards), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv4: Vec<String>,
    /// IPv6 pools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv6: Vec<String>,
}

/// A bond of the master interfaces, made by upstream's `ifacer` plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct BondConfig {
    /// The bond's name.
    #[serde(default)]
    pub name: String,
    /// The bonding mode, 0 to 6.
    #[serde(default)]
    pub mode: i64,
    /// Bonding options (`miimon=100;...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
}

/// `spec.macvlan`, `spec.ipvlan` and `spec.vlan`: the pod's NIC on a master interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct MasterConfig {
    /// The master interfaces (two or more need `bond`).
    #[serde(default)]
    pub master: Vec<String>,
    /// `vlan` only: `manual` (default; `vlanID` is the VLAN) or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan_mode: Option<String>,
    /// The VLAN (0 to 4094; 0: untagged): a sub-interface `MASTER.VLAN` for macvlan and ipvlan.
    #[serde(default, rename = "vlanID", skip_serializing_if = "Option::is_none")]
    pub vlan_id: Option<i64>,
    /// The pod NIC's MTU (0: the master's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<i64>,
    /// A bond of the masters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bond: Option<BondConfig>,
    /// The RDMA resource the pod webhook injects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma_resource_name: Option<String>,
    /// The default pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ippools: Option<SpiderpoolPools>,
}

/// `spec.sriov`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct SriovConfig {
    /// The device plugin's resource of the VFs (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_name: Option<String>,
    /// The VF's VLAN (0 to 4094).
    #[serde(default, rename = "vlanID", skip_serializing_if = "Option::is_none")]
    pub vlan_id: Option<i64>,
    /// The VF's MTU, set by a `tuning` plugin (0: left alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<i64>,
    /// Least transmit rate, Mbps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tx_rate_mbps: Option<i64>,
    /// Greatest transmit rate, Mbps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tx_rate_mbps: Option<i64>,
    /// Isolate the RDMA device in the pod (an `rdma` plugin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma_isolation: Option<bool>,
    /// The default pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ippools: Option<SpiderpoolPools>,
}

/// `spec.ibsriov` (cniType `ib-sriov`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct IbSriovConfig {
    /// The device plugin's resource (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_name: Option<String>,
    /// The InfiniBand partition key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkey: Option<String>,
    /// `auto`, `enable` (default) or `disable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_state: Option<String>,
    /// Isolate the RDMA device in the pod (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma_isolation: Option<bool>,
    /// Let ib-kubernetes manage the GUIDs (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_ib_kubernetes: Option<bool>,
    /// The default pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ippools: Option<SpiderpoolPools>,
}

/// `spec.ipoib`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct IpoibConfig {
    /// The IPoIB master interface (required).
    #[serde(default)]
    pub master: String,
    /// The default pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ippools: Option<SpiderpoolPools>,
}

/// A trunk of VLANs on an OVS port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct Trunk {
    /// First VLAN of a range (0 to 4094).
    #[serde(default, rename = "minID", skip_serializing_if = "Option::is_none")]
    pub min_id: Option<i64>,
    /// Last VLAN of a range (0 to 4094).
    #[serde(default, rename = "maxID", skip_serializing_if = "Option::is_none")]
    pub max_id: Option<i64>,
    /// One VLAN (0 to 4094).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
}

/// `spec.ovs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct OvsConfig {
    /// The OVS bridge (required).
    #[serde(default)]
    pub bridge: String,
    /// The port's VLAN (0 to 4094).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<i64>,
    /// Trunked VLANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trunk: Vec<Trunk>,
    /// A VF's PCI address (OVS hardware offload).
    #[serde(default, rename = "deviceID", skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The default pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ippools: Option<SpiderpoolPools>,
}

/// `SpiderMultusConfig.spec`. With the `kube` feature it also defines the CRD (`deploy/crds/`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "spiderpool.spidernet.io",
        version = "v2beta1",
        kind = "SpiderMultusConfig",
        root = "SpiderMultusConfigResource",
        plural = "spidermultusconfigs",
        shortname = "smc",
        category = "spiderpool",
        namespaced,
        printcolumn = r#"{"name":"CNITYPE","type":"string","jsonPath":".spec.cniType"}"#,
        printcolumn = r#"{"name":"COORDINATOR","type":"boolean","jsonPath":".spec.enableCoordinator"}"#
    )
)]
pub struct MultusConfigSpec {
    /// `macvlan`, `ipvlan`, `vlan`, `sriov`, `ovs`, `ib-sriov`, `ipoib` or `custom` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "kube",
        schemars(extend("enum" = ["macvlan", "ipvlan", "vlan", "sriov", "ovs", "ib-sriov", "ipoib", "custom"]))
    )]
    pub cni_type: Option<String>,
    /// cniType `macvlan`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macvlan: Option<MasterConfig>,
    /// cniType `ipvlan`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipvlan: Option<MasterConfig>,
    /// cniType `vlan`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<MasterConfig>,
    /// cniType `sriov`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sriov: Option<SriovConfig>,
    /// cniType `ib-sriov`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ibsriov: Option<IbSriovConfig>,
    /// cniType `ipoib`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipoib: Option<IpoibConfig>,
    /// cniType `ovs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ovs: Option<OvsConfig>,
    /// Chain the `coordinator` plugin (default true; never for `custom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_coordinator: Option<bool>,
    /// Leave the `ipam` section out (default false).
    #[serde(
        default,
        rename = "disableIPAM",
        skip_serializing_if = "Option::is_none"
    )]
    pub disable_ipam: Option<bool>,
    /// The coordinator plugin's settings (over the cluster's SpiderCoordinator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<CoordinatorSpec>,
    /// Further plugins (one JSON object each), chained before the coordinator.
    #[serde(
        default,
        rename = "chainCNIJsonData",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub chain_cni_json_data: Vec<String>,
    /// cniType `custom`: the whole CNI config, verbatim.
    #[serde(default, rename = "customCNI", skip_serializing_if = "Option::is_none")]
    pub custom_cni: Option<String>,
}

/// A SpiderMultusConfig.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpiderMultusConfig {
    /// Always [`API_VERSION`].
    #[serde(default)]
    pub api_version: String,
    /// Always `SpiderMultusConfig`.
    #[serde(default)]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: MultusConfigSpec,
}

fn pools_default(p: &mut Option<SpiderpoolPools>) {
    p.get_or_insert_with(SpiderpoolPools::default);
}

impl SpiderMultusConfig {
    /// A SpiderMultusConfig `namespace/name` with `spec`.
    pub fn new(namespace: &str, name: &str, spec: MultusConfigSpec) -> Self {
        SpiderMultusConfig {
            api_version: API_VERSION.into(),
            kind: "SpiderMultusConfig".into(),
            metadata: ObjectMeta {
                name: name.into(),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec,
        }
    }

    /// Its namespace (`default` when unset).
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// `namespace/name`, as errors and events name it.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace(), self.metadata.name)
    }

    /// The `cniType`, `custom` when unset.
    pub fn cni_type(&self) -> &str {
        self.spec.cni_type.as_deref().unwrap_or("custom")
    }

    /// The name of the NAD it generates: annotation [`CR_NAME`], else its own.
    pub fn nad_name(&self) -> &str {
        self.metadata
            .annotations
            .get(CR_NAME)
            .map(String::as_str)
            .unwrap_or(&self.metadata.name)
    }

    /// The datastore key of the NAD it generates, `namespace/name`.
    pub fn nad_key(&self) -> String {
        format!("{}/{}", self.namespace(), self.nad_name())
    }

    /// Upstream's mutations: the cniType's block and the coordinator get their defaults,
    /// `custom` never chains the coordinator, and the inject annotations become labels. Values
    /// are not checked here.
    pub fn default_spec(&mut self) {
        for key in INJECT_ANNOTATIONS {
            if let Some(v) = self.metadata.annotations.get(key) {
                self.metadata.labels.insert(key.into(), v.clone());
            }
        }
        let s = &mut self.spec;
        let kind = s.cni_type.get_or_insert_with(|| "custom".into()).clone();
        s.disable_ipam.get_or_insert(false);
        if kind == "custom" {
            s.enable_coordinator = Some(false);
            s.coordinator = None;
            return;
        }
        if *s.enable_coordinator.get_or_insert(true) {
            let c = s.coordinator.get_or_insert_with(CoordinatorSpec::default);
            c.mode.get_or_insert_with(|| "auto".into());
            c.tune_pod_routes.get_or_insert(true);
            c.tx_queue_len.get_or_insert(0);
            c.host_rule_table
                .get_or_insert(crate::coordinator::DEFAULT_HOST_RULE_TABLE);
        }
        let master = |m: &mut MasterConfig| {
            m.mtu.get_or_insert(0);
            if let Some(b) = &mut m.bond {
                b.options.get_or_insert_with(String::new);
            }
            pools_default(&mut m.ippools);
        };
        match kind.as_str() {
            "macvlan" | "ipvlan" => {
                let block = if kind == "macvlan" {
                    &mut s.macvlan
                } else {
                    &mut s.ipvlan
                };
                if let Some(m) = block {
                    m.vlan_id.get_or_insert(0);
                    master(m);
                }
            }
            "vlan" => {
                if let Some(m) = &mut s.vlan {
                    if m.vlan_mode.get_or_insert_with(|| "manual".into()) == "manual" {
                        m.vlan_id.get_or_insert(0);
                    }
                    master(m);
                }
            }
            "sriov" => {
                if let Some(c) = &mut s.sriov {
                    c.vlan_id.get_or_insert(0);
                    c.mtu.get_or_insert(0);
                    c.min_tx_rate_mbps.get_or_insert(0);
                    c.max_tx_rate_mbps.get_or_insert(0);
                    c.rdma_isolation.get_or_insert(false);
                    pools_default(&mut c.ippools);
                }
            }
            "ib-sriov" => {
                if let Some(c) = &mut s.ibsriov {
                    c.pkey.get_or_insert_with(String::new);
                    c.link_state.get_or_insert_with(|| "enable".into());
                    c.rdma_isolation.get_or_insert(true);
                    c.enable_ib_kubernetes.get_or_insert(false);
                    pools_default(&mut c.ippools);
                }
            }
            "ipoib" => {
                if let Some(c) = &mut s.ipoib {
                    pools_default(&mut c.ippools);
                }
            }
            "ovs" => {
                if let Some(c) = &mut s.ovs {
                    c.vlan.get_or_insert(0);
                    pools_default(&mut c.ippools);
                }
            }
            _ => {}
        }
    }
}
