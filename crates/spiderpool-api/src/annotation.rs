//! Pod and namespace annotations of Spiderpool and Multus, and their parsed values.

use serde::Deserialize;
use spiderpool_core::PoolNames;

use crate::keys::{
    IPPOOL, IPPOOLS, MULTUS_DEFAULT_NETWORK, MULTUS_NETWORKS, NS_DEFAULT_IPV4, NS_DEFAULT_IPV6,
    ROUTES,
};
use crate::ValidationError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IppoolValue {
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    ipv4: Vec<String>,
    #[serde(default)]
    ipv6: Vec<String>,
    #[serde(default)]
    cleangateway: Option<bool>,
}

/// At most this many characters of an input are quoted in an error (an annotation may hold
/// hundreds of kilobytes; the error goes into CNI results and logs).
const QUOTED: usize = 200;

/// `value` (trimmed) quoted for an error, cut to [`QUOTED`] characters with its full length said.
fn quoted(value: &str) -> String {
    let v = value.trim();
    if v.chars().count() <= QUOTED {
        return format!("{v:?}");
    }
    let head: String = v.chars().take(QUOTED).collect();
    format!("{head:?}… ({} bytes in all)", v.len())
}

/// A parser's message, which may itself quote the input, cut to a few hundred characters.
fn bounded(message: &str) -> String {
    if message.chars().count() <= 2 * QUOTED {
        return message.to_string();
    }
    let head: String = message.chars().take(2 * QUOTED).collect();
    format!("{head}…")
}

/// Parses the value of `ipam.spidernet.io/ippool`, e.g. `{"ipv4": ["test-ippool-6"]}`.
pub fn parse_ippool(value: &str) -> Result<PoolNames, ValidationError> {
    let v: IppoolValue = serde_json::from_str(value).map_err(|e| {
        ValidationError::Invalid(format!(
            "pod annotation {IPPOOL}: {} in {} (want e.g. {{\"ipv4\": [\"pool-a\"], \"ipv6\": [\"pool-b\"]}})",
            bounded(&e.to_string()),
            quoted(value)
        ))
    })?;
    let _ = v.interface;
    Ok(PoolNames {
        v4: v.ipv4,
        v6: v.ipv6,
        clean_gateway: v.cleangateway,
    })
}

/// Parses `ipam.spidernet.io/ippools` and returns the entry for `nic`. Entries either all name
/// their `interface` or none does; unnamed entries are positional (`eth0`, then `net1`, `net2`, …).
pub fn parse_ippools(value: &str, nic: &str) -> Result<PoolNames, ValidationError> {
    let bad = |m: String| ValidationError::Invalid(format!("pod annotation {IPPOOLS}: {m}"));
    let entries: Vec<IppoolValue> = serde_json::from_str(value).map_err(|e| {
        bad(format!(
            "{} in {} (want e.g. [{{\"interface\": \"eth0\", \"ipv4\": [\"pool-a\"]}}, {{\"interface\": \"net1\", \"ipv4\": [\"pool-b\"]}}])",
            bounded(&e.to_string()),
            quoted(value)
        ))
    })?;
    let named = entries
        .iter()
        .filter(|e| e.interface.as_deref().is_some_and(|i| !i.is_empty()))
        .count();
    if named != 0 && named != entries.len() {
        return Err(bad("set \"interface\" on every entry or on none".into()));
    }
    let index = if named == 0 {
        let i = positional_index(nic).ok_or_else(|| {
            bad(format!("entries without \"interface\" are positional (eth0, net1, …) and cannot name interface {nic:?}"))
        })?;
        (i < entries.len()).then_some(i)
    } else {
        let mut seen = std::collections::BTreeSet::new();
        for e in &entries {
            let i = e.interface.as_deref().unwrap_or_default();
            if !seen.insert(i) {
                return Err(bad(format!("interface {i:?} is listed twice")));
            }
        }
        entries
            .iter()
            .position(|e| e.interface.as_deref() == Some(nic))
    };
    let Some(i) = index else {
        return Err(bad(format!("no entry for interface {nic:?}")));
    };
    let e = &entries[i];
    Ok(PoolNames {
        v4: e.ipv4.clone(),
        v6: e.ipv6.clone(),
        clean_gateway: e.cleangateway,
    })
}

/// The position of `nic` among a pod's interfaces as Multus names them: `eth0` is 0, `netN` is N.
pub fn positional_index(nic: &str) -> Option<usize> {
    if nic == "eth0" {
        return Some(0);
    }
    nic.strip_prefix("net")?.parse().ok().filter(|n| *n > 0)
}

/// Parses the namespace annotations `ipam.spidernet.io/default-ipv4-ippool` and
/// `default-ipv6-ippool` (JSON arrays of pool names).
pub fn parse_namespace_default(
    v4: Option<&str>,
    v6: Option<&str>,
) -> Result<Option<PoolNames>, ValidationError> {
    let parse = |key: &str, v: Option<&str>| -> Result<Vec<String>, ValidationError> {
        v.map(|v| {
            serde_json::from_str::<Vec<String>>(v).map_err(|e| {
                ValidationError::Invalid(format!(
                    "namespace annotation {key}: {} in {} (want e.g. [\"pool-a\", \"pool-b\"])",
                    bounded(&e.to_string()),
                    quoted(v)
                ))
            })
        })
        .transpose()
        .map(Option::unwrap_or_default)
    };
    let names = PoolNames {
        v4: parse(NS_DEFAULT_IPV4, v4)?,
        v6: parse(NS_DEFAULT_IPV6, v6)?,
        clean_gateway: None,
    };
    Ok((!names.is_empty()).then_some(names))
}

/// One route of `ipam.spidernet.io/routes`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CustomRoute {
    /// Destination.
    pub dst: ipnet::IpNet,
    /// Next hop.
    pub gw: std::net::IpAddr,
}

/// Parses `ipam.spidernet.io/routes`, e.g. `[{"dst": "10.0.0.0/16", "gw": "10.6.0.1"}]`.
pub fn parse_routes(value: &str) -> Result<Vec<CustomRoute>, ValidationError> {
    serde_json::from_str(value).map_err(|e| {
        ValidationError::Invalid(format!(
            "pod annotation {ROUTES}: {} in {} (want e.g. [{{\"dst\": \"10.0.0.0/16\", \"gw\": \"10.6.0.1\"}}])",
            bounded(&e.to_string()),
            quoted(value)
        ))
    })
}

#[derive(Debug, Deserialize)]
struct NetworkSelection {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    interface: Option<String>,
}

/// How the agent's Multus is set up, for the first NIC's network (upstream's
/// `MULTUS_CLUSTER_NETWORK` and the agent's namespace).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MultusDefaults {
    /// Multus's cluster network: eth0's network when the pod names no default network.
    pub cluster_network: Option<String>,
    /// The namespace of a bare default or cluster network name (upstream: the agent's);
    /// `None`: the pod's.
    pub namespace: Option<String>,
}

/// The Multus network (`namespace/name`) that attaches `nic`: for `eth0` the pod's default
/// network, else Multus's cluster network (bare names in `defaults.namespace`, else the pod's);
/// otherwise the `k8s.v1.cni.cncf.io/networks` element naming the interface, or the N-th
/// element for `netN` (bare names in the pod's namespace).
pub fn multus_network(
    annotations: &std::collections::BTreeMap<String, String>,
    pod_namespace: &str,
    nic: &str,
    defaults: &MultusDefaults,
) -> Result<Option<String>, ValidationError> {
    let qualify = |ns: Option<&str>, name: &str| format!("{}/{name}", ns.unwrap_or(pod_namespace));
    if nic == "eth0" {
        let first_ns = defaults.namespace.as_deref().unwrap_or(pod_namespace);
        return Ok(annotations
            .get(MULTUS_DEFAULT_NETWORK)
            .map(|v| v.trim().to_string())
            .or_else(|| defaults.cluster_network.clone())
            .filter(|v| !v.is_empty())
            .map(|v| match v.split_once('/') {
                Some((ns, n)) => format!("{ns}/{n}"),
                None => format!("{first_ns}/{v}"),
            }));
    }
    let Some(v) = annotations.get(MULTUS_NETWORKS) else {
        return Ok(None);
    };
    let v = v.trim();
    let list: Vec<NetworkSelection> = if v.starts_with('[') {
        serde_json::from_str(v).map_err(|e| {
            ValidationError::Invalid(format!(
                "pod annotation {MULTUS_NETWORKS}: {} in {}",
                bounded(&e.to_string()),
                quoted(v)
            ))
        })?
    } else {
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                let (net, interface) = match s.split_once('@') {
                    Some((n, i)) => (n, Some(i.to_string())),
                    None => (s, None),
                };
                let (namespace, name) = match net.split_once('/') {
                    Some((ns, n)) => (Some(ns.to_string()), n.to_string()),
                    None => (None, net.to_string()),
                };
                NetworkSelection {
                    name,
                    namespace,
                    interface,
                }
            })
            .collect()
    };
    let found = list
        .iter()
        .find(|n| n.interface.as_deref() == Some(nic))
        .or_else(|| positional_index(nic).and_then(|i| list.get(i - 1)));
    Ok(found.map(|n| qualify(n.namespace.as_deref(), &n.name)))
}

/// The facts of one NIC's request, as the pod, its namespace, its node and the CNI config give
/// them.
pub struct RequestFacts<'a> {
    /// Pod namespace.
    pub namespace: &'a str,
    /// Pod name.
    pub pod: &'a str,
    /// The interface being added.
    pub nic: &'a str,
    /// The pod's annotations.
    pub annotations: &'a std::collections::BTreeMap<String, String>,
    /// The pod's labels.
    pub labels: spiderpool_core::Labels,
    /// The pod-affinity labels of the pod's top controller (`ipam.spidernet.io/app-*`), when
    /// the caller looked it up; the pod's own labels under that prefix never count.
    pub app_labels: Option<spiderpool_core::Labels>,
    /// The namespace's labels.
    pub namespace_labels: spiderpool_core::Labels,
    /// The namespace's annotations.
    pub namespace_annotations: &'a std::collections::BTreeMap<String, String>,
    /// The node the pod runs on.
    pub node: &'a str,
    /// Its labels.
    pub node_labels: spiderpool_core::Labels,
    /// `default_ipv4_ippool` / `default_ipv6_ippool` of the CNI config.
    pub cni_default: PoolNames,
    /// `clean_gateway` of the CNI config.
    pub cni_clean_gateway: bool,
    /// The auto pools of the pod's application for this NIC, when its
    /// `ipam.spidernet.io/subnet(s)` annotation names subnets for it (the caller finds them).
    pub auto_pools: Option<PoolNames>,
    /// The agent's Multus set-up.
    pub multus: &'a MultusDefaults,
}

/// The allocation request the annotations describe, or the first annotation that is wrong
/// (naming the pod or namespace and the value). The same for an ADD and for `explain`.
pub fn request(f: RequestFacts<'_>) -> Result<spiderpool_core::Request, ValidationError> {
    let key = format!("{}/{}", f.namespace, f.pod);
    let in_pod = |e: ValidationError| ValidationError::Invalid(format!("pod {key}: {e}"));
    let pod_ippools = f
        .annotations
        .get(IPPOOLS)
        .map(|v| parse_ippools(v, f.nic))
        .transpose()
        .map_err(in_pod)?;
    let pod_ippool = f
        .annotations
        .get(IPPOOL)
        .map(|v| parse_ippool(v))
        .transpose()
        .map_err(in_pod)?;
    let multus_network =
        multus_network(f.annotations, f.namespace, f.nic, f.multus).map_err(in_pod)?;
    let namespace_default = parse_namespace_default(
        f.namespace_annotations
            .get(NS_DEFAULT_IPV4)
            .map(String::as_str),
        f.namespace_annotations
            .get(NS_DEFAULT_IPV6)
            .map(String::as_str),
    )
    .map_err(|e| ValidationError::Invalid(format!("namespace {}: {e}", f.namespace)))?;
    let mut pod_labels = f.labels;
    pod_labels.retain(|k, _| !k.starts_with(crate::keys::APP_PREFIX));
    pod_labels.extend(f.app_labels.unwrap_or_default());
    Ok(spiderpool_core::Request {
        auto_pools: f.auto_pools,
        nic: f.nic.to_string(),
        namespace: f.namespace.to_string(),
        pod: f.pod.to_string(),
        pod_labels,
        node: f.node.to_string(),
        node_labels: f.node_labels,
        namespace_labels: f.namespace_labels,
        pod_ippools,
        pod_ippool,
        namespace_default,
        multus_network,
        cni_default: f.cni_default,
        cni_clean_gateway: f.cni_clean_gateway,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_value() {
        let n = parse_ippool("{\n  \"ipv4\": [\"test-ippool-6\", \"test-ippool-7\"]\n}").unwrap();
        assert_eq!(n.v4, ["test-ippool-6", "test-ippool-7"]);
        assert!(n.v6.is_empty());
        assert_eq!(n.clean_gateway, None);
        let n = parse_ippool(r#"{"ipv6":["v6"],"cleangateway":true}"#).unwrap();
        assert_eq!(
            (n.v6, n.clean_gateway),
            (vec!["v6".to_string()], Some(true))
        );
    }

    #[test]
    fn ippools_by_name_and_by_position() {
        let named = r#"[{"interface":"eth0","ipv4":["a"]},{"interface":"net1","ipv4":["b"],"cleangateway":true}]"#;
        assert_eq!(parse_ippools(named, "eth0").unwrap().v4, ["a"]);
        let n1 = parse_ippools(named, "net1").unwrap();
        assert_eq!(
            (n1.v4, n1.clean_gateway),
            (vec!["b".to_string()], Some(true))
        );
        let err = parse_ippools(named, "net2").unwrap_err().to_string();
        assert_eq!(
            err,
            "pod annotation ipam.spidernet.io/ippools: no entry for interface \"net2\""
        );
        let positional = r#"[{"ipv4":["a"]},{"ipv4":["b"]}]"#;
        assert_eq!(parse_ippools(positional, "eth0").unwrap().v4, ["a"]);
        assert_eq!(parse_ippools(positional, "net1").unwrap().v4, ["b"]);
        assert!(parse_ippools(positional, "net2").is_err());
        let dup = r#"[{"interface":"eth0","ipv4":["a"]},{"interface":"eth0","ipv4":["b"]}]"#;
        assert!(parse_ippools(dup, "eth0")
            .unwrap_err()
            .to_string()
            .contains("\"eth0\" is listed twice"));
        let mixed = r#"[{"interface":"eth0","ipv4":["a"]},{"ipv4":["b"]}]"#;
        assert!(parse_ippools(mixed, "eth0")
            .unwrap_err()
            .to_string()
            .contains("on every entry or on none"));
    }

    #[test]
    fn namespace_defaults_routes_and_networks() {
        let n = parse_namespace_default(Some(r#"["a","b*"]"#), None)
            .unwrap()
            .unwrap();
        assert_eq!(n.v4, ["a", "b*"]);
        assert_eq!(parse_namespace_default(None, None).unwrap(), None);
        assert!(parse_namespace_default(Some("a"), None)
            .unwrap_err()
            .to_string()
            .contains("default-ipv4-ippool"));
        let r = parse_routes(r#"[{"dst":"10.0.0.0/16","gw":"10.6.0.1"}]"#).unwrap();
        assert_eq!(r[0].gw.to_string(), "10.6.0.1");
        assert!(parse_routes(r#"[{"dst":"10.0.0.0","gw":"10.6.0.1"}]"#).is_err());

        let none = MultusDefaults::default();
        let mut a = std::collections::BTreeMap::new();
        a.insert(
            MULTUS_DEFAULT_NETWORK.to_string(),
            "kube-system/macvlan-conf".to_string(),
        );
        a.insert(
            MULTUS_NETWORKS.to_string(),
            "kube-system/ipvlan@net1, sriov".to_string(),
        );
        assert_eq!(
            multus_network(&a, "prod", "eth0", &none)
                .unwrap()
                .as_deref(),
            Some("kube-system/macvlan-conf")
        );
        assert_eq!(
            multus_network(&a, "prod", "net1", &none)
                .unwrap()
                .as_deref(),
            Some("kube-system/ipvlan")
        );
        assert_eq!(
            multus_network(&a, "prod", "net2", &none)
                .unwrap()
                .as_deref(),
            Some("prod/sriov")
        );
        a.insert(
            MULTUS_NETWORKS.to_string(),
            r#"[{"name":"m","namespace":"x","interface":"ext0"}]"#.to_string(),
        );
        assert_eq!(
            multus_network(&a, "prod", "ext0", &none)
                .unwrap()
                .as_deref(),
            Some("x/m")
        );
        assert_eq!(
            multus_network(&a, "prod", "net1", &none)
                .unwrap()
                .as_deref(),
            Some("x/m")
        );
        assert_eq!(
            multus_network(&Default::default(), "prod", "eth0", &none).unwrap(),
            None
        );
        // As upstream: without a default network eth0 is on Multus's cluster network, and a
        // bare default or cluster network name is in the agent's namespace.
        let agent = MultusDefaults {
            cluster_network: Some("macvlan-conf".into()),
            namespace: Some("kube-system".into()),
        };
        assert_eq!(
            multus_network(&Default::default(), "prod", "eth0", &agent)
                .unwrap()
                .as_deref(),
            Some("kube-system/macvlan-conf")
        );
        let mut bare = std::collections::BTreeMap::new();
        bare.insert(
            MULTUS_DEFAULT_NETWORK.to_string(),
            "ipvlan-conf".to_string(),
        );
        assert_eq!(
            multus_network(&bare, "prod", "eth0", &agent)
                .unwrap()
                .as_deref(),
            Some("kube-system/ipvlan-conf")
        );
        assert_eq!(
            multus_network(&bare, "prod", "eth0", &none)
                .unwrap()
                .as_deref(),
            Some("prod/ipvlan-conf")
        );
    }

    #[test]
    fn a_huge_annotation_gets_a_short_error() {
        let huge = format!("{{\"ipv4\": [\"{}\"", "p".repeat(200 * 1024));
        for e in [
            parse_ippool(&huge).unwrap_err(),
            parse_ippools(&huge, "eth0").unwrap_err(),
            parse_routes(&huge).unwrap_err(),
            parse_namespace_default(Some(&huge), None).unwrap_err(),
        ] {
            let m = e.to_string();
            assert!(m.len() < 8 * 1024, "{} bytes", m.len());
            assert!(m.contains("bytes in all"), "{m}");
        }
        // A short value is still quoted whole.
        let m = parse_ippool("{nope").unwrap_err().to_string();
        assert!(m.contains("in \"{nope\""), "{m}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse_ippool(r#"{"ipv4": "p"}"#).unwrap_err().to_string();
        assert!(
            err.starts_with("pod annotation ipam.spidernet.io/ippool: invalid type"),
            "{err}"
        );
        let err = parse_ippool(r#"{"ipv5": ["p"]}"#).unwrap_err().to_string();
        assert!(err.contains("unknown field `ipv5`"), "{err}");
        let err = parse_ippool("not json").unwrap_err().to_string();
        assert!(err.contains("\"not json\""), "{err}");
    }
}
