//! Pod and namespace annotations of Spiderpool and Multus, and their parsed values.

use serde::Deserialize;
use spiderpool_core::PoolNames;

use crate::ValidationError;

/// Pod annotation: one pool group for the NIC being added.
pub const IPPOOL: &str = "ipam.spidernet.io/ippool";
/// Pod annotation: pool groups per NIC.
pub const IPPOOLS: &str = "ipam.spidernet.io/ippools";
/// Pod annotation: one subnet group (auto pools).
pub const SUBNET: &str = "ipam.spidernet.io/subnet";
/// Pod annotation: subnet groups per NIC (auto pools).
pub const SUBNETS: &str = "ipam.spidernet.io/subnets";
/// Namespace annotation: default IPv4 pools.
pub const NS_DEFAULT_IPV4: &str = "ipam.spidernet.io/default-ipv4-ippool";
/// Namespace annotation: default IPv6 pools.
pub const NS_DEFAULT_IPV6: &str = "ipam.spidernet.io/default-ipv6-ippool";
/// Multus: the network of the first NIC.
pub const MULTUS_DEFAULT_NETWORK: &str = "v1.multus-cni.io/default-network";
/// Multus: the networks of the extra NICs.
pub const MULTUS_NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";

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

/// Parses the value of `ipam.spidernet.io/ippool`, e.g. `{"ipv4": ["test-ippool-6"]}`.
pub fn parse_ippool(value: &str) -> Result<PoolNames, ValidationError> {
    let v: IppoolValue = serde_json::from_str(value).map_err(|e| {
        ValidationError::Invalid(format!(
            "pod annotation {IPPOOL}: {e} in {:?} (want e.g. {{\"ipv4\": [\"pool-a\"], \"ipv6\": [\"pool-b\"]}})",
            value.trim()
        ))
    })?;
    let _ = v.interface;
    Ok(PoolNames {
        v4: v.ipv4,
        v6: v.ipv6,
        clean_gateway: v.cleangateway,
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
