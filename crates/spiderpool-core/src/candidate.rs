//! Which pools may serve one NIC of one pod, in which order: the candidate sources by priority
//! (pod annotation, CNI config, cluster defaults), the filters (each with a recorded reason),
//! the ordering by affinity strength. The pick inside a pool is [`crate::pick`].

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

use crate::ippool::Pool;
use crate::ipset::IpFamily;
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
    /// Its holders cannot be read (a corrupt status): the next pool of the group is tried.
    Unreadable(String),
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
            Rejection::Unreadable(why) => write!(f, "its holders cannot be read: {why}"),
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

#[cfg(test)]
mod tests;
