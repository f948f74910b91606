//! The reconciler on the memory store: carve, scale, take over, reclaim.

use super::*;
use crate::apply;
use spiderpool_api::keys::LABEL_OWNER_SUBNET;
use spiderpool_api::manifest::parse_documents;
use spiderpool_store::memory::MemoryStore;

async fn apply(store: &dyn Store, yaml: &str) {
    for d in parse_documents(yaml).unwrap() {
        apply::apply(store, d.object).await.unwrap();
    }
}

const SUBNET: &str = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderSubnet\nmetadata: {name: subnet-6}\nspec: {subnet: 10.6.0.0/16, ips: [10.6.168.101-10.6.168.110], excludeIPs: [10.6.168.103], gateway: 10.6.0.1}\n";

fn deployment(replicas: u64, annotations: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: default, uid: 11111111-2222-3333-4444-9a2b3c4d5e6f}}\nspec:\n  replicas: {replicas}\n  template:\n    metadata:\n      annotations: {annotations}\n"
    )
}

async fn pool(store: &dyn Store, name: &str) -> Option<SpiderIPPool> {
    match typed::get(store, Kind::IPPool, name).await.unwrap() {
        Some((Object::IPPool(p), _)) => Some(p),
        _ => None,
    }
}

#[tokio::test]
async fn carves_scales_and_reclaims() {
    let store = MemoryStore::new();
    apply(&store, SUBNET).await;
    apply(
        &store,
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderReservedIP\nmetadata: {name: r}\nspec: {ips: [10.6.168.102]}\n",
    )
    .await;
    let ann = r#"{ipam.spidernet.io/subnet: '{"ipv4": ["subnet-6"]}', ipam.spidernet.io/ippool-ip-number: "+1"}"#;
    apply(&store, &deployment(2, ann)).await;
    let key = "default/Deployment/web";
    let r = reconcile(&store, key, Settings::default()).await.unwrap();
    let name = "auto4-web-eth0-9a2b3";
    assert_eq!(
        r.actions,
        [Action::Created {
            pool: name.into(),
            ips: 3
        }]
    );
    let p = pool(&store, name).await.unwrap();
    // The lowest free addresses: .102 is reserved, .103 excluded by the subnet.
    assert_eq!(p.spec.ips, ["10.6.168.101", "10.6.168.104-10.6.168.105"]);
    assert_eq!(p.spec.gateway.as_deref(), Some("10.6.0.1"));
    assert_eq!(p.metadata.labels[LABEL_OWNER_SUBNET], "subnet-6");
    assert_eq!(
        p.metadata.annotations[spiderpool_api::keys::IPPOOL_IP_NUMBER],
        "+1"
    );
    // Unchanged: nothing to do.
    let r = reconcile(&store, key, Settings::default()).await.unwrap();
    assert!(r.actions.is_empty(), "{r:?}");

    // Scale to 4: two more, the lowest free.
    apply(&store, &deployment(4, ann)).await;
    let r = reconcile(&store, key, Settings::default()).await.unwrap();
    assert_eq!(
        r.actions,
        [Action::Scaled {
            pool: name.into(),
            from: 3,
            to: 5
        }]
    );
    let p = pool(&store, name).await.unwrap();
    assert_eq!(p.spec.ips, ["10.6.168.101", "10.6.168.104-10.6.168.107"]);
    // Hold .107, scale to 1: the highest addresses nobody holds go, .107 stays.
    let pool_revision = store
        .get(Kind::IPPool, name)
        .await
        .unwrap()
        .unwrap()
        .revision;
    store
        .commit(vec![Op::Claim {
            pool: name.into(),
            ip: "10.6.168.107".parse().unwrap(),
            holder: spiderpool_store::Holder {
                pod: "default/web-1".into(),
                container_id: "c1".into(),
                nic: "eth0".into(),
                ..Default::default()
            },
            pool_revision,
        }])
        .await
        .unwrap();
    apply(&store, &deployment(1, ann)).await;
    reconcile(&store, key, Settings::default()).await.unwrap();
    let p = pool(&store, name).await.unwrap();
    assert_eq!(p.spec.ips, ["10.6.168.101", "10.6.168.107"]);

    // Deleted: the pool waits for its address, then goes.
    apply::delete(&store, Kind::Workload, key).await.unwrap();
    let r = reconcile(&store, key, Settings::default()).await.unwrap();
    assert_eq!(
        r.actions,
        [Action::Waiting {
            pool: name.into(),
            in_use: 1
        }]
    );
    store
        .commit(vec![Op::Release {
            pool: name.into(),
            ip: "10.6.168.107".parse().unwrap(),
            container_id: "c1".into(),
            nic: "eth0".into(),
            pod_uid: String::new(),
        }])
        .await
        .unwrap();
    let r = reconcile_all(&store, Settings::default()).await.unwrap();
    assert_eq!(
        r[0].as_ref().unwrap().actions,
        [Action::Deleted { pool: name.into() }]
    );
    assert!(pool(&store, name).await.is_none());
}

#[tokio::test]
async fn a_reserved_pool_goes_to_the_next_application_of_that_name() {
    let store = MemoryStore::new();
    apply(&store, SUBNET).await;
    let ann = r#"{ipam.spidernet.io/subnet: '{"ipv4": ["subnet-6"]}', ipam.spidernet.io/ippool-ip-number: "2", ipam.spidernet.io/ippool-reclaim: "false"}"#;
    apply(&store, &deployment(1, ann)).await;
    let key = "default/Deployment/web";
    reconcile(&store, key, Settings::default()).await.unwrap();
    apply::delete(&store, Kind::Workload, key).await.unwrap();
    let r = reconcile(&store, key, Settings::default()).await.unwrap();
    let name = "auto4-web-eth0-9a2b3";
    assert_eq!(r.actions, [Action::Reserved { pool: name.into() }]);
    let again = deployment(1, ann).replace("9a2b3c4d5e6f", "77777c4d5e6f");
    apply(&store, &again).await;
    let r = reconcile(&store, key, Settings::default()).await.unwrap();
    assert_eq!(
        r.actions,
        [Action::Adopted {
            pool: name.into(),
            from_uid: "11111111-2222-3333-4444-9a2b3c4d5e6f".into()
        }]
    );
    let p = pool(&store, name).await.unwrap();
    assert_eq!(
        p.metadata.labels[spiderpool_api::keys::LABEL_APP_UID],
        "11111111-2222-3333-4444-77777c4d5e6f"
    );
    // A StatefulSet of the same name is another application.
    apply(
        &store,
        &deployment(1, ann)
            .replace("Deployment", "StatefulSet")
            .replace("9a2b3c4d5e6f", "88888c4d5e6f"),
    )
    .await;
    let r = reconcile(&store, "default/StatefulSet/web", Settings::default())
        .await
        .unwrap();
    assert_eq!(
        r.actions,
        [Action::Created {
            pool: "auto4-web-eth0-88888".into(),
            ips: 2
        }]
    );
}

#[tokio::test]
async fn refusals_name_the_application_and_the_value() {
    let store = MemoryStore::new();
    apply(&store, SUBNET).await;
    let key = "default/Deployment/web";
    apply(
        &store,
        &deployment(1, r#"{ipam.spidernet.io/subnet: '{"ipv4": ["nope"]}'}"#),
    )
    .await;
    let e = reconcile(&store, key, Settings::default())
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Deployment default/web: SpiderSubnet \"nope\" named for interface eth0 does not exist"
    );
    apply(
        &store,
        &deployment(1, r#"{ipam.spidernet.io/subnet: '{"ipv4": ["subnet-6"]}', ipam.spidernet.io/ippool-ip-number: "10"}"#),
    )
    .await;
    let e = reconcile(&store, key, Settings::default())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("insufficient subnet FreeIPs, required '10' but only left '9'"),
        "{e}"
    );
    apply(
        &store,
        &deployment(1, r#"{ipam.spidernet.io/subnet: '{"ipv4": ["subnet-6"]}', ipam.spidernet.io/ippool-ip-number: "x"}"#),
    )
    .await;
    let e = reconcile(&store, key, Settings::default())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("Deployment default/web: pod template annotation ipam.spidernet.io/ippool-ip-number: \"x\""),
        "{e}"
    );
}

#[tokio::test]
async fn a_third_partys_pools_are_not_an_apps_kind_of_the_same_name() {
    let store = MemoryStore::new();
    apply(&store, SUBNET).await;
    let ann = r#"{ipam.spidernet.io/subnet: '{"ipv4": ["subnet-6"]}', ipam.spidernet.io/ippool-ip-number: "2"}"#;
    apply(
        &store,
        &deployment(1, ann).replace("Deployment", "StatefulSet"),
    )
    .await;
    let r = reconcile(&store, "default/StatefulSet/web", Settings::default())
        .await
        .unwrap();
    let name = "auto4-web-eth0-9a2b3";
    assert_eq!(
        r.actions,
        [Action::Created {
            pool: name.into(),
            ips: 2
        }]
    );
    // The pool made over as an OpenKruise StatefulSet's, and the apps/v1 one gone.
    let (mut p, rev) = match typed::get(&store, Kind::IPPool, name).await.unwrap() {
        Some((Object::IPPool(p), rev)) => (p, rev),
        _ => panic!("no pool {name}"),
    };
    let kruise = App {
        group: "apps.kruise.io".into(),
        version: "v1beta1".into(),
        kind: "StatefulSet".into(),
        namespace: "default".into(),
        name: "web".into(),
        uid: "k".into(),
    };
    p.metadata
        .labels
        .extend(kruise.pool_labels(IpFamily::V4, "eth0", true));
    p.spec.pod_affinity = Some(kruise.affinity());
    let value = typed::to_stored_value(&Object::IPPool(p));
    store
        .commit(vec![Op::Put {
            kind: Kind::IPPool,
            key: name.into(),
            value,
            expect: Expect::Revision(rev),
        }])
        .await
        .unwrap();
    crate::apply::delete(&store, Kind::Workload, "default/StatefulSet/web")
        .await
        .unwrap();
    let r = reconcile(&store, "default/StatefulSet/web", Settings::default())
        .await
        .unwrap();
    assert!(r.actions.is_empty(), "{:?}", r.actions);
    assert!(pool(&store, name).await.is_some());
    // The third party's own key finds it, and (no such owner here) deletes it.
    assert_eq!(
        applications(&store).await.unwrap(),
        ["default/StatefulSet.v1beta1.apps.kruise.io/web"]
    );
    let r = reconcile(&store, &kruise.key(), Settings::default())
        .await
        .unwrap();
    assert_eq!(r.actions, [Action::Deleted { pool: name.into() }]);
}
