//! `spiderpool-sim-cluster`: test infrastructure for the examples, never shipped. Starts the
//! local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler built by
//! `scripts/kube-tools.sh`), installs the project's CRDs, and runs for each `--node` a node
//! simulator standing in for kubelet and the container runtime and a real kube-proxy (iptables
//! mode) inside the node's network namespace, until SIGTERM or SIGINT, then removes all of it.
//!
//! ```text
//! spiderpool-sim-cluster --kube-bin DIR --dir DIR --cni-path DIR \
//!     --node NAME,NETNS[,label=value...] [--node ...]
//! ```
//!
//! When ready it writes `DIR/admin.kubeconfig` and prints `ready`. Each node's plugins find its
//! agent's socket at `/var/run/spidernet/spiderpool.sock`, which for node NAME is
//! `DIR/NAME/spiderpool.sock` on this machine.

use std::path::PathBuf;

use spiderpool_testkit::{ControlPlane, KubeProxy, NodeSim, NodeSpec};

fn usage(why: &str) -> ! {
    eprintln!("spiderpool-sim-cluster: {why}\nusage: spiderpool-sim-cluster --kube-bin DIR --dir DIR --cni-path DIR --node NAME,NETNS[,label=value...] ...");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut kube_bin, mut dir, mut cni_path, mut nodes) = (None, None, None, Vec::new());
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--kube-bin" => kube_bin = Some(PathBuf::from(value())),
            "--dir" => dir = Some(PathBuf::from(value())),
            "--cni-path" => cni_path = Some(PathBuf::from(value())),
            "--node" => nodes.push(value()),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let kube_bin = kube_bin.unwrap_or_else(|| usage("--kube-bin is required"));
    let dir = dir.unwrap_or_else(|| usage("--dir is required"));
    let cni_path = cni_path.unwrap_or_else(|| usage("--cni-path is required"));
    if nodes.is_empty() {
        usage("at least one --node is required");
    }
    let cp = ControlPlane::start(&kube_bin, true);
    cp.install_crds();
    let mut sims = Vec::new();
    let mut proxies = Vec::new();
    for n in &nodes {
        let mut parts = n.split(',');
        let (Some(name), Some(netns)) = (parts.next(), parts.next()) else {
            usage(&format!("--node {n:?} is not NAME,NETNS[,label=value...]"));
        };
        let labels = parts
            .map(|kv| {
                let (k, v) = kv
                    .split_once('=')
                    .unwrap_or_else(|| usage(&format!("label {kv:?} is not key=value")));
                (k.to_string(), v.to_string())
            })
            .collect();
        let run_dir = dir.join(name);
        std::fs::create_dir_all(&run_dir).expect("node directory");
        sims.push(NodeSim::start(
            &cp.kubeconfig,
            NodeSpec {
                name: name.into(),
                labels,
                host_netns: Some(netns.into()),
                cni_path: vec![cni_path.clone()],
                default_network: serde_json::json!({}),
                run_dir: Some(run_dir),
            },
        ));
        proxies.push(KubeProxy::start(&cp, name, netns));
    }
    std::fs::copy(&cp.kubeconfig, dir.join("admin.kubeconfig")).expect("copying the kubeconfig");
    println!("ready");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    });
    drop(proxies);
    drop(sims);
    drop(cp);
}
