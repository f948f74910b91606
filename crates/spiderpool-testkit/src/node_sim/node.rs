//! The simulated node itself: the Node object registered with its namespace's addresses, kept
//! Ready by status and Lease heartbeats, and the loop that watches the pods bound to it.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::{json, Value};

use super::*;

impl Sim {
    pub(super) async fn connect(
        kubeconfig: &std::path::Path,
        spec: NodeSpec,
        adds: Arc<std::sync::Mutex<Vec<AddTiming>>>,
        netns: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    ) -> SimResult<Sim> {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| e.to_string())?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|e| e.to_string())?;
        let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
        let addresses = match &spec.host_netns {
            Some(ns) => global_addresses(ns)?,
            None => Vec::new(),
        };
        let addresses = if addresses.is_empty() {
            vec!["127.0.0.1".to_string()]
        } else {
            addresses
        };
        Ok(Sim {
            client,
            addresses,
            spec,
            pods: Default::default(),
            adds,
            netns,
        })
    }

    pub(super) fn now() -> String {
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
    }

    /// Creates the Node with a Ready status (status is kept on create).
    pub(super) async fn register(&self) -> SimResult<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.spec.name, "labels": self.spec.labels},
            "status": {
                "conditions": [self.ready_condition()],
                "capacity": {"cpu": "8", "memory": "16Gi", "pods": "250"},
                "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "250"},
                "addresses": self.addresses.iter()
                    .map(|a| json!({"type": "InternalIP", "address": a}))
                    .chain([json!({"type": "Hostname", "address": self.spec.name})])
                    .collect::<Vec<_>>(),
                "nodeInfo": {"kubeletVersion": "v1.36.3-sim", "containerRuntimeVersion": "spiderpool-testkit://sim",
                    "architecture": "amd64", "operatingSystem": "linux", "bootID": "", "kernelVersion": "",
                    "kubeProxyVersion": "", "machineID": "", "osImage": "", "systemUUID": ""}
            }
        }))
        .map_err(|e| e.to_string())?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(format!("creating Node {}: {e}", self.spec.name)),
        }
        self.heartbeat().await
    }

    pub(super) fn ready_condition(&self) -> Value {
        let now = Self::now();
        json!({"type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "simulated node", "lastHeartbeatTime": now, "lastTransitionTime": now})
    }

    /// Renews the node's Lease and its Ready condition.
    pub(super) async fn heartbeat(&self) -> SimResult<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        nodes
            .patch_status(
                &self.spec.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": [self.ready_condition()]}})),
            )
            .await
            .map_err(|e| format!("node status: {e}"))?;
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.spec.name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.spec.name, "leaseDurationSeconds": 40,
                "renewTime": humantime_now_micro()}
        });
        leases
            .patch(
                &self.spec.name,
                &PatchParams::apply("spiderpool-node-sim").force(),
                &Patch::Apply(lease),
            )
            .await
            .map_err(|e| format!("node lease: {e}"))?;
        Ok(())
    }

    pub(super) async fn run(self, stop: Arc<AtomicBool>) {
        let sim = Arc::new(self);
        use futures_util::StreamExt;
        let pods: Api<Pod> = Api::all(sim.client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", sim.spec.name));
        let mut events = watcher(pods, cfg).boxed();
        let mut beat = tokio::time::interval(Duration::from_secs(10));
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                }
                _ = beat.tick() => {
                    if let Err(e) = sim.heartbeat().await {
                        eprintln!("node simulator {}: {e}", sim.spec.name);
                    }
                }
                ev = events.next() => {
                    let pods = match ev {
                        Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => vec![p],
                        Some(Ok(watcher::Event::Delete(p))) => {
                            let sim = sim.clone();
                            tokio::spawn(async move { sim.teardown(&p, false).await });
                            continue;
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => {
                            eprintln!("node simulator {}: watch: {e}", sim.spec.name);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                        None => return,
                    };
                    for p in pods {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        sim.serve(p);
                    }
                }
            }
        }
    }
}

/// The global addresses of the network namespace `netns`, IPv4 first.
pub(super) fn global_addresses(netns: &str) -> SimResult<Vec<String>> {
    let out = Command::new("ip")
        .args(["-j", "-n", netns, "addr", "show", "scope", "global"])
        .output()
        .map_err(|e| format!("ip addr in {netns}: {e}"))?;
    let links: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("ip -j addr in {netns} printed no JSON: {e}"))?;
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for info in links
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().into_iter().flatten())
    {
        if let Some(a) = info["local"].as_str() {
            match info["family"].as_str() {
                Some("inet") => v4.push(a.to_string()),
                Some("inet6") => v6.push(a.to_string()),
                _ => {}
            }
        }
    }
    v4.extend(v6);
    Ok(v4)
}
