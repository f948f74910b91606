//! The pod's side: the first NIC's pair and routes (to the node, the Services and
//! `hijackCIDR` through it), a later NIC sharing the pair, and `tunePodRoutes` across NICs.

use std::io;
use std::net::IpAddr;

use serde_json::Value;
use spiderpool_api::cni::code;

use crate::netlink::{Netlink, RouteSpec, MAIN_TABLE};
use crate::plugin::{prev_result_addresses, CniEnv};
use crate::CniError;

use super::*;

/// A NIC added to a pod that has a pair already (an earlier NIC's ADD made it): the node's
/// routes to its addresses go through that pair, and (`tunePodRoutes`) the pod's routes are
/// sorted out so that one NIC keeps the default route in main and the other's routes move to
/// a table of its own, looked up by rules `from` its addresses.
pub(super) fn add_nic(
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

pub(super) fn tune_pod_routes(
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
    move_routes_to_table(pod, &main, moved, table)?;
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

/// Copies the main-table routes of the NIC `index` (`main`, as listed) to `table` and takes
/// its default route out of main; IPv6 link-local routes stay.
pub(super) fn move_routes_to_table(
    pod: &mut Netlink,
    main: &[crate::netlink::Route],
    index: u32,
    table: u32,
) -> Result<(), CniError> {
    for r in main.iter().filter(|r| r.oif == Some(index)) {
        if matches!(r.dst, ipnet::IpNet::V6(n) if n.addr().segments()[0] & 0xffc0 == 0xfe80) {
            continue;
        }
        pod.add_route(&RouteSpec {
            dst: r.dst,
            via: r.via,
            oif: index,
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
    Ok(())
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

pub(super) fn pod_ips(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
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
