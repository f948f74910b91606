//! DEL: the node's rules for the pair's routes, then the pair; idempotent.

use serde_json::Value;

use crate::netlink::Netlink;
use crate::plugin::CniEnv;
use crate::CniError;

use super::*;

pub(super) fn del(conf: &Value, env: &CniEnv) -> Result<(), CniError> {
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
