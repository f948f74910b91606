//! SpiderMultusConfig on a real control plane, through kubectl: the controller's webhooks fill
//! in upstream's defaults and refuse what upstream refuses, and its leader keeps one
//! NetworkAttachmentDefinition per SpiderMultusConfig, owned by it: rewritten when the
//! SpiderMultusConfig changes, put back after a hand edit or a deletion, deleted with its owner
//! by the garbage collector; a NAD the SpiderMultusConfig does not own is left alone, with an
//! Event saying so.

use serde_json::{json, Value};
use spiderpool_testkit::{json_of, kube_bin, until, ControlPlane, Controller};

fn smc(name: &str, annotations: Value, spec: Value) -> String {
    json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderMultusConfig",
        "metadata": {"name": name, "namespace": "kube-system", "annotations": annotations},
        "spec": spec})
    .to_string()
}

/// The NAD `name` of kube-system, if it exists.
fn nad(cp: &ControlPlane, name: &str) -> Option<Value> {
    let out = cp.kubectl(
        &[
            "get",
            "network-attachment-definitions.k8s.cni.cncf.io",
            "-n",
            "kube-system",
            name,
            "-o",
            "json",
        ],
        "",
    );
    out.success
        .then(|| serde_json::from_str(&out.stdout).expect("kubectl's JSON"))
}

fn config(nad: &Value) -> Value {
    serde_json::from_str(nad["spec"]["config"].as_str().expect("spec.config")).unwrap()
}

#[test]
fn a_spidermultusconfig_keeps_its_nad_as_generated() {
    let Some(kbin) = kube_bin() else { return };
    // The controller-manager's garbage collector deletes a NAD with its owner.
    let cp = ControlPlane::start(&kbin, true);
    cp.install_crds();
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(
        &cp,
        dir.path(),
        "ctl-m",
        &["--gc-enabled=false", "--multus-config-resync", "2s"],
    );
    until("the controller ready", || {
        (spiderpool_testkit::http_get(&ctl.health, "/readyz").0 == 200).then_some(())
    });

    // The seed's network as an SMC: macvlan on ens192 with the coordinator.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &smc(
            "macvlan-conf",
            json!({}),
            json!({"cniType": "macvlan", "enableCoordinator": true,
                "macvlan": {"master": ["ens192"]}}),
        ),
    );
    // The webhook filled in upstream's defaults.
    let stored = json_of(&cp, &["get", "smc", "-n", "kube-system", "macvlan-conf"]);
    assert_eq!(stored["spec"]["macvlan"]["vlanID"], 0, "{stored}");
    assert_eq!(stored["spec"]["coordinator"]["mode"], "auto", "{stored}");
    assert_eq!(
        stored["spec"]["coordinator"]["tunePodRoutes"], true,
        "{stored}"
    );
    let table = cp.kubectl_ok(&["get", "smc", "-n", "kube-system"], "");
    assert!(
        table.contains("CNITYPE") && table.contains("macvlan"),
        "{table}"
    );
    let generated = until("the NAD is generated", || nad(&cp, "macvlan-conf"));
    let owner = &generated["metadata"]["ownerReferences"][0];
    assert_eq!(
        (
            owner["kind"].as_str(),
            owner["name"].as_str(),
            owner["controller"].as_bool()
        ),
        (Some("SpiderMultusConfig"), Some("macvlan-conf"), Some(true)),
        "{generated}"
    );
    assert_eq!(owner["uid"], stored["metadata"]["uid"]);
    assert_eq!(
        config(&generated),
        json!({"cniVersion": "0.3.1", "name": "macvlan-conf", "plugins": [
            {"type": "macvlan", "master": "ens192", "mode": "bridge", "mtu": 0,
             "ipam": {"type": "spiderpool"}},
            {"type": "coordinator", "mode": "auto", "tunePodRoutes": true, "txQueueLen": 0}]})
    );

    // A change of the SMC rewrites the NAD.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &smc(
            "macvlan-conf",
            json!({}),
            json!({"cniType": "macvlan", "enableCoordinator": true,
                "macvlan": {"master": ["ens192"], "vlanID": 100,
                    "ippools": {"ipv4": ["zone-6"]}}}),
        ),
    );
    let rewritten = until("the NAD follows the SMC", || {
        nad(&cp, "macvlan-conf").filter(|n| config(n)["plugins"].as_array().unwrap().len() == 3)
    });
    let plugins = config(&rewritten)["plugins"].clone();
    assert_eq!(
        plugins[0],
        json!({"type": "ifacer", "vlanID": 100, "interfaces": ["ens192"]})
    );
    assert_eq!(plugins[1]["master"], "ens192.100");
    assert_eq!(plugins[1]["ipam"]["default_ipv4_ippool"], json!(["zone-6"]));

    // A hand edit is put back; so is a deleted NAD.
    cp.kubectl_ok(
        &[
            "patch",
            "network-attachment-definitions.k8s.cni.cncf.io",
            "-n",
            "kube-system",
            "macvlan-conf",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"config":"{\"cniVersion\":\"0.3.1\",\"type\":\"bridge\"}"}}"#,
        ],
        "",
    );
    until("the edit is put back", || {
        nad(&cp, "macvlan-conf").filter(|n| config(n)["plugins"] == plugins)
    });
    cp.kubectl_ok(
        &[
            "delete",
            "network-attachment-definitions.k8s.cni.cncf.io",
            "-n",
            "kube-system",
            "macvlan-conf",
        ],
        "",
    );
    until("the deleted NAD is written again", || {
        nad(&cp, "macvlan-conf").filter(|n| config(n)["plugins"] == plugins)
    });

    // A NAD written by hand is left alone, and the SMC's Event says why.
    let by_hand = json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": "handmade", "namespace": "kube-system"},
        "spec": {"config": r#"{"cniVersion":"0.3.1","name":"handmade","type":"bridge"}"#}});
    cp.kubectl_ok(&["apply", "-f", "-"], &by_hand.to_string());
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &smc(
            "handmade",
            json!({}),
            json!({"cniType": "ipvlan", "ipvlan": {"master": ["ens224"]}}),
        ),
    );
    let event = until("an Event on the SMC", || {
        let events = json_of(
            &cp,
            &[
                "get",
                "events",
                "-n",
                "kube-system",
                "--field-selector",
                "involvedObject.name=handmade,involvedObject.kind=SpiderMultusConfig",
            ],
        );
        events["items"].as_array()?.first().cloned()
    });
    let message = event["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("NetworkAttachmentDefinition kube-system/handmade exists and is not this SpiderMultusConfig's"),
        "{event}"
    );
    let left = nad(&cp, "handmade").unwrap();
    assert_eq!(left["spec"]["config"], by_hand["spec"]["config"]);
    assert!(left["metadata"]["ownerReferences"].is_null(), "{left}");

    // The webhook refuses what upstream refuses, naming field and value.
    cp.apply_refused(&smc("bad", json!({}), json!({"cniType": "macvlan", "macvlan": {"master": ["a"], "vlanID": 5000}})),
        "spec.macvlan.vlanID \"5000\" is invalid: invalid vlanId 5000, please make sure vlanId in range [0,4094]",
    );
    cp.apply_refused(
        &smc(
            "bad",
            json!({}),
            json!({"cniType": "sriov", "sriov": {"vlanID": 1}}),
        ),
        "spec.sriov.resourceName is required",
    );
    cp.apply_refused(&smc(
            "other",
            json!({"multus.spidernet.io/cr-name": "macvlan-conf"}),
            json!({"cniType": "macvlan", "macvlan": {"master": ["ens192"]}}),
        ),
        "the net-attach-def kube-system/macvlan-conf already exists and is managed by SpiderMultusConfig kube-system/macvlan-conf",
    );
    cp.apply_refused(&smc(
            "macvlan-conf",
            json!({"multus.spidernet.io/cr-name": "renamed"}),
            json!({"cniType": "macvlan", "macvlan": {"master": ["ens192"]}}),
        ),
        "it's unsupported to changed Multus net-attach-def 'macvlan-conf' to customized name 'renamed'",
    );

    // Deleting the SMC deletes its NAD (the garbage collector follows the owner reference);
    // the NAD written by hand stays.
    cp.kubectl_ok(
        &[
            "delete",
            "smc",
            "-n",
            "kube-system",
            "macvlan-conf",
            "handmade",
        ],
        "",
    );
    until("the NAD goes with its SMC", || {
        nad(&cp, "macvlan-conf").is_none().then_some(())
    });
    assert!(nad(&cp, "handmade").is_some());
}
