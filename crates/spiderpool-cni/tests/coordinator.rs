//! The `coordinator` plugin (also `veth`) as a runtime runs it: chained after Debian's macvlan in
//! network namespaces standing for a node and a pod, its settings from a SpiderCoordinator the
//! agent serves and from the network config. What the pod and the node see is checked with
//! iproute2 and ping; after DEL the node has exactly the links and routes it had before.

use std::path::Path;

use serde_json::{json, Value};
use spiderpool_testkit::{bin, sh, zones, CniCall, Netns, Sandbox};

/// Whether this machine can run the test; with SPIDERPOOL_E2E_REQUIRED=1 it must.
fn prerequisites() -> bool {
    spiderpool_testkit::netns_prerequisites(&["macvlan"])
}

/// The node's links, routes of every table, rules and neighbour entries, one per line.
fn node_state(node: &str) -> [String; 4] {
    let links: Vec<String> = sh(&["ip", "-n", node, "-o", "link"])
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .collect();
    [
        links.join("\n"),
        // Less the route of the node's own IPv6 link-local address, which the kernel adds once
        // its duplicate address detection is over, whenever that is.
        sh(&["ip", "-n", node, "route", "show", "table", "all"])
            .lines()
            .filter(|l| !l.starts_with("local fe80::"))
            .collect::<Vec<_>>()
            .join("\n"),
        sh(&["ip", "-n", node, "rule"]) + &sh(&["ip", "-n", node, "-6", "rule"]),
        sh(&["ip", "-n", node, "neigh"]),
    ]
}

/// The MAC address of the link `dev` in the namespace `ns`.
fn mac(ns: &str, dev: &str) -> String {
    sh(&["ip", "-n", ns, "-o", "link", "show", dev])
        .split("link/ether ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Asserts that the neighbour `ns` caches `ip` at the MAC of the pod's interface in `prev`.
fn assert_announced(ns: &str, ip: &str, prev: &Value) {
    let pod_mac = prev["interfaces"][0]["mac"].as_str().unwrap();
    let cached = sh(&["ip", "-n", ns, "neigh", "show", ip]);
    assert!(
        cached.contains(&format!("lladdr {pod_mac}")),
        "{cached} (pod: {pod_mac})"
    );
}

fn call(command: &str, conf: &Value) -> CniCall {
    CniCall::new(command, "co-pod", "web", conf)
}

fn in_node(c: &CniCall, plugin: &Path) -> spiderpool_testkit::Output {
    c.run_program_via(plugin, &["ip", "netns", "exec", "co-n1"])
}

#[test]
fn underlay_pods_reach_their_node_and_services_through_a_veth_pair_that_del_removes() {
    if !prerequisites() {
        return;
    }
    let _zones = zones("co", &[("co-n1", "10.6.0.1/16")]);
    let _pod = Netns::new("co-pod");
    let sb = Sandbox::new();
    let agent = sb.agent("co-n1", "");
    sb.apply(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderCoordinator\nmetadata: {name: default}\n\
         spec: {podCIDRType: none, mode: underlay, hijackCIDR: [169.254.25.10], vethMTU: 1400, podMACPrefix: '0a:1b',\n\
         vethLinkAddress: 169.254.100.1}\n",
    );
    if let Some(cp) = sb.cluster() {
        // On a control plane without the controller, its status stands in for the leader's.
        cp.kubectl_ok(
            &["patch", "scc", "default", "--subresource=status", "--type=merge", "-p",
                r#"{"status":{"phase":"Synced","serviceCIDR":["10.233.0.0/18"],"overlayPodCIDR":[]}}"#],
            "",
        );
    }
    let macvlan = Path::new("/usr/lib/cni/macvlan");
    let mac_conf = json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "macvlan",
        "master": "ens192", "mode": "bridge",
        "ipam": {"type": "static", "addresses": [{"address": "10.6.168.60/16", "gateway": "10.6.0.1"}]}});
    let before = node_state("co-n1");
    let out = in_node(&call("ADD", &mac_conf), macvlan);
    assert!(out.success, "macvlan: {}{}", out.stdout, out.stderr);
    let prev: Value = serde_json::from_str(&out.stdout).unwrap();
    let conf = |extra: Value| {
        let mut c = json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "veth",
            "service_cidr": ["10.233.0.0/18"], "ipam_unix_socket_path": agent.socket,
            "prevResult": prev});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let veth = bin("veth");

    // Bad settings and a missing prevResult are refused by name, and nothing is made.
    let with_macvlan = node_state("co-n1");
    for (bad, want) in [
        (
            conf(json!({"service_cidr": ["10.233.0.0/40"]})),
            "service_cidr: \"10.233.0.0/40\" is not a CIDR",
        ),
        (
            conf(json!({"vethMTU": 20})),
            "vethMTU: 20 is not a whole number from 68 to 65535",
        ),
        (
            conf(json!({"hostRuleTable": 255})),
            "hostRuleTable: 255 is not a routing table from 1 to 4294967295 other than 253 (default) and 255 (local)",
        ),
        (
            conf(json!({"vethLinkAddress": "nope"})),
            "vethLinkAddress: \"nope\" is not an IP address",
        ),
    ] {
        let out = in_node(&call("ADD", &bad), &veth);
        assert!(!out.success, "{bad}");
        let e: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(e["code"], 7, "{e}");
        assert!(e["msg"].as_str().unwrap().contains(want), "{e}");
    }
    let mut no_prev = conf(json!({}));
    no_prev.as_object_mut().unwrap().remove("prevResult");
    let out = in_node(&call("ADD", &no_prev), &veth);
    assert!(
        out.stdout.contains("prevResult is missing"),
        "{}",
        out.stdout
    );
    assert_eq!(node_state("co-n1"), with_macvlan);

    // ADD: the pair, the routes on both sides; the result names both ends.
    let out = in_node(&call("ADD", &conf(json!({}))), &veth);
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let result: Value = serde_json::from_str(&out.stdout).unwrap();
    let names: Vec<&str> = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{result}");
    assert_eq!((names[0], names[2]), ("eth0", "veth0"), "{result}");
    let host_veth = names[1];
    assert!(
        host_veth.starts_with("veth") && host_veth.len() == 15,
        "{result}"
    );
    assert_eq!(result["interfaces"][2]["sandbox"], "/var/run/netns/co-pod");
    assert_eq!(result["ips"], prev["ips"]);
    let pod_routes = sh(&["ip", "-n", "co-pod", "route"]);
    for want in [
        "10.6.0.2 dev veth0 scope link src 10.6.168.60",
        "10.233.0.0/18 via 10.6.0.2 dev veth0 src 10.6.168.60",
        // From the SpiderCoordinator, as a host route.
        "169.254.25.10 via 10.6.0.2 dev veth0 src 10.6.168.60",
    ] {
        assert!(pod_routes.contains(want), "{want:?} in {pod_routes}");
    }
    assert!(sh(&["ip", "-n", "co-pod", "link", "show", "veth0"]).contains("mtu 1400"));
    // vethLinkAddress, on the pod's end.
    let veth0 = sh(&["ip", "-n", "co-pod", "addr", "show", "veth0"]);
    assert!(veth0.contains("inet 169.254.100.1/32"), "{veth0}");
    // podMACPrefix: the pod's NIC gets the prefix and its address's bytes (10.6.168.60).
    assert!(
        sh(&["ip", "-n", "co-pod", "link", "show", "eth0"])
            .contains("link/ether 0a:1b:0a:06:a8:3c"),
        "{}",
        sh(&["ip", "-n", "co-pod", "link", "show", "eth0"])
    );
    assert_eq!(
        result["interfaces"][0]["mac"], "0a:1b:0a:06:a8:3c",
        "{result}"
    );
    // The node's route to the pod is in hostRuleTable (500), looked up by a rule of its own;
    // main is left alone.
    let node_routes = sh(&["ip", "-n", "co-n1", "route", "show", "table", "500"]);
    assert!(
        node_routes.contains(&format!("10.6.168.60 dev {host_veth} scope link")),
        "{node_routes}"
    );
    assert!(!sh(&["ip", "-n", "co-n1", "route"]).contains("10.6.168.60"));
    let rules = sh(&["ip", "-n", "co-n1", "rule"]);
    assert!(
        rules.contains("1000:\tfrom all to 10.6.168.60 lookup 500"),
        "{rules}"
    );
    // Static neighbour entries both ways across the pair.
    let neigh = sh(&["ip", "-n", "co-n1", "neigh", "show", "dev", host_veth]);
    assert!(
        neigh.contains(&format!(
            "10.6.168.60 lladdr {} PERMANENT",
            mac("co-pod", "veth0")
        )),
        "{neigh}"
    );
    let neigh = sh(&["ip", "-n", "co-pod", "neigh", "show", "dev", "veth0"]);
    assert!(
        neigh.contains(&format!(
            "10.6.0.2 lladdr {} PERMANENT",
            mac("co-n1", host_veth)
        )),
        "{neigh}"
    );
    // The pod reaches its node (macvlan alone cannot: the master does not talk to its
    // macvlans), and the node reaches the pod, both through the pair.
    let ping = sh(&[
        "ip", "netns", "exec", "co-pod", "ping", "-c", "1", "-W", "2", "10.6.0.2",
    ]);
    assert!(ping.contains("ttl=64"), "{ping}");
    let ping = sh(&[
        "ip",
        "netns",
        "exec",
        "co-n1",
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "10.6.168.60",
    ]);
    assert!(ping.contains("ttl=64"), "{ping}");

    // CHECK holds; a second ADD of the container makes the pair again.
    let check = |c: &Value| in_node(&call("CHECK", c), &veth);
    let mut checked = conf(json!({}));
    checked["prevResult"] = result.clone();
    assert!(check(&checked).success, "{}", check(&checked).stdout);
    let again = in_node(&call("ADD", &conf(json!({}))), &veth);
    assert!(again.success, "{}", again.stdout);
    assert!(check(&checked).success);
    // CHECK names a rule gone missing; ADD again puts it back.
    sh(&[
        "ip",
        "-n",
        "co-n1",
        "rule",
        "del",
        "to",
        "10.6.168.60",
        "lookup",
        "500",
        "pref",
        "1000",
    ]);
    let e: Value = serde_json::from_str(&check(&checked).stdout).unwrap();
    assert_eq!(e["code"], 101, "{e}");
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("the node has no rule to 10.6.168.60/32 lookup 500"),
        "{e}"
    );
    assert!(in_node(&call("ADD", &conf(json!({}))), &veth).success);
    assert!(check(&checked).success);
    // ... and a neighbour entry gone missing.
    sh(&[
        "ip",
        "-n",
        "co-n1",
        "neigh",
        "del",
        "10.6.168.60",
        "dev",
        host_veth,
    ]);
    let e: Value = serde_json::from_str(&check(&checked).stdout).unwrap();
    assert_eq!(e["code"], 101, "{e}");
    assert!(
        e["msg"].as_str().unwrap().contains(&format!(
            "the node has no neighbour entry for 10.6.168.60 on {host_veth}"
        )),
        "{e}"
    );
    assert!(in_node(&call("ADD", &conf(json!({}))), &veth).success);
    assert!(check(&checked).success);

    // DEL removes the pair and its routes; again, nothing to do; CHECK then names what is gone.
    for _ in 0..2 {
        let out = in_node(&call("DEL", &checked), &veth);
        assert!(out.success, "{}{}", out.stdout, out.stderr);
        assert_eq!(node_state("co-n1"), with_macvlan);
    }
    let out = check(&checked);
    let e: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(e["code"], 101, "{e}");
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains(&format!("the node has no {host_veth}")),
        "{e}"
    );
    assert!(!sh(&["ip", "-n", "co-pod", "-o", "link"]).contains("veth0"));
    let out = in_node(&call("DEL", &mac_conf), macvlan);
    assert!(out.success, "{}", out.stderr);
    assert_eq!(node_state("co-n1"), before);
}

#[test]
fn an_address_already_on_the_segment_or_a_silent_gateway_fails_add_before_anything_is_made() {
    if !prerequisites() {
        return;
    }
    let _zones = zones("cc", &[("cc-n1", "10.6.0.1/16")]);
    let _holder = Netns::new("cc-a");
    let _pod = Netns::new("cc-pod");
    // No SpiderCoordinator: the network config's keys alone.
    let sb = Sandbox::new();
    let agent = sb.agent("cc-n1", "");
    let macvlan = Path::new("/usr/lib/cni/macvlan");
    let mac_conf = |ip: &str, gw: &str| {
        json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "macvlan",
            "master": "ens192", "mode": "bridge",
            "ipam": {"type": "static", "addresses": [{"address": ip, "gateway": gw}]}})
    };
    let run = |netns: &str, command: &str, conf: &Value, plugin: &Path| {
        CniCall::new(command, netns, "web", conf)
            .run_program_via(plugin, &["ip", "netns", "exec", "cc-n1"])
    };
    let veth = bin("coordinator");
    let coordinator = |prev: &Value| {
        json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "coordinator",
            "service_cidr": ["10.233.0.0/18"], "ipam_unix_socket_path": agent.socket,
            "detectIPConflict": true, "detectGateway": true, "prevResult": prev})
    };
    // Another host of the segment already has 10.6.168.61.
    assert!(
        run(
            "cc-a",
            "ADD",
            &mac_conf("10.6.168.61/16", "10.6.0.1"),
            macvlan
        )
        .success
    );
    let holder_mac = mac("cc-a", "eth0");
    let before = node_state("cc-n1");
    let out = run(
        "cc-pod",
        "ADD",
        &mac_conf("10.6.168.61/16", "10.6.0.1"),
        macvlan,
    );
    let prev: Value = serde_json::from_str(&out.stdout).unwrap();
    let out = run("cc-pod", "ADD", &coordinator(&prev), &veth);
    assert!(!out.success);
    let e: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(e["code"], 11, "{e}");
    // The address is not the container's (static IPAM): nothing is held back for it.
    assert_eq!(
        e["msg"],
        format!("IP conflict: 10.6.168.61 is already used on the segment of eth0 by {holder_mac} (detectIPConflict); \
                 not held back: 10.6.168.61 is not held by container cc-pod of pod default/web on eth0: only its holder can report a conflict for it")
    );
    assert_eq!(node_state("cc-n1"), before, "nothing was made");
    assert!(
        run(
            "cc-pod",
            "DEL",
            &mac_conf("10.6.168.61/16", "10.6.0.1"),
            macvlan
        )
        .success
    );

    // A free address and a gateway that answers (the zone's router): the ADD goes through,
    // and the pod's gratuitous ARP updates what a neighbour had cached for the address (past
    // the kernel's one-second lock on a fresh entry).
    sh(&[
        "ip",
        "-n",
        "cc-a",
        "neigh",
        "add",
        "10.6.168.62",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "eth0",
        "nud",
        "stale",
    ]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = run(
        "cc-pod",
        "ADD",
        &mac_conf("10.6.168.62/16", "10.6.0.1"),
        macvlan,
    );
    let prev: Value = serde_json::from_str(&out.stdout).unwrap();
    let out = run("cc-pod", "ADD", &coordinator(&prev), &veth);
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_announced("cc-a", "10.6.168.62", &prev);
    assert!(run("cc-pod", "DEL", &coordinator(&prev), &veth).success);
    assert!(
        run(
            "cc-pod",
            "DEL",
            &mac_conf("10.6.168.62/16", "10.6.0.1"),
            macvlan
        )
        .success
    );

    // A gateway nobody answers for.
    let out = run(
        "cc-pod",
        "ADD",
        &mac_conf("10.6.168.63/16", "10.6.0.99"),
        macvlan,
    );
    let prev: Value = serde_json::from_str(&out.stdout).unwrap();
    let out = run("cc-pod", "ADD", &coordinator(&prev), &veth);
    let e: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(e["code"], 11, "{e}");
    assert_eq!(
        e["msg"],
        "gateway 10.6.0.99 of 10.6.168.63 does not answer ARP on eth0 (detectGateway)"
    );
    assert_eq!(node_state("cc-n1"), before, "nothing was made");
    // A flag that is not a boolean is named.
    let mut bad = coordinator(&prev);
    bad["detectGateway"] = json!("yes");
    let out = run("cc-pod", "ADD", &bad, &veth);
    assert!(
        out.stdout
            .contains("detectGateway: \\\"yes\\\" is not true or false"),
        "{}",
        out.stdout
    );
    assert!(
        run(
            "cc-pod",
            "DEL",
            &mac_conf("10.6.168.63/16", "10.6.0.99"),
            macvlan
        )
        .success
    );

    // IPv6, with NDP: a solicitation from :: (as duplicate address detection) finds the host
    // that has the address; a gateway that does not advertise fails ADD. (The kernel's own
    // duplicate address detection is off in the pod, as it would otherwise fail the macvlan
    // ADD first.)
    sh(&[
        "ip",
        "netns",
        "exec",
        "cc-pod",
        "sysctl",
        "-qw",
        "net.ipv6.conf.default.accept_dad=0",
    ]);
    sh(&[
        "ip",
        "-n",
        "cc-a",
        "addr",
        "add",
        "fd00:6::61/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    let mac6 = |ip: &str, gw: Option<&str>| {
        let mut a = json!({"address": ip});
        if let Some(g) = gw {
            a["gateway"] = json!(g);
        }
        json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "macvlan",
            "master": "ens192", "mode": "bridge",
            "ipam": {"type": "static", "addresses": [a]}})
    };
    let out = run("cc-pod", "ADD", &mac6("fd00:6::61/64", None), macvlan);
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let prev: Value = serde_json::from_str(&out.stdout).unwrap();
    let out = run("cc-pod", "ADD", &coordinator(&prev), &veth);
    let e: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(e["code"], 11, "{e}");
    assert!(
        e["msg"].as_str().unwrap().starts_with(&format!(
            "IP conflict: fd00:6::61 is already used on the segment of eth0 by {holder_mac} (detectIPConflict)"
        )),
        "{e}"
    );
    assert_eq!(node_state("cc-n1"), before, "nothing was made");
    assert!(run("cc-pod", "DEL", &mac6("fd00:6::61/64", None), macvlan).success);
    // A free address: ADD goes through and the pod advertises it, unsolicited, overriding
    // what a neighbour had cached for it.
    sh(&[
        "ip",
        "-n",
        "cc-a",
        "neigh",
        "add",
        "fd00:6::62",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "eth0",
        "nud",
        "stale",
    ]);
    let out = run("cc-pod", "ADD", &mac6("fd00:6::62/64", None), macvlan);
    let prev: Value = serde_json::from_str(&out.stdout).unwrap();
    let out = run("cc-pod", "ADD", &coordinator(&prev), &veth);
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_announced("cc-a", "fd00:6::62", &prev);
    assert!(run("cc-pod", "DEL", &coordinator(&prev), &veth).success);
    assert!(run("cc-pod", "DEL", &mac6("fd00:6::62/64", None), macvlan).success);
    // A gateway that advertises itself (the other host, here) lets ADD through.
    let out = run(
        "cc-pod",
        "ADD",
        &mac6("fd00:6::64/64", Some("fd00:6::61")),
        macvlan,
    );
    let prev: Value = serde_json::from_str(&out.stdout).unwrap();
    let out = run("cc-pod", "ADD", &coordinator(&prev), &veth);
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(run("cc-pod", "DEL", &coordinator(&prev), &veth).success);
    assert!(
        run(
            "cc-pod",
            "DEL",
            &mac6("fd00:6::64/64", Some("fd00:6::61")),
            macvlan
        )
        .success
    );
    let out = run(
        "cc-pod",
        "ADD",
        &mac6("fd00:6::63/64", Some("fd00:6::99")),
        macvlan,
    );
    let prev: Value = serde_json::from_str(&out.stdout).unwrap();
    let out = run("cc-pod", "ADD", &coordinator(&prev), &veth);
    let e: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        e["msg"],
        "gateway fd00:6::99 of fd00:6::63 does not answer NDP on eth0 (detectGateway)"
    );
    assert!(
        run(
            "cc-pod",
            "DEL",
            &mac6("fd00:6::63/64", Some("fd00:6::99")),
            macvlan
        )
        .success
    );
    assert_eq!(node_state("cc-n1"), before);
    assert!(
        run(
            "cc-a",
            "DEL",
            &mac_conf("10.6.168.61/16", "10.6.0.1"),
            macvlan
        )
        .success
    );
}

#[test]
fn an_address_found_in_conflict_is_held_back_while_its_other_host_answers() {
    if !prerequisites() {
        return;
    }
    let _zones = zones("cq", &[("cq-n1", "10.6.0.1/16")]);
    let _holder = Netns::new("cq-a");
    let _pods = [Netns::new("cq-pod"), Netns::new("cq-pod2")];
    let sb = Sandbox::new();
    let agent = sb.agent_with("cq-n1", "", &["--ip-conflict-hold", "8s"]);
    sb.apply(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: cq}\n\
         spec: {subnet: 10.6.0.0/16, ips: [10.6.168.61-10.6.168.63], gateway: 10.6.0.1}\n",
    );
    let run = |netns: &str, pod: &str, command: &str, conf: &Value, plugin: &Path| {
        CniCall::new(command, netns, pod, conf)
            .with_workspace_plugins()
            .run_program_via(plugin, &["ip", "netns", "exec", "cq-n1"])
    };
    let macvlan = Path::new("/usr/lib/cni/macvlan");
    let mac_conf = json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "macvlan",
        "master": "ens192", "mode": "bridge",
        "ipam": {"type": "spiderpool", "ipam_unix_socket_path": agent.socket,
                 "default_ipv4_ippool": ["cq"]}});
    let veth = bin("veth");
    let veth_conf = |prev: &Value| {
        json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "veth",
            "service_cidr": ["10.233.0.0/18"], "ipam_unix_socket_path": agent.socket,
            "detectIPConflict": true, "prevResult": prev})
    };
    // The chain as a runtime runs it: macvlan (spiderpool IPAM), then veth; on a failure, DEL
    // of the whole chain. The address the pod got, and the chain's error if any.
    let attach = |netns: &str, pod: &str| -> (String, Option<Value>) {
        let out = run(netns, pod, "ADD", &mac_conf, macvlan);
        assert!(out.success, "macvlan: {}{}", out.stdout, out.stderr);
        let prev: Value = serde_json::from_str(&out.stdout).unwrap();
        let ip = prev["ips"][0]["address"].as_str().unwrap().to_string();
        let out = run(netns, pod, "ADD", &veth_conf(&prev), &veth);
        if out.success {
            return (ip, None);
        }
        for (conf, plugin) in [
            (veth_conf(&prev), veth.as_path()),
            (mac_conf.clone(), macvlan),
        ] {
            assert!(run(netns, pod, "DEL", &conf, plugin).success);
        }
        (ip, Some(serde_json::from_str(&out.stdout).unwrap()))
    };
    let detach = |netns: &str, pod: &str| {
        let prev = json!({"cniVersion": "1.0.0", "ips": []});
        assert!(run(netns, pod, "DEL", &veth_conf(&prev), &veth).success);
        assert!(run(netns, pod, "DEL", &mac_conf, macvlan).success);
    };
    let before = node_state("cq-n1");

    // Another host of the segment has the pool's first address, unknown to Spiderpool.
    let holder = json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "macvlan",
        "master": "ens192", "mode": "bridge",
        "ipam": {"type": "static", "addresses": [{"address": "10.6.168.61/16", "gateway": "10.6.0.1"}]}});
    assert!(run("cq-a", "other", "ADD", &holder, macvlan).success);
    let holder_mac = mac("cq-a", "eth0");

    // The first pod is given it, the probe finds the other host: ADD fails naming both, and the
    // address is held back by a SpiderReservedIP that says why.
    let (ip, err) = attach("cq-pod", "web-1");
    assert_eq!(ip, "10.6.168.61/16");
    let e = err.expect("the conflict fails ADD");
    assert_eq!(e["code"], 11, "{e}");
    let msg = e["msg"].as_str().unwrap();
    assert!(
        msg.starts_with(&format!(
            "IP conflict: 10.6.168.61 is already used on the segment of eth0 by {holder_mac} (detectIPConflict); held back from allocation until "
        )) && msg.ends_with("(SpiderReservedIP ip-conflict-10-6-168-61)"),
        "{msg}"
    );
    let hold = sb.get_json("reservedip", "ip-conflict-10-6-168-61");
    assert_eq!(hold["spec"]["ips"], json!(["10.6.168.61"]), "{hold}");
    assert_eq!(
        hold["metadata"]["labels"]["ipam.spidernet.io/ip-conflict"],
        "true"
    );
    let notes = &hold["metadata"]["annotations"];
    assert_eq!(
        notes["ipam.spidernet.io/ip-conflict-mac"],
        holder_mac.as_str()
    );
    assert_eq!(notes["ipam.spidernet.io/ip-conflict-pod"], "default/web-1");
    assert_eq!(sb.allocated("cq"), 0, "the conflicting pod holds nothing");

    // While the other host has it, neither the pod's next sandbox nor another pod is given it.
    let (ip, err) = attach("cq-pod", "web-1");
    assert_eq!((ip.as_str(), err), ("10.6.168.62/16", None));
    let (ip, err) = attach("cq-pod2", "web-2");
    assert_eq!((ip.as_str(), err), ("10.6.168.63/16", None));
    detach("cq-pod", "web-1");
    detach("cq-pod2", "web-2");

    // The other host leaves; once the hold is over (8 s here), the address is tried again, and
    // the probe finds it free.
    assert!(run("cq-a", "other", "DEL", &holder, macvlan).success);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sb
        .ctl(&["get", "reservedip", "ip-conflict-10-6-168-61"], "")
        .success
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the hold never ended:\n{}",
            agent.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let (ip, err) = attach("cq-pod", "web-3");
    assert_eq!((ip.as_str(), err), ("10.6.168.61/16", None));
    detach("cq-pod", "web-3");
    assert_eq!(sb.allocated("cq"), 0);
    assert_eq!(node_state("cq-n1"), before, "the node is as it was");
}

#[test]
fn a_second_nic_shares_the_pair_and_the_default_route_stays_with_pod_default_route_nic() {
    if !prerequisites() {
        return;
    }
    let _zones = zones("cm", &[("cm-n1", "10.6.0.1/16")]);
    let _pod = Netns::new("cm-pod");
    let sb = Sandbox::new();
    let agent = sb.agent("cm-n1", "");
    let macvlan = Path::new("/usr/lib/cni/macvlan");
    let veth = bin("veth");
    // Each NIC from macvlan with its default route, as Debian's plugins add them (a second
    // default route is appended).
    let mac_conf = |ip: &str, gw: &str| {
        json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "macvlan",
            "master": "ens192", "mode": "bridge",
            "ipam": {"type": "static", "addresses": [{"address": ip, "gateway": gw}],
                     "routes": [{"dst": "0.0.0.0/0"}]}})
    };
    let veth_conf = |prev: &Value, extra: Value| {
        let mut c = json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "veth",
            "service_cidr": ["10.233.0.0/18"], "ipam_unix_socket_path": agent.socket,
            "prevResult": prev});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let call = |command: &str, conf: &Value| CniCall::new(command, "cm-pod", "web", conf);
    let run = |nic: &str, command: &str, conf: &Value, plugin: &Path| {
        let out = call(command, conf)
            .ifname(nic)
            .run_program_via(plugin, &["ip", "netns", "exec", "cm-n1"]);
        let ok = out.success;
        assert!(ok, "{command} {nic}: {}{}", out.stdout, out.stderr);
        serde_json::from_str::<Value>(&out.stdout).unwrap_or(Value::Null)
    };
    let ifindex = |nic: &str| -> u32 {
        let j: Value =
            serde_json::from_str(&sh(&["ip", "-n", "cm-pod", "-j", "link", "show", nic])).unwrap();
        j[0]["ifindex"].as_u64().unwrap() as u32
    };
    let pod = |args: &[&str]| sh(&[&["ip", "-n", "cm-pod"][..], args].concat());
    let before = node_state("cm-n1");

    let eth0 = mac_conf("10.6.168.60/16", "10.6.0.1");
    let net1 = mac_conf("10.7.168.70/16", "10.7.0.1");
    let prev0 = run("eth0", "ADD", &eth0, macvlan);
    run("eth0", "ADD", &veth_conf(&prev0, json!({})), &veth);
    let prev1 = run("net1", "ADD", &net1, macvlan);
    run("net1", "ADD", &veth_conf(&prev1, json!({})), &veth);

    // One pair for the pod: the node routes both NICs' addresses through it.
    let [links, ..] = node_state("cm-n1");
    assert_eq!(
        links.lines().count(),
        before[0].lines().count() + 1,
        "{links}"
    );
    let table500 = sh(&["ip", "-n", "cm-n1", "route", "show", "table", "500"]);
    let host_veth: Vec<&str> = table500
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    assert_eq!(host_veth.len(), 2, "{table500}");
    assert_eq!(host_veth[0], host_veth[1], "{table500}");
    let rules = sh(&["ip", "-n", "cm-n1", "rule"]);
    for ip in ["10.6.168.60", "10.7.168.70"] {
        assert!(
            rules.contains(&format!("1000:\tfrom all to {ip} lookup 500")),
            "{rules}"
        );
    }
    // eth0, the first NIC, keeps the default route; net1's routes move to a table of its own,
    // looked up from its address, with the node and the Services still through the pair.
    let main = pod(&["route"]);
    let defaults: Vec<&str> = main.lines().filter(|l| l.starts_with("default")).collect();
    assert_eq!(defaults, ["default via 10.6.0.1 dev eth0 "], "{main}");
    let t1 = 100 + ifindex("net1");
    assert!(
        pod(&["rule"]).contains(&format!("1000:\tfrom 10.7.168.70 lookup {t1}")),
        "{}",
        pod(&["rule"])
    );
    let table = pod(&["route", "show", "table", &t1.to_string()]);
    for want in [
        "default via 10.7.0.1 dev net1",
        "10.7.0.0/16 dev net1",
        "10.6.0.2 dev veth0 scope link src 10.7.168.70",
        "10.233.0.0/18 via 10.6.0.2 dev veth0 src 10.7.168.70",
    ] {
        assert!(table.contains(want), "{want:?} in table {t1}:\n{table}");
    }
    // Both ways through the pair, from net1's address too.
    let ping = sh(&[
        "ip",
        "netns",
        "exec",
        "cm-n1",
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "10.7.168.70",
    ]);
    assert!(ping.contains("ttl=64"), "{ping}");
    let ping = sh(&[
        "ip",
        "netns",
        "exec",
        "cm-pod",
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "-I",
        "10.7.168.70",
        "10.6.0.2",
    ]);
    assert!(ping.contains("ttl=64"), "{ping}");
    // CHECK of net1 holds; its DEL takes only its routes and rules on the node.
    let mut checked = veth_conf(&prev1, json!({}));
    checked["prevResult"] = prev1.clone();
    run("net1", "CHECK", &checked, &veth);
    run("net1", "DEL", &checked, &veth);
    let table500 = sh(&["ip", "-n", "cm-n1", "route", "show", "table", "500"]);
    assert!(
        table500.contains("10.6.168.60") && !table500.contains("10.7.168.70"),
        "{table500}"
    );
    assert!(!sh(&["ip", "-n", "cm-n1", "rule"]).contains("10.7.168.70"));
    let neigh = sh(&["ip", "-n", "cm-n1", "neigh"]);
    assert!(
        neigh.contains("10.6.168.60") && !neigh.contains("10.7.168.70"),
        "{neigh}"
    );
    run("net1", "DEL", &net1, macvlan);

    // podDefaultRouteNIC net1: net1 keeps its default route, eth0's moves to a table.
    let prev1 = run("net1", "ADD", &net1, macvlan);
    run(
        "net1",
        "ADD",
        &veth_conf(&prev1, json!({"podDefaultRouteNIC": "net1"})),
        &veth,
    );
    let main = pod(&["route"]);
    let defaults: Vec<&str> = main.lines().filter(|l| l.starts_with("default")).collect();
    assert_eq!(defaults, ["default via 10.7.0.1 dev net1 "], "{main}");
    let t0 = 100 + ifindex("eth0");
    assert!(
        pod(&["rule"]).contains(&format!("1000:\tfrom 10.6.168.60 lookup {t0}")),
        "{}",
        pod(&["rule"])
    );
    assert!(
        pod(&["route", "show", "table", &t0.to_string()]).contains("default via 10.6.0.1 dev eth0")
    );
    // A bad NIC name is refused by name.
    let out = call(
        "ADD",
        &veth_conf(&prev1, json!({"podDefaultRouteNIC": "net1/x"})),
    )
    .ifname("net1")
    .run_program_via(&veth, &["ip", "netns", "exec", "cm-n1"]);
    assert!(
        out.stdout.contains("podDefaultRouteNIC: \\\"net1/x\\\""),
        "{}",
        out.stdout
    );

    // The runtime's DEL, last NIC first: the node is as it was.
    run("net1", "DEL", &veth_conf(&prev1, json!({})), &veth);
    run("net1", "DEL", &net1, macvlan);
    run("eth0", "DEL", &veth_conf(&prev0, json!({})), &veth);
    run("eth0", "DEL", &eth0, macvlan);
    assert_eq!(node_state("cm-n1"), before);
}

#[test]
fn the_ipam_plugin_probes_without_a_coordinator_when_the_agent_says_so() {
    if !prerequisites() {
        return;
    }
    let _zones = zones("cp", &[("cp-n1", "10.6.0.1/16")]);
    let _holder = Netns::new("cp-a");
    let _pod = Netns::new("cp-pod");
    let sb = Sandbox::new();
    // Upstream's switches: the IPAM plugin probes, and no coordinator follows it.
    let agent = sb.agent_with(
        "cp-n1",
        "",
        &[
            "--enable-ip-conflict-detection=true",
            "--enable-gateway-detection=true",
            "--ip-conflict-hold",
            "1h",
        ],
    );
    sb.apply(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: cp}\n\
         spec: {subnet: 10.6.0.0/16, ips: [10.6.168.61-10.6.168.62], gateway: 10.6.0.1}\n---\n\
         apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: silent}\n\
         spec: {subnet: 10.6.0.0/16, ips: [10.6.168.70], gateway: 10.6.0.99}\n",
    );
    let macvlan = Path::new("/usr/lib/cni/macvlan");
    let conf = |pool: &str| {
        json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "macvlan",
            "master": "ens192", "mode": "bridge",
            "ipam": {"type": "spiderpool", "ipam_unix_socket_path": agent.socket,
                     "default_ipv4_ippool": [pool]}})
    };
    let run = |netns: &str, pod: &str, command: &str, conf: &Value| {
        CniCall::new(command, netns, pod, conf)
            .with_workspace_plugins()
            .run_program_via(macvlan, &["ip", "netns", "exec", "cp-n1"])
    };
    let before = node_state("cp-n1");

    // Another host of the segment has the pool's first address.
    let holder = json!({"cniVersion": "1.0.0", "name": "macvlan-conf", "type": "macvlan",
        "master": "ens192", "mode": "bridge",
        "ipam": {"type": "static", "addresses": [{"address": "10.6.168.61/16", "gateway": "10.6.0.1"}]}});
    assert!(run("cp-a", "other", "ADD", &holder).success);
    let holder_mac = mac("cp-a", "eth0");

    // macvlan's ADD fails with the IPAM plugin's error; the address is held back and the pod
    // holds nothing.
    let out = run("cp-pod", "web-1", "ADD", &conf("cp"));
    assert!(!out.success, "{}", out.stdout);
    let e: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(e["code"], 11, "{e}");
    let msg = e["msg"].as_str().unwrap();
    assert!(
        msg.contains(&format!(
            "IP conflict: 10.6.168.61 is already used on the segment of eth0 by {holder_mac} (detectIPConflict); held back from allocation until "
        )) && msg.ends_with("(SpiderReservedIP ip-conflict-10-6-168-61)"),
        "{msg}"
    );
    assert!(run("cp-pod", "web-1", "DEL", &conf("cp")).success);
    assert_eq!(sb.allocated("cp"), 0, "the conflicting pod holds nothing");

    // The next try gets the free address, whose gateway answers.
    let out = run("cp-pod", "web-1", "ADD", &conf("cp"));
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let prev: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(prev["ips"][0]["address"], "10.6.168.62/16");
    assert!(run("cp-pod", "web-1", "DEL", &conf("cp")).success);

    // A gateway nobody answers for fails the ADD, naming it.
    let out = run("cp-pod", "web-2", "ADD", &conf("silent"));
    assert!(!out.success, "{}", out.stdout);
    let e: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        e["msg"], "gateway 10.6.0.99 of 10.6.168.70 does not answer ARP on eth0 (detectGateway)",
        "{e}"
    );
    assert!(run("cp-pod", "web-2", "DEL", &conf("silent")).success);
    assert_eq!(sb.allocated("silent"), 0);
    assert!(run("cp-a", "other", "DEL", &holder).success);
    assert_eq!(node_state("cp-n1"), before, "the node is as it was");
}
