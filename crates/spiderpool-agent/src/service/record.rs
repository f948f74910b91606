//! The endpoint record of a pod: reading it, answering from it, and the op that writes it back
//! (the releases of what it holds are `Op::releases_of`).

use spiderpool_api::agent::{IpConfig, IpamAddResponse, Route};
use spiderpool_api::crd::EndpointInterface;
use spiderpool_api::{KubeObject, Object, SpiderEndpoint};
use spiderpool_store::{typed, Expect, Kind, Op, Revision, Store};

use super::{PodRef, Result};

pub(super) fn endpoint_of(o: Object) -> Option<SpiderEndpoint> {
    match o {
        Object::Endpoint(e) => Some(e),
        _ => None,
    }
}

pub(super) fn kube_of(o: Object) -> Option<KubeObject> {
    match o {
        Object::Kube(_, k) => Some(k),
        _ => None,
    }
}

/// The agent response for the NIC's record.
pub(super) fn response_of(nic: &EndpointInterface) -> IpamAddResponse {
    let mut ips = Vec::new();
    for (version, addr, pool, gw) in [
        (4, &nic.ipv4, &nic.ipv4_pool, &nic.ipv4_gateway),
        (6, &nic.ipv6, &nic.ipv6_pool, &nic.ipv6_gateway),
    ] {
        if let Some(a) = addr {
            ips.push(IpConfig {
                version,
                address: a.clone(),
                nic: nic.interface.clone(),
                ip_pool: pool.clone().unwrap_or_default(),
                gateway: gw.clone(),
                vlan: nic.vlan,
            });
        }
    }
    let routes = nic
        .routes
        .iter()
        .map(|r| Route {
            if_name: nic.interface.clone(),
            dst: r.dst.clone(),
            gw: r.gw.clone(),
        })
        .collect();
    IpamAddResponse {
        ips,
        routes,
        ..Default::default()
    }
}

/// An op that writes `ep` back (or deletes it when it holds no NIC), guarded by its revision.
pub(super) fn endpoint_write(key: String, ep: &SpiderEndpoint, rev: Option<Revision>) -> Op {
    let expect = rev.map_or(Expect::Absent, Expect::Revision);
    if ep.status.current.ips.is_empty() {
        Op::Delete {
            kind: Kind::Endpoint,
            key,
            expect,
        }
    } else {
        Op::Put {
            kind: Kind::Endpoint,
            key,
            value: typed::to_stored_value(&Object::Endpoint(ep.clone())),
            expect,
        }
    }
}

/// The endpoint record of the pod a DEL or CHECK names, with its key, its revision and the
/// request's NIC in it, when it holds the request's container on that NIC, or names no
/// container on it (a record upstream Spiderpool wrote, or whose `containerID` an old CRD schema
/// pruned: the caller decides). A bare container's record written by an earlier version (under
/// `default/<container ID>`) counts when it holds that container.
pub(super) async fn record_of(
    store: &dyn Store,
    pod: &PodRef,
) -> Result<Option<(String, SpiderEndpoint, Revision, EndpointInterface)>> {
    for key in std::iter::once(pod.key()).chain(pod.legacy_key()) {
        let found = typed::get(store, Kind::Endpoint, &key)
            .await?
            .and_then(|(o, rev)| endpoint_of(o).map(|e| (e, rev)));
        if let Some((ep, rev)) = found {
            if let Some(nic) = nic_of(&ep, pod) {
                return Ok(Some((key, ep, rev, nic)));
            }
        }
    }
    Ok(None)
}

/// The request's NIC in `ep`, when it holds the request's container there or names none.
pub(super) fn nic_of(ep: &SpiderEndpoint, pod: &PodRef) -> Option<EndpointInterface> {
    ep.status
        .current
        .ips
        .iter()
        .find(|n| {
            n.interface == pod.nic
                && (n.container_id == pod.container_id || n.container_id.is_empty())
        })
        .cloned()
}
