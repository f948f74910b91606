//! A burst of pods through the API server onto simulated nodes, timed as the nodes' CNI ADDs
//! saw it, and their deletion: what the Kubernetes-mode benchmarks share.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::Value;

use crate::NodeSim;

/// One burst as the nodes timed it.
#[derive(Debug, Clone, Copy)]
pub struct Burst {
    /// From the first create until the last pod's ADD ended.
    pub all: Duration,
    /// The median ADD.
    pub p50: Duration,
    /// The 99th-percentile ADD.
    pub p99: Duration,
    /// ADDs that failed (retried by the node, as kubelet does).
    pub failed: usize,
}

/// The `p` quantile (0..=1) of `sorted`.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `d` in milliseconds, for a table.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Creates `count` pods in `default` (`pod(i)` is the i-th, 32 creates in flight) and waits
/// until `sims` have run that many more ADDs (within `limit`).
pub async fn create_pods(
    client: &kube::Client,
    sims: &[NodeSim],
    count: usize,
    limit: Duration,
    pod: impl Fn(usize) -> Value,
) -> Burst {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let before: usize = sims.iter().map(|s| s.adds().len()).sum();
    let started = Instant::now();
    let objects: Vec<Pod> = (0..count)
        .map(|i| serde_json::from_value(pod(i)).expect("a pod"))
        .collect();
    futures_util::stream::iter(objects)
        .map(|p| {
            let pods = pods.clone();
            async move {
                pods.create(&PostParams::default(), &p)
                    .await
                    .expect("creating a pod");
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let deadline = Instant::now() + limit;
    let timings = loop {
        let done: usize = sims.iter().map(|s| s.adds().len()).sum();
        if done >= before + count {
            let mut t: Vec<_> = sims.iter().flat_map(|s| s.adds()).collect();
            t.sort_by_key(|a| a.started);
            break t.split_off(before);
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {count} pods set up",
            done - before
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let end = timings
        .iter()
        .map(|a| a.started + a.took)
        .max()
        .expect("some ADDs");
    let mut took: Vec<Duration> = timings.iter().map(|a| a.took).collect();
    took.sort();
    Burst {
        all: end - started,
        p50: pct(&took, 0.5),
        p99: pct(&took, 0.99),
        failed: timings.iter().filter(|a| !a.ok).count(),
    }
}

/// Deletes the pods of `default` labelled `selector` at once and waits (within `limit`) until
/// they are gone. One `deletecollection` per node, eight at a time: one request for thousands
/// of pods outlasts the API server's request timeout (60 s).
pub async fn delete_pods(client: &kube::Client, selector: &str, limit: Duration) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let lp = ListParams::default().labels(selector);
    let nodes: std::collections::BTreeSet<String> = pods
        .list(&lp)
        .await
        .expect("listing pods")
        .items
        .into_iter()
        .filter_map(|p| p.spec?.node_name)
        .collect();
    let results: Vec<_> = futures_util::stream::iter(nodes)
        .map(|node| {
            let (pods, lp) = (pods.clone(), lp.clone());
            async move {
                let on_node = lp.fields(&format!("spec.nodeName={node}"));
                pods.delete_collection(&DeleteParams::default(), &on_node)
                    .await
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r.expect("deleting a node's pods");
    }
    // Those not bound to a node yet.
    pods.delete_collection(
        &DeleteParams::default(),
        &lp.clone().fields("spec.nodeName="),
    )
    .await
    .expect("deleting the pods");
    let deadline = Instant::now() + limit;
    loop {
        let left = pods.list(&lp).await.expect("listing pods").items.len();
        if left == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{left} pods ({selector}) never went away"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client of the control plane behind `kubeconfig`.
pub async fn client(kubeconfig: &std::path::Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("a kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("a client config");
    kube::Client::try_from(config).expect("a client")
}

/// A process's peak resident memory (`VmHWM`) in KiB, 0 when it cannot be read.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
