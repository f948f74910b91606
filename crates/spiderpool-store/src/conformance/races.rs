//! Several handles at once: compare-and-swap races, racing claims, commits cut short.

use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use serde_json::json;

use crate::{Expect, Kind, Op, Store, StoreError};

use super::*;

/// Read-modify-write with revision checks from many tasks over two handles loses no update.
pub async fn concurrent_compare_and_swap<F, Fut>(open: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let handles = [open().await, open().await];
    handles[0]
        .commit(vec![put(
            Kind::Namespace,
            "counter",
            json!({"metadata": {"annotations": {"n": "0"}}}),
            Expect::Absent,
        )])
        .await
        .unwrap();
    const TASKS: usize = 8;
    const EACH: u64 = 15;
    let mut joins = Vec::new();
    for t in 0..TASKS {
        let s = handles[t % 2].clone();
        joins.push(tokio::spawn(async move {
            let mut conflicts = 0u64;
            for _ in 0..EACH {
                loop {
                    let cur = s.get(Kind::Namespace, "counter").await.unwrap().unwrap();
                    let n: u64 = cur.value["metadata"]["annotations"]["n"]
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    match s
                        .commit(vec![put(
                            Kind::Namespace,
                            "counter",
                            json!({"metadata": {"annotations": {"n": (n + 1).to_string()}}}),
                            Expect::Revision(cur.revision),
                        )])
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Conflict(_)) => conflicts += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            conflicts
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    let v = handles[1]
        .get(Kind::Namespace, "counter")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        v.value["metadata"]["annotations"]["n"],
        (TASKS as u64 * EACH).to_string()
    );
}

/// Many tasks racing for the lowest free address of a small pool: each address goes to exactly
/// one of them, and exactly as many win as there are addresses.
pub async fn racing_claims_never_duplicate<F, Fut>(open: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let handles = [open().await, open().await];
    let rev = handles[0]
        .commit(vec![put(
            Kind::IPPool,
            "race",
            json!({"spec": {}}),
            Expect::Absent,
        )])
        .await
        .unwrap();
    const ADDRESSES: u8 = 10;
    const TASKS: usize = 16;
    let mut joins = Vec::new();
    for t in 0..TASKS {
        let s = handles[t % 2].clone();
        joins.push(tokio::spawn(async move {
            loop {
                let held: HashSet<IpAddr> = s
                    .allocations("race")
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|a| a.ip)
                    .collect();
                let free = (1..=ADDRESSES)
                    .map(|i| IpAddr::from([10, 9, 0, i]))
                    .find(|a| !held.contains(a))?;
                match s
                    .commit(vec![Op::Claim {
                        pool: "race".into(),
                        ip: free,
                        holder: holder(&format!("c{t}"), "eth0"),
                        pool_revision: rev,
                    }])
                    .await
                {
                    Ok(_) => return Some(free),
                    Err(StoreError::Conflict(_)) => continue,
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    let mut won = Vec::new();
    for j in joins {
        if let Some(a) = j.await.unwrap() {
            won.push(a);
        }
    }
    let unique: HashSet<_> = won.iter().collect();
    assert_eq!(won.len(), ADDRESSES as usize, "winners: {won:?}");
    assert_eq!(
        unique.len(),
        won.len(),
        "an address was handed out twice: {won:?}"
    );
    let stored = handles[1].allocations("race").await.unwrap();
    assert_eq!(stored.len(), ADDRESSES as usize);
}

/// A caller that goes away in the middle of a commit (its future dropped after a few
/// microseconds to a few milliseconds: before, between or after the backend's steps) leaves
/// the transaction applied whole or not at all, as a fresh handle sees it: a handover never
/// loses the released address without the claim, nor writes the record without either.
pub async fn commits_cut_short_are_all_or_nothing<F, Fut>(open: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let s = open().await;
    let r = s
        .commit(vec![put(
            Kind::IPPool,
            "p",
            json!({"spec": {}}),
            Expect::Absent,
        )])
        .await
        .unwrap();
    let old = |i: u32| ip(&format!("10.1.0.{i}"));
    let new = |i: u32| ip(&format!("10.2.0.{i}"));
    let n = 40;
    s.commit(
        (0..n)
            .map(|i| Op::Claim {
                pool: "p".into(),
                ip: old(i),
                holder: holder(&format!("c{i}"), "eth0"),
                pool_revision: r,
            })
            .collect(),
    )
    .await
    .unwrap();
    for i in 0..n {
        let ops = vec![
            Op::Release {
                pool: "p".into(),
                ip: old(i),
                container_id: format!("c{i}"),
                nic: "eth0".into(),
                pod_uid: String::new(),
            },
            Op::Claim {
                pool: "p".into(),
                ip: new(i),
                holder: holder(&format!("c{i}"), "eth0"),
                pool_revision: r,
            },
            put(
                Kind::Endpoint,
                &format!("default/c{i}"),
                json!({"i": i}),
                Expect::Absent,
            ),
        ];
        let cut = std::time::Duration::from_micros(u64::from(i * 53 % 2000));
        let _ = tokio::time::timeout(cut, s.commit(ops)).await;
    }
    // Whatever was still in flight when its caller left lands or never will: a state read
    // while commits still run may be half way (the reads are not one snapshot), so it is
    // read again until it settles; one that stays half applied fails.
    let fresh = open().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let applied = loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let held: HashSet<IpAddr> = fresh.held_ips("p").await.unwrap().into_iter().collect();
        let mut applied = 0;
        let mut half = None;
        for i in 0..n {
            let record = fresh
                .get(Kind::Endpoint, &format!("default/c{i}"))
                .await
                .unwrap()
                .is_some();
            let state = (held.contains(&old(i)), held.contains(&new(i)), record);
            if state != (false, true, true) && state != (true, false, false) {
                half = Some((i, state));
            }
            applied += usize::from(record);
        }
        match half {
            None => break applied,
            Some((i, state)) => assert!(
                std::time::Instant::now() < deadline,
                "commit {i} half applied: (old held, new held, record) = {state:?}"
            ),
        }
    };
    assert!(applied > 0, "no commit got through at all");
}
