//! The node's side of the pair: the node's own addresses, its routes to the pod's addresses in
//! `hostRuleTable` with a rule to each, the neighbour entries, and their removal.

use std::net::IpAddr;

use crate::netlink::{Netlink, RouteSpec, MAIN_TABLE};
use crate::CniError;

use super::*;

/// The node's addresses to route through: per family, the global addresses of the interface of
/// the node's default route, else every global address (none of the pair's own).
pub(super) fn node_addresses(host: &mut Netlink, skip: u32) -> Result<Vec<IpAddr>, CniError> {
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

pub(super) fn host_routes(pod_ips: &[IpAddr], oif: u32, table: u32) -> Vec<RouteSpec> {
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
pub(super) type NodeRules = Vec<(ipnet::IpNet, u32, u32)>;
pub(super) fn routes_and_rules(
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
pub(super) fn mac_of(l: &crate::netlink::Link, name: &str) -> Result<[u8; 6], CniError> {
    crate::netlink::parse_mac(&l.mac)
        .ok_or_else(|| io(name, format!("no Ethernet address ({:?})", l.mac)))
}

/// The node's routes to `ips` through the host end `index` in `table`, each with its rule
/// `to ADDRESS lookup table` (none in main).
pub(super) fn add_host_routes(
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
pub(super) fn remove_nic_host_routes(host: &mut Netlink, ips: &[IpAddr]) -> Result<(), CniError> {
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

/// Undoes the node's side of a pair: the rules `to POD-ADDRESS` of the routes through the host
/// end (found in every table, so no setting is needed), then the pair itself, which takes its
/// routes and neighbour entries with it. A pair already gone is no error.
pub(super) fn remove_host_side(host: &mut Netlink, name: &str, index: u32) -> Result<(), CniError> {
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
