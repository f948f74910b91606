//! The chained `coordinator` CNI plugin, also installed as `veth` (the seed's NAD chains
//! `macvlan` → `{"type": "veth", "service_cidr": [...]}`). Underlay mode: an underlay pod's
//! default route leads to the data-center gateway, which knows neither the cluster's Service
//! addresses nor the pod's own node. The plugin gives the pod a veth pair to its node (`veth0`
//! in the pod, `veth<hash>` on the node): in the pod, a route to each node address through
//! `veth0` and the Service CIDRs and `hijackCIDR` through the node, each from the pod's own
//! address; on the node, a route to each pod address through the host end in `hostRuleTable`
//! (500), looked up by a rule `to POD-ADDRESS` (priority 1000), so the node's main table is left
//! alone. Traffic to a Service then meets kube-proxy's rules in the node's namespace, and the
//! node reaches its pods directly. Permanent neighbour entries on both ends (each pod address
//! on the node, each node address in the pod) spare the pair ARP and NDP. `vethLinkAddress`
//! goes on the pod's `veth0`.
//!
//! Several NICs: the first NIC's ADD makes the pair; another NIC's ADD (the pod has `veth0`
//! already) shares it: the node routes that NIC's addresses through it too, and with
//! `tunePodRoutes` the pod's routes are sorted out. The NIC named by `podDefaultRouteNIC` (the
//! pod's `ipam.spidernet.io/default-route-nic`; by default the first NIC with a default route)
//! keeps its default route in main; the other NIC's routes move to table 100 + its interface
//! index, looked up by rules `from` its addresses, with the routes to the node and the Services
//! through the pair there too. DEL of such a NIC removes the node's routes to its addresses and
//! their rules (from the prevResult a runtime passes); the first NIC's DEL removes the pair.
//!
//! Settings: the agent's `POST /v1/coordinator/config` (the SpiderCoordinator), overridden by
//! the network config's keys (`mode`, `service_cidr`/`serviceCIDR`, `hijackCIDR`,
//! `hostRuleTable`, `vethLinkAddress`, `vethMTU`,
//! `txQueueLen`, `podRPFilter`, `podMACPrefix`: the pod interface's MAC becomes the prefix and
//! its address's last four bytes, `detectIPConflict`, `detectGateway`); without a
//! SpiderCoordinator the config's keys alone apply. Before anything is made, on the pod's
//! interface: with `detectIPConflict` an ARP probe for each IPv4 address (an NDP solicitation
//! from `::` for each IPv6 one) fails the ADD (code 11) naming the address and the MAC that
//! answered, and the agent holds the address back from allocation for a while
//! (`DELETE /v1/ipam/ips`); with `detectGateway` a gateway that does not answer ARP (NDP) fails
//! it likewise; then a gratuitous ARP (an unsolicited neighbour advertisement) announces each
//! address.
//! DEL removes the node's rules for the pair's routes, then the pair (its routes and neighbour
//! entries go with it), and is idempotent; CHECK verifies the pair, the node's routes, rules and
//! neighbour entries.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use serde_json::{json, Value};
use spiderpool_api::agent::{
    CoordinatorConfig, CoordinatorConfigArgs, IpConflict, IpamBatchDelArgs, IpamBatchDelResponse,
    PATH_COORDINATOR_CONFIG, PATH_IPS,
};
use spiderpool_api::cni::{code, DEFAULT_SOCKET};
use spiderpool_api::coordinator::{parse_mac_prefix, MacPrefixError};

use crate::netlink::{Netlink, RouteSpec, MAIN_TABLE};
use crate::plugin::{
    check_version, prev_result_addresses, version_answer, CniEnv, Command, FALLBACK_VERSION,
};
use crate::CniError;

/// The pod's end of the pair.
pub const POD_VETH: &str = "veth0";

/// The node's end of the pair of a container's interface: `veth` and 11 hex digits of a hash
/// of the container ID and interface (15 characters, the kernel's limit).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    // FNV-1a, 64 bits: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("veth{:011x}", h & 0x0fff_ffff_ffff)
}

/// The settings of one call: the agent's, with the network config's keys over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `underlay`, `auto` (as underlay here) or `disabled`.
    pub mode: String,
    /// Reached through the node.
    pub service_cidr: Vec<ipnet::IpNet>,
    /// Reached through the node too.
    pub hijack_cidr: Vec<ipnet::IpNet>,
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

/// A pod's table for the routes of a NIC other than its default-route one: 100 + the NIC's
/// interface index, looked up by a rule `from NIC-ADDRESS`.
pub const POD_TABLE_BASE: u32 = 100;

/// Priority of the node's rules `to POD-ADDRESS lookup hostRuleTable` (upstream's).
pub const HOST_RULE_PRIORITY: u32 = 1000;
/// `hostRuleTable`'s default (upstream's).
pub const HOST_RULE_TABLE: u32 = 500;

/// A MAC prefix (`0a:1b`) from the config or the SpiderCoordinator (empty: none).
fn mac_prefix(key: &str, v: &str) -> Result<Option<[u8; 2]>, CniError> {
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

fn invalid(msg: String) -> CniError {
    CniError::new(code::INVALID_NETWORK_CONFIG, msg)
}

fn cidrs(key: &str, v: &Value) -> Result<Vec<ipnet::IpNet>, CniError> {
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
fn rule_table(key: &str, v: &Value) -> Result<u32, CniError> {
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

fn link_address(v: &Value) -> Result<IpAddr, CniError> {
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
fn agent_settings(conf: &Value, env: &CniEnv) -> Result<Option<CoordinatorConfig>, CniError> {
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

fn io(what: &str, e: impl std::fmt::Display) -> CniError {
    CniError::new(code::IO_FAILURE, format!("{what}: {e}"))
}

fn enter(ns: &File, what: &str) -> Result<(), CniError> {
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(|e| io(&format!("entering {what}"), e))
}

fn sysctl(path: &str, value: &str) -> Result<(), CniError> {
    std::fs::write(path, value).map_err(|e| io(&format!("writing {path}"), e))
}

/// The node's addresses to route through: per family, the global addresses of the interface of
/// the node's default route, else every global address (none of the pair's own).
fn node_addresses(host: &mut Netlink, skip: u32) -> Result<Vec<IpAddr>, CniError> {
    let all: Vec<(IpAddr, u32)> = host
        .global_addresses()
        .map_err(|e| io("listing the node's addresses", e))?
        .into_iter()
        .filter(|(_, i)| *i != skip)
        .collect();
    let routes = host
        .routes()
        .map_err(|e| io("listing the node's routes", e))?;
    let mut out = Vec::new();
    for v4 in [true, false] {
        let family: Vec<&(IpAddr, u32)> = all.iter().filter(|(a, _)| a.is_ipv4() == v4).collect();
        let default_oif = routes
            .iter()
            .find(|(d, _)| d.prefix_len() == 0 && d.addr().is_ipv4() == v4)
            .and_then(|(_, oif)| *oif);
        let on_default: Vec<IpAddr> = family
            .iter()
            .filter(|(_, i)| Some(*i) == default_oif)
            .map(|(a, _)| *a)
            .collect();
        if on_default.is_empty() {
            out.extend(family.iter().map(|(a, _)| *a));
        } else {
            out.extend(on_default);
        }
    }
    Ok(out)
}

fn host_routes(pod_ips: &[IpAddr], oif: u32, table: u32) -> Vec<RouteSpec> {
    pod_ips
        .iter()
        .map(|ip| RouteSpec {
            dst: ipnet::IpNet::from(*ip),
            via: None,
            oif,
            table,
            src: None,
        })
        .collect()
}

/// The node's routes of every table and its rules with a destination.
type NodeRules = Vec<(ipnet::IpNet, u32, u32)>;
fn routes_and_rules(
    host: &mut Netlink,
) -> Result<(Vec<crate::netlink::Route>, NodeRules), CniError> {
    let routes = host
        .all_routes()
        .map_err(|e| io("listing the node's routes", e))?;
    let rules = host
        .destination_rules()
        .map_err(|e| io("listing the node's rules", e))?;
    Ok((routes, rules))
}

/// A link's MAC address as bytes.
fn mac_of(l: &crate::netlink::Link, name: &str) -> Result<[u8; 6], CniError> {
    crate::netlink::parse_mac(&l.mac)
        .ok_or_else(|| io(name, format!("no Ethernet address ({:?})", l.mac)))
}

/// The node's routes to `ips` through the host end `index` in `table`, each with its rule
/// `to ADDRESS lookup table` (none in main).
fn add_host_routes(
    host: &mut Netlink,
    ips: &[IpAddr],
    index: u32,
    table: u32,
    name: &str,
) -> Result<(), CniError> {
    for r in host_routes(ips, index, table) {
        host.add_route(&r).map_err(|e| {
            io(
                &format!(
                    "adding the node's route to {} via {name} (table {})",
                    r.dst, r.table
                ),
                e,
            )
        })?;
        if r.table != MAIN_TABLE {
            host.add_rule(r.dst, r.table, HOST_RULE_PRIORITY)
                .map_err(|e| {
                    io(
                        &format!("adding the node's rule to {} lookup {}", r.dst, r.table),
                        e,
                    )
                })?;
        }
    }
    Ok(())
}

/// Removes the node's routes to `ips` that a NIC sharing another NIC's pair was given: those
/// outside main with the coordinator's rule `to ADDRESS`, and the rules.
fn remove_nic_host_routes(host: &mut Netlink, ips: &[IpAddr]) -> Result<(), CniError> {
    let (routes, rules) = routes_and_rules(host)?;
    for ip in ips {
        let dst = ipnet::IpNet::from(*ip);
        for (d, table, priority) in rules
            .iter()
            .filter(|(d, t, p)| *d == dst && *p == HOST_RULE_PRIORITY && *t != MAIN_TABLE)
        {
            for r in routes.iter().filter(|r| r.dst == *d && r.table == *table) {
                host.delete_route(r)
                    .map_err(|e| io(&format!("deleting the node's route to {dst}"), e))?;
                if let Some(oif) = r.oif {
                    host.delete_neighbour(oif, *ip)
                        .map_err(|e| io(&format!("deleting the node's neighbour {ip}"), e))?;
                }
            }
            host.delete_rule(*d, *table, *priority)
                .map_err(|e| io(&format!("deleting the node's rule to {dst}"), e))?;
        }
    }
    Ok(())
}

/// A NIC added to a pod that has a pair already (an earlier NIC's ADD made it): the node's
/// routes to its addresses go through that pair, and (`tunePodRoutes`) the pod's routes are
/// sorted out so that one NIC keeps the default route in main and the other's routes move to
/// a table of its own, looked up by rules `from` its addresses.
fn add_nic(
    settings: &Settings,
    env: &CniEnv,
    ips: &[IpAddr],
    host: &mut Netlink,
    pod: &mut Netlink,
    pod_veth: &crate::netlink::Link,
) -> Result<(), CniError> {
    let host_index = pod_veth.peer.ok_or_else(|| {
        io(
            "the pod's pair",
            format!("{POD_VETH} in the pod has no peer on the node"),
        )
    })?;
    add_host_routes(
        host,
        ips,
        host_index,
        settings.host_rule_table,
        "the pod's pair",
    )?;
    let veth0_mac = mac_of(pod_veth, POD_VETH)?;
    for ip in ips {
        host.set_neighbour(host_index, *ip, veth0_mac)
            .map_err(|e| io(&format!("the node's neighbour entry for {ip}"), e))?;
    }
    if !settings.tune_pod_routes {
        return Ok(());
    }
    let tuned = node_addresses(host, host_index)
        .and_then(|nodes| tune_pod_routes(settings, env, ips, pod, pod_veth.index, &nodes));
    if tuned.is_err() {
        let _ = remove_nic_host_routes(host, ips);
    }
    tuned
}

fn tune_pod_routes(
    settings: &Settings,
    env: &CniEnv,
    ips: &[IpAddr],
    pod: &mut Netlink,
    veth: u32,
    nodes: &[IpAddr],
) -> Result<(), CniError> {
    let failed = |e: io::Error| io("netlink in the pod", e);
    let this = pod
        .link(&env.ifname)
        .map_err(failed)?
        .ok_or_else(|| io("tunePodRoutes", format!("the pod has no {}", env.ifname)))?;
    let main: Vec<crate::netlink::Route> = pod
        .all_routes()
        .map_err(failed)?
        .into_iter()
        .filter(|r| r.table == MAIN_TABLE && r.unicast)
        .collect();
    // The NIC that had the default route before this one came.
    let other = main
        .iter()
        .find(|r| r.dst.prefix_len() == 0 && r.oif.is_some_and(|o| o != this.index && o != veth))
        .and_then(|r| r.oif);
    // The NIC whose routes move to a table: this one, unless it is the default-route NIC.
    let (moved, moved_ips) = if settings.pod_default_route_nic == env.ifname {
        let Some(o) = other else { return Ok(()) };
        let addrs = pod
            .global_addresses()
            .map_err(failed)?
            .into_iter()
            .filter(|(_, i)| *i == o)
            .map(|(a, _)| a)
            .collect::<Vec<_>>();
        (o, addrs)
    } else {
        (this.index, ips.to_vec())
    };
    let table = POD_TABLE_BASE + moved;
    for r in main.iter().filter(|r| r.oif == Some(moved)) {
        if matches!(r.dst, ipnet::IpNet::V6(n) if n.addr().segments()[0] & 0xffc0 == 0xfe80) {
            continue;
        }
        pod.add_route(&RouteSpec {
            dst: r.dst,
            via: r.via,
            oif: moved,
            table,
            src: r.src,
        })
        .map_err(|e| {
            io(
                &format!("copying the route to {} to table {table}", r.dst),
                e,
            )
        })?;
        if r.dst.prefix_len() == 0 {
            pod.delete_route(r).map_err(|e| {
                io(
                    &format!("moving the default route via {:?} out of main", r.via),
                    e,
                )
            })?;
        }
    }
    // From the moved NIC's addresses, the node and the Services are still through the pair.
    for mut r in pod_routes(settings, &moved_ips, nodes, veth) {
        r.table = table;
        pod.add_route(&r).map_err(|e| {
            io(
                &format!("adding the route to {} to table {table}", r.dst),
                e,
            )
        })?;
    }
    for ip in &moved_ips {
        pod.add_source_rule(ipnet::IpNet::from(*ip), table, HOST_RULE_PRIORITY)
            .map_err(|e| io(&format!("adding the pod's rule from {ip}"), e))?;
    }
    Ok(())
}

/// Undoes the node's side of a pair: the rules `to POD-ADDRESS` of the routes through the host
/// end (found in every table, so no setting is needed), then the pair itself, which takes its
/// routes and neighbour entries with it. A pair already gone is no error.
fn remove_host_side(host: &mut Netlink, name: &str, index: u32) -> Result<(), CniError> {
    let routes = host
        .all_routes()
        .map_err(|e| io("listing the node's routes", e))?;
    for r in routes
        .iter()
        .filter(|r| r.oif == Some(index) && r.table != MAIN_TABLE)
    {
        host.delete_rule(r.dst, r.table, HOST_RULE_PRIORITY)
            .map_err(|e| io(&format!("deleting the node's rule to {}", r.dst), e))?;
    }
    match host.delete_link(index) {
        // Gone meanwhile (its pod's namespace was removed): nothing left to do.
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENODEV as i32) => Ok(()),
        r => r.map_err(|e| io(&format!("deleting {name}"), e)),
    }
}

/// The pod's routes: each node address on `veth0`, then the Service and hijacked CIDRs
/// through the node address of their family (only families the pod has an address of), each
/// from the pod's address of the family (an IPv4 one only: the kernel refuses an IPv6 source
/// still in duplicate address detection), not from `veth0`'s own `vethLinkAddress`.
pub fn pod_routes(s: &Settings, pod_ips: &[IpAddr], nodes: &[IpAddr], oif: u32) -> Vec<RouteSpec> {
    let mut out = Vec::new();
    for v4 in [true, false] {
        let Some(own) = pod_ips.iter().find(|ip| ip.is_ipv4() == v4) else {
            continue;
        };
        let src = v4.then_some(*own);
        let family: Vec<IpAddr> = nodes
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == v4)
            .collect();
        for n in &family {
            out.push(RouteSpec {
                dst: ipnet::IpNet::from(*n),
                via: None,
                oif,
                table: MAIN_TABLE,
                src,
            });
        }
        let Some(gw) = family.first() else { continue };
        for c in s.service_cidr.iter().chain(&s.hijack_cidr) {
            if c.addr().is_ipv4() == v4 {
                out.push(RouteSpec {
                    dst: c.trunc(),
                    via: Some(*gw),
                    oif,
                    table: MAIN_TABLE,
                    src,
                });
            }
        }
    }
    out
}

fn pod_ips(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
    prev_result_addresses(prev)?
        .iter()
        .map(|a| {
            a.parse::<ipnet::IpNet>()
                .map(|n| n.addr())
                .or_else(|_| a.parse::<IpAddr>())
                .map_err(|_| {
                    CniError::new(
                        code::DECODING_FAILURE,
                        format!("decoding prevResult: address {a:?} is not a CIDR"),
                    )
                })
        })
        .collect()
}

/// How long a probe waits for an answer, per try.
const PROBE_WAIT: Duration = Duration::from_millis(200);
/// Tries of a probe and of a gateway request.
const PROBE_TRIES: u32 = 3;

/// IP conflict and gateway detection on the pod's interface (`detectIPConflict`,
/// `detectGateway`) by ARP for IPv4 and NDP for IPv6, then a gratuitous ARP or an unsolicited
/// neighbour advertisement for each address. Runs in the pod's namespace.
/// `Ok(Some((address, MAC)))`: another host answered for one of the pod's addresses.
fn segment_checks(
    s: &Settings,
    prev: &Value,
    ips: &[IpAddr],
    ifname: &str,
) -> Result<Option<(IpAddr, String)>, CniError> {
    // Link-local IPv6 addresses are the kernel's own (its duplicate address detection).
    let ips: Vec<IpAddr> = ips
        .iter()
        .copied()
        .filter(|i| !matches!(i, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80))
        .collect();
    if ips.is_empty() {
        return Ok(None);
    }
    let failed = |e: io::Error| io(&format!("ARP/NDP on the pod's {ifname}"), e);
    let mut seg = crate::arp::Arp::open(ifname).map_err(failed)?;
    if s.detect_ip_conflict {
        for ip in &ips {
            let answer = match ip {
                IpAddr::V4(a) => seg.ask(Ipv4Addr::UNSPECIFIED, *a, PROBE_TRIES, PROBE_WAIT),
                IpAddr::V6(a) => seg.ask6(Ipv6Addr::UNSPECIFIED, *a, PROBE_TRIES, PROBE_WAIT),
            };
            if let Some(mac) = answer.map_err(failed)? {
                return Ok(Some((*ip, mac.to_string())));
            }
        }
    }
    if s.detect_gateway {
        for entry in prev
            .get("ips")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(gw), Some(addr)) = (
                entry.get("gateway").and_then(Value::as_str),
                entry.get("address").and_then(Value::as_str),
            ) else {
                continue;
            };
            let (Ok(gw), Ok(net)) = (gw.parse::<IpAddr>(), addr.parse::<ipnet::IpNet>()) else {
                continue;
            };
            let (answer, protocol) = match (gw, net.addr()) {
                (IpAddr::V4(g), IpAddr::V4(own)) => {
                    (seg.ask(own, g, PROBE_TRIES, PROBE_WAIT), "ARP")
                }
                (IpAddr::V6(g), IpAddr::V6(own)) => {
                    (seg.ask6(own, g, PROBE_TRIES, PROBE_WAIT), "NDP")
                }
                _ => continue,
            };
            if answer.map_err(failed)?.is_none() {
                return Err(CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!(
                        "gateway {gw} of {} does not answer {protocol} on {ifname} (detectGateway)",
                        net.addr()
                    ),
                ));
            }
        }
    }
    for ip in &ips {
        match ip {
            IpAddr::V4(a) => seg.announce(*a),
            IpAddr::V6(a) => seg.announce6(*a),
        }
        .map_err(failed)?;
    }
    Ok(None)
}

/// Tells the agent that another host (`mac`) answers for the pod's `ip`: the agent holds the
/// address back from allocation and releases the container's addresses (upstream's
/// `DELETE /v1/ipam/ips` with `isReleaseConflictIPs`). Returns what to add to the ADD's error.
fn report_conflict(conf: &Value, env: &CniEnv, ip: IpAddr, mac: &str) -> String {
    let socket = PathBuf::from(
        conf.get("ipam_unix_socket_path")
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_SOCKET),
    );
    let arg = |k: &str| env.args.get(k).cloned().unwrap_or_default();
    let args = IpamBatchDelArgs {
        container_id: env.container_id.clone(),
        if_name: env.ifname.clone(),
        net_namespace: env.netns.clone(),
        pod_namespace: arg("K8S_POD_NAMESPACE"),
        pod_name: arg("K8S_POD_NAME"),
        pod_uid: arg("K8S_POD_UID"),
        is_release_conflict_ips: true,
        conflicts: vec![IpConflict {
            ip,
            mac: mac.to_string(),
        }],
    };
    let reply = crate::client::call(&socket, "DELETE", PATH_IPS, Some(&args))
        .and_then(|r| r.json::<IpamBatchDelResponse>(&socket));
    match reply {
        Ok(r) => r
            .held_back
            .iter()
            .map(|h| {
                format!(
                    "; held back from allocation until {} (SpiderReservedIP {})",
                    h.until, h.reservation
                )
            })
            .collect(),
        Err(e) => format!("; not held back: {}", e.msg),
    }
}

fn add(conf: &Value, env: &CniEnv) -> Result<Value, CniError> {
    let prev = conf.get("prevResult").cloned().ok_or_else(|| {
        invalid("prevResult is missing: coordinator is a chained plugin; put it after the interface plugin (e.g. macvlan with ipam spiderpool)".into())
    })?;
    let settings = Settings::merge(agent_settings(conf, env)?.as_ref(), conf)?;
    match settings.mode.as_str() {
        "disabled" => return Ok(prev),
        "overlay" => {
            return Err(invalid(
                "mode \"overlay\" is not supported by this coordinator yet (underlay and auto are)"
                    .into(),
            ))
        }
        _ => {}
    }
    let ips = pod_ips(&prev)?;
    if ips.is_empty() {
        return Err(invalid(
            "prevResult has no addresses: the interface plugin before coordinator must give the pod one"
                .into(),
        ));
    }
    let host_ns = File::open("/proc/self/ns/net")
        .map_err(|e| io("opening the node's network namespace", e))?;
    let pod_ns =
        File::open(&env.netns).map_err(|e| io(&format!("opening CNI_NETNS {:?}", env.netns), e))?;
    // On the shared segment first, before anything is made: nobody else answers for the pod's
    // addresses, its gateways answer; then the pod announces itself.
    enter(&pod_ns, "the pod's network namespace")?;
    let checked = segment_checks(&settings, &prev, &ips, &env.ifname);
    enter(&host_ns, "the node's network namespace")?;
    if let Some((ip, mac)) = checked? {
        let held = report_conflict(conf, env, ip, &mac);
        return Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "IP conflict: {ip} is already used on the segment of {} by {mac} (detectIPConflict){held}",
                env.ifname
            ),
        ));
    }
    let mut host = Netlink::open().map_err(|e| io("netlink on the node", e))?;
    let host_name = host_veth_name(&env.container_id, &env.ifname);
    let own = host
        .link(&host_name)
        .map_err(|e| io("netlink on the node", e))?;
    // A pod with a pair from another NIC's ADD: this NIC shares it.
    enter(&pod_ns, "the pod's network namespace")?;
    let pod_nl = Netlink::open();
    enter(&host_ns, "the node's network namespace")?;
    let mut pod_nl = pod_nl.map_err(|e| io("netlink in the pod", e))?;
    if let Some(pv) = pod_nl
        .link(POD_VETH)
        .map_err(|e| io("netlink in the pod", e))?
    {
        if own.as_ref().is_none_or(|o| pv.peer != Some(o.index)) {
            add_nic(&settings, env, &ips, &mut host, &mut pod_nl, &pv)?;
            return Ok(prev);
        }
    }
    // A pair left by an earlier ADD of this NIC is made again.
    if let Some(old) = own {
        remove_host_side(&mut host, &host_name, old.index)?;
    }
    host.add_veth(
        &host_name,
        POD_VETH,
        pod_ns.as_raw_fd(),
        settings.veth_mtu,
        settings.tx_queue_len,
    )
    .map_err(|e| {
        io(
            &format!("creating the veth pair {host_name} / {POD_VETH}"),
            e,
        )
    })?;
    let made = (|| {
        let hl = host
            .link(&host_name)
            .map_err(|e| io("netlink on the node", e))?
            .ok_or_else(|| io("the new veth", format!("{host_name} is gone")))?;
        host.set_up(hl.index)
            .map_err(|e| io(&format!("setting {host_name} up"), e))?;
        add_host_routes(
            &mut host,
            &ips,
            hl.index,
            settings.host_rule_table,
            &host_name,
        )?;
        let nodes = node_addresses(&mut host, hl.index)?;
        // The pod's side, through the socket opened inside its namespace (it keeps acting
        // there); only its sysctls need the namespace entered.
        if settings.pod_rp_filter >= 0 {
            enter(&pod_ns, "the pod's network namespace")?;
            let v = settings.pod_rp_filter.to_string();
            let set = ["all", POD_VETH].iter().try_for_each(|dev| {
                sysctl(&format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter"), &v)
            });
            enter(&host_ns, "the node's network namespace")?;
            set?;
        }
        let pod = &mut pod_nl;
        let pl = pod
            .link(POD_VETH)
            .map_err(|e| io("netlink in the pod", e))?
            .ok_or_else(|| io("the new veth", format!("{POD_VETH} is not in the pod")))?;
        let mut nic_mac = None;
        if let Some(mac) = settings.pod_mac_prefix.and_then(|p| pod_mac(p, &ips)) {
            let nic = pod
                .link(&env.ifname)
                .map_err(|e| io("netlink in the pod", e))?
                .ok_or_else(|| io("podMACPrefix", format!("the pod has no {}", env.ifname)))?;
            pod.set_mac(nic.index, &mac)
                .map_err(|e| io(&format!("setting the MAC address of {}", env.ifname), e))?;
            nic_mac = Some(crate::netlink::mac_string(&mac));
        }
        if let Some(a) = settings.veth_link_address {
            pod.add_address(pl.index, a)
                .map_err(|e| io(&format!("adding vethLinkAddress {a} to {POD_VETH}"), e))?;
        }
        pod.set_up(pl.index)
            .map_err(|e| io(&format!("setting {POD_VETH} up in the pod"), e))?;
        for r in pod_routes(&settings, &ips, &nodes, pl.index) {
            pod.add_route(&r).map_err(|e| {
                io(
                    &format!("adding the pod's route to {} via {POD_VETH}", r.dst),
                    e,
                )
            })?;
        }
        // Static neighbour entries both ways across the pair: no ARP or NDP on it.
        let (veth0_mac, host_mac) = (mac_of(&pl, POD_VETH)?, mac_of(&hl, &host_name)?);
        for ip in &ips {
            host.set_neighbour(hl.index, *ip, veth0_mac)
                .map_err(|e| io(&format!("the node's neighbour entry for {ip}"), e))?;
        }
        for n in nodes
            .iter()
            .filter(|n| ips.iter().any(|i| i.is_ipv4() == n.is_ipv4()))
        {
            pod.set_neighbour(pl.index, *n, host_mac)
                .map_err(|e| io(&format!("the pod's neighbour entry for {n}"), e))?;
        }
        Ok::<_, CniError>((hl, pl, nic_mac))
    })();
    let (hl, pl, nic_mac) = match made {
        Ok(l) => l,
        Err(e) => {
            // Nothing half-made stays behind.
            if let Ok(Some(l)) = host.link(&host_name) {
                let _ = remove_host_side(&mut host, &host_name, l.index);
            }
            return Err(e);
        }
    };
    let mut result = prev;
    let interfaces = result
        .as_object_mut()
        .ok_or_else(|| {
            CniError::new(
                code::DECODING_FAILURE,
                "decoding prevResult: not a JSON object",
            )
        })?
        .entry("interfaces")
        .or_insert_with(|| json!([]));
    if let Some(list) = interfaces.as_array_mut() {
        if let Some(mac) = nic_mac {
            for i in list.iter_mut() {
                if i["name"] == env.ifname.as_str() && i["sandbox"] == env.netns.as_str() {
                    i["mac"] = mac.clone().into();
                }
            }
        }
        list.push(json!({"name": host_name, "mac": hl.mac}));
        list.push(json!({"name": POD_VETH, "mac": pl.mac, "sandbox": env.netns}));
    }
    Ok(result)
}

fn del(conf: &Value, env: &CniEnv) -> Result<(), CniError> {
    let mut host = Netlink::open().map_err(|e| io("netlink on the node", e))?;
    let name = host_veth_name(&env.container_id, &env.ifname);
    if let Some(l) = host.link(&name).map_err(|e| io("netlink on the node", e))? {
        return remove_host_side(&mut host, &name, l.index);
    }
    // A NIC that shared another NIC's pair: the node's routes to its addresses (named by the
    // prevResult a runtime passes to DEL) and their rules.
    let ips = conf
        .get("prevResult")
        .and_then(|p| pod_ips(p).ok())
        .unwrap_or_default();
    remove_nic_host_routes(&mut host, &ips)
}

fn check(conf: &Value, env: &CniEnv) -> Result<(), CniError> {
    let settings = Settings::merge(None, conf)?;
    if settings.mode == "disabled" {
        return Ok(());
    }
    let prev = conf
        .get("prevResult")
        .ok_or_else(|| invalid("prevResult is missing".into()))?;
    let ips = pod_ips(prev)?;
    let mut host = Netlink::open().map_err(|e| io("netlink on the node", e))?;
    let name = host_veth_name(&env.container_id, &env.ifname);
    let own = host.link(&name).map_err(|e| io("netlink on the node", e))?;
    let (routes, rules) = routes_and_rules(&mut host)?;
    let has_rule = |dst: ipnet::IpNet, table: u32| {
        table == MAIN_TABLE || rules.iter().any(|(d, t, _)| *d == dst && *t == table)
    };
    let Some(l) = own else {
        // A NIC that shares another NIC's pair: its routes and rules on the node are enough.
        let shared = !ips.is_empty()
            && ips.iter().all(|ip| {
                let dst = ipnet::IpNet::from(*ip);
                routes
                    .iter()
                    .any(|r| r.dst == dst && r.table != MAIN_TABLE && has_rule(dst, r.table))
            });
        if shared {
            return Ok(());
        }
        return Err(CniError::new(
            code::CHECK_MISMATCH,
            format!(
                "the node has no {name}, the veth of container {}",
                env.container_id
            ),
        ));
    };
    for ip in &ips {
        let dst = ipnet::IpNet::from(*ip);
        let Some(r) = routes
            .iter()
            .find(|r| r.dst == dst && r.oif == Some(l.index))
        else {
            return Err(CniError::new(
                code::CHECK_MISMATCH,
                format!("the node has no route to {dst} via {name}"),
            ));
        };
        if !has_rule(dst, r.table) {
            return Err(CniError::new(
                code::CHECK_MISMATCH,
                format!(
                    "the node has no rule to {dst} lookup {}, where its route via {name} is",
                    r.table
                ),
            ));
        }
    }
    let neighbours = host
        .permanent_neighbours(l.index)
        .map_err(|e| io("listing the node's neighbour entries", e))?;
    if let Some(ip) = ips.iter().find(|ip| !neighbours.contains(ip)) {
        return Err(CniError::new(
            code::CHECK_MISMATCH,
            format!("the node has no neighbour entry for {ip} on {name}"),
        ));
    }
    Ok(())
}

/// Runs one CNI call of the coordinator. `Ok(Some(json))` is printed on stdout; errors carry
/// the version to report them in.
pub fn run(
    env: &HashMap<String, String>,
    stdin: &[u8],
) -> Result<Option<Value>, (String, CniError)> {
    let cmd = Command::parse(env.get("CNI_COMMAND").map(String::as_str))
        .map_err(|e| (FALLBACK_VERSION.to_string(), e))?;
    if cmd == Command::Version {
        return Ok(Some(version_answer(stdin)));
    }
    let conf: Value = serde_json::from_slice(stdin).map_err(|e| {
        (
            FALLBACK_VERSION.to_string(),
            CniError::new(
                code::DECODING_FAILURE,
                format!("decoding the network config: {e}"),
            ),
        )
    })?;
    let asked = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or(FALLBACK_VERSION)
        .to_string();
    check_version(&asked).map_err(|e| (FALLBACK_VERSION.to_string(), e))?;
    let with = |e: CniError| (asked.clone(), e);
    match cmd {
        Command::Gc | Command::Status | Command::Version => Ok(None),
        Command::Add => {
            let env = CniEnv::read(env, cmd).map_err(with)?;
            add(&conf, &env).map(Some).map_err(with)
        }
        Command::Del => {
            let env = CniEnv::read(env, cmd).map_err(with)?;
            del(&conf, &env).map(|()| None).map_err(with)
        }
        Command::Check => {
            let env = CniEnv::read(env, cmd).map_err(with)?;
            check(&conf, &env).map(|()| None).map_err(with)
        }
    }
}

#[cfg(test)]
mod tests {
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
}
