//! SpiderMultusConfig outside a cluster, as a user runs `spiderpoolctl`: apply writes the
//! generated NetworkAttachmentDefinition with it (one transaction), a change rewrites it, delete
//! removes both, a NAD the SpiderMultusConfig does not own is never overwritten, and a bad
//! SpiderMultusConfig is refused by field and value with nothing written.

use serde_json::json;
use spiderpool_testkit::Sandbox;

fn smc(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderMultusConfig\nmetadata: {{name: {name}, namespace: kube-system}}\nspec: {spec}\n"
    )
}

#[test]
fn apply_writes_the_generated_nad_and_delete_removes_it() {
    let sb = Sandbox::new();
    let out = sb.ctl(
        &["apply", "-f", "-"],
        &smc(
            "macvlan-conf",
            "{cniType: macvlan, macvlan: {master: [ens192]}}",
        ),
    );
    assert!(out.success, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "spidermultusconfig.spiderpool.spidernet.io/macvlan-conf created\n"
    );
    assert_eq!(
        sb.ctl(&["get", "smc", "-n", "kube-system"], "").stdout,
        "NAMESPACE     NAME           CNITYPE   COORDINATOR\nkube-system   macvlan-conf   macvlan   true\n"
    );
    let stored = sb.get_json("smc", "kube-system/macvlan-conf");
    let nad = sb.get_json("net-attach-def", "kube-system/macvlan-conf");
    assert_eq!(
        nad["metadata"]["ownerReferences"][0]["uid"],
        stored["metadata"]["uid"]
    );
    let config: serde_json::Value =
        serde_json::from_str(nad["spec"]["config"].as_str().unwrap()).unwrap();
    assert_eq!(
        config,
        json!({"cniVersion": "0.3.1", "name": "macvlan-conf", "plugins": [
            {"type": "macvlan", "master": "ens192", "mode": "bridge", "mtu": 0,
             "ipam": {"type": "spiderpool"}},
            {"type": "coordinator", "mode": "auto", "tunePodRoutes": true, "txQueueLen": 0}]})
    );

    // A change rewrites the NAD.
    let out = sb.ctl(
        &["apply", "-f", "-"],
        &smc(
            "macvlan-conf",
            "{cniType: macvlan, enableCoordinator: false, macvlan: {master: [ens192], ippools: {ipv4: [zone-6]}}}",
        ),
    );
    assert!(out.success, "{}", out.stderr);
    let nad = sb.get_json("net-attach-def", "kube-system/macvlan-conf");
    let config: serde_json::Value =
        serde_json::from_str(nad["spec"]["config"].as_str().unwrap()).unwrap();
    assert_eq!(
        config["plugins"],
        json!([{"type": "macvlan", "master": "ens192", "mode": "bridge", "mtu": 0,
            "ipam": {"type": "spiderpool", "default_ipv4_ippool": ["zone-6"]}}])
    );

    // A NAD written by hand is never overwritten: the apply is refused and nothing is written.
    let by_hand = "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata: {name: handmade, namespace: kube-system}\nspec: {config: '{\"type\":\"bridge\"}'}\n";
    assert!(sb.ctl(&["apply", "-f", "-"], by_hand).success);
    let out = sb.ctl(
        &["apply", "-f", "-"],
        &smc("handmade", "{cniType: ipvlan, ipvlan: {master: [ens224]}}"),
    );
    assert!(!out.success);
    assert!(
        out.stderr.contains("NetworkAttachmentDefinition \"kube-system/handmade\" exists and is not this SpiderMultusConfig's"),
        "{}",
        out.stderr
    );
    assert!(!sb.ctl(&["get", "smc", "kube-system/handmade"], "").success);
    assert_eq!(
        sb.get_json("net-attach-def", "kube-system/handmade")["spec"]["config"],
        "{\"type\":\"bridge\"}"
    );

    // A bad SMC is refused by field and value.
    let out = sb.ctl(
        &["apply", "-f", "-"],
        &smc("bad", "{cniType: macvlan, macvlan: {master: [a, b]}}"),
    );
    assert!(
        out.stderr.contains("SpiderMultusConfig \"kube-system/bad\": spec.macvlan.master \"a,b\" is invalid: the bond property is nil with multiple Interfaces"),
        "{}",
        out.stderr
    );

    // Delete removes the SMC and its NAD; the NAD written by hand stays.
    assert!(
        sb.ctl(&["delete", "smc", "kube-system/macvlan-conf"], "")
            .success
    );
    assert!(
        !sb.ctl(&["get", "net-attach-def", "kube-system/macvlan-conf"], "")
            .success
    );
    assert!(
        sb.ctl(&["get", "net-attach-def", "kube-system/handmade"], "")
            .success
    );
}
