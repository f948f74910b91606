//! DEL: the node's rules for the pair's routes, then the pair; idempotent.

use std::fs::File;

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
    // A NIC that shared another NIC's pair, or one in overlay mode: the node's routes to its
    // addresses (named by the prevResult a runtime passes to DEL) and their rules; in overlay
    // mode (the pod has no pair) also the pod's rules and table, while its namespace is there.
    let ips = conf
        .get("prevResult")
        .and_then(|p| pod_ips(p).ok())
        .unwrap_or_default();
    remove_nic_host_routes(&mut host, &ips)?;
    let Ok(pod_ns) = File::open(&env.netns) else {
        return Ok(());
    };
    let host_ns = File::open("/proc/self/ns/net")
        .map_err(|e| io("opening the node's network namespace", e))?;
    enter(&pod_ns, "the pod's network namespace")?;
    let pod = Netlink::open();
    enter(&host_ns, "the node's network namespace")?;
    let mut pod = pod.map_err(|e| io("netlink in the pod", e))?;
    if pod
        .link(POD_VETH)
        .map_err(|e| io("netlink in the pod", e))?
        .is_some()
    {
        return Ok(());
    }
    remove_overlay_pod_side(&mut pod, &mut host, &env.ifname, &ips)
}
