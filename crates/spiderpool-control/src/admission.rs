//! Admission: upstream's webhook rules and mutations for SpiderIPPool, SpiderSubnet,
//! SpiderReservedIP and SpiderCoordinator, in one place for every entry point — `spiderpoolctl apply` (all
//! datastores) and the controller's admission webhooks (Kubernetes). Messages name the object,
//! the field and the value, with upstream's wording (`../spec/spiderpool-reference.md` §8).

use spiderpool_api::keys::{FINALIZER, LABEL_POOL_CIDR, LABEL_SUBNET_CIDR};
use spiderpool_api::{names, Object, ValidationError};
use spiderpool_core::{IpFamily, IpSet};

use spiderpool_store::{Kind, Store, StoreError};

mod pool;
mod subnet;

use pool::*;
use subnet::*;

/// Why admission refused an object, or could not judge it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdmissionError {
    /// The object breaks a rule; the message names field and value.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The datastore the rules read (other pools, subnets) failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

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
    fn check(&self, kind: &str, name: &str, family: IpFamily) -> Result<(), AdmissionError> {
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

fn invalid(kind: &str, name: &str, field: &str, value: &str, why: &str) -> AdmissionError {
    AdmissionError::Invalid(ValidationError::field(field, value, why).in_object(kind, name))
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
) -> Result<bool, AdmissionError> {
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
pub async fn mutate(store: &dyn Store, object: &mut Object, by: By) -> Result<(), AdmissionError> {
    // Only in a cluster: there the controller removes it.
    let finalizer = match by {
        By::Webhook { create } => create,
        By::Reconciler { create } => create && store.mode().is_cluster(),
        By::Apply => false,
    };
    // The owner reference names the subnet's UID. In a cluster only the webhook sets it: there
    // the API server gives objects their UIDs, and a subnet created by the same apply has none
    // yet (a reference to a UID that does not exist gets the pool garbage-collected).
    // (The reconciler carves from a subnet that exists, UID and all.)
    let owner_reference = by != By::Apply || !store.mode().is_cluster();
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
        Object::MultusConfig(c) => c.default_spec(),
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

/// Checks `object` (as it would be stored) against the rules, `old` being the stored version
/// for an update.
pub async fn validate(
    store: &dyn Store,
    object: &Object,
    old: Option<&Object>,
    families: &Families,
    by: By,
) -> Result<(), AdmissionError> {
    if object.kind() == Kind::Endpoint {
        return Err(AdmissionError::Invalid(ValidationError::Invalid(format!(
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
        Object::MultusConfig(c) => {
            match old {
                Some(Object::MultusConfig(o)) => c.validate_update(o)?,
                _ => c.validate()?,
            }
            multus_nad_free(store, c).await
        }
        _ => Ok(()),
    }
}

/// The NetworkAttachmentDefinition a SpiderMultusConfig generates is not another one's.
async fn multus_nad_free(
    store: &dyn Store,
    c: &spiderpool_api::multus::SpiderMultusConfig,
) -> Result<(), AdmissionError> {
    let (ns, key) = (c.namespace(), c.nad_key());
    let Some((o, _)) = spiderpool_store::typed::get(store, Kind::NetworkAttachment, &key).await?
    else {
        return Ok(());
    };
    match o
        .metadata()
        .owner_references
        .iter()
        .find(|r| r.kind == "SpiderMultusConfig" && r.name != c.metadata.name)
    {
        Some(r) => Err(forbidden(
            "SpiderMultusConfig",
            &c.full_name(),
            &format!(
                "the net-attach-def {key} already exists and is managed by SpiderMultusConfig {ns}/{}",
                r.name
            ),
        )),
        None => Ok(()),
    }
}

fn forbidden(kind: &str, name: &str, why: &str) -> AdmissionError {
    AdmissionError::Invalid(ValidationError::Invalid(format!("{kind} {name:?}: {why}")))
}

/// Kubernetes' name rules: a Namespace's name and every object's namespace are DNS-1123
/// labels, other names DNS-1123 subdomains, so no name can be two keys or break a table row.
fn validate_names(object: &Object) -> Result<(), AdmissionError> {
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
