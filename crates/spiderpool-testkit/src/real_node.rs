//! Real nodes: a real kubelet and Debian's containerd and runc per node, on a control plane in
//! the root network namespace (test infrastructure, never shipped; `../spec/real-node.md`).
//!
//! ```text
//!   root netns: etcd, kube-apiserver (0.0.0.0, advertised on UPLINK .1), controller-manager,
//!               scheduler; routes to the zones through the router
//!     | veth `PREFIX-up` (172.30.0.1) ⟷ `wan` (172.30.0.2)
//!   router netns PREFIX-r: each zone's gateway (10.6.0.1/16, 10.7.0.1/16), forwarding on
//!     | veth `upN` ⟷ `ens192`
//!   node netns NAME (10.6.0.2/16, default via the gateway), and its own mount namespace held
//!   by a `sleep`, where the node's /etc/cni/net.d, /opt/cni/bin, /var/run/spidernet,
//!   /var/lib/kubelet, /var/log/pods and /var/log/containers are directories of its own:
//!     containerd (its own root, state and socket), kubelet, kube-proxy (iptables)
//! ```
//!
//! Each node's kubelet is `system:node:NAME` with a client certificate of the control plane's
//! CA, serves with a certificate for its address, and runs its pods under a cgroup root of its
//! own. Images come from OCI archives imported into each node's containerd
//! ([`RealCluster::import`]); the sandbox image is a busybox shell that waits for SIGTERM.
//! Dropping the cluster stops everything and leaves no process, mount, cgroup, network
//! namespace, link or route behind.

mod images;
mod node;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use images::{busybox_image, project_image, PAUSE_IMAGE};
pub use node::{RealNode, RealNodeSpec};

use crate::*;

/// The root namespace's end of the uplink to the router: the API server's advertised address.
pub const UPLINK: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
/// The router's end.
const ROUTER_UPLINK: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 2);

/// The control plane and the nodes, stopped and removed on drop (nodes first).
pub struct RealCluster {
    /// The real nodes, in the order given.
    pub nodes: Vec<RealNode>,
    /// The control plane (its API server also on [`UPLINK`]).
    pub cp: ControlPlane,
    uplink: String,
    router: Netns,
    /// Node state, certificates, logs.
    pub dir: tempfile::TempDir,
}

/// Why real nodes cannot run here, or `None` when they can.
pub fn real_nodes_missing() -> Option<String> {
    if !is_root() {
        return Some("real nodes need root".into());
    }
    let Some(bin) = kube_bin() else {
        return Some("no SPIDERPOOL_KUBE_BIN (scripts/kube-tools.sh)".into());
    };
    if !bin.join("kubelet").exists() {
        return Some(format!(
            "{} has no kubelet: rebuild with scripts/kube-tools.sh",
            bin.display()
        ));
    }
    for tool in [
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        "ctr",
        "nsenter",
        "unshare",
    ] {
        if which(tool).is_none() {
            return Some(format!(
                "{tool} not found (scripts/setup-debian.sh installs containerd, runc and util-linux)"
            ));
        }
    }
    None
}

/// The path of `tool` on PATH.
pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

impl RealCluster {
    /// A control plane with `nodes` joined, each Ready; `None` (skipped, said why) where real
    /// nodes cannot run. The names prefixed `prefix` (router, uplink) must be unique among
    /// concurrent tests; node names are the nodes' netns names too.
    pub fn start(prefix: &str, nodes: &[RealNodeSpec]) -> Option<RealCluster> {
        if let Some(why) = real_nodes_missing() {
            assert!(
                std::env::var("SPIDERPOOL_E2E_REQUIRED").as_deref() != Ok("1"),
                "{why}"
            );
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        // The router and its uplink to the root namespace, where the API server listens.
        let router = Netns::new(&format!("{prefix}-r"));
        let uplink = format!("{prefix}-up");
        let _ = Command::new("ip").args(["link", "del", &uplink]).output();
        sh(&[
            "ip",
            "link",
            "add",
            &uplink,
            "type",
            "veth",
            "peer",
            "name",
            "wan",
            "netns",
            &router.name,
        ]);
        sh(&["ip", "addr", "add", &format!("{UPLINK}/24"), "dev", &uplink]);
        sh(&["ip", "link", "set", &uplink, "up"]);
        let r = |args: &[&str]| sh(&[&["ip", "-n", router.name.as_str()][..], args].concat());
        r(&["addr", "add", &format!("{ROUTER_UPLINK}/24"), "dev", "wan"]);
        r(&["link", "set", "wan", "up"]);
        r(&["route", "add", "default", "via", &UPLINK.to_string()]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &router.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);

        let cp = ControlPlane::start_with(
            &kube_bin().expect("checked"),
            ControlPlaneOptions {
                workloads: true,
                real_nodes: Some(UPLINK),
                ..Default::default()
            },
        );
        let mut cluster = RealCluster {
            nodes: Vec::new(),
            cp,
            uplink,
            router,
            dir,
        };
        for (i, spec) in nodes.iter().enumerate() {
            let net: ipnet::Ipv4Net = spec.gateway.parse().expect("a gateway like 10.6.0.1/16");
            // The root namespace reaches the zone (the API server answers its kubelets).
            sh(&[
                "ip",
                "route",
                "add",
                &net.trunc().to_string(),
                "via",
                &ROUTER_UPLINK.to_string(),
            ]);
            let node = RealNode::start(&cluster, spec, i).unwrap_or_else(|e| {
                panic!("node {}: {e}", spec.name);
            });
            cluster.nodes.push(node);
        }
        for n in &cluster.nodes {
            n.wait_ready(&cluster.cp, Duration::from_secs(120));
        }
        Some(cluster)
    }

    /// Imports the OCI archive into every node's containerd.
    pub fn import(&self, archive: &Path) {
        for n in &self.nodes {
            n.import(archive);
        }
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &RealNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The node named `name`, to stop or restart parts of it.
    pub fn node_mut(&mut self, name: &str) -> &mut RealNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub(super) fn router_name(&self) -> &str {
        &self.router.name
    }

    /// Runs helm (`SPIDERPOOL_HELM_BIN`) against the control plane as its admin.
    pub fn helm(&self, args: &[&str]) -> Output {
        let bin = helm_bin().expect("SPIDERPOOL_HELM_BIN (scripts/helm-tool.sh)");
        run(
            Command::new(bin.join("helm"))
                .arg("--kubeconfig")
                .arg(&self.cp.kubeconfig)
                .args(args),
            "",
        )
    }

    /// `helm install` (or, with `upgrade`, `helm upgrade`) of the project's chart in
    /// kube-system with the image `repository:tag`, then both rollouts waited for.
    pub fn install_chart(&self, image: &str, upgrade: bool, extra: &[&str]) {
        let (repository, tag) = image.rsplit_once(':').expect("an image REPOSITORY:TAG");
        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/spiderpool");
        let chart = chart.display().to_string();
        let set_repo = format!("image.repository={repository}");
        let set_tag = format!("image.tag={tag}");
        let verb = if upgrade { "upgrade" } else { "install" };
        let mut args = vec![verb, "spiderpool", &chart, "--namespace", "kube-system"];
        args.extend(["--set", &set_repo, "--set", &set_tag]);
        args.extend(extra);
        let out = self.helm(&args);
        assert!(out.success, "helm {verb}: {}{}", out.stdout, out.stderr);
        for w in [
            "daemonset/spiderpool-agent",
            "deployment/spiderpool-controller",
        ] {
            let args = [
                "-n",
                "kube-system",
                "rollout",
                "status",
                w,
                "--timeout=300s",
            ];
            let out = self.cp.kubectl(&args, "");
            if !out.success {
                panic!(
                    "kubectl {args:?} failed:\n{}{}\n{}",
                    out.stdout,
                    out.stderr,
                    self.why_not_ready()
                );
            }
        }
    }

    /// What kube-system's pods, their events and the project's containers' last log lines say:
    /// for a rollout that did not finish.
    pub fn why_not_ready(&self) -> String {
        let mut report = String::new();
        let mut add = |title: &str, args: &[&str]| {
            let out = self.cp.kubectl(args, "");
            report.push_str(&format!("--- {title}\n{}{}\n", out.stdout, out.stderr));
        };
        add("pods", &["-n", "kube-system", "get", "pods", "-o", "wide"]);
        add(
            "events",
            &[
                "-n",
                "kube-system",
                "get",
                "events",
                "--sort-by=.lastTimestamp",
            ],
        );
        for component in ["spiderpool-controller", "spiderpool-agent"] {
            let selector = format!("app.kubernetes.io/component={component}");
            add(
                &format!("{component} logs"),
                &[
                    "-n",
                    "kube-system",
                    "logs",
                    "-l",
                    &selector,
                    "--all-containers",
                    "--prefix",
                    "--tail=40",
                ],
            );
        }
        // (The events say most; the report is cut so a panic stays readable.)
        if report.len() > 60_000 {
            let cut = report.floor_char_boundary(60_000);
            report.truncate(cut);
            report.push_str("\n… (cut)");
        }
        report
    }

    /// `https://UPLINK:PORT`: the API server as the nodes reach it.
    pub fn server(&self) -> String {
        format!("https://{UPLINK}:{}", self.cp.port())
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        // Nodes first (their pods, runtimes and kubelets), while the API server still answers.
        for n in self.nodes.drain(..).rev() {
            drop(n);
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.uplink])
            .output();
    }
}

/// What a machine has of the things real nodes make, to compare before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footprint {
    /// Processes named kubelet, containerd, containerd-shim-runc-v2, kube-proxy.
    pub processes: usize,
    /// Lines of the root mount namespace's /proc/self/mountinfo.
    pub mounts: usize,
    /// Named network namespaces.
    pub netns: Vec<String>,
    /// Links of the root network namespace.
    pub links: usize,
    /// Routes of the root network namespace.
    pub routes: usize,
    /// Directories under the cgroup v1 hierarchies' roots.
    pub cgroups: usize,
}

impl Footprint {
    /// What the machine has now.
    pub fn now() -> Footprint {
        let count = |out: String| out.lines().filter(|l| !l.trim().is_empty()).count();
        let processes = [
            "kubelet",
            "containerd",
            "containerd-shim-runc-v2",
            "kube-proxy",
        ]
        .iter()
        .map(|p| {
            Command::new("pgrep")
                .args(["-x", p])
                .output()
                .map(|o| count(String::from_utf8_lossy(&o.stdout).into_owned()))
                .unwrap_or(0)
        })
        .sum();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|m| m.lines().count())
            .unwrap_or(0);
        let mut netns: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        netns.sort();
        let links = count(sh(&["ip", "-o", "link"]));
        let routes = count(sh(&["ip", "route"]));
        let cgroups = std::fs::read_dir("/sys/fs/cgroup")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|h| std::fs::read_dir(h.path()).ok())
                    .flat_map(|d| d.filter_map(|e| e.ok()))
                    .filter(|e| e.path().is_dir())
                    .count()
            })
            .unwrap_or(0);
        Footprint {
            processes,
            mounts,
            netns,
            links,
            routes,
            cgroups,
        }
    }
}

/// The seed's NetworkAttachmentDefinition's chain (macvlan with spiderpool IPAM, then `veth`)
/// as a node's CNI network: what Multus would delegate to for that NAD.
pub fn seed_chain() -> String {
    let nad: serde_json::Value =
        serde_norway::from_str(&macvlan_nad()).expect("the seed's NAD is YAML");
    nad["spec"]["config"]
        .as_str()
        .expect("the NAD's spec.config")
        .to_string()
}
