//! What an operator's tools see of an agent: the health endpoints on `--health-addr`, as a
//! kubelet probe or a supervisor sees them (`/healthz` while the process serves, `/readyz` only
//! while the datastore answers), and the Prometheus metrics on `--metrics-addr`.

use std::time::{Duration, Instant};

use serde_json::json;
use spiderpool_testkit::{
    etcd_available, free_port, http_get as get, sample, Agent, CniCall, Etcd, Sandbox,
};

/// Polls `GET path` until it answers `status` (panics after 30 s).
fn until(addr: &str, path: &str, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, body) = get(addr, path);
        if s == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} kept answering {s}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn readyz_follows_the_datastore_and_healthz_the_process() {
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::single();
    let sb = Sandbox::on(etcd.datastore("/health"));
    let addr = format!("127.0.0.1:{}", free_port());
    let _agent = Agent::start_with(
        &sb.datastore(),
        &sb.socket("node-1"),
        "node-1",
        "",
        &["--health-addr", &addr],
        None,
    );
    assert_eq!(get(&addr, "/healthz"), (200, "ok".to_string()));
    assert_eq!(get(&addr, "/readyz"), (200, "ok".to_string()));
    etcd.kill(0);
    let why = until(&addr, "/readyz", 503);
    assert!(why.contains("datastore"), "{why}");
    assert_eq!(get(&addr, "/healthz").0, 200, "the process still serves");
    etcd.restart(0);
    until(&addr, "/readyz", 200);
}

/// The value of the sample `name` (with its labels, if any, as written) in an exposition.

#[test]
fn metrics_move_with_allocations_failures_and_releases() {
    let sb = Sandbox::new();
    sb.apply(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: p}\nspec: {subnet: 10.30.0.0/16, ips: [10.30.0.1-10.30.0.2]}\n",
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let agent = Agent::start_with(
        &sb.datastore(),
        &sb.socket("node-1"),
        "node-1",
        "",
        &["--metrics-addr", &addr],
        None,
    );
    let conf = |pools: &[&str]| {
        json!({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "spiderpool",
            "ipam_unix_socket_path": agent.socket, "default_ipv4_ippool": pools}})
    };
    let scrape = || {
        let (status, body) = get(&addr, "/metrics");
        assert_eq!(status, 200);
        body
    };
    let before = scrape();
    assert_eq!(
        sample(&before, "spiderpool_ipam_allocation_counts_total"),
        0.0
    );
    for i in 0..2 {
        let out = CniCall::new("ADD", &format!("c{i}"), &format!("p{i}"), &conf(&["p"])).run();
        assert!(out.success, "{}", out.stdout);
    }
    // The pool is full now; then a pool that does not exist.
    assert!(!CniCall::new("ADD", "c2", "p2", &conf(&["p"])).run().success);
    assert!(
        !CniCall::new("ADD", "c3", "p3", &conf(&["missing"]))
            .run()
            .success
    );
    assert!(CniCall::new("DEL", "c0", "p0", &conf(&["p"])).run().success);
    let after = scrape();
    assert_eq!(
        sample(&after, "spiderpool_ipam_allocation_counts_total"),
        4.0
    );
    assert_eq!(
        sample(&after, "spiderpool_ipam_allocation_failure_counts_total"),
        2.0
    );
    assert_eq!(
        sample(
            &after,
            "spiderpool_ipam_allocation_err_ip_used_out_counts_total"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "spiderpool_ipam_allocation_err_no_available_pool_counts_total"
        ),
        1.0
    );
    assert_eq!(
        sample(&after, "spiderpool_ipam_allocation_duration_seconds_count"),
        4.0
    );
    assert_eq!(sample(&after, "spiderpool_ipam_release_counts_total"), 1.0);
    assert_eq!(
        sample(&after, "spiderpool_ipam_release_failure_counts_total"),
        0.0
    );
    assert!(sample(&after, "spiderpool_ipam_allocation_max_duration_seconds") > 0.0);
    // Every successful ADD went through a commit; so did the DEL.
    assert_eq!(
        sample(&after, "spiderpool_agent_group_commit_size_sum"),
        2.0
    );
    assert!(
        sample(
            &after,
            "spiderpool_agent_datastore_commit_duration_seconds_count"
        ) >= 3.0
    );
    // Every metric the Grafana dashboard in deploy/ queries is one the agent or the controller
    // exports.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/grafana/spiderpool-dashboard.json"),
    )
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let controller = {
        let m = spiderpool_controller::metrics::Metrics::new();
        m.reclaimed("deleted", 0);
        m.render()
    };
    let exported: std::collections::BTreeSet<&str> = after
        .lines()
        .chain(controller.lines())
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split([' ', '{']).next())
        .collect();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("spiderpool_") {
                    queried += 1;
                    assert!(
                        exported.contains(word),
                        "the dashboard queries {word}, which neither the agent nor the controller exports"
                    );
                }
            }
        }
    }
    assert!(queried > 20, "{queried}");
    // The pools as the agent sees them: p has two addresses, one held after the DEL.
    assert_eq!(sample(&after, "spiderpool_total_ippool_counts"), 1.0);
    assert_eq!(
        sample(
            &after,
            "spiderpool_debug_ippool_total_ip_counts{pool=\"p\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(
            &after,
            "spiderpool_debug_ippool_available_ip_counts{pool=\"p\"}"
        ),
        1.0
    );
}

#[test]
fn a_conflict_between_two_agents_is_counted() {
    // Two agents on one datastore race for one pool: when one commits an address the other
    // chose too, the loser counts a conflict and chooses again. Rounds go on until one was
    // counted (a round of thirty concurrent ADDs nearly always has one).
    let sb = Sandbox::new();
    sb.apply(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: p}\nspec: {subnet: 10.31.0.0/16, ips: [10.31.0.1-10.31.0.60]}\n",
    );
    let agents: Vec<(Agent, String)> = ["node-1", "node-2"]
        .iter()
        .map(|node| {
            let addr = format!("127.0.0.1:{}", free_port());
            let a = Agent::start_with(
                &sb.datastore(),
                &sb.socket(node),
                node,
                "",
                &["--metrics-addr", &addr],
                None,
            );
            (a, addr)
        })
        .collect();
    let conflicts = || -> f64 {
        agents
            .iter()
            .map(|(_, addr)| {
                sample(
                    &get(addr, "/metrics").1,
                    "spiderpool_ipam_allocation_update_ippool_conflict_counts_total",
                )
            })
            .sum()
    };
    assert_eq!(conflicts(), 0.0);
    let sockets: Vec<std::path::PathBuf> = agents.iter().map(|(a, _)| a.socket.clone()).collect();
    let mut rounds = 0;
    while conflicts() == 0.0 {
        rounds += 1;
        assert!(
            rounds <= 20,
            "20 rounds of 30 racing ADDs and not one conflict counted"
        );
        let calls = |command: &'static str| {
            let threads: Vec<_> = (0..30)
                .map(|i| {
                    let socket = sockets[i % 2].clone();
                    std::thread::spawn(move || {
                        let conf = json!({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "spiderpool",
                            "ipam_unix_socket_path": socket, "default_ipv4_ippool": ["p"]}});
                        CniCall::new(command, &format!("c{i}"), &format!("pod-{i}"), &conf).run()
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect::<Vec<_>>()
        };
        let added = calls("ADD");
        let mut seen = std::collections::HashSet::new();
        for out in &added {
            assert!(out.success, "{}", out.stdout);
            let ip = out.json()["ips"][0]["address"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(seen.insert(ip.clone()), "{ip} handed out twice");
        }
        for out in calls("DEL") {
            assert!(out.success, "{}", out.stdout);
        }
    }
    assert_eq!(sb.allocated("p"), 0);
}
