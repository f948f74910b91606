//! One auto pool made to hold what its application wants: for one NIC and family, carved from
//! the subnet's lowest free addresses when it does not exist, grown from them or shrunk by its
//! highest unheld addresses when it does, taken over from an earlier application when that one
//! left it (`ippool-reclaim: "false"`). Each attempt is planned on a fresh read and committed
//! guarded by what it read; a conflict plans again.

use std::collections::BTreeMap;

use spiderpool_api::autopool::{App, AutoConfig};
use spiderpool_api::crd::IPPoolSpec;
use spiderpool_api::keys::{
    IPPOOL_IP_NUMBER, LABEL_APP_UID, LABEL_INTERFACE, LABEL_IP_VERSION, LABEL_OWNER_SUBNET,
    LABEL_RECLAIM,
};
use spiderpool_api::{Object, ObjectMeta, SpiderIPPool, SpiderSubnet};
use spiderpool_core::{IpFamily, IpSet, Pool};
use spiderpool_store::{typed, Expect, Kind, Op, Retry, Revision, Store, StoreError};

use super::index::{all_pools, ip_version, label, pools_of};
use super::{app_error, Action, Settings};
use crate::apply::{plan_as, ApplyError, Who};

/// How a carve is planned again after another writer changed the subnet or pool: eight
/// attempts, at once (the subnet's own revision serializes the carvers).
const RETRY: Retry = Retry {
    attempts: 8,
    ..Retry::APPLY
};

/// The application's pool for `family` on `nic`, to hold `desired` addresses of `subnet`.
pub(super) struct Carve<'a> {
    pub(super) store: &'a dyn Store,
    pub(super) app: &'a App,
    pub(super) config: &'a AutoConfig,
    pub(super) nic: &'a str,
    pub(super) family: IpFamily,
    pub(super) subnet: &'a str,
    pub(super) desired: u64,
    pub(super) settings: Settings,
}

/// What one attempt reads: the subnet (at its revision) and every pool.
struct Read {
    subnet: SpiderSubnet,
    subnet_pool: Pool,
    subnet_rev: Revision,
    pools: Vec<(SpiderIPPool, Revision)>,
}

impl Carve<'_> {
    /// Makes the pool hold what the application wants; returns its name and what was done
    /// (`None`: it already did).
    pub(super) async fn run(&self) -> Result<(String, Option<Action>), ApplyError> {
        let describe = self.app.describe();
        for attempt in 1..=RETRY.attempts {
            let read = self.read().await?;
            let current = self.current(&read.pools)?;
            let free = self.free(&read).await?;
            let (object, new, action) = match current {
                None => {
                    let (pool, action) = self.create(&read, &free)?;
                    (pool, true, action)
                }
                Some(p) => match self.resize(p, &free).await? {
                    Some((pool, action)) => (pool, false, action),
                    None => return Ok((p.metadata.name.clone(), None)),
                },
            };
            let name = object.metadata.name.clone();
            let Some(ops) = self.ops(object, new, read.subnet_rev).await? else {
                continue;
            };
            match self.store.commit(ops).await {
                Ok(_) => return Ok((name, Some(action))),
                Err(e) => match RETRY.again(attempt, &e) {
                    Some(wait) => {
                        tracing::debug!(app = %describe, conflict = %e, "auto pool: planning again");
                        tokio::time::sleep(wait).await;
                    }
                    None if matches!(e, StoreError::Conflict(_)) => break,
                    None => return Err(e.into()),
                },
            }
        }
        Err(ApplyError::Store(StoreError::changed(format!(
            "{describe}: the auto pool of interface {} kept changing while it was being carved",
            self.nic
        ))))
    }

    fn fail(&self, why: String) -> ApplyError {
        app_error(&self.app.describe(), why)
    }

    /// The subnet, which must exist, be of the family and not be terminating; and every pool.
    async fn read(&self) -> Result<Read, ApplyError> {
        let (subnet, nic, family) = (self.subnet, self.nic, self.family);
        let Some((Object::Subnet(s), subnet_rev)) =
            typed::get(self.store, Kind::Subnet, subnet).await?
        else {
            return Err(self.fail(format!(
                "SpiderSubnet {subnet:?} named for interface {nic} does not exist"
            )));
        };
        let sp = s.to_pool()?;
        if sp.family != family {
            return Err(self.fail(format!(
                "SpiderSubnet {subnet:?} ({}) is named as the {family} subnet of interface {nic}",
                sp.subnet
            )));
        }
        if s.metadata.deletion_timestamp.is_some() {
            return Err(self.fail(format!("SpiderSubnet {subnet:?} is being deleted")));
        }
        Ok(Read {
            subnet: s,
            subnet_pool: sp,
            subnet_rev,
            pools: all_pools(self.store).await?,
        })
    }

    /// The application's pool for this NIC and family: its own (by UID), else one an earlier
    /// application of the same name left to be taken over. Its subnet cannot change.
    fn current<'p>(
        &self,
        pools: &'p [(SpiderIPPool, Revision)],
    ) -> Result<Option<&'p SpiderIPPool>, ApplyError> {
        let app = self.app;
        let candidates: Vec<&SpiderIPPool> =
            pools_of(pools, &app.key_kind(), &app.namespace, &app.name)
                .into_iter()
                .map(|(p, _)| p)
                .filter(|p| {
                    label(p, LABEL_INTERFACE) == self.nic
                        && label(p, LABEL_IP_VERSION) == ip_version(self.family)
                        && p.metadata.deletion_timestamp.is_none()
                })
                .collect();
        let current = candidates
            .iter()
            .find(|p| label(p, LABEL_APP_UID) == app.uid)
            .or_else(|| {
                candidates
                    .iter()
                    .find(|p| label(p, LABEL_RECLAIM) == "false")
            })
            .copied();
        if let Some(p) = current {
            let owner = label(p, LABEL_OWNER_SUBNET);
            if owner != self.subnet {
                return Err(ApplyError::SubnetChanged(format!(
                    "{}: ApplicationSubnetChanged: its SpiderIPPool {} of interface {} belongs to \
                     SpiderSubnet {owner:?}, the pod template now names {:?}; the subnet of an \
                     application's pool cannot change (delete and recreate the application)",
                    app.describe(),
                    p.metadata.name,
                    self.nic,
                    self.subnet
                )));
            }
        }
        Ok(current)
    }

    /// Addresses of the subnet no pool of its CIDR lists and no SpiderReservedIP reserves.
    async fn free(&self, read: &Read) -> Result<IpSet, ApplyError> {
        let mut taken = IpSet::new();
        for (p, _) in &read.pools {
            if let Ok(pp) = p.to_pool() {
                if pp.subnet == read.subnet_pool.subnet {
                    taken = taken.union(&pp.ips);
                }
            }
        }
        for (o, _) in typed::list(self.store, Kind::ReservedIP).await? {
            if let Object::ReservedIP(r) = o {
                if let Ok(set) = r.to_set() {
                    taken = taken.union(&set);
                }
            }
        }
        Ok(read.subnet_pool.usable().difference(&taken))
    }

    fn ip_number(&self) -> String {
        self.config
            .ip_number_value(self.settings.default_redundancy)
    }

    /// A new pool of the lowest `desired` free addresses, with the subnet's gateway and routes.
    fn create(&self, read: &Read, free: &IpSet) -> Result<(SpiderIPPool, Action), ApplyError> {
        let (desired, subnet) = (self.desired, self.subnet);
        let free_now = free.len();
        if free_now < u128::from(desired) {
            return Err(self.fail(format!(
                "insufficient subnet FreeIPs, required '{desired}' but only left '{free_now}' in SpiderSubnet {subnet:?}"
            )));
        }
        let name = self.app.pool_name(self.family, self.nic);
        let ips = free.lowest(u128::from(desired));
        let mut labels = self
            .app
            .pool_labels(self.family, self.nic, self.config.reclaim);
        labels.insert(LABEL_OWNER_SUBNET.into(), subnet.to_string());
        let s = &read.subnet;
        let pool = SpiderIPPool {
            api_version: spiderpool_api::crd::API_VERSION.into(),
            kind: "SpiderIPPool".into(),
            metadata: ObjectMeta {
                name: name.clone(),
                labels,
                annotations: BTreeMap::from([(IPPOOL_IP_NUMBER.to_string(), self.ip_number())]),
                ..Default::default()
            },
            spec: IPPoolSpec {
                ip_version: Some(i64::from(self.family.number())),
                subnet: read.subnet_pool.subnet.to_string(),
                ips: ips.to_strings(),
                gateway: s.spec.gateway.clone(),
                routes: s.spec.routes.clone(),
                vlan: s.spec.vlan,
                pod_affinity: Some(self.app.affinity()),
                ..Default::default()
            },
            status: None,
        };
        let action = Action::Created {
            pool: name,
            ips: desired,
        };
        Ok((pool, action))
    }

    /// The existing pool `p` grown by the lowest free addresses or shrunk by its highest
    /// unheld ones, relabelled for this application (`None`: nothing to change).
    async fn resize(
        &self,
        p: &SpiderIPPool,
        free: &IpSet,
    ) -> Result<Option<(SpiderIPPool, Action)>, ApplyError> {
        let desired = self.desired;
        let mut pool = p.clone();
        let have = p.to_pool()?.ips;
        let before = u64::try_from(have.len()).unwrap_or(u64::MAX);
        let in_use = IpSet::from_ips(
            self.store
                .allocations(&p.metadata.name)
                .await?
                .into_iter()
                .map(|a| a.ip),
        );
        let ips = if before < desired {
            let add = free.lowest(u128::from(desired - before));
            if add.len() < u128::from(desired - before) {
                return Err(self.fail(format!(
                    "insufficient subnet FreeIPs, required '{}' but only left '{}' in SpiderSubnet {:?} to scale SpiderIPPool {}",
                    desired - before,
                    free.len(),
                    self.subnet,
                    p.metadata.name
                )));
            }
            have.union(&add)
        } else if before > desired {
            // The highest addresses no pod holds; never one in use.
            let spare = have.difference(&in_use);
            have.difference(&spare.highest(u128::from(before - desired)))
        } else {
            have.clone()
        };
        let after = u64::try_from(ips.len()).unwrap_or(u64::MAX);
        let from_uid = label(p, LABEL_APP_UID).to_string();
        pool.spec.ips = ips.to_strings();
        pool.metadata.labels.extend(self.app.pool_labels(
            self.family,
            self.nic,
            self.config.reclaim,
        ));
        pool.metadata
            .annotations
            .insert(IPPOOL_IP_NUMBER.into(), self.ip_number());
        if pool == *p {
            return Ok(None);
        }
        let name = p.metadata.name.clone();
        let action = if from_uid != self.app.uid {
            Action::Adopted {
                pool: name,
                from_uid,
            }
        } else {
            Action::Scaled {
                pool: name,
                from: before,
                to: after,
            }
        };
        Ok(Some((pool, action)))
    }

    /// What writing `object` commits: the reconciler's apply of it (a new pool only if it is
    /// still absent) and, with a datastore-wide revision, the subnet unchanged at the revision
    /// read, so carvers of one subnet serialize (see the module comment). `None`: the subnet
    /// changed already, plan again.
    async fn ops(
        &self,
        object: SpiderIPPool,
        new: bool,
        subnet_rev: Revision,
    ) -> Result<Option<Vec<Op>>, ApplyError> {
        let planned = plan_as(self.store, Object::IPPool(object), Who::Reconciler).await?;
        let mut ops = planned.ops;
        if new {
            for op in &mut ops {
                if let Op::Put { expect, .. } = op {
                    *expect = Expect::Absent;
                }
            }
        }
        if self.store.revision().await?.is_some() {
            if let Some(stored) = self.store.get(Kind::Subnet, self.subnet).await? {
                if stored.revision != subnet_rev {
                    return Ok(None);
                }
                ops.push(Op::Put {
                    kind: Kind::Subnet,
                    key: self.subnet.to_string(),
                    value: stored.value,
                    expect: Expect::Revision(subnet_rev),
                });
            }
        }
        Ok(Some(ops))
    }
}
