//! Real nodes (kubelet, containerd and runc) on the local control plane: a pod runs through the
//! node's CNI network, `kubectl exec` reaches it, and the nodes leave the machine as they found
//! it.

use std::time::Duration;

use serde_json::json;
use spiderpool_testkit::real_node::{
    busybox_image, project_image, seed_chain, Footprint, RealCluster, RealNodeSpec,
};
use spiderpool_testkit::{json_of, until};

/// macvlan on the node's ens192 with host-local addresses: a network without Spiderpool.
fn host_local(range: &str, gateway: &str) -> String {
    json!({"cniVersion": "0.4.0", "name": "node-net", "plugins": [{
        "type": "macvlan", "master": "ens192", "mode": "bridge",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.6.0.0/16", "rangeStart": range.split('-').next().unwrap(),
            "rangeEnd": range.split('-').nth(1).unwrap(), "gateway": gateway}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "/var/lib/kubelet/host-local"}
    }]})
    .to_string()
}

#[test]
fn a_real_node_runs_a_pod_and_leaves_nothing_behind() {
    let _one_at_a_time = serial();
    let before = Footprint::now();
    {
        let spec = RealNodeSpec {
            name: "rn-a".into(),
            labels: vec![("zone".into(), "a".into())],
            gateway: "10.6.0.1/16".into(),
            cni_conf: Some(host_local("10.6.100.10-10.6.100.20", "10.6.0.1")),
            ..Default::default()
        };
        let Some(c) = RealCluster::start("rn", &[spec]) else {
            return;
        };
        c.import(&busybox_image(
            "spiderpool.test/web:1",
            r#"["/bin/sh","-c","mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www"]"#,
        ));
        c.cp.kubectl_ok(
            &["apply", "-f", "-"],
            &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "default"},
                "spec": {"nodeName": "rn-a", "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "web", "image": "spiderpool.test/web:1", "imagePullPolicy": "Never"}]}})
            .to_string(),
        );
        let ip = until("the pod running with an address", || {
            let p = json_of(&c.cp, &["get", "pod", "web"]);
            (p["status"]["phase"] == "Running")
                .then(|| p["status"]["podIP"].as_str().map(str::to_string))
                .flatten()
        });
        assert!(ip.starts_with("10.6.100."), "{ip}");
        // The API server reaches the kubelet (exec), and the pod answers on its address.
        let out = c.cp.kubectl_ok(
            &[
                "exec",
                "web",
                "--",
                "wget",
                "-qO-",
                &format!("http://{ip}/"),
            ],
            "",
        );
        assert_eq!(out.trim(), "web");
        // The node's own namespaces: its gateway answers.
        let ping = c.node("rn-a").exec(&["ping", "-c1", "-W2", "10.6.0.1"]);
        assert!(ping.success, "{ping:?}");
        c.cp.kubectl_ok(
            &["delete", "pod", "web", "--wait=true", "--timeout=60s"],
            "",
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = Footprint::now();
    assert_eq!(before, after, "real nodes left something behind");
}

/// Real-node tests share the uplink address and the zones' routes: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The seed's two nodes, each with the NAD's chain as its CNI network.
fn seed_nodes() -> Vec<RealNodeSpec> {
    [
        ("controller-node-1", "subnet-6", "10.6.0.1/16"),
        ("worker-node-1", "subnet-7", "10.7.0.1/16"),
    ]
    .into_iter()
    .map(|(name, zone, gw)| RealNodeSpec {
        name: name.into(),
        labels: vec![("node-subnet".into(), zone.into())],
        gateway: gw.into(),
        cni_conf: Some(seed_chain()),
        ..Default::default()
    })
    .collect()
}

/// The seed's subnets, pools and NAD.
fn seed_objects(c: &RealCluster) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/seed-zones/manifests");
    for f in ["02-subnets.yaml", "03-ippools.yaml", "04-macvlan-nad.yaml"] {
        c.cp.kubectl_ok(&["apply", "-f", &dir.join(f).display().to_string()], "");
    }
}

/// An HTTP pod on `node` drawing from the seed's pool group.
fn web_pod(c: &RealCluster, name: &str, node: &str) {
    c.cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default",
            "annotations": {"ipam.spidernet.io/ippool": "{\"ipv4\": [\"test-ippool-6\", \"test-ippool-7\"]}"}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "web", "image": "docker.io/library/nginx:latest", "imagePullPolicy": "Never"}]}})
        .to_string(),
    );
}

fn running_ip(c: &RealCluster, pod: &str) -> String {
    until(&format!("pod {pod} running with an address"), || {
        let p = json_of(&c.cp, &["get", "pod", pod]);
        (p["status"]["phase"] == "Running")
            .then(|| p["status"]["podIP"].as_str().map(str::to_string))
            .flatten()
    })
}

/// Every pod's address, by pod name.
fn addresses(c: &RealCluster) -> std::collections::BTreeMap<String, String> {
    let v = json_of(&c.cp, &["get", "pods", "-n", "default"]);
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            Some((
                p["metadata"]["name"].as_str()?.to_string(),
                p["status"]["podIP"].as_str()?.to_string(),
            ))
        })
        .collect()
}

fn allocated(c: &RealCluster, pool: &str) -> u64 {
    json_of(&c.cp, &["get", "spiderippool", pool])["status"]["allocatedIPCount"]
        .as_u64()
        .unwrap_or(0)
}

fn nginx() -> std::path::PathBuf {
    busybox_image(
        "docker.io/library/nginx:latest",
        r#"["/bin/sh","-c","mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www"]"#,
    )
}

#[test]
fn the_chart_installs_upgrades_and_uninstalls_on_real_nodes() {
    let _one_at_a_time = serial();
    if spiderpool_testkit::helm_bin().is_none() {
        return;
    }
    let before = Footprint::now();
    {
        let Some(c) = RealCluster::start("rc", &seed_nodes()) else {
            return;
        };
        let (first, first_archive) = project_image("t1");
        let (second, second_archive) = project_image("t2");
        c.import(&first_archive);
        c.import(&second_archive);
        c.import(&nginx());
        let dirs_before: Vec<Vec<String>> = c.nodes.iter().map(|n| n.cni_dirs()).collect();

        // helm install: the agents and controllers run, the plugins are on each node.
        c.install_chart(&first, false, &[]);
        for n in &c.nodes {
            let listed = n.cni_dirs().join("\n");
            for p in ["spiderpool", "coordinator", "veth"] {
                assert!(
                    listed.contains(&format!("cni-bin/{p} ")),
                    "{}: {listed}",
                    n.name
                );
            }
        }
        // The controller's leader creates it once elected: it may not be there yet.
        until("the SpiderCoordinator synced", || {
            let out =
                c.cp.kubectl(&["get", "spidercoordinator", "default", "-o", "json"], "");
            (out.success && out.json()["status"]["phase"] == "Synced").then_some(())
        });
        seed_objects(&c);
        for (i, node) in [
            "controller-node-1",
            "worker-node-1",
            "controller-node-1",
            "worker-node-1",
        ]
        .iter()
        .enumerate()
        {
            web_pod(&c, &format!("web-{i}"), node);
        }
        for i in 0..4 {
            running_ip(&c, &format!("web-{i}"));
        }
        let held = addresses(&c);
        assert_eq!(held.len(), 4);
        assert_eq!(
            allocated(&c, "test-ippool-6") + allocated(&c, "test-ippool-7"),
            4
        );

        // helm upgrade to another image: the agents roll, no pod loses or shares an address.
        c.install_chart(&second, true, &[]);
        let agents = json_of(
            &c.cp,
            &[
                "-n",
                "kube-system",
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/component=spiderpool-agent",
            ],
        );
        for a in agents["items"].as_array().unwrap() {
            assert_eq!(a["spec"]["containers"][0]["image"], second.as_str(), "{a}");
        }
        assert_eq!(addresses(&c), held, "an address changed across the upgrade");
        web_pod(&c, "web-after-upgrade", "worker-node-1");
        let ip = running_ip(&c, "web-after-upgrade");
        assert!(!held.values().any(|h| *h == ip), "{ip} handed out twice");
        assert_eq!(
            allocated(&c, "test-ippool-6") + allocated(&c, "test-ippool-7"),
            5
        );

        // A killed agent is restarted by kubelet, and the next pod's ADD succeeds.
        let agent = json_of(
            &c.cp,
            &[
                "-n",
                "kube-system",
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/component=spiderpool-agent",
                "--field-selector",
                "spec.nodeName=worker-node-1",
            ],
        )["items"][0]
            .clone();
        let name = agent["metadata"]["name"].as_str().unwrap().to_string();
        let id = agent["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .unwrap();
        let id = id.trim_start_matches("containerd://");
        let killed = c
            .node("worker-node-1")
            .ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        assert!(killed.success, "{killed:?}");
        until("the agent restarted and ready", || {
            let a = json_of(&c.cp, &["-n", "kube-system", "get", "pod", &name]);
            let s = &a["status"]["containerStatuses"][0];
            (s["restartCount"].as_u64() >= Some(1) && s["ready"] == true).then_some(())
        });
        web_pod(&c, "web-after-restart", "worker-node-1");
        let ip = running_ip(&c, "web-after-restart");
        assert!(ip.starts_with("10.7.168.6"), "{ip}");

        // Everything deleted, then helm uninstall: the nodes' CNI directories as they were.
        c.cp.kubectl_ok(
            &[
                "delete",
                "pods",
                "--all",
                "-n",
                "default",
                "--wait=true",
                "--timeout=120s",
            ],
            "",
        );
        until("every address released", || {
            (allocated(&c, "test-ippool-6") + allocated(&c, "test-ippool-7") == 0).then_some(())
        });
        let out = c.helm(&[
            "uninstall",
            "spiderpool",
            "--namespace",
            "kube-system",
            "--wait",
            "--timeout",
            "300s",
        ]);
        assert!(out.success, "helm uninstall: {}{}", out.stdout, out.stderr);
        until("the agents gone", || {
            let v = json_of(
                &c.cp,
                &[
                    "-n",
                    "kube-system",
                    "get",
                    "pods",
                    "-l",
                    "app.kubernetes.io/component=spiderpool-agent",
                ],
            );
            v["items"].as_array().unwrap().is_empty().then_some(())
        });
        let dirs_after: Vec<Vec<String>> = c.nodes.iter().map(|n| n.cni_dirs()).collect();
        assert_eq!(
            dirs_before, dirs_after,
            "helm uninstall left the nodes' CNI directories changed"
        );
    }
    assert_eq!(before, Footprint::now(), "real nodes left something behind");
}

#[test]
fn the_controller_on_a_real_node_reclaims_the_addresses_of_a_node_that_died() {
    let _one_at_a_time = serial();
    if spiderpool_testkit::helm_bin().is_none() {
        return;
    }
    let Some(mut c) = RealCluster::start("rd", &seed_nodes()) else {
        return;
    };
    let (image, archive) = project_image("t1");
    c.import(&archive);
    c.import(&nginx());
    // One controller, on the node that stays.
    c.install_chart(&image, false, &["--set", "spiderpoolController.replicas=1"]);
    c.cp.kubectl_ok(
        &[
            "label",
            "node",
            "controller-node-1",
            "spiderpool-test/keep=yes",
        ],
        "",
    );
    c.cp.kubectl_ok(
        &[
            "-n",
            "kube-system",
            "patch",
            "deployment",
            "spiderpool-controller",
            "--type=merge",
            "-p",
            r#"{"spec":{"template":{"spec":{"nodeSelector":{"spiderpool-test/keep":"yes"}}}}}"#,
        ],
        "",
    );
    c.cp.kubectl_ok(
        &[
            "-n",
            "kube-system",
            "rollout",
            "status",
            "deployment/spiderpool-controller",
            "--timeout=300s",
        ],
        "",
    );
    seed_objects(&c);
    for i in 0..3 {
        web_pod(&c, &format!("doomed-{i}"), "worker-node-1");
    }
    for i in 0..3 {
        running_ip(&c, &format!("doomed-{i}"));
    }
    assert_eq!(allocated(&c, "test-ippool-7"), 3);
    // The node dies (its kubelet stops, nothing runs DEL) and is deleted.
    c.node_mut("worker-node-1").stop_kubelet();
    c.cp.kubectl_ok(&["delete", "node", "worker-node-1"], "");
    until("the dead node's addresses reclaimed", || {
        (allocated(&c, "test-ippool-7") == 0).then_some(())
    });
}
