//! A SpiderIPPool's rules: its addresses inside its subnet, no overlap with another pool of
//! the subnet's CIDR, what a terminating pool may not change, and an auto pool's addresses
//! changed only by the reconciler.

use spiderpool_api::keys::LABEL_OWNER_SUBNET;
use spiderpool_api::{Object, SpiderIPPool};
use spiderpool_core::{IpSet, Pool};

use spiderpool_store::{typed, Kind, Store};

use super::*;

pub(super) fn pools_of(objs: &[(Object, u64)]) -> Vec<Pool> {
    objs.iter()
        .filter_map(|(o, _)| match o {
            Object::IPPool(p) => p.to_pool().ok(),
            _ => None,
        })
        .collect()
}

pub(super) fn ranges(set: &IpSet) -> String {
    format!("[{}]", set.to_strings().join(" "))
}

pub(super) async fn validate_pool(
    store: &dyn Store,
    new: &SpiderIPPool,
    old: Option<&SpiderIPPool>,
    families: &Families,
    by: By,
) -> Result<(), AdmissionError> {
    const KIND: &str = "SpiderIPPool";
    let name = &new.metadata.name;
    let old_meta = old.map(|o| &o.metadata);
    if terminating_update(
        KIND,
        name,
        old_meta,
        &new.metadata,
        "cannot update a terminating IPPool",
    )? {
        return Ok(());
    }
    let pool = new.to_pool()?;
    families.check(KIND, name, pool.family)?;
    if new
        .spec
        .pod_affinity
        .as_ref()
        .is_some_and(|s| s.match_labels.is_empty() && s.match_expressions.is_empty())
    {
        return Err(invalid(
            KIND,
            name,
            "spec.podAffinity",
            "{}",
            "empty podAffinity is invalid for SpiderIPPool",
        ));
    }
    if let Some(old) = old.and_then(|o| o.to_pool().ok()) {
        if old.subnet != pool.subnet {
            return Err(invalid(
                KIND,
                name,
                "spec.subnet",
                &pool.subnet.to_string(),
                &format!("is not changeable (was {})", old.subnet),
            ));
        }
        if old.family != pool.family {
            return Err(invalid(
                KIND,
                name,
                "spec.ipVersion",
                &pool.family.number().to_string(),
                "is not changeable",
            ));
        }
    }
    validate_auto_pool(new, old, &pool, by)?;
    let usable = pool.usable();
    let others = typed::list(store, Kind::IPPool).await?;
    for other in pools_of(&others).iter().filter(|o| &o.name != name) {
        if other.family != pool.family {
            continue;
        }
        if other.subnet != pool.subnet {
            if overlap(&other.subnet, &pool.subnet) && old.is_none() {
                return Err(invalid(
                    KIND,
                    name,
                    "spec.subnet",
                    &pool.subnet.to_string(),
                    &format!(
                        "overlap with IPPool {} which 'spec.subnet' is {}",
                        other.name, other.subnet
                    ),
                ));
            }
            continue;
        }
        let shared = usable.intersection(&other.usable());
        if !shared.is_empty() {
            return Err(invalid(
                KIND,
                name,
                "spec.ips",
                &ranges(&shared),
                &format!(
                    "overlap with IPPool {} in IP ranges {}, total IP addresses of an IPPool are jointly determined by 'spec.ips' and 'spec.excludeIPs'",
                    other.name,
                    ranges(&shared)
                ),
            ));
        }
    }
    // A pool a SpiderSubnet owns stays inside the subnet's addresses.
    if let Some(owner) = new.metadata.labels.get(LABEL_OWNER_SUBNET) {
        if let Some((Object::Subnet(s), _)) = typed::get(store, Kind::Subnet, owner).await? {
            if let Ok(sp) = s.to_pool() {
                let outside = pool.ips.difference(&sp.usable());
                if sp.subnet == pool.subnet && !outside.is_empty() {
                    return Err(invalid(
                        KIND,
                        name,
                        "spec.ips",
                        &ranges(&outside),
                        &format!(
                            "add some IP ranges {} that are not contained in controller Subnet {owner}, total IP addresses of an Subnet are jointly determined by 'spec.ips' and 'spec.excludeIPs'",
                            ranges(&outside)
                        ),
                    ));
                }
            }
        }
    }
    let mut allocs = store.allocations(name).await?;
    allocs.sort_by_key(|a| a.ip);
    if let Some(a) = allocs.iter().find(|a| !usable.contains(&a.ip)) {
        return Err(invalid(
            KIND,
            name,
            "spec.ips",
            &a.ip.to_string(),
            &format!(
                "remove an IP address {} that is being used by Pod {} (interface {}), total IP addresses of an IPPool are jointly determined by 'spec.ips' and 'spec.excludeIPs' ({} in use)",
                a.ip,
                a.holder.pod,
                a.holder.nic,
                allocs.len()
            ),
        ));
    }
    Ok(())
}

/// An auto-created pool keeps the pod affinity that binds it to its application, and only the
/// reconciler changes its addresses (they follow the application's replicas).
pub(super) fn validate_auto_pool(
    new: &SpiderIPPool,
    old: Option<&SpiderIPPool>,
    pool: &Pool,
    by: By,
) -> Result<(), AdmissionError> {
    use spiderpool_api::autopool;
    use spiderpool_api::keys::APP_PREFIX;
    const KIND: &str = "SpiderIPPool";
    let name = &new.metadata.name;
    if !autopool::is_auto(&new.metadata.labels) {
        return Ok(());
    }
    let affinity = new.spec.pod_affinity.as_ref();
    let keys: Vec<&String> = affinity
        .map(|a| a.match_labels.keys().collect())
        .unwrap_or_default();
    let expected = [
        spiderpool_api::keys::APP_API_GROUP,
        spiderpool_api::keys::APP_API_VERSION,
        spiderpool_api::keys::APP_KIND,
        spiderpool_api::keys::APP_NAMESPACE,
        spiderpool_api::keys::APP_NAME,
    ];
    let exact = affinity.is_some_and(|a| a.match_expressions.is_empty())
        && keys.len() == expected.len()
        && keys
            .iter()
            .all(|k| k.starts_with(APP_PREFIX) && expected.contains(&k.as_str()));
    if !exact {
        return Err(invalid(
            KIND,
            name,
            "spec.podAffinity",
            &serde_json::to_string(&affinity).unwrap_or_default(),
            "it's invalid to add additional podAffinity matchLabels/matchExpressions for auto-created SpiderIPPool",
        ));
    }
    if matches!(by, By::Reconciler { .. }) {
        return Ok(());
    }
    if let Some(old_pool) = old.and_then(|o| o.to_pool().ok()) {
        if old_pool.ips != pool.ips {
            return Err(invalid(
                KIND,
                name,
                "spec.ips",
                &ranges(&pool.ips),
                &format!(
                    "it's illegal to update AutoPool.Spec.IPs that are different from corresponding SpiderSubnet.Status.ControlledIPPools (they are {}): an auto-created pool's addresses follow its application's replicas and annotation {}",
                    ranges(&old_pool.ips),
                    spiderpool_api::keys::IPPOOL_IP_NUMBER
                ),
            ));
        }
    }
    Ok(())
}
