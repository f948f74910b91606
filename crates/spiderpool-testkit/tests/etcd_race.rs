//! Many hosts, one pool, never a duplicate address: agents on an etcd datastore racing for the
//! last free addresses of one pool through the real `spiderpool` binary, with agents, the
//! datastore and cluster members failing in the middle.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::json;
use spiderpool_testkit::{allocated, ctl, etcd_available, Agent, CniCall, Etcd, Output};

/// 10.6.1.0 .. 10.6.4.231: exactly 1,000 addresses.
const POOL_1000: &str = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: race}\nspec:\n  subnet: 10.6.0.0/16\n  ips: [10.6.1.0-10.6.4.231]\n  gateway: 10.6.0.1\n";

fn agents(datastore: &str, dir: &std::path::Path, n: usize) -> Vec<Agent> {
    (0..n)
        .map(|i| {
            Agent::start(
                datastore,
                &dir.join(format!("node-{i}.sock")),
                &format!("node-{i}"),
                "zone=a",
            )
        })
        .collect()
}

fn call(command: &str, socket: &std::path::Path, i: usize) -> CniCall {
    let conf = json!({"cniVersion": "1.0.0", "name": "race", "ipam": {"type": "spiderpool", "ipam_unix_socket_path": socket, "default_ipv4_ippool": ["race"]}});
    CniCall::new(command, &format!("ctr-{i}"), &format!("pod-{i}"), &conf)
}

/// Runs one CNI call per pod, all at once, `pods[i]` through agent `i % agents`.
fn storm(
    command: &str,
    sockets: &[std::path::PathBuf],
    pods: std::ops::Range<usize>,
) -> Vec<(usize, Output, Duration)> {
    let threads: Vec<_> = pods
        .map(|i| {
            let socket = sockets[i % sockets.len()].clone();
            let command = command.to_string();
            std::thread::spawn(move || {
                let t = Instant::now();
                let out = call(&command, &socket, i).run();
                (i, out, t.elapsed())
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn address(out: &Output) -> String {
    out.json()["ips"][0]["address"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn ten_agents_race_for_a_pool_of_exactly_1000_addresses() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::single();
    let ds = etcd.datastore("/race");
    assert!(ctl(&ds, &["apply", "-f", "-"], POOL_1000).success);
    let dir = tempfile::tempdir().unwrap();
    let agents = agents(&ds, dir.path(), 10);
    let sockets: Vec<_> = agents.iter().map(|a| a.socket.clone()).collect();

    let results = storm("ADD", &sockets, 0..1000);
    all_succeeded(&results, "first race");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, out, _) in &results {
        if let Some(other) = seen.insert(address(out), *i) {
            panic!("{} handed to pod-{other} and pod-{i}", address(out));
        }
    }
    assert_eq!(seen.len(), 1000);
    assert_eq!(allocated(&ds, "race"), 1000);
    // The pool is full: one more pod is refused, naming the pool.
    let extra = call("ADD", &sockets[0], 5000).run();
    assert!(!extra.success);
    assert!(extra.json()["msg"]
        .as_str()
        .unwrap()
        .contains("race: exhausted (1000 of 1000 addresses in use)"));

    let results = storm("DEL", &sockets, 0..1000);
    all_succeeded(&results, "DEL of every pod");
    assert_eq!(allocated(&ds, "race"), 0);

    // Every agent's view has heard of every release, its own and the others': a second race
    // for the whole pool finds nothing held (a view still holding an address would refuse a
    // pod with "exhausted" at the end).
    let results = storm("ADD", &sockets, 1000..2000);
    all_succeeded(&results, "second race");
    assert_eq!(assert_consistent(&ds).len(), 1000);
}

/// Every call of the storm succeeded; otherwise says how many failed and how the first did.
fn all_succeeded(results: &[(usize, Output, Duration)], what: &str) {
    let failed: Vec<_> = results
        .iter()
        .filter(|(_, o, _)| !o.success)
        .map(|(i, o, _)| (i, &o.stdout))
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} calls failed, first: {:?}",
        failed.len(),
        failed.first()
    );
}

/// Every address held once, every endpoint backed by its addresses, every address by an
/// endpoint: the datastore is consistent. Returns the held addresses.
fn assert_consistent(ds: &str) -> HashSet<String> {
    let pool = ctl(ds, &["get", "ippool", "race", "-o", "json"], "").json();
    let held: HashMap<String, serde_json::Value> = pool["status"]["allocatedIPs"]
        .as_str()
        .map(|s| serde_json::from_str(s).unwrap())
        .unwrap_or_default();
    let eps = ctl(ds, &["get", "endpoint", "-o", "json"], "").json();
    let mut in_endpoints = HashSet::new();
    for ep in eps["items"].as_array().unwrap() {
        let pod = format!(
            "{}/{}",
            ep["metadata"]["namespace"].as_str().unwrap(),
            ep["metadata"]["name"].as_str().unwrap()
        );
        for nic in ep["status"]["current"]["ips"].as_array().unwrap() {
            let ip = nic["ipv4"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_string();
            let holder = held
                .get(&ip)
                .unwrap_or_else(|| panic!("endpoint {pod} names {ip}, which no pool record holds"));
            assert_eq!(holder["pod"], pod.as_str(), "{ip}");
            assert!(in_endpoints.insert(ip.clone()), "{ip} in two endpoints");
        }
    }
    for ip in held.keys() {
        assert!(
            in_endpoints.contains(ip),
            "{ip} is held without an endpoint"
        );
    }
    held.into_keys().collect()
}

#[test]
fn agents_killed_and_etcd_restarted_mid_storm_leave_no_duplicate() {
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::single();
    let ds = etcd.datastore("/faults");
    assert!(ctl(&ds, &["apply", "-f", "-"], POOL_1000).success);
    let dir = tempfile::tempdir().unwrap();
    let mut agents = agents(&ds, dir.path(), 4);
    let sockets: Vec<_> = agents.iter().map(|a| a.socket.clone()).collect();

    // A storm of 200 ADDs while two agents are killed with SIGKILL and restarted.
    let storm_sockets = sockets.clone();
    let adds = std::thread::spawn(move || storm("ADD", &storm_sockets, 0..200));
    std::thread::sleep(Duration::from_millis(150));
    for i in [1, 3] {
        agents[i].kill();
        agents[i] = Agent::start(&ds, &sockets[i], &format!("node-{i}"), "zone=a");
    }
    let results = adds.join().unwrap();
    for (i, out, _) in &results {
        if !out.success {
            // Only "try again later" is acceptable from a killed agent.
            assert_eq!(out.json()["code"], 11, "pod-{i}: {}", out.stdout);
        }
    }
    let ok: Vec<String> = results
        .iter()
        .filter(|(_, o, _)| o.success)
        .map(|(_, o, _)| address(o))
        .collect();
    assert_eq!(
        ok.len(),
        ok.iter().collect::<HashSet<_>>().len(),
        "duplicate address"
    );
    // An agent killed after its commit but before its answer leaves a recorded allocation
    // whose pod heard "try again later"; the retries below get those same addresses back.
    let held = assert_consistent(&ds);
    for a in &ok {
        assert!(
            held.contains(a.split('/').next().unwrap()),
            "{a} was answered but is not held"
        );
    }
    assert!(
        held.len() <= results.len(),
        "held {} for {} requests",
        held.len(),
        results.len()
    );

    // The single etcd restarted during a storm: requests succeed or say try again later.
    let storm_sockets = sockets.clone();
    let adds = std::thread::spawn(move || storm("ADD", &storm_sockets, 200..400));
    std::thread::sleep(Duration::from_millis(100));
    etcd.restart(0);
    let results = adds.join().unwrap();
    for (i, out, _) in &results {
        if !out.success {
            assert_eq!(out.json()["code"], 11, "pod-{i}: {}", out.stdout);
        }
    }
    assert_consistent(&ds);
    // Each agent's watch ended with the restart and was started again: a change made now
    // reaches every agent.
    for a in &agents {
        a.wait_for_log(&["following the datastore's changes"], 2);
    }
    let reserved = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderReservedIP\nmetadata: {name: after-restart}\nspec: {ips: [10.6.4.231]}\n";
    assert!(ctl(&ds, &["apply", "-f", "-"], reserved).success);
    for a in &agents {
        a.wait_for_log(&["spiderreservedips/after-restart"], 1);
    }
    // Retried by the runtime, every pod gets an address and nothing is held twice.
    for i in 0..400 {
        let out = call("ADD", &sockets[i % sockets.len()], i).run();
        assert!(out.success, "pod-{i} retry: {}", out.stdout);
    }
    assert_eq!(
        assert_consistent(&ds).len(),
        400,
        "retries reuse what a dead agent committed"
    );
}

#[test]
fn allocation_goes_on_when_one_of_three_members_dies() {
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::cluster(3);
    let ds = etcd.datastore("/cluster");
    assert!(ctl(&ds, &["apply", "-f", "-"], POOL_1000).success);
    let dir = tempfile::tempdir().unwrap();
    let agents = agents(&ds, dir.path(), 2);
    let sockets: Vec<_> = agents.iter().map(|a| a.socket.clone()).collect();
    all_succeeded(&storm("ADD", &sockets, 0..50), "all members up");
    etcd.kill(0);
    all_succeeded(&storm("ADD", &sockets, 50..100), "one member down");
    assert_eq!(assert_consistent(&ds).len(), 100);
    // The agents watched through the first member; they watch again through another one, and
    // a change made now reaches them.
    for a in &agents {
        a.wait_for_log(&["following the datastore's changes"], 2);
    }
    let reserved = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderReservedIP\nmetadata: {name: member-down}\nspec: {ips: [10.6.4.231]}\n";
    assert!(ctl(&ds, &["apply", "-f", "-"], reserved).success);
    for a in &agents {
        a.wait_for_log(&["spiderreservedips/member-down"], 1);
    }
}

#[test]
fn an_agent_started_on_an_unreachable_etcd_names_the_endpoint() {
    let port = spiderpool_testkit::free_port();
    let dir = tempfile::tempdir().unwrap();
    let out = spiderpool_testkit::run(
        std::process::Command::new(spiderpool_testkit::bin("spiderpool-agent"))
            .args([
                "--node-name",
                "n1",
                "--datastore",
                &format!("etcd://127.0.0.1:{port}?prefix=/x"),
            ])
            .arg("--socket")
            .arg(dir.path().join("a.sock")),
        "",
    );
    assert!(!out.success);
    assert!(
        out.stderr.contains(&format!("etcd 127.0.0.1:{port}")),
        "{}",
        out.stderr
    );
    let out = ctl(&format!("etcd://127.0.0.1:{port}"), &["get", "ippool"], "");
    assert!(!out.success);
    assert!(
        out.stderr.contains(&format!("127.0.0.1:{port}")),
        "{}",
        out.stderr
    );
}
