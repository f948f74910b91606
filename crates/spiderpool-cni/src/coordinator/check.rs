//! CHECK: the pair, the node's routes, rules and neighbour entries are all there.

use serde_json::Value;
use spiderpool_api::cni::code;

use crate::netlink::{Netlink, MAIN_TABLE};
use crate::plugin::CniEnv;
use crate::CniError;

use super::*;

pub(super) fn check(conf: &Value, env: &CniEnv) -> Result<(), CniError> {
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
