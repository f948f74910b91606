//! A live cluster moves from upstream Spiderpool, the steps of docs/migration.md in order: the
//! cluster starts in the state upstream leaves it (its SpiderEndpoint CRD, pools' holders of pod
//! and pod UID only, endpoints without container IDs and with upstream's finalizer, a leaked
//! record, a KubeVirt VM's address keyed by its VMI), `migrate check` names what blocks, the
//! project's CRDs go in, its agent and controller take over, and then: running pods keep their
//! addresses, a StatefulSet member keeps its address across a new incarnation, a DEL of a pod
//! upstream served releases it and its endpoint goes, the reclaim frees only the dead pod's
//! address, the VM's stays, and new pods never get an address upstream handed out.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use spiderpool_testkit::{
    bin, is_root, json_of, kube_bin, kube_node, macvlan_nad, running, until, zones, Agent,
    ControlPlane, Controller,
};

const EP_CRD: &str = "spiderendpoints.spiderpool.spidernet.io";

fn pod(name: &str) -> String {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "annotations": {
            "v1.multus-cni.io/default-network": "kube-system/macvlan-conf",
            "ipam.spidernet.io/ippool": json!({"ipv4": ["p6"]}).to_string()}},
        "spec": {"nodeName": "n1", "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": "registry.invalid/app"}]}})
    .to_string()
}

/// The pool's holders as stored: address → holder record.
fn holders(cp: &ControlPlane) -> BTreeMap<String, Value> {
    let p = json_of(cp, &["get", "spiderippool", "p6"]);
    p["status"]["allocatedIPs"]
        .as_str()
        .map(|t| serde_json::from_str(t).unwrap())
        .unwrap_or_default()
}

fn pod_ip(cp: &ControlPlane, name: &str) -> String {
    until(&format!("{name} running with an address"), || {
        let p = json_of(cp, &["get", "pod", name]);
        (running(&p) && p["status"]["podIP"].is_string())
            .then(|| p["status"]["podIP"].as_str().unwrap().to_string())
    })
}

fn ctl(cp: &ControlPlane, args: &[&str]) -> spiderpool_testkit::Output {
    let mut a = vec![
        "--datastore",
        "kubernetes",
        "--kubeconfig",
        cp.kubeconfig.to_str().unwrap(),
    ];
    a.extend_from_slice(args);
    spiderpool_testkit::run(
        std::process::Command::new(bin("spiderpoolctl")).args(&a),
        "",
    )
}

#[test]
fn a_live_cluster_moves_from_upstream_without_losing_an_address() {
    let Some(kbin) = kube_bin() else { return };
    if !is_root() {
        eprintln!("SKIPPED: needs root for network namespaces");
        return;
    }
    let cp = ControlPlane::start(&kbin, true);
    cp.install_crds();
    let _zones = zones("mig", &[("mig-n1", "10.6.0.1/16")]);
    cp.kubectl_ok(&["apply", "-f", "-"], &macvlan_nad());
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
            "metadata": {"name": "p6"},
            "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.0.10-10.6.0.30"], "gateway": "10.6.0.1"}})
        .to_string(),
    );
    // KubeVirt's VMI kind, and a VM that runs.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "virtualmachineinstances.kubevirt.io"},
            "spec": {"group": "kubevirt.io", "scope": "Namespaced",
                "names": {"kind": "VirtualMachineInstance", "plural": "virtualmachineinstances",
                    "singular": "virtualmachineinstance", "shortNames": ["vmi"]},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object",
                        "x-kubernetes-preserve-unknown-fields": true}}}]}})
        .to_string(),
    );
    until("the VMI kind served", || {
        cp.kubectl(&["get", "vmi"], "").success.then_some(())
    });
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm1", "namespace": "default"}, "spec": {}})
        .to_string(),
    );

    // Pods served before the move (here by this project's agent; their records are turned into
    // upstream's below): two that keep running, one to be deleted, a StatefulSet member.
    let mut n1 = kube_node(&cp, "n1", &[("zone", "a")], "mig-n1", &[]);
    for name in ["keep-a", "keep-b", "leaving"] {
        cp.kubectl_ok(&["apply", "-f", "-"], &pod(name));
    }
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"replicas": 1, "serviceName": "db",
                "selector": {"matchLabels": {"app": "db"}},
                "template": {"metadata": {"labels": {"app": "db"}, "annotations": {
                        "v1.multus-cni.io/default-network": "kube-system/macvlan-conf",
                        "ipam.spidernet.io/ippool": json!({"ipv4": ["p6"]}).to_string()}},
                    "spec": {"nodeName": "n1", "terminationGracePeriodSeconds": 1,
                        "containers": [{"name": "c", "image": "registry.invalid/db"}]}}}})
        .to_string(),
    );
    let before: BTreeMap<&str, String> = ["keep-a", "keep-b", "leaving", "db-0"]
        .into_iter()
        .map(|n| (n, pod_ip(&cp, n)))
        .collect();

    // Upstream's state: its agent gone, its records (pool holders of pod and pod UID only;
    // endpoints without container IDs, with its finalizer), a record it leaked for a pod that
    // is gone, the VM's address keyed by the VMI, and its SpiderEndpoint CRD.
    n1.agent.kill();
    let mut records: BTreeMap<String, Value> = holders(&cp)
        .into_iter()
        .map(|(ip, h)| (ip, json!({"pod": h["pod"], "podUid": h["podUid"]})))
        .collect();
    records.insert(
        "10.6.0.29".into(),
        json!({"pod": "default/ghost", "podUid": "9a000000-0000-4000-8000-000000000001"}),
    );
    records.insert(
        "10.6.0.30".into(),
        json!({"pod": "default/vm1", "podUid": "9a000000-0000-4000-8000-000000000002"}),
    );
    let upstream_held: Vec<String> = records.keys().cloned().collect();
    let patch = json!({"status": {"allocatedIPs": serde_json::to_string(&records).unwrap(),
        "allocatedIPCount": records.len()}});
    cp.kubectl_ok(
        &[
            "patch",
            "spiderippool",
            "p6",
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ],
        "",
    );
    let eps = json_of(&cp, &["get", "spiderendpoints"]);
    for ep in eps["items"].as_array().unwrap() {
        let mut ep = ep.clone();
        for nic in ep["status"]["current"]["ips"].as_array_mut().unwrap() {
            let nic = nic.as_object_mut().unwrap();
            nic.remove("containerID");
            nic.remove("network");
        }
        ep["metadata"]["finalizers"] = json!(["spiderpool.spidernet.io"]);
        cp.kubectl_ok(&["replace", "-f", "-"], &ep.to_string());
    }
    for (name, uid, ip) in [
        (
            "ghost",
            "9a000000-0000-4000-8000-000000000001",
            "10.6.0.29/16",
        ),
        (
            "vm1",
            "9a000000-0000-4000-8000-000000000002",
            "10.6.0.30/16",
        ),
    ] {
        cp.kubectl_ok(
            &["create", "-f", "-"],
            &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderEndpoint",
                "metadata": {"name": name, "namespace": "default",
                    "finalizers": ["spiderpool.spidernet.io"]},
                "status": {"current": {"uid": uid, "node": "n1", "ips": [
                    {"interface": "eth0", "ipv4": ip, "ipv4Pool": "p6", "ipv4Gateway": "10.6.0.1",
                     "vlan": 0, "cleanGateway": false}]},
                    "ownerControllerType": "Pod", "ownerControllerName": name}})
            .to_string(),
        );
    }
    let mut crd = json_of(&cp, &["get", "crd", EP_CRD]);
    for v in crd["spec"]["versions"].as_array_mut().unwrap() {
        let props = v
            .pointer_mut("/schema/openAPIV3Schema/properties/status/properties/current/properties/ips/items/properties")
            .and_then(Value::as_object_mut)
            .unwrap();
        props.remove("containerID");
        props.remove("network");
    }
    let rv = crd["metadata"]["resourceVersion"].clone();
    crd["metadata"] = json!({"name": EP_CRD, "resourceVersion": rv});
    cp.kubectl_ok(&["replace", "-f", "-"], &crd.to_string());

    // 0. migrate check names what blocks: upstream's CRD.
    let out = ctl(&cp, &["migrate", "check", "-o", "json"]);
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    let ids: Vec<String> = out.json()["hazards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["endpoint-crd", "kubevirt-vmi"], "{}", out.stdout);
    // 2. The project's CRDs over upstream's; 4. its agent and controller take over.
    cp.install_crds();
    let out = ctl(&cp, &["migrate", "check"]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let socket = n1.agent.socket.clone();
    n1.agent = Agent::on_cluster(&cp, &socket, "n1", &[]);
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start(
        &cp,
        dir.path(),
        "ctl-a",
        &[
            "--gc-interval",
            "2s",
            "--gc-grace-delay",
            "1s",
            "--gc-trace-gap",
            "1s",
        ],
    );

    // Running pods keep their addresses, as upstream recorded them.
    for name in ["keep-a", "keep-b", "leaving"] {
        assert_eq!(pod_ip(&cp, name), before[name]);
    }
    // The pod upstream leaked for is reclaimed; the VM's address stays.
    until("the leaked address reclaimed", || {
        (!holders(&cp).contains_key("10.6.0.29")).then_some(())
    });
    assert!(!cp.kubectl(&["get", "spiderendpoint", "ghost"], "").success);
    let held = holders(&cp);
    assert_eq!(
        held["10.6.0.30"]["pod"],
        "default/vm1",
        "{}",
        controller.log()
    );
    for name in ["keep-a", "keep-b", "leaving", "db-0"] {
        assert!(
            held.contains_key(&before[name]),
            "{name}'s address went: {held:?}\n{}",
            controller.log()
        );
    }
    // A pod upstream served is deleted: its DEL releases the address, its endpoint goes.
    cp.kubectl_ok(&["delete", "pod", "leaving", "--wait=true"], "");
    until("leaving's address released", || {
        (!holders(&cp).contains_key(&before["leaving"])).then_some(())
    });
    until("leaving's endpoint gone, not Terminating", || {
        (!cp.kubectl(&["get", "spiderendpoint", "leaving"], "")
            .success)
            .then_some(())
    });
    // The StatefulSet member's next incarnation keeps its address.
    cp.kubectl_ok(&["delete", "pod", "db-0", "--wait=true"], "");
    assert_eq!(pod_ip(&cp, "db-0"), before["db-0"]);
    // New pods never get an address upstream handed out.
    for name in ["fresh-1", "fresh-2", "fresh-3"] {
        cp.kubectl_ok(&["apply", "-f", "-"], &pod(name));
        let ip = pod_ip(&cp, name);
        assert!(
            !upstream_held.contains(&ip) || ip == before["leaving"] || ip == "10.6.0.29",
            "{name} got {ip}, which upstream handed out and is still in use"
        );
        for (n, old) in &before {
            if *n != "leaving" {
                assert_ne!(&ip, old, "{name} got {n}'s address");
            }
        }
        assert_ne!(ip, "10.6.0.30", "{name} got the VM's address");
    }
    // Nothing is inconsistent afterwards.
    let out = ctl(&cp, &["ipam", "check"]);
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    drop(controller);
}
