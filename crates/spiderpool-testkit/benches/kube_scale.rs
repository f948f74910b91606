//! Kubernetes mode at 5,000 pods: 50 simulated nodes, each with its agent on
//! `--datastore kubernetes`, five SpiderIPPools inside one SpiderSubnet, and a
//! `spiderpool-controller` (webhooks, finalizers, reclaim) as its own ServiceAccount. The pods
//! are created through the API server at once, each naming one of the five pools, and then
//! deleted at once. Reported: time until all are set up and ADD p50/p99, duplicates and leaks,
//! the agents' and the controller's API requests per pod (from the API server's audit log),
//! and the agents' and controller's peak RSS. The baseline in the same run: the same pods on
//! the same nodes with Debian's host-local IPAM (what pod creation, the simulator and process
//! start cost alone).
//!
//! cargo build --release --workspace --bins && cargo bench -p spiderpool-testkit --bench kube_scale
//!
//! `SPIDERPOOL_SCALE_PODS` and `SPIDERPOOL_SCALE_NODES` change the size (default 5,000 and 50).

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spiderpool_testkit::burst::{self, create_pods, delete_pods, ms, peak_rss_kib};
use spiderpool_testkit::scale::{controller, CONTROLLER_USER};
use spiderpool_testkit::{
    bin, is_root, kube_bin, Agent, ControlPlane, ControlPlaneOptions, NodeSim, NodeSpec,
};

const POOLS: usize = 5;

type Requests = BTreeMap<(String, String), u64>;

/// One agent binary's run.
struct Row {
    label: String,
    sp: burst::Burst,
    duplicates: usize,
    recorded: u64,
    gone: Duration,
    empty: Duration,
    leaked: u64,
    endpoints_left: usize,
    /// Agents' and controller's requests before ADD, after ADD, after DEL.
    requests: [Requests; 6],
    /// The agents' peak RSS in KiB.
    rss: Vec<u64>,
}
const AGENT_USER: &str = "spiderpool-agent";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn nad(name: &str, plugin: Value) -> String {
    json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"config": json!({"cniVersion": "1.0.0", "name": name, "plugins": [plugin]}).to_string()}})
    .to_string()
}

/// Pool `k`'s range: `size` addresses from 10.6.(32k+1).0, inside the subnet 10.6.0.0/16.
fn pool_range(k: usize, size: usize) -> String {
    let first = u32::from(Ipv4Addr::new(10, 6, (32 * k + 1) as u8, 0));
    let last = first + size as u32 - 1;
    format!("{}-{}", Ipv4Addr::from(first), Ipv4Addr::from(last))
}

/// All requests in `after` that `before` did not have.
fn requests(
    before: &BTreeMap<(String, String), u64>,
    after: &BTreeMap<(String, String), u64>,
) -> u64 {
    after
        .values()
        .sum::<u64>()
        .saturating_sub(before.values().sum::<u64>())
}

/// The requests in `after` beyond `before`, by verb and resource, largest first.
fn breakdown(
    before: &BTreeMap<(String, String), u64>,
    after: &BTreeMap<(String, String), u64>,
) -> String {
    let mut rows: Vec<(u64, String)> = after
        .iter()
        .map(|(k, n)| {
            (
                n.saturating_sub(before.get(k).copied().unwrap_or(0)),
                format!("{} {}", k.0, k.1),
            )
        })
        .filter(|(n, _)| *n > 0)
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    rows.iter()
        .take(8)
        .map(|(n, k)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    let Some(kbin) = kube_bin() else {
        eprintln!("SKIPPED: no control plane (SPIDERPOOL_KUBE_BIN)");
        return;
    };
    if !is_root() {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let pods = env_or("SPIDERPOOL_SCALE_PODS", 5000);
    let nodes = env_or("SPIDERPOOL_SCALE_NODES", 50);
    let pool_size = pods / POOLS + 100;
    let cp = ControlPlane::start_with(
        &kbin,
        ControlPlaneOptions {
            audit: true,
            ..Default::default()
        },
    );
    cp.install_crds();
    let dir = tempfile::tempdir().unwrap();
    let ctl = controller(&cp, dir.path(), "scale-c");
    cp.kubectl_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderSubnet",
            "metadata": {"name": "scale"},
            "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.0.1-10.6.255.254"]}})
        .to_string(),
    );
    for k in 0..POOLS {
        cp.kubectl_ok(
            &["apply", "-f", "-"],
            &json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
                "metadata": {"name": format!("scale-{k}")},
                "spec": {"subnet": "10.6.0.0/16", "ips": [pool_range(k, pool_size)]}})
            .to_string(),
        );
    }
    let cni = dir.path().join("cni-bin");
    std::fs::create_dir_all(&cni).unwrap();
    std::os::unix::fs::symlink("/usr/lib/cni/host-local", cni.join("host-local")).unwrap();
    std::os::unix::fs::symlink(bin("spiderpool"), cni.join("spiderpool")).unwrap();
    // One network per node: its plugins reach that node's agent (a real node has one agent at
    // the default socket path; fifty on one machine need fifty paths).
    for i in 0..nodes {
        let socket = dir.path().join(format!("node-{i}/spiderpool.sock"));
        cp.kubectl_ok(
            &["apply", "-f", "-"],
            &nad(&format!("hl-{i}"), json!({"type": "host-local", "ipam": {"type": "host-local",
                "ranges": [[{"subnet": "10.7.0.0/16"}]], "dataDir": dir.path().join("host-local")}})),
        );
        cp.kubectl_ok(
            &["apply", "-f", "-"],
            &nad(
                &format!("sp-{i}"),
                json!({"type": "spiderpool", "ipam": {"type": "spiderpool",
                    "ipam_unix_socket_path": socket}}),
            ),
        );
    }
    let sims: Vec<NodeSim> = (0..nodes)
        .map(|i| {
            let node = format!("node-{i}");
            std::fs::create_dir_all(dir.path().join(&node)).unwrap();
            NodeSim::start(
                &cp.kubeconfig,
                NodeSpec {
                    name: node,
                    labels: Default::default(),
                    host_netns: None,
                    cni_path: vec![cni.clone()],
                    default_network: json!({}),
                    run_dir: None,
                },
            )
        })
        .collect();
    // The agents as a user of their own, so the audit log tells their requests apart.
    let agent_kc = cp.client_kubeconfig(AGENT_USER, &["system:masters"]);
    let agent_kc = agent_kc.to_str().unwrap();
    let start_agents = |binary: &Path| -> Vec<Agent> {
        (0..nodes)
            .map(|i| {
                let node = format!("node-{i}");
                Agent::start_bin(
                    binary,
                    "kubernetes",
                    &dir.path().join(&node).join("spiderpool.sock"),
                    &node,
                    "",
                    &["--kubeconfig", agent_kc],
                    None,
                )
            })
            .collect()
    };
    // Other agents (SPIDERPOOL_BASELINE_AGENT, paths separated by ':') measured in the same run
    // on the same sockets, after this build's.
    let mut variants = vec![(
        bin("spiderpool-agent"),
        "spiderpool, kubernetes".to_string(),
    )];
    for b in std::env::var_os("SPIDERPOOL_BASELINE_AGENT")
        .map(|v| std::env::split_paths(&v).collect::<Vec<PathBuf>>())
        .unwrap_or_default()
    {
        let label = format!("agent {}", b.display());
        variants.push((b, label));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(burst::client(&cp.kubeconfig));
    let pod = |label: &'static str, network: &'static str| {
        move |i: usize| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("{label}-{i}"), "labels": {"bench": label},
                    "annotations": {
                        "v1.multus-cni.io/default-network": format!("default/{network}-{}", i % nodes),
                        "ipam.spidernet.io/ippool": json!({"ipv4": [format!("scale-{}", i % POOLS)]}).to_string()}},
                "spec": {"nodeName": format!("node-{}", i % nodes),
                    "containers": [{"name": "c", "image": "registry.invalid/c"}]}
            })
        }
    };
    let limit = Duration::from_secs(900);
    let allocated = || -> u64 {
        let list: Value =
            serde_json::from_str(&cp.kubectl_ok(&["get", "spiderippools", "-o", "json"], ""))
                .unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["status"]["allocatedIPCount"].as_u64().unwrap_or(0))
            .sum()
    };

    // The floor: host-local.
    let base = rt.block_on(create_pods(&client, &sims, pods, limit, pod("hl", "hl")));
    let t = Instant::now();
    rt.block_on(delete_pods(&client, "bench=hl", limit));
    let base_del = t.elapsed();

    // The project, with each agent binary.
    let mut rows = Vec::new();
    for (binary, label) in &variants {
        let agents = start_agents(binary);
        let (a0, c0) = (cp.requests_by(AGENT_USER), cp.requests_by(CONTROLLER_USER));
        let sp = rt.block_on(create_pods(&client, &sims, pods, limit, pod("sp", "sp")));
        let (a1, c1) = (cp.requests_by(AGENT_USER), cp.requests_by(CONTROLLER_USER));
        let list: Value = serde_json::from_str(
            &cp.kubectl_ok(&["get", "pods", "-l", "bench=sp", "-o", "json"], ""),
        )
        .unwrap();
        let ips: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["status"]["podIP"].as_str())
            .collect();
        let unique: HashSet<&&str> = ips.iter().collect();
        let duplicates = ips.len() - unique.len();
        let recorded = allocated();
        let t = Instant::now();
        rt.block_on(delete_pods(&client, "bench=sp", limit));
        let gone = t.elapsed();
        let deadline = Instant::now() + Duration::from_secs(300);
        let leaked = loop {
            let n = allocated();
            if n == 0 || Instant::now() > deadline {
                break n;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let empty = t.elapsed();
        let endpoints_left = cp
            .kubectl_ok(&["get", "spiderendpoints", "-A", "-o", "name"], "")
            .lines()
            .count();
        let (a2, c2) = (cp.requests_by(AGENT_USER), cp.requests_by(CONTROLLER_USER));
        let rss: Vec<u64> = agents.iter().map(|a| peak_rss_kib(a.pid())).collect();
        drop(agents);
        rows.push(Row {
            label: label.clone(),
            sp,
            duplicates,
            recorded,
            gone,
            empty,
            leaked,
            endpoints_left,
            requests: [a0, c0, a1, c1, a2, c2],
            rss,
        });
    }
    let ctl_rss = peak_rss_kib(ctl.pid());

    println!("{pods} pods, {nodes} simulated nodes, {POOLS} pools of {pool_size} inside one SpiderSubnet");
    println!("| run | all set up | ADD p50 | ADD p99 | failed | duplicates | recorded | DEL: pods gone | DEL: pools empty | leaked | endpoints left |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| host-local (baseline) | {:.2} s | {} | {} | {} | - | - | {:.2} s | - | - | - |",
        base.all.as_secs_f64(),
        ms(base.p50),
        ms(base.p99),
        base.failed,
        base_del.as_secs_f64()
    );
    for r in &rows {
        println!(
            "| {} | {:.2} s | {} | {} | {} | {} | {} | {:.2} s | {:.2} s | {} | {} |",
            r.label,
            r.sp.all.as_secs_f64(),
            ms(r.sp.p50),
            ms(r.sp.p99),
            r.sp.failed,
            r.duplicates,
            r.recorded,
            r.gone.as_secs_f64(),
            r.empty.as_secs_f64(),
            r.leaked,
            r.endpoints_left,
        );
    }
    let per_pod = |n: u64| n as f64 / pods as f64;
    for r in &rows {
        let [a0, c0, a1, c1, a2, c2] = &r.requests;
        println!("{}:", r.label);
        println!(
            "  ratio to host-local: all set up {:.2}, pools empty after delete {:.2}",
            r.sp.all.as_secs_f64() / base.all.as_secs_f64(),
            r.empty.as_secs_f64() / base_del.as_secs_f64()
        );
        println!(
            "  API requests per pod: agents {:.2} (ADD) + {:.2} (DEL), controller {:.2} (ADD) + {:.2} (DEL)",
            per_pod(requests(a0, a1)),
            per_pod(requests(a1, a2)),
            per_pod(requests(c0, c1)),
            per_pod(requests(c1, c2)),
        );
        println!("    agents, ADD: {}", breakdown(a0, a1));
        println!("    agents, DEL: {}", breakdown(a1, a2));
        println!("    controller, ADD: {}", breakdown(c0, c1));
        println!("    controller, DEL: {}", breakdown(c1, c2));
        println!(
            "  peak RSS: agents max {} KiB, mean {} KiB",
            r.rss.iter().max().unwrap(),
            r.rss.iter().sum::<u64>() / r.rss.len() as u64,
        );
    }
    println!("controller peak RSS over the whole run: {ctl_rss} KiB");
    for r in &rows {
        assert_eq!(r.duplicates, 0, "{}: no address twice", r.label);
        assert_eq!(
            r.recorded, pods as u64,
            "{}: the pools record every pod",
            r.label
        );
        assert_eq!(r.leaked, 0, "{}: no address leaked", r.label);
    }
    drop(sims);
}
