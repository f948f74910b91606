//! Upstream's subnet performance scenario (I00006/I00008) on the local control plane: 30
//! Deployments of 2 replicas created at once, scaled to 3 and then to 1 at once, and deleted,
//! their pods run by two simulated nodes. Measured: the same scenario with the pods' addresses
//! from SpiderSubnet auto pools (`ipam.spidernet.io/subnet`, `ippool-ip-number: "+1"`: the
//! controller carves, grows, shrinks and deletes 30 pools), against a baseline in the same
//! run with every pod naming one SpiderIPPool (`ipam.spidernet.io/ippool`: the same pods, agents
//! and controller, no auto pools). The ratios are what auto pools cost on top.
//!
//! cargo build --release --workspace --bins && cargo bench -p spiderpool-testkit --bench subnet_scale

use spiderpool_testkit::scale::{deployments_scale, world, Addressing, ScaleTimings};

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
        "{label:<34} create {:>6.1} s   scale 2→3→1 {:>6.1} s   delete {:>6.1} s",
        t.create.as_secs_f64(),
        t.scale.as_secs_f64(),
        t.delete.as_secs_f64()
    );
}

fn main() {
    let Some(w) = world("bsc", &[subnet(), pool()]) else {
        eprintln!("SKIPPED: needs SPIDERPOOL_KUBE_BIN and root");
        return;
    };
    // Warm-up: the first pods pay for cold caches (API server, agents' views).
    deployments_scale(&w.cp, 3, &Addressing::Pool("baseline"));
    let base = deployments_scale(&w.cp, DEPLOYMENTS, &Addressing::Pool("baseline"));
    let auto = deployments_scale(
        &w.cp,
        DEPLOYMENTS,
        &Addressing::AutoPools {
            subnet: "subnet-6",
            ip_number: "+1",
        },
    );
    println!("{DEPLOYMENTS} Deployments, 2 → 3 → 1 replicas, on 2 simulated nodes");
    row("baseline (one SpiderIPPool)", &base);
    row("auto pools (SpiderSubnet, +1)", &auto);
    let ratio = |a: std::time::Duration, b: std::time::Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "ratio auto / baseline: create {:.2}, scale {:.2}, delete {:.2}",
        ratio(auto.create, base.create),
        ratio(auto.scale, base.scale),
        ratio(auto.delete, base.delete)
    );
}
