//! An in-memory backend for tests: the same semantics as the durable ones, in one process.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use async_trait::async_trait;
use serde_json::Value;

use crate::{
    check, Allocation, Expect, Holder, Kind, Op, Result, Revision, Store, StoreError, Stored,
};

#[derive(Default)]
struct State {
    revision: Revision,
    objects: BTreeMap<(Kind, String), (Value, Revision)>,
    allocations: BTreeMap<(String, IpAddr), (Holder, Revision)>,
}

/// A store kept in memory.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Stored>> {
        let s = self.state.lock().expect("lock");
        Ok(s.objects
            .get(&(kind, key.to_string()))
            .map(|(v, r)| Stored {
                key: key.to_string(),
                value: v.clone(),
                revision: *r,
            }))
    }

    async fn list(&self, kind: Kind) -> Result<Vec<Stored>> {
        let s = self.state.lock().expect("lock");
        Ok(s.objects
            .range((kind, String::new())..)
            .take_while(|((k, _), _)| *k == kind)
            .map(|((_, key), (v, r))| Stored {
                key: key.clone(),
                value: v.clone(),
                revision: *r,
            })
            .collect())
    }

    async fn allocations(&self, pool: &str) -> Result<Vec<Allocation>> {
        let s = self.state.lock().expect("lock");
        Ok(s.allocations
            .iter()
            .filter(|((p, _), _)| p == pool)
            .map(|((p, ip), (h, r))| Allocation {
                pool: p.clone(),
                ip: *ip,
                holder: h.clone(),
                revision: *r,
            })
            .collect())
    }

    async fn allocation_counts(&self) -> Result<BTreeMap<String, u64>> {
        let s = self.state.lock().expect("lock");
        let mut out = BTreeMap::new();
        for (pool, _) in s.allocations.keys() {
            *out.entry(pool.clone()).or_insert(0) += 1;
        }
        Ok(out)
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<Revision> {
        let mut s = self.state.lock().expect("lock");
        // Ops apply in order to a scratch copy, each checked against the state the earlier ops
        // left (as inside a SQLite transaction); the copy replaces the state only if all pass.
        let rev = s.revision + 1;
        let mut objects = s.objects.clone();
        let mut allocations = s.allocations.clone();
        for op in ops {
            match op {
                Op::Put {
                    kind,
                    key,
                    value,
                    expect,
                } => {
                    let cur = objects.get(&(kind, key.clone())).map(|(_, r)| *r);
                    check(expect, cur, &format!("{kind}/{key}"))?;
                    objects.insert((kind, key), (value, rev));
                }
                Op::Delete { kind, key, expect } => {
                    let cur = objects.get(&(kind, key.clone())).map(|(_, r)| *r);
                    check(expect, cur, &format!("{kind}/{key}"))?;
                    objects.remove(&(kind, key));
                }
                Op::Claim {
                    pool,
                    ip,
                    holder,
                    pool_revision,
                } => {
                    let cur = objects.get(&(Kind::IPPool, pool.clone())).map(|(_, r)| *r);
                    check(
                        Expect::Revision(pool_revision),
                        cur,
                        &format!("spiderippools/{pool}"),
                    )?;
                    if allocations.contains_key(&(pool.clone(), ip)) {
                        return Err(StoreError::taken_conflict(&pool, ip));
                    }
                    allocations.insert((pool, ip), (holder, rev));
                }
                Op::NoClaimsSince { pool, since } => {
                    if allocations
                        .iter()
                        .any(|((p, _), (_, r))| *p == pool && *r > since)
                    {
                        return Err(StoreError::claimed_since(&pool, since));
                    }
                }
                Op::Release {
                    pool,
                    ip,
                    container_id,
                    nic,
                    pod_uid,
                } => {
                    let k = (pool, ip);
                    if allocations
                        .get(&k)
                        .is_some_and(|(h, _)| h.released_by(&container_id, &nic, &pod_uid))
                    {
                        allocations.remove(&k);
                    }
                }
            }
        }
        s.objects = objects;
        s.allocations = allocations;
        s.revision = rev;
        Ok(rev)
    }

    async fn revision(&self) -> Result<Option<Revision>> {
        Ok(Some(self.state.lock().expect("lock").revision))
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}
