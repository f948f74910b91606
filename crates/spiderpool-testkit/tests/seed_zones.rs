//! End to end: the seed's two network zones, run by `examples/seed-zones/run.sh` exactly as a
//! user runs it (network namespaces as hosts and pods, Debian's macvlan plugin driving the real
//! `spiderpool` binary, one agent per node, one SQLite datastore), checked from its output.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use spiderpool_testkit::{bin_dir, run};

/// The seed's runs share names (the nodes' network namespaces are named after the seed's
/// nodes): one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this machine can run network-namespace tests; says why not otherwise. With
/// SPIDERPOOL_E2E_REQUIRED=1 (CI) a missing prerequisite is a failure, not a skip.
fn e2e_prerequisites() -> bool {
    spiderpool_testkit::netns_prerequisites(&["macvlan"])
}

/// Asserts that none of `names` is a network namespace any more.
fn no_netns_left(names: &[&str]) {
    let netns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    for ns in names {
        assert!(
            !netns
                .lines()
                .any(|l| l.split_whitespace().next() == Some(*ns)),
            "{ns} left behind: {netns}"
        );
    }
}

/// The lines of one `## title` section of the script's output.
fn section<'a>(out: &'a str, title: &str) -> Vec<&'a str> {
    out.split("\n## ")
        .find(|s| s.starts_with(title))
        .unwrap_or_else(|| panic!("no section {title:?} in:\n{out}"))
        .lines()
        .skip(1)
        .collect()
}

/// A kubectl-style table as rows of NAME -> column -> value.
fn table(lines: &[&str]) -> BTreeMap<String, BTreeMap<String, String>> {
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    lines[1..]
        .iter()
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            let row = header
                .iter()
                .zip(&cells)
                .map(|(h, c)| (h.to_string(), c.to_string()))
                .collect();
            (cells[0].to_string(), row)
        })
        .collect()
}

fn in_range(ip: &str, first: &str, last: &str) -> bool {
    let ip: Ipv4Addr = ip.parse().unwrap();
    ip >= first.parse::<Ipv4Addr>().unwrap() && ip <= last.parse::<Ipv4Addr>().unwrap()
}

#[test]
fn seed_two_zones_end_to_end() {
    let _one_at_a_time = serial();
    if !e2e_prerequisites() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed-zones/run.sh");
    let out = run(
        Command::new("bash")
            .arg(&script)
            .env("SPIDERPOOL_BIN_DIR", bin_dir()),
        "",
    );
    assert!(
        out.success,
        "the seed example failed:\n{}\n{}",
        out.stdout, out.stderr
    );
    let stdout = &out.stdout;

    // Each pod's address lies in its zone's pool.
    let pods = table(&section(stdout, "pods: ADD"));
    let a = &pods["test-app-j9ftl"];
    let b = &pods["test-app-nkq5h"];
    assert_eq!(a["NODE"], "controller-node-1");
    assert_eq!(b["NODE"], "worker-node-1");
    assert!(
        in_range(&a["IP"], "10.6.168.60", "10.6.168.69"),
        "zone-6 pod got {}",
        a["IP"]
    );
    assert!(
        in_range(&b["IP"], "10.7.168.60", "10.7.168.69"),
        "zone-7 pod got {}",
        b["IP"]
    );

    // The pools show 1 allocated of 10.
    let pools = table(&section(stdout, "spiderpoolctl get spiderippool\n"));
    for p in ["test-ippool-6", "test-ippool-7"] {
        assert_eq!(pools[p]["ALLOCATED-IP-COUNT"], "1", "{p}");
        assert_eq!(pools[p]["TOTAL-IP-COUNT"], "10", "{p}");
        assert_eq!(pools[p]["DISABLE"], "false", "{p}");
    }
    let subnets = table(&section(stdout, "spiderpoolctl get spidersubnet"));
    assert_eq!(subnets["subnet-6"]["TOTAL-IP-COUNT"], "10");

    // The endpoints record which pool each address came from.
    let eps = section(stdout, "spiderpoolctl get spiderendpoint");
    assert!(
        eps.iter()
            .any(|l| l.contains("test-app-j9ftl") && l.contains("test-ippool-6")),
        "{eps:?}"
    );
    assert!(
        eps.iter()
            .any(|l| l.contains("test-app-nkq5h") && l.contains("test-ippool-7")),
        "{eps:?}"
    );

    // The cross-zone ping answers, one routed hop away.
    let ping = section(stdout, "ping from").join("\n");
    assert!(
        ping.contains(&format!("from {}: icmp_seq=1 ttl=63", b["IP"])),
        "{ping}"
    );
    assert!(ping.contains("2 received, 0% packet loss"), "{ping}");
    // The NAD's `veth` (the coordinator) after macvlan: the pod reaches its own node (which
    // macvlan alone cannot) and the Service CIDR through veth0.
    let routes = section(stdout, "routes in").join("\n");
    assert!(
        routes.contains("10.6.168.71 dev veth0 scope link")
            && routes.contains("10.233.0.0/18 via 10.6.168.71 dev veth0"),
        "{routes}"
    );
    let to_node = section(stdout, "ping from test-app-j9ftl to its node").join("\n");
    assert!(
        to_node.contains("from 10.6.168.71: icmp_seq=1 ttl=64"),
        "{to_node}"
    );

    // After DEL both pools show 0 allocated.
    let after = table(&section(
        stdout,
        "spiderpoolctl get spiderippool (after DEL)",
    ));
    for p in ["test-ippool-6", "test-ippool-7"] {
        assert_eq!(after[p]["ALLOCATED-IP-COUNT"], "0", "{p} after DEL");
    }
    assert!(stdout.ends_with("## done\n"));

    // Nothing is left behind.
    no_netns_left(&[
        "sp-router",
        "controller-node-1",
        "worker-node-1",
        "test-app-j9ftl",
        "test-app-nkq5h",
    ]);
}

/// A table kubectl printed, as rows of NAME -> column -> value; cells are cut at the header's
/// column starts (kubectl leaves empty cells blank).
fn kubectl_table(lines: &[&str]) -> BTreeMap<String, BTreeMap<String, String>> {
    let header = lines[0];
    let mut starts: Vec<(usize, &str)> = Vec::new();
    let mut at = 0;
    for name in header.split_whitespace() {
        let i = header[at..].find(name).unwrap() + at;
        starts.push((i, name));
        at = i + name.len();
    }
    lines[1..]
        .iter()
        .map(|l| {
            let mut row: BTreeMap<String, String> = BTreeMap::new();
            for (k, (i, name)) in starts.iter().enumerate() {
                let end = starts
                    .get(k + 1)
                    .map_or(l.len(), |(j, _)| (*j).min(l.len()));
                let cell = l.get((*i).min(l.len())..end).unwrap_or("").trim();
                // The first of two columns with one word in common ("NOMINATED NODE") wins.
                row.entry(name.to_string())
                    .or_insert_with(|| cell.to_string());
            }
            (row["NAME"].clone(), row)
        })
        .collect()
}

#[test]
fn seed_two_zones_on_kubernetes() {
    let _one_at_a_time = serial();
    if let Some(stdout) = seed_on_kubernetes(&[]) {
        seed_outputs_on_kubernetes(&stdout);
    }
}

#[test]
fn seed_two_zones_on_kubernetes_with_the_nad_from_a_spidermultusconfig() {
    let _one_at_a_time = serial();
    let Some(stdout) = seed_on_kubernetes(&["--smc"]) else {
        return;
    };
    // The controller generated the seed's chain from the SMC: macvlan on ens192 with
    // spiderpool IPAM, then the coordinator (the seed's `veth` under upstream's name).
    let smcs = kubectl_table(&section(
        &stdout,
        "kubectl get spidermultusconfig -n kube-system\n",
    ));
    assert_eq!(smcs["macvlan-conf"]["CNITYPE"], "macvlan", "{stdout}");
    let config: serde_json::Value = serde_json::from_str(
        section(&stdout, "the generated NAD's config\n")
            .first()
            .expect("the NAD's config"),
    )
    .unwrap();
    assert_eq!(
        config,
        serde_json::json!({"cniVersion": "0.3.1", "name": "macvlan-conf", "plugins": [
            {"type": "macvlan", "master": "ens192", "mode": "bridge", "mtu": 0,
             "ipam": {"type": "spiderpool"}},
            {"type": "coordinator", "mode": "auto", "tunePodRoutes": true, "txQueueLen": 0}]})
    );
    // The same outputs as with the seed's own NAD.
    seed_outputs_on_kubernetes(&stdout);
}

/// The stdout of `run.sh --kubernetes ARGS`, which must succeed; `None` when the machine cannot
/// run it.
fn seed_on_kubernetes(args: &[&str]) -> Option<String> {
    if !e2e_prerequisites() {
        return None;
    }
    let kube_bin = spiderpool_testkit::kube_bin()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed-zones/run.sh");
    let out = run(
        Command::new("bash")
            .arg(&script)
            .arg("--kubernetes")
            .args(args)
            .env("SPIDERPOOL_BIN_DIR", bin_dir())
            .env("SPIDERPOOL_KUBE_BIN", &kube_bin),
        "",
    );
    assert!(
        out.success,
        "the seed example on Kubernetes {args:?} failed:\n{}\n{}",
        out.stdout, out.stderr
    );
    Some(out.stdout)
}

/// What the seed's run on Kubernetes shows, whichever wrote its NAD.
fn seed_outputs_on_kubernetes(stdout: &str) {
    // The subnets as the seed shows them, their ten addresses now given to the pools (the
    // controller keeps the counts).
    let subnets = kubectl_table(&section(stdout, "kubectl get spidersubnet\n"));
    for s in ["subnet-6", "subnet-7"] {
        assert_eq!(subnets[s]["VERSION"], "4", "{s}: {stdout}");
        assert_eq!(subnets[s]["TOTAL-IP-COUNT"], "10", "{s}: {stdout}");
        assert_eq!(subnets[s]["ALLOCATED-IP-COUNT"], "10", "{s}: {stdout}");
    }
    // kubectl's own tables: one of ten allocated in each pool, with the seed's columns.
    let pools = kubectl_table(&section(stdout, "kubectl get spiderippool\n"));
    for p in ["test-ippool-6", "test-ippool-7"] {
        assert_eq!(pools[p]["ALLOCATED-IP-COUNT"], "1", "{p}: {stdout}");
        assert_eq!(pools[p]["TOTAL-IP-COUNT"], "10", "{p}");
        assert_eq!(pools[p]["DEFAULT"], "false", "{p}");
        assert_eq!(pools[p]["DISABLE"], "false", "{p}");
        // Filled in by the controller's mutating webhook, as in the seed document.
        assert_eq!(pools[p]["VERSION"], "4", "{p}");
    }
    // The DaemonSet's pods, one per node, each with its zone's address.
    let pods = kubectl_table(&section(stdout, "kubectl get pod -o wide"));
    assert_eq!(pods.len(), 2, "{stdout}");
    let by_node: BTreeMap<&str, &BTreeMap<String, String>> =
        pods.values().map(|p| (p["NODE"].as_str(), p)).collect();
    let a = by_node["controller-node-1"];
    let b = by_node["worker-node-1"];
    for p in [a, b] {
        assert!(p["NAME"].starts_with("test-app-"), "{p:?}");
        assert_eq!(p["STATUS"], "Running", "{p:?}");
    }
    assert!(in_range(&a["IP"], "10.6.168.60", "10.6.168.69"), "{a:?}");
    assert!(in_range(&b["IP"], "10.7.168.60", "10.7.168.69"), "{b:?}");
    let eps = kubectl_table(&section(stdout, "kubectl get spiderendpoint"));
    assert_eq!(eps[&a["NAME"]]["IPV4POOL"], "test-ippool-6");
    assert_eq!(eps[&b["NAME"]]["IPV4"], format!("{}/16", b["IP"]));
    // Across the zones, one routed hop.
    let ping = section(stdout, "ping from").join("\n");
    assert!(
        ping.contains(&format!("from {}: icmp_seq=1 ttl=63", b["IP"])),
        "{ping}"
    );
    // The NAD's `veth` (the coordinator): the pod reaches its node and the Service CIDR
    // through veth0; the node answers directly (ttl 64), not through the router.
    let routes = section(stdout, "routes in").join("\n");
    assert!(
        routes.contains("10.233.0.0/18 via 10.6.0.2 dev veth0")
            && routes.contains("10.6.0.2 dev veth0 scope link"),
        "{routes}"
    );
    let to_node = section(stdout, &format!("ping from {} to its node", a["NAME"])).join("\n");
    assert!(
        to_node.contains("from 10.6.0.2: icmp_seq=1 ttl=64"),
        "{to_node}"
    );
    // The seed's conclusion, clusterIP and nodePort: a Service whose only endpoint is the pod
    // on worker-node-1 (its EndpointSlice from the real controller-manager), asked from the
    // pod on controller-node-1 through each node's real kube-proxy. The simulated nginx
    // answers with its pod's name.
    let slice = section(stdout, "Service test-app-worker").join("\n");
    assert!(slice.contains(&format!("{} ", b["IP"])), "{slice}");
    let answers = [
        format!("curl from {} to the ClusterIP http://10.233.", a["NAME"]),
        format!(
            "curl from {} to the NodePort of controller-node-1 http://10.6.0.2:",
            a["NAME"]
        ),
        format!(
            "curl from {} to the NodePort of worker-node-1 http://10.7.0.2:",
            a["NAME"]
        ),
    ];
    for title in &answers {
        assert_eq!(
            section(stdout, title),
            [b["NAME"].as_str()],
            "{title}: {stdout}"
        );
    }
    // Deleting the DaemonSet frees both addresses.
    let after = kubectl_table(&section(
        stdout,
        "kubectl get spiderippool (after the DaemonSet is gone)",
    ));
    for p in ["test-ippool-6", "test-ippool-7"] {
        assert_eq!(
            after[p]["ALLOCATED-IP-COUNT"], "0",
            "{p} after the DaemonSet"
        );
    }
    assert!(stdout.ends_with("## done\n"));
    no_netns_left(&["spk-router", "spk-cn1", "spk-wn1"]);
}

#[test]
fn seed_two_zones_on_real_nodes() {
    let _one_at_a_time = serial();
    if !e2e_prerequisites() {
        return;
    }
    if let Some(why) = spiderpool_testkit::real_node::real_nodes_missing() {
        assert!(
            std::env::var("SPIDERPOOL_E2E_REQUIRED").as_deref() != Ok("1"),
            "{why}"
        );
        eprintln!("SKIPPED: {why}");
        return;
    }
    let Some(helm_bin) = spiderpool_testkit::helm_bin() else {
        return;
    };
    let before = spiderpool_testkit::real_node::Footprint::now();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed-zones/run.sh");
    let out = run(
        Command::new("bash")
            .arg(&script)
            .arg("--real-nodes")
            .env("SPIDERPOOL_BIN_DIR", bin_dir())
            .env(
                "SPIDERPOOL_KUBE_BIN",
                spiderpool_testkit::kube_bin().expect("checked"),
            )
            .env("SPIDERPOOL_HELM_BIN", &helm_bin),
        "",
    );
    assert!(
        out.success,
        "the seed example on real nodes failed:\n{}\n{}",
        out.stdout, out.stderr
    );
    let stdout = &out.stdout;
    // Real kubelets registered the nodes, with the seed's labels.
    let nodes = kubectl_table(&section(stdout, "control plane and real nodes"));
    assert_eq!(nodes["controller-node-1"]["STATUS"], "Ready", "{stdout}");
    assert_eq!(
        nodes["worker-node-1"]["NODE-SUBNET"], "subnet-7",
        "{stdout}"
    );
    assert!(nodes["worker-node-1"]["CONTAINER-RUNTIME"].starts_with("containerd://"));
    // The chart's init container installed the plugins into the node's CNI bin dir.
    let plugins = section(stdout, "the plugins the agent's init container installed");
    assert_eq!(plugins, ["coordinator", "spiderpool", "veth"], "{stdout}");
    let pools = kubectl_table(&section(stdout, "kubectl get spiderippool\n"));
    for p in ["test-ippool-6", "test-ippool-7"] {
        assert_eq!(pools[p]["ALLOCATED-IP-COUNT"], "1", "{p}: {stdout}");
        assert_eq!(pools[p]["TOTAL-IP-COUNT"], "10", "{p}");
        assert_eq!(pools[p]["VERSION"], "4", "{p}");
    }
    let pods = kubectl_table(&section(stdout, "kubectl get pod -o wide"));
    assert_eq!(pods.len(), 2, "{stdout}");
    let by_node: BTreeMap<&str, &BTreeMap<String, String>> =
        pods.values().map(|p| (p["NODE"].as_str(), p)).collect();
    let a = by_node["controller-node-1"];
    let b = by_node["worker-node-1"];
    for p in [a, b] {
        assert_eq!(p["STATUS"], "Running", "{p:?}");
        assert_eq!(p["READY"], "1/1", "{p:?}");
    }
    assert!(in_range(&a["IP"], "10.6.168.60", "10.6.168.69"), "{a:?}");
    assert!(in_range(&b["IP"], "10.7.168.60", "10.7.168.69"), "{b:?}");
    // kubectl exec in the pod on controller-node-1: one routed hop to the other zone.
    let ping = section(stdout, &format!("kubectl exec {} -- ping", a["NAME"])).join("\n");
    assert!(
        ping.contains(&format!("from {}: seq=0 ttl=63", b["IP"])),
        "{ping}"
    );
    // ClusterIP and each node's NodePort, answered by the pod on worker-node-1.
    for title in [
        format!("wget from {} to the ClusterIP http://10.233.", a["NAME"]),
        format!(
            "wget from {} to the NodePort of controller-node-1 http://10.6.0.2:",
            a["NAME"]
        ),
        format!(
            "wget from {} to the NodePort of worker-node-1 http://10.7.0.2:",
            a["NAME"]
        ),
    ] {
        assert_eq!(
            section(stdout, &title),
            [b["NAME"].as_str()],
            "{title}: {stdout}"
        );
    }
    let after = kubectl_table(&section(
        stdout,
        "kubectl get spiderippool (after the DaemonSet is gone)",
    ));
    for p in ["test-ippool-6", "test-ippool-7"] {
        assert_eq!(
            after[p]["ALLOCATED-IP-COUNT"], "0",
            "{p} after the DaemonSet"
        );
    }
    assert!(stdout.ends_with("## done\n"));
    assert_eq!(
        before,
        spiderpool_testkit::real_node::Footprint::now(),
        "the real nodes left something behind"
    );
}
