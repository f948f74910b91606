//! The second witness of what is in use: which addresses the SpiderEndpoints record, by pool.
//! A pool's holders are the first; when they lost an entry (an admin's edit, a faulty tool, a
//! compromised node), the pod's record still names the address, and the agent does not hand
//! it out again while it does.
//!
//! Where the datastore can watch (etcd, Kubernetes), a background task lists the records once
//! and follows every change to them; elsewhere (SQLite) they are listed again whenever the view
//! is, that is when another writer moved the datastore's revision.
//!
//! The records of the agent's own node are also kept whole, with their revisions, while a watch
//! follows them: a DEL writes its record back from that copy instead of reading it (guarded by
//! the copy's revision, so a copy a moment behind makes the write fail, and the DEL reads the
//! record then).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spiderpool_api::{Object, SpiderEndpoint};
use spiderpool_store::{typed, Change, Kind, Result, Revision, Store, Stored};

/// Without a live watch nor a datastore revision to compare, the records are listed again at
/// most this often.
const RELIST_AFTER: Duration = Duration::from_secs(2);

/// How long the book remembers what a record deleted by someone else named.
const DEPARTED_FOR: Duration = Duration::from_secs(600);

/// Every endpoint's recorded addresses, and the other way round.
#[derive(Default)]
struct Records {
    by_key: HashMap<String, Vec<(String, IpAddr)>>,
    by_ip: HashMap<(String, IpAddr), Vec<String>>,
}

impl Records {
    /// `key` was deleted (a watch said so): what it recorded, if the book knew it.
    fn departed(&mut self, key: &str) -> Option<Vec<(String, IpAddr)>> {
        let held = self.by_key.get(key).cloned();
        self.set(key, Vec::new());
        held
    }

    fn set(&mut self, key: &str, ips: Vec<(String, IpAddr)>) {
        if let Some(old) = self.by_key.remove(key) {
            for at in old {
                if let Some(keys) = self.by_ip.get_mut(&at) {
                    keys.retain(|k| k != key);
                    if keys.is_empty() {
                        self.by_ip.remove(&at);
                    }
                }
            }
        }
        if ips.is_empty() {
            return;
        }
        for at in &ips {
            let keys = self.by_ip.entry(at.clone()).or_default();
            if !keys.iter().any(|k| k == key) {
                keys.push(key.to_string());
            }
        }
        self.by_key.insert(key.to_string(), ips);
    }

    fn listed(objects: &[(Object, Revision)]) -> Records {
        let mut r = Records::default();
        for (o, _) in objects {
            if let Object::Endpoint(e) = o {
                r.set(&o.key(), e.held());
            }
        }
        r
    }
}

/// The records of one node, whole, with their revisions.
type Whole = HashMap<String, (SpiderEndpoint, Revision)>;

/// Whether `ep` is a record of the node `node`.
fn on_node(ep: &SpiderEndpoint, node: Option<&str>) -> bool {
    node.is_some_and(|n| ep.status.current.node == n)
}

#[derive(Default)]
struct State {
    records: Records,
    /// Records deleted by another hand than this agent's DEL (the garbage collector once their
    /// Pod is gone, before the runtime's DEL comes): what they named, and since when.
    departed: HashMap<String, (Vec<(String, IpAddr)>, Instant)>,
    /// The records of the agent's node, whole (kept only while a watch follows them).
    whole: Whole,
    /// A watch keeps the records current.
    followed: bool,
    /// Without one: the datastore revision they were listed at, and when.
    listed_at: Option<(Option<Revision>, Instant)>,
}

/// The records as the agent knows them: see the module's notes.
#[derive(Default)]
pub struct RecordBook {
    state: Mutex<State>,
    /// The agent's node, whose records the book keeps whole.
    node: Option<String>,
}

impl RecordBook {
    /// A book kept current by following `store`'s endpoint records, where it can watch, and
    /// keeping those of `node` whole. Must be called inside the agent's runtime.
    pub fn following(store: Arc<dyn Store>, node: Option<&str>) -> Arc<RecordBook> {
        let book = Arc::new(RecordBook {
            node: node.map(str::to_string),
            ..RecordBook::default()
        });
        tokio::spawn(follow(store, book.clone()));
        book
    }

    /// Makes the records current for a view read at `revision` (`None`: the datastore has no
    /// revision): nothing to do while a watch follows them; otherwise listed again when the
    /// revision moved past what they were listed at (or, without one, every few seconds).
    pub async fn refresh(&self, store: &dyn Store, revision: Option<Revision>) -> Result<()> {
        {
            let s = self.state.lock().expect("records lock");
            if s.followed {
                return Ok(());
            }
            match (s.listed_at, revision) {
                (Some((Some(at), _)), Some(now)) if at == now => return Ok(()),
                (Some((None, when)), None) if when.elapsed() < RELIST_AFTER => return Ok(()),
                _ => {}
            }
        }
        let records = Records::listed(&typed::list(store, Kind::Endpoint).await?);
        let mut s = self.state.lock().expect("records lock");
        if !s.followed {
            s.records = records;
            s.listed_at = Some((revision, Instant::now()));
        }
        Ok(())
    }

    /// This agent committed at `revision`: when nobody else wrote since the records were
    /// listed, they stay current (its own records are written with their pools' holders, which
    /// the view has).
    pub fn committed(&self, revision: Revision) {
        let mut s = self.state.lock().expect("records lock");
        if let Some((Some(at), when)) = s.listed_at {
            if at + 1 == revision {
                s.listed_at = Some((Some(revision), when));
            }
        }
    }

    /// An endpoint other than `own` that records `ip` of `pool`, as far as the book knows.
    pub fn recorded_by(&self, pool: &str, ip: IpAddr, own: &str) -> Option<String> {
        let s = self.state.lock().expect("records lock");
        s.records
            .by_ip
            .get(&(pool.to_string(), ip))?
            .iter()
            .find(|k| *k != own)
            .cloned()
    }

    /// What `key` records as read or written just now (`None`: no such endpoint), to correct
    /// the book. Its whole copy is the watch's to replace: the watch may tell this agent's write
    /// before its commit returns, and a copy behind it only fails the write it guards.
    pub fn correct(&self, key: &str, ips: Vec<(String, IpAddr)>) {
        let mut s = self.state.lock().expect("records lock");
        s.departed.remove(key);
        s.records.set(key, ips);
    }

    /// The record `key` of this agent's node as the watch last told it, with its revision: a
    /// copy that may be a moment behind, to be written back only guarded by that revision.
    pub fn whole(&self, key: &str) -> Option<(SpiderEndpoint, Revision)> {
        let s = self.state.lock().expect("records lock");
        s.whole.get(key).filter(|_| s.followed).cloned()
    }

    /// As if a live watch had told `key` whole at `revision` (tests that need a copy behind).
    #[cfg(test)]
    pub(crate) fn told_whole(&self, key: &str, ep: SpiderEndpoint, revision: Revision) {
        let mut s = self.state.lock().expect("records lock");
        s.followed = true;
        s.whole.insert(key.to_string(), (ep, revision));
    }

    /// A write guarded by the whole copy of `key` failed: the copy is not used again until the
    /// watch tells the record afresh.
    pub fn forget(&self, key: &str) {
        self.state.lock().expect("records lock").whole.remove(key);
    }

    /// What the record `key` named when the watch saw it deleted (within the last
    /// [`DEPARTED_FOR`]), unless this agent deleted it itself ([`RecordBook::correct`]).
    pub fn departed(&self, key: &str) -> Option<Vec<(String, IpAddr)>> {
        let s = self.state.lock().expect("records lock");
        s.departed
            .get(key)
            .filter(|(_, when)| when.elapsed() < DEPARTED_FOR)
            .map(|(held, _)| held.clone())
    }

    /// Whether `key` surely has no record holding addresses, as far as a live watch tells: a
    /// hint that spares a read, never the last word (a record the watch has not delivered yet,
    /// or one that holds nothing, makes the create that follows fail, and that is read again).
    pub fn surely_absent(&self, key: &str) -> bool {
        let s = self.state.lock().expect("records lock");
        s.followed && !s.records.by_key.contains_key(key)
    }

    /// A watch told these changes.
    fn told(&self, batch: Vec<Change>) {
        // This node's records are decoded before the lock is taken.
        let batch: Vec<_> = batch
            .into_iter()
            .filter_map(|c| match c {
                Change::Recorded {
                    key,
                    ips,
                    revision,
                    value,
                } => {
                    let whole = value.and_then(|v| self.whole_of(&key, v, revision));
                    Some((key, ips, whole))
                }
                _ => None,
            })
            .collect();
        let mut s = self.state.lock().expect("records lock");
        for (key, ips, whole) in batch {
            tracing::debug!(endpoint = %key, addresses = ips.len(), "an endpoint record changed");
            match whole {
                Some(w) => s.whole.insert(key.clone(), w),
                None => s.whole.remove(&key),
            };
            if !ips.is_empty() {
                s.departed.remove(&key);
                s.records.set(&key, ips);
            } else if let Some(held) = s.records.departed(&key) {
                s.departed.retain(|_, (_, t)| t.elapsed() < DEPARTED_FOR);
                s.departed.insert(key, (held, Instant::now()));
            }
        }
    }

    /// The record `key` told by a watch as `value` at `revision`, if it is one of this node's.
    fn whole_of(
        &self,
        key: &str,
        value: serde_json::Value,
        revision: Revision,
    ) -> Option<(SpiderEndpoint, Revision)> {
        let node = self.node.as_deref()?;
        if value
            .pointer("/status/current/node")
            .and_then(|n| n.as_str())
            != Some(node)
        {
            return None;
        }
        let stored = Stored {
            key: key.to_string(),
            value,
            revision,
        };
        match typed::decode(Kind::Endpoint, stored) {
            Ok((Object::Endpoint(e), rev)) => Some((e, rev)),
            _ => None,
        }
    }

    /// How many endpoints the book holds records of.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .expect("records lock")
            .records
            .by_key
            .len()
    }

    /// Whether the book holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Lists the records and follows their changes for as long as the agent runs; returns at once
/// when the backend cannot watch. The watch is started before the list, so nothing written in
/// between is missed (its changes, applied after the list, leave each record as it is now).
async fn follow(store: Arc<dyn Store>, book: Arc<RecordBook>) {
    const BACKOFF: Duration = Duration::from_millis(100);
    let mut backoff = BACKOFF;
    loop {
        let started = async {
            let after = store.revision().await?.unwrap_or(0);
            let Some(changes) = store.watch(after, &[Kind::Endpoint]).await? else {
                return Ok(None);
            };
            let objects = typed::list(store.as_ref(), Kind::Endpoint).await?;
            let whole: Whole = objects
                .iter()
                .filter_map(|(o, rev)| match o {
                    Object::Endpoint(e) if on_node(e, book.node.as_deref()) => {
                        Some((o.key(), (e.clone(), *rev)))
                    }
                    _ => None,
                })
                .collect();
            let listed = Records::listed(&objects);
            Ok::<_, spiderpool_store::StoreError>(Some((changes, listed, whole)))
        };
        match started.await {
            Ok(None) => return,
            Ok(Some((mut changes, listed, whole))) => {
                {
                    let mut s = book.state.lock().expect("records lock");
                    s.records = listed;
                    s.whole = whole;
                    s.followed = true;
                }
                tracing::debug!(endpoints = book.len(), "following the endpoint records");
                backoff = BACKOFF;
                while let Some(batch) = changes.recv().await {
                    match batch {
                        Ok(batch) => book.told(batch),
                        Err(e) => {
                            tracing::warn!(error = %e, "the endpoint records' watch ended; watching again");
                            break;
                        }
                    }
                }
                let mut s = book.state.lock().expect("records lock");
                s.followed = false;
                s.listed_at = None;
                s.whole.clear();
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow the endpoint records; trying again")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(pool: &str, ip: &str) -> (String, IpAddr) {
        (pool.into(), ip.parse().unwrap())
    }

    fn told(key: &str, node: &str, ip: &str, revision: Revision) -> Change {
        let value = serde_json::json!({
            "apiVersion": "spiderpool.spidernet.io/v2beta1", "kind": "SpiderEndpoint",
            "metadata": {"name": key.split_once('/').unwrap().1, "namespace": "default"},
            "status": {"current": {"uid": "u", "node": node, "ips": [{"interface": "eth0",
                "containerID": "c", "ipv4": format!("{ip}/24"), "ipv4Pool": "p"}]}}});
        Change::Recorded {
            key: key.into(),
            ips: vec![at("p", ip)],
            revision,
            value: Some(value),
        }
    }

    #[test]
    fn the_records_of_its_node_are_kept_whole_while_a_watch_follows_them() {
        let book = RecordBook {
            node: Some("n1".into()),
            ..RecordBook::default()
        };
        book.state.lock().unwrap().followed = true;
        book.told(vec![
            told("default/a", "n1", "10.0.0.1", 7),
            told("default/b", "n2", "10.0.0.2", 8),
        ]);
        // Another node's record is known by its addresses only.
        assert!(book.whole("default/b").is_none());
        assert!(book
            .recorded_by("p", "10.0.0.2".parse().unwrap(), "x/y")
            .is_some());
        let (ep, rev) = book.whole("default/a").expect("this node's record, whole");
        assert_eq!(rev, 7);
        assert_eq!(
            ep.status.current.ips[0].ipv4.as_deref(),
            Some("10.0.0.1/24")
        );
        // A later change replaces it; a record moved to another node is no longer kept.
        book.told(vec![told("default/a", "n1", "10.0.0.3", 9)]);
        assert_eq!(book.whole("default/a").unwrap().1, 9);
        book.told(vec![told("default/a", "n2", "10.0.0.3", 10)]);
        assert!(book.whole("default/a").is_none());
        // The agent's own write leaves the copy to the watch (which may have told it first);
        // a write guarded by the copy that failed drops it until the watch tells it again.
        book.told(vec![told("default/a", "n1", "10.0.0.3", 11)]);
        book.correct("default/a", vec![at("p", "10.0.0.3")]);
        assert_eq!(book.whole("default/a").unwrap().1, 11);
        book.told(vec![told("default/a", "n1", "10.0.0.3", 12)]);
        book.forget("default/a");
        assert!(book.whole("default/a").is_none());
        // A deletion drops it; and without a live watch no copy is given.
        book.told(vec![told("default/a", "n1", "10.0.0.3", 13)]);
        book.told(vec![Change::Recorded {
            key: "default/a".into(),
            ips: vec![],
            revision: 14,
            value: None,
        }]);
        assert!(book.whole("default/a").is_none());
        book.told(vec![told("default/a", "n1", "10.0.0.3", 15)]);
        book.state.lock().unwrap().followed = false;
        assert!(book.whole("default/a").is_none());
    }

    #[test]
    fn a_record_rewritten_or_gone_leaves_no_trace_of_what_it_held() {
        let book = RecordBook::default();
        book.correct("default/a", vec![at("p", "10.0.0.1"), at("p6", "fd00::1")]);
        book.correct("default/b", vec![at("p", "10.0.0.1")]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            book.recorded_by("p", ip("10.0.0.1"), "default/b")
                .as_deref(),
            Some("default/a")
        );
        assert_eq!(
            book.recorded_by("p", ip("10.0.0.1"), "default/a")
                .as_deref(),
            Some("default/b")
        );
        // Another pool's address of the same value is not this pool's.
        assert_eq!(book.recorded_by("q", ip("10.0.0.1"), "x/y"), None);
        book.correct("default/a", vec![at("p", "10.0.0.2")]);
        assert_eq!(book.recorded_by("p6", ip("fd00::1"), "x/y"), None);
        assert_eq!(
            book.recorded_by("p", ip("10.0.0.2"), "x/y").as_deref(),
            Some("default/a")
        );
        book.correct("default/b", vec![]);
        assert_eq!(book.recorded_by("p", ip("10.0.0.1"), "x/y"), None);
        assert_eq!(book.len(), 1);
        book.correct("default/a", vec![]);
        assert!(book.is_empty());
        assert!(book.state.lock().unwrap().records.by_ip.is_empty());
    }
}
