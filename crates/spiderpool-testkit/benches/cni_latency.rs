//! Whole-process CNI latency: N sequential ADD then N DEL through the real `spiderpool` binary,
//! agent and SQLite datastore, side by side with Debian's `/usr/lib/cni/host-local` on an
//! equivalent range, in one run. Reports median and p99 per operation and the ratio, plus the
//! agent's peak memory.
//!
//! cargo build --release --workspace --bins && cargo bench -p spiderpool-testkit --bench cni_latency
//! (BENCH_N=500 by default; both datastores live on the same disk, under target/.)

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spiderpool_testkit::{run, CniCall, Sandbox};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct Stats {
    median: Duration,
    p99: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    Stats {
        median: percentile(&v, 0.5),
        p99: percentile(&v, 0.99),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Times `n` ADDs then `n` DELs of `call(i, command)`.
fn time_ops(n: usize, call: impl Fn(usize, &str) -> CniCall, plugin: &Path) -> (Stats, Stats) {
    let mut adds = Vec::with_capacity(n);
    let mut dels = Vec::with_capacity(n);
    for (cmd, out) in [("ADD", &mut adds), ("DEL", &mut dels)] {
        for i in 0..n {
            let c = call(i, cmd);
            let mut p = Command::new(plugin);
            p.env_clear()
                .env("CNI_COMMAND", cmd)
                .env("CNI_CONTAINERID", c.container_id.as_deref().unwrap())
                .env("CNI_NETNS", c.netns.as_deref().unwrap())
                .env("CNI_IFNAME", "eth0")
                .env("CNI_ARGS", &c.args)
                .env("CNI_PATH", "/usr/lib/cni");
            let t = Instant::now();
            let o = run(&mut p, &c.stdin);
            out.push(t.elapsed());
            assert!(o.success, "{cmd} {i} failed: {}{}", o.stdout, o.stderr);
        }
    }
    (stats(adds), stats(dels))
}

fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    if !Path::new("/usr/lib/cni/host-local").exists() {
        eprintln!("SKIPPED: /usr/lib/cni/host-local missing (apt-get install containernetworking-plugins)");
        return;
    }
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-tmp");
    std::fs::create_dir_all(&base).unwrap();
    std::env::set_var("TMPDIR", &base);
    let sb = Sandbox::new();
    sb.apply(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: bench}\nspec:\n  subnet: 10.6.0.0/16\n  ips: [10.6.0.10-10.6.39.255]\n  gateway: 10.6.0.1\n",
    );
    let agent = sb.agent("bench-node", "zone=a");
    let sp_conf = json!({"cniVersion": "1.0.0", "name": "bench", "type": "macvlan",
        "ipam": {"type": "spiderpool", "ipam_unix_socket_path": agent.socket, "default_ipv4_ippool": ["bench"]}});
    let hl_dir = sb.dir.path().join("host-local");
    let hl_conf = json!({"cniVersion": "1.0.0", "name": "bench", "type": "macvlan",
        "ipam": {"type": "host-local", "dataDir": hl_dir,
                 "ranges": [[{"subnet": "10.6.0.0/16", "rangeStart": "10.6.0.10", "rangeEnd": "10.6.39.255", "gateway": "10.6.0.1"}]],
                 "routes": [{"dst": "0.0.0.0/0"}]}});
    let call = |conf: &Value| {
        let conf = conf.clone();
        move |i: usize, cmd: &str| {
            CniCall::new(
                cmd,
                &format!("bench-ctr-{i}"),
                &format!("bench-pod-{i}"),
                &conf,
            )
        }
    };
    let spiderpool = spiderpool_testkit::bin("spiderpool");
    // Warm both paths (page cache, agent caches) so neither pays first-run costs in the figures.
    let _ = time_ops(20, call(&sp_conf), &spiderpool);
    let _ = time_ops(20, call(&hl_conf), Path::new("/usr/lib/cni/host-local"));
    let (sp_add, sp_del) = time_ops(n, call(&sp_conf), &spiderpool);
    let (hl_add, hl_del) = time_ops(n, call(&hl_conf), Path::new("/usr/lib/cni/host-local"));
    let rss = spiderpool_testkit::burst::peak_rss_kib(agent.pid());
    println!("cni_latency: N={n} sequential ADD then DEL, one run");
    println!("{:<28} {:>12} {:>12}", "", "median", "p99");
    println!(
        "{:<28} {:>12} {:>12}",
        "spiderpool ADD",
        ms(sp_add.median),
        ms(sp_add.p99)
    );
    println!(
        "{:<28} {:>12} {:>12}",
        "host-local ADD",
        ms(hl_add.median),
        ms(hl_add.p99)
    );
    println!(
        "{:<28} {:>12} {:>12}",
        "spiderpool DEL",
        ms(sp_del.median),
        ms(sp_del.p99)
    );
    println!(
        "{:<28} {:>12} {:>12}",
        "host-local DEL",
        ms(hl_del.median),
        ms(hl_del.p99)
    );
    let r = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "ratio spiderpool/host-local: ADD median {:.2}, p99 {:.2}; DEL median {:.2}, p99 {:.2}",
        r(sp_add.median, hl_add.median),
        r(sp_add.p99, hl_add.p99),
        r(sp_del.median, hl_del.median),
        r(sp_del.p99, hl_del.p99)
    );
    println!("spiderpool-agent peak RSS: {} KiB", rss);
}
