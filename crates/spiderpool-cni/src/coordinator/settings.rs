//! The coordinator's settings: the agent's SpiderCoordinator (`POST /v1/coordinator/config`)
//! with the network config's keys over it, each checked and named when bad; the pod MAC from
//! `podMACPrefix`.

use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::Value;
use spiderpool_api::agent::{CoordinatorConfig, CoordinatorConfigArgs, PATH_COORDINATOR_CONFIG};
use spiderpool_api::cni::{code, DEFAULT_SOCKET};
use spiderpool_api::coordinator::{parse_mac_prefix, MacPrefixError};

use crate::plugin::CniEnv;
use crate::CniError;

use super::*;

/// The settings of one call: the agent's, with the network config's keys over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `underlay`, `auto` (as underlay here) or `disabled`.
    pub mode: String,
    /// Reached through the node.
    pub service_cidr: Vec<ipnet::IpNet>,
    /// Reached through the node too.
    pub hijack_cidr: Vec<ipnet::IpNet>,
    /// The cluster CNI's pod CIDRs (overlay mode: reached through its NIC).
    pub overlay_pod_cidr: Vec<ipnet::IpNet>,
    /// The pair's MTU.
    pub veth_mtu: u32,
    /// The pair's transmit queue length (0: the kernel's default).
    pub tx_queue_len: u32,
    /// The pod's `rp_filter` (negative: left alone).
    pub pod_rp_filter: i64,
    /// The first two bytes of the pod interface's MAC address; the other four are its
    /// address's last four (`None`: the MAC is left as it is).
    pub pod_mac_prefix: Option<[u8; 2]>,
    /// Probe the segment for the pod's addresses (ARP, NDP) before they are used.
    pub detect_ip_conflict: bool,
    /// Check that each gateway of the pod answers (ARP, NDP).
    pub detect_gateway: bool,
    /// The node's table for the routes to its pods (`hostRuleTable`, 500), looked up by a rule
    /// `to POD-ADDRESS` of priority [`HOST_RULE_PRIORITY`]; 254 puts them in main, without rules.
    pub host_rule_table: u32,
    /// An address put on the pod's `veth0` (`vethLinkAddress`, e.g. for Istio).
    pub veth_link_address: Option<IpAddr>,
    /// Sort a pod's routes out between its NICs when it gets another one (`tunePodRoutes`).
    pub tune_pod_routes: bool,
    /// The NIC whose default route stays in the pod's main table (`podDefaultRouteNIC`, the
    /// pod's `ipam.spidernet.io/default-route-nic`); empty: the first NIC that has one.
    pub pod_default_route_nic: String,
}

/// A MAC prefix (`0a:1b`) from the config or the SpiderCoordinator (empty: none).
pub(super) fn mac_prefix(key: &str, v: &str) -> Result<Option<[u8; 2]>, CniError> {
    if v.is_empty() {
        return Ok(None);
    }
    match parse_mac_prefix(v) {
        Ok(p) => Ok(Some(p)),
        Err(MacPrefixError::Multicast) => Err(invalid(format!(
            "{key}: {v:?} is not a unicast MAC prefix (the lowest bit of the first byte must be 0)"
        ))),
        Err(MacPrefixError::NotTwoBytes) => Err(invalid(format!(
            "{key}: {v:?} is not a MAC prefix of two bytes like \"0a:1b\""
        ))),
    }
}

/// The pod interface's MAC: the prefix, then the last four bytes of its first address (IPv4
/// first).
pub fn pod_mac(prefix: [u8; 2], ips: &[IpAddr]) -> Option<[u8; 6]> {
    let ip = ips.iter().find(|i| i.is_ipv4()).or_else(|| ips.first())?;
    let tail: [u8; 4] = match ip {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let o = a.octets();
            [o[12], o[13], o[14], o[15]]
        }
    };
    Some([prefix[0], prefix[1], tail[0], tail[1], tail[2], tail[3]])
}

pub(super) fn invalid(msg: String) -> CniError {
    CniError::new(code::INVALID_NETWORK_CONFIG, msg)
}

pub(super) fn cidrs(key: &str, v: &Value) -> Result<Vec<ipnet::IpNet>, CniError> {
    let list = v.as_array().ok_or_else(|| {
        invalid(format!(
            "{key}: {} is not a list of CIDRs",
            crate::excerpt(v)
        ))
    })?;
    list.iter()
        .map(|c| {
            let s = c.as_str().unwrap_or_default();
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| invalid(format!("{key}: {} is not a CIDR", crate::excerpt(c))))
        })
        .collect()
}

/// A routing table for the node's pod routes: 1 to 2^32-1, not the kernel's `local` (255) or
/// `default` (253).
pub(super) fn rule_table(key: &str, v: &Value) -> Result<u32, CniError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0 && *n != 253 && *n != 255)
        .ok_or_else(|| {
            invalid(format!(
                "{key}: {} is not a routing table from 1 to 4294967295 other than 253 (default) and 255 (local)",
                crate::excerpt(v)
            ))
        })
}

pub(super) fn link_address(v: &Value) -> Result<IpAddr, CniError> {
    v.as_str()
        .and_then(|a| a.parse::<IpAddr>().ok())
        .ok_or_else(|| {
            invalid(format!(
                "vethLinkAddress: {} is not an IP address",
                crate::excerpt(v)
            ))
        })
}

impl Settings {
    /// The agent's settings (`None`: no SpiderCoordinator) with `conf`'s keys over them. Pure.
    pub fn merge(agent: Option<&CoordinatorConfig>, conf: &Value) -> Result<Self, CniError> {
        let mut s = Settings {
            mode: "auto".into(),
            service_cidr: Vec::new(),
            hijack_cidr: Vec::new(),
            overlay_pod_cidr: Vec::new(),
            veth_mtu: 1500,
            tx_queue_len: 0,
            pod_rp_filter: 0,
            pod_mac_prefix: None,
            detect_ip_conflict: false,
            detect_gateway: false,
            host_rule_table: HOST_RULE_TABLE,
            veth_link_address: None,
            tune_pod_routes: true,
            pod_default_route_nic: String::new(),
        };
        if let Some(a) = agent {
            s.mode = a.mode.clone();
            let strings = |l: &[String]| Value::from(l.to_vec());
            s.service_cidr = cidrs("serviceCIDR", &strings(&a.service_cidr))?;
            s.hijack_cidr = cidrs("hijackCIDR", &strings(&a.hijack_cidr))?;
            s.overlay_pod_cidr = cidrs("overlayPodCIDR", &strings(&a.overlay_pod_cidr))?;
            s.veth_mtu = u32::try_from(a.veth_mtu).unwrap_or(1500);
            s.tx_queue_len = u32::try_from(a.tx_queue_len).unwrap_or(0);
            s.pod_rp_filter = a.pod_rp_filter;
            s.pod_mac_prefix = mac_prefix("podMACPrefix", &a.pod_mac_prefix)?;
            s.detect_ip_conflict = a.detect_ip_conflict;
            s.detect_gateway = a.detect_gateway;
            s.tune_pod_routes = a.tune_pod_routes;
            s.pod_default_route_nic = a.pod_default_route_nic.clone();
            if a.host_rule_table > 0 {
                s.host_rule_table = rule_table("hostRuleTable", &Value::from(a.host_rule_table))?;
            }
            if !a.veth_link_address.is_empty() {
                s.veth_link_address =
                    Some(link_address(&Value::from(a.veth_link_address.as_str()))?);
            }
        }
        if let Some(v) = conf.get("tunePodRoutes") {
            s.tune_pod_routes = v.as_bool().ok_or_else(|| {
                invalid(format!(
                    "tunePodRoutes: {} is not true or false",
                    crate::excerpt(v)
                ))
            })?;
        }
        for key in ["podDefaultRouteNIC", "podDefaultRouteNic"] {
            if let Some(v) = conf.get(key) {
                let Some(nic) = v.as_str() else {
                    return Err(invalid(format!(
                        "{key}: {} is not an interface name",
                        crate::excerpt(v)
                    )));
                };
                if !nic.is_empty() {
                    spiderpool_api::names::interface_name(nic)
                        .map_err(|e| invalid(format!("{key}: {}: {e}", crate::excerpt(v))))?;
                }
                s.pod_default_route_nic = nic.to_string();
            }
        }
        if let Some(v) = conf.get("hostRuleTable") {
            s.host_rule_table = rule_table("hostRuleTable", v)?;
        }
        if let Some(v) = conf.get("vethLinkAddress") {
            s.veth_link_address = match v.as_str() {
                Some("") => None,
                _ => Some(link_address(v)?),
            };
        }
        for (key, flag) in [
            ("detectIPConflict", &mut s.detect_ip_conflict),
            ("detectGateway", &mut s.detect_gateway),
        ] {
            if let Some(v) = conf.get(key) {
                *flag = v.as_bool().ok_or_else(|| {
                    invalid(format!("{key}: {} is not true or false", crate::excerpt(v)))
                })?;
            }
        }
        if let Some(v) = conf.get("podMACPrefix") {
            let text = v.as_str().ok_or_else(|| {
                invalid(format!(
                    "podMACPrefix: {} is not a string",
                    crate::excerpt(v)
                ))
            })?;
            s.pod_mac_prefix = mac_prefix("podMACPrefix", text)?;
        }
        if let Some(m) = conf.get("mode") {
            s.mode = m
                .as_str()
                .filter(|m| ["auto", "underlay", "overlay", "disabled"].contains(m))
                .ok_or_else(|| {
                    invalid(format!(
                        "mode: {} is not one of \"auto\", \"underlay\", \"overlay\", \"disabled\"",
                        crate::excerpt(m)
                    ))
                })?
                .to_string();
        }
        for key in ["service_cidr", "serviceCIDR"] {
            if let Some(v) = conf.get(key) {
                s.service_cidr = cidrs(key, v)?;
            }
        }
        if let Some(v) = conf.get("hijackCIDR") {
            s.hijack_cidr = cidrs("hijackCIDR", v)?;
        }
        if let Some(v) = conf.get("overlayPodCIDR") {
            s.overlay_pod_cidr = cidrs("overlayPodCIDR", v)?;
        }
        let number = |key: &str, min: i64, max: i64| -> Result<Option<i64>, CniError> {
            conf.get(key)
                .map(|v| {
                    v.as_i64()
                        .filter(|n| (min..=max).contains(n))
                        .ok_or_else(|| {
                            invalid(format!(
                                "{key}: {} is not a whole number from {min} to {max}",
                                crate::excerpt(v)
                            ))
                        })
                })
                .transpose()
        };
        if let Some(n) = number("vethMTU", 68, 65535)? {
            s.veth_mtu = n as u32;
        }
        if let Some(n) = number("txQueueLen", 0, i64::from(u32::MAX))? {
            s.tx_queue_len = n as u32;
        }
        if let Some(n) = number("podRPFilter", i64::MIN, 2)? {
            s.pod_rp_filter = n;
        }
        Ok(s)
    }
}

/// The agent's coordinator settings for the pod; `None` when the agent has no SpiderCoordinator.
pub(super) fn agent_settings(
    conf: &Value,
    env: &CniEnv,
) -> Result<Option<CoordinatorConfig>, CniError> {
    let socket = PathBuf::from(
        conf.get("ipam_unix_socket_path")
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_SOCKET),
    );
    let args = CoordinatorConfigArgs {
        pod_namespace: env
            .args
            .get("K8S_POD_NAMESPACE")
            .cloned()
            .unwrap_or_default(),
        pod_name: env.args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
    };
    let reply = crate::client::call(&socket, "POST", PATH_COORDINATOR_CONFIG, Some(&args))?;
    match reply.json::<CoordinatorConfig>(&socket) {
        Ok(c) => Ok(Some(c)),
        Err(e) if e.msg.starts_with("coordinator config not found") => Ok(None),
        Err(e) => Err(e),
    }
}
