//! A node simulator: test infrastructure standing in for kubelet and the container runtime of
//! one simulated node (never shipped). It keeps its Node Ready (status conditions and Lease
//! heartbeats), watches the pods bound to it, gives each a network namespace and runs the pod's
//! CNI chain there exactly as a runtime would — the NetworkAttachmentDefinition named by
//! `v1.multus-cni.io/default-network`, else the node's default network — with the runtime's
//! `CNI_*` environment and `K8S_POD_*` arguments, then reports the pod Running and Ready with its
//! addresses. As the container runtime's stand-in for the pod's containers, each TCP
//! `containerPort` the pod declares answers HTTP inside the pod's namespace with the pod's name
//! (an `nginx` pod answers on port 80). The Node's addresses are its host namespace's global
//! ones. A failed ADD is reported on the pod (condition `CNIFailed`), its sandbox killed
//! (DEL) and made again after a backoff (1 s doubling to 10 s), as kubelet does. A deleted pod
//! gets DEL, its namespace is removed and the pod finalized. Stopping
//! the simulator stands for a node that died: no DEL comes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher;
use serde_json::{json, Value};

use crate::*;

/// How a simulated node runs CNI.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The Node's name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// The network namespace standing in for the node's host (the plugins run in it), or
    /// `None` for this process's own.
    pub host_netns: Option<String>,
    /// Directories searched for plugins (`CNI_PATH`), e.g. `/usr/lib/cni` and the workspace's
    /// binaries.
    pub cni_path: Vec<PathBuf>,
    /// The network config (a `.conflist` or `.conf` JSON) for pods that name no NAD.
    pub default_network: Value,
    /// The node's own `/var/run/spidernet` (where its agent's socket is): the plugins run with
    /// this directory mounted there, as on a host of its own. `None`: the machine's.
    pub run_dir: Option<PathBuf>,
}

/// Where a node's plugins look for the agent's socket directory.
const RUN_DIR: &str = "/var/run/spidernet";

/// One pod's network setup as the simulator timed it.
#[derive(Debug, Clone, Copy)]
pub struct AddTiming {
    /// When the CNI chain's ADD began.
    pub started: std::time::Instant,
    /// How long the chain took.
    pub took: Duration,
    /// Whether it succeeded.
    pub ok: bool,
}

/// A running simulated node; [`NodeSim::stop`] (or drop) stops it without any DEL.
pub struct NodeSim {
    stop: Arc<AtomicBool>,
    /// The network namespaces of its pods not torn down yet: removed when the simulator is
    /// dropped (the test is over), so no test leaves them on the machine.
    netns: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    adds: Arc<std::sync::Mutex<Vec<AddTiming>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The node's name.
    pub name: String,
}

impl NodeSim {
    /// Registers the Node (Ready) and starts serving its pods.
    pub fn start(kubeconfig: &std::path::Path, spec: NodeSpec) -> NodeSim {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let kubeconfig = kubeconfig.to_path_buf();
        let name = spec.name.clone();
        let flag = stop.clone();
        let adds: Arc<std::sync::Mutex<Vec<AddTiming>>> = Arc::default();
        let timings = adds.clone();
        let netns: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>> = Arc::default();
        let live = netns.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let sim = match Sim::connect(&kubeconfig, spec, timings, live).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if let Err(e) = sim.register().await {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                sim.run(flag).await;
            });
        });
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("node simulator {name}: {e}"),
            Err(e) => panic!("node simulator {name} did not start: {e}"),
        }
        NodeSim {
            stop,
            netns,
            adds,
            thread: Some(thread),
            name,
        }
    }

    /// Every CNI ADD chain this node ran so far, timed.
    pub fn adds(&self) -> Vec<AddTiming> {
        self.adds.lock().expect("timings lock").clone()
    }

    /// Stops serving: the node "dies" (no DEL for its pods, no more heartbeats).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NodeSim {
    fn drop(&mut self) {
        self.stop();
        let left = std::mem::take(&mut *self.netns.lock().expect("netns lock"));
        for ns in left {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

type SimResult<T> = Result<T, String>;

/// The first wait before a failed sandbox is made again; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two tries of a failed sandbox.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// One pod's sandbox: locked while its ADD or DEL runs, `None` until set up.
type Slot = Arc<tokio::sync::Mutex<Option<SetUp>>>;

struct Sim {
    client: kube::Client,
    spec: NodeSpec,
    /// The node's addresses (its host namespace's global ones; loopback without one).
    addresses: Vec<String>,
    /// Pods seen, by UID. Each pod is served by a task of its own, as kubelet's pod workers:
    /// many pods of one node are set up at the same time.
    pods: std::sync::Mutex<BTreeMap<String, Slot>>,
    adds: Arc<std::sync::Mutex<Vec<AddTiming>>>,
    /// The network namespaces made and not yet removed (shared with [`NodeSim`]).
    netns: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

struct SetUp {
    namespace: String,
    name: String,
    netns: String,
    container_id: String,
    network: Value,
    results: Vec<Value>,
    /// The pod's HTTP responders, one per TCP container port, stopped before its DEL.
    servers: Vec<tokio::task::AbortHandle>,
}

impl Sim {
    async fn connect(
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

    fn now() -> String {
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
    }

    /// Creates the Node with a Ready status (status is kept on create).
    async fn register(&self) -> SimResult<()> {
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

    fn ready_condition(&self) -> Value {
        let now = Self::now();
        json!({"type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "simulated node", "lastHeartbeatTime": now, "lastTransitionTime": now})
    }

    /// Renews the node's Lease and its Ready condition.
    async fn heartbeat(&self) -> SimResult<()> {
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

    async fn run(self, stop: Arc<AtomicBool>) {
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

    /// Starts serving a pod event: a new pod is set up, a deleted one torn down, each in a task
    /// of its own (a pod's teardown waits for its setup).
    fn serve(self: &Arc<Self>, pod: Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if uid.is_empty() {
            return;
        }
        let sim = self.clone();
        if pod.metadata.deletion_timestamp.is_some() {
            tokio::spawn(async move { sim.teardown(&pod, true).await });
            return;
        }
        let slot = {
            let mut pods = self.pods.lock().expect("pods lock");
            if pods.contains_key(&uid) {
                return;
            }
            let slot: Slot = Arc::default();
            pods.insert(uid.clone(), slot.clone());
            slot
        };
        tokio::spawn(async move {
            // As kubelet: a failed sandbox is killed (DEL for what its ADD made, the namespace
            // removed) and made again after a backoff, until it comes up or the pod goes.
            let mut backoff = RETRY_FIRST;
            loop {
                let mut guard = slot.lock().await;
                if !sim.pods.lock().expect("pods lock").contains_key(&uid) {
                    return;
                }
                let Err(e) = sim.setup(&pod, &mut guard).await else {
                    return;
                };
                eprintln!(
                    "node simulator {}: pod {}/{}: {e}",
                    sim.spec.name,
                    pod.metadata.namespace.as_deref().unwrap_or(""),
                    pod.metadata.name.as_deref().unwrap_or("")
                );
                let _ = sim.report_failure(&pod, &e).await;
                if let Some(set) = guard.take() {
                    sim.clone().unmake(set, uid.clone()).await;
                }
                drop(guard);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        });
    }

    /// The network config of a pod: the NAD its default-network annotation names, else the
    /// node's default.
    async fn network_of(&self, pod: &Pod) -> SimResult<Value> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let Some(name) = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("v1.multus-cni.io/default-network"))
        else {
            return Ok(self.spec.default_network.clone());
        };
        let (nad_ns, nad_name) = name.split_once('/').unwrap_or((&ns, name));
        let gvk = GroupVersionKind::gvk("k8s.cni.cncf.io", "v1", "NetworkAttachmentDefinition");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "network-attachment-definitions");
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), nad_ns, &ar);
        let nad = api
            .get(nad_name)
            .await
            .map_err(|e| format!("NetworkAttachmentDefinition {nad_ns}/{nad_name}: {e}"))?;
        let config = nad.data["spec"]["config"].as_str().ok_or_else(|| {
            format!("NetworkAttachmentDefinition {nad_ns}/{nad_name} has no spec.config")
        })?;
        serde_json::from_str(config).map_err(|e| {
            format!("NetworkAttachmentDefinition {nad_ns}/{nad_name}: spec.config: {e}")
        })
    }

    async fn setup(self: &Arc<Self>, pod: &Pod, slot: &mut Option<SetUp>) -> SimResult<()> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let network = self.network_of(pod).await?;
        let netns = format!("sim-{}", &uid.replace('-', "")[..12]);
        let container_id = format!("{:0>64}", uid.replace('-', ""));
        let add = netns.clone();
        self.netns.lock().expect("netns lock").insert(netns.clone());
        tokio::task::spawn_blocking(move || sh(&["ip", "netns", "add", &add]))
            .await
            .map_err(|e| e.to_string())?;
        let mut set = SetUp {
            namespace,
            name,
            netns,
            container_id,
            network,
            results: Vec::new(),
            servers: Vec::new(),
        };
        let sim = self.clone();
        let key = uid.clone();
        let (set, result) = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let r = sim.chain(&mut set, &key, "ADD");
            sim.adds.lock().expect("timings lock").push(AddTiming {
                started,
                took: started.elapsed(),
                ok: r.is_ok(),
            });
            (set, r)
        })
        .await
        .map_err(|e| e.to_string())?;
        // Recorded even when ADD failed part way, so that deletion runs DEL for what was made.
        let ips = result.as_ref().map(ips_of);
        let (ns, name) = (set.namespace.clone(), set.name.clone());
        let served = if ips.is_ok() {
            serve_ports(pod, &set.netns, &name).await
        } else {
            Ok(Vec::new())
        };
        *slot = Some(set);
        let ips = ips.map_err(|e| e.clone())?;
        let servers = served?;
        if let Some(set) = slot.as_mut() {
            set.servers = servers;
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let now = Self::now();
        let containers: Vec<Value> = pod
            .spec
            .as_ref()
            .map(|s| {
                s.containers
                    .iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                json!({"name": c, "ready": true, "started": true, "restartCount": 0,
                    "image": "sim", "imageID": "sim", "containerID": format!("sim://{c}"),
                    "state": {"running": {"startedAt": now}}})
            })
            .collect();
        let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": self.addresses[0],
            "hostIPs": self.addresses.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "podIP": ips.first(),
            "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "startTime": now,
            "conditions": [cond("PodReadyToStartContainers"), cond("Initialized"), cond("ContainersReady"), cond("Ready"), cond("PodScheduled")],
            "containerStatuses": containers,
        }});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .map_err(|e| format!("pod status: {e}"))?;
        Ok(())
    }

    async fn report_failure(&self, pod: &Pod, why: &str) -> SimResult<()> {
        let pods: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let now = Self::now();
        let status = json!({"status": {"phase": "Pending", "conditions": [{"type": "PodReadyToStartContainers",
            "status": "False", "reason": "CNIFailed", "message": why, "lastTransitionTime": now}]}});
        pods.patch_status(
            pod.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// DEL for what a sandbox was given, and its namespace removed.
    async fn unmake(self: Arc<Self>, mut set: SetUp, uid: String) {
        for s in set.servers.drain(..) {
            s.abort();
        }
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = self.chain(&mut set, &uid, "DEL") {
                eprintln!(
                    "node simulator {}: DEL {}/{}: {e}",
                    self.spec.name, set.namespace, set.name
                );
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &set.netns])
                .output();
            self.netns.lock().expect("netns lock").remove(&set.netns);
        })
        .await;
    }

    /// DEL for what the pod was given, its namespace removed, and (`finalize`) the pod deleted
    /// for good, as kubelet does once the containers are gone.
    async fn teardown(self: Arc<Self>, pod: &Pod, finalize: bool) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let slot = self.pods.lock().expect("pods lock").remove(&uid);
        // Waits for the pod's setup, if it is still running.
        let set = match slot {
            Some(slot) => slot.lock().await.take(),
            None => None,
        };
        if let Some(set) = set {
            self.clone().unmake(set, uid.clone()).await;
        }
        if finalize {
            let pods: Api<Pod> = Api::namespaced(
                self.client.clone(),
                pod.metadata.namespace.as_deref().unwrap_or_default(),
            );
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(kube::api::Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..Default::default()
            };
            let _ = pods
                .delete(pod.metadata.name.as_deref().unwrap_or_default(), &dp)
                .await;
        }
    }

    /// Runs the network's plugins for `command` (ADD in order, each given the previous result;
    /// DEL in reverse with the last result). Returns the final result of an ADD.
    fn chain(&self, set: &mut SetUp, uid: &str, command: &str) -> SimResult<Value> {
        let net = &set.network;
        let version = net["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
        let name = net["name"].as_str().unwrap_or("net").to_string();
        let plugins: Vec<Value> = match net["plugins"].as_array() {
            Some(p) => p.clone(),
            None => vec![net.clone()],
        };
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={uid}",
            set.namespace, set.name, set.container_id
        );
        let mut prev: Option<Value> = set.results.last().cloned();
        let order: Vec<usize> = if command == "DEL" {
            (0..plugins.len()).rev().collect()
        } else {
            (0..plugins.len()).collect()
        };
        for i in order {
            let mut conf = plugins[i].clone();
            conf["cniVersion"] = json!(version);
            conf["name"] = json!(name);
            if let Some(p) = &prev {
                conf["prevResult"] = p.clone();
            }
            let plugin = conf["type"].as_str().unwrap_or_default().to_string();
            let out = self.exec(&plugin, command, set, &args, &conf)?;
            if command == "ADD" {
                let result: Value = serde_json::from_str(&out)
                    .map_err(|e| format!("{plugin} ADD printed no result ({e}): {out}"))?;
                set.results.push(result.clone());
                prev = Some(result);
            }
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    fn exec(
        &self,
        plugin: &str,
        command: &str,
        set: &SetUp,
        args: &str,
        conf: &Value,
    ) -> SimResult<String> {
        let path = self
            .spec
            .cni_path
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.exists())
            .ok_or_else(|| {
                format!(
                    "CNI plugin {plugin:?} not found in {:?}",
                    self.spec.cni_path
                )
            })?;
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(dir) = &self.spec.run_dir {
            // A mount namespace of the plugin's own, with the node's directory as RUN_DIR.
            std::fs::create_dir_all(RUN_DIR).map_err(|e| format!("creating {RUN_DIR}: {e}"))?;
            argv.extend(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    r#"mount --bind "$1" "$2" && shift 2 && exec "$@""#,
                    "sh",
                ]
                .map(Into::into),
            );
            argv.push(dir.into());
            argv.push(RUN_DIR.into());
        }
        if let Some(ns) = &self.spec.host_netns {
            argv.extend(["ip", "netns", "exec", ns.as_str()].map(Into::into));
        }
        argv.push(path.into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        let cni_path = std::env::join_paths(&self.spec.cni_path).expect("CNI_PATH");
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &set.container_id)
            .env("CNI_NETNS", format!("/var/run/netns/{}", set.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni_path)
            .env("CNI_ARGS", args);
        let out = run(&mut cmd, &conf.to_string());
        if out.success {
            Ok(out.stdout)
        } else {
            Err(format!(
                "{plugin} {command} failed: {}{}",
                out.stdout, out.stderr
            ))
        }
    }
}

/// The global addresses of the network namespace `netns`, IPv4 first.
fn global_addresses(netns: &str) -> SimResult<Vec<String>> {
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

/// Starts an HTTP responder inside the pod's namespace `netns` for each TCP container port of
/// `pod`, answering every request with 200 and the pod's name.
async fn serve_ports(
    pod: &Pod,
    netns: &str,
    name: &str,
) -> SimResult<Vec<tokio::task::AbortHandle>> {
    let ports: Vec<u16> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    let mut out = Vec::new();
    for port in ports {
        let ns = netns.to_string();
        let listener = tokio::task::spawn_blocking(move || {
            in_netns(&ns, move || {
                // Both families where the namespace has IPv6, else IPv4 alone.
                let l = std::net::TcpListener::bind(("::", port))
                    .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", port)))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("listening on port {port} in {netns}: {e}"))?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let body = format!("{name}\n");
        let task = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                // The request's head, read until its blank line (5 s at most).
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        req.extend_from_slice(&buf[..n]);
                        if req.windows(4).any(|w| w == b"\r\n\r\n") || req.len() > 16384 {
                            break;
                        }
                    }
                })
                .await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
                let _ = conn.shutdown().await;
            }
        });
        out.push(task.abort_handle());
    }
    Ok(out)
}

/// The addresses of a CNI result, without prefix length.
fn ips_of(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|i| i["address"].as_str())
                .filter_map(|a| a.split('/').next())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn humantime_now_micro() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}
