//! Upstream's subnet scale scenario (I00006/I00008), shared by a test (which checks the subnet
//! afterwards) and a benchmark (which times it against a baseline): N Deployments of 2 replicas
//! created at once, scaled to 3 and then to 1 at once, and deleted, on a control plane with
//! simulated nodes. Their pods take addresses either from auto pools carved from a SpiderSubnet
//! (`ipam.spidernet.io/subnet`) or, as the baseline, from one pool named by
//! `ipam.spidernet.io/ippool`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::*;

/// How the Deployments' pods get addresses.
pub enum Addressing<'a> {
    /// Auto pools of this SpiderSubnet, `ippool-ip-number` as given.
    AutoPools {
        /// The subnet.
        subnet: &'a str,
        /// `ipam.spidernet.io/ippool-ip-number`.
        ip_number: &'a str,
    },
    /// One SpiderIPPool for all.
    Pool(&'a str),
}

/// How long each step took, until every pod of it ran (and, with auto pools, every pool was
/// as big as the step wants; after the delete, gone).
#[derive(Debug, Clone, Copy)]
pub struct ScaleTimings {
    /// Create N Deployments of 2 replicas.
    pub create: Duration,
    /// Scale them all to 3, then all to 1.
    pub scale: Duration,
    /// Delete them all.
    pub delete: Duration,
    /// Within `scale`: until the pods were as the last scale wants (the pools may follow later).
    pub scale_pods: Duration,
    /// Within `delete`: until every pod was gone (the pools may go later).
    pub delete_pods: Duration,
}

const LABEL: &str = "scale-scenario";

fn deployments(n: usize, addressing: &Addressing<'_>) -> String {
    let mut items = Vec::new();
    for i in 0..n {
        let name = format!("scale-{i:02}");
        let mut annotations =
            json!({"v1.multus-cni.io/default-network": "kube-system/macvlan-conf"});
        match addressing {
            Addressing::AutoPools { subnet, ip_number } => {
                annotations["ipam.spidernet.io/subnet"] =
                    json!({"ipv4": [subnet]}).to_string().into();
                annotations["ipam.spidernet.io/ippool-ip-number"] = (*ip_number).into();
            }
            Addressing::Pool(p) => {
                annotations["ipam.spidernet.io/ippool"] = json!({"ipv4": [p]}).to_string().into();
            }
        }
        items.push(json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "default", "labels": {LABEL: "yes"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name, LABEL: "yes"}, "annotations": annotations},
                    "spec": {"terminationGracePeriodSeconds": 0,
                        "containers": [{"name": "c", "image": "registry.invalid/app"}]}}}}));
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// The scenario's pods: (running with an address, all).
fn pods(cp: &ControlPlane) -> (usize, usize) {
    let v = json_of(cp, &["get", "pods", "-l", &format!("{LABEL}=yes")]);
    let items = v["items"].as_array().cloned().unwrap_or_default();
    let up = items
        .iter()
        .filter(|p| running(p) && p["status"]["podIP"].is_string())
        .count();
    (up, items.len())
}

/// The scenario's auto pools: their sizes (addresses in `spec.ips`).
pub fn auto_pool_sizes(cp: &ControlPlane) -> Vec<u64> {
    let v = json_of(
        cp,
        &[
            "get",
            "spiderippools",
            "-l",
            "ipam.spidernet.io/owner-application-kind=Deployment",
        ],
    );
    v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|p| {
            p["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("auto4-scale-"))
        })
        .map(|p| ip_count(&p["spec"]["ips"]))
        .collect()
}

/// The number of addresses of a CRD `ips` list (`a`, `a-b`, IPv4).
pub fn ip_count(ips: &Value) -> u64 {
    let v4 = |s: &str| s.parse::<std::net::Ipv4Addr>().map(u32::from).ok();
    ips.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|e| match e.split_once('-') {
            Some((a, b)) => match (v4(a), v4(b)) {
                (Some(a), Some(b)) if b >= a => u64::from(b - a) + 1,
                _ => 0,
            },
            None => u64::from(v4(e).is_some()),
        })
        .sum()
}

/// Waits (`limit` at most) until `f` answers, polling every 250 ms.
fn wait<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs the scenario with `n` Deployments; the control plane needs the controller, the
/// macvlan NAD `kube-system/macvlan-conf`, simulated nodes and the subnet or pool.
pub fn deployments_scale(cp: &ControlPlane, n: usize, addressing: &Addressing<'_>) -> ScaleTimings {
    deployments_scale_observed(cp, n, addressing, &mut |_| {})
}

/// [`deployments_scale`], calling `step` with `"create"`, `"scale"` and `"delete"` as each
/// step ends.
pub fn deployments_scale_observed(
    cp: &ControlPlane,
    n: usize,
    addressing: &Addressing<'_>,
    step: &mut dyn FnMut(&str),
) -> ScaleTimings {
    let limit = Duration::from_secs(300);
    let auto = matches!(addressing, Addressing::AutoPools { .. });
    // The pools' sizes each step wants (`+N` on 2, 3, 1 replicas).
    let extra: u64 = match addressing {
        Addressing::AutoPools { ip_number, .. } => {
            ip_number.trim_start_matches('+').parse().unwrap_or(0)
        }
        Addressing::Pool(_) => 0,
    };
    let flexible =
        matches!(addressing, Addressing::AutoPools { ip_number, .. } if ip_number.starts_with('+'));
    let want = |replicas: u64| if flexible { replicas + extra } else { extra };
    let pools_at = |replicas: u64| {
        let sizes = auto_pool_sizes(cp);
        !auto || (sizes.len() == n && sizes.iter().all(|s| *s == want(replicas)))
    };

    let started = Instant::now();
    cp.kubectl_ok(&["apply", "-f", "-"], &deployments(n, addressing));
    wait("every pod of the new Deployments running", limit, || {
        (pods(cp) == (2 * n, 2 * n) && pools_at(2)).then_some(())
    });
    let create = started.elapsed();
    step("create");

    let started = Instant::now();
    let selector = format!("-l={LABEL}=yes");
    cp.kubectl_ok(&["scale", "deployment", &selector, "--replicas=3"], "");
    wait("every Deployment scaled to 3", limit, || {
        (pods(cp) == (3 * n, 3 * n) && pools_at(3)).then_some(())
    });
    cp.kubectl_ok(&["scale", "deployment", &selector, "--replicas=1"], "");
    let mut scale_pods = None;
    wait("every Deployment scaled to 1", limit, || {
        let settled = pods(cp) == (n, n);
        if settled && scale_pods.is_none() {
            scale_pods = Some(started.elapsed());
        }
        (settled && pools_at(1)).then_some(())
    });
    let scale = started.elapsed();
    step("scale");

    let started = Instant::now();
    cp.kubectl_ok(&["delete", "deployment", &selector, "--wait=false"], "");
    let mut delete_pods = None;
    wait(
        "every Deployment gone with its pods and pools",
        limit,
        || {
            let gone = pods(cp) == (0, 0);
            if gone && delete_pods.is_none() {
                delete_pods = Some(started.elapsed());
            }
            (gone && (!auto || auto_pool_sizes(cp).is_empty())).then_some(())
        },
    );
    let delete = started.elapsed();
    step("delete");
    ScaleTimings {
        create,
        scale,
        delete,
        scale_pods: scale_pods.unwrap_or(scale),
        delete_pods: delete_pods.unwrap_or(delete),
    }
}

/// A controller running as a ServiceAccount of its own (not as the tests' kubectl user: the
/// webhook tells the reconciler's writes by their user).
pub fn controller(cp: &ControlPlane, dir: &std::path::Path, identity: &str) -> Controller {
    controller_of(cp, dir, identity, &bin("spiderpool-controller"))
}

/// The ServiceAccount user [`controller`] runs as.
pub const CONTROLLER_USER: &str = "system:serviceaccount:kube-system:spiderpool-controller";

/// [`controller`] from the binary `binary`.
pub fn controller_of(
    cp: &ControlPlane,
    dir: &std::path::Path,
    identity: &str,
    binary: &std::path::Path,
) -> Controller {
    if !cp
        .kubectl(
            &[
                "get",
                "serviceaccount",
                "-n",
                "kube-system",
                "spiderpool-controller",
            ],
            "",
        )
        .success
    {
        cp.kubectl_ok(
            &[
                "create",
                "serviceaccount",
                "-n",
                "kube-system",
                "spiderpool-controller",
            ],
            "",
        );
        cp.kubectl_ok(
            &[
                "create",
                "clusterrolebinding",
                "spiderpool-controller",
                "--clusterrole=cluster-admin",
                "--serviceaccount=kube-system:spiderpool-controller",
            ],
            "",
        );
    }
    let kc = cp.service_account_kubeconfig("kube-system", "spiderpool-controller");
    let webhook = format!("127.0.0.1:{}", free_port());
    Controller::start_bin(
        binary,
        &kc,
        dir,
        identity,
        &webhook,
        &["--auto-pool-resync", "3s"],
    )
}

/// A control plane with the controller (as its own ServiceAccount), the macvlan NAD, the
/// given subnets, and two simulated nodes: `node-a` (label `zone=a`, its agent waits the
/// default 50 s for an auto pool) and `node-b` (`zone=b`, 8 s).
pub struct World {
    /// The control plane.
    pub cp: ControlPlane,
    _zones: Zones,
    _nodes: Vec<KubeNode>,
    /// The controller.
    pub controller: Controller,
    /// Where the controllers log.
    pub dir: tempfile::TempDir,
}

/// [`World`], or `None` (skipped) without the control plane's binaries or root.
pub fn world(prefix: &str, subnets: &[String]) -> Option<World> {
    world_with(prefix, subnets, &WorldOptions::default())
}

/// How [`world_with`] builds the world.
#[derive(Debug, Clone, Default)]
pub struct WorldOptions {
    /// The API server logs every request (see [`ControlPlane::requests_by`]).
    pub audit: bool,
    /// The controller's binary (default: the workspace's).
    pub controller: Option<std::path::PathBuf>,
}

/// [`world`], as `options` say.
pub fn world_with(prefix: &str, subnets: &[String], options: &WorldOptions) -> Option<World> {
    let kbin = kube_bin()?;
    if !is_root() {
        eprintln!("SKIPPED: needs root for network namespaces");
        return None;
    }
    let cp = ControlPlane::start_with(
        &kbin,
        ControlPlaneOptions {
            workloads: true,
            audit: options.audit,
            ..Default::default()
        },
    );
    cp.install_crds();
    let n1 = format!("{prefix}-n1");
    let n2 = format!("{prefix}-n2");
    let z = zones(prefix, &[(&n1, "10.6.0.1/16"), (&n2, "10.7.0.1/16")]);
    cp.kubectl_ok(&["apply", "-f", "-"], &macvlan_nad());
    let dir = tempfile::tempdir().expect("test setup");
    let binary = options
        .controller
        .clone()
        .unwrap_or_else(|| bin("spiderpool-controller"));
    let controller = controller_of(&cp, dir.path(), &format!("{prefix}-c"), &binary);
    for s in subnets {
        cp.kubectl_ok(&["apply", "-f", "-"], s);
    }
    // Node a waits the default 50 s for an auto pool; node b only 8 s.
    let nodes = vec![
        kube_node(&cp, "node-a", &[("zone", "a")], &n1, &[]),
        kube_node(
            &cp,
            "node-b",
            &[("zone", "b")],
            &n2,
            &["--auto-pool-wait", "8s"],
        ),
    ];
    Some(World {
        cp,
        _zones: z,
        _nodes: nodes,
        controller,
        dir,
    })
}
