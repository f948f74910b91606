//! Addresses: claims, releases owned by container and interface, and `NoClaimsSince`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;

use crate::{Expect, Kind, Op, Store};

use super::*;

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
        pod_uid: String::new(),
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
        pod_uid: String::new(),
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

/// A release that names no container (from a record upstream Spiderpool wrote, or whose
/// `containerID` an old CRD schema pruned) frees an address only from the pod incarnation it
/// names, on its interface or on none (upstream's pool entries name none).
pub async fn releases_without_a_container_match_the_incarnation(s: Arc<dyn Store>) {
    let r = s
        .commit(vec![put(
            Kind::IPPool,
            "p",
            json!({"spec": {}}),
            Expect::Absent,
        )])
        .await
        .unwrap();
    // As upstream writes them: pod and pod UID only.
    let upstream = |pod: &str, uid: &str| Holder {
        pod: format!("default/{pod}"),
        pod_uid: uid.into(),
        ..Default::default()
    };
    let claim = |a: &str, holder: Holder| Op::Claim {
        pool: "p".into(),
        ip: ip(a),
        holder,
        pool_revision: r,
    };
    s.commit(vec![
        claim("10.0.0.1", upstream("web-0", "u1")),
        claim("10.0.0.2", upstream("web-1", "u2")),
        // The project's entry whose endpoint record lost its container ID.
        claim("10.0.0.3", holder("c3", "eth0")),
    ])
    .await
    .unwrap();
    let release = |a: &str, nic: &str, uid: &str| Op::Release {
        pool: "p".into(),
        ip: ip(a),
        container_id: String::new(),
        nic: nic.into(),
        pod_uid: uid.into(),
    };
    // Another incarnation, no incarnation at all, or another interface of the project's
    // entry: nothing is freed.
    s.commit(vec![
        release("10.0.0.1", "eth0", "u2"),
        release("10.0.0.2", "eth0", ""),
        release("10.0.0.3", "net1", "uid-c3"),
    ])
    .await
    .unwrap();
    let held = |s: Arc<dyn Store>| async move {
        let mut v: Vec<String> = s
            .allocations("p")
            .await
            .unwrap()
            .iter()
            .map(|a| a.ip.to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(held(s.clone()).await, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    s.commit(vec![
        release("10.0.0.1", "eth0", "u1"),
        release("10.0.0.3", "eth0", "uid-c3"),
    ])
    .await
    .unwrap();
    assert_eq!(held(s.clone()).await, ["10.0.0.2"]);
}
