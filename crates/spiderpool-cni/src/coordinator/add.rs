//! ADD: settings, checks, then the pair, routes, rules and neighbour entries.

use std::fs::File;
use std::os::fd::AsRawFd;

use serde_json::{json, Value};
use spiderpool_api::cni::code;

use crate::netlink::Netlink;
use crate::plugin::CniEnv;
use crate::CniError;

use super::*;

pub(super) fn add(conf: &Value, env: &CniEnv) -> Result<Value, CniError> {
    let prev = conf.get("prevResult").cloned().ok_or_else(|| {
        invalid("prevResult is missing: coordinator is a chained plugin; put it after the interface plugin (e.g. macvlan with ipam spiderpool)".into())
    })?;
    let settings = Settings::merge(agent_settings(conf, env)?.as_ref(), conf)?;
    if settings.mode == "disabled" {
        return Ok(prev);
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
    let detect = Detect {
        ip_conflict: settings.detect_ip_conflict,
        gateway: settings.detect_gateway,
    };
    let checked = segment_checks(detect, &prev, &ips, &env.ifname);
    enter(&host_ns, "the node's network namespace")?;
    if let Some((ip, mac)) = checked? {
        let socket = std::path::PathBuf::from(
            conf.get("ipam_unix_socket_path")
                .and_then(Value::as_str)
                .unwrap_or(spiderpool_api::cni::DEFAULT_SOCKET),
        );
        let held = report_conflict(&socket, &env.holder(), ip, &mac);
        return Err(conflict_error(ip, &env.ifname, &mac, &held));
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
    // Overlay: eth0 is the cluster CNI's (`auto`: this NIC comes after a default route of
    // another NIC, and no underlay NIC made a pair before it).
    let overlay = match settings.mode.as_str() {
        "overlay" => true,
        "auto" => is_overlay(&mut pod_nl, &env.ifname)?,
        _ => false,
    };
    if overlay {
        if settings.pod_rp_filter >= 0 {
            enter(&pod_ns, "the pod's network namespace")?;
            let v = settings.pod_rp_filter.to_string();
            let set = ["all", env.ifname.as_str()].iter().try_for_each(|dev| {
                sysctl(&format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter"), &v)
            });
            enter(&host_ns, "the node's network namespace")?;
            set?;
        }
        add_overlay(&settings, env, &ips, &mut host, &mut pod_nl)?;
        return Ok(prev);
    }
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
