//! One commit, run to its end: the `NoClaimsSince` checks first, then each pool's holders in
//! one write, then the objects (one key's ops in order, different keys side by side); a failed
//! object write takes the commit's claims back.

use std::collections::{BTreeMap, HashMap};

use futures_util::StreamExt;
use spiderpool_store::{Expect, Kind, Op, Result, Revision, StoreError};

use super::*;

impl Inner {
    /// One commit, run to its end (see the module comment for what stands in for atomicity).
    pub(super) async fn apply(&self, ops: Vec<Op>) -> Result<Revision> {
        let mut pools: BTreeMap<String, Vec<Op>> = BTreeMap::new();
        let mut quiet: Vec<(String, Revision)> = Vec::new();
        let mut objects: Vec<Op> = Vec::new();
        let mut claimed = std::collections::HashSet::new();
        for op in ops {
            match &op {
                Op::Claim { pool, ip, .. } => {
                    if !claimed.insert((pool.clone(), *ip)) {
                        return Err(StoreError::taken_conflict(pool, *ip));
                    }
                    pools.entry(pool.clone()).or_default().push(op);
                }
                Op::Release { pool, .. } => pools.entry(pool.clone()).or_default().push(op),
                Op::NoClaimsSince { pool, since } => quiet.push((pool.clone(), *since)),
                Op::Put { .. } | Op::Delete { .. } => objects.push(op),
            }
        }
        let mut last: Revision = 0;
        // Checks first: they write nothing.
        let mut guarded: HashMap<String, Revision> = HashMap::new();
        for (pool, since) in &quiet {
            if let Some(rv) = self.no_claims_since(pool, *since).await? {
                guarded.insert(pool.clone(), rv);
            }
        }
        // The pools, each in one write; on a failure, what was claimed already goes back.
        let mut written: Vec<&str> = Vec::new();
        for (pool, pool_ops) in &pools {
            match self.update_pool(pool, pool_ops).await {
                Ok(rv) => {
                    last = last.max(rv.unwrap_or(0));
                    written.push(pool);
                }
                Err(e) => {
                    self.undo_claims(&pools, &written).await;
                    return Err(e);
                }
            }
        }
        // Then the objects: one key's ops in order, different keys side by side.
        let mut by_key: Vec<((Kind, String), Vec<Op>)> = Vec::new();
        for op in objects {
            let k = match &op {
                Op::Put { kind, key, .. } | Op::Delete { kind, key, .. } => (*kind, key.clone()),
                _ => unreachable!("only object ops"),
            };
            match by_key.iter_mut().find(|(kk, _)| *kk == k) {
                Some((_, v)) => v.push(op),
                None => by_key.push((k, vec![op])),
            }
        }
        let results: Vec<Result<Revision>> = futures_util::stream::iter(by_key)
            .map(|(_, ops)| {
                let guarded = &guarded;
                async move {
                    let mut last = 0;
                    for op in ops {
                        match op {
                            Op::Put {
                                kind,
                                key,
                                value,
                                expect,
                            } => {
                                // A pool changed under NoClaimsSince is guarded by the revision
                                // that check saw.
                                let expect = match (kind, expect, guarded.get(&key)) {
                                    (Kind::IPPool, Expect::Any, Some(rv)) => Expect::Revision(*rv),
                                    (_, e, _) => e,
                                };
                                last = self.put(kind, &key, value, expect).await?;
                            }
                            Op::Delete { kind, key, expect } => {
                                self.delete(kind, &key, expect).await?
                            }
                            _ => {}
                        }
                    }
                    Ok(last)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut failed = None;
        for r in results {
            match r {
                Ok(rv) => last = last.max(rv),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            self.undo_claims(&pools, &written).await;
            return Err(e);
        }
        Ok(last)
    }

    /// Takes back the claims of `pools` already written (`written`), each by its own holder.
    pub(super) async fn undo_claims(&self, pools: &BTreeMap<String, Vec<Op>>, written: &[&str]) {
        for pool in written {
            let releases: Vec<Op> = pools[*pool]
                .iter()
                .filter_map(|op| match op {
                    Op::Claim {
                        pool, ip, holder, ..
                    } => Some(Op::Release {
                        pool: pool.clone(),
                        ip: *ip,
                        container_id: holder.container_id.clone(),
                        nic: holder.nic.clone(),
                        pod_uid: holder.pod_uid.clone(),
                    }),
                    _ => None,
                })
                .collect();
            if releases.is_empty() {
                continue;
            }
            if let Err(e) = self.update_pool(pool, &releases).await {
                tracing::error!(%pool, error = %e, "could not take back the claims of a failed commit; `spiderpoolctl ipam release` frees them");
            }
        }
    }
}
