//! Pod start and stop on a real node (kubelet, containerd, runc): a batch of pods from `kubectl
//! apply` until every one runs with an address, then from `kubectl delete` until every one is
//! gone, through the seed's chain (macvlan with spiderpool IPAM, then the coordinator as `veth`)
//! and, alternating in the same run, through macvlan with Debian's host-local alone. Reports the
//! median batch time of each and the ratio, plus the resident memory of the agent and the
//! controller, running as the chart's pods.
//!
//! cargo build --release --workspace --bins && cargo bench -p spiderpool-testkit --bench real_node_start
//! (BENCH_PODS=8 pods per batch, BENCH_ROUNDS=4 rounds of each; root, as the real-node tests.)

use std::time::{Duration, Instant};

use serde_json::json;
use spiderpool_testkit::real_node::{
    busybox_image, project_image, real_nodes_missing, seed_chain, RealCluster, RealNodeSpec,
};
use spiderpool_testkit::{json_of, until};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn host_local() -> String {
    json!({"cniVersion": "0.4.0", "name": "node-net", "plugins": [{
        "type": "macvlan", "master": "ens192", "mode": "bridge",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.6.0.0/16",
            "rangeStart": "10.6.100.10", "rangeEnd": "10.6.100.60", "gateway": "10.6.0.1"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "/var/lib/kubelet/host-local"}
    }]})
    .to_string()
}

/// Seconds from one `kubectl apply` of `n` pods until all run with an address, and from one
/// `kubectl delete` until all are gone.
fn batch(c: &RealCluster, n: usize, round: usize) -> (Duration, Duration) {
    let items: Vec<_> = (0..n)
        .map(|i| {
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("b{round}-{i}"), "namespace": "default",
                    "labels": {"bench": "start"},
                    "annotations": {"ipam.spidernet.io/ippool": "{\"ipv4\": [\"test-ippool-6\"]}"}},
                "spec": {"nodeName": "controller-node-1", "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "c", "image": "spiderpool.test/idle:1", "imagePullPolicy": "Never"}]}})
        })
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string();
    let all_running = || {
        let v = json_of(
            &c.cp,
            &["get", "pods", "-n", "default", "-l", "bench=start"],
        );
        let items = v["items"].as_array().cloned().unwrap_or_default();
        (items.len() == n
            && items
                .iter()
                .all(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string()))
        .then_some(())
    };
    let t = Instant::now();
    c.cp.kubectl_ok(&["apply", "-f", "-"], &list);
    until("the batch running", all_running);
    let start = t.elapsed();
    let t = Instant::now();
    c.cp.kubectl_ok(
        &[
            "delete",
            "pods",
            "-n",
            "default",
            "-l",
            "bench=start",
            "--wait=false",
        ],
        "",
    );
    until("the batch gone", || {
        let v = json_of(
            &c.cp,
            &["get", "pods", "-n", "default", "-l", "bench=start"],
        );
        v["items"]
            .as_array()
            .is_some_and(|a| a.is_empty())
            .then_some(())
    });
    (start, t.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Resident memory (kB) of the node's process whose command line starts with `bin`.
fn rss_kb(bin: &str) -> Option<u64> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let first = cmd.split(|b| *b == 0).next().unwrap_or_default();
        if first == bin.as_bytes() {
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok());
        }
    }
    None
}

fn main() {
    if let Some(why) = real_nodes_missing() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let (n, rounds) = (env_usize("BENCH_PODS", 8), env_usize("BENCH_ROUNDS", 4));
    let spec = RealNodeSpec {
        name: "controller-node-1".into(),
        labels: vec![("node-subnet".into(), "subnet-6".into())],
        gateway: "10.6.0.1/16".into(),
        cni_conf: Some(host_local()),
        ..Default::default()
    };
    let c = RealCluster::start("bs", &[spec]).expect("a real node");
    let (image, archive) = project_image("bench");
    c.import(&archive);
    c.import(&busybox_image(
        "spiderpool.test/idle:1",
        r#"["/bin/sh","-c","trap 'exit 0' TERM INT; while true; do sleep 3600 & wait $!; done"]"#,
    ));
    c.install_chart(&image, false, &["--set", "spiderpoolController.replicas=1"]);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/seed-zones/manifests");
    for f in ["02-subnets.yaml", "03-ippools.yaml"] {
        c.cp.kubectl_ok(&["apply", "-f", &dir.join(f).display().to_string()], "");
    }
    let node = c.node("controller-node-1");
    let confs = [("host-local", host_local()), ("spiderpool", seed_chain())];
    let mut times: [(Vec<Duration>, Vec<Duration>); 2] = Default::default();
    for round in 0..rounds {
        for (k, (name, conf)) in confs.iter().enumerate() {
            node.set_cni_conf(conf);
            // containerd reloads the directory on change.
            std::thread::sleep(Duration::from_secs(2));
            let (start, stop) = batch(&c, n, round * 2 + k);
            eprintln!(
                "round {round} {name}: start {:.2} s, stop {:.2} s",
                start.as_secs_f64(),
                stop.as_secs_f64()
            );
            times[k].0.push(start);
            times[k].1.push(stop);
            // The next batch starts with every address of the pool free again (a DEL may come
            // after its pod is gone from the API).
            until("the pool empty", || {
                let p = json_of(&c.cp, &["get", "spiderippool", "test-ippool-6"]);
                (p["status"]["allocatedIPCount"].as_u64().unwrap_or(0) == 0).then_some(())
            });
        }
    }
    let agent = rss_kb("/usr/local/bin/spiderpool-agent");
    let controller = rss_kb("/usr/local/bin/spiderpool-controller");
    let [(hs, hd), (ss, sd)] = times.map(|(s, d)| (median(s), median(d)));
    println!("real node, {n} pods per batch, median of {rounds} rounds each");
    println!("| chain | start→running | delete→gone |");
    println!("|---|---|---|");
    println!(
        "| macvlan + host-local | {:.2} s | {:.2} s |",
        hs.as_secs_f64(),
        hd.as_secs_f64()
    );
    println!(
        "| macvlan + spiderpool + coordinator | {:.2} s | {:.2} s |",
        ss.as_secs_f64(),
        sd.as_secs_f64()
    );
    println!(
        "ratio spiderpool/host-local: start {:.2}, delete {:.2}",
        ss.as_secs_f64() / hs.as_secs_f64(),
        sd.as_secs_f64() / hd.as_secs_f64()
    );
    println!(
        "agent RSS {} kB, controller RSS {} kB (as the chart's pods, after the run)",
        agent.map_or("?".into(), |v| v.to_string()),
        controller.map_or("?".into(), |v| v.to_string())
    );
}
