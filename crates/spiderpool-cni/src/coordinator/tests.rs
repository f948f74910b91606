//! The coordinator's pure parts, without a network namespace.

use std::net::IpAddr;

use serde_json::json;
use spiderpool_api::agent::CoordinatorConfig;

use super::*;

#[test]
fn host_names_are_stable_short_and_distinct() {
    let a = host_veth_name("abc", "eth0");
    assert_eq!(a, host_veth_name("abc", "eth0"));
    assert_eq!(a.len(), 15);
    assert!(a.starts_with("veth"));
    assert_ne!(a, host_veth_name("abc", "net1"));
    assert_ne!(a, host_veth_name("abd", "eth0"));
}

#[test]
fn the_configs_keys_win_over_the_agents_and_bad_ones_are_named() {
    let agent = CoordinatorConfig {
        mode: "underlay".into(),
        service_cidr: vec!["10.233.0.0/18".into()],
        hijack_cidr: vec!["169.254.25.10/32".into()],
        veth_mtu: 1500,
        ..Default::default()
    };
    let s = Settings::merge(Some(&agent), &json!({"vethMTU": 9000})).unwrap();
    assert_eq!(s.mode, "underlay");
    assert_eq!(
        s.service_cidr,
        ["10.233.0.0/18".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(s.veth_mtu, 9000);
    // The seed's veth plugin keys, without any SpiderCoordinator.
    let s = Settings::merge(None, &json!({"service_cidr": ["10.233.0.0/18"]})).unwrap();
    assert_eq!((s.mode.as_str(), s.service_cidr.len()), ("auto", 1));
    for (conf, want) in [
        (
            json!({"service_cidr": ["10.233.0.0/33"]}),
            "service_cidr: \"10.233.0.0/33\" is not a CIDR",
        ),
        (
            json!({"service_cidr": "10.233.0.0/18"}),
            "service_cidr: \"10.233.0.0/18\" is not a list of CIDRs",
        ),
        (json!({"mode": "bridge"}), "mode: \"bridge\" is not one of"),
        (
            json!({"vethMTU": 10}),
            "vethMTU: 10 is not a whole number from 68 to 65535",
        ),
        (
            json!({"podRPFilter": 3}),
            "podRPFilter: 3 is not a whole number",
        ),
    ] {
        let e = Settings::merge(None, &conf).unwrap_err();
        assert_eq!(e.code, code::INVALID_NETWORK_CONFIG);
        assert!(e.msg.contains(want), "{conf}: {}", e.msg);
    }
}

#[test]
fn the_pod_mac_is_the_prefix_and_the_addresss_last_four_bytes() {
    let ips: Vec<IpAddr> = vec![
        "fd00::a:b0c".parse().unwrap(),
        "10.6.168.60".parse().unwrap(),
    ];
    assert_eq!(
        pod_mac([0x0a, 0x1b], &ips),
        Some([0x0a, 0x1b, 10, 6, 168, 60])
    );
    let v6: Vec<IpAddr> = vec!["fd00::a:b0c".parse().unwrap()];
    assert_eq!(
        pod_mac([0x0a, 0x1b], &v6),
        Some([0x0a, 0x1b, 0, 0x0a, 0x0b, 0x0c])
    );
    assert_eq!(pod_mac([0x0a, 0x1b], &[]), None);
}

#[test]
fn pod_routes_go_through_the_node_of_their_family() {
    let s = Settings::merge(
            None,
            &json!({"service_cidr": ["10.233.0.0/18", "fd00:233::/112"], "hijackCIDR": ["169.254.25.10"]}),
        )
        .unwrap();
    let node: IpAddr = "10.6.0.1".parse().unwrap();
    let r = pod_routes(
        &s,
        &["10.6.168.60".parse().unwrap()],
        &[node, "fd00::1".parse().unwrap()],
        7,
    );
    let shown: Vec<String> = r
        .iter()
        .map(|r| format!("{} {:?} {}", r.dst, r.via, r.oif))
        .collect();
    assert_eq!(
        shown,
        [
            "10.6.0.1/32 None 7",
            "10.233.0.0/18 Some(10.6.0.1) 7",
            "169.254.25.10/32 Some(10.6.0.1) 7"
        ]
    );
}

#[test]
fn overlay_mode_routes_the_cluster_through_the_other_nics_default_route() {
    use crate::netlink::{Route, MAIN_TABLE};
    let route = |dst: &str, oif: u32, via: Option<&str>| Route {
        dst: dst.parse().unwrap(),
        oif: Some(oif),
        table: MAIN_TABLE,
        via: via.map(|v| v.parse().unwrap()),
        src: None,
        unicast: true,
    };
    // eth0 (2) is the cluster CNI's with the default route; net1 (3) has its subnet only.
    let main = [
        route("0.0.0.0/0", 2, Some("10.233.65.1")),
        route("10.233.65.0/24", 2, None),
        route("10.6.0.0/16", 3, None),
    ];
    let defaults = overlay_defaults(&main, 3);
    let gw: IpAddr = "10.233.65.1".parse().unwrap();
    assert_eq!(defaults, [(true, 2, Some(gw))]);
    // For eth0 itself there is no other NIC's default route: not overlay.
    assert!(overlay_defaults(&main, 2).is_empty());
    let s = Settings::merge(
        None,
        &json!({"serviceCIDR": ["10.233.0.0/18"], "overlayPodCIDR": ["10.233.64.0/18", "fd00:64::/64"],
            "hijackCIDR": ["169.254.0.0/16"]}),
    )
    .unwrap();
    let node: IpAddr = "10.6.0.2".parse().unwrap();
    let dsts: Vec<(String, u32, Option<IpAddr>, u32)> = overlay_routes(&s, &[node], &defaults, 103)
        .into_iter()
        .map(|r| (r.dst.to_string(), r.oif, r.via, r.table))
        .collect();
    assert_eq!(
        dsts,
        [
            ("10.6.0.2/32".to_string(), 2, Some(gw), 103),
            ("10.233.0.0/18".into(), 2, Some(gw), 103),
            ("169.254.0.0/16".into(), 2, Some(gw), 103),
            ("10.233.64.0/18".into(), 2, Some(gw), 103),
        ],
        "IPv6 CIDRs need an IPv6 default route on eth0"
    );
}
