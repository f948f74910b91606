//! The race of issue "etcd datastore", timed: 10 agents, one pool of exactly 1,000 addresses,
//! 1,000 pods (100 per agent) through the real `spiderpool` binary, all started at once; on
//! etcd and, as the baseline in the same run, on SQLite (10 agents on one host). Then the scale
//! check: ADD latency on a /16 pool with 60,000 addresses held against an empty one, and how
//! long a restarted agent takes to answer.
//!
//! cargo build --release --workspace --bins && cargo bench -p spiderpool-testkit --bench race

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use spiderpool_store::{Holder, Kind, Op};
use spiderpool_testkit::{allocated, cpu_time, ctl, etcd_available, Agent, CniCall, Etcd};

const POOL_1000: &str = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: race}\nspec:\n  subnet: 10.6.0.0/16\n  ips: [10.6.1.0-10.6.4.231]\n";
const POOL_16: &str = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: big}\nspec:\n  subnet: 10.8.0.0/16\n  ips: [10.8.0.1-10.8.255.254]\n---\napiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: empty}\nspec:\n  subnet: 10.9.0.0/16\n  ips: [10.9.0.1-10.9.255.254]\n";

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn add(socket: &Path, pool: &str, i: usize) -> (bool, Duration) {
    let conf = json!({"cniVersion": "1.0.0", "name": "bench", "ipam": {"type": "spiderpool", "ipam_unix_socket_path": socket, "default_ipv4_ippool": [pool]}});
    let t = Instant::now();
    let out = CniCall::new(
        "ADD",
        &format!("ctr-{pool}-{i}"),
        &format!("pod-{pool}-{i}"),
        &conf,
    )
    .run();
    (out.success, t.elapsed())
}

/// Whether the run `label` is wanted: all by default, else those named in
/// SPIDERPOOL_BENCH_ONLY (comma-separated).
fn wanted(label: &str) -> bool {
    std::env::var("SPIDERPOOL_BENCH_ONLY").map_or(true, |only| only.split(',').any(|l| l == label))
}

/// `pace`: `None` starts every pod at once; `Some(d)` starts one every `d`. `server`: the
/// datastore's process, whose CPU time is reported.
fn race(label: &str, ds: &str, dir: &Path, pace: Option<Duration>, server: Option<u32>) {
    if !wanted(label) {
        return;
    }
    assert!(ctl(ds, &["apply", "-f", "-"], POOL_1000).success);
    let agents: Vec<Agent> = (0..10)
        .map(|i| {
            Agent::start(
                ds,
                &dir.join(format!("{}-{i}.sock", label.replace('/', "-per-"))),
                &format!("node-{i}"),
                "",
            )
        })
        .collect();
    let sockets: Vec<PathBuf> = agents.iter().map(|a| a.socket.clone()).collect();
    let server_cpu = || server.map_or(Duration::ZERO, |p| cpu_time(&p.to_string(), false));
    let cpu_before = (cpu_time("self", true), server_cpu());
    let start = Instant::now();
    let threads: Vec<_> = (0..1000)
        .map(|i| {
            let s = sockets[i % 10].clone();
            let at = start + pace.unwrap_or_default() * i as u32;
            std::thread::spawn(move || {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                add(&s, "race", i)
            })
        })
        .collect();
    let results: Vec<(bool, Duration)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let total = start.elapsed();
    let cpu_plugins = cpu_time("self", true) - cpu_before.0;
    let cpu_server = server_cpu() - cpu_before.1;
    let cpu_agents: Duration = agents
        .iter()
        .map(|a| cpu_time(&a.pid().to_string(), false))
        .sum();
    let failures = results.iter().filter(|(ok, _)| !ok).count();
    let mut lat: Vec<Duration> = results.iter().map(|(_, d)| *d).collect();
    lat.sort();
    let logs: Vec<String> = agents.iter().map(|a| a.log()).collect();
    if let Ok(keep) = std::env::var("SPIDERPOOL_BENCH_KEEP") {
        for (i, l) in logs.iter().enumerate() {
            std::fs::write(format!("{keep}/{}-{i}.log", label.replace('/', "-per-")), l).unwrap();
        }
    }
    let conflicts: usize = logs
        .iter()
        .map(|l| l.matches("retrying after a conflict").count())
        .sum();
    let mut served: Vec<Duration> = logs
        .iter()
        .flat_map(|l| l.lines())
        .filter(|l| l.contains("ADD served"))
        .filter_map(|l| {
            l.split("elapsed_us=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .map(Duration::from_micros)
        .collect();
    served.sort();
    let batched: Vec<usize> = logs
        .iter()
        .flat_map(|l| l.lines())
        .filter(|l| l.contains("committed a batch"))
        .filter_map(|l| {
            l.split("requests=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    println!(
        "{label:<11} 1000 pods / 1000 addresses / 10 agents: total {}, ADD p50 {}, p99 {} (inside the agent: p50 {}, p99 {}), failures {failures}, allocated {}, conflict retries {conflicts}, batches {} holding {} ADDs",
        ms(total),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(pct(&served, 0.5)),
        ms(pct(&served, 0.99)),
        allocated(ds, "race"),
        batched.len(),
        batched.iter().sum::<usize>()
    );
    println!(
        "{label:<11} CPU time: plugin processes {}, agents {}, datastore server {}",
        ms(cpu_plugins),
        ms(cpu_agents),
        ms(cpu_server)
    );
}

/// Fills `pool` with `n` holders straight through the store (CNI would take minutes).
fn fill(ds: &str, pool: &str, n: u32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = spiderpool_backends::open(&ds.parse().unwrap())
            .await
            .unwrap();
        let rev = store
            .get(Kind::IPPool, pool)
            .await
            .unwrap()
            .unwrap()
            .revision;
        for chunk in (0..n).collect::<Vec<_>>().chunks(60) {
            let ops = chunk
                .iter()
                .map(|i| Op::Claim {
                    pool: pool.into(),
                    ip: std::net::Ipv4Addr::from(
                        u32::from(std::net::Ipv4Addr::new(10, 8, 0, 1)) + i,
                    )
                    .into(),
                    holder: Holder {
                        pod: format!("default/filler-{i}"),
                        pod_uid: format!("u{i}"),
                        container_id: format!("filler-{i}"),
                        nic: "eth0".into(),
                        node: "elsewhere".into(),
                    },
                    pool_revision: rev,
                })
                .collect();
            store.commit(ops).await.unwrap();
        }
    });
}

fn scale(label: &str, ds: &str, dir: &Path) {
    if !wanted(label) {
        return;
    }
    assert!(ctl(ds, &["apply", "-f", "-"], POOL_16).success);
    let t = Instant::now();
    fill(ds, "big", 60_000);
    let filled = t.elapsed();
    let socket = dir.join(format!("{label}-scale.sock"));
    let mut agent = Agent::start(ds, &socket, "scale-node", "");
    let lat = |pool: &str, from: usize| {
        let mut v: Vec<Duration> = (from..from + 200)
            .map(|i| add(&socket, pool, i).1)
            .collect();
        v.sort();
        pct(&v, 0.5)
    };
    // Warm both, then measure in alternation so drift hits both alike.
    lat("empty", 0);
    lat("big", 0);
    let empty = lat("empty", 1000);
    let big = lat("big", 1000);
    agent.kill();
    let t = Instant::now();
    let _agent = Agent::start(ds, &socket, "scale-node", "");
    let ready = t.elapsed();
    // The first ADD after the restart waits for the view (60,000 holders) if it is not read yet.
    assert!(add(&socket, "big", 5000).0);
    let first = t.elapsed();
    println!(
        "{label:<12} /16 pool with {} held (filled in {}): ADD median {} vs empty pool {} (ratio {:.2}); restarted agent ready in {}, first ADD answered after {}",
        allocated(ds, "big"),
        ms(filled),
        ms(big),
        ms(empty),
        big.as_secs_f64() / empty.as_secs_f64(),
        ms(ready),
        ms(first)
    );
}

/// The harness's own floor: 1,000 `spiderpool` processes started at once that only answer
/// VERSION (no agent, no datastore).
fn floor() {
    if !wanted("floor") {
        return;
    }
    let cpu_before = cpu_time("self", true);
    let start = Instant::now();
    let threads: Vec<_> = (0..1000)
        .map(|_| {
            std::thread::spawn(|| {
                let mut c = CniCall::new("VERSION", "x", "x", &json!({"cniVersion": "1.0.0"}));
                c.container_id = None;
                let t = Instant::now();
                assert!(c.run().success);
                t.elapsed()
            })
        })
        .collect();
    let mut lat: Vec<Duration> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let total = start.elapsed();
    let cpu = cpu_time("self", true) - cpu_before;
    lat.sort();
    println!(
        "floor    1000 VERSION calls at once (no agent): total {}, p50 {}, p99 {}; CPU time of the plugin processes {}",
        ms(total),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(cpu)
    );
}

fn main() {
    // The agents' own debug lines (the conflicts and service times are counted from them),
    // without a line per address change per agent, which would cost more than the allocations
    // being measured.
    if std::env::var_os("SPIDERPOOL_TEST_LOG_LEVEL").is_none() {
        std::env::set_var(
            "SPIDERPOOL_TEST_LOG_LEVEL",
            "info,spiderpool_agent=debug,spiderpool_store=debug,spiderpool_backends=debug,spiderpool_control=debug",
        );
    }
    let dir =
        tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target")).unwrap();
    let etcd = etcd_available().then(Etcd::single);
    let pid = etcd.as_ref().and_then(|e| e.pid(0));
    // All at once is the noisiest: its rounds (floor, SQLite, etcd) are run several times,
    // interleaved so that drift hits each alike.
    let rounds: usize = std::env::var("SPIDERPOOL_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    for round in 0..rounds {
        floor();
        let sqlite = format!(
            "sqlite://{}",
            dir.path().join(format!("race-{round}.db")).display()
        );
        race("sqlite", &sqlite, dir.path(), None, None);
        if let Some(etcd) = &etcd {
            race(
                "etcd",
                &etcd.datastore(&format!("/race-{round}")),
                dir.path(),
                None,
                pid,
            );
        }
    }
    if let Some(etcd) = &etcd {
        // The same race with pods arriving at a steady rate instead of all at once: 250, 500
        // and 1,000 per second.
        for (label, every) in [
            ("etcd-250/s", 4000),
            ("etcd-500/s", 2000),
            ("etcd-1000/s", 1000),
        ] {
            race(
                label,
                &etcd.datastore(&format!("/paced-{every}")),
                dir.path(),
                Some(Duration::from_micros(every)),
                pid,
            );
        }
        scale("etcd-scale", &etcd.datastore("/scale"), dir.path());
    }
    let sqlite_scale = format!("sqlite://{}", dir.path().join("scale.db").display());
    scale("sqlite-scale", &sqlite_scale, dir.path());
}
