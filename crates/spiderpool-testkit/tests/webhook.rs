//! The controller's admission webhooks and finalizers through the real kubectl and API server:
//! upstream's mutations on what users create, each rule refusing with upstream's message naming
//! field and value, and pools and subnets that stay (terminating) while addresses are in use.

use serde_json::{json, Value};
use spiderpool_testkit::{json_of, kube_bin, until, Agent, CniCall, ControlPlane, Controller};

fn pool(name: &str, subnet: &str, ips: &[&str], extra: Value) -> String {
    let mut spec = json!({"subnet": subnet, "ips": ips});
    for (k, v) in extra.as_object().into_iter().flatten() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
        "metadata": {"name": name}, "spec": spec})
    .to_string()
}

fn subnet(name: &str, cidr: &str, ips: &[&str], extra: Value) -> String {
    let mut spec = json!({"subnet": cidr, "ips": ips});
    for (k, v) in extra.as_object().into_iter().flatten() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderSubnet",
        "metadata": {"name": name}, "spec": spec})
    .to_string()
}

fn started(cp: &ControlPlane, dir: &std::path::Path, extra: &[&str]) -> Controller {
    let c = Controller::start(cp, dir, "ctl-w", extra);
    until("the controller ready", || {
        (spiderpool_testkit::http_get(&c.health, "/readyz").0 == 200).then_some(())
    });
    c
}

#[test]
fn the_webhooks_mutate_and_refuse_as_upstream_through_kubectl() {
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    let dir = tempfile::tempdir().unwrap();
    let ctl = started(
        &cp,
        dir.path(),
        &[
            "--gc-enabled=false",
            "--enable-ipv6=false",
            "--coordinator-resync",
            "1s",
        ],
    );
    // The controller registered both configurations with its CA.
    // (The validating one also restricts agents to their own node.)
    for (kind, n) in [
        ("validatingwebhookconfiguration", 6),
        ("mutatingwebhookconfiguration", 5),
    ] {
        let w = json_of(&cp, &["get", kind, "spiderpool-controller"]);
        let hooks = w["webhooks"].as_array().unwrap();
        assert_eq!(hooks.len(), n, "{w}");
        assert!(hooks.iter().all(|h| h["clientConfig"]["caBundle"]
            .as_str()
            .is_some_and(|b| !b.is_empty())));
    }

    // Mutations: the version, the CIDR label, the finalizer, merged and sorted ranges.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &pool(
            "m",
            "10.6.0.0/16",
            &["10.6.0.9", "10.6.0.1-10.6.0.8"],
            json!({"excludeIPs": ["10.6.0.5", "10.6.0.4"]}),
        ),
    );
    let m = json_of(&cp, &["get", "spiderippool", "m"]);
    assert_eq!(m["spec"]["ipVersion"], 4);
    assert_eq!(m["spec"]["ips"], json!(["10.6.0.1-10.6.0.9"]));
    assert_eq!(m["spec"]["excludeIPs"], json!(["10.6.0.4-10.6.0.5"]));
    assert_eq!(
        m["metadata"]["labels"]["ipam.spidernet.io/ippool-cidr"],
        "10-6-0-0-16"
    );
    assert_eq!(
        m["metadata"]["finalizers"],
        json!(["spiderpool.spidernet.io"])
    );
    let table = cp.kubectl_ok(&["get", "spiderippool", "m"], "");
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["m", "4", "10.6.0.0/16"], "{table}");
    // A pool of a subnet's CIDR is the subnet's: reference, label, gateway and routes.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &subnet(
            "s7",
            "10.7.0.0/16",
            &["10.7.0.2-10.7.0.100"],
            json!({"gateway": "10.7.0.1",
            "routes": [{"dst": "10.9.0.0/16", "gw": "10.7.0.1"}]}),
        ),
    );
    let s7 = json_of(&cp, &["get", "spidersubnet", "s7"]);
    assert_eq!(s7["spec"]["ipVersion"], 4);
    assert_eq!(
        s7["metadata"]["labels"]["ipam.spidernet.io/subnet-cidr"],
        "10-7-0-0-16"
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &pool("child", "10.7.0.0/16", &["10.7.0.10-10.7.0.20"], json!({})),
    );
    let child = json_of(&cp, &["get", "spiderippool", "child"]);
    assert_eq!(child["spec"]["gateway"], "10.7.0.1");
    assert_eq!(child["spec"]["routes"][0]["dst"], "10.9.0.0/16");
    assert_eq!(
        child["metadata"]["labels"]["ipam.spidernet.io/owner-spider-subnet"],
        "s7"
    );
    let owner = &child["metadata"]["ownerReferences"][0];
    assert_eq!(
        (
            &owner["kind"],
            &owner["name"],
            &owner["uid"],
            &owner["controller"]
        ),
        (
            &json!("SpiderSubnet"),
            &json!("s7"),
            &s7["metadata"]["uid"],
            &json!(true)
        )
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderReservedIP",
            "metadata": {"name": "r"}, "spec": {"ips": ["10.6.0.7", "10.6.0.6"]}})
        .to_string(),
    );
    let r = json_of(&cp, &["get", "spiderreservedip", "r"]);
    assert_eq!(r["spec"]["ipVersion"], 4);
    assert_eq!(r["spec"]["ips"], json!(["10.6.0.6-10.6.0.7"]));

    // spiderpoolctl on the same cluster keeps what the webhook and the controller put there.
    let ctl_apply = |doc: &str| {
        let out = spiderpool_testkit::run(
            std::process::Command::new(spiderpool_testkit::bin("spiderpoolctl"))
                .args(["--datastore", "kubernetes", "--kubeconfig"])
                .arg(&cp.kubeconfig)
                .args(["apply", "-f", "-"]),
            doc,
        );
        assert!(out.success, "{}", out.stderr);
        out.stdout
    };
    let out = ctl_apply(&pool(
        "child",
        "10.7.0.0/16",
        &["10.7.0.10-10.7.0.20"],
        json!({}),
    ));
    assert_eq!(
        out,
        "spiderippool.spiderpool.spidernet.io/child unchanged\n"
    );
    ctl_apply(&pool(
        "child",
        "10.7.0.0/16",
        &["10.7.0.10-10.7.0.21"],
        json!({}),
    ));
    let again = json_of(&cp, &["get", "spiderippool", "child"]);
    assert_eq!(
        again["metadata"]["finalizers"],
        json!(["spiderpool.spidernet.io"])
    );
    assert_eq!(
        again["metadata"]["ownerReferences"],
        child["metadata"]["ownerReferences"]
    );
    assert_eq!(again["spec"]["ips"], json!(["10.7.0.10-10.7.0.21"]));

    // The leader keeps the counts: a pool's from the moment it exists, a subnet's from its
    // pools (as kubectl's columns show them).
    until("the counts written", || {
        let m = json_of(&cp, &["get", "spiderippool", "m"]);
        let s7 = json_of(&cp, &["get", "spidersubnet", "s7"]);
        (m["status"]["totalIPCount"] == 7
            && m["status"]["allocatedIPCount"] == 0
            && s7["status"]["totalIPCount"] == 99
            && s7["status"]["allocatedIPCount"] == 12)
            .then_some(())
    });
    let s7 = json_of(&cp, &["get", "spidersubnet", "s7"]);
    let controlled: Value =
        serde_json::from_str(s7["status"]["controlledIPPools"].as_str().unwrap()).unwrap();
    assert_eq!(
        controlled,
        json!({"child": {"ips": ["10.7.0.10-10.7.0.21"]}})
    );
    let table = cp.kubectl_ok(&["get", "spidersubnet", "s7"], "");
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row, ["s7", "4", "10.7.0.0/16", "12", "99"], "{table}");

    // Every rule, through kubectl.
    cp.apply_refused(&pool("q", "10.6.0.0/24", &["10.6.0.100"], json!({})),
        "SpiderIPPool \"q\": spec.subnet \"10.6.0.0/24\" overlap with IPPool m which 'spec.subnet' is 10.6.0.0/16",
    );
    cp.apply_refused(&pool("q", "10.6.0.0/16", &["10.6.0.8-10.6.0.12"], json!({})),
        "spec.ips \"[10.6.0.8-10.6.0.9]\" overlap with IPPool m in IP ranges [10.6.0.8-10.6.0.9], total IP addresses of an IPPool are jointly determined by 'spec.ips' and 'spec.excludeIPs'",
    );
    // Excluded addresses are no overlap.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &pool("q", "10.6.0.0/16", &["10.6.0.4-10.6.0.5"], json!({})),
    );
    cp.apply_refused(
        &pool("m", "10.16.0.0/16", &["10.16.0.1"], json!({})),
        "SpiderIPPool \"m\": spec.subnet \"10.16.0.0/16\" is not changeable (was 10.6.0.0/16)",
    );
    cp.apply_refused(
        &pool(
            "e",
            "10.10.0.0/16",
            &["10.10.0.1"],
            json!({"podAffinity": {}}),
        ),
        "spec.podAffinity \"{}\" empty podAffinity is invalid for SpiderIPPool",
    );
    cp.apply_refused(
        &pool("v6", "fd00:10::/64", &["fd00:10::1"], json!({})),
        "SpiderIPPool \"v6\": spec.ipVersion \"6\" IPv6 is disabled",
    );
    cp.apply_refused(
        &pool(
            "g",
            "10.11.0.0/16",
            &["10.11.0.1-10.11.0.9"],
            json!({"gateway": "10.11.0.1"}),
        ),
        "spec.gateway",
    );
    cp.apply_refused(&pool("child", "10.7.0.0/16", &["10.7.0.10-10.7.0.21", "10.7.0.150"], json!({})),
        "spec.ips \"[10.7.0.150]\" add some IP ranges [10.7.0.150] that are not contained in controller Subnet s7",
    );
    cp.apply_refused(&subnet("s6", "10.6.0.0/24", &["10.6.0.1"], json!({})),
        "SpiderSubnet \"s6\": spec.subnet \"10.6.0.0/24\" overlap with SpiderIPPool 'm' resource 'spec.subnet' 10.6.0.0/16",
    );
    cp.apply_refused(
        &subnet("s6", "10.6.0.0/16", &["10.6.0.100-10.6.0.200"], json!({})),
        "SpiderIPPool 'm' owns some IP addresses that SpiderSubnet 's6' can't control",
    );
    cp.apply_refused(
        &subnet("s7", "10.7.0.0/16", &["10.7.0.50-10.7.0.100"], json!({})),
        "remove some IP ranges [10.7.0.10-10.7.0.21] that is being used by IPPool child",
    );
    cp.apply_refused(&subnet("s8", "10.7.128.0/17", &["10.7.128.1"], json!({})),
        "SpiderSubnet \"s8\": spec.subnet \"10.7.128.0/17\" overlap with Subnet s7 which 'spec.subnet' is 10.7.0.0/16",
    );
    cp.apply_refused(
        &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderReservedIP",
            "metadata": {"name": "r"}, "spec": {"ipVersion": 6, "ips": ["fd00::5"]}})
        .to_string(),
        "SpiderReservedIP \"r\": spec.ipVersion \"6\" is not changeable",
    );
    cp.apply_refused(
        &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderReservedIP",
            "metadata": {"name": "r6"}, "spec": {"ips": ["fd00::5"]}})
        .to_string(),
        "SpiderReservedIP \"r6\": spec.ipVersion \"6\" IPv6 is disabled",
    );
    cp.apply_refused(&json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderReservedIP",
            "metadata": {"name": "r0"}, "spec": {"ips": []}})
        .to_string(),
        "spec.ips \"[]\" is not generated correctly, 'spec.ips' is empty or 'spec.ips[0]' may be invalid",
    );
    // Nothing refused was stored.
    let names: Vec<String> = json_of(&cp, &["get", "spiderippools"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["child", "m", "q"]);
    assert_eq!(
        json_of(&cp, &["get", "spiderippool", "child"])["spec"]["ips"],
        json!(["10.7.0.10-10.7.0.21"])
    );

    // SpiderCoordinator: upstream's defaults, a bare hijack address made a host CIDR, and each
    // rule naming field and value.
    let coordinator = |spec: Value| {
        json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderCoordinator",
            "metadata": {"name": "default"}, "spec": spec})
        .to_string()
    };
    cp.apply_refused(&coordinator(json!({"mode": "underlay"})),
        "SpiderCoordinator \"default\": spec.podCIDRType is required (supported values: \"auto\", \"cluster\"",
    );
    for (spec, want) in [
        (
            json!({"podCIDRType": "cluster", "podMACPrefix": "01:1b"}),
            "spec.podMACPrefix \"01:1b\" is not a unicast MAC: the lowest bit of the first byte must be 0",
        ),
        (
            json!({"podCIDRType": "cluster", "txQueueLen": -1}),
            "spec.txQueueLen \"-1\" is invalid: txQueueLen can't be less than 0",
        ),
        (
            json!({"podCIDRType": "cluster", "vethLinkAddress": "169.254.1"}),
            "spec.vethLinkAddress \"169.254.1\" is invalid: vethLinkAddress is an invalid IP address",
        ),
        (
            json!({"podCIDRType": "cluster", "vethMTU": 0}),
            "spec.vethMTU \"0\" is invalid: vethMTU must be greater than 0",
        ),
        (
            json!({"podCIDRType": "cluster", "podRPFilter": 5}),
            "spec.podRPFilter \"5\" is not supported (supported values: 0, 1, 2",
        ),
        (
            json!({"podCIDRType": "cluster", "policyRoutes": [{"dst": "fd00::/64", "gw": "10.6.0.1"}]}),
            "spec.policyRoutes[0] \"fd00::/64 via 10.6.0.1\" is invalid: dst and gw must use the same IP family",
        ),
    ] {
        cp.apply_refused(&coordinator(spec), want);
    }
    // The API server's schema knows the enums itself.
    let out = cp.kubectl(
        &["apply", "-f", "-"],
        &coordinator(json!({"podCIDRType": "flannel"})),
    );
    assert!(
        !out.success && out.stderr.contains("spec.podCIDRType") && out.stderr.contains("flannel"),
        "{}",
        out.stderr
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &coordinator(json!({"podCIDRType": "cluster", "hijackCIDR": ["10.9.0.1", "fd00:9::/64"]})),
    );
    let c = json_of(&cp, &["get", "scc", "default"]);
    assert_eq!(
        c["spec"],
        json!({"mode": "auto", "podCIDRType": "cluster", "hijackCIDR": ["10.9.0.1/32", "fd00:9::/64"],
            "tunePodRoutes": true, "hostRuleTable": 500, "hostRPFilter": 0, "podRPFilter": 0,
            "txQueueLen": 0, "vethMTU": 1500, "detectIPConflict": false, "detectGateway": false}),
    );
    // An update is checked as well, and what was stored stays.
    cp.apply_refused(
        &coordinator(json!({"podCIDRType": "cluster", "vethMTU": -1})),
        "vethMTU must be greater than 0",
    );
    assert_eq!(
        json_of(&cp, &["get", "scc", "default"])["spec"]["vethMTU"],
        1500
    );

    // The leader writes the status: the API server's ServiceCIDR (its
    // --service-cluster-ip-range), and for podCIDRType cluster the pod subnet kubeadm-config
    // names (none here until it is created: still Synced, as upstream).
    let status = |want: &dyn Fn(&Value) -> bool| {
        until("the SpiderCoordinator's status", || {
            let s = json_of(&cp, &["get", "scc", "default"])["status"].clone();
            want(&s).then_some(s)
        })
    };
    let s = status(&|s| s["phase"] == "Synced");
    assert_eq!(
        s,
        json!({"phase": "Synced", "serviceCIDR": ["10.233.0.0/18"], "overlayPodCIDR": []})
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kubeadm-config", "namespace": "kube-system"},
            "data": {"ClusterConfiguration": "apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\nnetworking:\n  podSubnet: 10.244.0.0/16\n  serviceSubnet: 10.96.0.0/12\n"}})
        .to_string(),
    );
    let s = status(&|s| s["overlayPodCIDR"] != json!([]));
    assert_eq!(s["overlayPodCIDR"], json!(["10.244.0.0/16"]));
    // The ServiceCIDR objects win over kubeadm-config.
    assert_eq!(s["serviceCIDR"], json!(["10.233.0.0/18"]));
    // Calico named but not installed: NotReady, and why.
    cp.kubectl_ok(
        &[
            "patch",
            "scc",
            "default",
            "--type=merge",
            "-p",
            r#"{"spec":{"podCIDRType":"calico"}}"#,
        ],
        "",
    );
    let s = status(&|s| s["phase"] == "NotReady");
    assert!(
        s["reason"]
            .as_str()
            .is_some_and(|r| r.contains("Calico needs to be installed first")),
        "{s}"
    );
    assert_eq!(s["serviceCIDR"], json!([]));
    drop(ctl);
}

#[test]
fn pools_and_subnets_in_use_stay_terminating_until_their_addresses_are_released() {
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    let dir = tempfile::tempdir().unwrap();
    let _ctl = started(
        &cp,
        dir.path(),
        &["--gc-enabled=false", "--gc-interval", "2s"],
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &subnet("s8", "10.8.0.0/16", &["10.8.0.1-10.8.0.100"], json!({})),
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &pool("busy", "10.8.0.0/16", &["10.8.0.1-10.8.0.9"], json!({})),
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &pool("idle", "10.8.0.0/16", &["10.8.0.20-10.8.0.29"], json!({})),
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}).to_string(),
    );
    let socket = dir.path().join("n1.sock");
    let _agent = Agent::on_cluster(&cp, &socket, "n1", &[]);
    let conf = json!({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "spiderpool",
        "ipam_unix_socket_path": socket, "default_ipv4_ippool": ["busy"]}});
    let out = CniCall::new("ADD", "c1", "web", &conf).run();
    assert!(out.success, "{}", out.stdout);
    assert_eq!(out.json()["ips"][0]["address"], "10.8.0.1/16");

    // A pool in use: deleting it leaves it terminating, and it refuses changes meanwhile.
    cp.kubectl_ok(&["delete", "spiderippool", "busy", "--wait=false"], "");
    let busy = json_of(&cp, &["get", "spiderippool", "busy"]);
    assert!(busy["metadata"]["deletionTimestamp"].is_string(), "{busy}");
    let out = cp.kubectl(&["label", "spiderippool", "busy", "x=y"], "");
    assert!(
        !out.success && out.stderr.contains("cannot update a terminating IPPool"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    // It hands out nothing more.
    let out = CniCall::new("ADD", "c2", "web2", &conf).run();
    assert!(!out.success, "{}", out.stdout);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(cp.kubectl(&["get", "spiderippool", "busy"], "").success);
    // The subnet is deleted too: it deletes its idle pool at once, and waits for the busy one.
    cp.kubectl_ok(&["delete", "spidersubnet", "s8", "--wait=false"], "");
    until("the idle pool gone", || {
        (!cp.kubectl(&["get", "spiderippool", "idle"], "").success).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    let s8 = json_of(&cp, &["get", "spidersubnet", "s8"]);
    assert!(s8["metadata"]["deletionTimestamp"].is_string(), "{s8}");
    // Its address released, the pool goes, and then the subnet.
    let out = CniCall::new("DEL", "c1", "web", &conf).run();
    assert!(out.success, "{}", out.stdout);
    until("the busy pool gone", || {
        (!cp.kubectl(&["get", "spiderippool", "busy"], "").success).then_some(())
    });
    until("the subnet gone", || {
        (!cp.kubectl(&["get", "spidersubnet", "s8"], "").success).then_some(())
    });
}
