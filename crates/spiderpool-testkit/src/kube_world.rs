//! A Kubernetes world for the tests: the seed's network zones as network namespaces, simulated
//! nodes with their agents on the Kubernetes API, the controller as a process, and waiting
//! helpers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::*;

/// The seed's zones: a router namespace with the gateways, one namespace per node with a veth
/// end `ens192` as macvlan master, the address after its gateway (the node's own) and
/// forwarding on.
pub struct Zones {
    _router: Netns,
    _nodes: Vec<Netns>,
}

pub fn zones(prefix: &str, nodes: &[(&str, &str)]) -> Zones {
    let router = Netns::new(&format!("{prefix}-r"));
    sh(&[
        "ip",
        "netns",
        "exec",
        &router.name,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    let mut out = Vec::new();
    for (i, (node, gw)) in nodes.iter().enumerate() {
        let ns = Netns::new(node);
        let up = format!("up{i}");
        sh(&[
            "ip",
            "link",
            "add",
            "ens192",
            "netns",
            &ns.name,
            "type",
            "veth",
            "peer",
            "name",
            &up,
            "netns",
            &router.name,
        ]);
        sh(&["ip", "-n", &ns.name, "link", "set", "ens192", "up"]);
        // Forwarding on, as on any Kubernetes node (kubeadm's preflight requires it): Service
        // traffic from the pods goes through the node.
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        // The node's own address, the one after its gateway (10.6.0.2/16 for 10.6.0.1/16),
        // and its default route through the gateway.
        let net: ipnet::Ipv4Net = gw.parse().expect("a gateway like 10.6.0.1/16");
        let node_ip = format!(
            "{}/{}",
            std::net::Ipv4Addr::from(u32::from(net.addr()) + 1),
            net.prefix_len()
        );
        sh(&[
            "ip", "-n", &ns.name, "addr", "add", &node_ip, "dev", "ens192",
        ]);
        sh(&["ip", "-n", &router.name, "addr", "add", gw, "dev", &up]);
        sh(&["ip", "-n", &router.name, "link", "set", &up, "up"]);
        let gw_ip = net.addr().to_string();
        sh(&[
            "ip", "-n", &ns.name, "route", "add", "default", "via", &gw_ip,
        ]);
        out.push(ns);
    }
    Zones {
        _router: router,
        _nodes: out,
    }
}

/// The seed's NetworkAttachmentDefinition, verbatim: macvlan with spiderpool IPAM, then `veth`
/// (the coordinator plugin) with the Service CIDR.
pub fn macvlan_nad() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/seed-zones/manifests/04-macvlan-nad.yaml"),
    )
    .expect("the seed's NAD")
}

/// A simulated node whose plugins reach its own agent at `/var/run/spidernet`.
pub struct KubeNode {
    /// The node simulator (stop it and the node "dies": no DEL comes).
    pub sim: NodeSim,
    /// The node's agent on `--datastore kubernetes`.
    pub agent: Agent,
    _dir: tempfile::TempDir,
}

/// Starts a simulated node `name` (its host is the network namespace `netns`, with Debian's
/// macvlan and the `spiderpool` plugin) and its agent with the flags `extra`.
pub fn kube_node(
    cp: &ControlPlane,
    name: &str,
    labels: &[(&str, &str)],
    netns: &str,
    extra: &[&str],
) -> KubeNode {
    let dir = tempfile::tempdir().expect("test setup");
    let cni = dir.path().join("cni-bin");
    std::fs::create_dir_all(&cni).expect("test setup");
    std::os::unix::fs::symlink("/usr/lib/cni/macvlan", cni.join("macvlan")).expect("test setup");
    std::os::unix::fs::symlink(bin("spiderpool"), cni.join("spiderpool")).expect("test setup");
    std::os::unix::fs::symlink(bin("veth"), cni.join("veth")).expect("test setup");
    let sim = NodeSim::start(
        &cp.kubeconfig,
        NodeSpec {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            host_netns: Some(netns.into()),
            cni_path: vec![cni],
            default_network: json!({}),
            run_dir: Some(dir.path().into()),
        },
    );
    let kc = cp.kubeconfig.to_str().expect("test setup").to_string();
    let mut flags = vec!["--kubeconfig", kc.as_str()];
    flags.extend_from_slice(extra);
    let agent = Agent::start_with(
        "kubernetes",
        &dir.path().join("spiderpool.sock"),
        name,
        "",
        &flags,
        None,
    );
    KubeNode {
        sim,
        agent,
        _dir: dir,
    }
}

/// `kubectl ARGS -o json`, parsed.
pub fn json_of(cp: &ControlPlane, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&cp.kubectl_ok(&a, "")).expect("test setup")
}

/// Waits (60 s at most) until `f` answers.
pub fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether a pod (as JSON) is Running and not terminating.
pub fn running(p: &Value) -> bool {
    p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
}

/// A running `spiderpool-controller`, killed on drop.
pub struct Controller {
    child: Child,
    log: PathBuf,
    /// Its `--health-addr`.
    pub health: String,
    /// Its `--metrics-addr`.
    pub metrics: String,
}

impl Controller {
    /// Starts a controller named `identity` on the control plane with the flags `extra`,
    /// logging beside `dir`, and waits until its health endpoint answers. Its webhooks listen
    /// on a port of their own on loopback, where it registers them.
    pub fn start(cp: &ControlPlane, dir: &Path, identity: &str, extra: &[&str]) -> Controller {
        let webhook = format!("127.0.0.1:{}", free_port());
        Self::start_as(&cp.kubeconfig, dir, identity, &webhook, extra)
    }

    /// [`Controller::start`] with the credentials of `kubeconfig`, its webhooks on `webhook`
    /// (`127.0.0.1:PORT`).
    pub fn start_as(
        kubeconfig: &Path,
        dir: &Path,
        identity: &str,
        webhook: &str,
        extra: &[&str],
    ) -> Controller {
        Self::start_bin(
            &bin("spiderpool-controller"),
            kubeconfig,
            dir,
            identity,
            webhook,
            extra,
        )
    }

    /// [`Controller::start_as`] from the binary `binary` (another build, say).
    pub fn start_bin(
        binary: &Path,
        kubeconfig: &Path,
        dir: &Path,
        identity: &str,
        webhook: &str,
        extra: &[&str],
    ) -> Controller {
        let log = dir.join(format!("{identity}.log"));
        let health = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let child = Command::new(binary)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--pod-name", identity, "--health-addr", &health])
            .args(["--metrics-addr", &metrics])
            .args(["--webhook-addr", webhook])
            .args(["--webhook-url", &format!("https://{webhook}")])
            .args([
                "--log-level",
                "info,spiderpool_controller=debug,spiderpool_controller::cache=trace,spiderpool_store=debug,spiderpool_backends=debug,spiderpool_control=debug",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("controller log"))
            .spawn()
            .expect("spawning spiderpool-controller");
        let mut c = Controller {
            child,
            log,
            health,
            metrics,
        };
        let health = c.health.clone();
        wait_ready(
            "spiderpool-controller",
            &mut c.child,
            &c.log,
            Duration::from_secs(30),
            Duration::from_millis(50),
            || http_get_quiet(&health, "/healthz") == Some(200),
        );
        c
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A sample of its metrics (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        match http_get_quiet(&self.metrics, "/metrics") {
            Some(200) => sample(&http_get(&self.metrics, "/metrics").1, name),
            _ => 0.0,
        }
    }

    /// The controller's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it (SIGKILL), as a crashed replica.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // What it logged last tells why a test waited for it in vain.
            let log = self.log();
            let kept = std::env::temp_dir().join(format!(
                "spiderpool-failed-{}-{}.log",
                self.log.file_stem().unwrap_or_default().to_string_lossy(),
                std::process::id()
            ));
            let _ = std::fs::write(&kept, &log);
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "--- the controller's last log lines (all of it kept in {}):\n{}",
                kept.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// The status code of `GET path` on `addr`, or `None` when nothing answers.
fn http_get_quiet(addr: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

/// The pod CIDR the test cluster's kube-proxies are told of (`--cluster-cidr`), kubespray's
/// beside the Service CIDR 10.233.0.0/18. The underlay subnets lie outside it, so kube-proxy
/// masquerades their Service traffic, as on a cluster whose pods are underlay.
pub const KUBE_PROXY_CLUSTER_CIDR: &str = "10.233.64.0/18";

/// A real kube-proxy (iptables mode) for one simulated node, run inside the node's network
/// namespace, where its rules take effect. It reaches the API server on loopback as any
/// node's kube-proxy would: a relay listens on the API server's address inside the node's
/// namespace. Killed on drop.
pub struct KubeProxy {
    child: Child,
    _relay: crate::Relay,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl KubeProxy {
    /// Starts kube-proxy for node `node` in the network namespace `netns` and waits until its
    /// first sync is done (its health endpoint answers 200).
    pub fn start(cp: &ControlPlane, node: &str, netns: &str) -> KubeProxy {
        let dir = tempfile::tempdir().expect("test setup");
        let api: std::net::SocketAddr = cp
            .server
            .trim_start_matches("https://")
            .parse()
            .expect("the API server on loopback");
        let relay = crate::Relay::start(netns, api, api).expect("relaying the API server");
        let log = dir.path().join("kube-proxy.log");
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(cp.component("kube-proxy"))
            .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
            .arg(format!("--hostname-override={node}"))
            .args(["--proxy-mode=iptables"])
            .arg(format!("--cluster-cidr={KUBE_PROXY_CLUSTER_CIDR}"))
            // Leave the machine-wide conntrack limits and timeouts as they are.
            .args([
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
            ])
            .args([
                "--healthz-bind-address=127.0.0.1:10256",
                "--metrics-bind-address=127.0.0.1:10249",
                "--v=2",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("kube-proxy log"))
            .spawn()
            .expect("starting kube-proxy");
        let mut p = KubeProxy {
            child,
            _relay: relay,
            log,
            _dir: dir,
        };
        let health: std::net::SocketAddr = "127.0.0.1:10256".parse().expect("address");
        wait_ready(
            &format!("kube-proxy of {node}"),
            &mut p.child,
            &p.log,
            Duration::from_secs(60),
            Duration::from_millis(200),
            || matches!(crate::http_get_in(netns, health, "/healthz"), Ok((200, _))),
        );
        p
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControlPlane {
    /// Asserts that `kubectl apply` of `doc` is refused by an admission webhook with `want` in
    /// its message.
    pub fn apply_refused(&self, doc: &str, want: &str) {
        let out = self.kubectl(&["apply", "-f", "-"], doc);
        assert!(!out.success, "accepted: {doc}\n{}", out.stdout);
        assert!(
            out.stderr.contains("denied the request") && out.stderr.contains(want),
            "want {want:?} in:\n{}",
            out.stderr
        );
    }
}
