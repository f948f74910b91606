//! The second witness of what is in use: which addresses the SpiderEndpoints record, by pool.
//! A pool's holders are the first; when they lost an entry (an admin's edit, a faulty tool, a
//! compromised node), the pod's record still names the address, and the agent does not hand
//! it out again while it does.
//!
//! Where the datastore can watch (etcd, Kubernetes), a background task lists the records once
//! and follows every change to them; elsewhere (SQLite) they are listed again whenever the view
//! is, that is when another writer moved the datastore's revision.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spiderpool_api::Object;
use spiderpool_store::{typed, Change, Kind, Result, Revision, Store};

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

    fn listed(objects: Vec<(Object, Revision)>) -> Records {
        let mut r = Records::default();
        for (o, _) in objects {
            if let Object::Endpoint(e) = &o {
                r.set(&o.key(), e.held());
            }
        }
        r
    }
}

#[derive(Default)]
struct State {
    records: Records,
    /// Records deleted by another hand than this agent's DEL (the garbage collector once their
    /// Pod is gone, before the runtime's DEL comes): what they named, and since when.
    departed: HashMap<String, (Vec<(String, IpAddr)>, Instant)>,
    /// A watch keeps the records current.
    followed: bool,
    /// Without one: the datastore revision they were listed at, and when.
    listed_at: Option<(Option<Revision>, Instant)>,
}

/// The records as the agent knows them: see the module's notes.
#[derive(Default)]
pub struct RecordBook {
    state: Mutex<State>,
}

impl RecordBook {
    /// A book kept current by following `store`'s endpoint records, where it can watch. Must be
    /// called inside the agent's runtime.
    pub fn following(store: Arc<dyn Store>) -> Arc<RecordBook> {
        let book = Arc::new(RecordBook::default());
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
        let records = Records::listed(typed::list(store, Kind::Endpoint).await?);
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

    /// What `key` records as read just now (`None`: no such endpoint), to correct the book.
    pub fn correct(&self, key: &str, ips: Vec<(String, IpAddr)>) {
        let mut s = self.state.lock().expect("records lock");
        s.departed.remove(key);
        s.records.set(key, ips);
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
            let listed = Records::listed(typed::list(store.as_ref(), Kind::Endpoint).await?);
            Ok::<_, spiderpool_store::StoreError>(Some((changes, listed)))
        };
        match started.await {
            Ok(None) => return,
            Ok(Some((mut changes, listed))) => {
                {
                    let mut s = book.state.lock().expect("records lock");
                    s.records = listed;
                    s.followed = true;
                }
                tracing::debug!(endpoints = book.len(), "following the endpoint records");
                backoff = BACKOFF;
                while let Some(batch) = changes.recv().await {
                    match batch {
                        Ok(batch) => {
                            let mut s = book.state.lock().expect("records lock");
                            for c in batch {
                                if let Change::Recorded { key, ips, .. } = c {
                                    tracing::debug!(endpoint = %key, addresses = ips.len(), "an endpoint record changed");
                                    if !ips.is_empty() {
                                        s.departed.remove(&key);
                                        s.records.set(&key, ips);
                                    } else if let Some(held) = s.records.departed(&key) {
                                        s.departed.retain(|_, (_, t)| t.elapsed() < DEPARTED_FOR);
                                        s.departed.insert(key, (held, Instant::now()));
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the endpoint records' watch ended; watching again");
                            break;
                        }
                    }
                }
                let mut s = book.state.lock().expect("records lock");
                s.followed = false;
                s.listed_at = None;
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
