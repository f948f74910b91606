//! IP conflict and gateway detection (ARP for IPv4, NDP for IPv6) on the pod's interface, the
//! report of a conflict to the agent (which holds the address back), and the announcement of
//! each address. The `spiderpool` IPAM plugin runs them when the agent's switches say so
//! (upstream's `enableIPConflictDetection` / `enableGatewayDetection`, so a chain without the
//! coordinator gets them too); the coordinator when its settings do.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use spiderpool_api::agent::{IpConflict, IpamBatchDelArgs, IpamBatchDelResponse, PATH_IPS};
use spiderpool_api::cni::code;

use crate::{enter, io, CniError};

/// Which probes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Detect {
    /// Probe the segment for each of the pod's addresses.
    pub ip_conflict: bool,
    /// Check that each gateway answers.
    pub gateway: bool,
}

/// How long a probe waits for an answer, per try.
pub const PROBE_WAIT: Duration = Duration::from_millis(200);
/// Tries of a probe and of a gateway request.
pub const PROBE_TRIES: u32 = 3;

/// IP conflict and gateway detection on the pod's interface (`detectIPConflict`,
/// `detectGateway`) by ARP for IPv4 and NDP for IPv6, then a gratuitous ARP or an unsolicited
/// neighbour advertisement for each address. Runs in the pod's namespace.
/// `Ok(Some((address, MAC)))`: another host answered for one of the pod's addresses.
pub fn segment_checks(
    detect: Detect,
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
    if detect.ip_conflict {
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
    if detect.gateway {
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
/// `DELETE /v1/ipam/ips` with `isReleaseConflictIPs`); `holder` names the container (its
/// `CniEnv::holder`). Returns what to add to the ADD's error.
pub fn report_conflict(socket: &Path, holder: &IpamBatchDelArgs, ip: IpAddr, mac: &str) -> String {
    let args = IpamBatchDelArgs {
        is_release_conflict_ips: true,
        conflicts: vec![IpConflict {
            ip,
            mac: mac.to_string(),
        }],
        ..holder.clone()
    };
    let reply = crate::client::call(socket, "DELETE", PATH_IPS, Some(&args))
        .and_then(|r| r.json::<IpamBatchDelResponse>(socket));
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

/// The error of an ADD whose address another host (`mac`) answers for; `held` says whether the
/// agent holds it back.
pub fn conflict_error(ip: IpAddr, ifname: &str, mac: &str, held: &str) -> CniError {
    CniError::new(
        code::TRY_AGAIN_LATER,
        format!("IP conflict: {ip} is already used on the segment of {ifname} by {mac} (detectIPConflict){held}"),
    )
}

/// The `spiderpool` IPAM plugin's probes, in the pod's namespace (`CNI_NETNS`) on its interface
/// (`CNI_IFNAME`, made by the main plugin and brought up here), for the addresses and gateways
/// of `result` (the IPAM result in its JSON form). A conflict is reported to the agent at
/// `socket`, which releases the addresses and holds the one in conflict back.
pub fn ipam_checks(
    detect: Detect,
    result: &Value,
    holder: &IpamBatchDelArgs,
    socket: &Path,
) -> Result<(), CniError> {
    let ips: Vec<IpAddr> = result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("address").and_then(Value::as_str))
        .filter_map(|a| a.parse::<ipnet::IpNet>().ok())
        .map(|n| n.addr())
        .collect();
    let host = File::open("/proc/self/ns/net")
        .map_err(|e| io("opening the node's network namespace", e))?;
    let ifname = holder.if_name.as_str();
    let pod = File::open(&holder.net_namespace)
        .map_err(|e| io(&format!("opening CNI_NETNS {:?}", holder.net_namespace), e))?;
    enter(&pod, "the pod's network namespace")?;
    let checked = up(ifname).and_then(|()| segment_checks(detect, result, &ips, ifname));
    enter(&host, "the node's network namespace")?;
    if let Some((ip, mac)) = checked? {
        let held = report_conflict(socket, holder, ip, &mac);
        return Err(conflict_error(ip, ifname, &mac, &held));
    }
    Ok(())
}

/// Brings the pod's interface up (the main plugin made it; probes need it up).
fn up(ifname: &str) -> Result<(), CniError> {
    let failed = |e: io::Error| io(&format!("bringing the pod's {ifname} up"), e);
    let mut nl = crate::netlink::Netlink::open().map_err(failed)?;
    let link = nl.link(ifname).map_err(failed)?.ok_or_else(|| {
        CniError::new(
            code::IO_FAILURE,
            format!("the pod has no interface {ifname:?} to probe from (CNI_IFNAME): the main plugin makes it before calling IPAM"),
        )
    })?;
    nl.set_up(link.index).map_err(failed)
}
