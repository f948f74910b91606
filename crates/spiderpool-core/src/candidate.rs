//! Which pools may serve one NIC of one pod, in which order: the candidate sources by priority
//! (pod annotation, CNI config, cluster defaults), the filters (each with a recorded reason),
//! the ordering by affinity strength, and the lowest-free pick inside a pool.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use thiserror::Error;

use crate::ippool::Pool;
use crate::ipset::{IpFamily, IpSet};
use crate::selector::Labels;

/// Pool names for one NIC, as a source lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolNames {
    /// IPv4 pools, in priority order.
    pub v4: Vec<String>,
    /// IPv6 pools, in priority order.
    pub v6: Vec<String>,
    /// Leave out the default route for this NIC.
    pub clean_gateway: Option<bool>,
}

impl PoolNames {
    /// Whether the source names no pool at all.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    fn family(&self, f: IpFamily) -> &[String] {
        match f {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }
}

/// Where a NIC's candidate pools came from, highest priority first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The auto pools of the pod's application, for the subnets its
    /// `ipam.spidernet.io/subnet(s)` annotation names.
    AutoPool,
    /// Pod annotation `ipam.spidernet.io/ippools` (the entry for this NIC).
    PodIppools,
    /// Pod annotation `ipam.spidernet.io/ippool`.
    PodIppool,
    /// Namespace annotations `ipam.spidernet.io/default-ipv4-ippool` / `default-ipv6-ippool`.
    NamespaceDefault,
    /// CNI config `default_ipv4_ippool` / `default_ipv6_ippool`.
    CniConfig,
    /// Pools with `spec.default: true`.
    ClusterDefault,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::AutoPool => "the auto pools of pod annotation ipam.spidernet.io/subnet(s)",
            Source::PodIppools => "pod annotation ipam.spidernet.io/ippools",
            Source::PodIppool => "pod annotation ipam.spidernet.io/ippool",
            Source::NamespaceDefault => {
                "namespace annotation ipam.spidernet.io/default-ipv4-ippool/default-ipv6-ippool"
            }
            Source::CniConfig => "CNI config default_ipv4_ippool/default_ipv6_ippool",
            Source::ClusterDefault => "cluster default pools (spec.default: true)",
        })
    }
}

/// The facts about one NIC's request that the rules look at.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The interface being added, e.g. `eth0`.
    pub nic: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod labels.
    pub pod_labels: Labels,
    /// Node the pod runs on.
    pub node: String,
    /// That node's labels.
    pub node_labels: Labels,
    /// Labels of the pod's namespace.
    pub namespace_labels: Labels,
    /// The auto pools of the pod's application for this NIC (`ipam.spidernet.io/subnet(s)`).
    pub auto_pools: Option<PoolNames>,
    /// Pools for this NIC from the pod's `ipam.spidernet.io/ippools` annotation.
    pub pod_ippools: Option<PoolNames>,
    /// Pools from the pod's `ipam.spidernet.io/ippool` annotation.
    pub pod_ippool: Option<PoolNames>,
    /// Pools from the namespace's default-pool annotations.
    pub namespace_default: Option<PoolNames>,
    /// The Multus network (`namespace/name`) this NIC is attached by, when known.
    pub multus_network: Option<String>,
    /// Pools from the CNI config.
    pub cni_default: PoolNames,
    /// `clean_gateway` of the CNI config.
    pub cni_clean_gateway: bool,
}

/// Why a pool was not a candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Being deleted.
    Terminating,
    /// `spec.disable: true`.
    Disabled,
    /// Listed for one family but holds the other.
    WrongFamily(IpFamily),
    /// `spec.nodeName` does not list the node.
    NodeName(String),
    /// `spec.nodeAffinity` does not match the node's labels.
    NodeAffinity(String),
    /// `spec.namespaceName` does not list the namespace.
    NamespaceName(String),
    /// `spec.namespaceAffinity` does not match the namespace's labels.
    NamespaceAffinity(String),
    /// `spec.podAffinity` does not match the pod's labels.
    PodAffinity(String),
    /// `spec.multusName` does not list the NIC's Multus network.
    MultusName {
        /// The interface.
        nic: String,
        /// Its network, if known.
        network: Option<String>,
    },
    /// No free address left.
    Exhausted {
        /// Addresses in use.
        used: u64,
        /// Addresses the pool can hand out.
        total: u64,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Terminating => f.write_str("pool is terminating"),
            Rejection::Disabled => f.write_str("pool is disabled (spec.disable: true)"),
            Rejection::WrongFamily(want) => write!(f, "pool is not an {want} pool"),
            Rejection::NodeName(n) => write!(f, "spec.nodeName does not list node {n}"),
            Rejection::NodeAffinity(n) => {
                write!(f, "spec.nodeAffinity does not match the labels of node {n}")
            }
            Rejection::NamespaceName(n) => {
                write!(f, "spec.namespaceName does not list namespace {n}")
            }
            Rejection::NamespaceAffinity(n) => {
                write!(
                    f,
                    "spec.namespaceAffinity does not match the labels of namespace {n}"
                )
            }
            Rejection::PodAffinity(p) => {
                write!(f, "spec.podAffinity does not match the labels of pod {p}")
            }
            Rejection::MultusName { nic, network: Some(n) } => {
                write!(f, "spec.multusName does not list network {n} of interface {nic}")
            }
            Rejection::MultusName { nic, network: None } => write!(
                f,
                "spec.multusName is set but interface {nic} has no Multus network (annotation v1.multus-cni.io/default-network or k8s.v1.cni.cncf.io/networks)"
            ),
            Rejection::Exhausted { used, total } => {
                write!(f, "exhausted ({used} of {total} addresses in use)")
            }
        }
    }
}

/// One pool that could not serve, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The pool.
    pub pool: String,
    /// Why.
    pub reason: Rejection,
}

fn list(rejected: &[Rejected]) -> String {
    rejected
        .iter()
        .map(|r| format!("{}: {}", r.pool, r.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a NIC got no address.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AllocError {
    /// No source names a pool.
    #[error("no IPPool for pod {pod} interface {nic}: no ipam.spidernet.io/ippool annotation, no default_ipv4_ippool/default_ipv6_ippool in the CNI config, and no SpiderIPPool with spec.default: true")]
    NoSource {
        /// `namespace/name`.
        pod: String,
        /// Interface.
        nic: String,
    },
    /// A source names a pool that does not exist.
    #[error("IPPool {pool:?} named by {named_by} does not exist")]
    PoolNotFound {
        /// The missing pool.
        pool: String,
        /// Who named it.
        named_by: Source,
    },
    /// The source's wildcards match no pool of the family.
    #[error("no {family} IPPool matches {patterns:?} named by {named_by}")]
    NoMatch {
        /// The family.
        family: IpFamily,
        /// The names as listed.
        patterns: Vec<String>,
        /// Who listed them.
        named_by: Source,
    },
    /// A pool-name wildcard does not parse.
    #[error("pool name pattern {pattern:?} is not a valid wildcard: {why}")]
    BadWildcard {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        why: String,
    },
    /// Every candidate of one family was filtered out.
    #[error("no {family} IPPool fits pod {pod} on node {node}: {}", list(.rejected))]
    NoFit {
        /// The family.
        family: IpFamily,
        /// `namespace/name`.
        pod: String,
        /// The node.
        node: String,
        /// Each candidate with its reason.
        rejected: Vec<Rejected>,
    },
    /// Every candidate of one family is full.
    #[error("all {family} IPPools for pod {pod} are exhausted: {}", list(.rejected))]
    Exhausted {
        /// The family.
        family: IpFamily,
        /// `namespace/name`.
        pod: String,
        /// Each candidate with its reason.
        rejected: Vec<Rejected>,
    },
}

/// The pools one family of one NIC may draw from, best first.
#[derive(Debug, Clone)]
pub struct FamilyPlan<'p> {
    /// The family.
    pub family: IpFamily,
    /// Candidates that passed every filter, in the order to try.
    pub pools: Vec<&'p Pool>,
    /// Candidates filtered out, with reasons.
    pub rejected: Vec<Rejected>,
}

/// The candidates for one NIC.
#[derive(Debug, Clone)]
pub struct Plan<'p> {
    /// The winning source.
    pub source: Source,
    /// One entry per family requested, IPv4 first.
    pub families: Vec<FamilyPlan<'p>>,
    /// Whether to leave out the default route.
    pub clean_gateway: bool,
}

impl Request {
    fn pod_key(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }

    /// Runs every filter on `pool`; `None` when it may serve this request.
    pub fn reject(&self, pool: &Pool, family: IpFamily) -> Option<Rejection> {
        if pool.terminating {
            return Some(Rejection::Terminating);
        }
        if pool.disable {
            return Some(Rejection::Disabled);
        }
        if pool.family != family {
            return Some(Rejection::WrongFamily(family));
        }
        if !pool.node_name.is_empty() {
            if !pool.node_name.contains(&self.node) {
                return Some(Rejection::NodeName(self.node.clone()));
            }
        } else if let Some(sel) = &pool.node_affinity {
            if !sel.matches(&self.node_labels) {
                return Some(Rejection::NodeAffinity(self.node.clone()));
            }
        }
        if !pool.namespace_name.is_empty() {
            if !pool.namespace_name.contains(&self.namespace) {
                return Some(Rejection::NamespaceName(self.namespace.clone()));
            }
        } else if let Some(sel) = &pool.namespace_affinity {
            if !sel.matches(&self.namespace_labels) {
                return Some(Rejection::NamespaceAffinity(self.namespace.clone()));
            }
        }
        if let Some(sel) = &pool.pod_affinity {
            if !sel.matches(&self.pod_labels) {
                return Some(Rejection::PodAffinity(self.pod_key()));
            }
        }
        if !pool.multus_name.is_empty() {
            let listed = self
                .multus_network
                .as_deref()
                .is_some_and(|net| pool.multus_name.iter().any(|m| multus_matches(m, net)));
            if !listed {
                return Some(Rejection::MultusName {
                    nic: self.nic.clone(),
                    network: self.multus_network.clone(),
                });
            }
        }
        None
    }

    /// Chooses the source and the ordered, filtered candidates of each family.
    pub fn plan<'p>(&self, pools: &'p [Pool]) -> Result<Plan<'p>, AllocError> {
        let by_name: BTreeMap<&str, &Pool> = pools.iter().map(|p| (p.name.as_str(), p)).collect();
        let defaults = || PoolNames {
            v4: pools
                .iter()
                .filter(|p| p.default && p.family == IpFamily::V4)
                .map(|p| p.name.clone())
                .collect(),
            v6: pools
                .iter()
                .filter(|p| p.default && p.family == IpFamily::V6)
                .map(|p| p.name.clone())
                .collect(),
            clean_gateway: None,
        };
        let nonempty = |n: &Option<PoolNames>| n.as_ref().filter(|n| !n.is_empty()).cloned();
        let (source, names) = if let Some(n) = nonempty(&self.auto_pools) {
            (Source::AutoPool, n)
        } else if let Some(n) = nonempty(&self.pod_ippools) {
            (Source::PodIppools, n)
        } else if let Some(n) = nonempty(&self.pod_ippool) {
            (Source::PodIppool, n)
        } else if let Some(n) = nonempty(&self.namespace_default) {
            (Source::NamespaceDefault, n)
        } else if !self.cni_default.is_empty() {
            (Source::CniConfig, self.cni_default.clone())
        } else {
            (Source::ClusterDefault, defaults())
        };
        if names.is_empty() {
            return Err(AllocError::NoSource {
                pod: self.pod_key(),
                nic: self.nic.clone(),
            });
        }
        let mut families = Vec::new();
        for family in [IpFamily::V4, IpFamily::V6] {
            let wanted = names.family(family);
            if wanted.is_empty() {
                continue;
            }
            let mut fp = FamilyPlan {
                family,
                pools: Vec::new(),
                rejected: Vec::new(),
            };
            let expanded = expand_wildcards(wanted, pools, family)?;
            if expanded.is_empty() {
                return Err(AllocError::NoMatch {
                    family,
                    patterns: wanted.to_vec(),
                    named_by: source,
                });
            }
            for name in &expanded {
                let pool = by_name
                    .get(name.as_str())
                    .ok_or_else(|| AllocError::PoolNotFound {
                        pool: name.clone(),
                        named_by: source,
                    })?;
                if fp.pools.iter().any(|p| p.name == pool.name) {
                    continue;
                }
                match self.reject(pool, family) {
                    None => fp.pools.push(pool),
                    Some(reason) => fp.rejected.push(Rejected {
                        pool: name.clone(),
                        reason,
                    }),
                }
            }
            if fp.pools.is_empty() {
                return Err(AllocError::NoFit {
                    family,
                    pod: self.pod_key(),
                    node: self.node.clone(),
                    rejected: fp.rejected,
                });
            }
            // Stable: pools of equal strength keep the order their source listed them in.
            fp.pools
                .sort_by_key(|p| std::cmp::Reverse(affinity_strength(p)));
            families.push(fp);
        }
        Ok(Plan {
            source,
            families,
            clean_gateway: names.clean_gateway.unwrap_or(self.cni_clean_gateway),
        })
    }
}

/// Whether a `spec.multusName` entry names `network` (`namespace/name`). A bare entry matches
/// the network's name in any namespace.
fn multus_matches(entry: &str, network: &str) -> bool {
    if entry.contains('/') {
        entry == network
    } else {
        network.rsplit('/').next() == Some(entry)
    }
}

/// Whether a pool name is a shell wildcard (`*`, `?`, `[...]`).
pub fn is_wildcard(name: &str) -> bool {
    name.contains(['*', '?', '['])
}

/// The names with every wildcard replaced by the matching pools of `family`, in name order.
/// A wildcard that matches nothing contributes nothing; a malformed one is an error.
pub fn expand_wildcards(
    names: &[String],
    pools: &[Pool],
    family: IpFamily,
) -> Result<Vec<String>, AllocError> {
    let mut out = Vec::new();
    for name in names {
        if !is_wildcard(name) {
            out.push(name.clone());
            continue;
        }
        let pattern = glob::Pattern::new(name).map_err(|e| AllocError::BadWildcard {
            pattern: name.clone(),
            why: e.msg.to_string(),
        })?;
        let mut matched: Vec<&str> = pools
            .iter()
            .filter(|p| p.family == family && pattern.matches(&p.name))
            .map(|p| p.name.as_str())
            .collect();
        matched.sort_unstable();
        out.extend(matched.into_iter().map(str::to_string));
    }
    Ok(out)
}

/// How specifically a pool is bound to the request: podAffinity > nodeName > nodeAffinity >
/// namespaceName > namespaceAffinity > multusName.
pub fn affinity_strength(pool: &Pool) -> u8 {
    let mut s = 0;
    if pool.pod_affinity.is_some() {
        s |= 1 << 5;
    }
    if !pool.node_name.is_empty() {
        s |= 1 << 4;
    } else if pool.node_affinity.is_some() {
        s |= 1 << 3;
    }
    if !pool.namespace_name.is_empty() {
        s |= 1 << 2;
    } else if pool.namespace_affinity.is_some() {
        s |= 1 << 1;
    }
    if !pool.multus_name.is_empty() {
        s |= 1;
    }
    s
}

/// The lowest address of `pool` that is usable, not reserved and not in use.
pub fn lowest_free(pool: &Pool, reserved: &IpSet, in_use: &IpSet) -> Option<IpAddr> {
    free_set(pool, reserved, in_use).first(pool.family)
}

/// The free addresses of `pool`: usable, not reserved, not in use.
pub fn free_set(pool: &Pool, reserved: &IpSet, in_use: &IpSet) -> IpSet {
    pool.usable().difference(reserved).difference(in_use)
}

/// How an allocator that keeps losing races for addresses picks among the free ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    /// `(index, count)`: the allocator's stripe, the addresses whose value is `index` modulo
    /// `count`. Allocators given different indexes never pick the same address from it.
    pub stripe: Option<(u32, u32)>,
    /// Once the stripe has no free address left: which free address to take (modulo their
    /// number), so allocators given different numbers still spread out.
    pub random: u64,
}

/// The address to take from `pool`: the lowest free one, or, for an allocator that keeps
/// losing races (`spread`), the lowest free one of its stripe, else a free one chosen by its
/// random number: racing allocators then stop colliding on the same addresses again and again.
pub fn free_at(
    pool: &Pool,
    reserved: &IpSet,
    in_use: &IpSet,
    spread: Option<Spread>,
) -> Option<IpAddr> {
    let Some(spread) = spread else {
        return lowest_free(pool, reserved, in_use);
    };
    let free = free_set(pool, reserved, in_use);
    if let Some((index, count)) = spread.stripe.filter(|&(_, n)| n > 1) {
        if let Some(ip) = free.first_in_stripe(pool.family, index.into(), count.into()) {
            return Some(ip);
        }
    }
    if free.is_empty() {
        return None;
    }
    free.nth_or_last(pool.family, u128::from(spread.random) % free.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ippool::tests::mk_pool;
    use crate::selector::{LabelSelector, Requirement};

    fn zone(value: &str) -> Option<LabelSelector> {
        Some(LabelSelector {
            match_labels: Default::default(),
            match_expressions: vec![Requirement {
                key: "node-subnet".into(),
                operator: "In".into(),
                values: vec![value.into()],
            }],
        })
    }

    fn seed_pools() -> Vec<Pool> {
        let mut p6 = mk_pool("test-ippool-6", "10.6.0.0/16", &["10.6.168.60-10.6.168.69"]);
        p6.node_affinity = zone("subnet-6");
        let mut p7 = mk_pool("test-ippool-7", "10.7.0.0/16", &["10.7.168.60-10.7.168.69"]);
        p7.node_affinity = zone("subnet-7");
        vec![p6, p7]
    }

    fn names(v4: &[&str], v6: &[&str]) -> PoolNames {
        PoolNames {
            v4: v4.iter().map(|s| s.to_string()).collect(),
            v6: v6.iter().map(|s| s.to_string()).collect(),
            clean_gateway: None,
        }
    }

    fn on_node(node: &str, subnet: &str) -> Request {
        Request {
            nic: "eth0".into(),
            namespace: "default".into(),
            pod: "test-app-x".into(),
            node: node.into(),
            node_labels: [("node-subnet".to_string(), subnet.to_string())].into(),
            pod_ippool: Some(names(&["test-ippool-6", "test-ippool-7"], &[])),
            ..Default::default()
        }
    }

    fn plan_names(plan: &Plan<'_>) -> Vec<Vec<String>> {
        plan.families
            .iter()
            .map(|f| f.pools.iter().map(|p| p.name.clone()).collect())
            .collect()
    }

    #[test]
    fn pool_group_follows_the_node_zone() {
        let pools = seed_pools();
        let plan = on_node("controller-node-1", "subnet-6")
            .plan(&pools)
            .unwrap();
        assert_eq!(plan.source, Source::PodIppool);
        assert_eq!(plan_names(&plan), [["test-ippool-6"]]);
        assert_eq!(
            plan.families[0].rejected,
            [Rejected {
                pool: "test-ippool-7".into(),
                reason: Rejection::NodeAffinity("controller-node-1".into())
            }]
        );
        let plan = on_node("worker-node-1", "subnet-7").plan(&pools).unwrap();
        assert_eq!(plan_names(&plan), [["test-ippool-7"]]);
    }

    #[test]
    fn no_fitting_pool_lists_every_pool_with_its_reason() {
        let pools = seed_pools();
        let err = on_node("edge-1", "subnet-9").plan(&pools).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no IPv4 IPPool fits pod default/test-app-x on node edge-1: \
             test-ippool-6: spec.nodeAffinity does not match the labels of node edge-1; \
             test-ippool-7: spec.nodeAffinity does not match the labels of node edge-1"
        );
    }

    #[test]
    fn sources_by_priority() {
        let mut pools = seed_pools();
        let mut d = mk_pool("default-v4", "10.9.0.0/16", &["10.9.0.10-10.9.0.20"]);
        d.default = true;
        pools.push(d);
        let mut d6 = mk_pool("default-v6", "fd00:9::/64", &["fd00:9::10-fd00:9::20"]);
        d6.default = true;
        pools.push(d6);
        pools.push(mk_pool("cni-v4", "10.10.0.0/16", &["10.10.0.1"]));

        let mut req = on_node("controller-node-1", "subnet-6");
        assert_eq!(req.plan(&pools).unwrap().source, Source::PodIppool);
        req.pod_ippool = None;
        req.cni_default = names(&["cni-v4"], &[]);
        let plan = req.plan(&pools).unwrap();
        assert_eq!(
            (plan.source, plan_names(&plan)),
            (Source::CniConfig, vec![vec!["cni-v4".to_string()]])
        );
        req.cni_default = PoolNames::default();
        let plan = req.plan(&pools).unwrap();
        assert_eq!(plan.source, Source::ClusterDefault);
        assert_eq!(plan_names(&plan), [["default-v4"], ["default-v6"]]);
        assert_eq!(plan.families[1].family, IpFamily::V6);

        let none = Request::default().plan(&seed_pools()).unwrap_err();
        assert!(matches!(none, AllocError::NoSource { .. }), "{none}");
    }

    #[test]
    fn every_source_in_priority_order() {
        let pools = vec![
            mk_pool("a", "10.1.0.0/16", &["10.1.0.1"]),
            mk_pool("b", "10.2.0.0/16", &["10.2.0.1"]),
            mk_pool("c", "10.3.0.0/16", &["10.3.0.1"]),
            mk_pool("d", "10.4.0.0/16", &["10.4.0.1"]),
        ];
        let mut req = on_node("n", "s");
        req.pod_ippools = Some(names(&["a"], &[]));
        req.pod_ippool = Some(names(&["b"], &[]));
        req.namespace_default = Some(names(&["c"], &[]));
        req.cni_default = names(&["d"], &[]);
        let want = [
            (Source::PodIppools, "a"),
            (Source::PodIppool, "b"),
            (Source::NamespaceDefault, "c"),
            (Source::CniConfig, "d"),
        ];
        for (source, pool) in want {
            let plan = req.plan(&pools).unwrap();
            assert_eq!(
                (plan.source, plan_names(&plan)),
                (source, vec![vec![pool.to_string()]])
            );
            match source {
                Source::PodIppools => req.pod_ippools = None,
                Source::PodIppool => req.pod_ippool = None,
                Source::NamespaceDefault => req.namespace_default = Some(PoolNames::default()),
                _ => {}
            }
        }
    }

    #[test]
    fn wildcards_expand_against_pools_of_the_family() {
        let pools = vec![
            mk_pool("ns-b-v4", "10.2.0.0/16", &["10.2.0.1"]),
            mk_pool("ns-a-v4", "10.1.0.0/16", &["10.1.0.1"]),
            mk_pool("ns-a-v6", "fd00::/64", &["fd00::1"]),
            mk_pool("other", "10.3.0.0/16", &["10.3.0.1"]),
        ];
        let mut req = on_node("n", "s");
        req.pod_ippool = Some(names(&["other", "ns-*-v?"], &["ns-[a]-*"]));
        let plan = req.plan(&pools).unwrap();
        assert_eq!(
            plan_names(&plan),
            [vec!["other", "ns-a-v4", "ns-b-v4"], vec!["ns-a-v6"]]
        );
        req.pod_ippool = Some(names(&["zz*"], &[]));
        let err = req.plan(&pools).unwrap_err().to_string();
        assert_eq!(
            err,
            "no IPv4 IPPool matches [\"zz*\"] named by pod annotation ipam.spidernet.io/ippool"
        );
        req.pod_ippool = Some(names(&["[a"], &[]));
        let err = req.plan(&pools).unwrap_err().to_string();
        assert!(
            err.starts_with("pool name pattern \"[a\" is not a valid wildcard"),
            "{err}"
        );
    }

    #[test]
    fn multus_name_filters_only_pools_that_set_it() {
        let mut with = mk_pool("with", "10.1.0.0/16", &["10.1.0.1"]);
        with.multus_name = vec!["kube-system/macvlan-conf".into()];
        let mut bare = mk_pool("bare", "10.2.0.0/16", &["10.2.0.1"]);
        bare.multus_name = vec!["ipvlan-conf".into()];
        let plain = mk_pool("plain", "10.3.0.0/16", &["10.3.0.1"]);
        let pools = vec![with, bare, plain];
        let mut req = on_node("n", "s");
        req.pod_ippool = Some(names(&["plain", "with", "bare"], &[]));
        req.multus_network = Some("kube-system/macvlan-conf".into());
        let plan = req.plan(&pools).unwrap();
        // multusName is a (weak) binding: it goes before the pool without one.
        assert_eq!(plan_names(&plan), [["with", "plain"]]);
        assert_eq!(
            plan.families[0].rejected[0].reason.to_string(),
            "spec.multusName does not list network kube-system/macvlan-conf of interface eth0"
        );
        req.multus_network = Some("default/ipvlan-conf".into());
        assert_eq!(plan_names(&req.plan(&pools).unwrap()), [["bare", "plain"]]);
        req.multus_network = None;
        assert_eq!(plan_names(&req.plan(&pools).unwrap()), [["plain"]]);
    }

    #[test]
    fn missing_pool_is_named() {
        let mut req = on_node("controller-node-1", "subnet-6");
        req.pod_ippool = Some(names(&["no-such-pool"], &[]));
        let err = req.plan(&seed_pools()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "IPPool \"no-such-pool\" named by pod annotation ipam.spidernet.io/ippool does not exist"
        );
    }

    #[test]
    fn filters_record_their_reasons() {
        let mut pools = seed_pools();
        pools[0].disable = true;
        pools[1].node_affinity = None;
        pools[1].node_name = vec!["other".into()];
        let mut v6 = mk_pool("v6", "fd00::/64", &["fd00::1"]);
        v6.terminating = false;
        pools.push(v6);
        let mut req = on_node("controller-node-1", "subnet-6");
        req.pod_ippool = Some(names(&["test-ippool-6", "test-ippool-7", "v6"], &[]));
        let AllocError::NoFit { rejected, .. } = req.plan(&pools).unwrap_err() else {
            panic!("want NoFit")
        };
        let reasons: Vec<_> = rejected.iter().map(|r| r.reason.clone()).collect();
        assert_eq!(
            reasons,
            [
                Rejection::Disabled,
                Rejection::NodeName("controller-node-1".into()),
                Rejection::WrongFamily(IpFamily::V4)
            ]
        );
    }

    #[test]
    fn node_name_replaces_node_affinity() {
        let mut pools = seed_pools();
        pools[1].node_name = vec!["controller-node-1".into()];
        let plan = on_node("controller-node-1", "subnet-6")
            .plan(&pools)
            .unwrap();
        // Both fit; nodeName is the stronger binding and goes first.
        assert_eq!(plan_names(&plan), [["test-ippool-7", "test-ippool-6"]]);
    }

    #[test]
    fn equal_strength_keeps_listed_order() {
        let pools = vec![
            mk_pool("b", "10.1.0.0/16", &["10.1.0.1"]),
            mk_pool("a", "10.2.0.0/16", &["10.2.0.1"]),
            mk_pool("c", "10.3.0.0/16", &["10.3.0.1"]),
        ];
        let mut req = on_node("n", "s");
        req.pod_ippool = Some(names(&["c", "a", "b"], &[]));
        assert_eq!(plan_names(&req.plan(&pools).unwrap()), [["c", "a", "b"]]);
    }

    #[test]
    fn contended_allocators_take_from_their_stripe_then_anywhere() {
        let p = mk_pool("p", "10.6.0.0/16", &["10.6.0.0-10.6.0.99"]);
        let used = IpSet::parse_list(&["10.6.0.0-10.6.0.9", "10.6.0.13"], None).unwrap();
        let none = IpSet::new();
        let at = |stripe, random| {
            free_at(&p, &none, &used, Some(Spread { stripe, random }))
                .unwrap()
                .to_string()
        };
        assert_eq!(
            free_at(&p, &none, &used, None).unwrap().to_string(),
            "10.6.0.10",
            "uncontended: the lowest free"
        );
        assert_eq!(at(Some((0, 4)), 0), "10.6.0.12");
        assert_eq!(at(Some((1, 4)), 0), "10.6.0.17", "10.6.0.13 is held");
        assert_eq!(at(Some((3, 4)), 0), "10.6.0.11");
        assert_eq!(at(Some((0, 1)), 5), "10.6.0.16", "one stripe is no stripe");
        // No stripe, or none of it free: the random-th free address, wrapping around.
        assert_eq!(at(None, 22), "10.6.0.33");
        assert_eq!(at(None, 89), "10.6.0.10", "89 are free");
        let stripe_full = IpSet::parse_list(&["10.6.0.0-10.6.0.98"], None).unwrap();
        let last = free_at(
            &p,
            &none,
            &stripe_full,
            Some(Spread {
                stripe: Some((0, 2)),
                random: 7,
            }),
        );
        assert_eq!(last.unwrap().to_string(), "10.6.0.99");
        let all = IpSet::parse_list(&["10.6.0.0-10.6.0.99"], None).unwrap();
        assert_eq!(
            free_at(
                &p,
                &none,
                &all,
                Some(Spread {
                    stripe: Some((1, 2)),
                    random: 7
                })
            ),
            None
        );
    }

    #[test]
    fn lowest_free_skips_excluded_reserved_and_used() {
        let mut p = mk_pool("p", "10.6.0.0/16", &["10.6.168.60-10.6.168.69"]);
        p.exclude = IpSet::parse_list(&["10.6.168.60"], None).unwrap();
        let reserved = IpSet::parse_list(&["10.6.168.61"], None).unwrap();
        let used = IpSet::parse_list(&["10.6.168.62-10.6.168.63"], None).unwrap();
        assert_eq!(
            lowest_free(&p, &reserved, &used),
            Some("10.6.168.64".parse().unwrap())
        );
        let all = IpSet::parse_list(&["10.6.168.60-10.6.168.69"], None).unwrap();
        assert_eq!(lowest_free(&p, &reserved, &all), None);
    }
}
