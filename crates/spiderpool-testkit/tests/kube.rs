//! The local control plane the Kubernetes-mode tests stand on: real etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler, driven by the real kubectl.

use spiderpool_testkit::{kube_bin, ControlPlane};

#[test]
fn the_control_plane_serves_kubectl_with_rbac_and_places_workloads() {
    let Some(bin) = kube_bin() else { return };
    let cp = ControlPlane::start(&bin, true);
    let version = cp.kubectl_ok(&["version", "-o", "json"], "");
    assert!(version.contains("\"gitVersion\": \"v1.36"), "{version}");
    // RBAC is on: the admin may, an unknown user may not.
    assert_eq!(
        cp.kubectl_ok(&["auth", "can-i", "create", "pods"], "")
            .trim(),
        "yes"
    );
    let out = cp.kubectl(&["auth", "can-i", "create", "pods", "--as", "nobody"], "");
    assert_eq!(out.stdout.trim(), "no", "{}", out.stderr);
    // The controller-manager turns a Deployment into pods, which wait for a node.
    cp.kubectl_ok(
        &[
            "create",
            "deployment",
            "web",
            "--image=registry.invalid/web",
            "--replicas=2",
        ],
        "",
    );
    let pods = pods_when(&cp, "app=web", |p| p.len() == 2);
    assert!(
        pods.iter().all(|p| p["spec"]["nodeName"].is_null()),
        "no node yet"
    );
}

/// The workspace's root.
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn crds_in_deploy_are_what_the_rust_types_generate() {
    let update = std::env::var("SPIDERPOOL_UPDATE_CRDS").as_deref() == Ok("1");
    // The chart carries the same files.
    for at in ["deploy/crds", "deploy/helm/spiderpool/crds"] {
        let dir = root().join(at);
        for (name, yaml) in spiderpool_api::kube::crd_files() {
            let path = dir.join(&name);
            if update {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &yaml).unwrap();
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == yaml,
                "{at}/{name} differs from what the types generate; regenerate with \
                 SPIDERPOOL_UPDATE_CRDS=1 cargo test -p spiderpool-testkit --test kube crds"
            );
        }
    }
}

#[test]
fn the_seed_pools_apply_through_kubectl_and_print_the_seed_columns() {
    let Some(bin) = kube_bin() else { return };
    let cp = ControlPlane::start(&bin, false);
    cp.install_crds();
    // The seed's manifests, unchanged.
    let seed = root().join("examples/seed-zones/manifests");
    for f in ["02-subnets.yaml", "03-ippools.yaml"] {
        cp.kubectl_ok(&["apply", "-f", seed.join(f).to_str().unwrap()], "");
    }
    let table = cp.kubectl_ok(&["get", "spiderippool"], "");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "VERSION",
            "SUBNET",
            "ALLOCATED-IP-COUNT",
            "TOTAL-IP-COUNT",
            "DEFAULT",
            "DISABLE",
        ],
        "{table}"
    );
    assert!(
        table.contains("test-ippool-6") && table.contains("10.6.0.0/16"),
        "{table}"
    );
    let wide = cp.kubectl_ok(&["get", "sp", "-o", "wide"], "");
    assert!(
        wide.lines().next().unwrap().contains("APP-NAMESPACE"),
        "{wide}"
    );
    let subnets = cp.kubectl_ok(&["get", "ss"], "");
    assert!(
        subnets.contains("subnet-6") && subnets.contains("10.6.0.0/16"),
        "{subnets}"
    );
    // The category lists them all.
    let all = cp.kubectl_ok(&["get", "spiderpool", "-o", "name"], "");
    assert!(
        all.contains("spiderippool.spiderpool.spidernet.io/test-ippool-7"),
        "{all}"
    );
    // The status subresource is there: a status written through it shows in the columns.
    cp.kubectl_ok(
        &[
            "patch",
            "spiderippool",
            "test-ippool-6",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"allocatedIPCount":1,"totalIPCount":10}}"#,
        ],
        "",
    );
    let row = cp.kubectl_ok(&["get", "sp", "test-ippool-6", "--no-headers"], "");
    // (VERSION stays empty until the controller's mutating webhook derives it from the subnet.)
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols,
        ["test-ippool-6", "10.6.0.0/16", "1", "10", "false", "false"],
        "{row}"
    );
}

/// A network namespace standing in for a node, with a veth end `ens192` as macvlan master.
fn node_netns(name: &str) -> spiderpool_testkit::Netns {
    let ns = spiderpool_testkit::Netns::new(name);
    spiderpool_testkit::sh(&[
        "ip", "-n", name, "link", "add", "ens192", "type", "veth", "peer", "name", "sw0",
    ]);
    for l in ["ens192", "sw0", "lo"] {
        spiderpool_testkit::sh(&["ip", "-n", name, "link", "set", l, "up"]);
    }
    ns
}

fn macvlan_host_local(name: &str, subnet: &str, data_dir: &std::path::Path) -> serde_json::Value {
    serde_json::json!({"cniVersion": "1.0.0", "name": name, "plugins": [{
        "type": "macvlan", "master": "ens192", "mode": "bridge",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": data_dir}}]})
}

/// Pods of `selector` as JSON, once `ready(pods)` holds (panics after 60 s).
fn pods_when(
    cp: &ControlPlane,
    selector: &str,
    ready: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = cp.kubectl_ok(&["get", "pods", "-l", selector, "-o", "json"], "");
        let items = serde_json::from_str::<serde_json::Value>(&out).unwrap()["items"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if ready(&items) {
            return items;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pods {selector} never got there: {out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn running_ready(p: &serde_json::Value) -> bool {
    p["status"]["phase"] == "Running"
        && p["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        && p["metadata"]["deletionTimestamp"].is_null()
}

/// The address the pod's own network namespace has on eth0.
fn eth0_of(pod: &serde_json::Value) -> String {
    let uid = pod["metadata"]["uid"].as_str().unwrap().replace('-', "");
    let out = spiderpool_testkit::sh(&[
        "ip",
        "-n",
        &format!("sim-{}", &uid[..12]),
        "-4",
        "-o",
        "addr",
        "show",
        "eth0",
    ]);
    out.split_whitespace()
        .nth(3)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn the_node_simulator_runs_each_pods_cni_chain_like_a_runtime() {
    use spiderpool_testkit::{is_root, NodeSim, NodeSpec};
    let Some(bin) = kube_bin() else { return };
    if !is_root() {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let cp = ControlPlane::start(&bin, true);
    cp.kubectl_ok(
        &[
            "apply",
            "-f",
            root()
                .join("deploy/crds/k8s.cni.cncf.io_network-attachment-definitions.yaml")
                .to_str()
                .unwrap(),
        ],
        "",
    );
    cp.kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/network-attachment-definitions.k8s.cni.cncf.io",
        ],
        "",
    );
    let data = tempfile::tempdir().unwrap();
    let _host = node_netns("simnode-a");
    let other = macvlan_host_local("other-net", "10.9.1.0/24", data.path());
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &serde_json::json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": "other", "namespace": "default"}, "spec": {"config": other.to_string()}})
        .to_string(),
    );
    let mut sim = NodeSim::start(
        &cp.kubeconfig,
        NodeSpec {
            name: "node-a".into(),
            labels: [("node-subnet".to_string(), "subnet-9".to_string())].into(),
            host_netns: Some("simnode-a".into()),
            cni_path: vec!["/usr/lib/cni".into()],
            default_network: macvlan_host_local("sim-net", "10.9.0.0/24", data.path()),
            run_dir: None,
        },
    );
    // The node is Ready and has its Lease.
    let node = cp.kubectl_ok(&["get", "node", "node-a", "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.metadata.labels.node-subnet}"], "");
    assert_eq!(node, "True subnet-9");
    cp.kubectl_ok(&["get", "lease", "-n", "kube-node-lease", "node-a"], "");

    // A Deployment's pods, placed by the real scheduler, get addresses from the node's network.
    cp.kubectl_ok(
        &[
            "create",
            "deployment",
            "web",
            "--image=registry.invalid/web",
            "--replicas=2",
        ],
        "",
    );
    let pods = pods_when(&cp, "app=web", |p| {
        p.len() == 2 && p.iter().all(running_ready)
    });
    let mut ips = Vec::new();
    for p in &pods {
        let ip = p["status"]["podIP"].as_str().unwrap().to_string();
        assert!(ip.starts_with("10.9.0."), "{p}");
        assert_eq!(eth0_of(p), ip, "the pod's namespace has its address");
        assert_eq!(p["spec"]["nodeName"], "node-a");
        ips.push(ip);
    }
    assert_ne!(ips[0], ips[1]);
    // A pod naming a NAD as its default network gets that network.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nad-pod", "namespace": "default", "labels": {"app": "nad"},
            "annotations": {"v1.multus-cni.io/default-network": "default/other"}},
            "spec": {"containers": [{"name": "c", "image": "registry.invalid/c"}]}}"#,
    );
    let nad_pod = pods_when(&cp, "app=nad", |p| {
        p.len() == 1 && p.iter().all(running_ready)
    });
    assert!(
        nad_pod[0]["status"]["podIP"]
            .as_str()
            .unwrap()
            .starts_with("10.9.1."),
        "{}",
        nad_pod[0]
    );

    // Scaling down runs DEL: the address goes back to host-local and the namespace is gone.
    let held = |net: &str| {
        std::fs::read_dir(data.path().join(net))
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with("10.")
                })
                .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(held("sim-net"), 2);
    cp.kubectl_ok(&["scale", "deployment", "web", "--replicas=1"], "");
    let left = pods_when(&cp, "app=web", |p| p.len() == 1);
    assert!(running_ready(&left[0]));
    assert_eq!(held("sim-net"), 1);
    let netns = spiderpool_testkit::sh(&["ip", "netns", "list"]);
    assert_eq!(netns.matches("sim-").count(), 2, "{netns}");

    // A node that died: deleting its pod runs no DEL, so the pod stays terminating and its
    // address stays held (what the controller's reclaim is for).
    sim.stop();
    cp.kubectl_ok(
        &[
            "delete",
            "pod",
            left[0]["metadata"]["name"].as_str().unwrap(),
            "--wait=false",
        ],
        "",
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    let still = pods_when(&cp, "app=web", |p| {
        p.iter()
            .any(|p| !p["metadata"]["deletionTimestamp"].is_null())
    });
    assert!(!still.is_empty());
    assert_eq!(held("sim-net"), 1);
    // Leave no namespace behind.
    for p in [&left[0], &nad_pod[0]] {
        let uid = p["metadata"]["uid"].as_str().unwrap().replace('-', "");
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &format!("sim-{}", &uid[..12])])
            .output();
    }
}
