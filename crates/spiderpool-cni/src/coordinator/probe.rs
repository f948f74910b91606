//! Before anything is made: IP conflict and gateway detection (ARP for IPv4, NDP for IPv6)
//! on the pod's interface, the report of a conflict to the agent, and the announcement of
//! each address.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use spiderpool_api::agent::{IpConflict, IpamBatchDelArgs, IpamBatchDelResponse, PATH_IPS};
use spiderpool_api::cni::{code, DEFAULT_SOCKET};

use crate::plugin::CniEnv;
use crate::CniError;

use super::*;

/// How long a probe waits for an answer, per try.
pub(super) const PROBE_WAIT: Duration = Duration::from_millis(200);
/// Tries of a probe and of a gateway request.
pub(super) const PROBE_TRIES: u32 = 3;

/// IP conflict and gateway detection on the pod's interface (`detectIPConflict`,
/// `detectGateway`) by ARP for IPv4 and NDP for IPv6, then a gratuitous ARP or an unsolicited
/// neighbour advertisement for each address. Runs in the pod's namespace.
/// `Ok(Some((address, MAC)))`: another host answered for one of the pod's addresses.
pub(super) fn segment_checks(
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
pub(super) fn report_conflict(conf: &Value, env: &CniEnv, ip: IpAddr, mac: &str) -> String {
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
