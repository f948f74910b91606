//! The coordinator's overlay mode, in network namespaces standing for two nodes and their
//! pods: Debian's `bridge` plugin (host-local IPAM, a route per node on the router) plays the
//! cluster's overlay CNI on `eth0`, Debian's macvlan with `spiderpool` IPAM and then the
//! `coordinator` (mode `auto`, which finds `eth0` first and chooses overlay) give the pod
//! `net1` in its zone. The pod reaches another node's overlay pod, the underlay peer of its
//! zone, its node, and a ClusterIP Service through a real kube-proxy; its node reaches its
//! underlay address; DEL leaves the node's and the pod's namespaces as they were.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use spiderpool_testkit::{
    bin, http_get_in, in_netns, kube_bin, sh, zones, CniCall, ControlPlane, KubeProxy, Netns,
    Sandbox,
};

fn prerequisites() -> bool {
    spiderpool_testkit::netns_prerequisites(&["bridge", "macvlan", "host-local"])
}

fn ok(argv: &[&str]) -> bool {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn ping(from: &str, to: &str) -> bool {
    ok(&[
        "ip", "netns", "exec", from, "ping", "-c", "1", "-W", "2", to,
    ])
}

/// A namespace's links, IPv4 routes of every table, rules and permanent neighbour entries.
fn state(ns: &str) -> [String; 4] {
    let links: Vec<String> = sh(&["ip", "-n", ns, "-o", "link"])
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .collect();
    [
        links.join("\n"),
        sh(&["ip", "-n", ns, "-4", "route", "show", "table", "all"]),
        sh(&["ip", "-n", ns, "rule"]) + &sh(&["ip", "-n", ns, "-6", "rule"]),
        sh(&["ip", "-n", ns, "neigh", "show", "nud", "permanent"]),
    ]
}

fn address(result: &Value) -> String {
    let a = result["ips"][0]["address"].as_str().expect("an address");
    a.split('/').next().unwrap().to_string()
}

#[test]
fn overlay_mode_keeps_eth0_for_the_cluster_and_net1_for_its_zone() {
    if !prerequisites() {
        return;
    }
    let Some(kbin) = kube_bin() else { return };
    let _zones = zones("ov", &[("ov-n1", "10.6.0.1/16"), ("ov-n2", "10.7.0.1/16")]);
    // The overlay's routes: each node's pod CIDR through the node.
    sh(&[
        "ip",
        "-n",
        "ov-r",
        "route",
        "add",
        "10.233.65.0/24",
        "via",
        "10.6.0.2",
    ]);
    sh(&[
        "ip",
        "-n",
        "ov-r",
        "route",
        "add",
        "10.233.66.0/24",
        "via",
        "10.7.0.2",
    ]);
    let _pods = [
        Netns::new("ov-pa"),
        Netns::new("ov-pb"),
        Netns::new("ov-pc"),
    ];
    let data = tempfile::tempdir().unwrap();
    let overlay = |subnet: &str, gateway: &str| {
        json!({"cniVersion": "1.0.0", "name": "overlay", "type": "bridge", "bridge": "cni0",
            "isGateway": true,
            "ipam": {"type": "host-local", "dataDir": data.path(),
                "ranges": [[{"subnet": subnet, "gateway": gateway}]],
                "routes": [{"dst": "0.0.0.0/0"}]}})
    };
    let (overlay1, overlay2) = (
        overlay("10.233.65.0/24", "10.233.65.1"),
        overlay("10.233.66.0/24", "10.233.66.1"),
    );
    let run = |node: &str, pod: &str, ifname: &str, command: &str, conf: &Value, plugin: &Path| {
        CniCall::new(command, pod, pod, conf)
            .ifname(ifname)
            .with_workspace_plugins()
            .run_program_via(plugin, &["ip", "netns", "exec", node])
    };
    let (bridge, macvlan) = (
        Path::new("/usr/lib/cni/bridge"),
        Path::new("/usr/lib/cni/macvlan"),
    );
    let coordinator = bin("coordinator");
    let added = |node: &str, pod: &str, ifname: &str, conf: &Value, plugin: &Path| -> Value {
        let out = run(node, pod, ifname, "ADD", conf, plugin);
        assert!(
            out.success,
            "ADD {pod} {ifname} {}: {}{}",
            plugin.display(),
            out.stdout,
            out.stderr
        );
        serde_json::from_str(&out.stdout).unwrap()
    };

    // B: an overlay pod on the other node, answering HTTP on 8080.
    let b = address(&added("ov-n2", "ov-pb", "eth0", &overlay2, bridge));
    let listener = in_netns("ov-pb", || std::net::TcpListener::bind("0.0.0.0:8080")).unwrap();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\npod-b");
        }
    });

    // The agent of node 1 and the zone's pool; C: an underlay pod of the zone (macvlan only).
    let sb = Sandbox::new();
    let agent = sb.agent_with("ov-n1", "", &[]);
    sb.apply(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: zone-6}\n\
         spec: {subnet: 10.6.0.0/16, ips: [10.6.168.60-10.6.168.69], gateway: 10.6.0.1}\n",
    );
    // The underlay NIC after eth0 takes no default route (eth0 keeps the cluster's).
    let underlay = |clean: bool| {
        json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "macvlan",
            "master": "ens192", "mode": "bridge",
            "ipam": {"type": "spiderpool", "ipam_unix_socket_path": agent.socket,
                "default_ipv4_ippool": ["zone-6"], "clean_gateway": clean}})
    };
    let c = address(&added("ov-n1", "ov-pc", "eth0", &underlay(false), macvlan));

    // A: eth0 from the overlay, then net1 from macvlan + spiderpool + coordinator.
    let a_eth0 = address(&added("ov-n1", "ov-pa", "eth0", &overlay1, bridge));
    let (node_before, pod_before) = (state("ov-n1"), state("ov-pa"));
    let prev = added("ov-n1", "ov-pa", "net1", &underlay(true), macvlan);
    let a_net1 = address(&prev);
    let coordinator_conf = |prev: &Value| {
        json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "coordinator",
            "ipam_unix_socket_path": agent.socket, "serviceCIDR": ["10.233.0.0/18"],
            "overlayPodCIDR": ["10.233.64.0/18"], "prevResult": prev})
    };
    let result = added(
        "ov-n1",
        "ov-pa",
        "net1",
        &coordinator_conf(&prev),
        &coordinator,
    );
    assert_eq!(result, prev, "overlay mode makes no interface of its own");
    assert!(
        !ok(&["ip", "-n", "ov-pa", "link", "show", "veth0"]),
        "no veth pair in overlay mode"
    );

    // eth0 keeps the default route; net1's addresses look up a table of their own, where the
    // node, the Services and the overlay go through eth0 too.
    let main = sh(&["ip", "-n", "ov-pa", "-4", "route"]);
    assert!(main.contains("default via 10.233.65.1 dev eth0"), "{main}");
    assert!(main.contains("10.6.0.2 via 10.233.65.1 dev eth0"), "{main}");
    let rules = sh(&["ip", "-n", "ov-pa", "rule"]);
    let rule = rules
        .lines()
        .find(|l| l.contains(&format!("from {a_net1} lookup")))
        .unwrap_or_else(|| panic!("no rule from {a_net1}: {rules}"));
    let table = rule.rsplit(' ').next().unwrap().trim();
    let routes = sh(&["ip", "-n", "ov-pa", "-4", "route", "show", "table", table]);
    for want in [
        "10.6.0.0/16 dev net1",
        "10.6.0.2 via 10.233.65.1 dev eth0",
        "10.233.0.0/18 via 10.233.65.1 dev eth0",
        "10.233.64.0/18 via 10.233.65.1 dev eth0",
    ] {
        assert!(
            routes.contains(want),
            "table {table}: {want:?} in\n{routes}"
        );
    }
    // The node reaches net1's address through eth0's side (the bridge), in hostRuleTable.
    let host = sh(&["ip", "-n", "ov-n1", "-4", "route", "show", "table", "500"]);
    assert!(host.contains(&format!("{a_net1} dev cni0")), "{host}");

    // Reachability: the other node's overlay pod (eth0), the zone's underlay pod (net1), the
    // node both ways.
    assert!(ping("ov-pa", &b), "A to B ({b}) through the overlay");
    assert!(ping("ov-pa", &c), "A to C ({c}) on its zone's segment");
    assert!(ping("ov-pa", "10.6.0.2"), "A to its node");
    assert!(ping("ov-n1", &a_net1), "the node to A's underlay address");
    assert!(ping("ov-n1", &a_eth0), "the node to A's overlay address");

    // A ClusterIP Service whose endpoint is B, through node 1's real kube-proxy.
    let cp = ControlPlane::start(&kbin, false);
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "ov-n1"}}).to_string(),
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
        .to_string(),
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [b.clone()], "conditions": {"ready": true}}]})
        .to_string(),
    );
    let _proxy = KubeProxy::start(&cp, "ov-n1", "ov-n1");
    let cluster_ip: std::net::IpAddr = cp
        .kubectl_ok(
            &["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"],
            "",
        )
        .trim()
        .parse()
        .unwrap();
    let answer = spiderpool_testkit::until("the Service answers from A", || {
        http_get_in("ov-pa", (cluster_ip, 80).into(), "/").ok()
    });
    assert_eq!(answer, (200, "pod-b".to_string()));

    // DEL in reverse order: the coordinator, then macvlan; the node and the pod are as before.
    assert!(
        run(
            "ov-n1",
            "ov-pa",
            "net1",
            "DEL",
            &coordinator_conf(&prev),
            &coordinator
        )
        .success
    );
    assert!(run("ov-n1", "ov-pa", "net1", "DEL", &underlay(true), macvlan).success);
    assert_eq!(state("ov-n1"), node_before, "the node is as it was");
    assert_eq!(state("ov-pa"), pod_before, "the pod is as it was");
    assert!(ping("ov-pa", &b), "eth0 still works");
    for (node, pod, conf, plugin) in [
        ("ov-n1", "ov-pa", &overlay1, bridge),
        ("ov-n1", "ov-pc", &underlay(false), macvlan),
        ("ov-n2", "ov-pb", &overlay2, bridge),
    ] {
        assert!(run(node, pod, "eth0", "DEL", conf, plugin).success);
    }
    assert_eq!(sb.allocated("zone-6"), 0);
}
