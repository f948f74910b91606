//! Test-only helpers: the workspace's binaries as subprocesses (agents on their own sockets,
//! the `spiderpool` CNI plugin with a CNI environment, `spiderpoolctl`), and network namespaces
//! standing in for hosts and pods. Never shipped.

mod agent;
pub mod burst;
mod cluster;
mod cni;
mod etcd;
mod kube_world;
mod netns;
mod node_sim;
mod process;
pub mod real_node;
mod sandbox;
pub mod scale;

use std::path::PathBuf;
use std::process::Command;

pub use agent::{healthy, http_get, request, sample, Agent, TEST_LOG_LEVEL};
pub use cluster::{helm_bin, kube_bin, ControlPlane, Options as ControlPlaneOptions};
pub use cni::CniCall;
pub use etcd::{etcd_available, etcd_binary, Etcd};
pub use kube_world::{
    json_of, kube_node, macvlan_nad, running, until, zones, Controller, KubeNode, KubeProxy, Zones,
    KUBE_PROXY_CLUSTER_CIDR,
};
pub use netns::{http_get_in, in_netns, Netns, Relay};
pub use node_sim::{AddTiming, NodeSim, NodeSpec};
pub use process::{cpu_time, free_port, run, sh, wait_ready, Output};
pub use sandbox::{allocated, ctl, Sandbox};

/// The directory holding the workspace's built binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SPIDERPOOL_BIN_DIR") {
        return PathBuf::from(d);
    }
    // Test executables live in target/<profile>/deps.
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("exe dir");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("profile dir")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// The path of a workspace binary; panics with advice when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace --bins) or run cargo test --workspace",
        p.display()
    );
    p
}

/// Whether the tests run as root (needed for network namespaces).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Whether this machine can run a network-namespace test with Debian's CNI `plugins`: root, each
/// plugin in /usr/lib/cni, and ping. A test skips when not (saying why); with
/// `SPIDERPOOL_E2E_REQUIRED=1` (as root in CI) a missing prerequisite fails it instead.
pub fn netns_prerequisites(plugins: &[&str]) -> bool {
    let missing = if !is_root() {
        Some("not running as root".to_string())
    } else if let Some(p) = plugins
        .iter()
        .find(|p| !std::path::Path::new("/usr/lib/cni").join(p).exists())
    {
        Some(format!(
            "/usr/lib/cni/{p} is missing (apt-get install containernetworking-plugins)"
        ))
    } else if Command::new("ping").arg("-V").output().is_err() {
        Some("ping is missing (apt-get install iputils-ping)".to_string())
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) if std::env::var("SPIDERPOOL_E2E_REQUIRED").as_deref() == Ok("1") => {
            panic!("prerequisites missing: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}
