//! The conformance suite run against each backend, plus what only SQLite can show: data
//! surviving a reopen, and unreadable rows reported and skipped.

use std::sync::Arc;

use serde_json::json;
use spiderpool_backends::sqlite::SqliteStore;
use spiderpool_backends::DatastoreUrl;
use spiderpool_store::memory::MemoryStore;
use spiderpool_store::{conformance, Expect, Kind, Op, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_conforms() {
    for check in conformance::CHECKS {
        // Every handle of one check shares one datastore.
        let s: Arc<dyn Store> = Arc::new(MemoryStore::new());
        conformance::run_check(check, &|| {
            let s = s.clone();
            async move { s }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    for check in conformance::CHECKS {
        // Each handle is a connection of its own to the check's file, as another process's.
        let path = dir.path().join(format!("{check}.db"));
        conformance::run_check(check, &|| {
            let path = path.clone();
            async move { Arc::new(SqliteStore::open(&path).await.unwrap()) as Arc<dyn Store> }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_backend_conforms() {
    if !spiderpool_testkit::etcd_available() {
        return;
    }
    let etcd = spiderpool_testkit::Etcd::single();
    for check in conformance::CHECKS {
        // Each check gets its own prefix: a fresh datastore on the same cluster.
        let url: DatastoreUrl = etcd
            .datastore(&format!("/conformance/{check}"))
            .parse()
            .unwrap();
        conformance::run_check(check, &|| {
            let url = url.clone();
            async move { spiderpool_backends::open(&url).await.unwrap() }
        })
        .await;
    }
}

#[tokio::test]
async fn etcd_unreachable_and_corrupt_values_are_reported() {
    if !spiderpool_testkit::etcd_available() {
        return;
    }
    let port = spiderpool_testkit::free_port();
    let url: DatastoreUrl = format!("etcd://127.0.0.1:{port}").parse().unwrap();
    let err = match spiderpool_backends::open(&url).await {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&format!("etcd 127.0.0.1:{port}")), "{err}");

    let etcd = spiderpool_testkit::Etcd::single();
    let url: DatastoreUrl = etcd.datastore("/corrupt").parse().unwrap();
    let s = spiderpool_backends::open(&url).await.unwrap();
    s.commit(vec![Op::Put {
        kind: Kind::Node,
        key: "good".into(),
        value: json!({}),
        expect: Expect::Any,
    }])
    .await
    .unwrap();
    let DatastoreUrl::Etcd { endpoints, .. } = &url else {
        unreachable!()
    };
    let mut raw = etcd_client::Client::connect(
        endpoints
            .iter()
            .map(|e| format!("http://{e}"))
            .collect::<Vec<_>>(),
        None,
    )
    .await
    .unwrap();
    raw.put("/corrupt/objects/nodes/bad", "{not json", None)
        .await
        .unwrap();
    raw.put("/corrupt/allocations/p/not-an-ip", "{}", None)
        .await
        .unwrap();
    raw.put("/corrupt/allocations/p/10.0.0.1", "garbage", None)
        .await
        .unwrap();
    unreadable_values_are_reported_and_skipped(s.as_ref(), "/corrupt/objects/nodes/bad").await;
    assert_eq!(
        s.held_ips("p").await.unwrap(),
        ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
}

#[tokio::test]
async fn sqlite_keeps_everything_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/spiderpool.db");
    let rev = {
        let s = SqliteStore::open(&path).await.unwrap();
        let r = s
            .commit(vec![Op::Put {
                kind: Kind::IPPool,
                key: "p".into(),
                value: json!({"spec": {"subnet": "10.6.0.0/16"}}),
                expect: Expect::Absent,
            }])
            .await
            .unwrap();
        s.commit(vec![Op::Claim {
            pool: "p".into(),
            ip: "10.6.0.5".parse().unwrap(),
            holder: Default::default(),
            pool_revision: r,
        }])
        .await
        .unwrap()
    };
    let s = SqliteStore::open(&path).await.unwrap();
    assert_eq!(s.allocations("p").await.unwrap().len(), 1);
    assert_eq!(
        s.get(Kind::IPPool, "p").await.unwrap().unwrap().value["spec"]["subnet"],
        "10.6.0.0/16"
    );
    let next = s
        .commit(vec![Op::Delete {
            kind: Kind::Node,
            key: "x".into(),
            expect: Expect::Any,
        }])
        .await
        .unwrap();
    assert!(next > rev, "revisions keep growing after a reopen");
}

#[tokio::test]
async fn sqlite_reports_and_skips_unreadable_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let s = SqliteStore::open(&path).await.unwrap();
    s.commit(vec![Op::Put {
        kind: Kind::Node,
        key: "good".into(),
        value: json!({}),
        expect: Expect::Any,
    }])
    .await
    .unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute(
        "INSERT INTO objects (kind, key, value, revision) VALUES ('nodes', 'bad', '{not json', 1)",
        [],
    )
    .unwrap();
    raw.execute(
        "INSERT INTO allocations (pool, ip, holder, revision) VALUES ('p', 'not-an-ip', '{}', 1)",
        [],
    )
    .unwrap();
    unreadable_values_are_reported_and_skipped(&s, "nodes/bad").await;
}

/// After a backend-specific injection of an unreadable node `bad` next to a good one `good`
/// and of unreadable holders in pool `p`: listing skips them, getting one names its key.
async fn unreadable_values_are_reported_and_skipped(s: &dyn Store, bad_key: &str) {
    let keys: Vec<_> = s
        .list(Kind::Node)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["good"]);
    let err = s.get(Kind::Node, "bad").await.unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("corrupt value under {bad_key}")),
        "{err}"
    );
    assert!(s.allocations("p").await.unwrap().is_empty());
}

#[tokio::test]
async fn etcd_reads_large_pools_in_pages() {
    if !spiderpool_testkit::etcd_available() {
        return;
    }
    let etcd = spiderpool_testkit::Etcd::single();
    let url: DatastoreUrl = etcd.datastore("/pages").parse().unwrap();
    let s = spiderpool_backends::open(&url).await.unwrap();
    let rev = s
        .commit(vec![Op::Put {
            kind: Kind::IPPool,
            key: "big".into(),
            value: json!({}),
            expect: Expect::Absent,
        }])
        .await
        .unwrap();
    // More holders than one page of keys (10,000) and than ten pages of values (1,000 each).
    let n: u32 = 10_500;
    let base = u32::from(std::net::Ipv4Addr::new(10, 8, 0, 0));
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let claims = chunk
            .iter()
            .map(|i| Op::Claim {
                pool: "big".into(),
                ip: std::net::Ipv4Addr::from(base + i).into(),
                holder: spiderpool_store::Holder {
                    container_id: format!("c{i}"),
                    ..Default::default()
                },
                pool_revision: rev,
            })
            .collect();
        s.commit(claims).await.unwrap();
    }
    let held = s.held_ips("big").await.unwrap();
    assert_eq!(held.len(), n as usize);
    let distinct: std::collections::HashSet<_> = held.iter().collect();
    assert_eq!(distinct.len(), n as usize, "no key read twice");
    let allocations = s.allocations("big").await.unwrap();
    assert_eq!(allocations.len(), n as usize);
    assert_eq!(s.allocation_counts().await.unwrap()["big"], u64::from(n));
}

/// A control plane with the project's CRDs installed, when the tests have one.
fn cluster() -> Option<spiderpool_testkit::ControlPlane> {
    let bin = spiderpool_testkit::kube_bin()?;
    let cp = spiderpool_testkit::ControlPlane::start(&bin, false);
    cp.install_crds();
    Some(cp)
}

async fn kube_store(
    cp: &spiderpool_testkit::ControlPlane,
) -> spiderpool_backends::kubernetes::KubeStore {
    spiderpool_backends::kubernetes::KubeStore::connect(Some(&cp.kubeconfig))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_backend_conforms() {
    let Some(cp) = cluster() else {
        return;
    };
    for check in conformance::CHECKS {
        // One cluster for every check, emptied of what the last one wrote.
        for args in [
            &["delete", "spiderippools", "--all"][..],
            &["delete", "spiderendpoints", "--all", "-A"],
            &["delete", "nodes", "--all"],
            &["delete", "pods", "--all", "--grace-period=0", "--force"],
        ] {
            cp.kubectl_ok(args, "");
        }
        let kubeconfig = cp.kubeconfig.clone();
        conformance::run_check(check, &|| {
            let kubeconfig = kubeconfig.clone();
            async move {
                Arc::new(
                    spiderpool_backends::kubernetes::KubeStore::connect(Some(&kubeconfig))
                        .await
                        .unwrap(),
                ) as Arc<dyn Store>
            }
        })
        .await;
    }
}

/// On Kubernetes a watch reports what the agents' views are made of, not every write: a Node's
/// status heartbeat is no change, a new label is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_watch_skips_node_heartbeats() {
    let Some(cp) = cluster() else {
        return;
    };
    let s = kube_store(&cp).await;
    s.commit(vec![Op::Put {
        kind: Kind::Node,
        key: "n1".into(),
        value: json!({"metadata": {"labels": {"zone": "a"}}}),
        expect: Expect::Absent,
    }])
    .await
    .unwrap();
    let mut changes = s.watch(0, &[Kind::Node]).await.unwrap().unwrap();
    for beat in 0..3 {
        let patch = json!({"status": {"conditions": [{"type": "Ready", "status": "True",
            "reason": format!("beat-{beat}"), "lastHeartbeatTime": "2026-12-02T00:00:00Z"}]}});
        cp.kubectl_ok(
            &[
                "patch",
                "node",
                "n1",
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch.to_string(),
            ],
            "",
        );
    }
    cp.kubectl_ok(&["label", "node", "n1", "zone=b", "--overwrite"], "");
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), changes.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let rv = s.get(Kind::Node, "n1").await.unwrap().unwrap().revision;
    assert_eq!(
        first,
        [spiderpool_store::Change::Object {
            kind: Kind::Node,
            key: "n1".into(),
            revision: rv
        }],
        "only the label change is reported"
    );
}

/// On Kubernetes a pool records at most so many addresses (its object must fit the API
/// server's size limit): the claim beyond is refused, naming the pool and the cap, and nothing
/// is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_pools_refuse_records_beyond_the_cap() {
    let Some(cp) = cluster() else {
        return;
    };
    let s = kube_store(&cp).await.with_record_cap(2);
    let rev = s
        .commit(vec![Op::Put {
            kind: Kind::IPPool,
            key: "small".into(),
            value: json!({"spec": {"subnet": "10.0.0.0/24", "ips": ["10.0.0.1-10.0.0.9"]}}),
            expect: Expect::Absent,
        }])
        .await
        .unwrap();
    let claim = |i: u8| Op::Claim {
        pool: "small".into(),
        ip: std::net::IpAddr::from([10, 0, 0, i]),
        holder: spiderpool_store::Holder {
            pod: format!("default/p{i}"),
            pod_uid: format!("u{i}"),
            container_id: format!("c{i}"),
            nic: "eth0".into(),
            node: "n1".into(),
        },
        pool_revision: rev,
    };
    s.commit(vec![claim(1), claim(2)]).await.unwrap();
    let e = s.commit(vec![claim(3)]).await.unwrap_err();
    assert!(matches!(e, spiderpool_store::StoreError::Full(_)), "{e:?}");
    let m = e.to_string();
    assert!(
        m.contains("pool small would record 3 addresses, more than the 2"),
        "{m}"
    );
    assert!(!e.is_retryable());
    assert_eq!(s.held_ips("small").await.unwrap().len(), 2);
    // Releases are never refused.
    s.commit(vec![Op::Release {
        pool: "small".into(),
        ip: std::net::IpAddr::from([10, 0, 0, 1]),
        container_id: "c1".into(),
        nic: "eth0".into(),
        pod_uid: String::new(),
    }])
    .await
    .unwrap();
    s.commit(vec![claim(3)]).await.unwrap();
}
