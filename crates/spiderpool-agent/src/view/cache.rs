//! The agent's one view, reused while it is current: folded forward from the feed, or
//! checked against the datastore's revision, and read afresh when neither can tell.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spiderpool_store::{Result, Revision, Store};
use tokio::sync::Notify;

use super::*;

/// How long an agent keeps to its stripe of the free addresses after it lost a race for one,
/// at least; and at most, however long the attempts take (see [`ViewCache::conflicted`]).
pub(super) const CONTENDED_FOR: Duration = Duration::from_secs(1);
const CONTENDED_AT_MOST: Duration = Duration::from_secs(30);
/// How many attempts as long as the one that lost the agent stays spread for: the next
/// attempts, which take about as long on a loaded datastore, are prepared spread as well.
const CONTENDED_ATTEMPTS: u32 = 4;

/// The cached view, if any, how contended the last allocations were, and what keeps the view
/// current.
#[derive(Default)]
pub struct ViewCache {
    pub(super) view: Option<View>,
    /// Until when allocations spread out (see [`View::spread`]): set by a race lost for an
    /// address.
    pub(super) contended_until: Option<Instant>,
    /// Filled by the watch, where the datastore has one.
    pub(super) feed: Option<Arc<Mutex<Feed>>>,
    /// This agent's own commits that the watch has not reported yet, with their revisions:
    /// older reports of those addresses are out of date.
    pub(super) local: HashMap<(String, IpAddr), Revision>,
    /// The addresses the batch being prepared has staged, and whether held after it.
    pub(super) staged: Vec<(String, IpAddr, bool)>,
    /// Notified when the watch reports that the view must be read afresh.
    pub(super) stale: Arc<Notify>,
    /// Which addresses the endpoints record (checked before an address goes out).
    pub(super) records: Option<Arc<RecordBook>>,
}

impl ViewCache {
    /// A cache kept current by following `store`'s changes, where it can watch, for the agent
    /// of `node` (whose endpoint records it keeps whole). Must be called inside the agent's
    /// runtime.
    pub fn following(store: Arc<dyn Store>, node: Option<&str>) -> Self {
        let feed = Arc::new(Mutex::new(Feed::default()));
        let stale = Arc::new(Notify::new());
        let records = RecordBook::following(store.clone(), node);
        tokio::spawn(follow(store, feed.clone(), stale.clone()));
        ViewCache {
            feed: Some(feed),
            stale,
            records: Some(records),
            ..ViewCache::default()
        }
    }

    /// The endpoint records the agent checks its picks against, if it keeps them.
    pub fn records(&self) -> Option<Arc<RecordBook>> {
        self.records.clone()
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
            match v.load_held(store, &pool).await {
                Ok(()) => {}
                // One corrupt pool is skipped here (an ADD that needs it says so).
                Err(e @ spiderpool_store::StoreError::Corrupt { .. }) => {
                    tracing::debug!(%pool, error = %e, "warming the view: skipping a pool");
                }
                Err(e) => return Err(e),
            }
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
        if let Some(r) = &self.records {
            r.committed(revision);
        }
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

    /// Notes that a commit lost a race against another writer, in an attempt that took
    /// `lasted` from its reads to its commit. A race for an address (`taken` names it) makes
    /// the agent spread out for a while (see [`ViewCache::raced`]; on an API server loaded by
    /// a burst an attempt takes seconds, and a window shorter than the next attempt would let
    /// it pick the lowest free addresses again, which every other agent is racing for too).
    /// A watched view then only needs to learn that address early (the watch will confirm
    /// it) once the batch's staged picks are undone. Any other conflict (an object changed)
    /// means reading the view afresh.
    pub fn conflicted(&mut self, taken: Option<(String, IpAddr)>, lasted: Duration) {
        if taken.is_some() {
            self.raced(lasted);
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

    /// Notes that other agents are allocating from the same pools as this one: a race lost
    /// for an address, or a commit that won but found the pool written meanwhile (refused
    /// once, laid again). The agent spreads out for a second at least, and for as long as a
    /// few attempts like this one (`lasted`) take.
    pub fn raced(&mut self, lasted: Duration) {
        let window = lasted
            .saturating_mul(CONTENDED_ATTEMPTS)
            .clamp(CONTENDED_FOR, CONTENDED_AT_MOST);
        let until = Instant::now() + window;
        self.contended_until = Some(self.contended_until.map_or(until, |t| t.max(until)));
    }

    /// Whether this agent lost a race for an address lately (see [`ViewCache::conflicted`]):
    /// it then takes addresses from its own stripe (see [`View::spread`]) instead of the
    /// lowest free ones, which every racing agent would try at once. The lowest free address
    /// is the rule again once the race is over.
    pub fn contended(&self) -> bool {
        self.contended_until.is_some_and(|t| Instant::now() < t)
    }
}
