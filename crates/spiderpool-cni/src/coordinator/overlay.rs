//! Overlay mode: the pod's first NIC (`eth0`) is the cluster CNI's (Calico, Cilium, a bridge),
//! this NIC an underlay one (macvlan with spiderpool). `eth0` keeps the default route and
//! carries the Services, the cluster's pod CIDRs and the node; this NIC keeps its subnet, and
//! whatever else its addresses send goes by policy routing: its routes move to a table of its
//! own (100 + its interface index) looked up by rules `from` its addresses, where the node, the
//! Services, `hijackCIDR` and the overlay pod CIDRs go through `eth0` too, so a reply takes
//! the way the request came. The node reaches the underlay addresses through `eth0`'s node
//! side (its veth peer, or the bridge that peer is a port of), in `hostRuleTable`. DEL removes
//! exactly that.

use std::io;
use std::net::IpAddr;

use crate::netlink::{Netlink, Route, RouteSpec, MAIN_TABLE};
use crate::plugin::CniEnv;
use crate::CniError;

use super::*;

/// The NIC of the pod's default route other than `this` (the cluster CNI's): per family, its
/// interface and next hop. Pure.
pub fn overlay_defaults(main: &[Route], this: u32) -> Vec<(bool, u32, Option<IpAddr>)> {
    [true, false]
        .into_iter()
        .filter_map(|v4| {
            main.iter()
                .find(|r| {
                    r.table == MAIN_TABLE
                        && r.unicast
                        && r.dst.prefix_len() == 0
                        && r.dst.addr().is_ipv4() == v4
                        && r.oif.is_some_and(|o| o != this)
                })
                .and_then(|r| Some((v4, r.oif?, r.via)))
        })
        .collect()
}

/// Whether `auto` means overlay for this NIC: the pod has no pair (no underlay NIC before
/// it) and its default route is another NIC's.
pub(super) fn is_overlay(pod: &mut Netlink, ifname: &str) -> Result<bool, CniError> {
    let failed = |e: io::Error| io("netlink in the pod", e);
    if pod.link(POD_VETH).map_err(failed)?.is_some() {
        return Ok(false);
    }
    let Some(this) = pod.link(ifname).map_err(failed)? else {
        return Ok(false);
    };
    Ok(!overlay_defaults(&pod.all_routes().map_err(failed)?, this.index).is_empty())
}

/// The pod's routes through `eth0` for this NIC's table: the node, the Services, `hijackCIDR`
/// and the overlay pod CIDRs of each family `eth0` has a default route of. Pure.
pub fn overlay_routes(
    s: &Settings,
    nodes: &[IpAddr],
    defaults: &[(bool, u32, Option<IpAddr>)],
    table: u32,
) -> Vec<RouteSpec> {
    let dsts: Vec<ipnet::IpNet> = nodes
        .iter()
        .map(|n| ipnet::IpNet::from(*n))
        .chain(s.service_cidr.iter().map(|c| c.trunc()))
        .chain(s.hijack_cidr.iter().map(|c| c.trunc()))
        .chain(s.overlay_pod_cidr.iter().map(|c| c.trunc()))
        .collect();
    through_eth0(&dsts, defaults, table)
}

/// Routes in `table` to each of `dsts` through the default route of its family in `defaults`.
fn through_eth0(
    dsts: &[ipnet::IpNet],
    defaults: &[(bool, u32, Option<IpAddr>)],
    table: u32,
) -> Vec<RouteSpec> {
    let mut out = Vec::new();
    for (v4, oif, via) in defaults {
        for dst in dsts.iter().filter(|d| d.addr().is_ipv4() == *v4) {
            out.push(RouteSpec {
                dst: *dst,
                via: *via,
                oif: *oif,
                table,
                src: None,
            });
        }
    }
    out.dedup();
    out
}

/// ADD in overlay mode (the pod's namespace reached through `pod`, the node's through `host`).
pub(super) fn add_overlay(
    settings: &Settings,
    env: &CniEnv,
    ips: &[IpAddr],
    host: &mut Netlink,
    pod: &mut Netlink,
) -> Result<(), CniError> {
    let failed = |e: io::Error| io("netlink in the pod", e);
    let this = pod
        .link(&env.ifname)
        .map_err(failed)?
        .ok_or_else(|| io("overlay mode", format!("the pod has no {}", env.ifname)))?;
    let main: Vec<Route> = pod
        .all_routes()
        .map_err(failed)?
        .into_iter()
        .filter(|r| r.table == MAIN_TABLE && r.unicast)
        .collect();
    let defaults = overlay_defaults(&main, this.index);
    let Some(&(_, overlay_oif, _)) = defaults.first() else {
        return Err(invalid(format!(
            "mode \"overlay\": the pod has no default route through a NIC other than {} (the cluster CNI's eth0 comes first)",
            env.ifname
        )));
    };
    // eth0's side on the node: its veth peer, or the bridge that peer is a port of.
    let peer = pod
        .link_by_index(overlay_oif)
        .map_err(failed)?
        .and_then(|l| l.peer)
        .ok_or_else(|| {
            io(
                "overlay mode",
                "the pod's default-route NIC is not a veth: its node side cannot be found",
            )
        })?;
    let host_side = host
        .link_by_index(peer)
        .map_err(|e| io("netlink on the node", e))?
        .ok_or_else(|| {
            io(
                "overlay mode",
                format!("the node has no link {peer} (eth0's peer)"),
            )
        })?;
    let host_index = host_side.master.unwrap_or(peer);
    let nodes = node_addresses(host, 0)?;
    let table = POD_TABLE_BASE + this.index;
    let made = (|| {
        move_routes_to_table(pod, &main, this.index, table)?;
        for r in overlay_routes(settings, &nodes, &defaults, table) {
            pod.add_route(&r).map_err(|e| {
                io(
                    &format!("adding the route to {} to table {table}", r.dst),
                    e,
                )
            })?;
        }
        // The node's addresses lie in the underlay subnet: through eth0 from any address.
        let node_nets: Vec<ipnet::IpNet> = nodes.iter().map(|n| ipnet::IpNet::from(*n)).collect();
        for r in through_eth0(&node_nets, &defaults, MAIN_TABLE) {
            pod.add_route(&r)
                .map_err(|e| io(&format!("adding the route to the node {}", r.dst), e))?;
        }
        for ip in ips {
            pod.add_source_rule(ipnet::IpNet::from(*ip), table, HOST_RULE_PRIORITY)
                .map_err(|e| io(&format!("adding the pod's rule from {ip}"), e))?;
        }
        add_host_routes(
            host,
            ips,
            host_index,
            settings.host_rule_table,
            "eth0's node side",
        )
    })();
    if let Err(e) = made {
        let _ = remove_nic_host_routes(host, ips);
        let _ = remove_overlay_pod_side(pod, host, &env.ifname, ips);
        return Err(e);
    }
    Ok(())
}

/// Undoes the pod's side of overlay mode for `ifname` with `ips`: its rules and table, and
/// the main table's routes to the node through the other NIC. A NIC already gone is no error.
pub(super) fn remove_overlay_pod_side(
    pod: &mut Netlink,
    host: &mut Netlink,
    ifname: &str,
    ips: &[IpAddr],
) -> Result<(), CniError> {
    let failed = |e: io::Error| io("netlink in the pod", e);
    let Some(this) = pod.link(ifname).map_err(failed)? else {
        return Ok(());
    };
    let table = POD_TABLE_BASE + this.index;
    for ip in ips {
        pod.delete_source_rule(ipnet::IpNet::from(*ip), table, HOST_RULE_PRIORITY)
            .map_err(|e| io(&format!("deleting the pod's rule from {ip}"), e))?;
    }
    let routes = pod.all_routes().map_err(failed)?;
    let defaults = overlay_defaults(&routes, this.index);
    let nodes = node_addresses(host, 0)?;
    for r in &routes {
        let to_node = r.table == MAIN_TABLE
            && nodes.contains(&r.dst.addr())
            && r.dst.prefix_len() == r.dst.max_prefix_len()
            && defaults
                .iter()
                .any(|(_, oif, via)| r.oif == Some(*oif) && r.via == *via);
        if r.table == table || to_node {
            pod.delete_route(r)
                .map_err(|e| io(&format!("deleting the pod's route to {}", r.dst), e))?;
        }
    }
    Ok(())
}
