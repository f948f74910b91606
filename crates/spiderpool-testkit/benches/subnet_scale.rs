//! Upstream's subnet performance scenario (I00006/I00008) on the local control plane: 30
//! Deployments of 2 replicas created at once, scaled to 3 and then to 1 at once, and deleted,
//! their pods run by two simulated nodes. Measured: the same scenario with the pods' addresses
//! from SpiderSubnet auto pools (`ipam.spidernet.io/subnet`, `ippool-ip-number: "+1"`: the
//! controller carves, grows, shrinks and deletes 30 pools), against a baseline in the same
//! run with every pod naming one SpiderIPPool (`ipam.spidernet.io/ippool`: the same pods, agents
//! and controller, no auto pools). The ratios are what auto pools cost on top.
//!
//! It also counts the controller's own API reads (GET and LIST, from the API server's audit
//! log, by the controller's ServiceAccount) in each step of the auto-pool scenario and in 30 s
//! of quiet after it, and prints the controller's per-loop reads-per-pass metric. With
//! `SPIDERPOOL_BASELINE_CONTROLLER=/path/to/an/older/spiderpool-controller` the auto-pool
//! scenario runs once more in the same run with that controller, so its reads and times stand
//! beside the current one's.
//!
//! cargo build --release --workspace --bins && cargo bench -p spiderpool-testkit --bench subnet_scale

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use spiderpool_testkit::scale::{
    deployments_scale, deployments_scale_observed, world_with, Addressing, ScaleTimings,
    WorldOptions, CONTROLLER_USER,
};
use spiderpool_testkit::ControlPlane;

const DEPLOYMENTS: usize = 30;

fn subnet() -> String {
    serde_json::json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderSubnet",
        "metadata": {"name": "subnet-6"},
        "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.168.1-10.6.168.150"], "gateway": "10.6.0.1"}})
    .to_string()
}

fn pool() -> String {
    serde_json::json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
        "metadata": {"name": "baseline"},
        "spec": {"subnet": "10.7.0.0/16", "ips": ["10.7.168.1-10.7.168.150"], "gateway": "10.7.0.1"}})
    .to_string()
}

fn row(label: &str, t: &ScaleTimings) {
    println!(
        "{label:<34} create {:>6.1} s   scale 2→3→1 {:>6.1} s (pods {:.1} s)   delete {:>6.1} s (pods {:.1} s)",
        t.create.as_secs_f64(),
        t.scale.as_secs_f64(),
        t.scale_pods.as_secs_f64(),
        t.delete.as_secs_f64(),
        t.delete_pods.as_secs_f64()
    );
}

const AUTO: Addressing<'static> = Addressing::AutoPools {
    subnet: "subnet-6",
    ip_number: "+1",
};

/// The controller's reads (GET, LIST) so far, by resource.
fn reads(cp: &ControlPlane) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for ((verb, resource), n) in cp.requests_by(CONTROLLER_USER) {
        if verb == "get" || verb == "list" {
            *out.entry(resource).or_insert(0) += n;
        }
    }
    out
}

fn minus(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    a.iter()
        .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// What one controller did in the auto-pool scenario.
struct Measured {
    timings: ScaleTimings,
    /// Reads by step (create, scale, delete, quiet 30 s).
    reads: Vec<(String, BTreeMap<String, u64>)>,
    /// The controller's `spiderpool_controller_api_reads_per_pass` (sum, count) by loop.
    per_pass: Vec<(String, f64, f64)>,
}

fn auto_pools_with(controller: Option<PathBuf>, prefix: &str) -> Option<Measured> {
    let options = WorldOptions {
        audit: true,
        controller,
    };
    let w = world_with(prefix, &[subnet()], &options)?;
    deployments_scale(&w.cp, 3, &AUTO);
    let mut last = reads(&w.cp);
    let mut steps = Vec::new();
    let timings = deployments_scale_observed(&w.cp, DEPLOYMENTS, &AUTO, &mut |step| {
        let now = reads(&w.cp);
        steps.push((step.to_string(), minus(&now, &last)));
        last = now;
    });
    std::thread::sleep(Duration::from_secs(30));
    steps.push(("quiet 30 s".into(), minus(&reads(&w.cp), &last)));
    // (An older controller may not have the metric: nothing is printed for it then.)
    let text = spiderpool_testkit::http_get(&w.controller.metrics, "/metrics").1;
    let value = |name: String| {
        text.lines()
            .find_map(|l| l.strip_prefix(name.as_str())?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let per_pass = ["pools", "autopool", "reclaim"]
        .into_iter()
        .map(|l| {
            let m = |what: &str| {
                value(format!(
                    "spiderpool_controller_api_reads_per_pass_{what}{{loop=\"{l}\"}}"
                ))
            };
            (l.to_string(), m("sum"), m("count"))
        })
        .collect();
    Some(Measured {
        timings,
        reads: steps,
        per_pass,
    })
}

fn report(label: &str, m: &Measured) {
    println!("controller reads (GET+LIST) by step, {label}:");
    for (step, by) in &m.reads {
        let total: u64 = by.values().sum();
        let per_app = total as f64 / DEPLOYMENTS as f64;
        let detail: Vec<String> = by.iter().map(|(r, n)| format!("{r} {n}")).collect();
        println!(
            "  {step:<11} {total:>6}  ({per_app:.1} per Deployment)  {}",
            detail.join(", ")
        );
    }
    for (l, sum, count) in &m.per_pass {
        if *count > 0.0 {
            println!(
                "  loop {l:<9} {count:>5} passes, {:.2} API reads per pass",
                sum / count
            );
        }
    }
}

fn main() {
    let Some(w) = world_with("bsc", &[subnet(), pool()], &WorldOptions::default()) else {
        eprintln!("SKIPPED: needs SPIDERPOOL_KUBE_BIN and root");
        return;
    };
    // Warm-up: the first pods pay for cold caches (API server, agents' views).
    deployments_scale(&w.cp, 3, &Addressing::Pool("baseline"));
    let base = deployments_scale(&w.cp, DEPLOYMENTS, &Addressing::Pool("baseline"));
    let auto = deployments_scale(&w.cp, DEPLOYMENTS, &AUTO);
    // SPIDERPOOL_BENCH_KEEP=1 keeps the controller's log of these two scenarios.
    if std::env::var_os("SPIDERPOOL_BENCH_KEEP").is_some() {
        let kept = std::env::temp_dir().join(format!(
            "subnet-scale-controller-{}.log",
            std::process::id()
        ));
        std::fs::write(&kept, w.controller.log()).expect("keeping the controller's log");
        println!("controller log kept in {}", kept.display());
    }
    drop(w);
    println!("{DEPLOYMENTS} Deployments, 2 → 3 → 1 replicas, on 2 simulated nodes");
    row("baseline (one SpiderIPPool)", &base);
    row("auto pools (SpiderSubnet, +1)", &auto);
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "ratio auto / baseline: create {:.2}, scale {:.2}, delete {:.2}",
        ratio(auto.create, base.create),
        ratio(auto.scale, base.scale),
        ratio(auto.delete, base.delete)
    );
    let old = std::env::var_os("SPIDERPOOL_BASELINE_CONTROLLER").map(PathBuf::from);
    if let Some(old) = old {
        if let Some(m) = auto_pools_with(Some(old.clone()), "bso") {
            row(&format!("auto pools, {}", old.display()), &m.timings);
            report(&old.display().to_string(), &m);
        }
    }
    if let Some(m) = auto_pools_with(None, "bsn") {
        row("auto pools, this controller", &m.timings);
        report("this controller", &m);
    }
}
