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

use serde_json::Value;
use spiderpool_api::cni::code;

use crate::plugin::{check_version, version_answer, CniEnv, Command, FALLBACK_VERSION};
use crate::CniError;
// Shared with the IPAM plugin's probes; the submodules take them through `super::*`.
pub(crate) use crate::{enter, io};

mod add;
mod check;
mod del;
mod host;
mod overlay;
mod pod;
mod settings;
#[cfg(test)]
mod tests;

use crate::probe::*;
use add::add;
use check::check;
use del::del;
use host::*;
use overlay::*;
pub use overlay::{overlay_defaults, overlay_routes};
pub use pod::pod_routes;
use pod::*;
use settings::*;
pub use settings::{pod_mac, Settings};

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

/// A pod's table for the routes of a NIC other than its default-route one: 100 + the NIC's
/// interface index, looked up by a rule `from NIC-ADDRESS`.
pub const POD_TABLE_BASE: u32 = 100;

/// Priority of the node's rules `to POD-ADDRESS lookup hostRuleTable` (upstream's).
pub const HOST_RULE_PRIORITY: u32 = 1000;
/// `hostRuleTable`'s default (upstream's).
pub const HOST_RULE_TABLE: u32 = 500;

fn sysctl(path: &str, value: &str) -> Result<(), CniError> {
    std::fs::write(path, value).map_err(|e| io(&format!("writing {path}"), e))
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
