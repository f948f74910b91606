//! The allocation rulebook driven through the real binaries (agent, `spiderpool`,
//! `spiderpoolctl`), one test per upstream end-to-end behaviour where there is one (the ID
//! leads the test name), plus CNI 1.1 GC/STATUS and the all-or-nothing rollbacks.

use serde_json::{json, Value};
use spiderpool_testkit::{Agent, CniCall, Output, Sandbox};

/// A datastore, one agent on `node-1` (`zone=a`), and helpers to apply objects and call CNI.
struct Lab {
    sb: Sandbox,
    agent: Agent,
}

fn pool(name: &str, subnet: &str, ips: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {{name: {name}}}\nspec:\n  subnet: {subnet}\n  ips: [{ips}]\n{extra}"
    )
}

/// A Pod object in `ns` with annotations and labels given as JSON objects.
fn pod(
    ns: &str,
    name: &str,
    annotations: Value,
    labels: Value,
    owner: Option<(&str, &str)>,
) -> String {
    let owner = owner
        .map(|(kind, n)| json!([{"apiVersion": "apps/v1", "kind": kind, "name": n, "uid": format!("uid-{n}"), "controller": true}]))
        .unwrap_or(json!([]));
    let doc = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations, "labels": labels, "ownerReferences": owner},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "registry.invalid/c"}]}
    });
    format!("---\n{doc}\n")
}

impl Lab {
    fn new(objects: &str) -> Lab {
        let sb = Sandbox::new();
        sb.apply(objects);
        let agent = sb.agent("node-1", "zone=a");
        Lab { sb, agent }
    }

    fn conf(&self, version: &str, ipam: Value) -> Value {
        let mut c = json!({"cniVersion": version, "name": "macvlan-conf",
            "ipam": {"type": "spiderpool", "ipam_unix_socket_path": self.agent.socket}});
        for (k, v) in ipam.as_object().unwrap() {
            c["ipam"][k] = v.clone();
        }
        c
    }

    /// CNI ADD for pod `ns/name` (container `ctr`, interface `nic`).
    fn add_in(&self, ns: &str, name: &str, ctr: &str, nic: &str, ipam: Value) -> Output {
        let mut c = CniCall::new("ADD", ctr, name, &self.conf("1.0.0", ipam)).ifname(nic);
        c.args = format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID=uid-{ctr}");
        c.run()
    }

    fn add(&self, name: &str, ctr: &str, nic: &str) -> Output {
        self.add_in("default", name, ctr, nic, json!({}))
    }

    fn del_in(&self, ns: &str, name: &str, ctr: &str, nic: &str) -> Output {
        let mut c = CniCall::new("DEL", ctr, name, &self.conf("1.0.0", json!({}))).ifname(nic);
        c.args = format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}");
        c.run()
    }

    fn del(&self, name: &str, ctr: &str, nic: &str) -> Output {
        self.del_in("default", name, ctr, nic)
    }

    fn raw(&self, command: &str, version: &str, extra: Value) -> Output {
        let mut conf = self.conf(version, json!({}));
        for (k, v) in extra.as_object().unwrap() {
            conf[k] = v.clone();
        }
        let mut c = CniCall::new(command, "x", "x", &conf);
        c.container_id = None;
        c.ifname = None;
        c.netns = None;
        c.run()
    }
}

/// The addresses of an ADD result.
fn ips(out: &Output) -> Vec<String> {
    assert!(out.success, "ADD failed: {}{}", out.stdout, out.stderr);
    out.json()["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap().to_string())
        .collect()
}

fn ip(out: &Output) -> String {
    let v = ips(out);
    assert_eq!(v.len(), 1, "one address expected: {v:?}");
    v[0].clone()
}

/// The code and message of a failed call.
fn failure(out: &Output) -> (u64, String) {
    assert!(!out.success, "expected a failure, got {}", out.stdout);
    let j = out.json();
    (
        j["code"].as_u64().unwrap(),
        j["msg"].as_str().unwrap().to_string(),
    )
}

fn zones() -> String {
    [
        pool(
            "v4-a",
            "10.6.0.0/16",
            "10.6.0.10-10.6.0.19",
            "  gateway: 10.6.0.1\n",
        ),
        pool(
            "v4-b",
            "10.7.0.0/16",
            "10.7.0.10-10.7.0.19",
            "  gateway: 10.7.0.1\n",
        ),
        pool(
            "v6-a",
            "fd00:6::/64",
            "fd00:6::10-fd00:6::19",
            "  gateway: fd00:6::1\n",
        ),
    ]
    .concat()
}

#[test]
fn a00002_custom_routes_go_to_the_nic_whose_subnet_holds_the_gateway() {
    let lab = Lab::new(&zones());
    lab.sb.apply(&pod(
        "default",
        "r",
        json!({
            "ipam.spidernet.io/ippools": r#"[{"interface":"eth0","ipv4":["v4-a"]},{"interface":"net1","ipv4":["v4-b"]}]"#,
            "ipam.spidernet.io/routes": r#"[{"dst":"172.16.0.0/16","gw":"10.7.0.254"}]"#
        }),
        json!({}),
        None,
    ));
    let eth0 = lab.add("r", "c1", "eth0");
    assert_eq!(
        eth0.json()["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.6.0.1"}])
    );
    let net1 = lab.add("r", "c1", "net1");
    assert_eq!(
        net1.json()["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.7.0.1"}, {"dst": "172.16.0.0/16", "gw": "10.7.0.254"}])
    );
}

#[test]
fn a00012_default_route_nic_gets_the_only_default_route() {
    let lab = Lab::new(&zones());
    lab.sb.apply(&pod(
        "default",
        "r",
        json!({
            "ipam.spidernet.io/ippools": r#"[{"interface":"eth0","ipv4":["v4-a"]},{"interface":"net1","ipv4":["v4-b"]}]"#,
            "ipam.spidernet.io/default-route-nic": "net1"
        }),
        json!({}),
        None,
    ));
    assert_eq!(lab.add("r", "c1", "eth0").json()["routes"], json!([]));
    assert_eq!(
        lab.add("r", "c1", "net1").json()["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.7.0.1"}])
    );
}

#[test]
fn a00008_multi_container_pod_with_a_long_spec_gets_one_address() {
    let lab = Lab::new(&zones());
    let containers: Vec<Value> = (0..20)
        .map(|i| json!({"name": format!("c{i}"), "image": "nginx", "env": [{"name": "LONG", "value": "x".repeat(2000)}]}))
        .collect();
    let doc = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "big", "namespace": "default", "annotations": {"ipam.spidernet.io/ippool": r#"{"ipv4":["v4-a"]}"#}},
        "spec": {"nodeName": "node-1", "containers": containers}});
    lab.sb.apply(&doc.to_string());
    assert_eq!(ip(&lab.add("big", "c", "eth0")), "10.6.0.10/16");
}

#[test]
fn a00003_missing_pools_unknown_keys_and_malformed_annotations_fail() {
    let lab = Lab::new(&zones());
    let cases = [
        (
            json!({"ipam.spidernet.io/ippool": r#"{"ipv4":["nope"]}"#}),
            7,
            "IPPool \"nope\" named by pod annotation ipam.spidernet.io/ippool does not exist",
        ),
        (
            json!({"ipam.spidernet.io/ippools": r#"[{"interface":"eth0","ipv4":["nope"]}]"#}),
            7,
            "\"nope\"",
        ),
        (
            json!({"ipam.spidernet.io/ippool": r#"{"ipv4":["v4-a"],"ipv9":["x"]}"#}),
            7,
            "unknown field `ipv9`",
        ),
        (
            json!({"ipam.spidernet.io/ippool": r#"{"ipv4": ["v4-a"]"#}),
            7,
            "pod default/bad: pod annotation ipam.spidernet.io/ippool",
        ),
        (
            json!({"ipam.spidernet.io/ippool": r#"{"cleangateway": "yes", "ipv4":["v4-a"]}"#}),
            7,
            "cleangateway",
        ),
        (
            // I00023: an orphan pod has no application to carve a pool for.
            json!({"ipam.spidernet.io/subnet": r#"{"ipv4":["s"]}"#}),
            7,
            "pod default/bad: SpiderSubnet feature doesn't support no-controller pod",
        ),
    ];
    for (annotations, code, needle) in cases {
        lab.sb
            .apply(&pod("default", "bad", annotations.clone(), json!({}), None));
        let (c, msg) = failure(&lab.add("bad", "c", "eth0"));
        assert_eq!(c, code, "{annotations}: {msg}");
        assert!(
            msg.contains(needle),
            "{annotations}: {msg:?} lacks {needle:?}"
        );
    }
    for p in ["v4-a", "v4-b", "v6-a"] {
        assert_eq!(lab.sb.allocated(p), 0);
    }
}

#[test]
fn a00004_a00006_a00007_pod_beats_namespace_beats_cluster_default_and_wildcards() {
    let lab = Lab::new(&format!(
        "{}{}{}---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: team\n  annotations:\n    ipam.spidernet.io/default-ipv4-ippool: '[\"ns-*\"]'\n",
        zones(),
        pool("cluster", "10.9.0.0/16", "10.9.0.10-10.9.0.19", "  default: true\n"),
        pool("ns-pool", "10.8.0.0/16", "10.8.0.10-10.8.0.19", ""),
    ));
    // Cluster default for a namespace without annotations.
    assert_eq!(
        ip(&lab.add_in("default", "p0", "c0", "eth0", json!({}))),
        "10.9.0.10/16"
    );
    // A00006/A00007: the namespace default (a wildcard) beats the cluster default.
    assert_eq!(
        ip(&lab.add_in("team", "p1", "c1", "eth0", json!({}))),
        "10.8.0.10/16"
    );
    // ... and beats the CNI config's defaults too.
    assert_eq!(
        ip(&lab.add_in(
            "team",
            "p2",
            "c2",
            "eth0",
            json!({"default_ipv4_ippool": ["v4-b"]})
        )),
        "10.8.0.11/16"
    );
    // A00004: the pod annotation beats both.
    lab.sb.apply(&pod(
        "team",
        "p3",
        json!({"ipam.spidernet.io/ippool": r#"{"ipv4":["v4-a"]}"#}),
        json!({}),
        None,
    ));
    assert_eq!(
        ip(&lab.add_in("team", "p3", "c3", "eth0", json!({}))),
        "10.6.0.10/16"
    );
}

#[test]
fn a00005_a00015_ippools_beats_ippool_and_takes_wildcards() {
    let lab = Lab::new(&zones());
    lab.sb.apply(&pod(
        "default",
        "p",
        json!({
            "ipam.spidernet.io/ippool": r#"{"ipv4":["v4-a"]}"#,
            "ipam.spidernet.io/ippools": r#"[{"interface":"eth0","ipv4":["v4-b*"],"ipv6":["v6-?"]}]"#
        }),
        json!({}),
        None,
    ));
    assert_eq!(
        ips(&lab.add("p", "c", "eth0")),
        ["10.7.0.10/16", "fd00:6::10/64"]
    );
}

#[test]
fn a00010_multi_nic_by_name_and_by_position_draw_from_their_own_pools() {
    let lab = Lab::new(&zones());
    lab.sb.apply(&pod(
        "default",
        "named",
        json!({"ipam.spidernet.io/ippools": r#"[{"interface":"eth0","ipv4":["v4-a"]},{"interface":"net1","ipv4":["v4-b"]}]"#}),
        json!({}),
        None,
    ));
    lab.sb.apply(&pod(
        "default",
        "positional",
        json!({"ipam.spidernet.io/ippools": r#"[{"ipv4":["v4-a"]},{"ipv4":["v4-b"]},{"ipv6":["v6-a"]}]"#}),
        json!({}),
        None,
    ));
    assert_eq!(ip(&lab.add("named", "c1", "eth0")), "10.6.0.10/16");
    assert_eq!(ip(&lab.add("named", "c1", "net1")), "10.7.0.10/16");
    assert_eq!(ip(&lab.add("positional", "c2", "eth0")), "10.6.0.11/16");
    assert_eq!(ip(&lab.add("positional", "c2", "net1")), "10.7.0.11/16");
    // net2 is listed but never added: nothing is taken for it.
    assert_eq!(lab.sb.allocated("v6-a"), 0);
    let ep = lab.sb.get_json("endpoint", "default/named");
    let nics: Vec<&str> = ep["status"]["current"]["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["interface"].as_str().unwrap())
        .collect();
    assert_eq!(nics, ["eth0", "net1"]);
    // DEL of one NIC releases only that NIC.
    assert!(lab.del("named", "c1", "net1").success);
    assert_eq!(lab.sb.allocated("v4-b"), 1);
    assert_eq!(lab.sb.allocated("v4-a"), 2);
}

#[test]
fn two_nics_from_one_pool_get_distinct_addresses() {
    let lab = Lab::new(&zones());
    lab.sb.apply(&pod(
        "default",
        "twin",
        json!({"ipam.spidernet.io/ippool": r#"{"ipv4":["v4-a"]}"#}),
        json!({}),
        None,
    ));
    assert_eq!(ip(&lab.add("twin", "c", "eth0")), "10.6.0.10/16");
    assert_eq!(ip(&lab.add("twin", "c", "net1")), "10.6.0.11/16");
}

#[test]
fn a00011_pool_routes_and_gateway_give_routes_unless_clean_gateway() {
    let lab = Lab::new(&pool(
        "routed",
        "10.6.0.0/16",
        "10.6.0.10-10.6.0.19",
        "  gateway: 10.6.0.1\n  routes:\n  - {dst: 192.168.0.0/16, gw: 10.6.0.2}\n",
    ));
    let out = lab.add_in(
        "default",
        "p",
        "c1",
        "eth0",
        json!({"default_ipv4_ippool": ["routed"]}),
    );
    assert_eq!(
        out.json()["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.6.0.1"}, {"dst": "192.168.0.0/16", "gw": "10.6.0.2"}])
    );
    let out = lab.add_in(
        "default",
        "q",
        "c2",
        "eth0",
        json!({"default_ipv4_ippool": ["routed"], "clean_gateway": true}),
    );
    assert_eq!(
        out.json()["routes"],
        json!([{"dst": "192.168.0.0/16", "gw": "10.6.0.2"}])
    );
    assert_eq!(
        out.json()["ips"][0]["gateway"],
        "10.6.0.1",
        "the gateway is still reported"
    );
}

#[test]
fn a00013_a00014_ippools_must_name_the_nic_once() {
    let lab = Lab::new(&zones());
    lab.sb.apply(&pod(
        "default",
        "only-eth0",
        json!({"ipam.spidernet.io/ippools": r#"[{"interface":"eth0","ipv4":["v4-a"]}]"#}),
        json!({}),
        None,
    ));
    assert!(lab.add("only-eth0", "c", "eth0").success);
    let (code, msg) = failure(&lab.add("only-eth0", "c", "net1"));
    assert_eq!(code, 7);
    assert!(msg.contains("no entry for interface \"net1\""), "{msg}");
    lab.sb.apply(&pod(
        "default",
        "dup",
        json!({"ipam.spidernet.io/ippools": r#"[{"interface":"eth0","ipv4":["v4-a"]},{"interface":"eth0","ipv4":["v4-b"]}]"#}),
        json!({}),
        None,
    ));
    let (code, msg) = failure(&lab.add("dup", "c2", "eth0"));
    assert_eq!(code, 7);
    assert!(msg.contains("interface \"eth0\" is listed twice"), "{msg}");
    assert_eq!(lab.sb.allocated("v4-b"), 0);
}

#[test]
fn a00016_an_exhausted_nic_does_not_leak_the_other_across_retries() {
    let lab = Lab::new(&[zones(), pool("one", "10.5.0.0/16", "10.5.0.10", "")].concat());
    lab.sb.apply(&pod(
        "default",
        "hog",
        json!({"ipam.spidernet.io/ippool": r#"{"ipv4":["one"]}"#}),
        json!({}),
        None,
    ));
    assert!(lab.add("hog", "h", "eth0").success);
    lab.sb.apply(&pod(
        "default",
        "m",
        json!({"ipam.spidernet.io/ippools": r#"[{"interface":"eth0","ipv4":["v4-a"]},{"interface":"net1","ipv4":["one"]}]"#}),
        json!({}),
        None,
    ));
    for attempt in 0..3 {
        let ctr = format!("try-{attempt}");
        assert_eq!(
            ip(&lab.add("m", &ctr, "eth0")),
            "10.6.0.10/16",
            "attempt {attempt}"
        );
        let (code, msg) = failure(&lab.add("m", &ctr, "net1"));
        assert_eq!(code, 100);
        assert!(
            msg.contains("one: exhausted (1 of 1 addresses in use)"),
            "{msg}"
        );
        // The runtime gives up on this sandbox: DEL for every NIC.
        assert!(lab.del("m", &ctr, "eth0").success && lab.del("m", &ctr, "net1").success);
        assert_eq!(
            lab.sb.allocated("v4-a"),
            0,
            "attempt {attempt} leaked eth0's address"
        );
    }
}

#[test]
fn dual_stack_is_all_or_nothing() {
    let lab = Lab::new(&[zones(), pool("v6-one", "fd00:7::/64", "fd00:7::10", "")].concat());
    lab.sb.apply(&pod(
        "default",
        "hog",
        json!({"ipam.spidernet.io/ippool": r#"{"ipv6":["v6-one"]}"#}),
        json!({}),
        None,
    ));
    assert!(lab.add("hog", "h", "eth0").success);
    lab.sb.apply(&pod(
        "default",
        "d",
        json!({"ipam.spidernet.io/ippool": r#"{"ipv4":["v4-a"],"ipv6":["v6-one"]}"#}),
        json!({}),
        None,
    ));
    let (code, msg) = failure(&lab.add("d", "c", "eth0"));
    assert_eq!(code, 100);
    assert!(
        msg.contains("all IPv6 IPPools for pod default/d are exhausted"),
        "{msg}"
    );
    assert_eq!(
        lab.sb.allocated("v4-a"),
        0,
        "the IPv4 address was kept after the IPv6 failure"
    );
    assert!(lab
        .sb
        .ctl(&["get", "endpoint", "default/d"], "")
        .stderr
        .contains("not found"));
}

fn affinity_lab() -> Lab {
    Lab::new(&[
        pool("by-node", "10.1.0.0/16", "10.1.0.10-10.1.0.19", "  nodeAffinity: {matchLabels: {zone: a}}\n"),
        pool("by-other-node", "10.2.0.0/16", "10.2.0.10", "  nodeAffinity: {matchLabels: {zone: b}}\n"),
        pool("by-ns", "10.3.0.0/16", "10.3.0.10-10.3.0.19", "  namespaceAffinity: {matchLabels: {team: red}}\n"),
        pool("by-pod", "10.4.0.0/16", "10.4.0.10-10.4.0.19", "  podAffinity: {matchLabels: {app: web}}\n"),
        pool(
            "all-three",
            "10.5.0.0/16",
            "10.5.0.10-10.5.0.19",
            "  nodeAffinity: {matchLabels: {zone: a}}\n  namespaceAffinity: {matchLabels: {team: red}}\n  podAffinity: {matchLabels: {app: web}}\n",
        ),
        pool("named-node", "10.11.0.0/16", "10.11.0.10", "  nodeName: [node-1]\n  nodeAffinity: {matchLabels: {zone: b}}\n"),
        pool("other-named-node", "10.12.0.0/16", "10.12.0.10", "  nodeName: [node-9]\n"),
        pool("named-ns", "10.13.0.0/16", "10.13.0.10-10.13.0.11", "  namespaceName: [red-ns]\n  namespaceAffinity: {matchLabels: {team: blue}}\n"),
        pool("other-named-ns", "10.14.0.0/16", "10.14.0.10", "  namespaceName: [blue-ns]\n"),
        pool("multus", "10.15.0.0/16", "10.15.0.10", "  multusName: [kube-system/macvlan-conf]\n"),
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: red-ns, labels: {team: red}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: blue-ns, labels: {team: blue}}\n".into(),
    ]
    .concat())
}

fn try_pool(
    lab: &Lab,
    ns: &str,
    name: &str,
    pool: &str,
    labels: Value,
    multus: Option<&str>,
) -> Output {
    let mut annotations = json!({"ipam.spidernet.io/ippool": format!(r#"{{"ipv4":["{pool}"]}}"#)});
    if let Some(m) = multus {
        annotations["v1.multus-cni.io/default-network"] = json!(m);
    }
    lab.sb.apply(&pod(ns, name, annotations, labels, None));
    lab.add_in(ns, name, &format!("c-{ns}-{name}"), "eth0", json!({}))
}

#[test]
fn l00001_to_l00006_node_namespace_and_pod_affinity_match_and_mismatch() {
    let lab = affinity_lab();
    let web = json!({"app": "web"});
    // L00001/L00003/L00005: all three selectors match.
    assert_eq!(
        ip(&try_pool(
            &lab,
            "red-ns",
            "ok",
            "all-three",
            web.clone(),
            None
        )),
        "10.5.0.10/16"
    );
    assert_eq!(
        ip(&try_pool(&lab, "default", "n", "by-node", json!({}), None)),
        "10.1.0.10/16"
    );
    assert_eq!(
        ip(&try_pool(&lab, "red-ns", "ns", "by-ns", json!({}), None)),
        "10.3.0.10/16"
    );
    assert_eq!(
        ip(&try_pool(&lab, "default", "p", "by-pod", web.clone(), None)),
        "10.4.0.10/16"
    );
    // L00002/L00004/L00006: one mismatch is enough to refuse, and the reason says which.
    let cases = [
        (
            "default",
            "by-other-node",
            web.clone(),
            "by-other-node: spec.nodeAffinity does not match the labels of node node-1",
        ),
        (
            "blue-ns",
            "all-three",
            web.clone(),
            "all-three: spec.namespaceAffinity does not match the labels of namespace blue-ns",
        ),
        (
            "red-ns",
            "all-three",
            json!({"app": "db"}),
            "all-three: spec.podAffinity does not match the labels of pod red-ns/x",
        ),
    ];
    for (ns, p, labels, want) in cases {
        let (code, msg) = failure(&try_pool(&lab, ns, "x", p, labels, None));
        assert_eq!(code, 100);
        assert!(msg.contains(want), "{msg}");
    }
}

#[test]
fn d00011_to_d00016_names_replace_affinities() {
    let lab = affinity_lab();
    // D00011/D00013: nodeName lists node-1 and wins over a nodeAffinity that would not match.
    assert_eq!(
        ip(&try_pool(
            &lab,
            "default",
            "a",
            "named-node",
            json!({}),
            None
        )),
        "10.11.0.10/16"
    );
    // D00012
    let (_, msg) = failure(&try_pool(
        &lab,
        "default",
        "b",
        "other-named-node",
        json!({}),
        None,
    ));
    assert!(
        msg.contains("other-named-node: spec.nodeName does not list node node-1"),
        "{msg}"
    );
    // D00014/D00016: namespaceName lists red-ns and wins over a namespaceAffinity for blue.
    assert_eq!(
        ip(&try_pool(&lab, "red-ns", "c", "named-ns", json!({}), None)),
        "10.13.0.10/16"
    );
    // D00015
    let (_, msg) = failure(&try_pool(
        &lab,
        "red-ns",
        "d",
        "other-named-ns",
        json!({}),
        None,
    ));
    assert!(
        msg.contains("other-named-ns: spec.namespaceName does not list namespace red-ns"),
        "{msg}"
    );
}

#[test]
fn d00009_d00010_multus_name_match_and_mismatch() {
    let lab = affinity_lab();
    let (_, msg) = failure(&try_pool(
        &lab,
        "default",
        "m1",
        "multus",
        json!({}),
        Some("kube-system/ipvlan-conf"),
    ));
    assert!(msg.contains("multus: spec.multusName does not list network kube-system/ipvlan-conf of interface eth0"), "{msg}");
    let (_, msg) = failure(&try_pool(&lab, "default", "m2", "multus", json!({}), None));
    assert!(
        msg.contains("interface eth0 has no Multus network"),
        "{msg}"
    );
    assert_eq!(
        ip(&try_pool(
            &lab,
            "default",
            "m3",
            "multus",
            json!({}),
            Some("kube-system/macvlan-conf")
        )),
        "10.15.0.10/16"
    );
}

/// As upstream: a pod that names no default network is on Multus's cluster network
/// (`MULTUS_CLUSTER_NETWORK`), and a bare default or cluster network name is in the agent's
/// namespace, so pools' `multusName` keep matching after a move from upstream.
#[test]
fn multus_name_matches_the_cluster_network_and_bare_names_in_the_agents_namespace() {
    let sb = Sandbox::new();
    sb.apply(
        &[
            pool(
                "multus",
                "10.15.0.0/16",
                "10.15.0.10-10.15.0.19",
                "  multusName: [kube-system/macvlan-conf]\n",
            ),
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: apps}\n".into(),
        ]
        .concat(),
    );
    let agent = sb.agent_with(
        "node-1",
        "",
        &[
            "--multus-cluster-network",
            "macvlan-conf",
            "--multus-namespace",
            "kube-system",
        ],
    );
    let add = |name: &str, annotations: Value| {
        let mut annotations = annotations;
        annotations["ipam.spidernet.io/ippool"] = json!(r#"{"ipv4":["multus"]}"#);
        sb.apply(&pod("apps", name, annotations, json!({}), None));
        let conf = json!({"cniVersion": "1.0.0", "name": "macvlan-conf",
            "ipam": {"type": "spiderpool", "ipam_unix_socket_path": agent.socket}});
        let mut c = CniCall::new("ADD", &format!("c-{name}"), name, &conf);
        c.args = format!("K8S_POD_NAMESPACE=apps;K8S_POD_NAME={name};K8S_POD_UID=uid-{name}");
        c.run()
    };
    // No default network: the cluster network, in the agent's namespace.
    let out = add("on-cluster-network", json!({}));
    assert!(out.success, "{}\n{}", out.stdout, agent.log());
    // A bare default network name: in the agent's namespace, not the pod's.
    let out = add(
        "bare-default",
        json!({"v1.multus-cni.io/default-network": "macvlan-conf"}),
    );
    assert!(out.success, "{}\n{}", out.stdout, agent.log());
    // Another network still does not match.
    let (_, msg) = failure(&add(
        "other",
        json!({"v1.multus-cni.io/default-network": "ipvlan-conf"}),
    ));
    assert!(
        msg.contains("does not list network kube-system/ipvlan-conf"),
        "{msg}"
    );
}

#[test]
fn l00009_one_pool_serves_two_namespaces() {
    // (The namespaces exist, as a pod's always does in Kubernetes.)
    let lab = Lab::new(&format!(
        "{}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-a}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-b}}\n",
        zones()
    ));
    let a = lab.add_in(
        "ns-a",
        "p",
        "c1",
        "eth0",
        json!({"default_ipv4_ippool": ["v4-a"]}),
    );
    let b = lab.add_in(
        "ns-b",
        "p",
        "c2",
        "eth0",
        json!({"default_ipv4_ippool": ["v4-a"]}),
    );
    assert_eq!(
        (ip(&a), ip(&b)),
        ("10.6.0.10/16".to_string(), "10.6.0.11/16".to_string())
    );
    // G00002: a same-name pod in another namespace is untouched by this one's DEL.
    assert!(lab.del_in("ns-a", "p", "c1", "eth0").success);
    assert_eq!(lab.sb.allocated("v4-a"), 1);
    assert!(lab.sb.ctl(&["get", "endpoint", "ns-b/p"], "").success);
}

#[test]
fn l00007_daemonset_across_zones_follows_each_node() {
    let sb = Sandbox::new();
    sb.apply(&[
        pool("zone-6", "10.6.0.0/16", "10.6.168.60-10.6.168.69", "  nodeAffinity: {matchExpressions: [{key: node-subnet, operator: In, values: [subnet-6]}]}\n"),
        pool("zone-7", "10.7.0.0/16", "10.7.168.60-10.7.168.69", "  nodeAffinity: {matchExpressions: [{key: node-subnet, operator: In, values: [subnet-7]}]}\n"),
    ]
    .concat());
    let a6 = sb.agent("n6", "node-subnet=subnet-6");
    let a7 = sb.agent("n7", "node-subnet=subnet-7");
    for (agent, pod, want) in [
        (&a6, "ds-a", "10.6.168.60/16"),
        (&a7, "ds-b", "10.7.168.60/16"),
    ] {
        let conf = json!({"cniVersion": "0.3.1", "name": "n", "ipam": {"type": "spiderpool", "ipam_unix_socket_path": agent.socket, "default_ipv4_ippool": ["zone-6", "zone-7"]}});
        assert_eq!(ip(&CniCall::new("ADD", pod, pod, &conf).run()), want);
    }
}

fn statefulset(replicas: i64) -> String {
    statefulset_from(0, replicas)
}

/// The StatefulSet `web` whose ordinals start at `start` (`spec.ordinals.start`).
fn statefulset_from(start: i64, replicas: i64) -> String {
    format!("---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: web, namespace: default}}\nspec:\n  replicas: {replicas}\n  ordinals: {{start: {start}}}\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: c, image: registry.invalid/c}}]}}\n")
}

#[test]
fn l00008_a00009_statefulset_pods_keep_their_addresses_until_their_pool_changes() {
    let lab = Lab::new(&[zones(), statefulset(2)].concat());
    let ann = |pool: &str| json!({"ipam.spidernet.io/ippool": format!(r#"{{"ipv4":["{pool}"]}}"#)});
    lab.sb.apply(&pod(
        "default",
        "web-0",
        ann("v4-a"),
        json!({}),
        Some(("StatefulSet", "web")),
    ));
    lab.sb
        .apply(&pod("default", "other", ann("v4-a"), json!({}), None));
    assert_eq!(ip(&lab.add("web-0", "sandbox-1", "eth0")), "10.6.0.10/16");
    // The pod is deleted (DEL) and re-created with a new UID: the address is kept meanwhile...
    assert!(lab.del("web-0", "sandbox-1", "eth0").success);
    assert_eq!(lab.sb.allocated("v4-a"), 1);
    assert_eq!(
        ip(&lab.add("other", "o", "eth0")),
        "10.6.0.11/16",
        "nobody else gets it"
    );
    // ...and handed back to the new incarnation; the endpoint follows the new UID.
    assert_eq!(ip(&lab.add("web-0", "sandbox-2", "eth0")), "10.6.0.10/16");
    let ep = lab.sb.get_json("endpoint", "default/web-0");
    assert_eq!(ep["status"]["current"]["uid"], "uid-sandbox-2");
    assert_eq!(ep["status"]["ownerControllerType"], "StatefulSet");
    // A stale DEL of the first sandbox frees nothing.
    assert!(lab.del("web-0", "sandbox-1", "eth0").success);
    assert_eq!(lab.sb.allocated("v4-a"), 2);
    // A00009: the annotation now names another pool: the next incarnation moves there.
    lab.sb.apply(&pod(
        "default",
        "web-0",
        ann("v4-b"),
        json!({}),
        Some(("StatefulSet", "web")),
    ));
    assert!(lab.del("web-0", "sandbox-2", "eth0").success);
    assert_eq!(ip(&lab.add("web-0", "sandbox-3", "eth0")), "10.7.0.10/16");
    assert_eq!(
        lab.sb.allocated("v4-a"),
        1,
        "the old pool's address went back"
    );
}

#[test]
fn statefulset_scale_down_releases_the_ordinals_that_left() {
    let lab = Lab::new(&[zones(), statefulset(2)].concat());
    for (i, ordinal) in ["web-0", "web-1"].iter().enumerate() {
        lab.sb.apply(&pod(
            "default",
            ordinal,
            json!({"ipam.spidernet.io/ippool": r#"{"ipv4":["v4-a"]}"#}),
            json!({}),
            Some(("StatefulSet", "web")),
        ));
        assert_eq!(
            ip(&lab.add(ordinal, &format!("s{i}"), "eth0")),
            format!("10.6.0.1{i}/16")
        );
    }
    lab.sb.apply(&statefulset(1));
    // web-1 is removed by the scale-down: its DEL releases; web-0 restarting keeps its address.
    assert!(lab.del("web-1", "s1", "eth0").success);
    assert!(lab.del("web-0", "s0", "eth0").success);
    assert_eq!(lab.sb.allocated("v4-a"), 1);
    assert!(lab
        .sb
        .ctl(&["get", "endpoint", "default/web-1"], "")
        .stderr
        .contains("not found"));
}

#[test]
fn statefulset_members_are_counted_from_ordinals_start() {
    // Members web-5 and web-6 (ordinals from 5, two replicas): both keep their addresses when
    // their sandboxes go, though their ordinals are not below `replicas`.
    let lab = Lab::new(&[zones(), statefulset_from(5, 2)].concat());
    let ann = json!({"ipam.spidernet.io/ippool": r#"{"ipv4":["v4-a"]}"#});
    for (i, member) in ["web-5", "web-6"].iter().enumerate() {
        lab.sb.apply(&pod(
            "default",
            member,
            ann.clone(),
            json!({}),
            Some(("StatefulSet", "web")),
        ));
        assert_eq!(
            ip(&lab.add(member, &format!("s{i}"), "eth0")),
            format!("10.6.0.1{i}/16")
        );
    }
    lab.sb
        .apply(&pod("default", "other", ann.clone(), json!({}), None));
    assert!(lab.del("web-6", "s1", "eth0").success);
    assert_eq!(lab.sb.allocated("v4-a"), 2, "web-6 keeps 10.6.0.11");
    assert_eq!(ip(&lab.add("other", "o", "eth0")), "10.6.0.12/16");
    assert_eq!(ip(&lab.add("web-6", "s2", "eth0")), "10.6.0.11/16");
    // Scaled to one: web-6 is no member any more, its DEL releases; web-5 stays one.
    lab.sb.apply(&statefulset_from(5, 1));
    assert!(lab.del("web-6", "s2", "eth0").success);
    assert!(lab.del("web-5", "s0", "eth0").success);
    assert_eq!(lab.sb.allocated("v4-a"), 2, "web-5 and other hold theirs");
    assert!(lab
        .sb
        .ctl(&["get", "endpoint", "default/web-6"], "")
        .stderr
        .contains("not found"));
    assert_eq!(ip(&lab.add("web-5", "s3", "eth0")), "10.6.0.10/16");
}

#[test]
fn a00017_a00018_statefulset_extra_nics_keep_addresses_and_move_one_at_a_time() {
    let lab = Lab::new(
        &[
            zones(),
            pool("v4-c", "10.8.0.0/16", "10.8.0.10-10.8.0.19", ""),
            statefulset(1),
        ]
        .concat(),
    );
    let ann = |net1: &str| json!({"ipam.spidernet.io/ippools": format!(r#"[{{"ipv4":["v4-a"]}},{{"ipv4":["{net1}"]}}]"#)});
    lab.sb.apply(&pod(
        "default",
        "web-0",
        ann("v4-b"),
        json!({}),
        Some(("StatefulSet", "web")),
    ));
    assert_eq!(ip(&lab.add("web-0", "s1", "eth0")), "10.6.0.10/16");
    assert_eq!(ip(&lab.add("web-0", "s1", "net1")), "10.7.0.10/16");
    // Restart: both NICs keep their addresses.
    assert!(lab.del("web-0", "s1", "eth0").success && lab.del("web-0", "s1", "net1").success);
    assert_eq!(ip(&lab.add("web-0", "s2", "eth0")), "10.6.0.10/16");
    assert_eq!(ip(&lab.add("web-0", "s2", "net1")), "10.7.0.10/16");
    // Changing net1's pool moves only net1.
    lab.sb.apply(&pod(
        "default",
        "web-0",
        ann("v4-c"),
        json!({}),
        Some(("StatefulSet", "web")),
    ));
    assert!(lab.del("web-0", "s2", "eth0").success && lab.del("web-0", "s2", "net1").success);
    assert_eq!(ip(&lab.add("web-0", "s3", "eth0")), "10.6.0.10/16");
    assert_eq!(ip(&lab.add("web-0", "s3", "net1")), "10.8.0.10/16");
    assert_eq!(lab.sb.allocated("v4-b"), 0);
}

#[test]
fn d00001_d00003_d00008_pool_rules_on_apply() {
    let sb = Sandbox::new();
    sb.apply(&pool("p1", "10.6.0.0/16", "10.6.0.10-10.6.0.19", ""));
    let refused = |yaml: &str, needle: &str| {
        let out = sb.ctl(&["apply", "-f", "-"], yaml);
        assert!(!out.success, "accepted: {yaml}");
        assert!(
            out.stderr.contains(needle),
            "{needle:?} not in {}",
            out.stderr
        );
    };
    // D00001: duplicate IPs.
    refused(
        &pool("p2", "10.6.0.0/16", "10.6.0.15-10.6.0.25", ""),
        "spec.ips \"[10.6.0.15-10.6.0.19]\" overlap with IPPool p1 in IP ranges [10.6.0.15-10.6.0.19]",
    );
    // D00003: wrong gateway and routes.
    refused(
        &pool("p3", "10.6.0.0/16", "10.6.0.30", "  gateway: 10.7.0.1\n"),
        "spec.gateway 10.7.0.1 is outside subnet 10.6.0.0/16",
    );
    refused(
        &pool(
            "p3",
            "10.6.0.0/16",
            "10.6.0.30",
            "  routes: [{dst: 10.9.0.0/16, gw: 10.8.0.1}]\n",
        ),
        "spec.routes[].gw 10.8.0.1 is outside subnet",
    );
    refused(
        &pool(
            "p3",
            "10.6.0.0/16",
            "10.6.0.30",
            "  routes: [{dst: 10.9.0.0/33, gw: 10.6.0.1}]\n",
        ),
        "spec.routes[].dst \"10.9.0.0/33\" is not a CIDR",
    );
    refused(
        &pool(
            "p3",
            "10.6.0.0/16",
            "10.6.0.30",
            "  routes: [{dst: 0.0.0.0/0, gw: 10.6.0.1}]\n",
        ),
        "the default route comes from spec.gateway",
    );
    refused(
        &pool(
            "p3",
            "10.6.0.0/16",
            "10.6.0.30",
            "  routes: [{dst: 10.9.0.0/16, gw: 10.6.0.1}, {dst: 10.9.0.0/16, gw: 10.6.0.2}]\n",
        ),
        "spec.routes has 10.9.0.0/16 twice",
    );
    // D00008: a pool of a subnet's CIDR without gateway or routes takes them from the subnet.
    sb.apply("---\napiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderSubnet\nmetadata: {name: s7}\nspec:\n  subnet: 10.7.0.0/16\n  ips: [10.7.0.10-10.7.0.99]\n  gateway: 10.7.0.1\n  routes: [{dst: 10.99.0.0/16, gw: 10.7.0.2}]\n");
    sb.apply(&pool("inherits", "10.7.0.0/16", "10.7.0.10-10.7.0.19", ""));
    let p = sb.get_json("ippool", "inherits");
    assert_eq!(p["spec"]["gateway"], "10.7.0.1");
    assert_eq!(
        p["spec"]["routes"],
        json!([{"dst": "10.99.0.0/16", "gw": "10.7.0.2"}])
    );
    sb.apply(&pool(
        "own",
        "10.7.0.0/16",
        "10.7.0.20-10.7.0.29",
        "  gateway: 10.7.0.254\n",
    ));
    assert_eq!(
        sb.get_json("ippool", "own")["spec"]["gateway"],
        "10.7.0.254"
    );
}

#[test]
fn d00002_d00005_pool_changes_affect_only_new_pods_and_disable_still_releases() {
    let lab = Lab::new(&pool("p", "10.6.0.0/16", "10.6.0.10-10.6.0.19", ""));
    let first = lab.add_in(
        "default",
        "a",
        "c1",
        "eth0",
        json!({"default_ipv4_ippool": ["p"]}),
    );
    assert_eq!(first.json()["routes"], json!([]));
    lab.sb.apply(&pool(
        "p",
        "10.6.0.0/16",
        "10.6.0.10-10.6.0.19",
        "  gateway: 10.6.0.1\n",
    ));
    let second = lab.add_in(
        "default",
        "b",
        "c2",
        "eth0",
        json!({"default_ipv4_ippool": ["p"]}),
    );
    assert_eq!(
        second.json()["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.6.0.1"}])
    );
    // The first pod's record still answers as it was given.
    let again = lab.add_in(
        "default",
        "a",
        "c1",
        "eth0",
        json!({"default_ipv4_ippool": ["p"]}),
    );
    assert_eq!(again.json(), first.json());
    // D00005
    lab.sb.apply(&pool(
        "p",
        "10.6.0.0/16",
        "10.6.0.10-10.6.0.19",
        "  gateway: 10.6.0.1\n  disable: true\n",
    ));
    let (code, msg) = failure(&lab.add_in(
        "default",
        "c",
        "c3",
        "eth0",
        json!({"default_ipv4_ippool": ["p"]}),
    ));
    assert_eq!(code, 100);
    assert!(msg.contains("p: pool is disabled"), "{msg}");
    assert!(lab.del("a", "c1", "eth0").success);
    assert_eq!(lab.sb.allocated("p"), 1);
}

#[test]
fn d00017_large_ipv6_pool_counts_exactly() {
    let sb = Sandbox::new();
    sb.apply(&pool(
        "big",
        "fd00:6::/64",
        "fd00:6::1-fd00:6::ffff:ffff:ffff",
        "  excludeIPs: [fd00:6::1-fd00:6::ff]\n",
    ));
    let p = sb.get_json("ippool", "big");
    assert_eq!(p["status"]["totalIPCount"], json!((1u64 << 48) - 1 - 255));
    let table = sb.ctl(&["get", "ippool"], "").stdout;
    assert!(
        table.contains("big    6         fd00:6::/64   0                    281474976710400"),
        "{table}"
    );
}

#[test]
fn e00001_to_e00010_v4_v6_dual_and_single_stack_pods() {
    let lab = Lab::new(&zones());
    let cases = [
        (r#"{"ipv4":["v4-a"]}"#, vec!["10.6.0.10/16"]),
        (r#"{"ipv6":["v6-a"]}"#, vec!["fd00:6::10/64"]),
        (
            r#"{"ipv4":["v4-a"],"ipv6":["v6-a"]}"#,
            vec!["10.6.0.11/16", "fd00:6::11/64"],
        ),
    ];
    for (i, (ann, want)) in cases.iter().enumerate() {
        let name = format!("pod-{i}");
        lab.sb.apply(&pod(
            "default",
            &name,
            json!({"ipam.spidernet.io/ippool": ann}),
            json!({}),
            Some(("Deployment", "app")),
        ));
        assert_eq!(&ips(&lab.add(&name, &format!("c{i}"), "eth0")), want);
    }
    let ep = lab.sb.get_json("endpoint", "default/pod-2");
    assert_eq!(ep["status"]["ownerControllerType"], "Deployment");
    assert_eq!(ep["status"]["current"]["ips"][0]["ipv6Pool"], "v6-a");
    // Records are unique per pod UID.
    let held: Value = serde_json::from_str(
        lab.sb.get_json("ippool", "v4-a")["status"]["allocatedIPs"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(held["10.6.0.10"]["podUid"], "uid-c0");
    assert_eq!(held["10.6.0.11"]["podUid"], "uid-c2");
}

#[test]
fn e00008_s00001_s00002_s00004_scaling_past_the_pool_reserved_and_excluded() {
    let lab = Lab::new(&[
        pool("small", "10.6.0.0/16", "10.6.0.10-10.6.0.14", "  excludeIPs: [10.6.0.11]\n"),
        "---\napiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderReservedIP\nmetadata: {name: keep}\nspec: {ips: [10.6.0.13]}\n".into(),
    ]
    .concat());
    let cfg = json!({"default_ipv4_ippool": ["small"]});
    let got: Vec<String> = (0..3)
        .map(|i| {
            ip(&lab.add_in(
                "default",
                &format!("r{i}"),
                &format!("c{i}"),
                "eth0",
                cfg.clone(),
            ))
        })
        .collect();
    assert_eq!(
        got,
        ["10.6.0.10/16", "10.6.0.12/16", "10.6.0.14/16"],
        "excluded .11 and reserved .13 skipped"
    );
    let (code, msg) = failure(&lab.add_in("default", "r3", "c3", "eth0", cfg.clone()));
    assert_eq!(code, 100);
    assert!(
        msg.contains("small: exhausted (4 of 4 addresses in use)"),
        "{msg}"
    );
    // S00002: taking .11 out of excludeIPs lets the next pod start.
    lab.sb
        .apply(&pool("small", "10.6.0.0/16", "10.6.0.10-10.6.0.14", ""));
    assert_eq!(
        ip(&lab.add_in("default", "r3", "c3", "eth0", cfg.clone())),
        "10.6.0.11/16"
    );
}

#[test]
fn s00003_excluding_an_address_in_use_is_refused_naming_the_pod() {
    let lab = Lab::new(&pool("p", "10.6.0.0/16", "10.6.0.10-10.6.0.14", ""));
    assert!(
        lab.add_in(
            "default",
            "busy",
            "c",
            "eth0",
            json!({"default_ipv4_ippool": ["p"]})
        )
        .success
    );
    let out = lab.sb.ctl(
        &["apply", "-f", "-"],
        &pool(
            "p",
            "10.6.0.0/16",
            "10.6.0.10-10.6.0.14",
            "  excludeIPs: [10.6.0.10]\n",
        ),
    );
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("remove an IP address 10.6.0.10 that is being used by Pod default/busy"),
        "{}",
        out.stderr
    );
}

#[test]
fn cni_gc_releases_what_the_runtime_no_longer_uses() {
    let lab = Lab::new(&[zones(), statefulset(1)].concat());
    lab.sb.apply(&pod(
        "default",
        "web-0",
        json!({}),
        json!({}),
        Some(("StatefulSet", "web")),
    ));
    let cfg = json!({"default_ipv4_ippool": ["v4-a"]});
    for (name, ctr) in [("live", "c-live"), ("gone", "c-gone"), ("web-0", "c-web")] {
        assert!(
            lab.add_in("default", name, ctr, "eth0", cfg.clone())
                .success
        );
    }
    assert!(
        lab.add_in("default", "live", "c-live", "net1", cfg.clone())
            .success
    );
    assert_eq!(lab.sb.allocated("v4-a"), 4);
    // GC before 1.1.0 is refused; a GC without the list releases nothing.
    assert_eq!(failure(&lab.raw("GC", "1.0.0", json!({}))).0, 1);
    let (code, msg) = failure(&lab.raw("GC", "1.1.0", json!({})));
    assert_eq!(code, 7);
    assert!(msg.contains("cni.dev/valid-attachments"), "{msg}");
    assert_eq!(lab.sb.allocated("v4-a"), 4);
    // The 1.1.0 text's key works too. live/eth0 stays, live/net1 and gone go, the StatefulSet
    // member keeps its address for its next sandbox.
    let out = lab.raw(
        "GC",
        "1.1.0",
        json!({"cni.dev/attachments": [{"containerID": "c-live", "ifname": "eth0"}]}),
    );
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stdout, "");
    assert_eq!(lab.sb.allocated("v4-a"), 2);
    assert!(lab
        .sb
        .ctl(&["get", "endpoint", "default/gone"], "")
        .stderr
        .contains("not found"));
    let live = lab.sb.get_json("endpoint", "default/live");
    assert_eq!(
        live["status"]["current"]["ips"].as_array().unwrap().len(),
        1
    );
    // Another network's GC does not touch this network's reservations.
    let mut other = lab.conf("1.1.0", json!({}));
    other["name"] = json!("other-net");
    other["cni.dev/valid-attachments"] = json!([]);
    let mut c = CniCall::new("GC", "x", "x", &other);
    c.container_id = None;
    assert!(c.run().success);
    assert_eq!(lab.sb.allocated("v4-a"), 2);
    // An empty list means every reservation of the network is stale.
    assert!(
        lab.raw("GC", "1.1.0", json!({"cni.dev/valid-attachments": []}))
            .success
    );
    assert_eq!(
        lab.sb.allocated("v4-a"),
        1,
        "only the StatefulSet member's address is left"
    );
}

#[test]
fn cni_status_reports_whether_add_can_be_served() {
    let mut lab = Lab::new(&pool("tiny", "10.6.0.0/16", "10.6.0.10", ""));
    let status = |lab: &Lab, ipam: Value| {
        let mut c = CniCall::new("STATUS", "x", "x", &lab.conf("1.1.0", ipam));
        c.container_id = None;
        c.run()
    };
    let ok = status(&lab, json!({"default_ipv4_ippool": ["tiny"]}));
    assert!(ok.success, "{}", ok.stdout);
    assert_eq!(ok.stdout, "");
    assert!(
        lab.add_in(
            "default",
            "p",
            "c",
            "eth0",
            json!({"default_ipv4_ippool": ["tiny"]})
        )
        .success
    );
    let (code, msg) = failure(&status(&lab, json!({"default_ipv4_ippool": ["tiny"]})));
    assert_eq!(code, 50);
    assert!(msg.contains("tiny: exhausted"), "{msg}");
    let (code, msg) = failure(&status(&lab, json!({})));
    assert_eq!(code, 50, "no pool at all has a free address: {msg}");
    lab.agent.kill();
    let (code, msg) = failure(&status(&lab, json!({})));
    assert_eq!(code, 50);
    assert!(msg.contains("not reachable"), "{msg}");
}

#[test]
fn check_fails_when_the_reservation_is_gone() {
    let lab = Lab::new(&zones());
    let out = lab.add_in(
        "default",
        "p",
        "c",
        "eth0",
        json!({"default_ipv4_ippool": ["v4-a"]}),
    );
    let mut conf = lab.conf("1.1.0", json!({}));
    conf["prevResult"] = out.json();
    let mut check = CniCall::new("CHECK", "c", "p", &conf);
    check.args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p".into();
    assert!(check.run().success);
    assert!(
        lab.raw("GC", "1.1.0", json!({"cni.dev/valid-attachments": []}))
            .success
    );
    let (code, msg) = failure(&check.run());
    assert_eq!(code, 3);
    assert!(
        msg.contains("container c holds no address for interface eth0"),
        "{msg}"
    );
}

/// SpiderSubnet `subnet-6` (10 addresses, .102 excluded) for the auto-pool tests.
const AUTO_SUBNET: &str = "---\napiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderSubnet\nmetadata: {name: subnet-6}\nspec:\n  subnet: 10.6.0.0/16\n  ips: [10.6.168.101-10.6.168.110]\n  excludeIPs: [10.6.168.102]\n  gateway: 10.6.0.1\n";

/// The subnet annotations of the `web` Deployment's pod template (and so of its pods).
fn auto_annotations() -> Value {
    json!({"ipam.spidernet.io/subnet": r#"{"ipv4": ["subnet-6"]}"#,
        "ipam.spidernet.io/ippool-ip-number": "+1"})
}

/// Deployment `web` with `replicas`, its ReplicaSet and one pod of it per name in `pods`, as a
/// controller-manager would have made them (owner references by UID).
fn web(replicas: u64, pods: &[&str]) -> String {
    let template = json!({"metadata": {"labels": {"app": "web"}, "annotations": auto_annotations()},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/c"}]}});
    let deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default", "uid": "d0d0d0d0-0000-0000-0000-abcde0000000"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}}, "template": template.clone()}});
    let rs = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "web-5f8d", "namespace": "default", "uid": "e1e1e1e1-0000-0000-0000-000000000001",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
                "uid": "d0d0d0d0-0000-0000-0000-abcde0000000", "controller": true}]},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}}, "template": template}});
    let mut out = format!("---\n{deploy}\n---\n{rs}\n");
    for p in pods {
        let doc = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p, "namespace": "default", "annotations": auto_annotations(),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5f8d",
                    "uid": "e1e1e1e1-0000-0000-0000-000000000001", "controller": true}]},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "registry.invalid/c"}]}});
        out.push_str(&format!("---\n{doc}\n"));
    }
    out
}

/// `ALLOCATED-IP-COUNT` of `get subnet subnet-6 -o json`: the addresses its pools have.
fn subnet_given(lab: &Lab) -> u64 {
    lab.sb.get_json("subnet", "subnet-6")["status"]["allocatedIPCount"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn i00003_i00004_i00020_auto_pools_outside_a_cluster_follow_their_deployment() {
    if Sandbox::on_kubernetes() {
        eprintln!("SKIPPED: in a cluster the controller reconciles auto pools (tests/autopool.rs)");
        return;
    }
    let lab = Lab::new(AUTO_SUBNET);
    assert_eq!(subnet_given(&lab), 0);
    let pool = "auto4-web-eth0-abcde";
    // Applying the Deployment carves its pool: replicas + 1, the subnet's lowest free
    // addresses, never the excluded one (I00004).
    let out = lab.sb.ctl(
        &["apply", "-f", "-"],
        &web(2, &["web-5f8d-a", "web-5f8d-b"]),
    );
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(&format!(
            "Deployment default/web: created SpiderIPPool {pool} with 3 IPs"
        )),
        "{}",
        out.stdout
    );
    let p = lab.sb.get_json("ippool", pool);
    assert_eq!(
        p["spec"]["ips"],
        json!(["10.6.168.101", "10.6.168.103-10.6.168.104"])
    );
    assert_eq!(
        p["spec"]["podAffinity"]["matchLabels"]["ipam.spidernet.io/app-name"],
        "web"
    );
    assert_eq!(
        p["metadata"]["labels"]["ipam.spidernet.io/owner-spider-subnet"],
        "subnet-6"
    );
    assert_eq!(subnet_given(&lab), 3);
    let controlled: Value = serde_json::from_str(
        lab.sb.get_json("subnet", "subnet-6")["status"]["controlledIPPools"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        controlled[pool]["application"],
        "apps_v1_Deployment_default_web"
    );

    // Its pods get addresses from it, through the real plugin.
    assert_eq!(ip(&lab.add("web-5f8d-a", "ca", "eth0")), "10.6.168.101/16");
    assert_eq!(ip(&lab.add("web-5f8d-b", "cb", "eth0")), "10.6.168.103/16");

    // I00020: its spare address is the application's: another pod naming the pool is refused,
    // also when it wears the application's affinity labels itself.
    let app_labels = json!({"ipam.spidernet.io/app-api-group": "apps", "ipam.spidernet.io/app-api-version": "v1",
        "ipam.spidernet.io/app-kind": "Deployment", "ipam.spidernet.io/app-namespace": "default",
        "ipam.spidernet.io/app-name": "web"});
    lab.sb.apply(&pod(
        "default",
        "intruder",
        json!({"ipam.spidernet.io/ippool": json!({"ipv4": [pool]}).to_string()}),
        app_labels,
        Some(("Deployment", "other")),
    ));
    let (code, msg) = failure(&lab.add("intruder", "ci", "eth0"));
    assert_eq!(code, 100, "{msg}");
    assert!(msg.contains("spec.podAffinity does not match"), "{msg}");

    // Scaled up: the pool grows by the lowest free addresses; scaled down: it gives back the
    // highest addresses no pod holds.
    let out = lab.sb.ctl(&["apply", "-f", "-"], &web(4, &[]));
    assert!(
        out.stdout
            .contains(&format!("scaled SpiderIPPool {pool} from 3 to 5 IPs")),
        "{}{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(subnet_given(&lab), 5);
    let out = lab.sb.ctl(&["apply", "-f", "-"], &web(0, &[]));
    assert!(
        out.stdout
            .contains(&format!("scaled SpiderIPPool {pool} from 5 to 2 IPs")),
        "{}{}",
        out.stdout,
        out.stderr
    );
    // Never below what is in use: both held addresses stay.
    assert_eq!(
        lab.sb.get_json("ippool", pool)["spec"]["ips"],
        json!(["10.6.168.101", "10.6.168.103"])
    );

    // Deleted: the pool waits for its pods' addresses, then goes with `reconcile`.
    let out = lab.sb.ctl(&["delete", "deployment", "web"], "");
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(&format!(
            "SpiderIPPool {pool} is deleted once its 2 IPs in use are released"
        )),
        "{}",
        out.stdout
    );
    assert!(lab.del("web-5f8d-a", "ca", "eth0").success);
    assert!(lab.del("web-5f8d-b", "cb", "eth0").success);
    let out = lab.sb.ctl(&["reconcile"], "");
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(&format!("deleted SpiderIPPool {pool}")),
        "{}",
        out.stdout
    );
    // The subnet is as it started.
    assert_eq!(subnet_given(&lab), 0);
    assert!(!lab.sb.ctl(&["get", "ippool", pool], "").success);
}

#[test]
fn i00023_orphans_and_third_party_controllers_get_upstreams_answer() {
    let lab = Lab::new(AUTO_SUBNET);
    let subnet = json!({"ipam.spidernet.io/subnet": r#"{"ipv4": ["subnet-6"]}"#});
    let kruise = |n: &str, annotations: Value| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": n, "namespace": "default", "annotations": annotations,
                "ownerReferences": [{"apiVersion": "apps.kruise.io/v1alpha1", "kind": "CloneSet",
                    "name": "clone", "uid": "c1c1c1c1-0000-0000-0000-000000000001", "controller": true}]},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "registry.invalid/c"}]}})
        .to_string()
    };
    lab.sb.apply(&kruise("k1", subnet.clone()));
    let (code, msg) = failure(&lab.add("k1", "c1", "eth0"));
    assert_eq!(code, 7, "{msg}");
    assert!(
        msg.contains("pod default/k1: CloneSet/default/clone only supports fixed auto-created IPPool IP Number"),
        "{msg}"
    );
    // A fixed size is carved by the controller in a cluster: tests/third_party.rs.
    lab.sb
        .apply(&pod("default", "alone", subnet, json!({}), None));
    let (code, msg) = failure(&lab.add("alone", "c3", "eth0"));
    assert_eq!(code, 7, "{msg}");
    assert!(
        msg.contains("SpiderSubnet feature doesn't support no-controller pod"),
        "{msg}"
    );
}

#[test]
fn i00024_auto_pools_turned_off_refuse_the_pod() {
    let sb = Sandbox::new();
    sb.apply(AUTO_SUBNET);
    if Sandbox::on_kubernetes() {
        sb.apply("apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n");
    }
    let agent = Agent::start_with(
        &sb.datastore(),
        &sb.socket("node-1"),
        "node-1",
        "",
        &["--enable-auto-pool=false"],
        None,
    );
    let lab = Lab { sb, agent };
    lab.sb.apply(&web(1, &["web-5f8d-a"]));
    let (code, msg) = failure(&lab.add("web-5f8d-a", "ca", "eth0"));
    assert_eq!(code, 7, "{msg}");
    assert!(
        msg.contains("it's invalid to use 'ipam.spidernet.io/subnets' or 'ipam.spidernet.io/subnet' annotation when Auto-Pool feature is disabled"),
        "{msg}"
    );
}

#[test]
fn a_nodes_address_and_another_pools_gateway_are_never_handed_out() {
    // Beyond upstream: a Node's address (status.addresses) and a gateway of another pool are
    // skipped as if reserved, and counted as in use.
    let lab = Lab::new(&[
        pool("gw", "10.6.0.0/16", "10.6.0.10", "  gateway: 10.6.0.1\n"),
        "---\n".into(),
        pool("b", "10.6.0.0/16", "10.6.0.1-10.6.0.3", "  gateway: 10.6.0.254\n"),
        "---\napiVersion: v1\nkind: Node\nmetadata: {name: other-node}\nstatus:\n  addresses:\n  - {type: InternalIP, address: 10.6.0.2}\n  - {type: Hostname, address: other-node}\n".into(),
    ]
    .concat());
    let cfg = json!({"default_ipv4_ippool": ["b"]});
    assert_eq!(
        ip(&lab.add_in("default", "n0", "c0", "eth0", cfg.clone())),
        "10.6.0.3/16",
        "pool gw's gateway .1 and other-node's .2 skipped"
    );
    let (code, msg) = failure(&lab.add_in("default", "n1", "c1", "eth0", cfg.clone()));
    assert_eq!(code, 100);
    assert!(
        msg.contains("b: exhausted (3 of 3 addresses in use)"),
        "{msg}"
    );
}
