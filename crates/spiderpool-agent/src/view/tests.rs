//! The view on the memory store: reuse, folding, refresh.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spiderpool_store::{Change, Kind, Revision, Store};

use super::*;
use spiderpool_store::memory::MemoryStore;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn change(a: &str, held: bool, revision: Revision) -> Change {
    Change::Allocation {
        pool: "p".into(),
        ip: ip(a),
        held,
        revision,
    }
}

/// A cache fed by hand as a live watch would feed it, over an empty store, and the
/// store's revision.
async fn watched() -> (Arc<MemoryStore>, Arc<Mutex<Feed>>, ViewCache, Revision) {
    let store = Arc::new(MemoryStore::new());
    let feed = Arc::new(Mutex::new(Feed {
        live: true,
        ..Feed::default()
    }));
    let cache = ViewCache {
        feed: Some(feed.clone()),
        ..ViewCache::default()
    };
    let loaded = store.revision().await.unwrap().unwrap();
    (store, feed, cache, loaded)
}

async fn held(cache: &mut ViewCache, store: &dyn Store) -> Vec<String> {
    let v = cache.current(store).await.unwrap();
    v.load_held(store, "p").await.unwrap();
    ["10.0.0.1", "10.0.0.2", "10.0.0.9"]
        .into_iter()
        .filter(|a| v.held("p").contains(&ip(a)))
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn own_commits_stand_until_the_watch_reports_them() {
    let (store, feed, mut cache, r0) = watched().await;
    assert!(held(&mut cache, store.as_ref()).await.is_empty());
    cache.committed(r0 + 5, &[("p".into(), ip("10.0.0.1"))], &[]);
    // A report older than the commit (the address was free before) changes nothing.
    feed.lock()
        .unwrap()
        .merge(vec![change("10.0.0.1", false, r0 + 3)]);
    assert_eq!(held(&mut cache, store.as_ref()).await, ["10.0.0.1"]);
    // The commit's own report, then a later release by someone else.
    feed.lock()
        .unwrap()
        .merge(vec![change("10.0.0.1", true, r0 + 5)]);
    assert_eq!(held(&mut cache, store.as_ref()).await, ["10.0.0.1"]);
    feed.lock().unwrap().merge(vec![
        change("10.0.0.1", false, r0 + 7),
        change("10.0.0.9", true, r0 + 8),
    ]);
    assert_eq!(held(&mut cache, store.as_ref()).await, ["10.0.0.9"]);
    // Reports the view was read after are already in it.
    feed.lock()
        .unwrap()
        .merge(vec![change("10.0.0.2", true, r0)]);
    assert_eq!(held(&mut cache, store.as_ref()).await, ["10.0.0.9"]);
}

#[tokio::test]
async fn a_lost_race_undoes_the_staged_batch_and_learns_the_address() {
    let (store, _feed, mut cache, _) = watched().await;
    assert!(held(&mut cache, store.as_ref()).await.is_empty());
    assert!(!cache.contended(), "uncontended: the lowest free address");
    cache.stage(&[("p".into(), ip("10.0.0.1"))], &[]);
    cache.stage(&[("p".into(), ip("10.0.0.2"))], &[]);
    assert_eq!(
        held(&mut cache, store.as_ref()).await,
        ["10.0.0.1", "10.0.0.2"]
    );
    cache.conflicted(Some(("p".into(), ip("10.0.0.2"))), Duration::from_millis(5));
    assert_eq!(held(&mut cache, store.as_ref()).await, ["10.0.0.2"]);
    assert!(cache.contended(), "contended: spread out");
    // Any other conflict drops the view: it is read afresh (the store holds nothing).
    cache.conflicted(None, Duration::from_millis(5));
    assert!(cache.view.is_none());
    assert!(held(&mut cache, store.as_ref()).await.is_empty());
}

#[tokio::test]
async fn a_race_lost_in_a_slow_attempt_keeps_the_agent_spread_for_the_next_ones() {
    let (_store, _feed, mut cache, _) = watched().await;
    let window = |cache: &ViewCache| {
        cache
            .contended_until
            .expect("contended")
            .saturating_duration_since(std::time::Instant::now())
    };
    // Not a race for an address: nothing to spread for.
    cache.conflicted(None, Duration::from_secs(2));
    assert!(!cache.contended());
    // A fast datastore: a second.
    cache.conflicted(Some(("p".into(), ip("10.0.0.1"))), Duration::from_millis(5));
    let w = window(&cache);
    assert!(
        w > Duration::from_millis(900) && w <= cache::CONTENDED_FOR,
        "{w:?}"
    );
    // An attempt of 2 s on a loaded API server: the next few attempts are spread too.
    cache.conflicted(Some(("p".into(), ip("10.0.0.1"))), Duration::from_secs(2));
    let w = window(&cache);
    assert!(
        w > Duration::from_secs(7) && w <= Duration::from_secs(8),
        "{w:?}"
    );
    // A quick commit that met another agent's write (won after a 409) keeps the longer window.
    cache.raced(Duration::from_millis(5));
    assert!(window(&cache) > Duration::from_secs(7));
    // A stuck one does not spread the agent for ever.
    cache.conflicted(
        Some(("p".into(), ip("10.0.0.1"))),
        Duration::from_secs(3600),
    );
    assert!(window(&cache) <= Duration::from_secs(30));
}

#[tokio::test]
async fn viewed_objects_a_restart_or_no_watch_mean_reading_afresh() {
    let (store, feed, mut cache, _) = watched().await;
    held(&mut cache, store.as_ref()).await;
    cache.committed(99, &[("p".into(), ip("10.0.0.1"))], &[]);
    feed.lock().unwrap().merge(vec![Change::Object {
        kind: Kind::ReservedIP,
        key: "r".into(),
        revision: 100,
    }]);
    assert!(held(&mut cache, store.as_ref()).await.is_empty());
    cache.committed(101, &[("p".into(), ip("10.0.0.1"))], &[]);
    feed.lock().unwrap().restarted = true;
    assert!(held(&mut cache, store.as_ref()).await.is_empty());
    // Without a live watch, a commit that is not the next revision drops the view.
    feed.lock().unwrap().live = false;
    held(&mut cache, store.as_ref()).await;
    cache.committed(1000, &[("p".into(), ip("10.0.0.1"))], &[]);
    assert!(cache.view.is_none());
}

#[tokio::test]
async fn contended_agents_take_one_stripe_per_node() {
    let store = MemoryStore::new();
    for n in ["node-b", "node-a", "node-c"] {
        store
            .commit(vec![spiderpool_store::Op::Put {
                kind: Kind::Node,
                key: n.into(),
                value: serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}),
                expect: spiderpool_store::Expect::Absent,
            }])
            .await
            .unwrap();
    }
    let mut cache = ViewCache::default();
    let v = cache.current(&store).await.unwrap();
    assert_eq!(v.spread("node-a").stripe, Some((0, 3)));
    assert_eq!(v.spread("node-c").stripe, Some((2, 3)));
    assert_eq!(v.spread("elsewhere").stripe, None, "no Node object");
    assert_ne!(v.spread("node-a").random, v.spread("node-a").random);
}

#[tokio::test]
async fn a_warm_view_holds_every_pool_and_its_holders() {
    let store = MemoryStore::new();
    let pool = serde_json::json!({
        "apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderIPPool",
        "metadata": {"name": "p"},
        "spec": {"subnet": "10.0.0.0/24", "ips": ["10.0.0.1-10.0.0.9"]}
    });
    let r = store
        .commit(vec![spiderpool_store::Op::Put {
            kind: Kind::IPPool,
            key: "p".into(),
            value: pool,
            expect: spiderpool_store::Expect::Absent,
        }])
        .await
        .unwrap();
    store
        .commit(vec![spiderpool_store::Op::Claim {
            pool: "p".into(),
            ip: ip("10.0.0.1"),
            holder: Default::default(),
            pool_revision: r,
        }])
        .await
        .unwrap();
    let mut cache = ViewCache::default();
    cache.warm(&store).await.unwrap();
    let v = cache.view.as_ref().expect("read ahead");
    assert_eq!(v.pools.len(), 1);
    assert!(v.held("p").contains(&ip("10.0.0.1")), "holders read ahead");
}
