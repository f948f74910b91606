//! Checking the address space for inconsistencies between pools, endpoints and pods, and
//! repairing what a report lists — each item checked again right before its repair, so a
//! report never frees what changed since it was written.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use spiderpool_api::Object;

use crate::apply;
use spiderpool_store::{typed, Expect, Kind, Op, Store, StoreError};

/// One inconsistency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "problem", rename_all = "camelCase")]
pub enum Problem {
    /// One address held in more than one pool.
    #[serde(rename_all = "camelCase")]
    HeldTwice {
        /// The address.
        ip: IpAddr,
        /// `pool: pod (container, interface)` of each holder.
        holders: Vec<String>,
    },
    /// An address held without an endpoint recording it for its holder.
    #[serde(rename_all = "camelCase")]
    Unrecorded {
        /// The pool.
        pool: String,
        /// The address.
        ip: IpAddr,
        /// `namespace/name` of the holder.
        pod: String,
        /// Its UID.
        pod_uid: String,
        /// Its container.
        #[serde(rename = "containerID")]
        container_id: String,
        /// Its interface.
        interface: String,
    },
    /// An endpoint records an address its pool does not hold for it.
    #[serde(rename_all = "camelCase")]
    NotHeld {
        /// `namespace/name` of the endpoint.
        endpoint: String,
        /// The pool.
        pool: String,
        /// The address.
        ip: IpAddr,
        /// The NIC.
        interface: String,
    },
    /// An endpoint whose pod is gone (or is another incarnation now).
    #[serde(rename_all = "camelCase")]
    DanglingEndpoint {
        /// `namespace/name`.
        endpoint: String,
        /// The pod UID it records.
        uid: String,
        /// What became of the pod.
        why: String,
    },
    /// A pool's `status.allocatedIPCount` disagrees with its holders.
    #[serde(rename_all = "camelCase")]
    CountMismatch {
        /// The pool.
        pool: String,
        /// What the status says.
        recorded: u64,
        /// How many addresses it holds.
        actual: u64,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::HeldTwice { ip, holders } => {
                write!(f, "{ip} is held twice: {}", holders.join("; "))
            }
            Problem::Unrecorded {
                pool,
                ip,
                pod,
                container_id,
                interface,
                ..
            } => write!(
                f,
                "{ip} of spiderippool/{pool} is held by pod {pod} (container {container_id}, interface {interface}) without an endpoint recording it"
            ),
            Problem::NotHeld {
                endpoint,
                pool,
                ip,
                interface,
            } => write!(
                f,
                "spiderendpoint/{endpoint} records {ip} of spiderippool/{pool} on {interface}, which the pool does not hold for it"
            ),
            Problem::DanglingEndpoint { endpoint, uid, why } => {
                write!(f, "spiderendpoint/{endpoint} (pod UID {uid}): {why}")
            }
            Problem::CountMismatch {
                pool,
                recorded,
                actual,
            } => write!(
                f,
                "spiderippool/{pool} says {recorded} allocated, but holds {actual}"
            ),
        }
    }
}

/// Every inconsistency in `store`.
pub async fn check(store: &dyn Store) -> Result<Vec<Problem>, StoreError> {
    let mut problems = Vec::new();
    let mut by_ip: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    let mut holders = Vec::new();
    for (o, _) in typed::list(store, Kind::IPPool).await? {
        let Object::IPPool(p) = o else { continue };
        let name = p.metadata.name.clone();
        let allocs = store.allocations(&name).await?;
        // Where the status is what the agents write (Kubernetes); elsewhere it is computed.
        let written = p
            .status
            .as_ref()
            .and_then(|s| s.allocated_ip_count)
            .filter(|_| store.mode().is_cluster());
        if let Some(recorded) = written {
            // Counted as the status counts: the pool's own addresses only.
            let held: Vec<IpAddr> = allocs.iter().map(|a| a.ip).collect();
            let actual = p
                .to_pool()
                .map_or(held.len() as u64, |pool| pool.allocated_ip_count(&held));
            if recorded != actual {
                problems.push(Problem::CountMismatch {
                    pool: name.clone(),
                    recorded,
                    actual,
                });
            }
        }
        for a in allocs {
            by_ip.entry(a.ip).or_default().push(format!(
                "{name}: {} ({}, {})",
                a.holder.pod, a.holder.container_id, a.holder.nic
            ));
            holders.push(a);
        }
    }
    for (ip, h) in by_ip.into_iter().filter(|(_, h)| h.len() > 1) {
        problems.push(Problem::HeldTwice { ip, holders: h });
    }
    let mut endpoints = BTreeMap::new();
    for (o, _) in typed::list(store, Kind::Endpoint).await? {
        if let Object::Endpoint(ep) = o {
            let key = format!(
                "{}/{}",
                ep.metadata.namespace.as_deref().unwrap_or("default"),
                ep.metadata.name
            );
            endpoints.insert(key, ep);
        }
    }
    for a in &holders {
        let h = &a.holder;
        let recorded = endpoints
            .get(&h.pod)
            .is_some_and(|ep| apply::records(ep, &a.pool, a.ip, h));
        if !recorded {
            problems.push(Problem::Unrecorded {
                pool: a.pool.clone(),
                ip: a.ip,
                pod: h.pod.clone(),
                pod_uid: h.pod_uid.clone(),
                container_id: h.container_id.clone(),
                interface: h.nic.clone(),
            });
        }
    }
    let cluster = store.mode().is_cluster();
    for (key, ep) in &endpoints {
        for nic in &ep.status.current.ips {
            for (pool, ip) in nic.held() {
                let held = holders.iter().any(|a| {
                    a.pool == pool
                        && a.ip == ip
                        && a.holder.released_by(
                            &nic.container_id,
                            &nic.interface,
                            &ep.status.current.uid,
                        )
                });
                if !held {
                    problems.push(Problem::NotHeld {
                        endpoint: key.clone(),
                        pool,
                        ip,
                        interface: nic.interface.clone(),
                    });
                }
            }
        }
        if let Some(why) = dangling(store, key, &ep.status.current.uid, cluster).await? {
            problems.push(Problem::DanglingEndpoint {
                endpoint: key.clone(),
                uid: ep.status.current.uid.clone(),
                why,
            });
        }
    }
    Ok(problems)
}

/// Why the endpoint `key` recording pod UID `uid` no longer has its pod, if it does not: the
/// Pod object now has another UID, or (in a cluster, where every pod has one) there is none.
/// A StatefulSet member's record outliving its pod is the StatefulSet rule, not a problem, and
/// outside a cluster a pod without a Pod object is a bare pod.
async fn dangling(
    store: &dyn Store,
    key: &str,
    uid: &str,
    cluster: bool,
) -> Result<Option<String>, StoreError> {
    if uid.is_empty() {
        return Ok(None);
    }
    match typed::get(store, Kind::Pod, key).await? {
        Some((o, _)) => {
            let now = o.metadata().uid.clone().unwrap_or_default();
            Ok((!now.is_empty() && now != uid)
                .then(|| format!("pod {key} is another incarnation now (UID {now})")))
        }
        None if cluster && !crate::reclaim::vmi_exists(store, key).await? => {
            Ok(Some(format!("pod {key} is gone")))
        }
        None => Ok(None),
    }
}

/// What became of one item of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// Repaired.
    Done(String),
    /// Left as it is: it changed since the report, or a release cannot repair it.
    Skipped(String),
}

/// Repairs `p` if it still stands exactly as reported: releases an unrecorded address (owned
/// by its reported holder, so one that has gone to someone else is not freed), deletes a
/// dangling endpoint (at the revision it was checked at) with the addresses it records.
pub async fn repair(store: &dyn Store, p: &Problem) -> Result<Repair, StoreError> {
    match p {
        Problem::Unrecorded {
            pool,
            ip,
            pod,
            pod_uid,
            container_id,
            interface,
        } => {
            // Still held by the reported holder and still recorded nowhere, or left alone.
            let same = |h: &spiderpool_store::Holder| {
                (&h.pod, &h.pod_uid, &h.container_id, &h.nic)
                    == (pod, pod_uid, container_id, interface)
            };
            match apply::release_unrecorded_by(store, pool, *ip, same).await {
                Ok(_) => Ok(Repair::Done(format!(
                    "released {ip} of spiderippool/{pool}"
                ))),
                Err(apply::ApplyError::Store(e)) => Err(e),
                Err(_) => Ok(Repair::Skipped(format!(
                    "{ip} of spiderippool/{pool}: changed since the report"
                ))),
            }
        }
        Problem::DanglingEndpoint { endpoint, uid, .. } => {
            let Some((Object::Endpoint(ep), rev)) =
                typed::get(store, Kind::Endpoint, endpoint).await?
            else {
                return Ok(Repair::Skipped(format!(
                    "spiderendpoint/{endpoint}: gone since the report"
                )));
            };
            let cluster = store.mode().is_cluster();
            if &ep.status.current.uid != uid
                || dangling(store, endpoint, uid, cluster).await?.is_none()
            {
                return Ok(Repair::Skipped(format!(
                    "spiderendpoint/{endpoint}: changed since the report"
                )));
            }
            let mut ops: Vec<Op> = ep
                .status
                .current
                .ips
                .iter()
                .flat_map(|n| Op::releases_of(n, &ep.status.current.uid))
                .collect();
            ops.push(Op::Delete {
                kind: Kind::Endpoint,
                key: endpoint.clone(),
                expect: Expect::Revision(rev),
            });
            store.commit(ops).await?;
            Ok(Repair::Done(format!(
                "deleted spiderendpoint/{endpoint} and released what it recorded"
            )))
        }
        other => Ok(Repair::Skipped(format!(
            "{other}: not repaired by a release (resolve it by hand)"
        ))),
    }
}
