//! Objects: put, get, list and delete under every kind of condition; revisions; transactions
//! all or nothing.

use std::future::Future;
use std::sync::Arc;

use serde_json::json;

use crate::{Expect, Kind, Op, Store};

use super::*;

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
    // Across pools (a dual-stack or multi-NIC pod): a claim refused in one pool takes back
    // what the same commit claimed in another, wherever the pools are written side by side.
    s.commit(vec![put(
        Kind::IPPool,
        "q",
        json!({"spec": {}}),
        Expect::Absent,
    )])
    .await
    .unwrap();
    let rev = |pool: &'static str| {
        let s = s.clone();
        async move { s.get(Kind::IPPool, pool).await.unwrap().unwrap().revision }
    };
    s.commit(vec![Op::Claim {
        pool: "q".into(),
        ip: ip("10.1.0.1"),
        holder: holder("c0", "net1"),
        pool_revision: rev("q").await,
    }])
    .await
    .unwrap();
    let before = s.allocation_counts().await.unwrap();
    let e = s
        .commit(vec![
            Op::Claim {
                pool: "p".into(),
                ip: ip("10.0.0.5"),
                holder: holder("c2", "eth0"),
                pool_revision: rev("p").await,
            },
            Op::Claim {
                pool: "q".into(),
                ip: ip("10.1.0.1"),
                holder: holder("c2", "net1"),
                pool_revision: rev("q").await,
            },
        ])
        .await
        .unwrap_err();
    assert_eq!(e.taken(), Some(("q".to_string(), ip("10.1.0.1"))), "{e}");
    assert_eq!(s.allocation_counts().await.unwrap(), before);
    let held: Vec<_> = s
        .allocations("p")
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.ip)
        .collect();
    assert!(!held.contains(&ip("10.0.0.5")), "taken back: {held:?}");
}
