//! spiderpool-controller on a real control plane: two replicas elect a leader on the Lease
//! `spiderpool-controller-leases`; the leader reclaims the addresses of pods that died while
//! their node's simulator was stopped (so no CNI DEL ever came), and nothing else.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use spiderpool_testkit::{
    is_root, json_of, kube_bin, kube_node, macvlan_nad, running, until, zones, ControlPlane,
    Controller,
};

fn pool(name: &str, subnet: &str, ips: &str, gateway: &str) -> String {
    json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
        "metadata": {"name": name},
        "spec": {"subnet": subnet, "ips": [ips], "gateway": gateway}})
    .to_string()
}

fn annotations(pool: &str) -> Value {
    json!({"v1.multus-cni.io/default-network": "kube-system/macvlan-conf",
        "ipam.spidernet.io/ippool": json!({"ipv4": [pool]}).to_string()})
}

fn pod(name: &str, node: &str, pool: &str) -> String {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations(pool)},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 3,
            "containers": [{"name": "c", "image": "registry.invalid/app"}]}})
    .to_string()
}

/// The pool's holders: address → pod name.
fn holders(cp: &ControlPlane, pool: &str) -> BTreeMap<String, String> {
    let p = json_of(cp, &["get", "spiderippool", pool]);
    let Some(text) = p["status"]["allocatedIPs"].as_str() else {
        return BTreeMap::new();
    };
    let v: BTreeMap<String, Value> = serde_json::from_str(text).unwrap();
    v.into_iter()
        .map(|(ip, h)| (ip, h["pod"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn uid(cp: &ControlPlane, name: &str) -> String {
    json_of(cp, &["get", "pod", name])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string()
}

fn refs(cs: &[Option<Controller>]) -> Vec<&Controller> {
    cs.iter().flatten().collect()
}

fn leader_of<'a>(cs: &'a [&'a Controller]) -> Option<usize> {
    let leading: Vec<usize> = (0..cs.len())
        .filter(|i| cs[*i].metric("spiderpool_controller_leader") == 1.0)
        .collect();
    (leading.len() == 1).then(|| leading[0])
}

#[test]
fn the_leader_reclaims_what_dead_pods_leaked_and_a_new_leader_takes_over() {
    let Some(kbin) = kube_bin() else { return };
    if !is_root() {
        eprintln!("SKIPPED: needs root for network namespaces");
        return;
    }
    let cp = ControlPlane::start(&kbin, true);
    cp.install_crds();
    let _zones = zones(
        "ctl",
        &[("ctl-n1", "10.6.0.1/16"), ("ctl-n2", "10.7.0.1/16")],
    );
    cp.kubectl_ok(&["apply", "-f", "-"], &macvlan_nad());
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &pool("p6", "10.6.0.0/16", "10.6.0.10-10.6.0.40", "10.6.0.1"),
    );
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &pool("p7", "10.7.0.0/16", "10.7.0.10-10.7.0.40", "10.7.0.1"),
    );
    let mut n1 = kube_node(&cp, "n1", &[("zone", "a")], "ctl-n1", &[]);
    let mut n2 = kube_node(&cp, "n2", &[("zone", "b")], "ctl-n2", &[]);

    // Pods on n1: one to delete, one to leave terminating, one to fail, one to replace, one
    // to keep; a StatefulSet of two whose member 0 is re-created and member 1 scaled away. On
    // n2: one pod whose node goes away. (The StatefulSet's pods give up 3 s after deletion.)
    for name in ["gone", "ending", "failing", "reborn", "living", "stuck"] {
        cp.kubectl_ok(&["apply", "-f", "-"], &pod(name, "n1", "p6"));
    }
    cp.kubectl_ok(&["apply", "-f", "-"], &pod("stranded", "n2", "p7"));
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"replicas": 2, "serviceName": "db", "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": {"app": "db"}},
                "template": {"metadata": {"labels": {"app": "db"}, "annotations": annotations("p6")},
                    "spec": {"nodeSelector": {"zone": "a"}, "terminationGracePeriodSeconds": 3,
                        "containers": [{"name": "c", "image": "registry.invalid/db"}]}}}})
        .to_string(),
    );
    let all = [
        "gone", "ending", "failing", "reborn", "living", "stuck", "stranded", "db-0", "db-1",
    ];
    until("every pod running with an address", || {
        let pods = json_of(&cp, &["get", "pods"]);
        let items = pods["items"].as_array().unwrap();
        let up = items
            .iter()
            .filter(|p| running(p) && p["status"]["podIP"].is_string())
            .count();
        (up == all.len()).then_some(())
    });
    let mut uids: Vec<String> = all.iter().map(|n| uid(&cp, n)).collect();
    assert_eq!(holders(&cp, "p6").len(), 8);
    assert_eq!(holders(&cp, "p7").len(), 1);

    // Two controllers; exactly one leads.
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--leader-duration",
        "4s",
        "--gc-interval",
        "3s",
        "--gc-grace-delay",
        "1s",
        "--gc-trace-gap",
        "1s",
        "--gc-node-grace",
        "2s",
    ];
    let c1 = Controller::start(&cp, dir.path(), "ctl-a", &flags);
    let c2 = Controller::start(&cp, dir.path(), "ctl-b", &flags);
    let mut cs = [Some(c1), Some(c2)];
    let lead = until("one controller leads", || leader_of(&refs(&cs)));
    let lease = json_of(
        &cp,
        &[
            "get",
            "lease",
            "-n",
            "kube-system",
            "spiderpool-controller-leases",
        ],
    );
    let names = ["ctl-a", "ctl-b"];
    assert_eq!(lease["spec"]["holderIdentity"], names[lead]);
    for c in refs(&cs) {
        until("both ready", || {
            (spiderpool_testkit::http_get(&c.health, "/readyz").0 == 200).then_some(())
        });
    }
    // Nothing is leaked yet: nothing is taken.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(holders(&cp, "p6").len(), 8);

    // n1 dies: from now on no CNI DEL comes for its pods.
    n1.sim.stop();
    cp.kubectl_ok(
        &["delete", "pod", "gone", "--grace-period=0", "--force"],
        "",
    );
    cp.kubectl_ok(&["delete", "pod", "ending", "--wait=false"], "");
    cp.kubectl_ok(
        &[
            "patch",
            "pod",
            "failing",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Failed"}}"#,
        ],
        "",
    );
    cp.kubectl_ok(
        &["delete", "pod", "reborn", "--grace-period=0", "--force"],
        "",
    );
    cp.kubectl_ok(&["apply", "-f", "-"], &pod("reborn", "n1", "p6"));
    uids.push(uid(&cp, "reborn"));
    // db-0 is re-created by its StatefulSet (it keeps its address); db-1 is scaled away.
    cp.kubectl_ok(
        &["delete", "pod", "db-0", "--grace-period=0", "--force"],
        "",
    );
    cp.kubectl_ok(&["scale", "statefulset", "db", "--replicas=1"], "");
    // stuck terminates with an hour's grace: it keeps its address while its node is Ready.
    cp.kubectl_ok(
        &[
            "delete",
            "pod",
            "stuck",
            "--grace-period=3600",
            "--wait=false",
        ],
        "",
    );
    let p6 = |cp: &ControlPlane| {
        let h = holders(cp, "p6");
        let mut pods: Vec<String> = h.into_values().collect();
        pods.sort();
        pods
    };
    until("the leaks of n1 reclaimed", || {
        (p6(&cp) == ["default/db-0", "default/living", "default/stuck"]).then_some(())
    });
    let leader = refs(&cs)[lead];
    let other = refs(&cs)[1 - lead];
    let by = |cause: &str| {
        leader.metric(&format!(
            "spiderpool_ip_gc_cause_counts_total{{cause=\"{cause}\"}}"
        ))
    };
    assert_eq!(leader.metric("spiderpool_ip_gc_counts_total"), 5.0);
    assert_eq!(
        (
            by("deleted"),
            by("terminating"),
            by("finished"),
            by("replaced")
        ),
        (1.0, 2.0, 1.0, 1.0),
        "{}",
        leader.log()
    );
    assert_eq!(
        other.metric("spiderpool_ip_gc_counts_total"),
        0.0,
        "only the leader reclaims"
    );
    // The endpoints of the dead pods went with their addresses; the living keep theirs.
    let eps = json_of(&cp, &["get", "spiderendpoints"]);
    let mut left: Vec<&str> = eps["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["metadata"]["name"].as_str().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["db-0", "living", "stranded", "stuck"]);
    // n1 turns NotReady (long enough ago): its terminating pod's address goes at once, its
    // running pods keep theirs.
    cp.kubectl_ok(
        &[
            "patch",
            "node",
            "n1",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"conditions":[{"type":"Ready","status":"False","reason":"NodeStatusUnknown","message":"kubelet stopped posting","lastHeartbeatTime":"2026-01-01T00:00:00Z","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#,
        ],
        "",
    );
    until("stuck's address reclaimed", || {
        (p6(&cp) == ["default/db-0", "default/living"]).then_some(())
    });
    assert_eq!(by("node"), 1.0, "{}", leader.log());
    assert!(!cp.kubectl(&["get", "spiderendpoint", "stuck"], "").success);
    let log = leader.log();
    for why in [
        "pod default/gone is gone",
        "pod default/failing is Failed",
        "pod default/reborn is another incarnation now",
        "pod default/ending is terminating since",
        "pod default/stuck is terminating on node n1, NotReady since 2026-01-01T00:00:00Z",
    ] {
        assert!(log.contains(why), "{why:?} not in the leader's log:\n{log}");
    }

    // The leader dies; the other takes over within the lease and reclaims what node n2's
    // removal leaked.
    cs[lead].as_mut().unwrap().kill();
    let killed = std::time::Instant::now();
    cs[lead] = None;
    let survivor = cs[1 - lead].as_ref().unwrap();
    until("the survivor leads", || {
        (survivor.metric("spiderpool_controller_leader") == 1.0).then_some(())
    });
    let took_over = killed.elapsed();
    let lease = json_of(
        &cp,
        &[
            "get",
            "lease",
            "-n",
            "kube-system",
            "spiderpool-controller-leases",
        ],
    );
    assert_eq!(lease["spec"]["holderIdentity"], names[1 - lead]);
    n2.sim.stop();
    cp.kubectl_ok(&["delete", "node", "n2"], "");
    until("n2's pod's address reclaimed", || {
        holders(&cp, "p7").is_empty().then_some(())
    });
    eprintln!(
        "leader SIGKILLed: the other replica led {took_over:?} later (lease 4 s); a leak after that reclaimed {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(
        survivor.metric("spiderpool_ip_gc_cause_counts_total{cause=\"node\"}"),
        1.0,
        "{}",
        survivor.log()
    );
    assert_eq!(survivor.metric("spiderpool_ip_gc_counts_total"), 1.0);
    assert!(survivor
        .log()
        .contains("node n2 of pod default/stranded is gone"));
    // The audit agrees: nothing is held without a record, nothing recorded is unheld.
    let out = std::process::Command::new(spiderpool_testkit::bin("spiderpoolctl"))
        .args(["--datastore", "kubernetes", "--kubeconfig"])
        .arg(&cp.kubeconfig)
        .args(["ipam", "check"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("without an endpoint") && !text.contains("does not hold"),
        "{text}"
    );
    drop(n1);
    drop(n2);
    // The dead nodes' pods never got their DEL: their sandboxes are left to clean up.
    for u in uids {
        let ns = format!("sim-{}", &u.replace('-', "")[..12]);
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .output();
    }
}
