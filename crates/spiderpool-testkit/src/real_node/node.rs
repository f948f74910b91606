//! One real node: its network namespace on its zone's segment, its mount namespace with the
//! node's own CNI, kubelet and socket directories bound in, its containerd, kubelet and
//! kube-proxy, and a teardown that leaves the machine as it was.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{RealCluster, PAUSE_IMAGE};
use crate::*;

/// How to make a node.
#[derive(Debug, Clone, Default)]
pub struct RealNodeSpec {
    /// The node's name (also its network namespace's).
    pub name: String,
    /// Labels kubelet registers the Node with.
    pub labels: Vec<(String, String)>,
    /// Its zone's gateway, `10.6.0.1/16`: the node takes the next address (10.6.0.2).
    pub gateway: String,
    /// The node's CNI network (a `.conflist`, written to its /etc/cni/net.d): what a meta
    /// plugin such as Multus would delegate to. `None`: none until [`RealNode::set_cni_conf`].
    pub cni_conf: Option<String>,
    /// Extra binaries put into the node's CNI bin directory (a real Multus where one exists).
    pub extra_plugins: Vec<PathBuf>,
}

/// Directories of the node's own, bound over the host's paths in its mount namespace.
const BOUND: [(&str, &str); 6] = [
    ("cni-conf", "/etc/cni/net.d"),
    ("cni-bin", "/opt/cni/bin"),
    ("spidernet", "/run/spidernet"),
    ("kubelet", "/var/lib/kubelet"),
    ("pod-logs", "/var/log/pods"),
    ("container-logs", "/var/log/containers"),
];

/// A running real node; stopped and removed on drop.
pub struct RealNode {
    /// Its name.
    pub name: String,
    /// Its address on its zone's segment.
    pub ip: Ipv4Addr,
    /// Where its state and logs are.
    pub dir: PathBuf,
    holder: Child,
    containerd: Option<Child>,
    kubelet: Option<Child>,
    kube_proxy: Option<Child>,
    kubelet_cmd: Vec<String>,
    cgroup_root: String,
    /// Host directories made as bind targets, removed at teardown (deepest first).
    made: Vec<PathBuf>,
    netns: Option<Netns>,
}

fn spawn_logged(argv: &[String], log: &Path) -> std::io::Result<Child> {
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
}

/// The cgroup hierarchies mounted (v1 ones, and a hybrid's unified v2 one).
fn hierarchies() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

impl RealNode {
    pub(super) fn start(
        cluster: &RealCluster,
        spec: &RealNodeSpec,
        index: usize,
    ) -> Result<RealNode, String> {
        let cp = &cluster.cp;
        let name = spec.name.clone();
        let dir = cluster.dir.path().join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        // The network: a veth from the router, the gateway's next address, forwarding on.
        let net: ipnet::Ipv4Net = spec.gateway.parse().map_err(|e| format!("gateway: {e}"))?;
        let ip = Ipv4Addr::from(u32::from(net.addr()) + 1);
        let netns = Netns::new(&name);
        let router = cluster.router_name().to_string();
        let up = format!("up{index}");
        sh(&[
            "ip", "link", "add", "ens192", "netns", &name, "type", "veth", "peer", "name", &up,
            "netns", &router,
        ]);
        sh(&[
            "ip",
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ip}/{}", net.prefix_len()),
            "dev",
            "ens192",
        ]);
        sh(&["ip", "-n", &name, "link", "set", "ens192", "up"]);
        sh(&[
            "ip",
            "-n",
            &router,
            "addr",
            "add",
            &spec.gateway,
            "dev",
            &up,
        ]);
        sh(&["ip", "-n", &router, "link", "set", &up, "up"]);
        sh(&[
            "ip",
            "-n",
            &name,
            "route",
            "add",
            "default",
            "via",
            &net.addr().to_string(),
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);

        // The mount namespace, held by a sleep, and the node's own directories bound in.
        let holder = Command::new("nsenter")
            .arg(format!("--net={}", netns.path()))
            .args([
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "slave",
                "--",
                "sleep",
                "infinity",
            ])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the namespace holder: {e}"))?;
        let mut node = RealNode {
            name: name.clone(),
            ip,
            dir: dir.clone(),
            holder,
            containerd: None,
            kubelet: None,
            kube_proxy: None,
            kubelet_cmd: Vec::new(),
            cgroup_root: format!("/spiderpool-{name}"),
            made: Vec::new(),
            netns: Some(netns),
        };
        node.wait_holder()?;
        for (own, path) in BOUND {
            let src = dir.join(own);
            std::fs::create_dir_all(&src).map_err(|e| e.to_string())?;
            node.make_target(Path::new(path))?;
            node.in_mounts(&["mount", "--bind", &src.display().to_string(), path])?;
        }
        // The node's CNI bin directory: Debian's plugins, and what the spec adds.
        let bin = dir.join("cni-bin");
        for e in std::fs::read_dir("/usr/lib/cni").map_err(|e| format!("/usr/lib/cni: {e}"))? {
            let e = e.map_err(|e| e.to_string())?;
            std::os::unix::fs::symlink(e.path(), bin.join(e.file_name()))
                .map_err(|e| e.to_string())?;
        }
        for p in &spec.extra_plugins {
            let to = bin.join(p.file_name().ok_or("an extra plugin without a name")?);
            std::fs::copy(p, to).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        if let Some(conf) = &spec.cni_conf {
            node.set_cni_conf(conf);
        }
        node.cgroups()?;
        node.start_containerd()?;
        node.import(&super::images::pause_image());
        node.start_kubelet(cp, &cluster.server(), &spec.labels)?;
        node.start_kube_proxy(cp, &cluster.server())?;
        Ok(node)
    }

    fn pid(&self) -> String {
        self.holder.id().to_string()
    }

    fn wait_holder(&mut self) -> Result<(), String> {
        // The holder has entered its namespaces once it execs sleep.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.holder.id()))
                .unwrap_or_default();
            if comm.trim() == "sleep" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("the namespace holder did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `argv` in the node's mount and network namespaces.
    pub fn exec(&self, argv: &[&str]) -> Output {
        let pid = self.pid();
        run(
            Command::new("nsenter")
                .args(["-t", &pid, "-m", "-n", "--"])
                .args(argv),
            "",
        )
    }

    fn in_mounts(&self, argv: &[&str]) -> Result<(), String> {
        let out = self.exec(argv);
        if out.success {
            Ok(())
        } else {
            Err(format!(
                "{argv:?} in node {}: {}{}",
                self.name, out.stdout, out.stderr
            ))
        }
    }

    /// Makes `path` (and missing parents) on the host, remembering what it made.
    fn make_target(&mut self, path: &Path) -> Result<(), String> {
        let mut missing = Vec::new();
        let mut p = path.to_path_buf();
        while !p.exists() {
            missing.push(p.clone());
            if !p.pop() {
                break;
            }
        }
        std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Parents first in `made`; removed in reverse.
        self.made.extend(missing.into_iter().rev());
        Ok(())
    }

    /// Replaces the node's CNI network configuration.
    pub fn set_cni_conf(&self, conflist: &str) {
        std::fs::write(self.dir.join("cni-conf/10-node.conflist"), conflist).expect("CNI config");
    }

    /// The node's CNI bin directory and CNI config directory, each listed (name and size), to
    /// compare before and after an install.
    pub fn cni_dirs(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in ["cni-bin", "cni-conf"] {
            if let Ok(entries) = std::fs::read_dir(self.dir.join(d)) {
                for e in entries.flatten() {
                    let len = std::fs::symlink_metadata(e.path())
                        .map(|m| m.len())
                        .unwrap_or(0);
                    out.push(format!("{d}/{} {len}", e.file_name().to_string_lossy()));
                }
            }
        }
        out.sort();
        out
    }

    /// A cgroup root of the node's own in every hierarchy (cpuset's filled from its parent).
    fn cgroups(&self) -> Result<(), String> {
        for h in hierarchies() {
            let d = h.join(self.cgroup_root.trim_start_matches('/'));
            std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(v) = std::fs::read_to_string(h.join(f)) {
                    let _ = std::fs::write(d.join(f), v.trim());
                }
            }
        }
        Ok(())
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn start_containerd(&mut self) -> Result<(), String> {
        let d = self.dir.join("containerd");
        let conf = self.dir.join("containerd.toml");
        std::fs::write(
            &conf,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{ttrpc}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"#,
                root = d.join("root").display(),
                state = d.join("state").display(),
                sock = self.socket().display(),
                ttrpc = self.dir.join("containerd-ttrpc.sock").display(),
                opt = d.join("opt").display(),
            ),
        )
        .map_err(|e| e.to_string())?;
        let pid = self.pid();
        let argv: Vec<String> = [
            "nsenter",
            "-t",
            &pid,
            "-m",
            "-n",
            "--",
            "containerd",
            "--config",
        ]
        .map(String::from)
        .into_iter()
        .chain([conf.display().to_string()])
        .collect();
        let log = self.dir.join("containerd.log");
        let mut child = spawn_logged(&argv, &log).map_err(|e| format!("containerd: {e}"))?;
        let sock = self.socket();
        wait_ready(
            &format!("containerd of {}", self.name),
            &mut child,
            &log,
            Duration::from_secs(30),
            Duration::from_millis(50),
            || sock.exists(),
        );
        self.containerd = Some(child);
        Ok(())
    }

    /// `ctr` against the node's containerd, in the CRI namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        run(
            Command::new("ctr")
                .arg("--address")
                .arg(self.socket())
                .args(["-n", "k8s.io"])
                .args(args),
            "",
        )
    }

    /// Imports an OCI archive into the node's containerd.
    pub fn import(&self, archive: &Path) {
        let out = self.ctr(&["images", "import", &archive.display().to_string()]);
        assert!(
            out.success,
            "importing {} into {}: {}{}",
            archive.display(),
            self.name,
            out.stdout,
            out.stderr
        );
    }

    fn start_kubelet(
        &mut self,
        cp: &ControlPlane,
        server: &str,
        labels: &[(String, String)],
    ) -> Result<(), String> {
        let name = self.name.clone();
        let node_user = format!("system:node:{name}");
        let client = format!("kubelet-{name}");
        cp.issue(&client, &node_user, &["system:nodes"], None);
        let kubeconfig = cp.kubeconfig_for(&client, server);
        let serving = cp.issue(
            &format!("kubelet-serving-{name}"),
            &node_user,
            &["system:nodes"],
            Some(&format!("IP:{},DNS:{name}", self.ip)),
        );
        let ca = cp.pki().join("ca.crt");
        let config = self.dir.join("kubelet.yaml");
        std::fs::write(
            &config,
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
failSwapOn: false
containerRuntimeEndpoint: unix://{sock}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: {cert}
tlsPrivateKeyFile: {key}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
volumePluginDir: {plugins}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "1Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}}
nodeStatusUpdateFrequency: 4s
resolvConf: /etc/resolv.conf
"#,
                cgroup_root = self.cgroup_root,
                sock = self.socket().display(),
                cert = serving.display(),
                key = serving.with_extension("key").display(),
                ca = ca.display(),
                plugins = self.dir.join("volume-plugins").display(),
            ),
        )
        .map_err(|e| e.to_string())?;
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let pid = self.pid();
        let mut argv: Vec<String> = ["nsenter", "-t", &pid, "-m", "-n", "--"]
            .map(String::from)
            .to_vec();
        argv.push(cp.component("kubelet").display().to_string());
        argv.extend([
            format!("--config={}", config.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--hostname-override={name}"),
            format!("--node-ip={}", self.ip),
            "--v=1".into(),
        ]);
        if !labels.is_empty() {
            argv.push(format!("--node-labels={}", labels.join(",")));
        }
        self.kubelet_cmd = argv;
        self.start_kubelet_again()
    }

    /// Starts kubelet (again, after [`RealNode::stop_kubelet`]).
    pub fn start_kubelet_again(&mut self) -> Result<(), String> {
        let log = self.dir.join("kubelet.log");
        let child = Command::new(&self.kubelet_cmd[0])
            .args(&self.kubelet_cmd[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .map_err(|e| e.to_string())?,
            )
            .spawn()
            .map_err(|e| format!("kubelet: {e}"))?;
        self.kubelet = Some(child);
        Ok(())
    }

    /// Stops kubelet (SIGKILL, as a node that died); its pods' containers keep running.
    pub fn stop_kubelet(&mut self) {
        if let Some(mut k) = self.kubelet.take() {
            let _ = k.kill();
            let _ = k.wait();
        }
    }

    fn start_kube_proxy(&mut self, cp: &ControlPlane, server: &str) -> Result<(), String> {
        let name = self.name.clone();
        let cert = format!("kube-proxy-{name}");
        cp.issue(&cert, "system:kube-proxy", &["system:node-proxier"], None);
        let kubeconfig = cp.kubeconfig_for(&cert, server);
        let pid = self.pid();
        let mut argv: Vec<String> = ["nsenter", "-t", &pid, "-m", "-n", "--"]
            .map(String::from)
            .to_vec();
        argv.push(cp.component("kube-proxy").display().to_string());
        argv.extend([
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--hostname-override={name}"),
            "--proxy-mode=iptables".into(),
            format!("--cluster-cidr={KUBE_PROXY_CLUSTER_CIDR}"),
            // Leave the machine-wide conntrack limits and timeouts as they are.
            "--conntrack-max-per-core=0".into(),
            "--conntrack-tcp-timeout-established=0".into(),
            "--conntrack-tcp-timeout-close-wait=0".into(),
            "--healthz-bind-address=127.0.0.1:10256".into(),
            "--metrics-bind-address=127.0.0.1:10249".into(),
            "--v=1".into(),
        ]);
        let log = self.dir.join("kube-proxy.log");
        let child = spawn_logged(&argv, &log).map_err(|e| format!("kube-proxy: {e}"))?;
        self.kube_proxy = Some(child);
        Ok(())
    }

    /// Waits until the Node is Ready.
    pub(super) fn wait_ready(&self, cp: &ControlPlane, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let out = cp.kubectl(
                &[
                    "get",
                    "node",
                    &self.name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ],
                "",
            );
            if out.success && out.stdout.trim() == "True" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} not Ready in time: {}\nkubelet:\n{}",
                self.name,
                out.stderr,
                self.log_tail("kubelet.log", 40)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The last `n` lines of one of the node's logs (`kubelet.log`, `containerd.log`,
    /// `kube-proxy.log`).
    pub fn log_tail(&self, log: &str, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops every container of the node's containerd (the pods' processes).
    fn kill_containers(&self) {
        for _ in 0..3 {
            let out = self.ctr(&["tasks", "list", "-q"]);
            let tasks: Vec<String> = out.stdout.lines().map(str::to_string).collect();
            if tasks.is_empty() {
                break;
            }
            for t in &tasks {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", t]);
            }
            std::thread::sleep(Duration::from_millis(300));
            for t in &tasks {
                let _ = self.ctr(&["tasks", "delete", "-f", t]);
            }
        }
        let out = self.ctr(&["containers", "list", "-q"]);
        for c in out.stdout.lines() {
            let _ = self.ctr(&["containers", "delete", c]);
        }
    }

    fn remove_cgroups(&self) {
        fn rmdir_deep(d: &Path) {
            if let Ok(entries) = std::fs::read_dir(d) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        rmdir_deep(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(d);
        }
        for h in hierarchies() {
            rmdir_deep(&h.join(self.cgroup_root.trim_start_matches('/')));
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop_kubelet();
        if let Some(mut p) = self.kube_proxy.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        if self.containerd.is_some() {
            self.kill_containers();
        }
        if let Some(mut c) = self.containerd.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).output();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Shims left by a containerd that went away keep their containers: end them.
        let _ = Command::new("pkill")
            .args([
                "-f",
                &format!(
                    "containerd-shim-runc-v2 .*-address {}",
                    self.socket().display()
                ),
            ])
            .output();
        // The mount namespace goes with its last process: the holder.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        self.remove_cgroups();
        for d in self.made.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
        self.netns.take();
    }
}
