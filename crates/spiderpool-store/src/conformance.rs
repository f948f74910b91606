//! The conformance suite every Store backend must pass. Each check takes a function that opens
//! a handle on one shared datastore (for SQLite a new connection to the same file, standing in
//! for another process), so cross-handle races are exercised too.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use serde_json::json;

use crate::{Change, Expect, Holder, Kind, Op, Store, StoreError};

/// The names of the checks, each to run on a fresh datastore (see [`run_check`]).
pub const CHECKS: [&str; 9] = [
    "objects",
    "revisions",
    "txn",
    "claims",
    "cas",
    "race",
    "watch",
    "quiet",
    "cut",
];

/// Runs the check named `check` (one of [`CHECKS`]) on the fresh datastore `open` opens
/// handles on.
pub async fn run_check<F, Fut>(check: &str, open: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    match check {
        "objects" => objects_and_conditions(open().await).await,
        "revisions" => revisions_advance_by_one(open).await,
        "txn" => transactions_are_all_or_nothing(open().await).await,
        "claims" => claims_and_owned_releases(open().await).await,
        "cas" => concurrent_compare_and_swap(open).await,
        "race" => racing_claims_never_duplicate(open).await,
        "watch" => watch_reports_every_change(open().await).await,
        "quiet" => no_claims_since_guards_pool_changes(open().await).await,
        "cut" => commits_cut_short_are_all_or_nothing(open).await,
        other => panic!("no conformance check {other:?}"),
    }
}

fn put(kind: Kind, key: &str, value: serde_json::Value, expect: Expect) -> Op {
    Op::Put {
        kind,
        key: key.into(),
        value,
        expect,
    }
}

fn holder(container: &str, nic: &str) -> Holder {
    Holder {
        pod: format!("default/{container}"),
        pod_uid: format!("uid-{container}"),
        container_id: container.into(),
        nic: nic.into(),
        node: "n1".into(),
    }
}

/// An object whose data is one label (every backend keeps labels as they are written).
fn labelled(k: &str, v: &str) -> serde_json::Value {
    json!({"metadata": {"labels": {k: v}}, "spec": {}})
}

fn label<'a>(o: &'a serde_json::Value, k: &str) -> &'a str {
    o["metadata"]["labels"][k].as_str().unwrap_or_default()
}

/// A revision to check a pool's claims against: the datastore's, or where there is none
/// datastore-wide, the pool's own.
async fn check_point(s: &dyn Store, pool: &str) -> crate::Revision {
    match s.revision().await.unwrap() {
        Some(r) => r,
        None => s.get(Kind::IPPool, pool).await.unwrap().unwrap().revision,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn conflict<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Err(StoreError::Conflict(m)) => m,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

/// Put, get, list and delete with every kind of condition.
pub async fn objects_and_conditions(s: Arc<dyn Store>) {
    let r1 = s
        .commit(vec![put(
            Kind::Node,
            "n1",
            labelled("a", "1"),
            Expect::Absent,
        )])
        .await
        .unwrap();
    let got = s.get(Kind::Node, "n1").await.unwrap().unwrap();
    assert_eq!((label(&got.value, "a"), got.revision), ("1", r1));
    let m = conflict(
        s.commit(vec![put(Kind::Node, "n1", json!({}), Expect::Absent)])
            .await,
    );
    assert!(m.contains("nodes/n1 already exists"), "{m}");
    let r2 = s
        .commit(vec![put(
            Kind::Node,
            "n1",
            labelled("a", "2"),
            Expect::Revision(r1),
        )])
        .await
        .unwrap();
    assert!(r2 > r1);
    let m = conflict(
        s.commit(vec![put(
            Kind::Node,
            "n1",
            labelled("a", "3"),
            Expect::Revision(r1),
        )])
        .await,
    );
    assert!(
        m.contains(&format!("is at revision {r2}, expected {r1}")),
        "{m}"
    );
    assert_eq!(
        label(&s.get(Kind::Node, "n1").await.unwrap().unwrap().value, "a"),
        "2"
    );
    // Kinds are separate key spaces; list is ordered by key.
    s.commit(vec![
        put(Kind::Node, "n0", json!({}), Expect::Any),
        put(
            Kind::Pod,
            "default/n1",
            json!({"spec": {"containers": [{"name": "c", "image": "i"}]}}),
            Expect::Any,
        ),
    ])
    .await
    .unwrap();
    let keys: Vec<String> = s
        .list(Kind::Node)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["n0", "n1"]);
    assert_eq!(s.list(Kind::Pod).await.unwrap().len(), 1);
    assert!(s.list(Kind::Endpoint).await.unwrap().is_empty());
    let m = conflict(
        s.commit(vec![Op::Delete {
            kind: Kind::Node,
            key: "n1".into(),
            expect: Expect::Revision(r1),
        }])
        .await,
    );
    assert!(m.contains("nodes/n1"), "{m}");
    s.commit(vec![Op::Delete {
        kind: Kind::Node,
        key: "n1".into(),
        expect: Expect::Revision(r2),
    }])
    .await
    .unwrap();
    assert!(s.get(Kind::Node, "n1").await.unwrap().is_none());
    let m = conflict(
        s.commit(vec![Op::Delete {
            kind: Kind::Node,
            key: "n1".into(),
            expect: Expect::Revision(r2),
        }])
        .await,
    );
    assert!(m.contains("no longer exists"), "{m}");
    // Deleting what is not there without a condition is fine.
    s.commit(vec![Op::Delete {
        kind: Kind::Node,
        key: "n1".into(),
        expect: Expect::Any,
    }])
    .await
    .unwrap();
    s.ping().await.unwrap();
}

/// Every commit, from any handle, advances the datastore-wide revision by exactly one; a
/// failed transaction does not.
pub async fn revisions_advance_by_one<F, Fut>(open: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let (a, b) = (open().await, open().await);
    let Some(start) = a.revision().await.unwrap() else {
        return; // The backend has no datastore-wide revision; nothing to check.
    };
    let r1 = a
        .commit(vec![put(Kind::Namespace, "rev-a", json!({}), Expect::Any)])
        .await
        .unwrap();
    assert_eq!(r1, start + 1);
    assert_eq!(
        b.revision().await.unwrap(),
        Some(r1),
        "the other handle sees the commit"
    );
    let r2 = b
        .commit(vec![put(Kind::Namespace, "rev-b", json!({}), Expect::Any)])
        .await
        .unwrap();
    assert_eq!(r2, r1 + 1);
    conflict(
        a.commit(vec![put(
            Kind::Namespace,
            "rev-a",
            json!({}),
            Expect::Absent,
        )])
        .await,
    );
    assert_eq!(
        a.revision().await.unwrap(),
        Some(r2),
        "a failed transaction leaves the revision"
    );
}

/// A failing condition anywhere leaves every op of the transaction unapplied.
pub async fn transactions_are_all_or_nothing(s: Arc<dyn Store>) {
    let pool_rev = s
        .commit(vec![put(
            Kind::IPPool,
            "p",
            json!({"spec": {}}),
            Expect::Absent,
        )])
        .await
        .unwrap();
    s.commit(vec![Op::Claim {
        pool: "p".into(),
        ip: ip("10.0.0.2"),
        holder: holder("c0", "eth0"),
        pool_revision: pool_rev,
    }])
    .await
    .unwrap();
    let before = s.allocation_counts().await.unwrap();
    conflict(
        s.commit(vec![
            Op::Claim {
                pool: "p".into(),
                ip: ip("10.0.0.1"),
                holder: holder("c1", "eth0"),
                pool_revision: pool_rev,
            },
            put(Kind::Endpoint, "default/c1", json!({}), Expect::Absent),
            Op::Claim {
                pool: "p".into(),
                ip: ip("10.0.0.2"),
                holder: holder("c1", "net1"),
                pool_revision: pool_rev,
            },
        ])
        .await,
    );
    assert_eq!(s.allocation_counts().await.unwrap(), before);
    assert!(s.get(Kind::Endpoint, "default/c1").await.unwrap().is_none());
    // One address claimed twice inside one transaction is a conflict too.
    conflict(
        s.commit(vec![
            Op::Claim {
                pool: "p".into(),
                ip: ip("10.0.0.3"),
                holder: holder("c1", "eth0"),
                pool_revision: pool_rev,
            },
            Op::Claim {
                pool: "p".into(),
                ip: ip("10.0.0.3"),
                holder: holder("c1", "net1"),
                pool_revision: pool_rev,
            },
        ])
        .await,
    );
    assert_eq!(s.allocation_counts().await.unwrap(), before);
}

/// Claims need a free address and an unchanged pool; releases only free what their owner holds.
pub async fn claims_and_owned_releases(s: Arc<dyn Store>) {
    let r = s
        .commit(vec![put(
            Kind::IPPool,
            "p",
            json!({"spec": {}}),
            Expect::Absent,
        )])
        .await
        .unwrap();
    let claim = |c: &str, a: &str, rev| Op::Claim {
        pool: "p".into(),
        ip: ip(a),
        holder: holder(c, "eth0"),
        pool_revision: rev,
    };
    s.commit(vec![claim("c1", "10.0.0.1", r), claim("c1", "fd00::1", r)])
        .await
        .unwrap();
    let e = s
        .commit(vec![claim("c2", "10.0.0.1", r)])
        .await
        .unwrap_err();
    assert_eq!(e.taken(), Some(("p".to_string(), ip("10.0.0.1"))), "{e}");
    let m = conflict(Err::<(), _>(e));
    assert!(m.contains("10.0.0.1 of pool p is already held"), "{m}");
    // The pool changed since the choice was made. (Its revision is read again: where the
    // holders live in the pool object, as in Kubernetes, claims move it too.)
    let now = s.get(Kind::IPPool, "p").await.unwrap().unwrap().revision;
    let r2 = s
        .commit(vec![put(
            Kind::IPPool,
            "p",
            json!({"spec": {"disable": true}}),
            Expect::Revision(now),
        )])
        .await
        .unwrap();
    let e = s
        .commit(vec![claim("c2", "10.0.0.2", r)])
        .await
        .unwrap_err();
    assert_eq!(
        e.taken(),
        None,
        "the pool changed; no address was taken: {e}"
    );
    let m = conflict(Err::<(), _>(e));
    assert!(m.contains("spiderippools/p"), "{m}");
    // A claim on a pool that does not exist fails.
    conflict(
        s.commit(vec![Op::Claim {
            pool: "nope".into(),
            ip: ip("10.0.0.9"),
            holder: holder("c2", "eth0"),
            pool_revision: r2,
        }])
        .await,
    );
    let mut allocs = s.allocations("p").await.unwrap();
    allocs.sort_by_key(|a| a.ip);
    assert_eq!(allocs.len(), 2);
    assert_eq!(allocs[0].ip, ip("10.0.0.1"));
    assert_eq!(allocs[0].holder, holder("c1", "eth0"));
    let mut held = s.held_ips("p").await.unwrap();
    held.sort();
    assert_eq!(held, [ip("10.0.0.1"), ip("fd00::1")]);
    assert_eq!(
        s.allocation_counts().await.unwrap(),
        BTreeMap::from([("p".to_string(), 2)])
    );
    // A stale release (other container, other NIC) frees nothing.
    let release = |c: &str, nic: &str, a: &str| Op::Release {
        pool: "p".into(),
        ip: ip(a),
        container_id: c.into(),
        nic: nic.into(),
    };
    s.commit(vec![
        release("c2", "eth0", "10.0.0.1"),
        release("c1", "net1", "10.0.0.1"),
    ])
    .await
    .unwrap();
    assert_eq!(s.allocations("p").await.unwrap().len(), 2);
    s.commit(vec![
        release("c1", "eth0", "10.0.0.1"),
        release("c1", "eth0", "fd00::1"),
    ])
    .await
    .unwrap();
    assert!(s.allocations("p").await.unwrap().is_empty());
    assert!(s.allocation_counts().await.unwrap().is_empty());
    // A release followed by a claim in one transaction hands an address over.
    s.commit(vec![claim("c1", "10.0.0.7", r2)]).await.unwrap();
    s.commit(vec![
        release("c1", "eth0", "10.0.0.7"),
        claim("c9", "10.0.0.7", r2),
    ])
    .await
    .unwrap();
    let holders: Vec<_> = s
        .allocations("p")
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.ip == ip("10.0.0.7"))
        .collect();
    assert_eq!(holders[0].holder, holder("c9", "eth0"));
    s.commit(vec![release("c9", "eth0", "10.0.0.7")])
        .await
        .unwrap();
    // Releasing again is a no-op.
    s.commit(vec![release("c1", "eth0", "10.0.0.1")])
        .await
        .unwrap();
    s.commit(vec![claim("c2", "10.0.0.1", r2)]).await.unwrap();
}

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

/// A backend that can watch reports every change to allocations and to the watched kinds after
/// the revision it starts from, and nothing else, each key's changes in order; a backend that
/// cannot says so.
pub async fn watch_reports_every_change(s: Arc<dyn Store>) {
    let global = s.revision().await.unwrap();
    let r0 = global.unwrap_or(0);
    let Some(mut changes) = s.watch(r0, &[Kind::IPPool, Kind::Node]).await.unwrap() else {
        return;
    };
    let claim = |c: &str, a: &str, rev| Op::Claim {
        pool: "p".into(),
        ip: ip(a),
        holder: holder(c, "eth0"),
        pool_revision: rev,
    };
    let release = |c: &str, a: &str| Op::Release {
        pool: "p".into(),
        ip: ip(a),
        container_id: c.into(),
        nic: "eth0".into(),
    };
    let r1 = s
        .commit(vec![put(
            Kind::IPPool,
            "p",
            json!({"spec": {}}),
            Expect::Absent,
        )])
        .await
        .unwrap();
    let r2 = s
        .commit(vec![
            claim("c1", "10.0.0.1", r1),
            claim("c1", "fd00::1", r1),
        ])
        .await
        .unwrap();
    // An unwatched kind, and a handover: released and claimed in one transaction.
    let r3 = s
        .commit(vec![
            put(Kind::Endpoint, "default/x", json!({}), Expect::Any),
            release("c1", "10.0.0.1"),
            claim("c2", "10.0.0.1", r1),
        ])
        .await
        .unwrap();
    let r4 = s.commit(vec![release("c1", "fd00::1")]).await.unwrap();
    let r5 = s
        .commit(vec![put(Kind::Node, "n1", json!({}), Expect::Absent)])
        .await
        .unwrap();
    let alloc = |a: &str, held, revision| Change::Allocation {
        pool: "p".into(),
        ip: ip(a),
        held,
        revision,
    };
    let object = |kind, key: &str, revision| Change::Object {
        kind,
        key: key.into(),
        revision,
    };
    let want = vec![
        object(Kind::IPPool, "p", r1),
        alloc("10.0.0.1", true, r2),
        alloc("fd00::1", true, r2),
        alloc("10.0.0.1", true, r3),
        alloc("fd00::1", false, r4),
        object(Kind::Node, "n1", r5),
    ];
    let mut got = Vec::new();
    while got.len() < want.len() {
        let batch = tokio::time::timeout(std::time::Duration::from_secs(10), changes.recv())
            .await
            .unwrap_or_else(|_| panic!("the watch stopped after {got:?}"))
            .expect("the watch is still open")
            .unwrap();
        got.extend(batch);
    }
    // Each key's changes come in order; the allocations and each kind may interleave.
    got.sort_by_key(|c| match c {
        Change::Allocation { revision, .. } | Change::Object { revision, .. } => *revision,
    });
    if global.is_none() {
        // Without a datastore-wide revision a commit's writes have revisions of their own
        // (each object's): the changes and their order are what must match.
        let plain = |c: &Change| match c.clone() {
            Change::Allocation { pool, ip, held, .. } => Change::Allocation {
                pool,
                ip,
                held,
                revision: 0,
            },
            Change::Object { kind, key, .. } => Change::Object {
                kind,
                key,
                revision: 0,
            },
        };
        let got: Vec<Change> = got.iter().map(plain).collect();
        let want: Vec<Change> = want.iter().map(plain).collect();
        assert_eq!(got, want);
    } else {
        assert_eq!(got, want);
    }

    // A watch from a later revision starts there.
    let mut later = s.watch(r4, &[Kind::Node]).await.unwrap().unwrap();
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), later.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first, [object(Kind::Node, "n1", r5)]);
}

/// `NoClaimsSince` fails a transaction (writing nothing) when an address of the pool was
/// claimed after the revision, and only then: older claims and releases do not count.
pub async fn no_claims_since_guards_pool_changes(s: Arc<dyn Store>) {
    let r1 = s
        .commit(vec![put(
            Kind::IPPool,
            "p",
            labelled("v", "1"),
            Expect::Absent,
        )])
        .await
        .unwrap();
    let claim = |c: &str, a: &str| Op::Claim {
        pool: "p".into(),
        ip: ip(a),
        holder: holder(c, "eth0"),
        pool_revision: r1,
    };
    s.commit(vec![claim("c1", "10.0.0.1"), claim("c2", "10.0.0.2")])
        .await
        .unwrap();
    let since = check_point(s.as_ref(), "p").await;
    let update = |v: i64, since| {
        vec![
            Op::Put {
                kind: Kind::IPPool,
                key: "p".into(),
                value: labelled("v", &v.to_string()),
                expect: Expect::Any,
            },
            Op::NoClaimsSince {
                pool: "p".into(),
                since,
            },
        ]
    };
    // A release after the revision and claims in another pool are no reason to fail.
    s.commit(vec![Op::Release {
        pool: "p".into(),
        ip: ip("10.0.0.2"),
        container_id: "c2".into(),
        nic: "eth0".into(),
    }])
    .await
    .unwrap();
    s.commit(vec![put(
        Kind::IPPool,
        "q",
        json!({"spec": {}}),
        Expect::Absent,
    )])
    .await
    .unwrap();
    let rq = s.get(Kind::IPPool, "q").await.unwrap().unwrap().revision;
    s.commit(vec![Op::Claim {
        pool: "q".into(),
        ip: ip("10.0.0.3"),
        holder: holder("c3", "eth0"),
        pool_revision: rq,
    }])
    .await
    .unwrap();
    s.commit(update(2, since)).await.unwrap();
    // A claim after the revision is.
    let since = check_point(s.as_ref(), "p").await;
    let rp = s.get(Kind::IPPool, "p").await.unwrap().unwrap().revision;
    s.commit(vec![Op::Claim {
        pool: "p".into(),
        ip: ip("10.0.0.9"),
        holder: holder("c9", "eth0"),
        pool_revision: rp,
    }])
    .await
    .unwrap();
    let m = conflict(s.commit(update(3, since)).await);
    assert!(
        m.contains("addresses of pool p were claimed after revision"),
        "{m}"
    );
    assert_eq!(
        label(&s.get(Kind::IPPool, "p").await.unwrap().unwrap().value, "v"),
        "2",
        "nothing written"
    );
    // Read again, the change goes through.
    let since = check_point(s.as_ref(), "p").await;
    s.commit(update(3, since)).await.unwrap();
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
