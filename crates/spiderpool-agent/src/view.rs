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
use std::time::{Duration, Instant};

use spiderpool_api::Object;
use spiderpool_core::pick::Spread;
use spiderpool_core::{IpSet, Labels, Pool};
use spiderpool_store::{typed, Kind, Result, Revision, Store};

mod cache;
mod feed;
mod records;
#[cfg(test)]
mod tests;

pub use cache::ViewCache;
use feed::*;
pub use records::RecordBook;

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
        let mut node_addresses = Vec::new();
        for (o, _) in typed::list(store, Kind::Node).await? {
            if let Object::Kube(_, k) = &o {
                node_addresses.extend(k.node_addresses());
            }
            let labels = o.metadata().labels.clone();
            nodes.insert(o.metadata().name.clone(), Some(labels));
        }
        reserved = reserved.union(&spiderpool_core::pick::never_handed_out(
            &pools,
            node_addresses,
        ));
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

    /// The datastore revision the view is current at (`None` when the datastore has none).
    pub fn revision(&self) -> Option<Revision> {
        self.revision
    }

    /// Counts `ip` of `pool` as held from now on in this view (an address found in use by
    /// other means than the pool's holders), if the view has that pool's holders.
    pub fn mark_held(&mut self, pool: &str, ip: IpAddr) {
        self.set_held(pool, ip, true);
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
