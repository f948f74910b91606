//! The agent's cached picture of what allocation reads: validated pools, reserved addresses,
//! the addresses held per pool, node and namespace labels. So a busy agent does not re-read
//! every pool's holders per request, and the cost of an ADD does not grow with the number of
//! addresses held.
//!
//! Where the datastore can watch (etcd), a background task follows every change to the
//! allocations and to the objects the view is made of, and each request first folds in what
//! arrived since the last one: the view stays current without a round trip, and other agents'
//! claims and releases cost no re-read. Elsewhere (SQLite) the view is tagged with the
//! datastore revision it was read at and reused only while that revision is current; the
//! agent's own commits are folded in when their revision shows nobody else wrote in between.
//! Either way the view is only a good guess: every claim is a compare-and-swap, so a view that
//! lags behind costs a retry, never a duplicate.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spiderpool_api::Object;
use spiderpool_core::candidate::Spread;
use spiderpool_core::{IpSet, Labels, Pool};
use spiderpool_store::{typed, Change, Kind, Result, Revision, Store};
use tokio::sync::Notify;

/// The object kinds a view is made of: a change to one of them means reading the view afresh.
const VIEWED: [Kind; 4] = [Kind::IPPool, Kind::ReservedIP, Kind::Namespace, Kind::Node];

/// How long a watched view is trusted before it is read afresh anyway (in the background, see
/// [`ViewCache::warm`]): the last resort against a watch that stalls without an error, which
/// the datastore client's keep-alive pings should already have ended.
pub const MAX_WATCHED_AGE: Duration = Duration::from_secs(300);

/// What allocation reads, as of one revision.
pub struct View {
    revision: Option<Revision>,
    loaded: Instant,
    /// Every valid pool.
    pub pools: Vec<Pool>,
    /// Revision of each pool object (claims are guarded by it).
    pub pool_revs: BTreeMap<String, Revision>,
    /// Union of every SpiderReservedIP.
    pub reserved: IpSet,
    held: HashMap<String, IpSet>,
    namespaces: HashMap<String, (Labels, Labels)>,
    nodes: HashMap<String, Option<Labels>>,
    /// Every node's name, sorted.
    node_names: Vec<String>,
}

impl View {
    async fn load(store: &dyn Store, revision: Option<Revision>) -> Result<View> {
        let mut pools = Vec::new();
        let mut pool_revs = BTreeMap::new();
        for (o, rev) in typed::list(store, Kind::IPPool).await? {
            if let Object::IPPool(p) = o {
                match p.to_pool() {
                    Ok(pool) => {
                        pool_revs.insert(pool.name.clone(), rev);
                        pools.push(pool);
                    }
                    Err(e) => tracing::error!(error = %e, "skipping an invalid stored pool"),
                }
            }
        }
        let mut reserved = IpSet::new();
        for (o, _) in typed::list(store, Kind::ReservedIP).await? {
            if let Object::ReservedIP(r) = o {
                match r.to_set() {
                    Ok(s) => reserved = reserved.union(&s),
                    Err(e) => tracing::error!(error = %e, "skipping an invalid reserved IP object"),
                }
            }
        }
        // Every node, with its labels: affinity reads this agent's, and the stripes of
        // contended allocation are one per node.
        let mut nodes = HashMap::new();
        for (o, _) in typed::list(store, Kind::Node).await? {
            let labels = o.metadata().labels.clone();
            nodes.insert(o.metadata().name.clone(), Some(labels));
        }
        let mut node_names: Vec<String> = nodes.keys().cloned().collect();
        node_names.sort();
        Ok(View {
            revision,
            loaded: Instant::now(),
            node_names,
            pools,
            pool_revs,
            reserved,
            held: HashMap::new(),
            namespaces: HashMap::new(),
            nodes,
        })
    }

    /// Reads the addresses held in `pool` unless the view has them already.
    pub async fn load_held(&mut self, store: &dyn Store, pool: &str) -> Result<()> {
        if !self.held.contains_key(pool) {
            let ips = IpSet::from_ips(store.held_ips(pool).await?);
            self.held.insert(pool.to_string(), ips);
        }
        Ok(())
    }

    /// The addresses held in `pool`, as loaded by [`View::load_held`] (empty otherwise).
    pub fn held(&self, pool: &str) -> &IpSet {
        static EMPTY: std::sync::OnceLock<IpSet> = std::sync::OnceLock::new();
        self.held
            .get(pool)
            .unwrap_or_else(|| EMPTY.get_or_init(IpSet::new))
    }

    /// Whether the holders of `pool` have been read.
    pub fn has_held(&self, pool: &str) -> bool {
        self.held.contains_key(pool)
    }

    /// Labels and annotations of namespace `ns` (empty when it has no Namespace object).
    pub async fn namespace(&mut self, store: &dyn Store, ns: &str) -> Result<(Labels, Labels)> {
        if let Some(l) = self.namespaces.get(ns) {
            return Ok(l.clone());
        }
        let meta = typed::get(store, Kind::Namespace, ns)
            .await?
            .map(|(o, _)| {
                (
                    o.metadata().labels.clone(),
                    o.metadata().annotations.clone(),
                )
            })
            .unwrap_or_default();
        self.namespaces.insert(ns.to_string(), meta.clone());
        Ok(meta)
    }

    /// Labels of the Node object `node`, if it exists.
    pub async fn node_labels(&mut self, store: &dyn Store, node: &str) -> Result<Option<Labels>> {
        if let Some(l) = self.nodes.get(node) {
            return Ok(l.clone());
        }
        let labels = typed::get(store, Kind::Node, node)
            .await?
            .map(|(o, _)| o.metadata().labels.clone());
        self.nodes.insert(node.to_string(), labels.clone());
        Ok(labels)
    }

    /// How `node`'s agent picks addresses while it keeps losing races: from its own stripe
    /// (by its place among the nodes), then anywhere at random.
    pub fn spread(&self, node: &str) -> Spread {
        use std::hash::BuildHasher;
        let count = u32::try_from(self.node_names.len()).unwrap_or(u32::MAX);
        let stripe = self
            .node_names
            .binary_search_by(|n| n.as_str().cmp(node))
            .ok()
            .map(|i| (u32::try_from(i).unwrap_or(0), count));
        Spread {
            stripe,
            // Every RandomState is seeded afresh: a cheap source of distinct random numbers.
            random: std::collections::hash_map::RandomState::new().hash_one(node),
        }
    }

    /// Marks `ip` of `pool` held or free, if the view has that pool's holders.
    fn set_held(&mut self, pool: &str, ip: IpAddr, held: bool) {
        if let Some(set) = self.held.get_mut(pool) {
            let one = IpSet::from_ips([ip]);
            *set = if held {
                set.union(&one)
            } else {
                set.difference(&one)
            };
        }
    }

    /// Releases first, then claims: the order of a transaction that hands an address over.
    fn apply(&mut self, claimed: &[(String, IpAddr)], released: &[(String, IpAddr)]) {
        for (pool, ip) in released {
            self.set_held(pool, *ip, false);
        }
        for (pool, ip) in claimed {
            self.set_held(pool, *ip, true);
        }
    }
}

/// What a datastore watch reported and the view has not folded in yet.
#[derive(Default)]
struct Feed {
    /// A watch is running: while it does, the view needs no revision check.
    live: bool,
    /// The watch started (again): a view read before cannot be kept.
    restarted: bool,
    /// The latest state of each address that changed: held or not, and the revision.
    allocations: HashMap<(String, IpAddr), (bool, Revision)>,
    /// An object of a [`VIEWED`] kind changed.
    objects: bool,
}

impl Feed {
    fn merge(&mut self, changes: Vec<Change>) {
        for c in changes {
            match c {
                Change::Allocation {
                    pool,
                    ip,
                    held,
                    revision,
                } => {
                    tracing::trace!(%pool, %ip, held, revision, "an address changed");
                    self.allocations.insert((pool, ip), (held, revision));
                }
                Change::Object {
                    kind,
                    key,
                    revision,
                } => {
                    tracing::debug!(object = %format!("{kind}/{key}"), revision, "a viewed object changed; the view will be read afresh");
                    self.objects = true;
                }
            }
        }
    }
}

/// Follows the datastore's changes into `feed` for as long as the agent runs; returns at once
/// when the backend cannot watch. A watch that ends is started again from the current
/// revision, and the view is then read afresh.
async fn follow(store: Arc<dyn Store>, feed: Arc<Mutex<Feed>>, stale: Arc<Notify>) {
    const BACKOFF: Duration = Duration::from_millis(100);
    let mut backoff = BACKOFF;
    loop {
        let started = async {
            match store.revision().await? {
                Some(after) => store.watch(after, &VIEWED).await,
                None => Ok(None),
            }
        };
        match started.await {
            Ok(None) => return,
            Ok(Some(mut changes)) => {
                {
                    let mut f = feed.lock().expect("feed lock");
                    *f = Feed {
                        live: true,
                        restarted: true,
                        ..Feed::default()
                    };
                }
                stale.notify_one();
                tracing::debug!("following the datastore's changes");
                backoff = BACKOFF;
                while let Some(batch) = changes.recv().await {
                    match batch {
                        Ok(c) => {
                            let mut f = feed.lock().expect("feed lock");
                            f.merge(c);
                            if f.objects {
                                stale.notify_one();
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the datastore watch ended; watching again");
                            break;
                        }
                    }
                }
                feed.lock().expect("feed lock").live = false;
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch the datastore; trying again"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// How long an agent keeps to its stripe of the free addresses after it lost a race for one.
const CONTENDED_FOR: Duration = Duration::from_secs(1);

/// The cached view, if any, how contended the last allocations were, and what keeps the view
/// current.
#[derive(Default)]
pub struct ViewCache {
    view: Option<View>,
    /// Until when allocations spread out (see [`View::spread`]): set by a race lost for an
    /// address.
    contended_until: Option<Instant>,
    /// Filled by the watch, where the datastore has one.
    feed: Option<Arc<Mutex<Feed>>>,
    /// This agent's own commits that the watch has not reported yet, with their revisions:
    /// older reports of those addresses are out of date.
    local: HashMap<(String, IpAddr), Revision>,
    /// The addresses the batch being prepared has staged, and whether held after it.
    staged: Vec<(String, IpAddr, bool)>,
    /// Notified when the watch reports that the view must be read afresh.
    stale: Arc<Notify>,
}

impl ViewCache {
    /// A cache kept current by following `store`'s changes, where it can watch. Must be called
    /// inside the agent's runtime.
    pub fn following(store: Arc<dyn Store>) -> Self {
        let feed = Arc::new(Mutex::new(Feed::default()));
        let stale = Arc::new(Notify::new());
        tokio::spawn(follow(store, feed.clone(), stale.clone()));
        ViewCache {
            feed: Some(feed),
            stale,
            ..ViewCache::default()
        }
    }

    /// Notified whenever the watch reports that the view must be read afresh (see
    /// [`ViewCache::warm`]).
    pub fn stale(&self) -> Arc<Notify> {
        self.stale.clone()
    }

    /// Reads what the view lacks (after a start or a change to the objects it is made of, or
    /// when the datastore's revision moved): the pools, reserved addresses, nodes and every
    /// pool's holders, so the next request does not wait for them.
    pub async fn warm(&mut self, store: &dyn Store) -> Result<()> {
        let v = self.current(store).await?;
        let names: Vec<String> = v.pools.iter().map(|p| p.name.clone()).collect();
        for pool in names {
            v.load_held(store, &pool).await?;
        }
        Ok(())
    }

    /// Folds in what the watch reported since the last call. False when no watch is live (the
    /// view must then be checked against the datastore's revision).
    fn drain(&mut self) -> bool {
        let Some(feed) = &self.feed else {
            return false;
        };
        let mut f = feed.lock().expect("feed lock");
        if !f.live {
            return false;
        }
        let aged = self
            .view
            .as_ref()
            .is_some_and(|v| v.loaded.elapsed() > MAX_WATCHED_AGE);
        if std::mem::take(&mut f.restarted) | std::mem::take(&mut f.objects) | aged {
            self.view = None;
        }
        let allocations = std::mem::take(&mut f.allocations);
        drop(f);
        let Some(v) = &mut self.view else {
            return true;
        };
        for ((pool, ip), (held, revision)) in allocations {
            // What the view was read at already includes this change.
            if v.revision.is_some_and(|r| revision <= r) {
                continue;
            }
            let key = (pool, ip);
            match self.local.get(&key) {
                Some(&mine) if revision < mine => continue,
                Some(_) => {
                    self.local.remove(&key);
                }
                None => {}
            }
            v.set_held(&key.0, ip, held);
        }
        true
    }

    /// Whether the view is kept current by a watch (and so may lag a little behind).
    pub fn watched(&self) -> bool {
        self.feed
            .as_ref()
            .is_some_and(|f| f.lock().expect("feed lock").live)
    }

    async fn reload(&mut self, store: &dyn Store) -> Result<&mut View> {
        let now = store.revision().await?;
        self.local.clear();
        Ok(self.view.insert(View::load(store, now).await?))
    }

    /// The view as of now: with a watch, the cached one with what the watch reported folded
    /// in; otherwise the cached one only while the datastore's revision has not moved.
    pub async fn current(&mut self, store: &dyn Store) -> Result<&mut View> {
        if self.drain() {
            return match self.view {
                Some(ref mut v) => Ok(v),
                None => self.reload(store).await,
            };
        }
        let now = store.revision().await?;
        let fresh = now.is_some() && self.view.as_ref().is_some_and(|v| v.revision == now);
        if !fresh {
            self.view = Some(View::load(store, now).await?);
        }
        Ok(self.view.as_mut().expect("just filled"))
    }

    /// The view as it is, if there is one (never read for it).
    pub fn cached(&self) -> Option<&View> {
        self.view.as_ref()
    }

    /// The view as it is, without checking the revision (read afresh only when there is none):
    /// for the members of one batch, which must all see each other's staged picks.
    pub async fn pinned(&mut self, store: &dyn Store) -> Result<&mut View> {
        match self.view {
            Some(ref mut v) => Ok(v),
            None => self.reload(store).await,
        }
    }

    /// Folds a commit of this agent into the view. Without a watch it is kept only when
    /// `revision` shows that no other writer came in between, and dropped otherwise.
    pub fn committed(
        &mut self,
        revision: Revision,
        claimed: &[(String, IpAddr)],
        released: &[(String, IpAddr)],
    ) {
        let watched = self.watched();
        match &mut self.view {
            Some(v) if watched => {
                v.apply(claimed, released);
                for key in claimed.iter().chain(released) {
                    self.local.insert(key.clone(), revision);
                }
            }
            Some(v) if v.revision.is_some_and(|r| r + 1 == revision) => {
                v.apply(claimed, released);
                v.revision = Some(revision);
            }
            _ => self.view = None,
        }
    }

    /// Applies a batch member's claims and releases to the view before they are committed, so
    /// the next member of the batch picks other addresses.
    pub fn stage(&mut self, claimed: &[(String, IpAddr)], released: &[(String, IpAddr)]) {
        if let Some(v) = &mut self.view {
            v.apply(claimed, released);
            let held = |held| move |(pool, ip): &(String, IpAddr)| (pool.clone(), *ip, held);
            self.staged.extend(released.iter().map(held(false)));
            self.staged.extend(claimed.iter().map(held(true)));
        }
    }

    /// The staged batch was committed at `revision`: its picks stand in the view (without a
    /// watch, only when nobody else wrote in between).
    pub fn staged_committed(&mut self, revision: Revision) {
        let staged = std::mem::take(&mut self.staged);
        if self.watched() {
            if self.view.is_some() {
                self.local.extend(
                    staged
                        .into_iter()
                        .map(|(pool, ip, _)| ((pool, ip), revision)),
                );
            }
        } else {
            self.committed(revision, &[], &[]);
        }
    }

    /// Forgets the view (after a conflict or an error).
    pub fn invalidate(&mut self) {
        self.view = None;
        self.staged.clear();
    }

    /// Notes that a commit lost a race against another writer. A race for an address (`taken`
    /// names it) makes the agent spread out for a while (see [`ViewCache::contended`]); a
    /// watched view then only needs to learn that address early (the watch will confirm it)
    /// once the batch's staged picks are undone. Any other conflict (an object changed) means
    /// reading the view afresh.
    pub fn conflicted(&mut self, taken: Option<(String, IpAddr)>) {
        if taken.is_some() {
            self.contended_until = Some(Instant::now() + CONTENDED_FOR);
        }
        let watched = self.watched();
        let staged = std::mem::take(&mut self.staged);
        match (taken, &mut self.view) {
            (Some((pool, ip)), Some(v)) if watched => {
                for (pool, ip, held) in staged.into_iter().rev() {
                    v.set_held(&pool, ip, !held);
                }
                v.set_held(&pool, ip, true);
            }
            _ => self.view = None,
        }
    }

    /// Whether this agent lost a race for an address within the last second: it then takes
    /// addresses from its own stripe (see [`View::spread`]) instead of the lowest free ones,
    /// which every racing agent would try at once. The lowest free address is the rule again
    /// once the race is over.
    pub fn contended(&self) -> bool {
        self.contended_until.is_some_and(|t| Instant::now() < t)
    }
}

#[cfg(test)]
mod tests {
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
        cache.conflicted(Some(("p".into(), ip("10.0.0.2"))));
        assert_eq!(held(&mut cache, store.as_ref()).await, ["10.0.0.2"]);
        assert!(cache.contended(), "contended: spread out");
        // Any other conflict drops the view: it is read afresh (the store holds nothing).
        cache.conflicted(None);
        assert!(cache.view.is_none());
        assert!(held(&mut cache, store.as_ref()).await.is_empty());
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
}
