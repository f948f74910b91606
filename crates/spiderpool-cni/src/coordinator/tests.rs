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
