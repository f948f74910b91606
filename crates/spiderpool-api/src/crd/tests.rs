//! The Spider objects' conversions to the core rules and their messages.

use super::*;

fn pool(yaml: &str) -> SpiderIPPool {
    serde_norway::from_str(yaml).unwrap()
}

#[test]
fn seed_pool_converts() {
    let p = pool(
        "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: test-ippool-6}\nspec:\n  subnet: 10.6.0.0/16\n  ips: [10.6.168.60-10.6.168.69]\n  gateway: 10.6.0.1\n  nodeAffinity:\n    matchExpressions:\n    - {key: node-subnet, operator: In, values: [subnet-6]}\n",
    )
    .to_pool()
    .unwrap();
    assert_eq!(p.total_ip_count(), 10);
    assert_eq!(p.gateway, Some("10.6.0.1".parse().unwrap()));
    assert!(p.node_affinity.is_some());
}

#[test]
fn bad_values_are_named() {
    let cases = [
        ("spec: {subnet: 10.6.0.0/33}", "SpiderIPPool \"p\": spec.subnet \"10.6.0.0/33\" is not a CIDR like 10.6.0.0/16"),
        ("spec: {subnet: 10.6.0.0/16, ips: [10.6.0.9-10.6.0.1]}", "SpiderIPPool \"p\": spec.ips: IP range \"10.6.0.9-10.6.0.1\" is reversed"),
        ("spec: {subnet: 10.6.0.0/16, ips: [10.7.0.1]}", "pool \"p\": spec.ips 10.7.0.1 is outside subnet 10.6.0.0/16"),
        ("spec: {subnet: 10.6.0.0/16, ipVersion: 6}", "SpiderIPPool \"p\": spec.ipVersion \"6\" does not match spec.subnet 10.6.0.0/16"),
        ("spec: {subnet: 10.6.0.0/16, ipVersion: 5}", "SpiderIPPool \"p\": spec.ipVersion \"5\" must be 4 or 6"),
        ("spec: {subnet: 10.6.0.0/16, gateway: x}", "SpiderIPPool \"p\": spec.gateway \"x\" is not an IP address"),
        ("spec: {subnet: 10.6.0.0/16, ips: [fd00::1]}", "SpiderIPPool \"p\": spec.ips: \"fd00::1\" is not an IPv4 address"),
        ("spec: {ips: [10.6.0.1]}", "SpiderIPPool \"p\": spec.subnet \"\" is required"),
        (
            "spec: {subnet: 10.6.0.0/16, nodeAffinity: {matchExpressions: [{key: a, operator: Is}]}}",
            "SpiderIPPool \"p\": spec.nodeAffinity: matchExpressions key \"a\": unknown operator \"Is\"",
        ),
    ];
    for (spec, want) in cases {
        let mut p = pool(spec);
        p.metadata.name = "p".into();
        let err = p.to_pool().unwrap_err().to_string();
        assert!(err.starts_with(want), "{spec}: want {want:?}, got {err:?}");
    }
}

#[test]
fn subnet_errors_name_the_subnet() {
    let cases = [
        (
            "spec: {subnet: 10.6.0.0/33}",
            "SpiderSubnet \"s\": spec.subnet \"10.6.0.0/33\" is not a CIDR",
        ),
        (
            "spec: {subnet: 10.6.0.0/16, ips: [10.7.0.1]}",
            "subnet \"s\": spec.ips 10.7.0.1 is outside subnet 10.6.0.0/16",
        ),
    ];
    for (spec, want) in cases {
        let mut sub: SpiderSubnet = serde_norway::from_str(spec).unwrap();
        sub.metadata.name = "s".into();
        let err = sub.to_pool().unwrap_err().to_string();
        assert!(err.starts_with(want), "{spec}: want {want:?}, got {err:?}");
    }
}

#[test]
fn reserved_ip_family_from_first_entry() {
    let r: SpiderReservedIP =
        serde_norway::from_str("metadata: {name: r}\nspec: {ips: [fd00::5-fd00::6]}").unwrap();
    assert_eq!(r.to_set().unwrap().len(), 2);
    let r: SpiderReservedIP =
        serde_norway::from_str("metadata: {name: r}\nspec: {ips: [fd00::5, 10.0.0.1]}").unwrap();
    assert_eq!(
        r.to_set().unwrap_err().to_string(),
        "SpiderReservedIP \"r\": spec.ips: \"10.0.0.1\" is not an IPv6 address"
    );
}

#[test]
fn endpoints_stored_in_the_earlier_shape_read_in_upstreams() {
    let legacy = serde_json::json!({
        "apiVersion": API_VERSION, "kind": "SpiderEndpoint",
        "metadata": {"name": "p", "namespace": "default"},
        "status": {"uid": "u1", "node": "n1", "ownerControllerType": "Pod",
                   "ownerControllerName": "p",
                   "current": [{"interface": "eth0", "containerID": "c1",
                                "ipv4": "10.0.0.1/24", "ipv4Pool": "a"}]}
    });
    let o = crate::Object::from_value(crate::Kind::Endpoint, legacy).unwrap();
    let crate::Object::Endpoint(ep) = o else {
        panic!("not an endpoint")
    };
    assert_eq!(ep.status.current.uid, "u1");
    assert_eq!(ep.status.current.node, "n1");
    assert_eq!(ep.status.owner_controller_type, "Pod");
    assert_eq!(
        ep.status.current.ips[0].held(),
        [("a".to_string(), "10.0.0.1".parse().unwrap())]
    );
    // Upstream's shape: a record without containerID reads, and writes back unchanged.
    let upstream = serde_json::json!({
        "status": {"current": {"uid": "u2", "node": "n2", "ips": [
            {"interface": "eth0", "ipv4": "10.6.168.60/16", "ipv4Pool": "test-ippool-6",
             "ipv4Gateway": "10.6.0.1", "vlan": 0, "cleanGateway": false}]},
            "ownerControllerType": "DaemonSet", "ownerControllerName": "test-app"}
    });
    let ep: SpiderEndpoint = serde_json::from_value(upstream.clone()).unwrap();
    assert_eq!(ep.status.current.ips[0].container_id, "");
    assert_eq!(ep.status.current.ips[0].clean_gateway, Some(false));
    let back = serde_json::to_value(&ep).unwrap();
    assert_eq!(back["status"], upstream["status"]);
}
