//! Each cniType's NAD against the chain upstream generates for the same SpiderMultusConfig
//! (fixtures written from upstream's documented behaviour and its controller's rules: plugin
//! order, keys, defaults), and each webhook rule's message.

use serde_json::{json, Value};

use super::*;

fn smc(metadata: Value, spec: Value) -> SpiderMultusConfig {
    let mut m = metadata;
    m["namespace"] = m.get("namespace").cloned().unwrap_or(json!("kube-system"));
    let mut s: SpiderMultusConfig = serde_json::from_value(json!({
        "apiVersion": API_VERSION, "kind": "SpiderMultusConfig", "metadata": m, "spec": spec}))
    .unwrap();
    s.default_spec();
    s
}

fn config(s: &SpiderMultusConfig) -> Value {
    s.validate().unwrap();
    serde_json::from_str(s.render().unwrap().config.as_deref().unwrap()).unwrap()
}

/// The coordinator plugin of an SMC without a `coordinator` block (upstream's defaults).
fn coordinator() -> Value {
    json!({"type": "coordinator", "mode": "auto", "tunePodRoutes": true, "txQueueLen": 0})
}

#[test]
fn macvlan_on_one_master_is_macvlan_spiderpool_and_the_coordinator() {
    let s = smc(
        json!({"name": "macvlan-ens192"}),
        json!({"cniType": "macvlan", "enableCoordinator": true, "macvlan": {"master": ["ens192"]}}),
    );
    assert_eq!(
        config(&s),
        json!({"cniVersion": "0.3.1", "name": "macvlan-ens192", "plugins": [
            {"type": "macvlan", "master": "ens192", "mode": "bridge", "mtu": 0,
             "ipam": {"type": "spiderpool"}},
            coordinator()]})
    );
    let nad = s.render().unwrap();
    assert_eq!(
        (nad.namespace.as_str(), nad.name.as_str()),
        ("kube-system", "macvlan-ens192")
    );
    let o = nad.to_object("macvlan-ens192", "u-1");
    assert_eq!(
        o["metadata"]["ownerReferences"][0]["kind"],
        "SpiderMultusConfig"
    );
    assert_eq!(o["metadata"]["ownerReferences"][0]["controller"], true);
}

#[test]
fn macvlan_with_a_vlan_pools_coordinator_settings_a_name_and_a_chained_plugin() {
    let s = smc(
        json!({"name": "mv", "namespace": "ns1", "annotations": {
            CR_NAME: "mv-nad", CNI_VERSION: "1.0.0",
            "kubectl.kubernetes.io/last-applied-configuration": "{}"}}),
        json!({"cniType": "macvlan",
            "macvlan": {"master": ["ens192"], "vlanID": 100,
                "ippools": {"ipv4": ["v4pool"], "ipv6": ["v6pool"]}},
            "coordinator": {"podDefaultRouteNIC": "net1", "podMACPrefix": "0a:1b",
                "policyRoutes": [{"dst": "10.10.0.0/16", "gw": "172.18.0.1"}]},
            "chainCNIJsonData": [r#"{"type":"tuning","sysctl":{"net.core.somaxconn":"4096"}}"#]}),
    );
    assert_eq!(
        config(&s),
        json!({"cniVersion": "1.0.0", "name": "mv-nad", "plugins": [
            {"vlanID": 100, "type": "ifacer", "interfaces": ["ens192"]},
            {"type": "macvlan", "master": "ens192.100", "mode": "bridge", "mtu": 0,
             "ipam": {"type": "spiderpool", "default_ipv4_ippool": ["v4pool"],
                      "default_ipv6_ippool": ["v6pool"]}},
            {"sysctl": {"net.core.somaxconn": "4096"}, "type": "tuning"},
            {"txQueueLen": 0, "tunePodRoutes": true, "podMACPrefix": "0a:1b", "mode": "auto",
             "type": "coordinator", "podDefaultRouteNic": "net1",
             "policyRoutes": [{"dst": "10.10.0.0/16", "gw": "172.18.0.1"}]}]})
    );
    let nad = s.render().unwrap();
    assert_eq!(
        (nad.namespace.as_str(), nad.name.as_str()),
        ("ns1", "mv-nad")
    );
    // The SMC's annotations, without kubectl's record of the SMC.
    assert_eq!(
        nad.annotations.get(CR_NAME).map(String::as_str),
        Some("mv-nad")
    );
    assert!(!nad
        .annotations
        .contains_key("kubectl.kubernetes.io/last-applied-configuration"));
}

#[test]
fn a_bond_of_two_masters_is_made_by_ifacer_and_is_the_master() {
    let s = smc(
        json!({"name": "bonded"}),
        json!({"cniType": "macvlan", "enableCoordinator": false,
            "macvlan": {"master": ["ens192", "ens224"], "vlanID": 100,
                "bond": {"name": "bond0", "mode": 1}}}),
    );
    assert_eq!(
        config(&s)["plugins"],
        json!([
            {"vlanID": 100, "type": "ifacer", "interfaces": ["ens192", "ens224"],
             "bond": {"name": "bond0", "mode": 1, "options": ""}},
            {"type": "macvlan", "master": "bond0.100", "mode": "bridge", "mtu": 0,
             "ipam": {"type": "spiderpool"}}])
    );
}

#[test]
fn ipvlan_and_vlan_take_their_own_keys() {
    let s = smc(
        json!({"name": "iv"}),
        json!({"cniType": "ipvlan", "disableIPAM": true, "ipvlan": {"master": ["ens192"], "mtu": 1400}}),
    );
    assert_eq!(
        config(&s)["plugins"],
        json!([{"type": "ipvlan", "master": "ens192", "mtu": 1400}, coordinator()])
    );
    let s = smc(
        json!({"name": "vl"}),
        json!({"cniType": "vlan", "vlan": {"master": ["ens192"], "vlanID": 100}}),
    );
    assert_eq!(
        config(&s)["plugins"][0],
        json!({"type": "vlan", "master": "ens192", "vlanMode": "manual", "vlanId": 100,
               "mtu": 0, "ipam": {"type": "spiderpool"}})
    );
    let s = smc(
        json!({"name": "vl"}),
        json!({"cniType": "vlan", "vlan": {"master": ["ens192"], "vlanMode": "auto"}}),
    );
    assert_eq!(
        config(&s)["plugins"][0],
        json!({"type": "vlan", "master": "ens192", "vlanMode": "auto", "mtu": 0,
               "ipam": {"type": "spiderpool"}})
    );
}

#[test]
fn sriov_chains_rdma_the_coordinator_then_tuning_and_names_its_resource() {
    let s = smc(
        json!({"name": "sriov-rdma"}),
        json!({"cniType": "sriov", "sriov": {"resourceName": "spidernet.io/mellanoxrdma",
            "vlanID": 100, "mtu": 8000, "rdmaIsolation": true,
            "ippools": {"ipv4": ["rdmarail1-*"], "matchMasterSubnet": true}}}),
    );
    assert_eq!(
        config(&s),
        json!({"cniVersion": "0.3.1", "name": "sriov-rdma", "plugins": [
            {"vlan": 100, "min_tx_rate": 0, "max_tx_rate": 0, "type": "sriov",
             "ipam": {"type": "spiderpool", "default_ipv4_ippool": ["rdmarail1-*"],
                      "match_master_subnet": true}},
            {"type": "rdma"},
            coordinator(),
            {"type": "tuning", "mtu": 8000}]})
    );
    let nad = s.render().unwrap();
    assert_eq!(
        nad.annotations
            .get("k8s.v1.cni.cncf.io/resourceName")
            .map(String::as_str),
        Some("spidernet.io/mellanoxrdma")
    );
}

#[test]
fn ib_sriov_ipoib_and_ovs_take_their_own_keys() {
    let s = smc(
        json!({"name": "ib"}),
        json!({"cniType": "ib-sriov", "enableCoordinator": false,
            "ibsriov": {"resourceName": "mellanox.com/ib"}}),
    );
    assert_eq!(
        config(&s)["plugins"],
        json!([{"type": "ib-sriov", "pkey": "", "link_state": "enable", "rdmaIsolation": true,
                "ibKubernetesEnabled": false, "ipam": {"type": "spiderpool"}}])
    );
    assert_eq!(
        s.render().unwrap().annotations["k8s.v1.cni.cncf.io/resourceName"],
        "mellanox.com/ib"
    );
    let s = smc(
        json!({"name": "ipoib"}),
        json!({"cniType": "ipoib", "enableCoordinator": false,
            "ipoib": {"master": "ibs5f0", "ippools": {"ipv4": ["ib-v4"]}}}),
    );
    assert_eq!(
        config(&s)["plugins"],
        json!([{"type": "ipoib", "master": "ibs5f0",
                "ipam": {"type": "spiderpool", "default_ipv4_ippool": ["ib-v4"]}}])
    );
    let s = smc(
        json!({"name": "ovs"}),
        json!({"cniType": "ovs", "ovs": {"bridge": "br1", "deviceID": "0000:af:00.1",
            "trunk": [{"minID": 10, "maxID": 20}, {"id": 42}]}}),
    );
    assert_eq!(
        config(&s)["plugins"],
        json!([{"vlan": 0, "type": "ovs", "bridge": "br1", "deviceID": "0000:af:00.1",
                "ipam": {"type": "spiderpool"},
                "trunk": [{"minID": 10, "maxID": 20}, {"id": 42}]},
               coordinator()])
    );
    assert_eq!(
        s.render().unwrap().annotations["k8s.v1.cni.cncf.io/resourceName"],
        "ovs-cni.network.kubevirt.io/br1"
    );
}

#[test]
fn custom_is_the_config_verbatim_without_the_coordinator() {
    let text = r#"{"cniVersion":"0.3.1","name":"x","type":"bridge"}"#;
    let s = smc(
        json!({"name": "c", "annotations": {CNI_CONFIG_NAME: "ignored"}}),
        json!({"customCNI": text, "chainCNIJsonData": [r#"{"type":"tuning"}"#]}),
    );
    assert_eq!(s.cni_type(), "custom");
    assert_eq!(s.spec.enable_coordinator, Some(false));
    s.validate().unwrap();
    assert_eq!(s.render().unwrap().config.as_deref(), Some(text));
    let empty = smc(json!({"name": "c"}), json!({"cniType": "custom"}));
    assert_eq!(empty.render().unwrap().config, None);
}

#[test]
fn the_conf_name_annotation_names_the_chain_and_inject_annotations_become_labels() {
    let s = smc(
        json!({"name": "m", "annotations": {CNI_CONFIG_NAME: "chain-a",
            "cni.spidernet.io/rdma-resource-inject": "group-a"}}),
        json!({"cniType": "macvlan", "macvlan": {"master": ["ens192"],
            "rdmaResourceName": "spidernet.io/rdma", "ippools": {"ipv4": ["p"]}}}),
    );
    assert_eq!(config(&s)["name"], "chain-a");
    assert_eq!(
        s.metadata
            .labels
            .get("cni.spidernet.io/rdma-resource-inject")
            .map(String::as_str),
        Some("group-a")
    );
}

#[test]
fn each_rule_names_the_field_and_value() {
    let cases = [
        (json!({}), json!({"cniType": "bridge"}), "spec.cniType \"bridge\" is not supported"),
        (json!({}), json!({"cniType": "macvlan"}), "spec.macvlan is required"),
        (json!({}), json!({"cniType": "macvlan", "macvlan": {"master": ["a"]}, "sriov": {}}),
            "spec.sriov is forbidden: the cniType macvlan only supports spec.macvlan, please remove other CNI configs"),
        (json!({}), json!({"cniType": "macvlan", "macvlan": {"master": ["a"], "vlanID": 4095}}),
            "spec.macvlan.vlanID \"4095\" is invalid: invalid vlanId 4095, please make sure vlanId in range [0,4094]"),
        (json!({}), json!({"cniType": "ipvlan", "ipvlan": {"master": ["a"], "mtu": -1}}),
            "spec.ipvlan.mtu \"-1\" is invalid: MTU must be greater than or equal to 0"),
        (json!({}), json!({"cniType": "macvlan", "macvlan": {"master": ["a"], "ippools": {"matchMasterSubnet": true}}}),
            "MatchMasterSubnet feature is not supported for macvlan"),
        (json!({}), json!({"cniType": "macvlan", "macvlan": {"master": []}}), "master can't be empty"),
        (json!({}), json!({"cniType": "macvlan", "macvlan": {"master": ["a", "b"]}}),
            "spec.macvlan.master \"a,b\" is invalid: the bond property is nil with multiple Interfaces"),
        (json!({}), json!({"cniType": "macvlan", "macvlan": {"master": ["a", "b"], "bond": {"name": "", "mode": 1}}}),
            "bond name can't be empty"),
        (json!({}), json!({"cniType": "macvlan", "macvlan": {"master": ["a", "b"], "bond": {"name": "b0", "mode": 7}}}),
            "spec.macvlan.bond.mode \"7\""),
        (json!({}), json!({"cniType": "vlan", "vlan": {"master": ["a"], "vlanMode": "auto", "vlanID": 5}}),
            "vlanId must not be specified when vlanMode is auto"),
        (json!({}), json!({"cniType": "vlan", "vlan": {"master": ["a"], "vlanMode": "trunk"}}),
            "spec.vlan.vlanMode \"trunk\" is invalid: invalid vlanMode trunk, supported values are manual and auto"),
        (json!({}), json!({"cniType": "sriov", "sriov": {}}), "spec.sriov.resourceName is required"),
        (json!({}), json!({"cniType": "sriov", "sriov": {"resourceName": "r", "minTxRateMbps": 100, "maxTxRateMbps": 10}}),
            "spec.sriov.minTxRateMbps \"100\" is invalid: minTxRateMbps must be less than maxTxRateMbps"),
        (json!({}), json!({"cniType": "ib-sriov", "ibsriov": {}}), "spec.ibsriov.resourceName is required"),
        (json!({}), json!({"cniType": "ib-sriov", "ibsriov": {"resourceName": "r", "linkState": "up"}}),
            "spec.ibsriov.linkState \"up\" is not supported"),
        (json!({}), json!({"cniType": "ipoib", "ipoib": {}}), "spec.ipoib.master is required"),
        (json!({}), json!({"cniType": "ovs", "ovs": {"bridge": "br", "trunk": [{"minID": 20, "maxID": 10}]}}),
            "spec.ovs.trunk[0] \"{\\\"minID\\\":20,\\\"maxID\\\":10}\" is invalid: minID is greater than maxID in trunk parameter"),
        (json!({}), json!({"cniType": "ovs", "ovs": {"bridge": "br", "trunk": [{"id": 5000}]}}),
            "incorrect trunk id parameter"),
        (json!({"annotations": {"cni.spidernet.io/rdma-resource-inject": "g"}}), json!({"cniType": "ovs", "ovs": {"bridge": "br"}}),
            "the cniType ovs does not support RDMA resource or network resource injected"),
        (json!({}), json!({"cniType": "custom", "customCNI": "{nope"}),
            "spec.customCNI \"{nope\" is invalid: customCniConfig isn't a valid JSON encoding"),
        (json!({}), json!({"cniType": "custom", "customCNI": "{}", "macvlan": {"master": ["a"]}}),
            "the cniType custom only supports spec.customCNI"),
        (json!({"annotations": {"cni.spidernet.io/rdma-resource-inject": "g"}}), json!({"cniType": "macvlan", "macvlan": {"master": ["a"]}}),
            "rdmaResourceName can not empty for spidermultusconfig kube-system/x"),
        (json!({"annotations": {"cni.spidernet.io/rdma-resource-inject": "g"}}), json!({"cniType": "macvlan", "macvlan": {"master": ["a"], "rdmaResourceName": "r"}}),
            "no any ippools configured for spidermultusconfig kube-system/x"),
        (json!({"annotations": {CNI_VERSION: "0.2.0"}}), json!({"cniType": "macvlan", "macvlan": {"master": ["a"]}}),
            "metadata.annotations[multus.spidernet.io/cni-version] \"0.2.0\" is invalid: unsupported CNI version"),
        (json!({"annotations": {CR_NAME: "Bad_Name"}}), json!({"cniType": "macvlan", "macvlan": {"master": ["a"]}}),
            "invalid custom net-attach-def resource name"),
        (json!({}), json!({"cniType": "macvlan", "macvlan": {"master": ["a"]}, "chainCNIJsonData": ["{\"sysctl\":{}}"]}),
            "spec.chainCNIJsonData[0] \"{\\\"sysctl\\\":{}}\" is not a CNI plugin config: missing 'type'"),
        (json!({}), json!({"cniType": "macvlan", "macvlan": {"master": ["a"]}, "coordinator": {"podMACPrefix": "01:00"}}),
            "spec.coordinator.podMACPrefix \"01:00\" is not a unicast MAC"),
        (json!({}), json!({"cniType": "macvlan", "macvlan": {"master": ["a"]}, "coordinator": {"mode": "bridge"}}),
            "spec.coordinator.mode \"bridge\" is not supported"),
    ];
    for (mut meta, spec, want) in cases {
        meta["name"] = json!("x");
        let got = smc(meta.clone(), spec.clone())
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            got.starts_with("SpiderMultusConfig \"kube-system/x\": ") && got.contains(want),
            "{meta} {spec}: {got}"
        );
    }
}

#[test]
fn the_nad_name_cannot_be_set_or_changed_on_update_but_may_be_removed() {
    let spec = json!({"cniType": "macvlan", "macvlan": {"master": ["a"]}});
    let plain = smc(json!({"name": "m"}), spec.clone());
    let named = |n: &str| {
        smc(
            json!({"name": "m", "annotations": {CR_NAME: n}}),
            spec.clone(),
        )
    };
    let e = named("n1").validate_update(&plain).unwrap_err().to_string();
    assert!(
        e.contains("it's unsupported to changed Multus net-attach-def 'm' to customized name 'n1'"),
        "{e}"
    );
    let e = named("n2")
        .validate_update(&named("n1"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("from 'n1' to 'n2'"), "{e}");
    plain.validate_update(&named("n1")).unwrap();
    named("n1").validate_update(&named("n1")).unwrap();
}
