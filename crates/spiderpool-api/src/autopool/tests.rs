use super::*;

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn reads_the_subnet_annotations() {
    let c = config(&annotations(&[(
        SUBNET,
        r#"{"ipv4": ["subnet-6", "ignored"]}"#,
    )]))
    .unwrap()
    .unwrap();
    assert_eq!(
        c.subnets,
        [SubnetChoice {
            interface: "eth0".into(),
            v4: Some("subnet-6".into()),
            v6: None
        }]
    );
    assert!(c.reclaim);
    assert_eq!(c.desired(2, 1), 3);
    let c = config(&annotations(&[
        (
            SUBNETS,
            r#"[{"interface":"eth0","ipv4":["a"]},{"interface":"net1","ipv4":["b"]}]"#,
        ),
        (SUBNET, r#"{"ipv4":["ignored"]}"#),
        (IPPOOL_IP_NUMBER, "5"),
        (IPPOOL_RECLAIM, "false"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(c.nic("net1").unwrap().v4.as_deref(), Some("b"));
    assert_eq!((c.desired(9, 1), c.reclaim), (5, false));
    assert_eq!(config(&BTreeMap::new()).unwrap(), None);
}

#[test]
fn bad_subnet_annotations_are_named() {
    let err = |pairs: &[(&str, &str)]| config(&annotations(pairs)).unwrap_err().to_string();
    let e = err(&[(
        SUBNETS,
        r#"[{"interface":"eth0","ipv4":["a"]},{"interface":"eth0","ipv4":["b"]}]"#,
    )]);
    assert!(e.contains("interface \"eth0\" is listed twice"), "{e}");
    let e = err(&[(
        SUBNETS,
        r#"[{"interface":"eth0","ipv4":["a"]},{"interface":"net1","ipv4":["a"]}]"#,
    )]);
    assert!(e.contains("subnet \"a\" serves two interfaces"), "{e}");
    let e = err(&[(SUBNET, r#"{"ipv4": []}"#)]);
    assert!(e.contains("names no subnet"), "{e}");
    let e = err(&[(SUBNET, "subnet-6")]);
    assert!(
        e.starts_with("annotation ipam.spidernet.io/subnet \"subnet-6\""),
        "{e}"
    );
    let e = err(&[(SUBNET, r#"{"ipv4": ["a"]}"#), (IPPOOL_IP_NUMBER, "++1")]);
    assert!(e.contains("\"++1\" is neither"), "{e}");
    let e = err(&[(SUBNET, r#"{"ipv4": ["a"]}"#), (IPPOOL_IP_NUMBER, "-1")]);
    assert!(e.contains("\"-1\""), "{e}");
    let e = err(&[(SUBNET, r#"{"ipv4": ["a"]}"#), (IPPOOL_RECLAIM, "yes")]);
    assert!(e.contains("\"yes\" is not a boolean"), "{e}");
}

#[test]
fn ip_numbers() {
    assert_eq!(parse_ip_number("+2").unwrap(), IpNumber::Flexible(2));
    assert_eq!(parse_ip_number("7").unwrap(), IpNumber::Fixed(7));
    assert_eq!(IpNumber::Flexible(0).to_string(), "+0");
    assert!(parse_ip_number("").is_err());
    assert!(parse_ip_number("+").is_err());
}

#[test]
fn names_labels_and_affinity() {
    let app = App {
        group: "apps".into(),
        version: "v1".into(),
        kind: "Deployment".into(),
        namespace: "default".into(),
        name: "Web".into(),
        uid: "0b6c9f2e-aaaa-bbbb-cccc-9a2b3c4d5e6f".into(),
    };
    assert_eq!(app.pool_name(IpFamily::V4, "eth0"), "auto4-web-eth0-9a2b3");
    assert_eq!(app.application(), "apps_v1_Deployment_default_Web");
    let labels = app.pool_labels(IpFamily::V6, "net1", false);
    assert_eq!(labels[LABEL_APP_GV], "apps_v1");
    assert_eq!(labels[LABEL_IP_VERSION], "IPv6");
    assert_eq!(labels[LABEL_RECLAIM], "false");
    assert!(app.is_affinity(Some(&app.affinity())));
    let long = App {
        name: "a".repeat(300),
        ..app.clone()
    };
    let name = long.pool_name(IpFamily::V4, "eth0");
    assert_eq!(name.len(), 253);
    assert!(name.ends_with("-eth0-9a2b3"));
    assert_eq!(
        long.pool_labels(IpFamily::V4, "eth0", true)[LABEL_APP_NAME].len(),
        63
    );
    let core = App {
        group: String::new(),
        version: "v1".into(),
        kind: "Pod".into(),
        ..app
    };
    assert_eq!(core.application(), "v1_Pod_default_Web");
    assert_eq!(core.affinity_labels()[APP_API_GROUP], "");
}

#[test]
fn replicas_by_kind() {
    let w = |kind: &str, spec: Value, status: Value| KubeObject {
        kind: kind.into(),
        spec,
        status,
        ..Default::default()
    };
    use serde_json::json;
    assert_eq!(
        replicas(&w("Deployment", json!({"replicas": 3}), Value::Null)),
        3
    );
    assert_eq!(replicas(&w("StatefulSet", json!({}), Value::Null)), 1);
    assert_eq!(
        replicas(&w(
            "DaemonSet",
            json!({}),
            json!({"desiredNumberScheduled": 4})
        )),
        4
    );
    assert_eq!(
        replicas(&w(
            "Job",
            json!({"completions": 0, "parallelism": 2}),
            Value::Null
        )),
        1
    );
    assert_eq!(
        replicas(&w("Job", json!({"parallelism": 2}), Value::Null)),
        2
    );
    assert_eq!(
        replicas(&w(
            "CronJob",
            json!({"jobTemplate": {"spec": {"completions": 5}}}),
            Value::Null
        )),
        5
    );
}

#[test]
fn a_third_partys_key_names_its_group_so_it_is_never_a_built_in_kind() {
    let app = |api_version: &str, kind: &str| {
        let (group, version) = split_api_version(api_version);
        App {
            group,
            version,
            kind: kind.into(),
            namespace: "default".into(),
            name: "web".into(),
            uid: "u".into(),
        }
    };
    assert_eq!(
        app("apps/v1", "StatefulSet").key(),
        "default/StatefulSet/web"
    );
    let kruise = app("apps.kruise.io/v1beta1", "StatefulSet");
    assert!(!kruise.built_in());
    assert_eq!(
        kruise.key(),
        "default/StatefulSet.v1beta1.apps.kruise.io/web"
    );
    assert_eq!(
        split_key_kind("StatefulSet.v1beta1.apps.kruise.io"),
        ("StatefulSet", Some(("v1beta1", "apps.kruise.io")))
    );
    assert_eq!(split_key_kind("Deployment"), ("Deployment", None));
    assert_eq!(
        app("v1", "ReplicationController").key(),
        "default/ReplicationController.v1/web"
    );
    assert_eq!(
        split_key_kind("ReplicationController.v1"),
        ("ReplicationController", Some(("v1", "")))
    );
    // The affinity of its pools gives the same key back.
    let back = App::from_affinity(&kruise.affinity_labels()).unwrap();
    assert_eq!(back.key(), kruise.key());
}
