//! SpiderSubnet auto pools on a real control plane: the controller-manager runs real
//! Deployments, StatefulSets, DaemonSets and Jobs, the node simulator runs their pods' CNI
//! (Debian's macvlan and `spiderpool`), the spiderpool-controller carves, scales, takes over and
//! reclaims their pools. Mirrors upstream's I00003, I00004, I00012, I00015–I00024, and
//! I00006/I00008 (30 Deployments at once); the subnet's arithmetic is checked after each step.

use serde_json::{json, Value};
use spiderpool_testkit::scale::{
    auto_pool_sizes, controller, deployments_scale, ip_count, world, Addressing,
};
use spiderpool_testkit::{json_of, running, until, ControlPlane};

const MULTUS: &str = "v1.multus-cni.io/default-network";

fn subnet(name: &str, cidr: &str, ips: &str, exclude: &[&str], gateway: &str) -> String {
    json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderSubnet",
        "metadata": {"name": name},
        "spec": {"subnet": cidr, "ips": [ips], "excludeIPs": exclude, "gateway": gateway}})
    .to_string()
}

/// A workload of `kind` named `name` whose pod template carries `annotations` (and the NAD).
fn workload(kind: &str, name: &str, replicas: u64, annotations: Value, node_zone: &str) -> String {
    let mut a = annotations;
    a[MULTUS] = "kube-system/macvlan-conf".into();
    // A label value has at most 63 characters; the name may have more (I00017).
    let name_label: String = name.chars().take(63).collect();
    let template = json!({"metadata": {"labels": {"app": name_label}, "annotations": a},
        "spec": {"terminationGracePeriodSeconds": 0, "nodeSelector": {"zone": node_zone},
            "restartPolicy": if kind == "Job" { "Never" } else { "Always" },
            "containers": [{"name": "c", "image": "registry.invalid/app"}]}});
    let selector = json!({"matchLabels": {"app": name_label}});
    let (api, spec) = match kind {
        "Deployment" => (
            "apps/v1",
            json!({"replicas": replicas, "selector": selector, "template": template}),
        ),
        "StatefulSet" => (
            "apps/v1",
            json!({"replicas": replicas, "serviceName": name, "podManagementPolicy": "Parallel",
            "selector": selector, "template": template}),
        ),
        "DaemonSet" => (
            "apps/v1",
            json!({"selector": selector, "template": template}),
        ),
        "Job" => (
            "batch/v1",
            json!({"completions": replicas, "parallelism": replicas, "template": template}),
        ),
        other => panic!("no such workload kind {other}"),
    };
    json!({"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": "default"}, "spec": spec})
        .to_string()
}

fn subnet_annotation(v4: &str, ip_number: &str) -> Value {
    json!({"ipam.spidernet.io/subnet": json!({"ipv4": [v4]}).to_string(),
        "ipam.spidernet.io/ippool-ip-number": ip_number})
}

/// The live (not terminating) auto pools of the application `kind` `name`.
fn pools_of(cp: &ControlPlane, kind: &str, name: &str) -> Vec<Value> {
    let v = json_of(
        cp,
        &[
            "get",
            "spiderippools",
            "-l",
            &format!("ipam.spidernet.io/owner-application-kind={kind}"),
        ],
    );
    v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| {
            p["spec"]["podAffinity"]["matchLabels"]["ipam.spidernet.io/app-name"] == name
                && p["metadata"]["deletionTimestamp"].is_null()
        })
        .collect()
}

/// The one live auto pool of `kind` `name` for `nic`, once it holds `size` addresses.
fn pool_sized(cp: &ControlPlane, kind: &str, name: &str, nic: &str, size: u64) -> Value {
    until(
        &format!("{kind} {name}: an auto pool of {size} IPs for {nic}"),
        || {
            pools_of(cp, kind, name).into_iter().find(|p| {
                p["metadata"]["labels"]["ipam.spidernet.io/interface"] == nic
                    && ip_count(&p["spec"]["ips"]) == size
            })
        },
    )
}

/// Running pods with an address whose name starts with `prefix`, and all of them.
fn pods(cp: &ControlPlane, prefix: &str) -> (Vec<Value>, usize) {
    let v = json_of(cp, &["get", "pods"]);
    let all: Vec<Value> = v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| {
            p["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    let n = all.len();
    (
        all.into_iter()
            .filter(|p| running(p) && p["status"]["podIP"].is_string())
            .collect(),
        n,
    )
}

fn running_pods(cp: &ControlPlane, prefix: &str, n: usize) -> Vec<Value> {
    until(&format!("{n} pods {prefix}* running"), || {
        let (up, all) = pods(cp, prefix);
        (up.len() == n && all == n).then_some(up)
    })
}

/// A pod's CNI failure as the node simulator reports it.
fn cni_failure(cp: &ControlPlane, pod: &str) -> String {
    until(&format!("pod {pod} fails its CNI ADD"), || {
        let p = json_of(cp, &["get", "pod", pod]);
        p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["reason"] == "CNIFailed")
            .and_then(|c| c["message"].as_str().map(String::from))
    })
}

/// The subnet's status: (totalIPCount, allocatedIPCount, controlledIPPools).
fn subnet_status(cp: &ControlPlane, name: &str) -> (u64, u64, Value) {
    let s = json_of(cp, &["get", "spidersubnet", name]);
    let controlled = s["status"]["controlledIPPools"]
        .as_str()
        .map(|t| serde_json::from_str(t).unwrap())
        .unwrap_or(json!({}));
    (
        s["status"]["totalIPCount"].as_u64().unwrap_or(0),
        s["status"]["allocatedIPCount"].as_u64().unwrap_or(0),
        controlled,
    )
}

/// Waits until the subnet has given `given` addresses to pools, and checks its arithmetic: the
/// count is the sum of its pools' addresses.
fn subnet_gives(cp: &ControlPlane, name: &str, given: u64) -> Value {
    until(&format!("SpiderSubnet {name} gives {given} IPs"), || {
        let (_, allocated, controlled) = subnet_status(cp, name);
        let sum: u64 = controlled
            .as_object()
            .map(|m| m.values().map(|e| ip_count(&e["ips"])).sum())
            .unwrap_or(0);
        (allocated == given && sum == given).then_some(controlled)
    })
}

/// The notes of the events with `reason` on the Deployment `name`, once there is one.
fn events_of(cp: &ControlPlane, name: &str, reason: &str) -> String {
    until(&format!("a {reason} event on Deployment {name}"), || {
        let v = json_of(
            cp,
            &[
                "get",
                "events.events.k8s.io",
                "--field-selector",
                &format!("regarding.name={name},reason={reason}"),
            ],
        );
        let notes: Vec<String> = v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["regarding"]["kind"] == "Deployment")
            .filter_map(|e| e["note"].as_str().map(String::from))
            .collect();
        (!notes.is_empty()).then(|| notes.join("\n"))
    })
}

fn pod_ip(p: &Value) -> String {
    p["status"]["podIP"].as_str().unwrap().to_string()
}

fn in_ips(ip: &str, ips: &Value) -> bool {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    ips.as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .any(|e| {
            let (a, b) = e.split_once('-').unwrap_or((e, e));
            let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
                (a.parse().unwrap(), b.parse().unwrap());
            a <= ip && ip <= b
        })
}

#[test]
fn auto_pools_follow_their_applications_on_a_real_control_plane() {
    let Some(w) = world(
        "ap",
        &[
            // 95 addresses: .100-.104 excluded.
            subnet(
                "subnet-6",
                "10.6.0.0/16",
                "10.6.168.100-10.6.168.199",
                &["10.6.168.100-10.6.168.104"],
                "10.6.0.1",
            ),
            subnet(
                "subnet-7",
                "10.7.0.0/16",
                "10.7.168.100-10.7.168.149",
                &[],
                "10.7.0.1",
            ),
        ],
    ) else {
        return;
    };
    let cp = &w.cp;
    until("the subnets' counts", || {
        let (t6, a6, _) = subnet_status(cp, "subnet-6");
        let (t7, a7, _) = subnet_status(cp, "subnet-7");
        (t6 == 95 && t7 == 50 && a6 == 0 && a7 == 0).then_some(())
    });
    let apply = |doc: &str| cp.kubectl_ok(&["apply", "-f", "-"], doc);

    // I00003, I00004: a Deployment's pool, replicas + 1, from the subnet's lowest free
    // addresses (never an excluded one); its pods take addresses from it.
    apply(&workload(
        "Deployment",
        "web",
        2,
        subnet_annotation("subnet-6", "+1"),
        "a",
    ));
    let web = pool_sized(cp, "Deployment", "web", "eth0", 3);
    let name = web["metadata"]["name"].as_str().unwrap().to_string();
    let uid = json_of(cp, &["get", "deployment", "web"])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let uid5: String = uid.rsplit('-').next().unwrap().chars().take(5).collect();
    assert_eq!(name, format!("auto4-web-eth0-{uid5}"));
    assert_eq!(web["spec"]["ips"], json!(["10.6.168.105-10.6.168.107"]));
    assert_eq!(web["spec"]["gateway"], "10.6.0.1");
    let labels = &web["metadata"]["labels"];
    assert_eq!(
        labels["ipam.spidernet.io/owner-application-uid"],
        uid.as_str()
    );
    assert_eq!(labels["ipam.spidernet.io/owner-application-gv"], "apps_v1");
    assert_eq!(labels["ipam.spidernet.io/owner-spider-subnet"], "subnet-6");
    assert_eq!(labels["ipam.spidernet.io/ippool-reclaim"], "true");
    assert_eq!(
        web["metadata"]["annotations"]["ipam.spidernet.io/ippool-ip-number"],
        "+1"
    );
    assert_eq!(
        web["metadata"]["ownerReferences"][0]["kind"],
        "SpiderSubnet"
    );
    assert_eq!(
        web["metadata"]["finalizers"],
        json!(["spiderpool.spidernet.io"])
    );
    for p in running_pods(cp, "web-", 2) {
        assert!(in_ips(&pod_ip(&p), &web["spec"]["ips"]), "{}", pod_ip(&p));
    }
    let controlled = subnet_gives(cp, "subnet-6", 3);
    assert_eq!(
        controlled[&name]["application"],
        "apps_v1_Deployment_default_web"
    );
    // `kubectl describe deployment web` tells what happened to its pools.
    let said = events_of(cp, "web", "CreateIPPool");
    assert!(
        said.contains(&format!("created SpiderIPPool {name} with 3 IPs")),
        "{said}"
    );

    // I00018: its addresses and affinity are not the user's to change.
    let out = cp.kubectl(
        &[
            "patch",
            "spiderippool",
            &name,
            "--type=merge",
            "-p",
            r#"{"spec":{"ips":["10.6.168.105-10.6.168.109"]}}"#,
        ],
        "",
    );
    assert!(
        !out.success
            && out
                .stderr
                .contains("it's illegal to update AutoPool.Spec.IPs"),
        "{}",
        out.stderr
    );
    let out = cp.kubectl(
        &[
            "patch",
            "spiderippool",
            &name,
            "--type=merge",
            "-p",
            r#"{"spec":{"podAffinity":{"matchLabels":{"team":"x"}}}}"#,
        ],
        "",
    );
    assert!(
        !out.success && out.stderr.contains("it's invalid to add additional podAffinity matchLabels/matchExpressions for auto-created SpiderIPPool"),
        "{}",
        out.stderr
    );

    // I00020: its spare address is not another application's.
    apply(
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "intruder", "namespace": "default",
            "annotations": {MULTUS: "kube-system/macvlan-conf", "ipam.spidernet.io/ippool": json!({"ipv4": [&name]}).to_string()}},
            "spec": {"nodeSelector": {"zone": "a"}, "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "c", "image": "registry.invalid/app"}]}})
        .to_string(),
    );
    let why = cni_failure(cp, "intruder");
    assert!(why.contains("spec.podAffinity does not match"), "{why}");
    cp.kubectl_ok(&["delete", "pod", "intruder", "--wait=false"], "");

    // I00023: an orphan pod cannot use a subnet.
    apply(
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orphan", "namespace": "default",
            "annotations": {MULTUS: "kube-system/macvlan-conf", "ipam.spidernet.io/subnet": r#"{"ipv4":["subnet-6"]}"#}},
            "spec": {"nodeSelector": {"zone": "a"}, "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "c", "image": "registry.invalid/app"}]}})
        .to_string(),
    );
    let why = cni_failure(cp, "orphan");
    assert!(
        why.contains("SpiderSubnet feature doesn't support no-controller pod"),
        "{why}"
    );
    cp.kubectl_ok(&["delete", "pod", "orphan", "--wait=false"], "");

    // Scaled up and down: the pool follows, never below the addresses in use.
    cp.kubectl_ok(&["scale", "deployment", "web", "--replicas=4"], "");
    pool_sized(cp, "Deployment", "web", "eth0", 5);
    running_pods(cp, "web-", 4);
    subnet_gives(cp, "subnet-6", 5);
    cp.kubectl_ok(&["scale", "deployment", "web", "--replicas=1"], "");
    running_pods(cp, "web-", 1);
    let web = pool_sized(cp, "Deployment", "web", "eth0", 2);
    let survivor = pod_ip(&running_pods(cp, "web-", 1)[0]);
    assert!(
        in_ips(&survivor, &web["spec"]["ips"]),
        "{survivor} {}",
        web["spec"]["ips"]
    );
    subnet_gives(cp, "subnet-6", 2);

    // A StatefulSet (fixed size), a DaemonSet (one pod per node, + the default 1) and a Job.
    apply(&workload(
        "StatefulSet",
        "db",
        2,
        subnet_annotation("subnet-6", "4"),
        "a",
    ));
    let mut ds_annotations = subnet_annotation("subnet-6", "+1");
    ds_annotations
        .as_object_mut()
        .unwrap()
        .remove("ipam.spidernet.io/ippool-ip-number");
    let ds = workload("DaemonSet", "agentd", 0, ds_annotations, "a");
    // Every node: drop the node selector.
    let mut ds: Value = serde_json::from_str(&ds).unwrap();
    ds["spec"]["template"]["spec"]
        .as_object_mut()
        .unwrap()
        .remove("nodeSelector");
    apply(&ds.to_string());
    apply(&workload(
        "Job",
        "batch",
        1,
        subnet_annotation("subnet-6", "+0"),
        "a",
    ));
    pool_sized(cp, "StatefulSet", "db", "eth0", 4);
    pool_sized(cp, "DaemonSet", "agentd", "eth0", 3);
    pool_sized(cp, "Job", "batch", "eth0", 1);
    running_pods(cp, "db-", 2);
    running_pods(cp, "agentd-", 2);
    running_pods(cp, "batch-", 1);
    subnet_gives(cp, "subnet-6", 2 + 4 + 3 + 1);

    // A pod whose subnet does not exist waits, then fails with try-again-later.
    apply(&workload(
        "Deployment",
        "lost",
        1,
        subnet_annotation("nope", "+1"),
        "b",
    ));
    let lost = until("the lost Deployment's pod", || {
        pods(cp, "lost-").1.eq(&1).then(|| {
            json_of(cp, &["get", "pods", "-l", "app=lost"])["items"][0]["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
    });
    let why = cni_failure(cp, &lost);
    assert!(
        why.contains("\"code\": 11")
            && why.contains("no auto-created IPv4 IPPool of SpiderSubnet")
            && why.contains("nope")
            && why.contains("waited 8s for the controller"),
        "{why}"
    );
    let said = events_of(cp, "lost", "AutoPoolFailed");
    assert!(
        said.contains("SpiderSubnet \"nope\" named for interface eth0 does not exist"),
        "{said}"
    );
    cp.kubectl_ok(&["delete", "deployment", "lost"], "");

    // I00012: two NICs, a pool each from their own subnet.
    let two = json!({"ipam.spidernet.io/subnets": json!([
        {"interface": "eth0", "ipv4": ["subnet-6"]}, {"interface": "net1", "ipv4": ["subnet-7"]}]).to_string(),
        "ipam.spidernet.io/ippool-ip-number": "+1"});
    apply(&workload("Deployment", "multi", 1, two.clone(), "a"));
    let eth0 = pool_sized(cp, "Deployment", "multi", "eth0", 2);
    let net1 = pool_sized(cp, "Deployment", "multi", "net1", 2);
    assert!(eth0["metadata"]["name"]
        .as_str()
        .unwrap()
        .starts_with("auto4-multi-eth0-"));
    assert!(net1["metadata"]["name"]
        .as_str()
        .unwrap()
        .starts_with("auto4-multi-net1-"));
    assert_eq!(net1["spec"]["subnet"], "10.7.0.0/16");
    running_pods(cp, "multi-", 1);
    subnet_gives(cp, "subnet-6", 12);
    subnet_gives(cp, "subnet-7", 2);

    // I00015, I00021: with ippool-reclaim "false" the pools outlive the Deployment, and the next
    // Deployment of that name takes them over (both NICs); I00016: a StatefulSet of that name
    // does not.
    let mut keep = two.clone();
    keep["ipam.spidernet.io/ippool-reclaim"] = "false".into();
    apply(&workload("Deployment", "keep", 1, keep.clone(), "a"));
    let first: Vec<String> = ["eth0", "net1"]
        .iter()
        .map(|nic| {
            pool_sized(cp, "Deployment", "keep", nic, 2)["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    running_pods(cp, "keep-", 1);
    cp.kubectl_ok(&["delete", "deployment", "keep"], "");
    until("the keep pods gone", || {
        (pods(cp, "keep-").1 == 0).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    for n in &first {
        let p = json_of(cp, &["get", "spiderippool", n]);
        assert!(
            p["metadata"]["deletionTimestamp"].is_null(),
            "{n} was deleted"
        );
    }
    subnet_gives(cp, "subnet-6", 14);
    apply(&workload("Deployment", "keep", 1, keep, "a"));
    let new_uid = until("the new keep Deployment", || {
        json_of(cp, &["get", "deployment", "keep"])["metadata"]["uid"]
            .as_str()
            .map(String::from)
    });
    until("the reserved pools taken over", || {
        let ps = pools_of(cp, "Deployment", "keep");
        let names: Vec<&str> = ps
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str())
            .collect();
        let adopted = ps.iter().all(|p| {
            p["metadata"]["labels"]["ipam.spidernet.io/owner-application-uid"] == new_uid.as_str()
        });
        (ps.len() == 2 && adopted && first.iter().all(|n| names.contains(&n.as_str())))
            .then_some(())
    });
    running_pods(cp, "keep-", 1);
    apply(&workload(
        "StatefulSet",
        "keep",
        1,
        subnet_annotation("subnet-6", "+0"),
        "a",
    ));
    let sts = pool_sized(cp, "StatefulSet", "keep", "eth0", 1);
    assert!(!first.contains(&sts["metadata"]["name"].as_str().unwrap().to_string()));
    cp.kubectl_ok(&["delete", "statefulset", "keep"], "");

    // I00019: switched to reclaim "true", the taken-over pools go with the Deployment.
    cp.kubectl_ok(
        &["patch", "deployment", "keep", "--type=merge", "-p",
          r#"{"spec":{"template":{"metadata":{"annotations":{"ipam.spidernet.io/ippool-reclaim":"true"}}}}}"#],
        "",
    );
    until("the keep pools reclaimable", || {
        pools_of(cp, "Deployment", "keep")
            .iter()
            .all(|p| p["metadata"]["labels"]["ipam.spidernet.io/ippool-reclaim"] == "true")
            .then_some(())
    });
    cp.kubectl_ok(&["delete", "deployment", "keep"], "");
    until("the keep pools deleted", || {
        first
            .iter()
            .all(|n| !cp.kubectl(&["get", "spiderippool", n], "").success)
            .then_some(())
    });

    // I00022: dirty data in the subnet's status is recycled.
    cp.kubectl_ok(
        &["patch", "spidersubnet", "subnet-6", "--subresource=status", "--type=merge", "-p",
          r#"{"status":{"controlledIPPools":"{\"auto4-ghost-eth0-00000\":{\"ips\":[\"10.6.168.190\"],\"application\":\"apps_v1_Deployment_default_ghost\"}}","allocatedIPCount":99}}"#],
        "",
    );
    until("the dirty entry recycled", || {
        let (_, _, controlled) = subnet_status(cp, "subnet-6");
        controlled
            .get("auto4-ghost-eth0-00000")
            .is_none()
            .then_some(())
    });
    subnet_gives(cp, "subnet-6", 12);

    // I00017: an application name longer than a label value.
    let long = format!("long-{}", "x".repeat(90));
    apply(&workload(
        "Deployment",
        &long,
        1,
        subnet_annotation("subnet-6", "+0"),
        "a",
    ));
    let p = pool_sized(cp, "Deployment", &long, "eth0", 1);
    let label = p["metadata"]["labels"]["ipam.spidernet.io/owner-application-name"]
        .as_str()
        .unwrap();
    assert_eq!(label.len(), 63, "{label}");
    assert!(p["metadata"]["name"]
        .as_str()
        .unwrap()
        .starts_with(&format!("auto4-{long}-eth0-")));
    running_pods(cp, "long-", 1);
    cp.kubectl_ok(&["delete", "deployment", &long, "--wait=false"], "");

    // I00003: the pools survive a controller restart unchanged.
    let before = pool_sized(cp, "Deployment", "web", "eth0", 2)["spec"]["ips"].clone();
    let mut first_controller = w.controller;
    first_controller.kill();
    let again = controller(cp, w.dir.path(), "ap-c2");
    until("the new controller leads", || {
        (again.metric("spiderpool_controller_leader") == 1.0).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(
        pool_sized(cp, "Deployment", "web", "eth0", 2)["spec"]["ips"],
        before
    );

    // Everything deleted: every auto pool goes and the subnets are as they started.
    for (kind, name) in [
        ("deployment", "web"),
        ("statefulset", "db"),
        ("daemonset", "agentd"),
        ("job", "batch"),
        ("deployment", "multi"),
    ] {
        cp.kubectl_ok(&["delete", kind, name, "--wait=false"], "");
    }
    until("every auto pool gone", || {
        let v = json_of(cp, &["get", "spiderippools"]);
        v["items"].as_array().unwrap().is_empty().then_some(())
    });
    subnet_gives(cp, "subnet-6", 0);
    subnet_gives(cp, "subnet-7", 0);
    let (t6, _, _) = subnet_status(cp, "subnet-6");
    assert_eq!(t6, 95);
    drop(again);
}

#[test]
fn i00006_i00008_thirty_deployments_scaled_at_once_leave_the_subnet_as_it_started() {
    let Some(w) = world(
        "sc",
        &[subnet(
            "subnet-6",
            "10.6.0.0/16",
            "10.6.168.1-10.6.168.150",
            &[],
            "10.6.0.1",
        )],
    ) else {
        return;
    };
    let cp = &w.cp;
    until("the subnet's counts", || {
        let (t, a, _) = subnet_status(cp, "subnet-6");
        (t == 150 && a == 0).then_some(())
    });
    // Pods on both nodes: no node selector in this scenario.
    let t = deployments_scale(
        cp,
        30,
        &Addressing::AutoPools {
            subnet: "subnet-6",
            ip_number: "+1",
        },
    );
    eprintln!(
        "30 Deployments with auto pools: create {:.1} s, scale 2→3→1 {:.1} s, delete {:.1} s",
        t.create.as_secs_f64(),
        t.scale.as_secs_f64(),
        t.delete.as_secs_f64()
    );
    assert!(auto_pool_sizes(cp).is_empty());
    subnet_gives(cp, "subnet-6", 0);
    let (t, _, controlled) = subnet_status(cp, "subnet-6");
    assert_eq!((t, controlled), (150, json!({})));
}
