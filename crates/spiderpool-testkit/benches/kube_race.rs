//! Kubernetes mode at scale: 1,000 pods created through the API server on 10 simulated nodes,
//! one pool of exactly 1,000 addresses, each node with its agent on `--datastore kubernetes`
//! and each pod's ADD a real `spiderpool` process run by the node simulator. The baseline in
//! the same run: the same 1,000 pods on the same nodes with Debian's host-local IPAM (no
//! datastore at all), which is what pod creation, the simulator and process start cost alone.
//!
//! cargo build --release --workspace --bins && cargo bench -p spiderpool-testkit --bench kube_race

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spiderpool_testkit::burst::{create_pods, delete_pods, ms, Burst};
use spiderpool_testkit::{bin, is_root, kube_bin, Agent, ControlPlane, NodeSim, NodeSpec};

const NODES: usize = 10;
const PODS: usize = 1000;
const POOL_1000: &str = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: race}\nspec:\n  subnet: 10.6.0.0/16\n  ips: [10.6.1.0-10.6.4.231]\n";

fn nad(name: &str, plugin: Value) -> String {
    json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"config": json!({"cniVersion": "1.0.0", "name": name, "plugins": [plugin]}).to_string()}})
    .to_string()
}

fn metric(body: &str, name: &str) -> u64 {
    spiderpool_testkit::sample(body, name) as u64
}

/// Creates the pods (naming `network`), waits until every one has been set up.
async fn phase(
    label: &'static str,
    client: &kube::Client,
    sims: &[NodeSim],
    network: &str,
) -> Burst {
    create_pods(client, sims, PODS, Duration::from_secs(300), |i| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{label}-{i}"), "labels": {"bench": label},
                "annotations": {"v1.multus-cni.io/default-network": format!("default/{network}-{}", i % NODES)}},
            "spec": {"nodeName": format!("node-{}", i % NODES),
                "containers": [{"name": "c", "image": "registry.invalid/c"}]}
        })
    })
    .await
}

async fn delete_all(client: &kube::Client, label: &str) {
    delete_pods(client, &format!("bench={label}"), Duration::from_secs(300)).await
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
    let cp = ControlPlane::start(&kbin, false);
    cp.install_crds();
    cp.kubectl_ok(&["apply", "-f", "-"], POOL_1000);
    let dir = tempfile::tempdir().unwrap();
    // SPIDERPOOL_BENCH_KEEP=1 keeps the agents' logs (node-N/spiderpool.log) for reading after.
    let keep = std::env::var_os("SPIDERPOOL_BENCH_KEEP").is_some();
    if keep {
        eprintln!("keeping {}", dir.path().display());
    }
    let cni = dir.path().join("cni-bin");
    std::fs::create_dir_all(&cni).unwrap();
    std::os::unix::fs::symlink("/usr/lib/cni/host-local", cni.join("host-local")).unwrap();
    std::os::unix::fs::symlink(bin("spiderpool"), cni.join("spiderpool")).unwrap();
    // One network per node: its plugins reach that node's agent (a real node has one agent
    // at the default socket path; ten on one machine need ten paths).
    for i in 0..NODES {
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
                "default_ipv4_ippool": ["race"], "ipam_unix_socket_path": socket}}),
            ),
        );
    }
    let kc = cp.kubeconfig.to_str().unwrap().to_string();
    let mut sims = Vec::new();
    for i in 0..NODES {
        let node = format!("node-{i}");
        let run = dir.path().join(&node);
        std::fs::create_dir_all(&run).unwrap();
        sims.push(NodeSim::start(
            &cp.kubeconfig,
            NodeSpec {
                name: node.clone(),
                labels: Default::default(),
                host_netns: None,
                cni_path: vec![cni.clone()],
                default_network: json!({}),
                run_dir: None,
            },
        ));
    }
    // The agents, from this build or (SPIDERPOOL_BASELINE_AGENT) another one on the same
    // sockets, so old and new code are measured in one run.
    let start_agents = |binary: &Path| -> Vec<(Agent, String)> {
        (0..NODES)
            .map(|i| {
                let node = format!("node-{i}");
                let metrics = format!("127.0.0.1:{}", spiderpool_testkit::free_port());
                let agent = Agent::start_bin(
                    binary,
                    "kubernetes",
                    &dir.path().join(&node).join("spiderpool.sock"),
                    &node,
                    "",
                    &["--kubeconfig", &kc, "--metrics-addr", &metrics],
                    None,
                );
                (agent, metrics)
            })
            .collect()
    };
    let this_agent = bin("spiderpool-agent");
    // Several baselines: paths separated by ':'.
    let baseline_agents: Vec<PathBuf> = std::env::var_os("SPIDERPOOL_BASELINE_AGENT")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(spiderpool_testkit::burst::client(&cp.kubeconfig));
    let rounds: usize = std::env::var("SPIDERPOOL_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let pool_count = || -> u64 {
        let pool: Value = serde_json::from_str(
            &cp.kubectl_ok(&["get", "spiderippool", "race", "-o", "json"], ""),
        )
        .unwrap();
        pool["status"]["allocatedIPCount"].as_u64().unwrap_or(0)
    };
    println!("| run | all {PODS} set up | ADD p50 | ADD p99 | failed | pool status writes / alloc | 409s | endpoint writes | duplicates | DEL: pods gone | DEL: pool empty | pool status writes / release | 409s / release | leaked |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for round in 0..rounds {
        let base = rt.block_on(phase("hl", &client, &sims, "hl"));
        let t = Instant::now();
        rt.block_on(delete_all(&client, "hl"));
        let base_del = t.elapsed();
        println!(
            "| host-local (baseline), round {} | {:.2} s | {} | {} | {} | - | - | - | - | {:.2} s | - | - | - | - |",
            round + 1,
            base.all.as_secs_f64(),
            ms(base.p50),
            ms(base.p99),
            base.failed,
            base_del.as_secs_f64()
        );
        let mut builds: Vec<(String, PathBuf)> =
            vec![("spiderpool, kubernetes".into(), this_agent.clone())];
        for old in &baseline_agents {
            builds.push((
                format!("spiderpool, kubernetes, baseline agent {}", old.display()),
                old.clone(),
            ));
        }
        for (name, binary) in builds {
            let agents = start_agents(&binary);
            let counts = |agents: &[(Agent, String)]| {
                agents.iter().fold((0, 0, 0), |(w, c, o), (_, m)| {
                    let (_, body) = spiderpool_testkit::http_get(m, "/metrics");
                    (
                        w + metric(&body, "spiderpool_agent_datastore_pool_writes_total"),
                        c + metric(
                            &body,
                            "spiderpool_agent_datastore_pool_write_conflicts_total",
                        ),
                        o + metric(&body, "spiderpool_agent_datastore_object_writes_total"),
                    )
                })
            };
            let (w0, c0, o0) = counts(&agents);
            let sp = rt.block_on(phase("sp", &client, &sims, "sp"));
            let (w1, c1, o1) = counts(&agents);
            // No address twice: the pool's records and the pods' addresses.
            let pool: Value = serde_json::from_str(
                &cp.kubectl_ok(&["get", "spiderippool", "race", "-o", "json"], ""),
            )
            .unwrap();
            let records: serde_json::Map<String, Value> =
                serde_json::from_str(pool["status"]["allocatedIPs"].as_str().unwrap_or("{}"))
                    .unwrap();
            let pods: Value = serde_json::from_str(
                &cp.kubectl_ok(&["get", "pods", "-l", "bench=sp", "-o", "json"], ""),
            )
            .unwrap();
            let ips: Vec<&str> = pods["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|p| p["status"]["podIP"].as_str())
                .collect();
            let unique: HashSet<&&str> = ips.iter().collect();
            let duplicates = ips.len() - unique.len();
            assert_eq!(records.len(), PODS, "the pool records every pod");
            let t = Instant::now();
            rt.block_on(delete_all(&client, "sp"));
            let gone = t.elapsed();
            let deadline = Instant::now() + Duration::from_secs(120);
            let leaked = loop {
                let n = pool_count();
                if n == 0 || Instant::now() > deadline {
                    break n;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let empty = t.elapsed();
            let (w2, c2, _) = counts(&agents);
            println!(
                "| {name}, round {} | {:.2} s | {} | {} | {} | {:.3} | {} | {} | {duplicates} | {:.2} s | {:.2} s | {:.3} | {:.3} | {leaked} |",
                round + 1,
                sp.all.as_secs_f64(),
                ms(sp.p50),
                ms(sp.p99),
                sp.failed,
                (w1 - w0) as f64 / PODS as f64,
                c1 - c0,
                o1 - o0,
                gone.as_secs_f64(),
                empty.as_secs_f64(),
                (w2 - w1) as f64 / PODS as f64,
                (c2 - c1) as f64 / PODS as f64,
            );
            println!(
                "ratio ({name} / host-local): all set up {:.2}, pool empty after delete {:.2}",
                sp.all.as_secs_f64() / base.all.as_secs_f64(),
                empty.as_secs_f64() / base_del.as_secs_f64()
            );
        }
    }
    if keep {
        let _ = dir.keep();
    }
}
