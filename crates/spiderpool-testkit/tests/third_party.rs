//! Auto pools for a third party's controller on a real control plane: an OpenKruise-style
//! CloneSet (its CRD written here from Kruise's documented fields; the test plays Kruise's part
//! by creating the pods it would, owned by the CloneSet), the spiderpool-controller carving a
//! pool of the fixed size the pods ask for, the node simulator running their CNI (Debian's
//! macvlan and `spiderpool`), and the pool going when the CloneSet goes.

use serde_json::{json, Value};
use spiderpool_testkit::scale::{ip_count, world};
use spiderpool_testkit::{json_of, running, until, ControlPlane};

const CLONESET_CRD: &str = r#"{"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
  "metadata": {"name": "clonesets.apps.kruise.io"},
  "spec": {"group": "apps.kruise.io", "scope": "Namespaced",
    "names": {"kind": "CloneSet", "plural": "clonesets", "singular": "cloneset", "listKind": "CloneSetList"},
    "versions": [{"name": "v1alpha1", "served": true, "storage": true,
      "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}}"#;

fn annotations(ip_number: &str) -> Value {
    json!({"v1.multus-cni.io/default-network": "kube-system/macvlan-conf",
        "ipam.spidernet.io/subnet": json!({"ipv4": ["subnet-6"]}).to_string(),
        "ipam.spidernet.io/ippool-ip-number": ip_number})
}

fn cloneset(name: &str, ip_number: &str) -> String {
    json!({"apiVersion": "apps.kruise.io/v1alpha1", "kind": "CloneSet",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}, "annotations": annotations(ip_number)},
                "spec": {"containers": [{"name": "c", "image": "registry.invalid/app"}]}}}})
    .to_string()
}

/// A pod as Kruise makes one for the CloneSet `owner` (UID `uid`).
fn pod(name: &str, owner: &str, uid: &str, ip_number: &str) -> String {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": owner},
            "annotations": annotations(ip_number),
            "ownerReferences": [{"apiVersion": "apps.kruise.io/v1alpha1", "kind": "CloneSet",
                "name": owner, "uid": uid, "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"terminationGracePeriodSeconds": 0, "nodeSelector": {"zone": "a"},
            "containers": [{"name": "c", "image": "registry.invalid/app"}]}})
    .to_string()
}

fn uid_of(cp: &ControlPlane, name: &str) -> String {
    json_of(cp, &["get", "clonesets.apps.kruise.io", name])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The CloneSet's live auto pools.
fn pools(cp: &ControlPlane) -> Vec<Value> {
    let v = json_of(
        cp,
        &[
            "get",
            "spiderippools",
            "-l",
            "ipam.spidernet.io/owner-application-kind=CloneSet",
        ],
    );
    v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .collect()
}

fn address(cp: &ControlPlane, pod: &str) -> String {
    until(&format!("pod {pod} running with an address"), || {
        let p = json_of(cp, &["get", "pod", pod]);
        (running(&p) && p["status"]["podIP"].is_string())
            .then(|| p["status"]["podIP"].as_str().unwrap().to_string())
    })
}

fn allocated(pool: &Value) -> u64 {
    pool["status"]["allocatedIPCount"].as_u64().unwrap_or(0)
}

#[test]
fn a_third_party_controllers_pods_get_a_fixed_size_auto_pool_that_goes_with_it() {
    let subnet = json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderSubnet",
        "metadata": {"name": "subnet-6"},
        "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.168.100-10.6.168.149"], "gateway": "10.6.0.1"}})
    .to_string();
    let Some(w) = world("tp", &[subnet]) else {
        return;
    };
    let cp = &w.cp;
    cp.kubectl_ok(&["apply", "-f", "-"], CLONESET_CRD);
    until("the CloneSet CRD served", || {
        cp.kubectl(&["get", "clonesets.apps.kruise.io"], "")
            .success
            .then_some(())
    });
    cp.kubectl_ok(&["apply", "-f", "-"], &cloneset("clone", "3"));
    let uid = uid_of(cp, "clone");
    for n in ["clone-a", "clone-b"] {
        cp.kubectl_ok(&["apply", "-f", "-"], &pod(n, "clone", &uid, "3"));
    }

    // T00002: the pool is carved at the fixed size, whatever the replicas, and its pods take
    // addresses from it.
    let pool = until("the CloneSet's auto pool of 3 IPs", || {
        pools(cp)
            .into_iter()
            .find(|p| ip_count(&p["spec"]["ips"]) == 3)
    });
    let name = pool["metadata"]["name"].as_str().unwrap().to_string();
    let uid5: String = uid.rsplit('-').next().unwrap().chars().take(5).collect();
    assert_eq!(name, format!("auto4-clone-eth0-{uid5}"));
    assert_eq!(pool["spec"]["ips"], json!(["10.6.168.100-10.6.168.102"]));
    let labels = &pool["metadata"]["labels"];
    assert_eq!(
        labels["ipam.spidernet.io/owner-application-gv"],
        "apps.kruise.io_v1alpha1"
    );
    assert_eq!(
        labels["ipam.spidernet.io/owner-application-uid"],
        uid.as_str()
    );
    assert_eq!(
        pool["spec"]["podAffinity"]["matchLabels"]["ipam.spidernet.io/app-api-group"],
        "apps.kruise.io"
    );
    let a = address(cp, "clone-a");
    let b = address(cp, "clone-b");
    assert_ne!(a, b);
    for ip in [&a, &b] {
        assert!(
            ["10.6.168.100", "10.6.168.101", "10.6.168.102"].contains(&ip.as_str()),
            "{ip}"
        );
    }
    // `kubectl describe cloneset clone` tells what was done.
    until("a CreateIPPool event on the CloneSet", || {
        let ev = json_of(
            cp,
            &[
                "get",
                "events",
                "--field-selector",
                "involvedObject.kind=CloneSet,reason=CreateIPPool",
            ],
        );
        ev["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| {
                e["note"]
                    .as_str()
                    .or(e["message"].as_str())
                    .is_some_and(|m| m.contains(&format!("created SpiderIPPool {name} with 3 IPs")))
            })
            .then_some(())
    });

    // With no pod left the pool stays while the CloneSet lives: the controller asks the API
    // for the owner, it does not infer it from the pods.
    cp.kubectl_ok(&["delete", "pod", "clone-a", "clone-b", "--wait=false"], "");
    until("the pool's addresses released", || {
        let p = json_of(cp, &["get", "spiderippool", &name]);
        (allocated(&p) == 0).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    let kept = pools(cp);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(ip_count(&kept[0]["spec"]["ips"]), 3);
    cp.kubectl_ok(&["apply", "-f", "-"], &pod("clone-c", "clone", &uid, "3"));
    let c = address(cp, "clone-c");
    assert!(c.starts_with("10.6.168.10"), "{c}");

    // A third party's pod asking for replicas + N is refused with upstream's answer.
    cp.kubectl_ok(&["apply", "-f", "-"], &cloneset("flex", "+1"));
    let flex = uid_of(cp, "flex");
    cp.kubectl_ok(&["apply", "-f", "-"], &pod("flex-a", "flex", &flex, "+1"));
    let failure = until("pod flex-a fails its CNI ADD", || {
        let p = json_of(cp, &["get", "pod", "flex-a"]);
        p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["reason"] == "CNIFailed")
            .and_then(|c| c["message"].as_str().map(String::from))
    });
    assert!(
        failure.contains("CloneSet/default/flex only supports fixed auto-created IPPool IP Number"),
        "{failure}"
    );

    // T00003: the CloneSet goes and its pods after it (the garbage collector's part): the pool
    // is deleted once they released their addresses, and the subnet has them back.
    cp.kubectl_ok(&["delete", "clonesets.apps.kruise.io", "clone"], "");
    cp.kubectl_ok(&["delete", "pod", "clone-c", "--wait=false"], "");
    until("the CloneSet's pool deleted", || {
        pools(cp).is_empty().then_some(())
    });
    until("the subnet gives nothing", || {
        let sn = json_of(cp, &["get", "spidersubnet", "subnet-6"]);
        (sn["status"]["allocatedIPCount"].as_u64() == Some(0)).then_some(())
    });
}
