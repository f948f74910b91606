//! `spiderpool-real-cluster`: test infrastructure for the examples, never shipped. Starts the
//! local control plane and, for each `--node`, a real node (kubelet, containerd, runc and
//! kube-proxy in the node's own network and mount namespaces, on its zone's segment behind a
//! router; see the test kit's `real_node`), imports each `--image` OCI archive into every node,
//! and runs until SIGTERM or SIGINT, then removes all of it.
//!
//! ```text
//! spiderpool-real-cluster --dir DIR --cni-conf FILE [--image ARCHIVE ...] \
//!     --node NAME,GATEWAY/PREFIX[,label=value...] [--node ...]
//! ```
//!
//! `--cni-conf` is every node's CNI network (a `.conflist`); the control plane's binaries come
//! from `SPIDERPOOL_KUBE_BIN`. When ready it writes `DIR/admin.kubeconfig` and prints `ready`.

use std::path::PathBuf;

use spiderpool_testkit::real_node::{RealCluster, RealNodeSpec};

fn usage(why: &str) -> ! {
    eprintln!("spiderpool-real-cluster: {why}\nusage: spiderpool-real-cluster --dir DIR --cni-conf FILE [--image ARCHIVE ...] --node NAME,GATEWAY/PREFIX[,label=value...] ...");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut cni_conf, mut images, mut nodes) = (None, None, Vec::new(), Vec::new());
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--dir" => dir = Some(PathBuf::from(value())),
            "--cni-conf" => cni_conf = Some(PathBuf::from(value())),
            "--image" => images.push(PathBuf::from(value())),
            "--node" => nodes.push(value()),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let dir = dir.unwrap_or_else(|| usage("--dir is required"));
    let conf = cni_conf.unwrap_or_else(|| usage("--cni-conf is required"));
    let conf = std::fs::read_to_string(&conf)
        .unwrap_or_else(|e| usage(&format!("--cni-conf {}: {e}", conf.display())));
    if nodes.is_empty() {
        usage("at least one --node is required");
    }
    let specs: Vec<RealNodeSpec> = nodes
        .iter()
        .map(|n| {
            let mut parts = n.split(',');
            let (Some(name), Some(gateway)) = (parts.next(), parts.next()) else {
                usage(&format!(
                    "--node {n:?} is not NAME,GATEWAY/PREFIX[,label=value...]"
                ));
            };
            let labels = parts
                .map(|kv| {
                    let (k, v) = kv
                        .split_once('=')
                        .unwrap_or_else(|| usage(&format!("label {kv:?} is not key=value")));
                    (k.to_string(), v.to_string())
                })
                .collect();
            RealNodeSpec {
                name: name.into(),
                labels,
                gateway: gateway.into(),
                cni_conf: Some(conf.clone()),
                ..Default::default()
            }
        })
        .collect();
    let Some(cluster) = RealCluster::start("sprc", &specs) else {
        eprintln!("spiderpool-real-cluster: real nodes cannot run here (see above)");
        std::process::exit(1);
    };
    for i in &images {
        cluster.import(i);
    }
    std::fs::create_dir_all(&dir).expect("--dir");
    std::fs::copy(&cluster.cp.kubeconfig, dir.join("admin.kubeconfig")).expect("kubeconfig");
    println!("ready");
    wait_for_signal();
    drop(cluster);
}

fn wait_for_signal() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().expect("blocking signals");
    let _ = set.wait();
}
