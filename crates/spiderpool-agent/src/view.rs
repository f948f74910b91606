//! The agent's cached picture of what allocation reads: validated pools, reserved addresses,
//! the addresses held per pool, node and namespace labels. It is tagged with the datastore
//! revision it was read at and reused only while that revision is current; the agent's own
//! commits are folded in when their revision shows nobody else wrote in between. So a busy
//! agent does not re-read every pool's holders per request, and the cost of an ADD does not
//! grow with the number of addresses held.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use spiderpool_api::Object;
use spiderpool_core::{IpSet, Labels, Pool};
use spiderpool_store::{typed, Kind, Result, Revision, Store};

/// What allocation reads, as of one revision.
pub struct View {
    revision: Option<Revision>,
    /// Every valid pool.
    pub pools: Vec<Pool>,
    /// Revision of each pool object (claims are guarded by it).
    pub pool_revs: BTreeMap<String, Revision>,
    /// Union of every SpiderReservedIP.
    pub reserved: IpSet,
    held: HashMap<String, IpSet>,
    namespaces: HashMap<String, (Labels, Labels)>,
    nodes: HashMap<String, Option<Labels>>,
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
        Ok(View {
            revision,
            pools,
            pool_revs,
            reserved,
            held: HashMap::new(),
            namespaces: HashMap::new(),
            nodes: HashMap::new(),
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

    /// Releases first, then claims: the order of a transaction that hands an address over.
    fn apply(&mut self, claimed: &[(String, IpAddr)], released: &[(String, IpAddr)]) {
        for (pool, ip) in released {
            if let Some(set) = self.held.get_mut(pool) {
                *set = set.difference(&IpSet::from_ips([*ip]));
            }
        }
        for (pool, ip) in claimed {
            if let Some(set) = self.held.get_mut(pool) {
                *set = set.union(&IpSet::from_ips([*ip]));
            }
        }
    }
}

/// The cached view, if any, and how contended the last allocations were.
#[derive(Default)]
pub struct ViewCache(Option<View>, u32);

impl ViewCache {
    /// The view as of the datastore's current revision, reusing the cached one when it is
    /// still current.
    pub async fn current(&mut self, store: &dyn Store) -> Result<&mut View> {
        let now = store.revision().await?;
        let fresh = matches!((&self.0, now), (Some(v), Some(r)) if v.revision == Some(r));
        if !fresh {
            self.0 = Some(View::load(store, now).await?);
        }
        Ok(self.0.as_mut().expect("just filled"))
    }

    /// The view as it is, without checking the revision (read afresh only when there is none):
    /// for the members of one batch, which must all see each other's staged picks.
    pub async fn pinned(&mut self, store: &dyn Store) -> Result<&mut View> {
        if self.0.is_none() {
            let now = store.revision().await?;
            self.0 = Some(View::load(store, now).await?);
        }
        Ok(self.0.as_mut().expect("just filled"))
    }

    /// Folds a commit of this agent into the view: kept only when `revision` shows that no
    /// other writer came in between, dropped otherwise.
    pub fn committed(
        &mut self,
        revision: Revision,
        claimed: &[(String, IpAddr)],
        released: &[(String, IpAddr)],
    ) {
        match &mut self.0 {
            Some(v) if v.revision.is_some_and(|r| r + 1 == revision) => {
                v.apply(claimed, released);
                v.revision = Some(revision);
            }
            _ => self.0 = None,
        }
    }

    /// Applies a batch member's claims and releases to the view before they are committed, so
    /// the next member of the batch picks other addresses.
    pub fn stage(&mut self, claimed: &[(String, IpAddr)], released: &[(String, IpAddr)]) {
        if let Some(v) = &mut self.0 {
            v.apply(claimed, released);
        }
    }

    /// The staged batch was committed at `revision`: keep the view only when nobody else wrote
    /// in between.
    pub fn staged_committed(&mut self, revision: Revision) {
        self.committed(revision, &[], &[]);
    }

    /// Forgets the view (after a conflict or an error).
    pub fn invalidate(&mut self) {
        self.0 = None;
    }

    /// Notes that a commit lost a race against another writer.
    pub fn conflicted(&mut self) {
        self.1 = self.1.saturating_add(2).min(16);
    }

    /// Notes that a commit went through: contention is forgotten gradually, so a busy agent
    /// keeps to its share while the race lasts.
    pub fn settled(&mut self) {
        self.1 = self.1.saturating_sub(1);
    }

    /// Which of `shares` shares of the free addresses to take from while this agent keeps
    /// losing races (derived from `seed`, the node); `None` when it does not.
    pub fn slot(&self, seed: &str, shares: u32) -> Option<(u32, u32)> {
        if self.1 == 0 {
            return None;
        }
        let h = seed.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        });
        Some(((h % u64::from(shares)) as u32, shares))
    }
}
