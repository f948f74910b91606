//! The status the system reports for pools and subnets: a pool's holders and counts, a
//! subnet's addresses given to pools (with the application of each auto pool).

use std::collections::BTreeMap;

use spiderpool_api::crd::{allocated_ips_string, IPPoolStatus, PoolIPAllocation, SubnetStatus};
use spiderpool_api::{SpiderIPPool, SpiderSubnet};
use spiderpool_core::IpSet;
use spiderpool_store::{Store, StoreError};

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
    let parsed = pool.to_pool().ok();
    let held: Vec<std::net::IpAddr> = allocs.iter().map(|a| a.ip).collect();
    Ok(IPPoolStatus {
        allocated_ips: (!map.is_empty()).then(|| allocated_ips_string(&map)),
        total_ip_count: parsed.as_ref().map(|p| p.total_ip_count()),
        allocated_ip_count: Some(parsed.map_or(held.len() as u64, |p| p.allocated_ip_count(&held))),
    })
}

/// `apps_v1_Deployment_default_web`: the application an auto pool serves, from its labels and
/// pod affinity (`None` for a pool made by hand).
fn auto_pool_application(pool: &SpiderIPPool) -> Option<String> {
    use spiderpool_api::autopool;
    let l = &pool.metadata.labels;
    if !autopool::is_auto(l) {
        return None;
    }
    let name = pool
        .spec
        .pod_affinity
        .as_ref()?
        .match_labels
        .get(spiderpool_api::keys::APP_NAME)?;
    Some(format!(
        "{}_{}_{}_{name}",
        l.get(spiderpool_api::keys::LABEL_APP_GV)?,
        l.get(spiderpool_api::keys::LABEL_APP_KIND)?,
        l.get(spiderpool_api::keys::LABEL_APP_NAMESPACE)?
    ))
}

/// The status of a subnet: its usable addresses, and those given to pools of the same subnet.
pub fn subnet_status(subnet: &SpiderSubnet, pools: &[SpiderIPPool]) -> SubnetStatus {
    let Ok(s) = subnet.to_pool() else {
        return SubnetStatus::default();
    };
    let usable = s.usable();
    let mut controlled = BTreeMap::new();
    let mut given = IpSet::new();
    for (object, p) in pools
        .iter()
        .filter_map(|o| o.to_pool().ok().map(|p| (o, p)))
    {
        if p.subnet != s.subnet {
            continue;
        }
        let mine = p.ips.intersection(&usable);
        if !mine.is_empty() {
            given = given.union(&mine);
            let mut entry = serde_json::json!({"ips": mine.to_strings()});
            // An auto pool names its application, as upstream records it.
            if let Some(app) = auto_pool_application(object) {
                entry["application"] = app.into();
            }
            controlled.insert(p.name.clone(), entry);
        }
    }
    SubnetStatus {
        controlled_ip_pools: (!controlled.is_empty())
            .then(|| serde_json::to_string(&controlled).expect("map serialises")),
        total_ip_count: Some(s.total_ip_count()),
        allocated_ip_count: Some(
            u64::try_from(given.len()).map_or(spiderpool_core::COUNT_MAX, |n| {
                n.min(spiderpool_core::COUNT_MAX)
            }),
        ),
    }
}
