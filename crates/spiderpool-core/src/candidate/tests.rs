//! Candidate selection, table by table: sources, filters, order, and the pick.

use super::*;
use crate::ippool::tests::mk_pool;
use crate::ipset::IpSet;
use crate::pick::{free_at, lowest_free, Spread};
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
