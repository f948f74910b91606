//! Kubernetes mode end to end: agents with `--datastore kubernetes` on a real control plane,
//! pods created by the real DaemonSet controller and placed by the real scheduler, their CNI
//! chains run by the node simulator through Debian's macvlan and the `spiderpool` plugin.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spiderpool_testkit::{bin, is_root, kube_bin, sh, Agent, ControlPlane, Netns, NodeSim, NodeSpec};

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The seed's zones: a router namespace with the gateways, one namespace per node with a veth
/// end `ens192` as macvlan master.
struct Zones {
    _router: Netns,
    _nodes: Vec<Netns>,
}

fn zones(prefix: &str, nodes: &[(&str, &str)]) -> Zones {
    let router = Netns::new(&format!("{prefix}-r"));
    sh(&["ip", "netns", "exec", &router.name, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let mut out = Vec::new();
    for (i, (node, gw)) in nodes.iter().enumerate() {
        let ns = Netns::new(node);
        let up = format!("up{i}");
        sh(&[
            "ip", "link", "add", "ens192", "netns", &ns.name, "type", "veth", "peer", "name", &up,
            "netns", &router.name,
        ]);
        sh(&["ip", "-n", &ns.name, "link", "set", "ens192", "up"]);
        sh(&["ip", "-n", &router.name, "addr", "add", gw, "dev", &up]);
        sh(&["ip", "-n", &router.name, "link", "set", &up, "up"]);
        out.push(ns);
    }
    Zones {
        _router: router,
        _nodes: out,
    }
}

/// The seed's NAD without its `veth` plugin (Spiderpool's own, not Debian's; issue 13).
fn macvlan_nad() -> String {
    json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": "macvlan-conf", "namespace": "kube-system"},
        "spec": {"config": json!({"cniVersion": "0.3.1", "name": "macvlan-conf", "plugins": [
            {"type": "macvlan", "master": "ens192", "mode": "bridge", "ipam": {"type": "spiderpool"}}
        ]}).to_string()}})
    .to_string()
}

/// A simulated node whose plugins reach its own agent at `/var/run/spidernet`.
struct Node {
    sim: NodeSim,
    agent: Agent,
    _dir: tempfile::TempDir,
}

fn node(cp: &ControlPlane, name: &str, labels: &[(&str, &str)], netns: &str, extra: &[&str]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let cni = dir.path().join("cni-bin");
    std::fs::create_dir_all(&cni).unwrap();
    std::os::unix::fs::symlink("/usr/lib/cni/macvlan", cni.join("macvlan")).unwrap();
    std::os::unix::fs::symlink(bin("spiderpool"), cni.join("spiderpool")).unwrap();
    let sim = NodeSim::start(
        &cp.kubeconfig,
        NodeSpec {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            host_netns: Some(netns.into()),
            cni_path: vec![cni],
            default_network: json!({}),
            run_dir: Some(dir.path().into()),
        },
    );
    let kc = cp.kubeconfig.to_str().unwrap().to_string();
    let mut flags = vec!["--kubeconfig", kc.as_str()];
    flags.extend_from_slice(extra);
    let agent = Agent::start_with(
        "kubernetes",
        &dir.path().join("spiderpool.sock"),
        name,
        "",
        &flags,
        None,
    );
    Node {
        sim,
        agent,
        _dir: dir,
    }
}

fn json_of(cp: &ControlPlane, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&cp.kubectl_ok(&a, "")).unwrap()
}

/// Waits (60 s at most) until `f` answers.
fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn running(p: &Value) -> bool {
    p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
}

#[test]
fn the_seed_runs_on_the_cluster_with_agents_on_the_kubernetes_api() {
    let Some(kbin) = kube_bin() else { return };
    if !is_root() {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let cp = ControlPlane::start(&kbin, true);
    cp.install_crds();
    let _zones = zones("kz", &[("kz-ctrl", "10.6.0.1/16"), ("kz-work", "10.7.0.1/16")]);
    let nodes = [
        node(&cp, "controller-node-1", &[("node-subnet", "subnet-6")], "kz-ctrl", &[]),
        node(&cp, "worker-node-1", &[("node-subnet", "subnet-7")], "kz-work", &[]),
    ];
    let seed = root().join("examples/seed-zones/manifests");
    for f in ["02-subnets.yaml", "03-ippools.yaml"] {
        cp.kubectl_ok(&["apply", "-f", seed.join(f).to_str().unwrap()], "");
    }
    cp.kubectl_ok(&["apply", "-f", "-"], &macvlan_nad());
    cp.kubectl_ok(
        &["apply", "-f", seed.join("05-daemonset.yaml").to_str().unwrap()],
        "",
    );

    // One pod per node, each with its zone's first address.
    let pods = until("both DaemonSet pods running", || {
        let items = json_of(&cp, &["get", "pods", "-l", "app=test-app"])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        (items.len() == 2 && items.iter().all(running)).then_some(items)
    });
    let mut by_node = std::collections::BTreeMap::new();
    for p in &pods {
        by_node.insert(
            p["spec"]["nodeName"].as_str().unwrap().to_string(),
            p.clone(),
        );
    }
    let ip = |n: &str| by_node[n]["status"]["podIP"].as_str().unwrap().to_string();
    assert_eq!(ip("controller-node-1"), "10.6.168.60");
    assert_eq!(ip("worker-node-1"), "10.7.168.60");

    // kubectl shows the seed's columns: one of ten allocated in each pool.
    let table = cp.kubectl_ok(&["get", "spiderippool", "--no-headers"], "");
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            ["test-ippool-6", "10.6.0.0/16", "1", "10", "false", "false"],
            ["test-ippool-7", "10.7.0.0/16", "1", "10", "false", "false"]
        ],
        "{table}"
    );
    // The pool status is upstream's: a JSON string of address → pod and pod UID.
    let pool = json_of(&cp, &["get", "spiderippool", "test-ippool-6"]);
    let records: Value =
        serde_json::from_str(pool["status"]["allocatedIPs"].as_str().unwrap()).unwrap();
    let pod6 = &by_node["controller-node-1"];
    assert_eq!(
        records["10.6.168.60"]["pod"],
        format!("default/{}", pod6["metadata"]["name"].as_str().unwrap())
    );
    assert_eq!(records["10.6.168.60"]["podUid"], pod6["metadata"]["uid"]);
    // The SpiderEndpoint is upstream's shape, named after the pod and owned by it.
    let name6 = pod6["metadata"]["name"].as_str().unwrap();
    let ep = json_of(&cp, &["get", "spiderendpoint", name6]);
    assert_eq!(ep["status"]["current"]["uid"], pod6["metadata"]["uid"]);
    assert_eq!(ep["status"]["current"]["node"], "controller-node-1");
    let nic = &ep["status"]["current"]["ips"][0];
    assert_eq!(nic["interface"], "eth0");
    assert_eq!(nic["ipv4"], "10.6.168.60/16");
    assert_eq!(nic["ipv4Pool"], "test-ippool-6");
    assert_eq!(nic["ipv4Gateway"], "10.6.0.1");
    assert_eq!(ep["status"]["ownerControllerType"], "DaemonSet");
    assert_eq!(ep["metadata"]["ownerReferences"][0]["uid"], pod6["metadata"]["uid"]);
    let se = cp.kubectl_ok(&["get", "se", name6, "--no-headers"], "");
    assert!(
        se.contains("eth0") && se.contains("10.6.168.60/16") && se.contains("controller-node-1"),
        "{se}"
    );

    // Across the zones through the router: ttl 63.
    let netns_of = |p: &Value| {
        format!(
            "sim-{}",
            &p["metadata"]["uid"].as_str().unwrap().replace('-', "")[..12]
        )
    };
    let ping = sh(&[
        "ip",
        "netns",
        "exec",
        &netns_of(pod6),
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        &ip("worker-node-1"),
    ]);
    assert!(ping.contains("ttl=63"), "{ping}");

    // Deleting the DaemonSet frees both addresses and both records.
    cp.kubectl_ok(&["delete", "daemonset", "test-app"], "");
    until("both pools empty", || {
        let pools = json_of(&cp, &["get", "spiderippool"]);
        pools["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"]["allocatedIPCount"] == 0 && p["status"]["allocatedIPs"].is_null())
            .then_some(())
    });
    until("no endpoint left", || {
        json_of(&cp, &["get", "spiderendpoints", "-A"])["items"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
    for n in &nodes {
        assert!(n.agent.log().contains("datastore"), "{}", n.agent.log());
        let _ = &n.sim;
    }
}
