//! Workloads that keep their addresses, on a real control plane (kube-controller-manager runs
//! the StatefulSet controller; a simulated node runs the pods' CNI chain with macvlan and the
//! `spiderpool` plugin, its agent on `--datastore kubernetes`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};
use spiderpool_testkit::{
    is_root, json_of, kube_bin, kube_node, macvlan_nad, running, until, zones, ControlPlane,
};

fn statefulset(replicas: i64) -> String {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"replicas": replicas, "ordinals": {"start": 5}, "serviceName": "web",
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}, "annotations": {
                    "v1.multus-cni.io/default-network": "kube-system/macvlan-conf",
                    "ipam.spidernet.io/ippool": json!({"ipv4": ["p6"]}).to_string()}},
                "spec": {"terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "c", "image": "registry.invalid/web"}]}}}})
    .to_string()
}

/// The StatefulSet's running pods with an address: name → (address, pod UID).
fn members(cp: &ControlPlane) -> BTreeMap<String, (String, String)> {
    let pods = json_of(cp, &["get", "pods", "-l", "app=web"]);
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| running(p) && p["status"]["podIP"].is_string())
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                (
                    p["status"]["podIP"].as_str().unwrap().to_string(),
                    p["metadata"]["uid"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

fn all_running(cp: &ControlPlane, names: &[&str]) -> BTreeMap<String, (String, String)> {
    until(&format!("{names:?} running with addresses"), || {
        let m = members(cp);
        (m.len() == names.len() && names.iter().all(|n| m.contains_key(*n))).then_some(m)
    })
}

fn allocated(cp: &ControlPlane) -> u64 {
    json_of(cp, &["get", "spiderippool", "p6"])["status"]["allocatedIPCount"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn a_statefulset_with_ordinals_from_5_keeps_its_addresses_and_gets_them_back_after_scaling_to_zero()
{
    let Some(kbin) = kube_bin() else { return };
    if !is_root() {
        eprintln!("SKIPPED: needs root for network namespaces");
        return;
    }
    let cp = ControlPlane::start(&kbin, true);
    cp.install_crds();
    let _zones = zones("wl", &[("wl-n1", "10.6.0.1/16")]);
    cp.kubectl_ok(&["apply", "-f", "-"], &macvlan_nad());
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
            "metadata": {"name": "p6"},
            "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.0.10-10.6.0.40"], "gateway": "10.6.0.1"}})
        .to_string(),
    );
    let _n1 = kube_node(&cp, "n1", &[], "wl-n1", &[]);
    cp.kubectl_ok(&["apply", "-f", "-"], &statefulset(3));
    let names = ["web-5", "web-6", "web-7"];
    let first = all_running(&cp, &names);
    let addresses: BTreeSet<String> = first.values().map(|(ip, _)| ip.clone()).collect();
    assert_eq!(addresses.len(), 3, "{first:?}");

    // web-6 is deleted and its StatefulSet makes it again: ordinal 6 is a member (5, 6, 7),
    // so the same record carries the address over to the new incarnation.
    let record = |name: &str| json_of(&cp, &["get", "spiderendpoint", name]);
    let before = record("web-6");
    cp.kubectl_ok(&["delete", "pod", "web-6", "--wait=false"], "");
    let again = until("web-6 again, a new incarnation", || {
        let m = all_running(&cp, &names);
        (m["web-6"].1 != first["web-6"].1).then_some(m)
    });
    assert_eq!(again["web-6"].0, first["web-6"].0, "web-6 kept its address");
    let after = record("web-6");
    assert_eq!(
        after["metadata"]["uid"], before["metadata"]["uid"],
        "the member's record was kept, not made again: {after}"
    );
    assert_eq!(
        after["status"]["current"]["uid"].as_str(),
        Some(again["web-6"].1.as_str())
    );
    assert_eq!(allocated(&cp), 3);

    // Scaled to none: no member is left, every address goes back and every record goes.
    cp.kubectl_ok(&["scale", "statefulset", "web", "--replicas=0"], "");
    until("the pool empty and no records left", || {
        let records = json_of(&cp, &["get", "spiderendpoints"]);
        (allocated(&cp) == 0
            && members(&cp).is_empty()
            && records["items"].as_array().is_some_and(Vec::is_empty))
        .then_some(())
    });

    // Scaled back to three: the same three addresses (nobody else took them meanwhile).
    cp.kubectl_ok(&["scale", "statefulset", "web", "--replicas=3"], "");
    let back = all_running(&cp, &names);
    let back_addresses: BTreeSet<String> = back.values().map(|(ip, _)| ip.clone()).collect();
    assert_eq!(back_addresses, addresses, "{back:?}");
    let sts: Value = json_of(&cp, &["get", "statefulset", "web"]);
    assert_eq!(sts["spec"]["ordinals"]["start"], 5);
}
