//! Applying and deleting objects with the admission rules upstream's webhook enforces, and the
//! status the system computes for pools and subnets. Used by the CLI and, in later modes, by
//! the agent and controller, so every entry point guards the datastore the same way.

use std::collections::BTreeMap;

use spiderpool_api::crd::{allocated_ips_string, IPPoolStatus, PoolIPAllocation, SubnetStatus};
use spiderpool_api::{Object, SpiderIPPool, SpiderSubnet, ValidationError};
use spiderpool_core::{IpSet, Pool};

use crate::{typed, Expect, Kind, Op, Store, StoreError};

/// Why an apply or delete was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The object breaks a rule; the message names field and value.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Delete of something that does not exist.
    #[error("{kind} {key:?} not found")]
    NotFound {
        /// Kind.
        kind: Kind,
        /// Key.
        key: String,
    },
}

/// What an apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The object was new.
    Created,
    /// The object replaced an earlier version.
    Configured,
    /// The object was identical to the stored one.
    Unchanged,
}

fn invalid(msg: String) -> ApplyError {
    ApplyError::Invalid(ValidationError::Invalid(msg))
}

fn pools_of(objs: &[(Object, u64)]) -> Vec<Pool> {
    objs.iter()
        .filter_map(|(o, _)| match o {
            Object::IPPool(p) => p.to_pool().ok(),
            _ => None,
        })
        .collect()
}

async fn validate_pool(
    store: &dyn Store,
    new: &SpiderIPPool,
    old: Option<&SpiderIPPool>,
) -> Result<(), ApplyError> {
    let pool = new.to_pool()?;
    let name = &pool.name;
    if let Some(old) = old.and_then(|o| o.to_pool().ok()) {
        if old.subnet != pool.subnet {
            return Err(invalid(format!(
                "SpiderIPPool {name:?}: spec.subnet is not changeable ({} to {})",
                old.subnet, pool.subnet
            )));
        }
        if old.family != pool.family {
            return Err(invalid(format!(
                "SpiderIPPool {name:?}: spec.ipVersion is not changeable"
            )));
        }
    }
    let others = typed::list(store, Kind::IPPool).await?;
    for other in pools_of(&others).iter().filter(|o| &o.name != name) {
        if other.family != pool.family {
            continue;
        }
        if other.subnet != pool.subnet {
            if other.subnet.contains(&pool.subnet.network())
                || pool.subnet.contains(&other.subnet.network())
            {
                return Err(invalid(format!(
                    "SpiderIPPool {name:?}: spec.subnet {} overlaps spec.subnet {} of SpiderIPPool {:?}",
                    pool.subnet, other.subnet, other.name
                )));
            }
            continue;
        }
        if let Some(r) = pool.ips.intersection(&other.ips).ranges().next() {
            return Err(invalid(format!(
                "SpiderIPPool {name:?}: spec.ips {r} overlap with SpiderIPPool {:?}",
                other.name
            )));
        }
    }
    let usable = pool.usable();
    let mut allocs = store.allocations(name).await?;
    allocs.sort_by_key(|a| a.ip);
    if let Some(a) = allocs.iter().find(|a| !usable.contains(&a.ip)) {
        return Err(invalid(format!(
            "SpiderIPPool {name:?}: cannot remove or exclude {} because pod {} (interface {}) uses it; \
             {} of the pool's addresses are in use",
            a.ip,
            a.holder.pod,
            a.holder.nic,
            allocs.len()
        )));
    }
    Ok(())
}

async fn validate_subnet(
    store: &dyn Store,
    new: &SpiderSubnet,
    old: Option<&SpiderSubnet>,
) -> Result<(), ApplyError> {
    let s = new.to_pool()?;
    let name = &s.name;
    if let Some(old) = old.and_then(|o| o.to_pool().ok()) {
        if old.subnet != s.subnet {
            return Err(invalid(format!(
                "SpiderSubnet {name:?}: spec.subnet is not changeable ({} to {})",
                old.subnet, s.subnet
            )));
        }
    }
    for (o, _) in typed::list(store, Kind::Subnet).await? {
        let Object::Subnet(other) = o else { continue };
        let Ok(other) = other.to_pool() else { continue };
        if &other.name == name || other.family != s.family {
            continue;
        }
        if other.subnet.contains(&s.subnet.network()) || s.subnet.contains(&other.subnet.network())
        {
            return Err(invalid(format!(
                "SpiderSubnet {name:?}: spec.subnet {} overlaps spec.subnet {} of SpiderSubnet {:?}",
                s.subnet, other.subnet, other.name
            )));
        }
    }
    Ok(())
}

/// A pool of a SpiderSubnet's CIDR takes the subnet's gateway and routes when it sets none.
async fn inherit_from_subnet(store: &dyn Store, pool: &mut SpiderIPPool) -> Result<(), ApplyError> {
    let Ok(net) = pool.spec.subnet.parse::<ipnet::IpNet>() else {
        return Ok(()); // validation names the bad subnet
    };
    for (o, _) in typed::list(store, Kind::Subnet).await? {
        let Object::Subnet(sub) = o else { continue };
        if sub.spec.subnet.parse::<ipnet::IpNet>().ok() != Some(net) {
            continue;
        }
        if pool.spec.gateway.is_none() {
            pool.spec.gateway = sub.spec.gateway.clone();
        }
        if pool.spec.routes.is_empty() {
            pool.spec.routes = sub.spec.routes.clone();
        }
        break;
    }
    Ok(())
}

/// Creates or replaces `object` after checking the admission rules. The stored status,
/// creation time and UID are kept; a new object gets them.
pub async fn apply(store: &dyn Store, mut object: Object) -> Result<Applied, ApplyError> {
    let kind = object.kind();
    if kind == Kind::Endpoint {
        return Err(invalid(format!(
            "{}: SpiderEndpoints are written by the agent only",
            object.describe()
        )));
    }
    if let Object::IPPool(p) = &mut object {
        inherit_from_subnet(store, p).await?;
    }
    let key = object.key();
    for attempt in 1.. {
        // A pool is checked against its holders; the commit fails if an address was claimed
        // after they were read (see `Op::NoClaimsSince`), and the check runs again.
        let since = store.revision().await?;
        let current = typed::get(store, kind, &key).await?;
        match (&object, current.as_ref().map(|(o, _)| o)) {
            (Object::IPPool(new), old) => {
                let old = match old {
                    Some(Object::IPPool(p)) => Some(p),
                    _ => None,
                };
                validate_pool(store, new, old).await?;
            }
            (Object::Subnet(new), old) => {
                let old = match old {
                    Some(Object::Subnet(s)) => Some(s),
                    _ => None,
                };
                validate_subnet(store, new, old).await?;
            }
            (Object::ReservedIP(r), _) => {
                r.to_set()?;
            }
            _ => {}
        }
        let (expect, outcome) = match &current {
            None => (Expect::Absent, Applied::Created),
            Some((_, rev)) => (Expect::Revision(*rev), Applied::Configured),
        };
        {
            let m = object.metadata_mut();
            let old = current.as_ref().map(|(o, _)| o.metadata());
            m.resource_version = None;
            m.creation_timestamp = old
                .and_then(|o| o.creation_timestamp.clone())
                .or_else(|| m.creation_timestamp.clone())
                .or_else(|| {
                    Some(
                        humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
                    )
                });
            m.uid = m
                .uid
                .clone()
                .or_else(|| old.and_then(|o| o.uid.clone()))
                .or_else(|| Some(uuid::Uuid::new_v4().to_string()));
            if kind.namespaced() && m.namespace.is_none() {
                m.namespace = Some("default".into());
            }
        }
        let value = typed::to_stored_value(&object);
        if let Some((old, _)) = &current {
            if typed::to_stored_value(old) == value {
                return Ok(Applied::Unchanged);
            }
        }
        let mut ops = vec![Op::Put {
            kind,
            key: key.clone(),
            value,
            expect,
        }];
        if let (Kind::IPPool, Some(since)) = (kind, since) {
            ops.push(Op::NoClaimsSince {
                pool: key.clone(),
                since,
            });
        }
        match store.commit(ops).await {
            Ok(_) => return Ok(outcome),
            Err(StoreError::Conflict(_)) if attempt < 5 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns")
}

/// Deletes an object. A pool whose addresses are in use is kept, and the error names the pods.
pub async fn delete(store: &dyn Store, kind: Kind, key: &str) -> Result<(), ApplyError> {
    let since = store.revision().await?;
    let Some((_, rev)) = typed::get(store, kind, key).await? else {
        return Err(ApplyError::NotFound {
            kind,
            key: key.to_string(),
        });
    };
    if kind == Kind::IPPool {
        let allocs = store.allocations(key).await?;
        if !allocs.is_empty() {
            let mut pods: Vec<&str> = allocs.iter().map(|a| a.holder.pod.as_str()).collect();
            pods.sort();
            pods.dedup();
            return Err(invalid(format!(
                "cannot delete SpiderIPPool {key:?} with {} allocated IPs (held by {})",
                allocs.len(),
                pods.join(", ")
            )));
        }
    }
    let mut ops = vec![Op::Delete {
        kind,
        key: key.to_string(),
        expect: Expect::Revision(rev),
    }];
    if let (Kind::IPPool, Some(since)) = (kind, since) {
        // A claim that came in after the holders were read keeps the pool.
        ops.push(Op::NoClaimsSince {
            pool: key.to_string(),
            since,
        });
    }
    store.commit(ops).await?;
    Ok(())
}

/// The status of a pool as the system reports it.
pub async fn pool_status(
    store: &dyn Store,
    pool: &SpiderIPPool,
) -> Result<IPPoolStatus, StoreError> {
    let allocs = store.allocations(&pool.metadata.name).await?;
    let map: BTreeMap<String, PoolIPAllocation> = allocs
        .iter()
        .map(|a| {
            (
                a.ip.to_string(),
                PoolIPAllocation {
                    pod: a.holder.pod.clone(),
                    pod_uid: a.holder.pod_uid.clone(),
                    interface: a.holder.nic.clone(),
                },
            )
        })
        .collect();
    Ok(IPPoolStatus {
        allocated_ips: (!map.is_empty()).then(|| allocated_ips_string(&map)),
        total_ip_count: pool.to_pool().ok().map(|p| p.total_ip_count()),
        allocated_ip_count: Some(allocs.len() as u64),
    })
}

/// The status of a subnet: its usable addresses, and those given to pools of the same subnet.
pub fn subnet_status(subnet: &SpiderSubnet, pools: &[SpiderIPPool]) -> SubnetStatus {
    let Ok(s) = subnet.to_pool() else {
        return SubnetStatus::default();
    };
    let usable = s.usable();
    let mut controlled = BTreeMap::new();
    let mut given = IpSet::new();
    for p in pools.iter().filter_map(|p| p.to_pool().ok()) {
        if p.subnet != s.subnet {
            continue;
        }
        let mine = p.ips.intersection(&usable);
        if !mine.is_empty() {
            given = given.union(&mine);
            controlled.insert(
                p.name.clone(),
                serde_json::json!({"ips": mine.to_strings()}),
            );
        }
    }
    SubnetStatus {
        controlled_ip_pools: (!controlled.is_empty())
            .then(|| serde_json::to_string(&controlled).expect("map serialises")),
        total_ip_count: Some(s.total_ip_count()),
        allocated_ip_count: Some(u64::try_from(given.len()).unwrap_or(u64::MAX)),
    }
}
