//! A SpiderSubnet's rules, and a pool of a subnet's CIDR adopted by it (owner reference,
//! label, gateway and routes).

use spiderpool_api::keys::LABEL_OWNER_SUBNET;
use spiderpool_api::meta::OwnerReference;
use spiderpool_api::{Object, SpiderIPPool, SpiderSubnet};

use spiderpool_store::{typed, Kind, Store};

use super::*;

/// A pool of a SpiderSubnet's CIDR belongs to that subnet: it carries the owner reference and
/// label, and takes the subnet's gateway and routes when it sets none.
pub(super) async fn adopt(
    store: &dyn Store,
    pool: &mut SpiderIPPool,
    net: &ipnet::IpNet,
    owner_reference: bool,
) -> Result<(), AdmissionError> {
    for (o, _) in typed::list(store, Kind::Subnet).await? {
        let Object::Subnet(sub) = o else { continue };
        if sub.spec.subnet.parse::<ipnet::IpNet>().ok() != Some(*net) {
            continue;
        }
        if pool.spec.gateway.is_none() {
            pool.spec.gateway = sub.spec.gateway.clone();
        }
        if pool.spec.routes.is_empty() {
            pool.spec.routes = sub.spec.routes.clone();
        }
        let name = sub.metadata.name.clone();
        pool.metadata
            .labels
            .insert(LABEL_OWNER_SUBNET.into(), name.clone());
        let uid = sub.metadata.uid.clone().filter(|u| !u.is_empty());
        if let Some(uid) = uid.filter(|_| owner_reference) {
            let refs = &mut pool.metadata.owner_references;
            if !refs
                .iter()
                .any(|r| r.kind == "SpiderSubnet" && r.uid == uid)
            {
                refs.retain(|r| r.controller != Some(true));
                refs.push(OwnerReference {
                    api_version: spiderpool_api::crd::API_VERSION.into(),
                    kind: "SpiderSubnet".into(),
                    name,
                    uid,
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                });
            }
        }
        break;
    }
    Ok(())
}

pub(super) async fn validate_subnet(
    store: &dyn Store,
    new: &SpiderSubnet,
    old: Option<&SpiderSubnet>,
    families: &Families,
) -> Result<(), AdmissionError> {
    const KIND: &str = "SpiderSubnet";
    let name = &new.metadata.name;
    // Upstream's spelling.
    let why = "cannot update a terminaing Subnet";
    if terminating_update(KIND, name, old.map(|o| &o.metadata), &new.metadata, why)? {
        return Ok(());
    }
    let s = new.to_pool()?;
    families.check(KIND, name, s.family)?;
    if let Some(old) = old.and_then(|o| o.to_pool().ok()) {
        if old.subnet != s.subnet {
            return Err(invalid(
                KIND,
                name,
                "spec.subnet",
                &s.subnet.to_string(),
                &format!("is not changeable (was {})", old.subnet),
            ));
        }
    }
    for (o, _) in typed::list(store, Kind::Subnet).await? {
        let Object::Subnet(other) = o else { continue };
        let Ok(other) = other.to_pool() else { continue };
        if &other.name == name || other.family != s.family {
            continue;
        }
        if overlap(&other.subnet, &s.subnet) {
            return Err(invalid(
                KIND,
                name,
                "spec.subnet",
                &s.subnet.to_string(),
                &format!(
                    "overlap with Subnet {} which 'spec.subnet' is {}",
                    other.name, other.subnet
                ),
            ));
        }
    }
    let usable = s.usable();
    let pools = typed::list(store, Kind::IPPool).await?;
    for p in pools_of(&pools).iter().filter(|p| p.family == s.family) {
        if p.subnet != s.subnet {
            if overlap(&p.subnet, &s.subnet) && old.is_none() {
                return Err(invalid(
                    KIND,
                    name,
                    "spec.subnet",
                    &s.subnet.to_string(),
                    &format!(
                        "overlap with SpiderIPPool '{}' resource 'spec.subnet' {}",
                        p.name, p.subnet
                    ),
                ));
            }
            continue;
        }
        let outside = p.ips.difference(&usable);
        if outside.is_empty() {
            continue;
        }
        return Err(match old {
            None => invalid(
                KIND,
                name,
                "spec.ips",
                &ranges(&outside),
                &format!(
                    "SpiderIPPool '{}' owns some IP addresses that SpiderSubnet '{name}' can't control",
                    p.name
                ),
            ),
            Some(_) => invalid(
                KIND,
                name,
                "spec.ips",
                &ranges(&outside),
                &format!(
                    "remove some IP ranges {} that is being used by IPPool {}, total IP addresses of an Subnet are jointly determined by 'spec.ips' and 'spec.excludeIPs'",
                    ranges(&outside),
                    p.name
                ),
            ),
        });
    }
    Ok(())
}
