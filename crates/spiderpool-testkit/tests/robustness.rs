//! One bad object never stops the controller's leader (issue 27), on a real control plane: a
//! pool whose status does not parse, a pool with an entry naming no pod and an IPv6 /64 pool
//! (whose count overflows the CRD's int64) sit beside a pool with 2,000 dead holders and a
//! deleted empty pool. The leak is reclaimed in a handful of status writes, the deleted pool is
//! finalized, the /64 pool's counts are written (saturated), and the bad pools are reported
//! (an Event each, the gauge `spiderpool_controller_invalid_objects`) and left as they are.

use std::time::Instant;

use serde_json::{json, Value};
use spiderpool_testkit::{http_get, json_of, kube_bin, until, ControlPlane, Controller};

fn pool(name: &str, subnet: &str, ips: &str) -> Value {
    json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
        "metadata": {"name": name},
        "spec": {"subnet": subnet, "ips": [ips]}})
}

/// Writes `allocatedIPs` (a JSON string, as upstream stores it) into a pool's status.
fn write_allocated(cp: &ControlPlane, dir: &std::path::Path, pool: &str, allocated: &str) {
    let patch = dir.join(format!("{pool}-status.json"));
    std::fs::write(
        &patch,
        json!({"status": {"allocatedIPs": allocated}}).to_string(),
    )
    .unwrap();
    cp.kubectl_ok(
        &[
            "patch",
            "spiderippool",
            pool,
            "--subresource=status",
            "--type=merge",
            "--patch-file",
            patch.to_str().unwrap(),
        ],
        "",
    );
}

fn allocated(cp: &ControlPlane, pool: &str) -> String {
    json_of(cp, &["get", "spiderippool", pool])["status"]["allocatedIPs"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_corrupt_pool_and_a_slash_64_pool_stop_neither_the_reclaim_nor_the_finalizers() {
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start_with(
        &kbin,
        spiderpool_testkit::ControlPlaneOptions {
            audit: true,
            ..Default::default()
        },
    );
    cp.install_crds();
    let dir = tempfile::tempdir().unwrap();

    // Written before any webhook serves, as a broken client or a bad restore would leave them.
    let apply = |v: Value| cp.kubectl_ok(&["apply", "-f", "-"], &v.to_string());
    apply(pool("bad", "10.8.0.0/24", "10.8.0.10-10.8.0.20"));
    write_allocated(&cp, dir.path(), "bad", r#"{"10.8.0.10": 5}"#);
    apply(pool("nopod", "10.8.1.0/24", "10.8.1.10-10.8.1.20"));
    write_allocated(
        &cp,
        dir.path(),
        "nopod",
        r#"{"10.8.1.10": {"pod": "", "podUid": ""}}"#,
    );
    // 2,000 holders whose pods are gone (no CNI DEL ever came).
    apply(pool("leaky", "10.9.0.0/16", "10.9.0.1-10.9.7.254"));
    let dead: serde_json::Map<String, Value> = (0..2000u32)
        .map(|i| {
            (
                format!("10.9.{}.{}", i / 250, i % 250 + 1),
                json!({"pod": format!("default/dead-{i}"), "podUid": format!("uid-{i}"),
                    "containerID": format!("c-{i}"), "interface": "eth0", "node": "gone-node"}),
            )
        })
        .collect();
    write_allocated(
        &cp,
        dir.path(),
        "leaky",
        &serde_json::to_string(&dead).unwrap(),
    );
    let mut doomed = pool("doomed", "10.10.0.0/24", "10.10.0.10-10.10.0.20");
    doomed["metadata"]["finalizers"] = json!(["spiderpool.spidernet.io"]);
    apply(doomed);

    let kubeconfig = cp.client_kubeconfig("spiderpool-controller", &["system:masters"]);
    let webhook = format!("127.0.0.1:{}", spiderpool_testkit::free_port());
    let c = Controller::start_as(
        &kubeconfig,
        dir.path(),
        "ctl",
        &webhook,
        &[
            "--leader-duration",
            "4s",
            "--gc-interval",
            "3s",
            "--gc-grace-delay",
            "1s",
            "--gc-trace-gap",
            "1s",
        ],
    );
    until("the controller leads", || {
        (c.metric("spiderpool_controller_leader") == 1.0).then_some(())
    });
    until("its webhooks serve", || {
        (http_get(&c.health, "/readyz").0 == 200).then_some(())
    });

    // A /64 pool is admitted, and its counts are written: saturated at int64's largest.
    apply(pool(
        "wide",
        "fd00:64::/64",
        "fd00:64::1-fd00:64::ffff:ffff:ffff:ffff",
    ));
    let started = Instant::now();
    cp.kubectl_ok(&["delete", "spiderippool", "doomed", "--wait=false"], "");

    until("the deleted empty pool finalized", || {
        let out = cp.kubectl(&["get", "spiderippool", "doomed"], "");
        (!out.success).then_some(())
    });
    let finalized = started.elapsed();
    let leak = until("the 2,000 dead holders reclaimed", || {
        allocated(&cp, "leaky")
            .is_empty()
            .then(|| started.elapsed())
    });
    let wide = until("the /64 pool's counts written", || {
        let p = json_of(&cp, &["get", "spiderippool", "wide"]);
        p["status"]["totalIPCount"].as_i64().map(|_| p)
    });
    assert_eq!(wide["status"]["totalIPCount"], json!(i64::MAX));
    assert_eq!(wide["status"]["allocatedIPCount"], json!(0));
    let leaky = json_of(&cp, &["get", "spiderippool", "leaky"]);
    assert_eq!(leaky["status"]["allocatedIPCount"], json!(0));

    // The bad pools are said (a gauge, an Event each) and left exactly as they were.
    let gauge = r#"spiderpool_controller_invalid_objects{loop="reclaim",kind="SpiderIPPool"} 2"#;
    until("the gauge counts the two bad pools", || {
        http_get(&c.metrics, "/metrics")
            .1
            .contains(gauge)
            .then_some(())
    });
    let events = until("an Event on each bad pool", || {
        let ev = json_of(
            &cp,
            &[
                "get",
                "events",
                "-A",
                "--field-selector",
                "reason=InvalidObject",
            ],
        );
        let names: std::collections::BTreeSet<String> = ev["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| {
                e["regarding"]["name"]
                    .as_str()
                    .or(e["involvedObject"]["name"].as_str())
            })
            .map(str::to_string)
            .collect();
        (names.contains("bad") && names.contains("nopod")).then_some(ev)
    });
    let notes = events.to_string();
    assert!(notes.contains("status.allocatedIPs"), "{notes}");
    assert_eq!(allocated(&cp, "bad"), r#"{"10.8.0.10": 5}"#);
    assert!(allocated(&cp, "nopod").contains(r#""pod": """#));

    // All 2,000 went back in a handful of status writes (one per dead holder before).
    let requests = cp.requests_by("spiderpool-controller");
    let pool_writes = requests
        .get(&("update".to_string(), "spiderippools".to_string()))
        .copied()
        .unwrap_or(0);
    let log = c.log();
    let reclaimed = log.matches("reclaimed the addresses of a dead pod").count();
    eprintln!(
        "deleted empty pool finalized after {finalized:?}; 2,000 dead holders reclaimed after {leak:?}; \
         {pool_writes} pool updates by the controller in all; {reclaimed} holders reclaimed"
    );
    assert_eq!(reclaimed, 2000);
    assert!(
        pool_writes <= 12,
        "{pool_writes} pool updates for 2,000 releases and 5 pools' counts: {requests:?}"
    );
    assert_eq!(c.metric("spiderpool_ip_gc_counts_total"), 2000.0);
}

/// The pools a pod's ADD may use, in order: a pool whose status does not parse is passed over
/// for the next one of its group; a DEL releases what the readable pools hold and keeps the rest
/// recorded (for the controller, once the pool is mended) instead of failing the teardown.
#[test]
fn a_corrupt_pool_fails_alone_for_add_and_del() {
    use spiderpool_testkit::{Agent, CniCall};
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    let dir = tempfile::tempdir().unwrap();
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}).to_string(),
    );
    let apply = |v: Value| cp.kubectl_ok(&["apply", "-f", "-"], &v.to_string());
    apply(pool("first", "10.11.0.0/24", "10.11.0.10-10.11.0.12"));
    apply(pool("backup", "10.12.0.0/24", "10.12.0.10-10.12.0.12"));
    apply(pool("six", "fd00:11::/64", "fd00:11::10-fd00:11::12"));
    let socket = dir.path().join("a.sock");
    let agent = Agent::on_cluster(&cp, &socket, "n1", &[]);
    let conf = json!({"cniVersion": "1.0.0", "name": "net", "ipam": {"type": "spiderpool",
        "ipam_unix_socket_path": socket,
        "default_ipv4_ippool": ["first", "backup"], "default_ipv6_ippool": ["six"]}});
    let add = CniCall::new("ADD", "sandbox-a", "a", &conf).run();
    assert!(add.success, "{}{}\n{}", add.stdout, add.stderr, agent.log());
    assert!(add.stdout.contains("10.11.0.10/24"), "{}", add.stdout);
    assert!(add.stdout.contains("fd00:11::10/64"), "{}", add.stdout);

    // The pool's status is broken (a bad restore, a hand edit): its holder is a number.
    let corrupt = json!({"10.11.0.10": 5}).to_string();
    write_allocated(&cp, dir.path(), "first", &corrupt);

    // The next pod's IPv4 comes from the backup pool; its IPv6 from its own pool as ever.
    let add = until("an ADD passes over the corrupt pool", || {
        let out = CniCall::new("ADD", "sandbox-b", "b", &conf).run();
        out.stdout.contains("10.12.0.10/24").then_some(out)
    });
    assert!(add.stdout.contains("fd00:11::11/64"), "{}", add.stdout);
    assert!(
        agent
            .log()
            .contains("skipping a pool whose holders cannot be read"),
        "{}",
        agent.log()
    );

    // The first pod's DEL succeeds: its IPv6 goes back, its IPv4 stays recorded.
    let del = CniCall::new("DEL", "sandbox-a", "a", &conf).run();
    assert!(del.success, "{}{}\n{}", del.stdout, del.stderr, agent.log());
    let six = allocated(&cp, "six");
    assert!(!six.contains("fd00:11::10\""), "{six}");
    let ep = json_of(&cp, &["get", "spiderendpoint", "a"]);
    let nic = &ep["status"]["current"]["ips"][0];
    assert_eq!(nic["ipv4Pool"], "first", "{ep}");
    assert!(nic["ipv6"].is_null(), "{ep}");
    assert_eq!(
        allocated(&cp, "first"),
        corrupt,
        "the corrupt pool is left as it is"
    );
    // A second DEL of it (the runtime retries) succeeds too and changes nothing.
    let del = CniCall::new("DEL", "sandbox-a", "a", &conf).run();
    assert!(del.success, "{}{}", del.stdout, del.stderr);
    assert_eq!(
        json_of(&cp, &["get", "spiderendpoint", "a"])["status"],
        ep["status"]
    );
}

/// Node restriction (beyond upstream): the chart's agent identity, impersonated with the node
/// claim a pod-bound token carries, may add and remove only its own node's holders and touch
/// only the reserved IPs agents make; an admin is not restricted.
#[test]
fn an_agents_identity_may_undo_only_what_its_own_node_holds() {
    let Some(kbin) = kube_bin() else { return };
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(&cp, dir.path(), "ctl", &[]);
    until("its webhooks serve", || {
        (http_get(&c.health, "/readyz").0 == 200).then_some(())
    });
    // What the chart grants the agent's service account, for these two resources.
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: agent-test}
rules:
  - apiGroups: [spiderpool.spidernet.io]
    resources: [spiderippools]
    verbs: [get, list, watch]
  - apiGroups: [spiderpool.spidernet.io]
    resources: [spiderippools/status]
    verbs: [get, update, patch]
  - apiGroups: [spiderpool.spidernet.io]
    resources: [spiderreservedips]
    verbs: [get, list, watch, create, update, delete]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: agent-test}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: agent-test}
subjects:
  - {kind: ServiceAccount, name: spiderpool-agent, namespace: kube-system}
"#,
    );
    let apply = |v: Value| cp.kubectl_ok(&["apply", "-f", "-"], &v.to_string());
    apply(pool("shared", "10.13.0.0/24", "10.13.0.10-10.13.0.20"));
    apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "upstream-pod", "namespace": "default"},
        "spec": {"nodeName": "n2", "containers": [{"name": "c", "image": "registry.invalid/app"}]}}));
    let holder = |pod: &str, node: &str| {
        let mut h = json!({"pod": format!("default/{pod}"), "podUid": format!("uid-{pod}")});
        if !node.is_empty() {
            h["node"] = json!(node);
        }
        h
    };
    let mut held = serde_json::Map::new();
    held.insert("10.13.0.10".into(), holder("on-n1", "n1"));
    held.insert("10.13.0.11".into(), holder("on-n2", "n2"));
    held.insert("10.13.0.12".into(), holder("upstream-pod", ""));
    let status = |m: &serde_json::Map<String, Value>| {
        json!({"status": {"allocatedIPs": serde_json::to_string(m).unwrap()}}).to_string()
    };
    // An admin writes what it likes.
    cp.kubectl_ok(
        &[
            "patch",
            "spiderippool",
            "shared",
            "--subresource=status",
            "--type=merge",
            "-p",
            &status(&held),
        ],
        "",
    );
    for (name, ip) in [
        ("admin-held", "10.13.0.20"),
        ("ip-conflict-10-13-0-19", "10.13.0.19"),
    ] {
        apply(
            json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderReservedIP",
            "metadata": {"name": name}, "spec": {"ipVersion": 4, "ips": [ip]}}),
        );
    }

    let agent = "--as=system:serviceaccount:kube-system:spiderpool-agent";
    let on_n1 = "--as-user-extra=authentication.kubernetes.io/node-name=n1";
    let write_as = |who: &[&str], m: &serde_json::Map<String, Value>| {
        let s = status(m);
        let mut args = vec![
            "patch",
            "spiderippool",
            "shared",
            "--subresource=status",
            "--type=merge",
            "-p",
            &s,
        ];
        args.extend_from_slice(who);
        cp.kubectl(&args, "")
    };
    let refused = |out: &spiderpool_testkit::Output, needles: &[&str]| {
        assert!(!out.success, "admitted: {}", out.stdout);
        for n in needles {
            assert!(out.stderr.contains(n), "{n:?} not in: {}", out.stderr);
        }
    };
    // Another node's holder, recorded or upstream's (its Pod is on n2), is not n1's to remove.
    for ip in ["10.13.0.11", "10.13.0.12"] {
        let mut m = held.clone();
        m.remove(ip);
        let out = write_as(&[agent, on_n1], &m);
        refused(
            &out,
            &["may remove only its own node's holders", ip, "of node n2"],
        );
    }
    // Nor may it record an address for another node.
    let mut m = held.clone();
    m.insert("10.13.0.14".into(), holder("x", "n2"));
    refused(
        &write_as(&[agent, on_n1], &m),
        &["may record addresses only for its own node", "10.13.0.14"],
    );
    // Without a node claim the identity may write nothing here.
    let mut m = held.clone();
    m.insert("10.13.0.15".into(), holder("y", "n1"));
    refused(&write_as(&[agent], &m), &["without a node"]);
    // Its own node's work passes: a release and a claim.
    let mut m = held.clone();
    m.remove("10.13.0.10");
    m.insert("10.13.0.13".into(), holder("next", "n1"));
    let out = write_as(&[agent, on_n1], &m);
    assert!(out.success, "{}", out.stderr);
    assert_eq!(allocated(&cp, "shared"), serde_json::to_string(&m).unwrap());

    // An admin's reservation stays; the agents' conflict hold goes.
    let del = |name: &str| cp.kubectl(&["delete", "spiderreservedip", name, agent, on_n1], "");
    refused(
        &del("admin-held"),
        &["only the SpiderReservedIPs agents make", "admin-held"],
    );
    assert!(del("ip-conflict-10-13-0-19").success);
    cp.kubectl_ok(&["get", "spiderreservedip", "admin-held"], "");

    // An admin is not restricted.
    let mut m = held.clone();
    m.clear();
    let out = write_as(&[], &m);
    assert!(out.success, "{}", out.stderr);
}
