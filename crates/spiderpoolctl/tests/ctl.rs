//! `spiderpoolctl` as a user runs it: apply with warnings and refusals that name the bad value,
//! kubectl-style tables and Kubernetes-form JSON/YAML, delete guarded against data loss.

use serde_json::json;
use spiderpool_testkit::{CniCall, Sandbox};

const SEED_POOLS: &str = include_str!("../../../examples/seed-zones/manifests/03-ippools.yaml");
const SEED_SUBNETS: &str = include_str!("../../../examples/seed-zones/manifests/02-subnets.yaml");

fn pool(name: &str, subnet: &str, ips: &str, extra: &str) -> String {
    format!(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {{name: {name}}}\nspec:\n  subnet: {subnet}\n  ips: [{ips}]\n{extra}"
    )
}

#[test]
fn seed_objects_apply_and_print_the_seed_columns() {
    let sb = Sandbox::new();
    let out = sb.ctl(
        &["apply", "-f", "-"],
        &format!("{SEED_SUBNETS}\n---\n{SEED_POOLS}"),
    );
    assert!(out.success, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "spidersubnet.spiderpool.spidernet.io/subnet-6 created\nspidersubnet.spiderpool.spidernet.io/subnet-7 created\n\
         spiderippool.spiderpool.spidernet.io/test-ippool-6 created\nspiderippool.spiderpool.spidernet.io/test-ippool-7 created\n"
    );
    let again = sb.ctl(&["apply", "-f", "-"], SEED_POOLS);
    assert!(
        again.stdout.contains("test-ippool-6 unchanged"),
        "{}",
        again.stdout
    );
    // A pool of a subnet's CIDR belongs to it; an owner reference, where there is one, names
    // the subnet's real UID (in a cluster the webhook sets it, after the API server gave the
    // subnet its UID: a reference to a UID that does not exist would get the pool collected).
    let pool6 = sb.get_json("ippool", "test-ippool-6");
    assert_eq!(
        pool6["metadata"]["labels"]["ipam.spidernet.io/owner-spider-subnet"],
        "subnet-6"
    );
    let subnet6 = sb.get_json("subnet", "subnet-6");
    for owner in pool6["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
    {
        assert_eq!(owner["uid"], subnet6["metadata"]["uid"], "{pool6}");
    }
    assert_eq!(
        pool6["metadata"]["ownerReferences"].is_array(),
        !Sandbox::on_kubernetes(),
        "{pool6}"
    );

    let table = sb.ctl(&["get", "ippool"], "").stdout;
    assert_eq!(
        table,
        "NAME            VERSION   SUBNET        ALLOCATED-IP-COUNT   TOTAL-IP-COUNT   DEFAULT   DISABLE\n\
         test-ippool-6   4         10.6.0.0/16   0                    10               false     false\n\
         test-ippool-7   4         10.7.0.0/16   0                    10               false     false\n"
    );
    let subnets = sb.ctl(&["get", "spidersubnet"], "").stdout;
    assert_eq!(
        subnets.lines().next().unwrap(),
        "NAME       VERSION   SUBNET        ALLOCATED-IP-COUNT   TOTAL-IP-COUNT"
    );
    let wide = sb.ctl(&["get", "sp", "-o", "wide"], "").stdout;
    assert!(wide.starts_with("NAME            VERSION   SUBNET        ALLOCATED-IP-COUNT   TOTAL-IP-COUNT   DEFAULT   DISABLE   NODENAME"), "{wide}");

    let j = sb.get_json("ippool", "test-ippool-6");
    assert_eq!(j["apiVersion"], "spiderpool.spidernet.io/v2beta1");
    assert_eq!(j["kind"], "SpiderIPPool");
    assert_eq!(
        j["spec"]["nodeAffinity"]["matchExpressions"][0]["values"],
        json!(["subnet-6"])
    );
    assert_eq!(
        j["status"],
        json!({"allocatedIPCount": 0, "totalIPCount": 10})
    );
    assert!(j["metadata"]["resourceVersion"].is_string());
    let list = sb.ctl(&["get", "ippool", "-o", "yaml"], "");
    assert!(
        list.stdout.starts_with("apiVersion: v1\nitems:\n"),
        "{}",
        list.stdout
    );
    assert!(list.stdout.contains("kind: List"));
    // Shell completions, without touching any datastore.
    let bash = spiderpool_testkit::run(
        std::process::Command::new(spiderpool_testkit::bin("spiderpoolctl")).args([
            "--datastore",
            "sqlite:///nonexistent/dir/x.db",
            "completion",
            "bash",
        ]),
        "",
    );
    assert!(bash.success, "{}", bash.stderr);
    assert!(bash.stdout.contains("_spiderpoolctl()") && bash.stdout.contains("explain"));
    let names = sb.ctl(&["get", "ippool", "-o", "name"], "").stdout;
    assert_eq!(
        names,
        "spiderippool.spiderpool.spidernet.io/test-ippool-6\nspiderippool.spiderpool.spidernet.io/test-ippool-7\n"
    );
}

#[test]
fn unknown_fields_warn_and_bad_objects_are_refused_by_name() {
    let sb = Sandbox::new();
    let out = sb.ctl(
        &["apply", "-f", "-"],
        &pool(
            "p",
            "10.6.0.0/16",
            "10.6.0.1-10.6.0.9",
            "  gatway: 10.6.0.254\n",
        ),
    );
    assert!(out.success);
    assert!(
        out.stderr
            .contains("Warning: SpiderIPPool \"p\": unknown field \"spec.gatway\" ignored"),
        "{}",
        out.stderr
    );
    let cases = [
        (
            pool("q", "10.6.0.0/16", "10.7.0.1", ""),
            "pool \"q\": spec.ips 10.7.0.1 is outside subnet 10.6.0.0/16",
        ),
        (
            pool("q", "10.6.0.0/16", "10.6.0.9-10.6.0.1", ""),
            "spec.ips: IP range \"10.6.0.9-10.6.0.1\" is reversed",
        ),
        (
            pool("q", "10.6.0.0/16", "10.6.0.5-10.6.0.20", ""),
            "SpiderIPPool \"q\": spec.ips \"[10.6.0.5-10.6.0.9]\" overlap with IPPool p in IP ranges [10.6.0.5-10.6.0.9]",
        ),
        (
            pool("q", "10.6.1.0/16", "10.6.1.1", ""),
            "spec.subnet 10.6.1.0/16 is not canonical, use 10.6.0.0/16",
        ),
        (
            pool("q", "10.6.0.0/24", "10.6.0.100", ""),
            "SpiderIPPool \"q\": spec.subnet \"10.6.0.0/24\" overlap with IPPool p which 'spec.subnet' is 10.6.0.0/16",
        ),
        (
            pool("q", "10.8.0.0/16", "10.8.0.1", "  gateway: 10.8.0.1\n"),
            "spec.gateway 10.8.0.1 must not be one of spec.ips",
        ),
        (
            pool("p", "10.9.0.0/16", "10.9.0.1", ""),
            "SpiderIPPool \"p\": spec.subnet \"10.9.0.0/16\" is not changeable (was 10.6.0.0/16)",
        ),
    ];
    for (yaml, want) in cases {
        let before = sb.ctl(&["get", "ippool", "-o", "json"], "").stdout;
        let out = sb.ctl(&["apply", "-f", "-"], &yaml);
        assert!(!out.success, "accepted:\n{yaml}");
        assert!(
            out.stderr.contains(want),
            "want {want:?} in {:?}",
            out.stderr
        );
        assert_eq!(
            sb.ctl(&["get", "ippool", "-o", "json"], "").stdout,
            before,
            "a refused apply changed the datastore"
        );
    }
    let out = sb.ctl(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n",
    );
    assert!(
        out.stderr
            .contains("unsupported apiVersion \"v1\" kind \"Service\""),
        "{}",
        out.stderr
    );
    let out = sb.ctl(&["get", "frobs"], "");
    assert!(
        !out.success && out.stderr.contains("unknown kind \"frobs\""),
        "{}",
        out.stderr
    );
    let out = spiderpool_testkit::run(
        std::process::Command::new(spiderpool_testkit::bin("spiderpoolctl")).args([
            "--datastore",
            "mysql://x",
            "get",
            "ippool",
        ]),
        "",
    );
    assert!(
        out.stderr
            .contains("datastore \"mysql://x\": unknown scheme"),
        "{}",
        out.stderr
    );
}

#[test]
fn addresses_in_use_are_never_lost() {
    let sb = Sandbox::new();
    sb.apply(&pool("p", "10.6.0.0/16", "10.6.0.1-10.6.0.9", ""));
    let agent = sb.agent("n1", "");
    let conf = json!({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "spiderpool", "ipam_unix_socket_path": agent.socket, "default_ipv4_ippool": ["p"]}});
    assert!(CniCall::new("ADD", "c1", "web-0", &conf).run().success);

    // Excluding or removing the address the pod holds is refused, naming the pod.
    let out = sb.ctl(
        &["apply", "-f", "-"],
        &pool(
            "p",
            "10.6.0.0/16",
            "10.6.0.1-10.6.0.9",
            "  excludeIPs: [10.6.0.1]\n",
        ),
    );
    assert!(
        out.stderr.contains(
            "spec.ips \"10.6.0.1\" remove an IP address 10.6.0.1 that is being used by Pod default/web-0 (interface eth0)"
        ),
        "{}",
        out.stderr
    );
    let out = sb.ctl(
        &["apply", "-f", "-"],
        &pool("p", "10.6.0.0/16", "10.6.0.2-10.6.0.9", ""),
    );
    assert!(out.stderr.contains("Pod default/web-0"), "{}", out.stderr);
    // Shrinking around it is fine.
    let out = sb.ctl(
        &["apply", "-f", "-"],
        &pool("p", "10.6.0.0/16", "10.6.0.1-10.6.0.5", ""),
    );
    assert!(out.success, "{}", out.stderr);

    let out = sb.ctl(&["delete", "ippool", "p"], "");
    assert!(!out.success);
    assert!(
        out.stderr.contains(
            "cannot delete SpiderIPPool \"p\" with 1 allocated IPs (held by default/web-0)"
        ),
        "{}",
        out.stderr
    );
    let ep = sb.ctl(&["get", "endpoint"], "").stdout;
    assert!(ep.contains("web-0") && ep.contains("10.6.0.1/16"), "{ep}");
    let j = sb.get_json("ippool", "p");
    let allocated: serde_json::Value =
        serde_json::from_str(j["status"]["allocatedIPs"].as_str().unwrap()).unwrap();
    assert_eq!(allocated["10.6.0.1"]["pod"], "default/web-0");
    assert_eq!(allocated["10.6.0.1"]["interface"], "eth0");

    assert!(CniCall::new("DEL", "c1", "web-0", &conf).run().success);
    let out = sb.ctl(&["delete", "ippool", "p"], "");
    assert!(out.success, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "spiderippool.spiderpool.spidernet.io/p deleted\n"
    );
    let out = sb.ctl(&["delete", "ippool", "p"], "");
    assert!(
        out.stderr.contains("spiderippools \"p\" not found"),
        "{}",
        out.stderr
    );
}

#[test]
fn ipam_show_counts_the_space_and_names_who_holds_an_address() {
    let sb = Sandbox::new();
    sb.apply(&format!(
        "{SEED_SUBNETS}\n---\n{SEED_POOLS}\n---\napiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderReservedIP\nmetadata: {{name: keep}}\nspec:\n  ips: [10.6.168.69]\n"
    ));
    let agent = sb.agent("n1", "node-subnet=subnet-6");
    let conf = json!({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "spiderpool",
        "ipam_unix_socket_path": agent.socket, "default_ipv4_ippool": ["test-ippool-6"]}});
    assert!(CniCall::new("ADD", "c1", "web-0", &conf).run().success);

    let out = sb.ctl(&["ipam", "show"], "");
    assert!(out.success, "{}", out.stderr);
    let rows: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "KIND",
            "NAME",
            "SUBNET",
            "TOTAL",
            "USED",
            "FREE",
            "UTILISATION",
            "FREE-RANGES"
        ]
    );
    // One held, one reserved: 8 free, in one range.
    let row = |name: &str| rows.iter().find(|r| r[1] == name).unwrap().clone();
    assert_eq!(
        row("subnet-6"),
        [
            "subnet",
            "subnet-6",
            "10.6.0.0/16",
            "10",
            "1",
            "8",
            "[#---------]",
            "10%",
            "10.6.168.61-10.6.168.68"
        ]
    );
    assert_eq!(
        row("test-ippool-6"),
        [
            "ippool",
            "test-ippool-6",
            "10.6.0.0/16",
            "10",
            "1",
            "8",
            "[#---------]",
            "10%",
            "10.6.168.61-10.6.168.68"
        ]
    );
    assert_eq!(row("test-ippool-7")[3..6], ["10", "0", "10"]);
    // One pool (and its subnet) only, as JSON.
    let out = sb.ctl(&["ipam", "show", "test-ippool-7", "-o", "json"], "");
    let items = out.json()["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2, "{}", out.stdout);
    assert_eq!(items[1]["name"], "test-ippool-7");
    assert_eq!(items[1]["freeRanges"], json!(["10.7.168.60-10.7.168.69"]));
    let out = sb.ctl(&["ipam", "show", "nope"], "");
    assert!(!out.success);
    assert!(
        out.stderr.contains("spiderippool \"nope\" not found"),
        "{}",
        out.stderr
    );

    // Who holds an address, and why another is not handed out.
    let out = sb.ctl(&["ipam", "show", "--ip", "10.6.168.60"], "");
    assert!(out.success, "{}", out.stderr);
    for line in [
        "10.6.168.60 is held in spiderippool/test-ippool-6",
        "  pod:        default/web-0",
        "  container:  c1",
        "  interface:  eth0",
        "  node:       n1",
    ] {
        assert!(out.stdout.contains(line), "{line:?} in:\n{}", out.stdout);
    }
    let out = sb.ctl(&["ipam", "show", "--ip", "10.6.168.69"], "");
    assert!(!out.success);
    assert!(
        out.stdout.contains("10.6.168.69 is not handed out by spiderippool/test-ippool-6: reserved (spiderreservedip/keep)"),
        "{}",
        out.stdout
    );
    let out = sb.ctl(&["ipam", "show", "--ip", "10.6.168.61"], "");
    assert_eq!(
        out.stdout,
        "10.6.168.61 is free in spiderippool/test-ippool-6\n"
    );
    let out = sb.ctl(&["ipam", "show", "--ip", "192.0.2.1"], "");
    assert_eq!(out.stdout, "192.0.2.1 is in no pool's subnet\n");
    assert!(!out.success);
}

/// Commits `ops` to the sandbox's datastore directly: the way to build an inconsistent state.
fn commit(sb: &Sandbox, ops: Vec<spiderpool_store::Op>) {
    let url: spiderpool_backends::DatastoreUrl = sb.datastore().parse().unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let s = spiderpool_backends::open(&url).await.unwrap();
        s.commit(ops).await.unwrap();
    });
}

fn pod_yaml(name: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec: {{containers: [{{name: c, image: registry.invalid/c}}]}}\n")
}

fn problems(sb: &Sandbox) -> (bool, Vec<serde_json::Value>) {
    let out = sb.ctl(&["ipam", "check", "-o", "json"], "");
    let mut p = out.json()["problems"].as_array().unwrap().clone();
    p.sort_by_key(|p| p.to_string());
    (out.success, p)
}

#[test]
fn ipam_check_reports_each_inconsistency_and_a_report_repairs_exactly_those() {
    use spiderpool_store::{Holder, Op};
    let sb = Sandbox::new();
    sb.apply(&format!(
        "{}\n---\n{}",
        pool("p", "10.6.0.0/16", "10.6.0.1-10.6.0.9", ""),
        pool("q", "10.7.0.0/16", "10.7.0.1-10.7.0.9", "")
    ));
    for n in ["web-1", "web-2", "web-3"] {
        sb.apply(&pod_yaml(n));
    }
    let agent = sb.agent("n1", "");
    let conf = json!({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "spiderpool",
        "ipam_unix_socket_path": agent.socket, "default_ipv4_ippool": ["p"]}});
    for (c, n) in [("c1", "web-1"), ("c2", "web-2"), ("c3", "web-3")] {
        let out = CniCall::new("ADD", c, n, &conf).run();
        assert!(out.success, "{}", out.stdout);
    }
    let out = sb.ctl(&["ipam", "check"], "");
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stdout, "no inconsistency found\n");

    // Build each inconsistency on purpose.
    let rev = |pool: &str| {
        sb.get_json("ippool", pool)["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let holder = |pod: &str, c: &str| Holder {
        pod: format!("default/{pod}"),
        pod_uid: format!("uid-{c}"),
        container_id: c.into(),
        nic: "eth0".into(),
        node: "n1".into(),
    };
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    // An address without a record.
    commit(
        &sb,
        vec![Op::Claim {
            pool: "p".into(),
            ip: ip("10.6.0.7"),
            holder: holder("ghost", "g1"),
            pool_revision: rev("p"),
        }],
    );
    // web-2's address held a second time, in another pool.
    commit(
        &sb,
        vec![Op::Claim {
            pool: "q".into(),
            ip: ip("10.6.0.2"),
            holder: holder("ghost", "g2"),
            pool_revision: rev("q"),
        }],
    );
    // web-3's record names an address its pool no longer holds for it.
    commit(
        &sb,
        vec![Op::Release {
            pool: "p".into(),
            ip: ip("10.6.0.3"),
            container_id: "c3".into(),
            nic: "eth0".into(),
            pod_uid: String::new(),
        }],
    );
    // web-1 is another pod now.
    assert!(
        sb.ctl(&["delete", "pod", "web-1", "-n", "default"], "")
            .success
    );
    sb.apply(&pod_yaml("web-1"));

    let (clean, found) = problems(&sb);
    assert!(!clean, "ipam check exits 1 when it finds something");
    let kinds: Vec<(&str, String)> = found
        .iter()
        .map(|p| {
            let what = p["ip"]
                .as_str()
                .or(p["endpoint"].as_str())
                .unwrap_or_default();
            (p["problem"].as_str().unwrap(), what.to_string())
        })
        .collect();
    for want in [
        ("unrecorded", "10.6.0.7"),
        ("unrecorded", "10.6.0.2"),
        ("heldTwice", "10.6.0.2"),
        ("notHeld", "10.6.0.3"),
        ("danglingEndpoint", "default/web-1"),
    ] {
        assert!(
            kinds.contains(&(want.0, want.1.to_string())),
            "{want:?} not in {kinds:?}"
        );
    }
    assert_eq!(kinds.len(), 5, "{kinds:?}");
    let text = sb.ctl(&["ipam", "check"], "").stdout;
    assert!(
        text.contains("10.6.0.7 of spiderippool/p is held by pod default/ghost (container g1, interface eth0) without an endpoint recording it"),
        "{text}"
    );

    // The report repairs exactly what a release can: the unrecorded addresses and the dangling
    // endpoint (with the address it recorded); the rest is left for a human, and says so.
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    std::fs::write(&report, sb.ctl(&["ipam", "check", "-o", "json"], "").stdout).unwrap();
    let out = sb.ctl(
        &["ipam", "release", "--from-report", report.to_str().unwrap()],
        "",
    );
    assert!(!out.success, "two items are not a release's to repair");
    assert!(
        out.stdout.contains("released 10.6.0.7 of spiderippool/p"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("released 10.6.0.2 of spiderippool/q"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("deleted spiderendpoint/default/web-1"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("skipped: 10.6.0.2 is held twice"),
        "{}",
        out.stdout
    );
    assert_eq!(out.stdout.matches("skipped").count(), 2, "{}", out.stdout);
    let (_, left) = problems(&sb);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["problem"], "notHeld");
    // web-2 keeps its address; web-1's went back with its record.
    let held: serde_json::Value = serde_json::from_str(
        sb.get_json("ippool", "p")["status"]["allocatedIPs"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(held["10.6.0.2"]["pod"], "default/web-2");
    assert!(
        held.get("10.6.0.1").is_none() && held.get("10.6.0.7").is_none(),
        "{held}"
    );

    // A report never frees what changed since: the address went to someone else meanwhile.
    commit(
        &sb,
        vec![Op::Claim {
            pool: "p".into(),
            ip: ip("10.6.0.8"),
            holder: holder("ghost", "g3"),
            pool_revision: rev("p"),
        }],
    );
    std::fs::write(&report, sb.ctl(&["ipam", "check", "-o", "json"], "").stdout).unwrap();
    assert!(sb.ctl(&["ipam", "release", "p", "10.6.0.8"], "").success);
    commit(
        &sb,
        vec![Op::Claim {
            pool: "p".into(),
            ip: ip("10.6.0.8"),
            holder: holder("ghost", "g4"),
            pool_revision: rev("p"),
        }],
    );
    let out = sb.ctl(
        &["ipam", "release", "--from-report", report.to_str().unwrap()],
        "",
    );
    assert!(
        out.stdout
            .contains("10.6.0.8 of spiderippool/p: changed since the report"),
        "{}",
        out.stdout
    );
    let held: serde_json::Value = serde_json::from_str(
        sb.get_json("ippool", "p")["status"]["allocatedIPs"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(held["10.6.0.8"]["pod"], "default/ghost");
}

#[test]
fn explain_names_the_source_each_pools_fate_and_the_next_address() {
    let sb = Sandbox::new();
    let p = |name: &str, range: &str, extra: &str| pool(name, "10.6.0.0/16", range, extra);
    sb.apply(
        &[
            p(
                "by-node-affinity",
                "10.6.1.1-10.6.1.5",
                "  nodeAffinity: {matchLabels: {zone: a}}\n",
            ),
            p(
                "by-node-name",
                "10.6.2.1-10.6.2.5",
                "  nodeName: [other-node]\n",
            ),
            p(
                "by-ns-affinity",
                "10.6.3.1-10.6.3.5",
                "  namespaceAffinity: {matchLabels: {team: red}}\n",
            ),
            p(
                "by-ns-name",
                "10.6.4.1-10.6.4.5",
                "  namespaceName: [other-ns]\n",
            ),
            p(
                "by-pod-affinity",
                "10.6.5.1-10.6.5.5",
                "  podAffinity: {matchLabels: {app: db}}\n",
            ),
            p(
                "by-multus",
                "10.6.6.1-10.6.6.5",
                "  multusName: [kube-system/other-net]\n",
            ),
            p("disabled", "10.6.7.1-10.6.7.5", "  disable: true\n"),
            p(
                "fits",
                "10.6.8.1-10.6.8.5",
                "  nodeAffinity: {matchLabels: {zone: b}}\n",
            ),
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {zone: b}}\n".into(),
        ]
        .join("\n---\n"),
    );
    let all = r#"{"ipv4": ["by-node-affinity", "by-node-name", "by-ns-affinity", "by-ns-name", "by-pod-affinity", "by-multus", "disabled", "fits"]}"#;
    let pod = |name: &str, ippool: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"},
                "annotations": {"ipam.spidernet.io/ippool": ippool, "v1.multus-cni.io/default-network": "kube-system/macvlan"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "registry.invalid/c"}]}})
        .to_string()
    };
    sb.apply(&pod("web", all));
    let out = sb.ctl(&["explain", "pod", "default/web"], "");
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let text = &out.stdout;
    for line in [
        "pod default/web, interface eth0, node n1 (zone=b)",
        "candidates from: pod annotation ipam.spidernet.io/ippool",
        "IPv4:",
        "  1. fits                 kept      5 free, next 10.6.8.1",
        "by-node-affinity     filtered  spec.nodeAffinity does not match the labels of node n1",
        "by-node-name         filtered  spec.nodeName does not list node n1",
        "by-ns-affinity       filtered  spec.namespaceAffinity does not match the labels of namespace default",
        "by-ns-name           filtered  spec.namespaceName does not list namespace default",
        "by-pod-affinity      filtered  spec.podAffinity does not match the labels of pod default/web",
        "by-multus            filtered  spec.multusName does not list network kube-system/macvlan of interface eth0",
        "disabled             filtered  pool is disabled (spec.disable: true)",
        "  would allocate 10.6.8.1 from fits",
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
    // Nothing was allocated, and the JSON says the same.
    assert_eq!(sb.allocated("fits"), 0);
    let j = sb
        .ctl(&["explain", "pod", "default/web", "-o", "json"], "")
        .json();
    assert_eq!(
        j["families"][0]["wouldAllocate"],
        json!({"pool": "fits", "ip": "10.6.8.1"})
    );
    assert_eq!(j["families"][0]["candidates"].as_array().unwrap().len(), 8);

    // A pod every pool filters out gets the CNI error's reasons, and exit status 1.
    sb.apply(&pod("stuck", r#"{"ipv4": ["by-node-name", "disabled"]}"#));
    let out = sb.ctl(&["explain", "pod", "default/stuck"], "");
    assert!(!out.success);
    assert!(
        out.stdout.contains("no address: no IPv4 IPPool fits pod default/stuck on node n1: by-node-name: spec.nodeName does not list node n1; disabled: pool is disabled (spec.disable: true)"),
        "{}",
        out.stdout
    );
    let out = sb.ctl(&["explain", "pod", "default/nobody"], "");
    assert!(
        out.stderr.contains("pod default/nobody not found"),
        "{}",
        out.stderr
    );
}

#[test]
fn ipam_gc_reclaims_the_addresses_of_dead_pods_and_keeps_the_living() {
    let sb = Sandbox::new();
    let cluster = Sandbox::on_kubernetes();
    sb.apply(&pool("p", "10.6.0.0/16", "10.6.0.1-10.6.0.9", ""));
    for n in ["web-1", "web-2", "web-3", "web-4"] {
        sb.apply(&pod_yaml(n));
    }
    let agent = sb.agent("n1", "");
    let conf = json!({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "spiderpool",
        "ipam_unix_socket_path": agent.socket, "default_ipv4_ippool": ["p"]}});
    for (c, n) in [
        ("c1", "web-1"),
        ("c2", "web-2"),
        ("c3", "web-3"),
        ("c4", "web-4"),
    ] {
        let out = CniCall::new("ADD", c, n, &conf).run();
        assert!(out.success, "{}", out.stdout);
    }
    assert_eq!(sb.allocated("p"), 4);
    let out = sb.ctl(&["ipam", "gc", "--grace", "1s"], "");
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stdout, "nothing to reclaim\n");

    // web-1's Pod object is deleted: in a cluster the pod is gone; outside one a pod without
    // a Pod object is a bare pod, which keeps its address.
    let out = sb.ctl(&["delete", "pod", "web-1"], "");
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    // web-2 is replaced by another incarnation of the same name.
    assert!(sb.ctl(&["delete", "pod", "web-2"], "").success);
    sb.apply(&pod_yaml("web-2"));
    // web-3 finished (outside a cluster, where its status is what was applied).
    if !cluster {
        sb.apply(&format!("{}status: {{phase: Failed}}\n", pod_yaml("web-3")));
    }

    let out = sb.ctl(&["ipam", "gc", "--dry-run", "-o", "json"], "");
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let mut would: Vec<(String, String)> = out.json()["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["pod"].as_str().unwrap().to_string(),
                l["cause"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    would.sort();
    let mut expected = vec![("default/web-2".to_string(), "replaced".to_string())];
    if cluster {
        expected.insert(0, ("default/web-1".into(), "deleted".into()));
    } else {
        expected.push(("default/web-3".into(), "finished".into()));
    }
    assert_eq!(would, expected);
    assert_eq!(sb.allocated("p"), 4, "a dry run releases nothing");

    let out = sb.ctl(&["ipam", "gc", "--grace", "1s", "-o", "json"], "");
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let mut done: Vec<(String, Vec<String>)> = out.json()["reclaimed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["pod"].as_str().unwrap().to_string(),
                r["released"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    done.sort();
    let mut want = vec![(
        "default/web-2".to_string(),
        vec!["10.6.0.2 (p)".to_string()],
    )];
    if cluster {
        want.insert(0, ("default/web-1".into(), vec!["10.6.0.1 (p)".into()]));
    } else {
        want.push(("default/web-3".into(), vec!["10.6.0.3 (p)".into()]));
    }
    assert_eq!(done, want);
    assert_eq!(sb.allocated("p"), 2);
    // The living pod keeps its address and its endpoint; the dead ones' endpoints are gone.
    assert_eq!(
        sb.get_json("endpoint", "web-4")["status"]["current"]["ips"][0]["ipv4"],
        "10.6.0.4/16"
    );
    let out = sb.ctl(&["get", "endpoint", "web-2"], "");
    assert!(
        !out.success,
        "web-2's old endpoint is deleted: {}",
        out.stdout
    );
    let out = sb.ctl(&["ipam", "check"], "");
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    // Nothing left to do.
    let out = sb.ctl(&["ipam", "gc", "--grace", "1s"], "");
    assert_eq!(out.stdout, "nothing to reclaim\n");

    // A pod terminating with an hour's grace is said to be waiting, and keeps its address
    // (outside a cluster, where its deletion is what was applied).
    if !cluster {
        sb.apply(&pod_yaml("web-4").replace(
            "namespace: default}",
            "namespace: default, deletionTimestamp: '2030-01-01T00:00:00Z', deletionGracePeriodSeconds: 3600}",
        ));
        let out = sb.ctl(&["ipam", "gc", "--grace", "1s"], "");
        assert!(out.success, "{}{}", out.stdout, out.stderr);
        assert!(
            out.stdout.starts_with("waiting: pod default/web-4 (UID ")
                && out.stdout.contains(
                    "pod default/web-4 is terminating since 2030-01-01T00:00:00Z; its addresses go after 2030-01-01T01:00:01Z"
                ),
            "{}",
            out.stdout
        );
        assert_eq!(sb.allocated("p"), 2);
    }
}

#[test]
fn a_large_apply_reports_its_progress_on_stderr() {
    // 100 objects: as large a file as every datastore commits at once (etcd: 112 operations).
    let sb = Sandbox::new();
    let docs: Vec<String> = (0..100).map(|i| pod_yaml(&format!("bulk-{i}"))).collect();
    let out = sb.ctl(&["apply", "-f", "-"], &docs.join("---\n"));
    assert!(out.success, "{}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    let expected: Vec<String> = (1..=10)
        .map(|k| format!("checked {}/100 objects", k * 10))
        .chain(["writing 100 objects (100 datastore operations)".to_string()])
        .collect();
    assert_eq!(lines, expected);
    // The answer on stdout is unchanged: one line per object.
    assert_eq!(out.stdout.lines().count(), 100);
    assert_eq!(out.stdout.lines().next(), Some("pod/bulk-0 created"));
    // A small file says nothing more than before.
    let out = sb.ctl(&["apply", "-f", "-"], &pod_yaml("single"));
    assert_eq!(out.stderr, "");
}

#[test]
fn a_coordinator_gets_upstream_defaults_and_bad_settings_are_refused_by_field() {
    let sb = Sandbox::new();
    let doc = |spec: &str| {
        format!("apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderCoordinator\nmetadata: {{name: default}}\nspec: {spec}\n")
    };
    for (spec, want) in [
        (
            "{mode: underlay}",
            "SpiderCoordinator \"default\": spec.podCIDRType is required",
        ),
        (
            "{podCIDRType: weave}",
            "spec.podCIDRType \"weave\" is not supported (supported values: \"auto\", \"cluster\", \"calico\", \"cilium\", \"none\")",
        ),
        (
            "{podCIDRType: none, podMACPrefix: '0a:1b:2c'}",
            "spec.podMACPrefix \"0a:1b:2c\" is not a valid MAC prefix",
        ),
        (
            "{podCIDRType: none, hijackCIDR: [10.9.0.0/40]}",
            "spec.hijackCIDR[0] \"10.9.0.0/40\" is not an IP address or CIDR",
        ),
        (
            "{podCIDRType: none, hostRPFilter: 4}",
            "spec.hostRPFilter \"4\" is not supported",
        ),
    ] {
        let out = sb.ctl(&["apply", "-f", "-"], &doc(spec));
        assert!(
            !out.success && out.stderr.contains(want),
            "{spec}: want {want:?} in {}",
            out.stderr
        );
    }
    assert_eq!(sb.ctl(&["get", "scc"], "").stderr, "No resources found\n");

    let out = sb.ctl(
        &["apply", "-f", "-"],
        &doc("{podCIDRType: cluster, mode: underlay, hijackCIDR: [10.9.0.1], vethMTU: 9000}"),
    );
    assert!(out.success, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "spidercoordinator.spiderpool.spidernet.io/default created\n"
    );
    let c = sb.get_json("scc", "default");
    assert_eq!(
        c["spec"],
        json!({"mode": "underlay", "podCIDRType": "cluster", "hijackCIDR": ["10.9.0.1/32"],
            "tunePodRoutes": true, "hostRuleTable": 500, "hostRPFilter": 0, "podRPFilter": 0,
            "txQueueLen": 0, "vethMTU": 9000, "detectIPConflict": false, "detectGateway": false})
    );
    assert_eq!(
        sb.ctl(&["get", "spidercoordinators"], "").stdout,
        "NAME      MODE       PODCIDRTYPE   PHASE\ndefault   underlay   cluster\n"
    );
    // A bad update is refused and the stored settings stay.
    let out = sb.ctl(
        &["apply", "-f", "-"],
        &doc("{podCIDRType: cluster, txQueueLen: -2}"),
    );
    assert!(
        out.stderr
            .contains("spec.txQueueLen \"-2\" is invalid: txQueueLen can't be less than 0"),
        "{}",
        out.stderr
    );
    assert_eq!(sb.get_json("scc", "default")["spec"]["vethMTU"], 9000);
    assert!(sb.ctl(&["delete", "scc", "default"], "").success);
    assert_eq!(sb.ctl(&["get", "scc"], "").stderr, "No resources found\n");
}
