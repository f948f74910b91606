//! The addresses an ADD claims: the plan of its candidate pools, and in each the first free
//! address that no other pod's endpoint records.

use std::net::IpAddr;

use spiderpool_api::crd::EndpointInterface;
use spiderpool_core::candidate::{AllocError, Rejected, Rejection};
use spiderpool_core::pick::{free_at, Spread};
use spiderpool_core::{IpFamily, Pool, Request};
use spiderpool_store::{typed, Kind, Revision, StoreError};

use super::*;
use crate::view::{RecordBook, View};

/// One address chosen for one family.
pub(super) struct Pick {
    pub(super) family: IpFamily,
    pub(super) pool: Pool,
    pub(super) pool_revision: Revision,
    pub(super) ip: IpAddr,
}

/// The addresses chosen for one NIC.
pub(super) struct Picks {
    pub(super) picks: Vec<Pick>,
    pub(super) clean_gateway: bool,
}

impl IpamService {
    /// The plan for the request and, per family, the address to claim: the previous
    /// sandbox's address when its pool is still a candidate, else the first candidate's lowest
    /// free address (see [`IpamService::free_in`]). `pod` is the claimant's key and
    /// `previous` its NIC's record from an earlier sandbox.
    pub(super) async fn plan_claims(
        &self,
        req: &Request,
        pools: &[Pool],
        view: &mut View,
        (pod, previous): (&str, Option<&EndpointInterface>),
        spread: Option<Spread>,
        records: Option<&RecordBook>,
    ) -> Result<Picks> {
        let plan = req.plan(pools)?;
        let kept: Vec<(String, IpAddr)> = previous.map(EndpointInterface::held).unwrap_or_default();
        let mut picks = Vec::new();
        for fp in &plan.families {
            let reuse = kept.iter().find(|(pool, ip)| {
                IpFamily::of(ip) == fp.family && fp.pools.iter().any(|p| &p.name == pool)
            });
            if let Some((pool_name, ip)) = reuse {
                let pool = fp
                    .pools
                    .iter()
                    .find(|p| &p.name == pool_name)
                    .expect("found above");
                picks.push(Pick {
                    family: fp.family,
                    pool_revision: view.pool_revs[&pool.name],
                    pool: (*pool).clone(),
                    ip: *ip,
                });
                continue;
            }
            let mut rejected = Vec::new();
            let mut unreadable = None;
            let mut found = None;
            for pool in &fp.pools {
                // A pool whose holders cannot be read fails alone: the group goes on to the
                // next pool.
                match view.load_held(self.store.as_ref(), &pool.name).await {
                    Ok(()) => {}
                    Err(e @ StoreError::Corrupt { .. }) => {
                        tracing::warn!(pool = %pool.name, %pod, error = %e,
                            "skipping a pool whose holders cannot be read; trying the next of the group");
                        rejected.push(Rejected {
                            pool: pool.name.clone(),
                            reason: Rejection::Unreadable(e.to_string()),
                        });
                        unreadable.get_or_insert(e);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
                if let Some(ip) = self.free_in(pool, view, spread, pod, records).await? {
                    found = Some(((*pool).clone(), ip));
                    break;
                }
                let in_use = view.held(&pool.name);
                rejected.push(Rejected {
                    pool: pool.name.clone(),
                    reason: Rejection::Exhausted {
                        used: u64::try_from(
                            pool.usable()
                                .intersection(&in_use.union(&view.reserved))
                                .len(),
                        )
                        .unwrap_or(u64::MAX),
                        total: pool.total_ip_count(),
                    },
                });
            }
            let Some((pool, ip)) = found else {
                // Nothing but unreadable pools: the datastore's error, as before.
                if let Some(e) = unreadable.filter(|_| {
                    rejected
                        .iter()
                        .all(|r| matches!(r.reason, Rejection::Unreadable(_)))
                }) {
                    return Err(e.into());
                }
                return Err(AllocError::Exhausted {
                    family: fp.family,
                    pod: pod.to_string(),
                    rejected,
                }
                .into());
            };
            picks.push(Pick {
                family: fp.family,
                pool_revision: view.pool_revs[&pool.name],
                pool,
                ip,
            });
        }
        Ok(Picks {
            picks,
            clean_gateway: plan.clean_gateway,
        })
    }

    /// The address of `pool` to hand out: the first free one (by the view's holders) that no
    /// endpoint other than `pod`'s records. An address a record names though the pool's
    /// holders lost it is read again from that record (the book may lag behind a release) and,
    /// while the record still names it, counted as held in the view and passed over.
    async fn free_in(
        &self,
        pool: &Pool,
        view: &mut View,
        spread: Option<Spread>,
        pod: &str,
        records: Option<&RecordBook>,
    ) -> Result<Option<IpAddr>> {
        loop {
            let Some(ip) = free_at(pool, &view.reserved, view.held(&pool.name), spread) else {
                return Ok(None);
            };
            let Some(book) = records else {
                return Ok(Some(ip));
            };
            let Some(other) = book.recorded_by(&pool.name, ip, pod) else {
                return Ok(Some(ip));
            };
            let now: Vec<(String, IpAddr)> =
                typed::get(self.store.as_ref(), Kind::Endpoint, &other)
                    .await?
                    .and_then(|(o, _)| endpoint_of(o))
                    .map(|e| e.held())
                    .unwrap_or_default();
            let still = now.iter().any(|(p, i)| p == &pool.name && *i == ip);
            book.correct(&other, now);
            if !still {
                continue;
            }
            tracing::warn!(
                pool = %pool.name, %ip, endpoint = %other, %pod,
                "not handing out an address the pool's holders lost: the endpoint still records it (reclaim or `spiderpoolctl ipam check` mends the pool)"
            );
            if !view.has_held(&pool.name) {
                // Without the pool's holders in the view it cannot be marked; refuse it.
                return Ok(None);
            }
            view.mark_held(&pool.name, ip);
        }
    }
}
