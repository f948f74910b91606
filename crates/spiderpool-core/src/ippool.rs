//! The IP pool as allocation sees it: a validated SpiderIPPool spec with parsed addresses,
//! selectors and routes, plus the validation rules that guard it.

use std::net::IpAddr;

use ipnet::IpNet;
use thiserror::Error;

use crate::ipset::{IpFamily, IpSet};
use crate::selector::LabelSelector;

/// The largest count a status reports: the CRDs' counts are int64, so larger ones saturate.
pub const COUNT_MAX: u64 = i64::MAX as u64;

/// A route a pool gives its addresses: `dst` via `gw`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network.
    pub dst: IpNet,
    /// Next hop.
    pub gw: IpAddr,
}

/// A pool (or subnet) spec that breaks a rule: which object, and the rule with the bad value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{object} {name:?}: {rule}")]
pub struct PoolError {
    /// What the spec belongs to, as messages name it: `pool` or `subnet`.
    pub object: &'static str,
    /// The object's name.
    pub name: String,
    /// The rule broken.
    pub rule: PoolRule,
}

/// The rule a pool spec breaks; every variant names the bad value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PoolRule {
    /// `spec.subnet` is not written as its network address.
    #[error("spec.subnet {subnet} is not canonical, use {canonical}")]
    NonCanonicalSubnet {
        /// The subnet as written.
        subnet: IpNet,
        /// Its canonical form.
        canonical: IpNet,
    },
    /// `spec.ipVersion` disagrees with the subnet's family.
    #[error("spec.ipVersion {version} does not match spec.subnet {subnet}")]
    VersionMismatch {
        /// The declared version.
        version: u8,
        /// The subnet.
        subnet: IpNet,
    },
    /// An address of a list lies outside `spec.subnet`.
    #[error("{field} {ip} is outside subnet {subnet}")]
    OutsideSubnet {
        /// `spec.ips`, `spec.excludeIPs`, `spec.gateway` or `spec.routes[].gw`.
        field: &'static str,
        /// The first offending address.
        ip: IpAddr,
        /// The subnet.
        subnet: IpNet,
    },
    /// The gateway is one of the pool's own addresses.
    #[error("spec.gateway {gateway} must not be one of spec.ips: add it to spec.excludeIPs or remove it from spec.ips")]
    GatewayInIps {
        /// The gateway.
        gateway: IpAddr,
    },
    /// A route of the wrong family, or a default route (the gateway gives that).
    #[error("spec.routes entry {dst} via {gw}: {why}")]
    BadRoute {
        /// Destination.
        dst: IpNet,
        /// Next hop.
        gw: IpAddr,
        /// What is wrong.
        why: &'static str,
    },
    /// Two routes to one destination.
    #[error("spec.routes has {dst} twice")]
    DuplicateRoute {
        /// The repeated destination.
        dst: IpNet,
    },
}

/// A validated SpiderIPPool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// `metadata.name`.
    pub name: String,
    /// Family of every address of the pool.
    pub family: IpFamily,
    /// `spec.subnet`.
    pub subnet: IpNet,
    /// `spec.ips`.
    pub ips: IpSet,
    /// `spec.excludeIPs`.
    pub exclude: IpSet,
    /// `spec.gateway`.
    pub gateway: Option<IpAddr>,
    /// `spec.routes`.
    pub routes: Vec<Route>,
    /// `spec.vlan`.
    pub vlan: Option<i64>,
    /// `spec.default`: a cluster default pool.
    pub default: bool,
    /// `spec.disable`: hands out nothing, still releases.
    pub disable: bool,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// `spec.nodeName`: when non-empty it replaces `node_affinity`.
    pub node_name: Vec<String>,
    /// `spec.nodeAffinity`.
    pub node_affinity: Option<LabelSelector>,
    /// `spec.namespaceName`: when non-empty it replaces `namespace_affinity`.
    pub namespace_name: Vec<String>,
    /// `spec.namespaceAffinity`.
    pub namespace_affinity: Option<LabelSelector>,
    /// `spec.podAffinity`.
    pub pod_affinity: Option<LabelSelector>,
    /// `spec.multusName`.
    pub multus_name: Vec<String>,
}

impl Pool {
    /// A pool with only name and subnet set; the family follows the subnet.
    pub fn new(name: impl Into<String>, subnet: IpNet) -> Self {
        Pool {
            name: name.into(),
            family: match subnet {
                IpNet::V4(_) => IpFamily::V4,
                IpNet::V6(_) => IpFamily::V6,
            },
            subnet,
            ips: IpSet::new(),
            exclude: IpSet::new(),
            gateway: None,
            routes: Vec::new(),
            vlan: None,
            default: false,
            disable: false,
            terminating: false,
            node_name: Vec::new(),
            node_affinity: None,
            namespace_name: Vec::new(),
            namespace_affinity: None,
            pod_affinity: None,
            multus_name: Vec::new(),
        }
    }

    /// The addresses the pool may hand out: `ips` minus `excludeIPs`.
    pub fn usable(&self) -> IpSet {
        self.ips.difference(&self.exclude)
    }

    /// `status.totalIPCount`: |ips − excludeIPs|, saturating at [`COUNT_MAX`] (the CRD's
    /// counts are int64: an IPv6 /64 has 2^64 − 2 usable addresses).
    pub fn total_ip_count(&self) -> u64 {
        u64::try_from(self.usable().len()).map_or(COUNT_MAX, |n| n.min(COUNT_MAX))
    }

    /// `status.allocatedIPCount`: how many of the held addresses `held` are the pool's own
    /// (`spec.ips`); an entry left outside them after a spec change is not counted.
    pub fn allocated_ip_count<'a>(&self, held: impl IntoIterator<Item = &'a IpAddr>) -> u64 {
        held.into_iter().filter(|ip| self.ips.contains(ip)).count() as u64
    }

    /// Checks the rules a stored pool must satisfy on its own. `declared_version` is
    /// `spec.ipVersion` when the user wrote it.
    pub fn validate(&self, declared_version: Option<IpFamily>) -> Result<(), PoolError> {
        self.validate_as("pool", declared_version)
    }

    /// [`Pool::validate`] for a spec that belongs to `object` (`subnet` for a SpiderSubnet,
    /// whose spec follows the same rules), so the error names it so.
    pub fn validate_as(
        &self,
        object: &'static str,
        declared_version: Option<IpFamily>,
    ) -> Result<(), PoolError> {
        self.check_rules(declared_version)
            .map_err(|rule| PoolError {
                object,
                name: self.name.clone(),
                rule,
            })
    }

    fn check_rules(&self, declared_version: Option<IpFamily>) -> Result<(), PoolRule> {
        if self.subnet.trunc() != self.subnet {
            return Err(PoolRule::NonCanonicalSubnet {
                subnet: self.subnet,
                canonical: self.subnet.trunc(),
            });
        }
        if let Some(v) = declared_version {
            if v != self.family {
                return Err(PoolRule::VersionMismatch {
                    version: v.number(),
                    subnet: self.subnet,
                });
            }
        }
        let net = IpSet::from_net(&self.subnet);
        for (field, set) in [("spec.ips", &self.ips), ("spec.excludeIPs", &self.exclude)] {
            if let Some(r) = set.difference(&net).ranges().next() {
                return Err(PoolRule::OutsideSubnet {
                    field,
                    ip: r.start(),
                    subnet: self.subnet,
                });
            }
        }
        if let Some(gw) = self.gateway {
            if !self.subnet.contains(&gw) {
                return Err(PoolRule::OutsideSubnet {
                    field: "spec.gateway",
                    ip: gw,
                    subnet: self.subnet,
                });
            }
            if self.usable().contains(&gw) {
                return Err(PoolRule::GatewayInIps { gateway: gw });
            }
        }
        let mut seen = Vec::new();
        for r in &self.routes {
            let bad = |why| PoolRule::BadRoute {
                dst: r.dst,
                gw: r.gw,
                why,
            };
            let dst_family = match r.dst {
                IpNet::V4(_) => IpFamily::V4,
                IpNet::V6(_) => IpFamily::V6,
            };
            if dst_family != self.family || IpFamily::of(&r.gw) != self.family {
                return Err(bad("route family differs from the pool's"));
            }
            if r.dst.prefix_len() == 0 {
                return Err(bad(
                    "the default route comes from spec.gateway, not spec.routes",
                ));
            }
            if !self.subnet.contains(&r.gw) {
                return Err(PoolRule::OutsideSubnet {
                    field: "spec.routes[].gw",
                    ip: r.gw,
                    subnet: self.subnet,
                });
            }
            if seen.contains(&r.dst) {
                return Err(PoolRule::DuplicateRoute { dst: r.dst });
            }
            seen.push(r.dst);
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A v4 or v6 pool with `ips` parsed from text.
    pub(crate) fn mk_pool(name: &str, subnet: &str, ips: &[&str]) -> Pool {
        let mut p = Pool::new(name, subnet.parse().unwrap());
        p.ips = IpSet::parse_list(ips, Some(p.family)).unwrap();
        p
    }

    #[test]
    fn seed_pool_is_valid_and_counts_ten() {
        let mut p = mk_pool("test-ippool-6", "10.6.0.0/16", &["10.6.168.60-10.6.168.69"]);
        p.gateway = Some("10.6.0.1".parse().unwrap());
        assert_eq!(p.validate(Some(IpFamily::V4)), Ok(()));
        assert_eq!(p.total_ip_count(), 10);
        p.exclude = IpSet::parse_list(&["10.6.168.69"], None).unwrap();
        assert_eq!(p.total_ip_count(), 9);
    }

    #[test]
    fn counts_saturate_at_int64_and_count_only_the_pools_own_addresses() {
        let p = mk_pool("v6", "fd00::/64", &["fd00::1-fd00::ffff:ffff:ffff:ffff"]);
        assert_eq!(p.total_ip_count(), i64::MAX as u64);
        let p = mk_pool("four", "10.6.0.0/16", &["10.6.0.10-10.6.0.13"]);
        let held: Vec<IpAddr> = ["10.6.0.10", "10.6.0.13", "10.6.9.9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(p.allocated_ip_count(&held), 2);
    }

    #[test]
    fn validation_names_pool_field_and_value() {
        let base = || {
            let mut p = mk_pool("test-ippool-6", "10.6.0.0/16", &["10.6.168.60-10.6.168.69"]);
            p.gateway = Some("10.6.0.1".parse().unwrap());
            p
        };
        let mut cases: Vec<(Pool, &str)> = Vec::new();
        let mut p = base();
        p.ips = IpSet::parse_list(&["10.7.0.5"], None).unwrap();
        cases.push((
            p,
            "pool \"test-ippool-6\": spec.ips 10.7.0.5 is outside subnet 10.6.0.0/16",
        ));
        let mut p = base();
        p.exclude = IpSet::parse_list(&["10.8.0.1"], None).unwrap();
        cases.push((
            p,
            "pool \"test-ippool-6\": spec.excludeIPs 10.8.0.1 is outside subnet 10.6.0.0/16",
        ));
        let mut p = base();
        p.gateway = Some("10.7.0.1".parse().unwrap());
        cases.push((
            p,
            "pool \"test-ippool-6\": spec.gateway 10.7.0.1 is outside subnet 10.6.0.0/16",
        ));
        let mut p = base();
        p.gateway = Some("10.6.168.61".parse().unwrap());
        cases.push((
            p,
            "pool \"test-ippool-6\": spec.gateway 10.6.168.61 must not be one of spec.ips",
        ));
        let mut p = base();
        p.subnet = "10.6.1.0/16".parse().unwrap();
        cases.push((
            p,
            "pool \"test-ippool-6\": spec.subnet 10.6.1.0/16 is not canonical, use 10.6.0.0/16",
        ));
        let mut p = base();
        p.routes = vec![Route {
            dst: "0.0.0.0/0".parse().unwrap(),
            gw: "10.6.0.1".parse().unwrap(),
        }];
        cases.push((p, "the default route comes from spec.gateway"));
        let mut p = base();
        p.routes = vec![Route {
            dst: "fd00::/64".parse().unwrap(),
            gw: "10.6.0.1".parse().unwrap(),
        }];
        cases.push((p, "route family differs"));
        for (p, want) in cases {
            let err = p.validate(None).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?}, got {err:?}");
        }
        let err = base().validate(Some(IpFamily::V6)).unwrap_err().to_string();
        assert_eq!(
            err,
            "pool \"test-ippool-6\": spec.ipVersion 6 does not match spec.subnet 10.6.0.0/16"
        );
    }
}
