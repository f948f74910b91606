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

use serde_json::Value;

use crate::*;

mod node;
mod pods;
mod ports;
mod sandbox;

use ports::*;
use sandbox::*;

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
