//! Watches: every committed change reported, in order, per key.

use std::sync::Arc;

use serde_json::json;

use crate::{Change, Expect, Kind, Op, Store};

use super::*;

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
        pod_uid: String::new(),
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
    let mut got = next_changes(&mut changes, want.len()).await;
    // Each key's changes come in order; the allocations and each kind may interleave.
    got.sort_by_key(|c| match c {
        Change::Allocation { revision, .. }
        | Change::Object { revision, .. }
        | Change::Recorded { revision, .. } => *revision,
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
            Change::Recorded {
                key, ips, value, ..
            } => Change::Recorded {
                key,
                ips,
                revision: 0,
                value,
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

/// A watch of [`Kind::Endpoint`] tells each record's addresses as they are now: what a write
/// leaves recorded (by pool, every NIC), nothing once the record is deleted; and, without
/// [`Kind::IPPool`] among its kinds, no allocation.
pub async fn watch_tells_recorded_addresses(s: Arc<dyn Store>) {
    let r0 = s.revision().await.unwrap().unwrap_or(0);
    let Some(mut changes) = s.watch(r0, &[Kind::Endpoint]).await.unwrap() else {
        return;
    };
    let nic = |name: &str, v4: &str, v6: Option<&str>| {
        json!({"interface": name, "containerID": "c1", "ipv4": format!("{v4}/24"),
               "ipv4Pool": "p4", "ipv6": v6.map(|a| format!("{a}/64")), "ipv6Pool": v6.map(|_| "p6")})
    };
    let record = |nics: Vec<serde_json::Value>| {
        json!({"apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderEndpoint",
               "metadata": {"name": "x", "namespace": "default"},
               "status": {"current": {"uid": "u1", "node": "n1", "ips": nics}}})
    };
    // A pool's holders are not told to a watch of endpoints only.
    let r1 = s
        .commit(vec![put(
            Kind::IPPool,
            "p4",
            json!({"spec": {}}),
            Expect::Absent,
        )])
        .await
        .unwrap();
    s.commit(vec![
        Op::Claim {
            pool: "p4".into(),
            ip: ip("10.0.0.5"),
            holder: holder("c1", "eth0"),
            pool_revision: r1,
        },
        put(
            Kind::Endpoint,
            "default/x",
            record(vec![nic("eth0", "10.0.0.5", Some("fd00::5"))]),
            Expect::Absent,
        ),
    ])
    .await
    .unwrap();
    s.commit(vec![put(
        Kind::Endpoint,
        "default/x",
        record(vec![
            nic("eth0", "10.0.0.5", Some("fd00::5")),
            nic("net1", "10.0.1.7", None),
        ]),
        Expect::Any,
    )])
    .await
    .unwrap();
    let second = s.get(Kind::Endpoint, "default/x").await.unwrap().unwrap();
    s.commit(vec![Op::Delete {
        kind: Kind::Endpoint,
        key: "default/x".into(),
        expect: Expect::Any,
    }])
    .await
    .unwrap();
    let told = next_changes(&mut changes, 3).await;
    // Each change carries the record as a read gives it (a watcher may write it back guarded
    // by that revision), and nothing once it is deleted.
    match &told[1] {
        Change::Recorded {
            revision, value, ..
        } => {
            assert_eq!(*revision, second.revision);
            let ips = |v: &serde_json::Value| v.pointer("/status/current/ips").cloned();
            assert_eq!(value.as_ref().and_then(ips), ips(&second.value));
        }
        other => panic!("an endpoint's change told as {other:?}"),
    }
    assert!(matches!(&told[2], Change::Recorded { value: None, .. }));
    let got: Vec<(String, Vec<(String, IpAddr)>)> = told
        .into_iter()
        .map(|c| match c {
            Change::Recorded { key, ips, .. } => (key, ips),
            other => panic!("an endpoint's change told as {other:?}"),
        })
        .collect();
    let at = |pool: &str, a: &str| (pool.to_string(), ip(a));
    assert_eq!(
        got,
        [
            (
                "default/x".to_string(),
                vec![at("p4", "10.0.0.5"), at("p6", "fd00::5")]
            ),
            (
                "default/x".to_string(),
                vec![
                    at("p4", "10.0.0.5"),
                    at("p6", "fd00::5"),
                    at("p4", "10.0.1.7")
                ]
            ),
            ("default/x".to_string(), vec![]),
        ]
    );
}

/// At least `n` changes from the watch, as many batches as it takes (each within 10 s).
async fn next_changes(changes: &mut crate::Changes, n: usize) -> Vec<Change> {
    let mut got = Vec::new();
    while got.len() < n {
        let batch = tokio::time::timeout(std::time::Duration::from_secs(10), changes.recv())
            .await
            .unwrap_or_else(|_| panic!("the watch stopped after {got:?}"))
            .expect("the watch is still open")
            .unwrap();
        got.extend(batch);
    }
    got
}
