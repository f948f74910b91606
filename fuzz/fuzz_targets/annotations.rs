//! Every annotation parser of `spiderpool_api::annotation` on one value. The input is the NIC
//! being added on its first line (`eth0`, `net1`, …) and the annotation's value after it, so a
//! corpus file reads like what a pod carries:
//!
//! ```text
//! net1
//! [{"interface":"eth0","ipv4":["a"]},{"interface":"net1","ipv4":["b"]}]
//! ```
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use spiderpool_api::annotation;
use spiderpool_api::keys::{MULTUS_DEFAULT_NETWORK, MULTUS_NETWORKS};

fuzz_target!(|data: &[u8]| {
    // Annotations are Kubernetes strings: UTF-8 or nothing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (nic, value) = text.split_once('\n').unwrap_or(("eth0", text));

    let _ = annotation::parse_ippool(value);
    let _ = annotation::parse_ippools(value, nic);
    let _ = annotation::parse_routes(value);
    let _ = annotation::positional_index(nic);
    let _ = annotation::parse_namespace_default(Some(value), None);
    let _ = annotation::parse_namespace_default(None, Some(value));
    let _ = annotation::parse_namespace_default(Some(value), Some(value));

    let mut pod = BTreeMap::new();
    pod.insert(MULTUS_DEFAULT_NETWORK.to_string(), value.to_string());
    pod.insert(MULTUS_NETWORKS.to_string(), value.to_string());
    let cluster = annotation::MultusDefaults {
        cluster_network: Some(value.to_string()),
        namespace: Some("kube-system".into()),
    };
    for nic in [nic, "eth0", "net1"] {
        let _ = annotation::multus_network(&pod, "default", nic, &Default::default());
        let _ = annotation::multus_network(&BTreeMap::new(), "default", nic, &cluster);
    }
});
