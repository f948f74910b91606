//! Admission: upstream's webhook rules and mutations for SpiderIPPool, SpiderSubnet,
//! SpiderReservedIP and SpiderCoordinator, in one place for every entry point — `spiderpoolctl apply` (all
//! datastores) and the controller's admission webhooks (Kubernetes). Messages name the object,
//! the field and the value, with upstream's wording (`../spec/spiderpool-reference.md` §8).

use spiderpool_api::meta::OwnerReference;
use spiderpool_api::{names, Object, SpiderIPPool, SpiderSubnet, ValidationError};
use spiderpool_core::{IpFamily, IpSet, Pool};

use crate::objects::ApplyError;
use crate::{typed, Kind, Store};

/// The finalizer on pools and subnets: removed by the controller once nothing is in use.
pub const FINALIZER: &str = "spiderpool.spidernet.io";
/// Label: a pool's subnet, as a label value (`10-6-0-0-16`).
pub const LABEL_POOL_CIDR: &str = "ipam.spidernet.io/ippool-cidr";
/// Label: a subnet's CIDR, as a label value.
pub const LABEL_SUBNET_CIDR: &str = "ipam.spidernet.io/subnet-cidr";
/// Label: the SpiderSubnet that owns a pool.
pub const LABEL_OWNER_SUBNET: &str = "ipam.spidernet.io/owner-spider-subnet";

/// The address families the cluster serves (upstream's `ipam.enableIPv4` / `enableIPv6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Families {
    /// IPv4 objects are accepted.
    pub ipv4: bool,
    /// IPv6 objects are accepted.
    pub ipv6: bool,
}

impl Default for Families {
    fn default() -> Self {
        Families {
            ipv4: true,
            ipv6: true,
        }
    }
}

impl Families {
    fn check(&self, kind: &str, name: &str, family: IpFamily) -> Result<(), ApplyError> {
        let on = match family {
            IpFamily::V4 => self.ipv4,
            IpFamily::V6 => self.ipv6,
        };
        if on {
            return Ok(());
        }
        let v = family.number();
        Err(invalid(
            kind,
            name,
            "spec.ipVersion",
            &v.to_string(),
            &format!("IPv{v} is disabled"),
        ))
    }
}

fn invalid(kind: &str, name: &str, field: &str, value: &str, why: &str) -> ApplyError {
    ApplyError::Invalid(ValidationError::field(field, value, why).in_object(kind, name))
}

/// `10.6.0.0/16` → `10-6-0-0-16`, `fd00::/64` → `fd00---64`: a CIDR as a label value.
pub fn cidr_label(cidr: &ipnet::IpNet) -> String {
    cidr.to_string().replace(['.', ':', '/'], "-")
}

/// A list of IP ranges merged and sorted (`[10.6.0.3, 10.6.0.1-10.6.0.2]` →
/// `[10.6.0.1-10.6.0.3]`); left as written when it does not parse (validation names it).
fn merged(list: &[String], family: IpFamily) -> Vec<String> {
    match IpSet::parse_list(list, Some(family)) {
        Ok(set) => set.to_strings(),
        Err(_) => list.to_vec(),
    }
}

/// An update of an object on its way out (deletion begun): refused with `why` while it still
/// carries our finalizer; `Ok(true)` when it is the removal of the finalizer, which is let
/// through; `Ok(false)` when the stored object is not terminating.
fn terminating_update(
    kind: &str,
    name: &str,
    old: Option<&spiderpool_api::meta::ObjectMeta>,
    new: &spiderpool_api::meta::ObjectMeta,
    why: &str,
) -> Result<bool, ApplyError> {
    if old.is_none_or(|o| o.deletion_timestamp.is_none()) {
        return Ok(false);
    }
    if new.finalizers.iter().any(|f| f == FINALIZER) {
        return Err(forbidden(kind, name, why));
    }
    Ok(true)
}

/// Whether two CIDRs share an address (one contains the other).
fn overlap(a: &ipnet::IpNet, b: &ipnet::IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Who mutates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    /// `spiderpoolctl apply`.
    Apply,
    /// The controller's mutating webhook, on a create or an update.
    Webhook {
        /// The operation is a create.
        create: bool,
    },
    /// The auto-pool reconciler (in a cluster: the controller's webhook sees its own
    /// identity). Only it changes an auto-created pool's addresses.
    Reconciler {
        /// The operation is a create.
        create: bool,
    },
}

/// Upstream's mutations: the default `ipVersion`, the CIDR labels, a pool's owner SpiderSubnet
/// (reference and label) with the subnet's gateway and routes when the pool sets none, and
/// `ips`/`excludeIPs` merged and sorted; on a webhook's create, the finalizer on pools and
/// subnets (the controller removes it).
pub async fn mutate(store: &dyn Store, object: &mut Object, by: By) -> Result<(), ApplyError> {
    // Only in a cluster: there the controller removes it.
    let finalizer = match by {
        By::Webhook { create } => create,
        By::Reconciler { create } => create && !store.owns_nodes(),
        By::Apply => false,
    };
    // The owner reference names the subnet's UID. In a cluster only the webhook sets it: there
    // the API server gives objects their UIDs, and a subnet created by the same apply has none
    // yet (a reference to a UID that does not exist gets the pool garbage-collected).
    // (The reconciler carves from a subnet that exists, UID and all.)
    let owner_reference = by != By::Apply || store.owns_nodes();
    match object {
        Object::IPPool(p) => {
            let Ok(net) = p.spec.subnet.parse::<ipnet::IpNet>() else {
                return Ok(()); // validation names the bad subnet
            };
            let family = family_of(&net);
            p.spec.ip_version.get_or_insert(i64::from(family.number()));
            p.metadata
                .labels
                .insert(LABEL_POOL_CIDR.into(), cidr_label(&net));
            p.spec.ips = merged(&p.spec.ips, family);
            p.spec.exclude_ips = merged(&p.spec.exclude_ips, family);
            adopt(store, p, &net, owner_reference).await?;
        }
        Object::Subnet(s) => {
            let Ok(net) = s.spec.subnet.parse::<ipnet::IpNet>() else {
                return Ok(());
            };
            let family = family_of(&net);
            s.spec.ip_version.get_or_insert(i64::from(family.number()));
            s.metadata
                .labels
                .insert(LABEL_SUBNET_CIDR.into(), cidr_label(&net));
            s.spec.ips = merged(&s.spec.ips, family);
            s.spec.exclude_ips = merged(&s.spec.exclude_ips, family);
        }
        Object::ReservedIP(r) => {
            let first = r
                .spec
                .ips
                .first()
                .and_then(|f| f.parse::<spiderpool_core::IpRange>().ok());
            if let Some(family) = first.map(|f| f.family()) {
                r.spec.ip_version.get_or_insert(i64::from(family.number()));
                r.spec.ips = merged(&r.spec.ips, family);
            }
        }
        Object::Coordinator(c) => c.default_spec(),
        _ => {}
    }
    if finalizer && matches!(object, Object::IPPool(_) | Object::Subnet(_)) {
        let m = object.metadata_mut();
        if !m.finalizers.iter().any(|f| f == FINALIZER) {
            m.finalizers.push(FINALIZER.into());
        }
    }
    Ok(())
}

fn family_of(net: &ipnet::IpNet) -> IpFamily {
    match net {
        ipnet::IpNet::V4(_) => IpFamily::V4,
        ipnet::IpNet::V6(_) => IpFamily::V6,
    }
}

/// A pool of a SpiderSubnet's CIDR belongs to that subnet: it carries the owner reference and
/// label, and takes the subnet's gateway and routes when it sets none.
async fn adopt(
    store: &dyn Store,
    pool: &mut SpiderIPPool,
    net: &ipnet::IpNet,
    owner_reference: bool,
) -> Result<(), ApplyError> {
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

/// Checks `object` (as it would be stored) against the rules, `old` being the stored version
/// for an update.
pub async fn validate(
    store: &dyn Store,
    object: &Object,
    old: Option<&Object>,
    families: &Families,
    by: By,
) -> Result<(), ApplyError> {
    if object.kind() == Kind::Endpoint {
        return Err(ApplyError::Invalid(ValidationError::Invalid(format!(
            "{}: SpiderEndpoints are written by the agent only",
            object.describe()
        ))));
    }
    validate_names(object)?;
    match object {
        Object::IPPool(new) => {
            let old = match old {
                Some(Object::IPPool(p)) => Some(p),
                _ => None,
            };
            validate_pool(store, new, old, families, by).await
        }
        Object::Subnet(new) => {
            let old = match old {
                Some(Object::Subnet(s)) => Some(s),
                _ => None,
            };
            validate_subnet(store, new, old, families).await
        }
        Object::ReservedIP(r) => {
            let name = &r.metadata.name;
            // What may not change is checked before what the new version says.
            if let Some(Object::ReservedIP(o)) = old {
                terminating_update(
                    "SpiderReservedIP",
                    name,
                    Some(&o.metadata),
                    &r.metadata,
                    "cannot update a terminating ReservedIP",
                )?;
                if o.spec.ip_version.is_some() && o.spec.ip_version != r.spec.ip_version {
                    return Err(invalid(
                        "SpiderReservedIP",
                        name,
                        "spec.ipVersion",
                        &r.spec.ip_version.map(|v| v.to_string()).unwrap_or_default(),
                        "is not changeable",
                    ));
                }
            }
            let set = r.to_set()?;
            if let Some(first) = set.ranges().next() {
                families.check("SpiderReservedIP", name, IpFamily::of(&first.start()))?;
            }
            Ok(())
        }
        Object::Coordinator(c) => Ok(c.validate()?),
        _ => Ok(()),
    }
}

fn forbidden(kind: &str, name: &str, why: &str) -> ApplyError {
    ApplyError::Invalid(ValidationError::Invalid(format!("{kind} {name:?}: {why}")))
}

fn pools_of(objs: &[(Object, u64)]) -> Vec<Pool> {
    objs.iter()
        .filter_map(|(o, _)| match o {
            Object::IPPool(p) => p.to_pool().ok(),
            _ => None,
        })
        .collect()
}

fn ranges(set: &IpSet) -> String {
    format!("[{}]", set.to_strings().join(" "))
}

async fn validate_pool(
    store: &dyn Store,
    new: &SpiderIPPool,
    old: Option<&SpiderIPPool>,
    families: &Families,
    by: By,
) -> Result<(), ApplyError> {
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
fn validate_auto_pool(
    new: &SpiderIPPool,
    old: Option<&SpiderIPPool>,
    pool: &Pool,
    by: By,
) -> Result<(), ApplyError> {
    use spiderpool_api::autopool::{self, APP_PREFIX};
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
        autopool::APP_API_GROUP,
        autopool::APP_API_VERSION,
        autopool::APP_KIND,
        autopool::APP_NAMESPACE,
        autopool::APP_NAME,
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
                    autopool::IP_NUMBER
                ),
            ));
        }
    }
    Ok(())
}

async fn validate_subnet(
    store: &dyn Store,
    new: &SpiderSubnet,
    old: Option<&SpiderSubnet>,
    families: &Families,
) -> Result<(), ApplyError> {
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

/// Kubernetes' name rules: a Namespace's name and every object's namespace are DNS-1123
/// labels, other names DNS-1123 subdomains, so no name can be two keys or break a table row.
fn validate_names(object: &Object) -> Result<(), ApplyError> {
    let m = object.metadata();
    let in_object =
        |e: ValidationError| ValidationError::Invalid(format!("{}: {e}", object.describe()));
    if object.kind() == Kind::Namespace {
        names::dns1123_label("metadata.name", &m.name).map_err(in_object)?;
    } else {
        names::dns1123_subdomain("metadata.name", &m.name).map_err(in_object)?;
    }
    if let Some(ns) = &m.namespace {
        names::dns1123_label("metadata.namespace", ns).map_err(in_object)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_become_label_values_as_upstream_writes_them() {
        assert_eq!(cidr_label(&"10.6.0.0/16".parse().unwrap()), "10-6-0-0-16");
        assert_eq!(cidr_label(&"fd00:6::/64".parse().unwrap()), "fd00-6---64");
    }

    #[test]
    fn ranges_are_merged_and_sorted() {
        let l = vec![
            "10.6.0.9".to_string(),
            "10.6.0.1-10.6.0.8".into(),
            "10.6.0.20".into(),
        ];
        assert_eq!(merged(&l, IpFamily::V4), ["10.6.0.1-10.6.0.9", "10.6.0.20"]);
    }
}
