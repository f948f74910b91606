//! `ipam …`: seeing and repairing the address space.

use std::net::IpAddr;
use std::process::ExitCode;

use anyhow::bail;
use serde_json::json;
use spiderpool_api::Object;
use spiderpool_control::{apply, audit};
use spiderpool_core::{IpSet, Pool};
use spiderpool_store::{typed, Allocation, Kind, Store};

/// What `ipam check -o json` prints and `ipam release --from-report` reads.
#[derive(serde::Serialize, serde::Deserialize)]
struct Report {
    problems: Vec<audit::Problem>,
}

/// 0 when nothing was found, 1 otherwise.
fn exit_for(problems: &[audit::Problem]) -> ExitCode {
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

use crate::args::{Ipam, Output};

pub(crate) async fn run(store: &dyn Store, cmd: Ipam) -> anyhow::Result<ExitCode> {
    match cmd {
        Ipam::Release {
            from_report: Some(file),
            ..
        } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?
            };
            let report: Report = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not an `ipam check -o json` report: {e}",
                    file.display()
                )
            })?;
            let total = report.problems.len();
            let mut skipped = 0;
            for (i, p) in report.problems.iter().enumerate() {
                match audit::repair(store, p).await? {
                    audit::Repair::Done(what) => println!("[{}/{total}] {what}", i + 1),
                    audit::Repair::Skipped(why) => {
                        skipped += 1;
                        println!("[{}/{total}] skipped: {why}", i + 1)
                    }
                }
            }
            Ok(if skipped == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Ipam::Release { pool, ip, .. } => {
            let (Some(pool), Some(ip)) = (pool, ip) else {
                bail!("ipam release needs POOL and IP, or --from-report FILE");
            };
            let h = apply::release_unrecorded(store, &pool, ip).await?;
            println!(
                "released {ip} of spiderippool/{pool} (held by pod {}, container {}, interface {}, without an endpoint record)",
                h.pod, h.container_id, h.nic
            );
            Ok(ExitCode::SUCCESS)
        }
        Ipam::Check { output } => {
            let problems = audit::check(store).await?;
            if output == Some(Output::Json) {
                let report = Report { problems };
                println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
                return Ok(exit_for(&report.problems));
            }
            for p in &problems {
                println!("{p}");
            }
            if problems.is_empty() {
                println!("no inconsistency found");
            }
            Ok(exit_for(&problems))
        }
        Ipam::Gc {
            grace,
            node_grace,
            dry_run,
            output,
        } => gc(store, grace, node_grace, dry_run, output).await,
        Ipam::Show { pool, ip, output } => {
            let space = Space::read(store, pool.as_deref()).await?;
            match ip {
                Some(ip) => space.show_ip(store, ip, output).await,
                None => {
                    space.show(output);
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
    }
}

/// `ipam gc`: two scans `grace` apart; what both saw leaked (and is due) is reclaimed, each
/// judged once more in the releasing step.
async fn gc(
    store: &dyn Store,
    grace: std::time::Duration,
    node_grace: std::time::Duration,
    dry_run: bool,
    output: Option<Output>,
) -> anyhow::Result<ExitCode> {
    use spiderpool_control::reclaim::{self, Policy, Tracker};
    use std::time::SystemTime;
    let policy = Policy {
        grace_delay: grace,
        node_grace,
    };
    let json = output == Some(Output::Json);
    let mut tracker = Tracker::new();
    let scanned = reclaim::scan(store, &policy, None, SystemTime::now()).await?;
    for u in &scanned.unreadable {
        eprintln!("skipped {} {}: {}", u.kind, u.name, u.problem);
    }
    let first = scanned.leaks;
    if dry_run {
        if json {
            let leaks: Vec<_> = first
                .iter()
                .map(
                    |l| json!({"pod": l.pod, "uid": l.uid, "cause": l.cause.label(), "why": l.why}),
                )
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"leaks": leaks}))?
            );
        } else if first.is_empty() {
            println!("nothing to reclaim");
        } else {
            for l in &first {
                println!("would reclaim pod {} (UID {}): {}", l.pod, l.uid, l.why);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut reclaimed = Vec::new();
    let mut waiting = Vec::new();
    let mut failed = 0;
    if !first.is_empty() {
        tracker.full(first, &policy, SystemTime::now());
        // The second sighting, once the earliest leak can be ripe.
        tokio::time::sleep(grace).await;
        let now = SystemTime::now();
        let second = reclaim::scan(store, &policy, None, now).await?.leaks;
        let ripe = tracker.full(second.clone(), &policy, now);
        // Leaked, but the pod's own grace period is not over: said, and left for a later run.
        for l in second.iter().filter(|l| !ripe.contains(l)) {
            let until = l
                .due
                .map(|d| humantime::format_rfc3339_seconds(d + grace).to_string())
                .unwrap_or_default();
            if !json {
                println!(
                    "waiting: pod {} (UID {}): {}; its addresses go after {until}",
                    l.pod, l.uid, l.why
                );
            }
            waiting.push(json!({"pod": l.pod, "uid": l.uid, "cause": l.cause.label(),
                "why": l.why, "until": until}));
        }
        let outcomes = reclaim::reclaim_all(store, &policy, &ripe, SystemTime::now()).await?;
        for (leak, outcome) in ripe.iter().zip(outcomes) {
            match outcome {
                reclaim::Outcome::Reclaimed(done) => {
                    if !json {
                        println!(
                            "reclaimed {} from pod {} (UID {}): {}",
                            done.released.join(", "),
                            leak.pod,
                            leak.uid,
                            leak.why
                        );
                    }
                    reclaimed.push(json!({"pod": leak.pod, "uid": leak.uid, "cause": leak.cause.label(),
                        "why": leak.why, "released": done.released, "endpointDeleted": done.endpoint_deleted}));
                }
                reclaim::Outcome::NotLeaked => {}
                reclaim::Outcome::Failed(e) => {
                    failed += 1;
                    eprintln!("pod {} (UID {}): {e}", leak.pod, leak.uid);
                }
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"reclaimed": reclaimed, "waiting": waiting}))?
        );
    } else if reclaimed.is_empty() && waiting.is_empty() && failed == 0 {
        println!("nothing to reclaim");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One pool as read: its rules, its holders and what is free.
struct PoolSpace {
    pool: Pool,
    held: Vec<Allocation>,
    free: IpSet,
}

/// A SpiderSubnet and what the pools inside it hold.
struct SubnetSpace {
    name: String,
    subnet: ipnet::IpNet,
    usable: IpSet,
    held: IpSet,
}

/// Every pool (or one) and subnet, read once.
struct Space {
    subnets: Vec<SubnetSpace>,
    pools: Vec<PoolSpace>,
    reserved: Vec<(String, IpSet)>,
    /// Every reserved address: never free.
    all_reserved: IpSet,
}

/// One line of `ipam show`: a subnet or a pool.
struct Row {
    kind: &'static str,
    name: String,
    subnet: ipnet::IpNet,
    total: u128,
    used: u128,
    free: IpSet,
}

impl Row {
    fn to_json(&self) -> serde_json::Value {
        json!({"kind": self.kind, "name": self.name, "subnet": self.subnet.to_string(),
            "total": self.total as u64, "used": self.used as u64, "free": self.free.len() as u64,
            "freeRanges": self.free.to_strings()})
    }
}

/// `[####------]  40%`.
fn bar(used: u128, total: u128) -> String {
    const WIDTH: u128 = 10;
    let pct = (used * 100).checked_div(total).unwrap_or(0);
    let filled = (used * WIDTH).div_ceil(total.max(1)).min(WIDTH);
    format!(
        "[{}{}] {pct:>3}%",
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize)
    )
}

/// The first few ranges of `set`, then how many more.
fn ranges(set: &IpSet, at_most: usize) -> String {
    let all = set.to_strings();
    if all.is_empty() {
        return "-".into();
    }
    let mut out = all[..all.len().min(at_most)].join(",");
    if all.len() > at_most {
        out.push_str(&format!(",… ({} ranges)", all.len()));
    }
    out
}

impl Space {
    async fn read(store: &dyn Store, only: Option<&str>) -> anyhow::Result<Space> {
        let mut reserved = Vec::new();
        let mut all_reserved = IpSet::new();
        for (o, _) in typed::list(store, Kind::ReservedIP).await? {
            if let Object::ReservedIP(r) = o {
                if let Ok(set) = r.to_set() {
                    all_reserved = all_reserved.union(&set);
                    reserved.push((r.metadata.name.clone(), set));
                }
            }
        }
        let mut pools = Vec::new();
        for (o, _) in typed::list(store, Kind::IPPool).await? {
            let Object::IPPool(p) = o else { continue };
            if only.is_some_and(|n| n != p.metadata.name) {
                continue;
            }
            let pool = match p.to_pool() {
                Ok(pool) => pool,
                Err(e) => {
                    eprintln!("warning: skipping an invalid pool: {e}");
                    continue;
                }
            };
            let held = store.allocations(&pool.name).await?;
            let taken = IpSet::from_ips(held.iter().map(|a| a.ip));
            let free = pool.usable().difference(&taken).difference(&all_reserved);
            pools.push(PoolSpace { pool, held, free });
        }
        if let (Some(name), true) = (only, pools.is_empty()) {
            bail!("spiderippool {name:?} not found");
        }
        let mut subnets = Vec::new();
        for (o, _) in typed::list(store, Kind::Subnet).await? {
            let Object::Subnet(s) = o else { continue };
            let Ok(sp) = s.to_pool() else { continue };
            let inside: Vec<&PoolSpace> = pools
                .iter()
                .filter(|p| p.pool.subnet == sp.subnet)
                .collect();
            if only.is_some() && inside.is_empty() {
                continue;
            }
            let held = IpSet::from_ips(inside.iter().flat_map(|p| p.held.iter().map(|a| a.ip)));

            subnets.push(SubnetSpace {
                name: s.metadata.name.clone(),
                subnet: sp.subnet,
                usable: sp.usable(),
                held,
            });
        }
        Ok(Space {
            subnets,
            pools,
            reserved,
            all_reserved,
        })
    }

    fn rows(&self) -> Vec<Row> {
        let subnets = self.subnets.iter().map(|s| Row {
            kind: "SpiderSubnet",
            name: s.name.clone(),
            subnet: s.subnet,
            total: s.usable.len(),
            used: s.usable.intersection(&s.held).len(),
            free: s.usable.difference(&s.held).difference(&self.all_reserved),
        });
        let pools = self.pools.iter().map(|p| Row {
            kind: "SpiderIPPool",
            name: p.pool.name.clone(),
            subnet: p.pool.subnet,
            total: p.pool.usable().len(),
            used: p.held.len() as u128,
            free: p.free.clone(),
        });
        subnets.chain(pools).collect()
    }

    fn show(&self, output: Option<Output>) {
        let rows = self.rows();
        if output == Some(Output::Json) {
            let items: Vec<serde_json::Value> = rows.iter().map(Row::to_json).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"items": items})).expect("JSON")
            );
            return;
        }
        let header = [
            "KIND",
            "NAME",
            "SUBNET",
            "TOTAL",
            "USED",
            "FREE",
            "UTILISATION",
            "FREE-RANGES",
        ];
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    if r.kind == "SpiderSubnet" {
                        "subnet"
                    } else {
                        "ippool"
                    }
                    .to_string(),
                    r.name.clone(),
                    r.subnet.to_string(),
                    r.total.to_string(),
                    r.used.to_string(),
                    r.free.len().to_string(),
                    bar(r.used, r.total),
                    ranges(&r.free, 3),
                ]
            })
            .collect();
        crate::print::columns(&header, &table);
    }

    async fn show_ip(
        &self,
        store: &dyn Store,
        ip: IpAddr,
        output: Option<Output>,
    ) -> anyhow::Result<ExitCode> {
        let mut found = Vec::new();
        for p in &self.pools {
            if !p.pool.subnet.contains(&ip) {
                continue;
            }
            let state = if let Some(a) = p.held.iter().find(|a| a.ip == ip) {
                let h = &a.holder;
                // The pod's endpoint says since when, where it has a creation time.
                let since = typed::get(store, Kind::Endpoint, &h.pod)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|(o, _)| o.metadata().creation_timestamp.clone());
                json!({"state": "held", "pod": h.pod, "podUid": h.pod_uid, "containerID": h.container_id,
                    "interface": h.nic, "node": h.node, "since": since})
            } else if let Some((r, _)) = self.reserved.iter().find(|(_, s)| s.contains(&ip)) {
                json!({"state": "reserved", "by": format!("spiderreservedip/{r}")})
            } else if p.pool.exclude.contains(&ip) {
                json!({"state": "excluded", "by": "spec.excludeIPs"})
            } else if !p.pool.ips.contains(&ip) {
                json!({"state": "outside", "by": "not in spec.ips"})
            } else {
                json!({"state": "free"})
            };
            let mut state = state;
            state["pool"] = json!(p.pool.name);
            found.push(state);
        }
        if output == Some(Output::Json) {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"ip": ip.to_string(), "pools": found}))
                    .expect("JSON")
            );
        } else if found.is_empty() {
            println!("{ip} is in no pool's subnet");
        }
        for f in found.iter().filter(|_| output != Some(Output::Json)) {
            let pool = f["pool"].as_str().unwrap_or_default();
            let s = |k: &str| f[k].as_str().unwrap_or("-").to_string();
            match f["state"].as_str() {
                Some("held") => {
                    println!("{ip} is held in spiderippool/{pool}");
                    println!("  pod:        {} (UID {})", s("pod"), s("podUid"));
                    println!("  container:  {}", s("containerID"));
                    println!("  interface:  {}", s("interface"));
                    println!("  node:       {}", s("node"));
                    println!("  since:      {}", s("since"));
                }
                Some("free") => println!("{ip} is free in spiderippool/{pool}"),
                Some(other) => println!(
                    "{ip} is not handed out by spiderippool/{pool}: {other} ({})",
                    s("by")
                ),
                None => {}
            }
        }
        // Like grep: 0 when the address is held somewhere, 1 when not.
        Ok(if found.iter().any(|f| f["state"] == "held") {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    }
}
