//! Kubernetes mode end to end: agents with `--datastore kubernetes` on a real control plane,
//! pods created by the real DaemonSet controller and placed by the real scheduler, their CNI
//! chains run by the node simulator through Debian's macvlan and the `spiderpool` plugin.

use std::path::Path;

use serde_json::{json, Value};
use spiderpool_testkit::{
    bin, http_get_in, is_root, json_of, kube_bin, kube_node as node, macvlan_nad, running, sh,
    until, zones, Agent, ControlPlane, KubeProxy,
};

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
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
    let _zones = zones(
        "kz",
        &[("kz-ctrl", "10.6.0.1/16"), ("kz-work", "10.7.0.1/16")],
    );
    let nodes = [
        node(
            &cp,
            "controller-node-1",
            &[("node-subnet", "subnet-6")],
            "kz-ctrl",
            &[],
        ),
        node(
            &cp,
            "worker-node-1",
            &[("node-subnet", "subnet-7")],
            "kz-work",
            &[],
        ),
    ];
    // A real kube-proxy per node, in the node's namespace.
    let _proxies = [
        KubeProxy::start(&cp, "controller-node-1", "kz-ctrl"),
        KubeProxy::start(&cp, "worker-node-1", "kz-work"),
    ];
    let seed = root().join("examples/seed-zones/manifests");
    for f in ["02-subnets.yaml", "03-ippools.yaml"] {
        cp.kubectl_ok(&["apply", "-f", seed.join(f).to_str().unwrap()], "");
    }
    cp.kubectl_ok(&["apply", "-f", "-"], &macvlan_nad());
    cp.kubectl_ok(
        &[
            "apply",
            "-f",
            seed.join("05-daemonset.yaml").to_str().unwrap(),
        ],
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
    assert_eq!(
        ep["metadata"]["ownerReferences"][0]["uid"],
        pod6["metadata"]["uid"]
    );
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

    // The NAD's `veth` (the coordinator, chained after macvlan): a veth pair to the node,
    // routes to the node and the Service CIDR through it, the node's route back to the pod.
    let pod_routes = sh(&["ip", "-n", &netns_of(pod6), "route"]);
    assert!(
        pod_routes.contains("10.6.0.2 dev veth0 scope link")
            && pod_routes.contains("10.233.0.0/18 via 10.6.0.2 dev veth0"),
        "{pod_routes}"
    );
    let node_routes = sh(&["ip", "-n", "kz-ctrl", "route", "show", "table", "500"]);
    assert!(
        node_routes
            .lines()
            .any(|l| l.starts_with("10.6.168.60 dev veth") && l.contains("scope link")),
        "{node_routes}"
    );
    let rules = sh(&["ip", "-n", "kz-ctrl", "rule"]);
    assert!(
        rules.contains("1000:\tfrom all to 10.6.168.60 lookup 500"),
        "{rules}"
    );
    let to_node = sh(&[
        "ip",
        "netns",
        "exec",
        &netns_of(pod6),
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "10.6.0.2",
    ]);
    assert!(to_node.contains("ttl=64"), "{to_node}");

    // Services: a NodePort Service whose only endpoint is the pod on worker-node-1 (the
    // simulated nginx answers with its pod's name), in an EndpointSlice of the real
    // controller-manager, reached from the pod on controller-node-1 through each node's real
    // kube-proxy: by its ClusterIP (the pod's veth to its node, where kube-proxy's rules are)
    // and by the NodePort of either node.
    let pod7 = &by_node["worker-node-1"];
    let name7 = pod7["metadata"]["name"].as_str().unwrap();
    cp.kubectl_ok(&["label", "pod", name7, "serve=worker"], "");
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        r#"{"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "test-app-worker", "namespace": "default"},
            "spec": {"type": "NodePort", "selector": {"app": "test-app", "serve": "worker"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}"#,
    );
    let svc = json_of(&cp, &["get", "service", "test-app-worker"]);
    let cluster_ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let node_port = svc["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    assert!(cluster_ip.starts_with("10.233."), "{svc}");
    let slice = until("the Service's EndpointSlice names the worker's pod", || {
        let slices = json_of(
            &cp,
            &[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=test-app-worker",
            ],
        );
        let s = slices["items"].get(0)?.clone();
        (s["endpoints"].as_array()?.len() == 1).then_some(s)
    });
    assert_eq!(slice["endpoints"][0]["addresses"][0], ip("worker-node-1"));
    assert_eq!(slice["endpoints"][0]["nodeName"], "worker-node-1");
    let targets = [
        ("the ClusterIP", format!("{cluster_ip}:80")),
        (
            "the NodePort of controller-node-1",
            format!("10.6.0.2:{node_port}"),
        ),
        (
            "the NodePort of worker-node-1",
            format!("10.7.0.2:{node_port}"),
        ),
    ];
    for (what, addr) in &targets {
        let addr = addr.parse().unwrap();
        let answer = until(&format!("an answer through {what} ({addr})"), || {
            http_get_in(&netns_of(pod6), addr, "/").ok()
        });
        assert_eq!(answer, (200, format!("{name7}\n")), "through {what}");
    }
    cp.kubectl_ok(&["delete", "service", "test-app-worker"], "");

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
    // DEL removed the pairs and their routes: the nodes are as they were before any pod.
    for node in ["kz-ctrl", "kz-work"] {
        let links = sh(&["ip", "-n", node, "-o", "link"]);
        assert_eq!(links.lines().count(), 2, "lo and ens192 only: {links}");
        let routes = sh(&["ip", "-n", node, "route"]);
        assert_eq!(
            routes.lines().count(),
            2,
            "default and the zone's: {routes}"
        );
        let table = sh(&["ip", "-n", node, "route", "show", "table", "500"]);
        assert_eq!(table, "", "no pod routes left");
        let rules = sh(&["ip", "-n", node, "rule"]);
        assert_eq!(rules.lines().count(), 3, "local, main and default: {rules}");
    }
    for n in &nodes {
        assert!(n.agent.log().contains("datastore"), "{}", n.agent.log());
        let _ = &n.sim;
    }
}

/// A Node object, as kubelet registers it.
fn register(cp: &ControlPlane, node: &str) {
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}).to_string(),
    );
}

/// A pool `name` of the addresses `ips` (in 10.9.0.0/16), Node `node-a` and its agent (with
/// `extra` flags): the agent's directory (keep it while the agent runs), the agent, and a CNI
/// config that names the pool.
fn pool_on_node_a(
    cp: &ControlPlane,
    name: &str,
    ips: &str,
    extra: &[&str],
) -> (tempfile::TempDir, Agent, serde_json::Value) {
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &format!("apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {{name: {name}}}\nspec:\n  subnet: 10.9.0.0/16\n  ips: [{ips}]\n"),
    );
    register(cp, "node-a");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node-a.sock");
    let agent = Agent::on_cluster(cp, &socket, "node-a", extra);
    let conf = json!({"cniVersion": "1.0.0", "name": name, "ipam": {"type": "spiderpool",
        "ipam_unix_socket_path": socket, "default_ipv4_ippool": [name]}});
    (dir, agent, conf)
}

/// A counter's value in the agent's metrics.
fn metric(body: &str, name: &str) -> u64 {
    spiderpool_testkit::sample(body, name) as u64
}

/// A control plane that keeps an audit log, with the project's CRDs.
fn audited_control_plane(kbin: &Path) -> ControlPlane {
    let cp = ControlPlane::start_with(
        kbin,
        spiderpool_testkit::ControlPlaneOptions {
            audit: true,
            ..Default::default()
        },
    );
    cp.install_crds();
    cp
}

/// The user node-a's agent from [`agent_of_its_own_on_node_a`] runs as.
const AGENT_USER: &str = "agent-node-a";

/// An agent for node-a running as a user of its own ([`AGENT_USER`]), so its requests can be
/// told apart in the audit log; with its socket.
fn agent_of_its_own_on_node_a(cp: &ControlPlane) -> (tempfile::TempDir, Agent, std::path::PathBuf) {
    let kubeconfig = cp.client_kubeconfig(AGENT_USER, &["system:masters"]);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node-a.sock");
    let agent = Agent::start_with(
        "kubernetes",
        &socket,
        "node-a",
        "",
        &["--kubeconfig", kubeconfig.to_str().unwrap()],
        None,
    );
    (dir, agent, socket)
}

/// How many `verb` requests on `resource` the agent's user made, from the audit log.
fn agent_requests(cp: &ControlPlane, verb: &str, resource: &str) -> u64 {
    cp.requests_by(AGENT_USER)
        .get(&(verb.to_string(), resource.to_string()))
        .copied()
        .unwrap_or(0)
}

#[test]
fn two_agents_racing_for_one_pool_never_give_an_address_twice() {
    use spiderpool_testkit::CniCall;
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    // 40 addresses, 60 pods: every address goes out once, the last 20 pods hear "exhausted".
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: race}\nspec:\n  subnet: 10.8.0.0/16\n  ips: [10.8.0.1-10.8.0.40]\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    let mut sockets = Vec::new();
    for (i, node) in ["node-a", "node-b"].iter().enumerate() {
        register(&cp, node);
        let socket = dir.path().join(format!("{node}.sock"));
        let port = spiderpool_testkit::free_port();
        let metrics = format!("127.0.0.1:{port}");
        agents.push((
            Agent::on_cluster(&cp, &socket, node, &["--metrics-addr", &metrics]),
            metrics,
        ));
        sockets.push(socket);
        let _ = i;
    }
    let threads: Vec<_> = (0..60)
        .map(|i| {
            let socket = sockets[i % 2].clone();
            std::thread::spawn(move || {
                let conf = json!({"cniVersion": "1.0.0", "name": "race", "ipam": {"type": "spiderpool",
                    "ipam_unix_socket_path": socket, "default_ipv4_ippool": ["race"]}});
                CniCall::new("ADD", &format!("ctr-{i}"), &format!("pod-{i}"), &conf).run()
            })
        })
        .collect();
    let outs: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut won = std::collections::HashSet::new();
    let mut exhausted = 0;
    for out in &outs {
        if out.success {
            let a = out.json()["ips"][0]["address"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(won.insert(a.clone()), "{a} handed out twice");
        } else {
            assert_eq!(out.json()["code"], 100, "{}", out.stdout);
            exhausted += 1;
        }
    }
    assert_eq!((won.len(), exhausted), (40, 20));
    // The pool agrees, in upstream's format, and every record is one pod's.
    let pool = json_of(&cp, &["get", "spiderippool", "race"]);
    assert_eq!(pool["status"]["allocatedIPCount"], 40);
    let records: Value =
        serde_json::from_str(pool["status"]["allocatedIPs"].as_str().unwrap()).unwrap();
    let mut pods: Vec<&str> = records
        .as_object()
        .unwrap()
        .values()
        .map(|r| r["pod"].as_str().unwrap())
        .collect();
    pods.sort();
    pods.dedup();
    assert_eq!(pods.len(), 40);
    assert_eq!(
        json_of(&cp, &["get", "spiderendpoints"])["items"]
            .as_array()
            .unwrap()
            .len(),
        40
    );
    // What the agents wrote, and the conflicts they laid again, are counted.
    let (mut writes, mut conflicts, mut lost) = (0, 0, 0);
    for (_, metrics) in &agents {
        let (_, body) = spiderpool_testkit::http_get(metrics, "/metrics");
        writes += metric(&body, "spiderpool_agent_datastore_pool_writes_total");
        conflicts += metric(
            &body,
            "spiderpool_agent_datastore_pool_write_conflicts_total",
        );
        lost += metric(
            &body,
            "spiderpool_ipam_allocation_update_ippool_conflict_counts_total",
        );
    }
    // Every allocation was written (group commits hold several), and nothing more often than
    // once per request and retry.
    assert!((1..=40 + lost).contains(&writes), "pool writes {writes}");
    eprintln!("pool status writes {writes} for 40 allocations; 409s laid again {conflicts}; commits lost to the other agent and planned again {lost}");

    // Every pod's DEL at once: releases are group commits too, so the 40 releases cost fewer
    // pool writes than releases, and everything is given back.
    let counts = |name: &str| -> u64 {
        agents
            .iter()
            .map(|(_, m)| metric(&spiderpool_testkit::http_get(m, "/metrics").1, name))
            .sum()
    };
    let writes_before = counts("spiderpool_agent_datastore_pool_writes_total");
    let threads: Vec<_> = (0..60)
        .map(|i| {
            let socket = sockets[i % 2].clone();
            std::thread::spawn(move || {
                let conf = json!({"cniVersion": "1.0.0", "name": "race", "ipam": {"type": "spiderpool",
                    "ipam_unix_socket_path": socket, "default_ipv4_ippool": ["race"]}});
                CniCall::new("DEL", &format!("ctr-{i}"), &format!("pod-{i}"), &conf).run()
            })
        })
        .collect();
    for t in threads {
        let out = t.join().unwrap();
        assert!(out.success, "{}{}", out.stdout, out.stderr);
    }
    // The records go with the DELs; the pool writes may follow (releases held back while the
    // two agents' writes meet, within a second).
    until("the pool empty after every DEL", || {
        let pool = json_of(&cp, &["get", "spiderippool", "race"]);
        (pool["status"]["allocatedIPCount"] == 0).then_some(())
    });
    assert!(json_of(&cp, &["get", "spiderendpoints"])["items"]
        .as_array()
        .unwrap()
        .is_empty());
    let del_writes = counts("spiderpool_agent_datastore_pool_writes_total") - writes_before;
    let batches = counts("spiderpool_agent_release_group_commit_size_count");
    eprintln!("pool status writes {del_writes} for 40 releases, {batches} release group commits");
    assert!(
        del_writes < 40 && batches >= 1,
        "{del_writes} pool writes and {batches} group commits for 40 releases"
    );
}

#[test]
fn a_del_that_holds_its_release_back_answers_first_and_the_release_follows() {
    use spiderpool_testkit::CniCall;
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    let (_dir, mut agent, conf) = pool_on_node_a(
        &cp,
        "three",
        "10.9.0.1-10.9.0.3",
        &["--release-hold-back", "always"],
    );
    let call = |cmd: &str, i: usize| {
        CniCall::new(cmd, &format!("ctr-{i}"), &format!("pod-{i}"), &conf).run()
    };
    let mut addresses = Vec::new();
    for i in 0..3 {
        let out = call("ADD", i);
        assert!(out.success, "{}{}", out.stdout, out.stderr);
        addresses.push(
            out.json()["ips"][0]["address"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let out = call("ADD", 3);
    assert_eq!(out.json()["code"], 100, "the pool is full: {}", out.stdout);
    // The DEL answers once pod-1's record is written; its release is held back.
    let out = call("DEL", 1);
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    agent.wait_for_log(&["released", "pool_write_held_back=true"], 1);
    let endpoints = json_of(&cp, &["get", "spiderendpoints"]);
    assert_eq!(
        endpoints["items"].as_array().unwrap().len(),
        2,
        "{endpoints}"
    );
    // A pod that needs the room gets it at once: the agent writes what it held back first.
    let out = call("ADD", 3);
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.json()["ips"][0]["address"], addresses[1].as_str());
    // What the agent still holds back when it is stopped is written before it goes.
    for i in [0, 2, 3] {
        let out = call("DEL", i);
        assert!(out.success, "{}{}", out.stdout, out.stderr);
    }
    agent.stop();
    let pool = json_of(&cp, &["get", "spiderippool", "three"]);
    assert_eq!(pool["status"]["allocatedIPCount"], 0, "{pool}");
    assert!(
        agent.log().contains("released what DELs held back"),
        "{}",
        agent.log()
    );
}

#[test]
fn a_del_that_comes_after_its_record_was_garbage_collected_still_releases() {
    use spiderpool_testkit::CniCall;
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    let (_dir, agent, conf) = pool_on_node_a(&cp, "two", "10.9.0.1-10.9.0.2", &[]);
    let call = |cmd: &str, container: &str| CniCall::new(cmd, container, "web-0", &conf).run();
    let allocated =
        || json_of(&cp, &["get", "spiderippool", "two"])["status"]["allocatedIPCount"].clone();
    let out = call("ADD", "ctr-0");
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    agent.wait_for_log(
        &[
            "an endpoint record changed",
            "endpoint=default/web-0",
            "addresses=1",
        ],
        1,
    );
    // A Pod force-deleted (or with a grace period of 0) is gone before the runtime's DEL, and
    // the garbage collector deletes the SpiderEndpoint it owns: as it would, here.
    cp.kubectl_ok(&["delete", "spiderendpoint", "web-0"], "");
    agent.wait_for_log(
        &[
            "an endpoint record changed",
            "endpoint=default/web-0",
            "addresses=0",
        ],
        1,
    );
    assert_eq!(allocated(), 1);
    // Another container's DEL of that pod name releases nothing: the address is not its own.
    let out = call("DEL", "ctr-other");
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_eq!(
        allocated(),
        1,
        "released by a container that did not hold it"
    );
    // The holder's DEL releases it at once, not at the controller's next reclaim.
    let out = call("DEL", "ctr-0");
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_eq!(allocated(), 0, "{}", agent.log());
    agent.wait_for_log(
        &[
            "the record was deleted before this DEL",
            "container_id=ctr-0",
            "10.9.0.1",
        ],
        1,
    );
}

#[test]
fn an_add_reads_no_record_its_watch_has_not_seen_and_recovers_when_one_exists() {
    use spiderpool_testkit::CniCall;
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    let metrics = format!("127.0.0.1:{}", spiderpool_testkit::free_port());
    let (_dir, agent, conf) = pool_on_node_a(
        &cp,
        "four",
        "10.9.0.1-10.9.0.4",
        &["--metrics-addr", &metrics],
    );
    agent.wait_for_log(&["following the endpoint records"], 1);
    let lost = || {
        metric(
            &spiderpool_testkit::http_get(&metrics, "/metrics").1,
            "spiderpool_ipam_allocation_update_ippool_conflict_counts_total",
        )
    };
    // A new pod's ADD does not read a record the agent's watch says is not there.
    let out = CniCall::new("ADD", "ctr-0", "web-0", &conf).run();
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_eq!(lost(), 0);
    // A record that holds nothing is not in the agent's book: the ADD takes it for absent, its
    // create is refused, and the batch reads the record and writes it.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderEndpoint\nmetadata: {name: web-1, namespace: default}\n",
    );
    agent.wait_for_log(
        &[
            "an endpoint record changed",
            "endpoint=default/web-1",
            "addresses=0",
        ],
        1,
    );
    let out = CniCall::new("ADD", "ctr-1", "web-1", &conf).run();
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let address = out.json()["ips"][0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        lost(),
        1,
        "the create of an existing record was refused once"
    );
    let ep = json_of(&cp, &["get", "spiderendpoint", "web-1"]);
    assert_eq!(
        ep["status"]["current"]["ips"][0]["containerID"], "ctr-1",
        "{ep}"
    );
    assert_eq!(
        ep["status"]["current"]["ips"][0]["ipv4"],
        address.as_str(),
        "{ep}"
    );
    // A second NIC's ADD right after reads the record its first NIC's commit wrote (the agent
    // learns its own records at once, not when its watch tells them).
    let out = CniCall::new("ADD", "ctr-1", "web-1", &conf)
        .ifname("net1")
        .run();
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_eq!(lost(), 1, "{}", agent.log());
    let ep = json_of(&cp, &["get", "spiderendpoint", "web-1"]);
    let nics: Vec<&str> = ep["status"]["current"]["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["interface"].as_str().unwrap())
        .collect();
    assert_eq!(nics, ["eth0", "net1"], "{ep}");
    let pool = json_of(&cp, &["get", "spiderippool", "four"]);
    assert_eq!(pool["status"]["allocatedIPCount"], 3, "{pool}");
}

#[test]
fn an_add_reads_its_pod_from_the_watch_of_its_node_when_the_runtime_names_that_incarnation() {
    use spiderpool_testkit::CniCall;
    let Some(kbin) = kube_bin() else { return };
    let cp = audited_control_plane(&kbin);
    for (pool, ips) in [
        ("by-conf", "10.9.0.1-10.9.0.4"),
        ("by-pod", "10.9.1.1-10.9.1.4"),
    ] {
        cp.kubectl_ok(
            &["apply", "-f", "-"],
            &format!("apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {{name: {pool}}}\nspec:\n  subnet: 10.9.0.0/16\n  ips: [{ips}]\n"),
        );
    }
    register(&cp, "node-a");
    // A pod bound to node-a that names its pool, and one bound to another node.
    for (pod, node) in [("web-0", "node-a"), ("web-1", "node-b")] {
        cp.kubectl_ok(
            &["apply", "-f", "-"],
            &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": "default", "annotations":
                    {"ipam.spidernet.io/ippool": json!({"ipv4": ["by-pod"]}).to_string()}},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause"}]}})
            .to_string(),
        );
    }
    let uid = |pod: &str| {
        json_of(&cp, &["get", "pod", pod])["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (_dir, agent, socket) = agent_of_its_own_on_node_a(&cp);
    agent.wait_for_log(&["following the node's pods"], 1);
    let conf = json!({"cniVersion": "1.0.0", "name": "by-conf", "ipam": {"type": "spiderpool",
        "ipam_unix_socket_path": socket, "default_ipv4_ippool": ["by-conf"]}});
    let add = |pod: &str, uid: &str| {
        let mut call = CniCall::new("ADD", &format!("ctr-{pod}"), pod, &conf);
        call.args.push_str(&format!(";K8S_POD_UID={uid}"));
        let out = call.run();
        assert!(out.success, "{}{}", out.stdout, out.stderr);
        out.json()["ips"][0]["address"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let pod_gets = || agent_requests(&cp, "get", "pods");
    // web-0's ADD names the incarnation the watch has: its pod is read from memory, and its
    // annotation is honoured (the pod's pool, not the config's).
    let address = add("web-0", &uid("web-0"));
    assert!(address.starts_with("10.9.1."), "{address}");
    let ep = json_of(&cp, &["get", "spiderendpoint", "web-0"]);
    assert_eq!(
        ep["status"]["current"]["uid"],
        uid("web-0").as_str(),
        "{ep}"
    );
    assert_eq!(pod_gets(), 0, "{:?}", cp.requests_by(AGENT_USER));
    // A pod the watch of node-a does not have is read from the API, and so is one whose
    // runtime names another incarnation than the watch has.
    let address = add("web-1", &uid("web-1"));
    assert!(address.starts_with("10.9.1."), "{address}");
    assert_eq!(pod_gets(), 1, "{:?}", cp.requests_by(AGENT_USER));
    let out = CniCall::new("ADD", "ctr-web-0b", "web-0", &conf)
        .ifname("net1")
        .run();
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_eq!(pod_gets(), 2, "{:?}", cp.requests_by(AGENT_USER));
}

#[test]
fn a_del_writes_back_the_record_its_watch_keeps_without_reading_it() {
    use spiderpool_testkit::CniCall;
    let Some(kbin) = kube_bin() else { return };
    let cp = audited_control_plane(&kbin);
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: four}\nspec:\n  subnet: 10.9.0.0/16\n  ips: [10.9.0.1-10.9.0.4]\n",
    );
    register(&cp, "node-a");
    let (_dir, agent, socket) = agent_of_its_own_on_node_a(&cp);
    agent.wait_for_log(&["following the endpoint records"], 1);
    let conf = json!({"cniVersion": "1.0.0", "name": "four", "ipam": {"type": "spiderpool",
        "ipam_unix_socket_path": socket, "default_ipv4_ippool": ["four"]}});
    let call = |cmd: &str, pod: &str| {
        let out = CniCall::new(cmd, &format!("ctr-{pod}"), pod, &conf).run();
        assert!(out.success, "{cmd} {pod}: {}{}", out.stdout, out.stderr);
    };
    let endpoint_gets = || agent_requests(&cp, "get", "spiderendpoints");
    let allocated =
        || json_of(&cp, &["get", "spiderippool", "four"])["status"]["allocatedIPCount"].clone();
    let gone = |pod: &str| !cp.kubectl(&["get", "spiderendpoint", pod], "").success;
    for pod in ["web-0", "web-1"] {
        call("ADD", pod);
        // The watch brings the record the agent wrote (its own write is not kept whole: its
        // revision is the watch's to tell).
        agent.wait_for_log(
            &[
                "an endpoint record changed",
                &format!("endpoint=default/{pod}"),
                "addresses=1",
            ],
            1,
        );
    }
    assert_eq!(allocated(), 2);
    // The DEL writes back (here: deletes) the record as the watch keeps it, unread.
    let before = endpoint_gets();
    call("DEL", "web-0");
    assert_eq!(endpoint_gets(), before, "{:?}", cp.requests_by(AGENT_USER));
    assert_eq!(allocated(), 1);
    assert!(gone("web-0"));
    // Someone else writes a record just before its DEL: whether the watch has told the agent
    // yet or not (its copy then is behind, the guarded delete is refused and the DEL reads the
    // record), the address is released and the record goes.
    cp.kubectl_ok(&["annotate", "spiderendpoint", "web-1", "touched=yes"], "");
    call("DEL", "web-1");
    assert_eq!(allocated(), 0, "{}", agent.log());
    assert!(gone("web-1"), "{}", agent.log());
}

#[test]
fn pools_and_endpoints_written_by_upstream_spiderpool_round_trip() {
    use spiderpool_testkit::CniCall;
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    // As upstream v1.x stores them: records of pod and pod UID only, a JSON string in the status.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: up}\nspec:\n  ipVersion: 4\n  subnet: 10.9.0.0/16\n  ips: [10.9.0.10-10.9.0.12]\n  gateway: 10.9.0.1\n",
    );
    let upstream = r#"{"10.9.0.10":{"pod":"default/web-0","podUid":"0b6c7d2e-0000-4000-8000-000000000001"},"10.9.0.11":{"pod":"kube-system/agent-x7","podUid":"9f2e0000-0000-4000-8000-000000000002"}}"#;
    let patch =
        json!({"status": {"allocatedIPs": upstream, "allocatedIPCount": 2, "totalIPCount": 3}});
    cp.kubectl_ok(
        &[
            "patch",
            "spiderippool",
            "up",
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ],
        "",
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderEndpoint",
            "metadata": {"name": "web-0", "namespace": "default"},
            "status": {"current": {"uid": "0b6c7d2e-0000-4000-8000-000000000001", "node": "n1", "ips": [
                {"interface": "eth0", "ipv4": "10.9.0.10/16", "ipv4Pool": "up", "ipv4Gateway": "10.9.0.1",
                 "vlan": 0, "cleanGateway": false, "routes": [{"dst": "0.0.0.0/0", "gw": "10.9.0.1"}]}]},
                "ownerControllerType": "StatefulSet", "ownerControllerName": "web"}})
        .to_string(),
    );
    // spiderpoolctl reads both as they are.
    let ctl = |args: &[&str]| {
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
    };
    let out = ctl(&["get", "endpoint", "default/web-0", "-o", "json"]);
    assert!(out.success, "{}", out.stderr);
    assert_eq!(
        out.json()["status"]["current"]["ips"][0]["ipv4"],
        "10.9.0.10/16"
    );
    let out = ctl(&["get", "ippool", "up"]);
    assert!(out.success, "{}", out.stderr);
    assert!(
        out.stdout.contains("up") && out.stdout.contains(" 2 "),
        "{}",
        out.stdout
    );

    // An agent sees upstream's holders: the one address left is the only one it gives.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    register(&cp, "n1");
    let _agent = Agent::on_cluster(&cp, &socket, "n1", &[]);
    let conf = json!({"cniVersion": "1.0.0", "name": "up", "ipam": {"type": "spiderpool",
        "ipam_unix_socket_path": socket, "default_ipv4_ippool": ["up"]}});
    let first = CniCall::new("ADD", "ctr-1", "new-1", &conf).run();
    assert!(first.success, "{}", first.stdout);
    assert_eq!(first.json()["ips"][0]["address"], "10.9.0.12/16");
    let second = CniCall::new("ADD", "ctr-2", "new-2", &conf).run();
    assert_eq!(second.json()["code"], 100, "{}", second.stdout);

    // What it wrote back keeps upstream's records byte for byte and reads as upstream's type.
    let pool = json_of(&cp, &["get", "spiderippool", "up"]);
    let records: serde_json::Map<String, Value> =
        serde_json::from_str(pool["status"]["allocatedIPs"].as_str().unwrap()).unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(
        records["10.9.0.10"],
        json!({"pod": "default/web-0", "podUid": "0b6c7d2e-0000-4000-8000-000000000001"})
    );
    assert_eq!(records["10.9.0.12"]["pod"], "default/new-1");
    assert!(records["10.9.0.12"]["podUid"].is_string());
    assert_eq!(pool["status"]["allocatedIPCount"], 3);
    assert_eq!(pool["status"]["totalIPCount"], 3);
    // The upstream endpoint is untouched; the new one is in the same shape.
    let ep = json_of(&cp, &["get", "spiderendpoint", "web-0"]);
    assert_eq!(ep["status"]["current"]["ips"][0]["cleanGateway"], false);
    let ep = json_of(&cp, &["get", "spiderendpoint", "new-1"]);
    assert_eq!(ep["status"]["current"]["ips"][0]["ipv4"], "10.9.0.12/16");
    assert_eq!(ep["status"]["current"]["ips"][0]["ipv4Pool"], "up");
    // DEL gives it back and leaves upstream's holders be.
    let del = CniCall::new("DEL", "ctr-1", "new-1", &conf).run();
    assert!(del.success, "{}", del.stdout);
    let pool = json_of(&cp, &["get", "spiderippool", "up"]);
    assert_eq!(pool["status"]["allocatedIPs"].as_str().unwrap(), upstream);
    assert_eq!(pool["status"]["allocatedIPCount"], 2);
}

/// A pod upstream Spiderpool allocated before the move: its records name no container and no
/// interface, and its endpoint carries upstream's finalizer. CNI GC leaves it (it cannot be
/// matched to an attachment), a DEL while the pod lives keeps it, the DEL after the pod is
/// deleted releases it and the endpoint goes (not left Terminating).
#[test]
fn a_pod_upstream_allocated_is_released_by_its_del_after_the_move() {
    use spiderpool_testkit::CniCall;
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    register(&cp, "n1");
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: up}\nspec:\n  ipVersion: 4\n  subnet: 10.9.0.0/16\n  ips: [10.9.0.10-10.9.0.12]\n  gateway: 10.9.0.1\n",
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-7f9c-x2", "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
        .to_string(),
    );
    let uid = json_of(&cp, &["get", "pod", "web-7f9c-x2"])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let upstream = json!({"10.9.0.10": {"pod": "default/web-7f9c-x2", "podUid": uid}}).to_string();
    let patch =
        json!({"status": {"allocatedIPs": upstream, "allocatedIPCount": 1, "totalIPCount": 3}});
    cp.kubectl_ok(
        &[
            "patch",
            "spiderippool",
            "up",
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ],
        "",
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderEndpoint",
            "metadata": {"name": "web-7f9c-x2", "namespace": "default",
                "finalizers": ["spiderpool.spidernet.io"]},
            "status": {"current": {"uid": uid, "node": "n1", "ips": [
                {"interface": "eth0", "ipv4": "10.9.0.10/16", "ipv4Pool": "up", "ipv4Gateway": "10.9.0.1",
                 "vlan": 0, "cleanGateway": false}]},
                "ownerControllerType": "ReplicaSet", "ownerControllerName": "web-7f9c"}})
        .to_string(),
    );
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let agent = Agent::on_cluster(&cp, &socket, "n1", &[]);
    let held = || {
        let pool = json_of(&cp, &["get", "spiderippool", "up"]);
        serde_json::from_str::<serde_json::Map<String, Value>>(
            pool["status"]["allocatedIPs"].as_str().unwrap_or("{}"),
        )
        .unwrap()
        .keys()
        .cloned()
        .collect::<Vec<_>>()
    };
    // The runtime's CNI GC lists no attachment: a record without a container is not judged.
    let mut gc_conf = json!({"cniVersion": "1.1.0", "name": "up", "ipam": {"type": "spiderpool",
        "ipam_unix_socket_path": socket, "default_ipv4_ippool": ["up"]}});
    gc_conf["cni.dev/valid-attachments"] = json!([]);
    let mut gc = CniCall::new("GC", "x", "x", &gc_conf);
    gc.container_id = None;
    let out = gc.run();
    assert!(out.success, "{}{}\n{}", out.stdout, out.stderr, agent.log());
    assert_eq!(held(), ["10.9.0.10"], "{}", agent.log());
    // A DEL (of some sandbox) while the pod lives keeps what upstream gave it.
    let conf = json!({"cniVersion": "1.0.0", "name": "up", "ipam": {"type": "spiderpool",
        "ipam_unix_socket_path": socket, "default_ipv4_ippool": ["up"]}});
    let del = CniCall::new("DEL", "sandbox-a", "web-7f9c-x2", &conf).run();
    assert!(del.success, "{}", del.stdout);
    assert_eq!(held(), ["10.9.0.10"], "{}", agent.log());
    // The pod is deleted: its DEL releases the address and the endpoint goes.
    cp.kubectl_ok(&["delete", "pod", "web-7f9c-x2", "--wait=true"], "");
    let del = CniCall::new("DEL", "sandbox-a", "web-7f9c-x2", &conf).run();
    assert!(del.success, "{}", del.stdout);
    assert!(held().is_empty(), "{:?}\n{}", held(), agent.log());
    let out = cp.kubectl(&["get", "spiderendpoint", "web-7f9c-x2", "-o", "name"], "");
    assert!(
        !out.success && out.stderr.contains("NotFound"),
        "the endpoint is still there: {}{}",
        out.stdout,
        out.stderr
    );
    // The address is free again.
    let add = CniCall::new("ADD", "sandbox-b", "next", &conf).run();
    assert!(add.success, "{}", add.stdout);
}

/// Upstream keys a KubeVirt VM's addresses by its VirtualMachineInstance's name: with
/// KubeVirt's CRD installed, reclaim treats such a holder as alive while its VMI exists (no Pod
/// has that name), and as gone once the VMI is.
#[test]
fn a_vm_upstream_allocated_keeps_its_address_while_its_vmi_lives() {
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    // KubeVirt's VirtualMachineInstance as its CRD serves it (group, version, kind, scope).
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
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: up}\nspec:\n  ipVersion: 4\n  subnet: 10.9.0.0/16\n  ips: [10.9.0.10-10.9.0.12]\n  gateway: 10.9.0.1\n",
    );
    let upstream = json!({
        "10.9.0.10": {"pod": "default/vm1", "podUid": "7d0c0000-0000-4000-8000-00000000000a"},
        "10.9.0.11": {"pod": "default/gone", "podUid": "7d0c0000-0000-4000-8000-00000000000b"},
    })
    .to_string();
    let patch =
        json!({"status": {"allocatedIPs": upstream, "allocatedIPCount": 2, "totalIPCount": 3}});
    cp.kubectl_ok(
        &[
            "patch",
            "spiderippool",
            "up",
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ],
        "",
    );
    let leaks = || {
        let out = spiderpool_testkit::run(
            std::process::Command::new(bin("spiderpoolctl")).args([
                "--datastore",
                "kubernetes",
                "--kubeconfig",
                cp.kubeconfig.to_str().unwrap(),
                "ipam",
                "gc",
                "--dry-run",
                "-o",
                "json",
            ]),
            "",
        );
        assert!(out.success, "{}{}", out.stdout, out.stderr);
        let mut v: Vec<String> = out.json()["leaks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["pod"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(leaks(), ["default/gone"]);
    cp.kubectl_ok(&["delete", "vmi", "vm1"], "");
    assert_eq!(leaks(), ["default/gone", "default/vm1"]);
}

#[test]
fn an_agent_for_a_node_the_cluster_does_not_have_says_so() {
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    let dir = tempfile::tempdir().unwrap();
    let out = spiderpool_testkit::run(
        std::process::Command::new(bin("spiderpool-agent")).args([
            "--node-name",
            "no-such-node",
            "--datastore",
            "kubernetes",
            "--kubeconfig",
            cp.kubeconfig.to_str().unwrap(),
            "--socket",
            dir.path().join("a.sock").to_str().unwrap(),
        ]),
        "",
    );
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("node \"no-such-node\" does not exist in the cluster"),
        "{}",
        out.stderr
    );
    // No Node object was made up for it.
    assert!(!cp.kubectl(&["get", "node", "no-such-node"], "").success);
}

/// A cluster moved from upstream keeps upstream's SpiderEndpoint CRD (helm never upgrades
/// `crds/`): its schema has no `containerID`, which the API server would then drop from every
/// record. The agent, the controller and spiderpoolctl refuse it and say what to apply; with the
/// project's CRDs applied they start.
#[test]
fn upstreams_endpoint_crd_is_refused_with_what_to_apply() {
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    register(&cp, "n1");
    // Upstream's schema of a NIC: the same fields without this project's containerID/network.
    let mut crd = json_of(
        &cp,
        &["get", "crd", "spiderendpoints.spiderpool.spidernet.io"],
    );
    for v in crd["spec"]["versions"].as_array_mut().unwrap() {
        let props = v
            .pointer_mut("/schema/openAPIV3Schema/properties/status/properties/current/properties/ips/items/properties")
            .and_then(Value::as_object_mut)
            .unwrap();
        assert!(props.remove("containerID").is_some());
        props.remove("network");
    }
    // Created as helm creates a chart's CRDs (no kubectl last-applied annotation).
    crd["metadata"] = json!({"name": "spiderendpoints.spiderpool.spidernet.io"});
    crd.as_object_mut().unwrap().remove("status");
    cp.kubectl_ok(
        &["delete", "crd", "spiderendpoints.spiderpool.spidernet.io"],
        "",
    );
    cp.kubectl_ok(&["create", "-f", "-"], &crd.to_string());
    cp.kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/spiderendpoints.spiderpool.spidernet.io",
        ],
        "",
    );
    let dir = tempfile::tempdir().unwrap();
    let kc = cp.kubeconfig.to_str().unwrap().to_string();
    let socket = dir.path().join("a.sock");
    let agent = || {
        spiderpool_testkit::run(
            std::process::Command::new("timeout")
                .arg("10")
                .arg(bin("spiderpool-agent"))
                .args([
                    "--node-name",
                    "n1",
                    "--datastore",
                    "kubernetes",
                    "--kubeconfig",
                    &kc,
                    "--socket",
                    socket.to_str().unwrap(),
                ]),
            "",
        )
    };
    let out = agent();
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("CRD spiderendpoints.spiderpool.spidernet.io is upstream Spiderpool's")
            && out.stderr.contains("kubectl apply -f deploy/crds/"),
        "{}",
        out.stderr
    );
    let ctl = spiderpool_testkit::run(
        std::process::Command::new(bin("spiderpoolctl")).args([
            "--datastore",
            "kubernetes",
            "--kubeconfig",
            &kc,
            "get",
            "ippool",
        ]),
        "",
    );
    assert!(
        !ctl.success && ctl.stderr.contains("kubectl apply -f deploy/crds/"),
        "{}",
        ctl.stderr
    );
    // The project's CRDs applied over upstream's: the agent starts (and serves until stopped).
    cp.install_crds();
    let out = agent();
    assert_eq!(
        out.code,
        Some(124),
        "the agent should run until stopped: {}",
        out.stderr
    );
}

/// `spiderpoolctl migrate check` against a cluster in the state upstream leaves it: each hazard
/// named with its objects, exit status 1 while one blocks the move, 0 once the blocking ones
/// are dealt with.
#[test]
fn migrate_check_names_each_hazard_of_a_cluster_running_upstream() {
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    // Upstream's SpiderEndpoint CRD, as its chart leaves it.
    let mut crd = json_of(
        &cp,
        &["get", "crd", "spiderendpoints.spiderpool.spidernet.io"],
    );
    for v in crd["spec"]["versions"].as_array_mut().unwrap() {
        let props = v
            .pointer_mut("/schema/openAPIV3Schema/properties/status/properties/current/properties/ips/items/properties")
            .and_then(Value::as_object_mut)
            .unwrap();
        props.remove("containerID");
        props.remove("network");
    }
    crd["metadata"] = json!({"name": "spiderendpoints.spiderpool.spidernet.io"});
    crd.as_object_mut().unwrap().remove("status");
    cp.kubectl_ok(
        &["delete", "crd", "spiderendpoints.spiderpool.spidernet.io"],
        "",
    );
    cp.kubectl_ok(&["create", "-f", "-"], &crd.to_string());
    // SpiderMultusConfig's kind (this project does not install it).
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "spidermultusconfigs.spiderpool.spidernet.io"},
            "spec": {"group": "spiderpool.spidernet.io", "scope": "Namespaced",
                "names": {"kind": "SpiderMultusConfig", "plural": "spidermultusconfigs",
                    "singular": "spidermultusconfig"},
                "versions": [{"name": "v2beta1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object",
                        "x-kubernetes-preserve-unknown-fields": true}}}]}})
        .to_string(),
    );
    cp.kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ],
        "",
    );
    let objects = [
        json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderMultusConfig",
            "metadata": {"name": "macvlan-conf", "namespace": "kube-system"},
            "spec": {"cniType": "macvlan", "macvlan": {"master": ["ens192"]}}}),
        json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderCoordinator",
            "metadata": {"name": "default"}, "spec": {"mode": "overlay"}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "spiderpool-controller", "namespace": "kube-system"},
            "spec": {"selector": {"matchLabels": {"app": "sp"}},
                "template": {"metadata": {"labels": {"app": "sp"}}, "spec": {"containers": [
                    {"name": "c", "image": "ghcr.io/spidernet-io/spiderpool/spiderpool-controller:v1.0.0"}]}}}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0", "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}),
        json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
            "metadata": {"name": "multus"}, "spec": {"ipVersion": 4, "subnet": "10.9.0.0/16",
                "ips": ["10.9.0.10-10.9.0.12"], "multusName": ["kube-system/macvlan-conf"]}}),
        json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderEndpoint",
            "metadata": {"name": "old", "namespace": "default", "finalizers": ["spiderpool.spidernet.io"]},
            "status": {"current": {"uid": "u-old", "node": "n1", "ips": []}}}),
    ];
    for o in &objects {
        cp.kubectl_ok(&["create", "-f", "-"], &o.to_string());
    }
    cp.kubectl_ok(&["delete", "spiderendpoint", "old", "--wait=false"], "");
    let patch = json!({"status": {"allocatedIPs": json!({
        "10.9.0.10": {"pod": "default/web-0", "podUid": "u-web"}}).to_string(),
        "allocatedIPCount": 1, "totalIPCount": 3}});
    cp.kubectl_ok(
        &[
            "patch",
            "spiderippool",
            "multus",
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ],
        "",
    );
    let check = |output: &[&str]| {
        let mut args = vec![
            "--datastore",
            "kubernetes",
            "--kubeconfig",
            cp.kubeconfig.to_str().unwrap(),
            "migrate",
            "check",
        ];
        args.extend_from_slice(output);
        spiderpool_testkit::run(
            std::process::Command::new(bin("spiderpoolctl")).args(&args),
            "",
        )
    };
    let out = check(&["-o", "json"]);
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    let report = out.json();
    let found: Vec<(String, bool, Vec<String>)> = report["hazards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["id"].as_str().unwrap().to_string(),
                h["blocks"].as_bool().unwrap(),
                h["objects"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| o.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    let expected = vec![
        (
            "endpoint-crd".to_string(),
            true,
            vec!["customresourcedefinition/spiderendpoints.spiderpool.spidernet.io".to_string()],
        ),
        (
            "endpoint-terminating".into(),
            false,
            vec!["spiderendpoint/default/old".into()],
        ),
        (
            "multus-cluster-network".into(),
            false,
            vec!["pod default/web-0 (pool multus)".into()],
        ),
        (
            "overlay-coordinator".into(),
            false,
            vec!["spidercoordinator/default".into()],
        ),
        (
            "spidermultusconfig".into(),
            false,
            vec!["spidermultusconfig/kube-system/macvlan-conf".into()],
        ),
        (
            "upstream-installed".into(),
            false,
            vec!["deployment/kube-system/spiderpool-controller".into()],
        ),
    ];
    assert_eq!(found, expected, "{}", out.stdout);
    assert_eq!(report["blocking"], 1);
    // The text form says the same, with each fix.
    let out = check(&[]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stdout.contains("BLOCKS  endpoint-crd")
            && out.stdout.contains("fix: kubectl apply -f deploy/crds/")
            && out
                .stdout
                .contains("spiderpoolController.cleanup.enable=false")
            && out.stdout.ends_with("6 hazards, 1 blocking the move\n"),
        "{}",
        out.stdout
    );
    // The blocking one dealt with: the move may go on (the notes stay; the overlay
    // coordinator's goes with it).
    cp.install_crds();
    cp.kubectl_ok(&["delete", "spidercoordinator", "default"], "");
    let out = check(&[]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.ends_with("4 hazards, 0 blocking the move\n"),
        "{}",
        out.stdout
    );
}
