//! A pool's holders, written as one status update per commit: releases owned by container
//! and interface, claims guarded by the pool's generation at the revision they were planned on
//! (remembered per pool as pools are seen), laid again on a fresh read after each 409; and the
//! check behind `Op::NoClaimsSince`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use kube::api::{Api, DynamicObject, ListParams, PostParams, VersionMatch};
use serde_json::Value;
use spiderpool_api::SpiderIPPool;
use spiderpool_store::{Holder, Kind, Op, Result, Revision, StoreError};

use super::*;

impl Inner {
    pub(super) fn observe(&self, kind: Kind, o: &DynamicObject) {
        if kind != Kind::IPPool {
            return;
        }
        let (Some(name), Some(generation), Ok(rv)) =
            (&o.metadata.name, o.metadata.generation, rv_of(o))
        else {
            return;
        };
        let mut g = self.generations.lock().expect("generations lock");
        let seen = g.entry(name.clone()).or_default();
        seen.insert(rv, generation);
        while seen.len() > 64 {
            seen.pop_first();
        }
    }

    /// The pool as of revision `rv` (`None`: it did not exist then).
    pub(super) async fn pool_at(&self, pool: &str, rv: Revision) -> Result<Option<DynamicObject>> {
        let ar = api_resource(Kind::IPPool, None)?;
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        let lp = ListParams::default()
            .fields(&format!("metadata.name={pool}"))
            .at(&rv.to_string())
            .matching(VersionMatch::Exact);
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        match api.list(&lp).await {
            Ok(list) => Ok(list.items.into_iter().next()),
            Err(kube::Error::Api(s)) if s.code == 410 => Err(StoreError::changed(format!(
                "spiderippools/{pool}: revision {rv} is no longer kept by the API server; read again"
            ))),
            Err(e) => Err(self.err(&format!("read spiderippools/{pool} at {rv}"), e)),
        }
    }

    /// The generation pool `pool` had at revision `rv`.
    pub(super) async fn generation_at(&self, pool: &str, rv: Revision) -> Result<Option<i64>> {
        let known = self
            .generations
            .lock()
            .expect("generations lock")
            .get(pool)
            .and_then(|m| m.get(&rv).copied());
        if known.is_some() {
            return Ok(known);
        }
        let Some(o) = self.pool_at(pool, rv).await? else {
            return Ok(None);
        };
        let g = o.metadata.generation;
        if let Some(g) = g {
            self.generations
                .lock()
                .expect("generations lock")
                .entry(pool.into())
                .or_default()
                .insert(rv, g);
        }
        Ok(g)
    }

    /// Applies the releases and claims of one commit to one pool's status, as one write laid
    /// again on a fresh read after each 409. Returns the revision written, if anything was.
    pub(super) async fn update_pool(&self, pool: &str, ops: &[Op]) -> Result<Option<Revision>> {
        let (api, _) = self.api(Kind::IPPool, pool)?;
        let claims = ops.iter().any(|o| matches!(o, Op::Claim { .. }));
        for attempt in 0..RELAY.attempts {
            if attempt > 0 {
                tokio::time::sleep(relay_jitter(attempt)).await;
            }
            let Some(mut obj) = self.get_object(Kind::IPPool, pool).await? else {
                if claims {
                    return Err(StoreError::changed(format!(
                        "spiderippools/{pool} no longer exists"
                    )));
                }
                return Ok(None);
            };
            let generation = obj.metadata.generation;
            let mut value = serde_json::to_value(&obj).map_err(|e| StoreError::Corrupt {
                key: format!("spiderippools/{pool}"),
                message: e.to_string(),
            })?;
            let mut entries = entries_of(pool, &value)?;
            let mut changed = false;
            let mut planned_at: Vec<Revision> = Vec::new();
            for op in ops {
                match op {
                    Op::Release {
                        ip,
                        container_id,
                        nic,
                        pod_uid,
                        ..
                    } => {
                        let key = ip.to_string();
                        if entries.get(&key).is_some_and(|e| {
                            Holder::from(e.clone()).released_by(container_id, nic, pod_uid)
                        }) {
                            entries.remove(&key);
                            changed = true;
                        }
                    }
                    Op::Claim {
                        ip,
                        holder,
                        pool_revision,
                        ..
                    } => {
                        let key = ip.to_string();
                        if entries.contains_key(&key) {
                            return Err(StoreError::taken_conflict(pool, *ip));
                        }
                        entries.insert(key, Entry::from(holder));
                        changed = true;
                        if !planned_at.contains(pool_revision) {
                            planned_at.push(*pool_revision);
                        }
                    }
                    _ => {}
                }
            }
            // The spec the claims were planned on must still be the pool's.
            for rv in planned_at {
                let then = self.generation_at(pool, rv).await?;
                if then != generation {
                    return Err(StoreError::changed(format!(
                        "spiderippools/{pool} changed since revision {rv} (generation {} is now {}): the addresses were chosen on its earlier spec",
                        then.map_or("-".into(), |g| g.to_string()),
                        generation.map_or("-".into(), |g| g.to_string()),
                    )));
                }
            }
            if !changed {
                return Ok(None);
            }
            if claims && entries.len() > self.cap {
                return Err(StoreError::Full(format!(
                    "pool {pool} would record {} addresses, more than the {} one SpiderIPPool may hold in Kubernetes mode (the object must fit the API server's size limit); split the pool",
                    entries.len(),
                    self.cap
                )));
            }
            let status = value
                .as_object_mut()
                .expect("an object")
                .entry("status")
                .or_insert_with(|| Value::Object(Default::default()));
            if !status.is_object() {
                *status = Value::Object(Default::default());
            }
            let status = status.as_object_mut().expect("an object");
            if entries.is_empty() {
                status.remove("allocatedIPs");
            } else {
                status.insert(
                    "allocatedIPs".into(),
                    Value::String(serde_json::to_string(&entries).expect("entries serialise")),
                );
            }
            status.insert("allocatedIPCount".into(), entries.len().into());
            // The counts as upstream's controller writes them, from the spec: the pool's own
            // addresses only, saturated at the CRD's int64.
            if let Ok(p) = serde_json::from_value::<SpiderIPPool>(value.clone()) {
                if let Ok(core) = p.to_pool() {
                    let held: Vec<std::net::IpAddr> =
                        entries.keys().filter_map(|k| k.parse().ok()).collect();
                    value["status"]["allocatedIPCount"] = core.allocated_ip_count(&held).into();
                    value["status"]["totalIPCount"] = core.total_ip_count().into();
                }
            }
            obj = serde_json::from_value(value).map_err(|e| StoreError::Corrupt {
                key: format!("spiderippools/{pool}"),
                message: e.to_string(),
            })?;
            match api.replace_status(pool, &PostParams::default(), &obj).await {
                Ok(written) => {
                    self.stats.status_writes.fetch_add(1, Ordering::Relaxed);
                    self.observe(Kind::IPPool, &written);
                    self.wrote(Kind::IPPool, pool, Written::Object(&written));
                    return rv_of(&written).map(Some);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    self.stats.status_conflicts.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(kube::Error::Api(s)) if s.code == 404 && !claims => return Ok(None),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    return Err(StoreError::changed(format!(
                        "spiderippools/{pool} no longer exists"
                    )))
                }
                Err(e) => return Err(self.err(&format!("write spiderippools/{pool} status"), e)),
            }
        }
        Err(StoreError::changed(format!(
            "spiderippools/{pool}: the status kept changing under {} writes",
            RELAY.attempts
        )))
    }

    /// Fails when an address of `pool` was claimed after revision `since`; returns the pool's
    /// current revision (a write of the pool guarded by it sees no later claim either).
    pub(super) async fn no_claims_since(
        &self,
        pool: &str,
        since: Revision,
    ) -> Result<Option<Revision>> {
        let Some(now) = self.get_object(Kind::IPPool, pool).await? else {
            return Ok(None);
        };
        let rv = rv_of(&now)?;
        if rv <= since {
            return Ok(Some(rv));
        }
        let before = match self.pool_at(pool, since).await? {
            Some(o) => entries_of(pool, &serde_json::to_value(&o).unwrap_or_default())?,
            None => BTreeMap::new(),
        };
        let after = entries_of(pool, &serde_json::to_value(&now).unwrap_or_default())?;
        if after.iter().any(|(ip, e)| before.get(ip) != Some(e)) {
            return Err(StoreError::claimed_since(pool, since));
        }
        Ok(Some(rv))
    }
}

/// A short random wait before a pool's status write is laid again after its `attempt`-th 409
/// (0 to 2^attempt ms, at most 32): agents that lost to the same writer do not all read and
/// write the whole status again at the same instant.
fn relay_jitter(attempt: u32) -> std::time::Duration {
    use std::hash::BuildHasher;
    let cap = 1u64 << attempt.min(5);
    // Every RandomState is seeded afresh: a cheap source of distinct random numbers.
    let r = std::collections::hash_map::RandomState::new().hash_one(attempt);
    std::time::Duration::from_millis(r % (cap + 1))
}
