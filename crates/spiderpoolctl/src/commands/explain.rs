//! `explain pod NS/NAME`: the allocation rules run on the pod's facts without allocating.

use std::process::ExitCode;

use anyhow::bail;
use serde_json::json;
use spiderpool_api::{annotation, Object};
use spiderpool_control::autopool;
use spiderpool_core::pick::{free_set, lowest_free};
use spiderpool_core::{IpSet, PoolNames};
use spiderpool_store::{typed, Kind, Store};

/// What to explain.
pub(crate) struct Ask {
    pub(crate) kind: String,
    pub(crate) name: String,
    pub(crate) nic: String,
    pub(crate) node: Option<String>,
    pub(crate) v4: Vec<String>,
    pub(crate) v6: Vec<String>,
    pub(crate) multus: annotation::MultusDefaults,
    pub(crate) json: bool,
}

fn labels_and_annotations(
    o: Option<Object>,
) -> (
    spiderpool_core::Labels,
    std::collections::BTreeMap<String, String>,
) {
    o.map(|o| {
        let m = o.metadata();
        (m.labels.clone(), m.annotations.clone())
    })
    .unwrap_or_default()
}

pub(crate) async fn run(store: &dyn Store, ask: Ask) -> anyhow::Result<ExitCode> {
    if Kind::from_cli(&ask.kind) != Some(Kind::Pod) {
        bail!(
            "explain takes a pod: spiderpoolctl explain pod NAMESPACE/NAME (got {:?})",
            ask.kind
        );
    }
    let key = if ask.name.contains('/') {
        ask.name.clone()
    } else {
        format!("default/{}", ask.name)
    };
    let (namespace, pod) = key.split_once('/').expect("namespace/name");
    let Some((pod_obj, _)) = typed::get(store, Kind::Pod, &key).await? else {
        bail!("pod {key} not found");
    };
    let Object::Kube(_, pod_obj) = pod_obj else {
        bail!("pod {key} is not a Pod object");
    };
    let node = match ask
        .node
        .clone()
        .or_else(|| pod_obj.node_name().map(String::from))
    {
        Some(n) => n,
        None => bail!("pod {key} is not bound to a node: name one with --node"),
    };
    let (node_labels, _) =
        labels_and_annotations(typed::get(store, Kind::Node, &node).await?.map(|(o, _)| o));
    let (namespace_labels, namespace_annotations) = labels_and_annotations(
        typed::get(store, Kind::Namespace, namespace)
            .await?
            .map(|(o, _)| o),
    );
    let auto_pools = match autopool::pod_pools(store, &pod_obj, &ask.nic).await {
        Ok(p) => p,
        Err(autopool::PodPoolsError::NotReady(m)) => {
            bail!(
                "pod {key} interface {} waits for its auto pool: {m}",
                ask.nic
            )
        }
        Err(e) => return Err(e.into()),
    };
    let app_labels = autopool::top_controller(store, &pod_obj)
        .await?
        .map(|a| a.affinity_labels());
    // The NIC's network; its chain's spiderpool IPAM names the CNI config's default pools
    // unless --default-ipv4-ippool / --default-ipv6-ippool do.
    let net = network(store, &pod_obj, namespace, &ask).await?;
    let (mut v4, mut v6) = (ask.v4.clone(), ask.v6.clone());
    if v4.is_empty() && v6.is_empty() {
        if let Some((_, n)) = &net {
            let names = |k: &str| -> Vec<String> {
                n["ipamDefaults"][k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            };
            (v4, v6) = (names("default_ipv4_ippool"), names("default_ipv6_ippool"));
        }
    }
    let req = annotation::request(annotation::RequestFacts {
        namespace,
        pod,
        nic: &ask.nic,
        annotations: &pod_obj.metadata.annotations,
        labels: pod_obj.metadata.labels.clone(),
        namespace_labels,
        namespace_annotations: &namespace_annotations,
        node: &node,
        node_labels: node_labels.clone(),
        cni_default: PoolNames {
            v4,
            v6,
            clean_gateway: None,
        },
        cni_clean_gateway: false,
        multus: &ask.multus,
        auto_pools,
        app_labels,
    })?;
    let mut pools = Vec::new();
    let mut invalid = Vec::new();
    for (o, _) in typed::list(store, Kind::IPPool).await? {
        if let Object::IPPool(p) = o {
            match p.to_pool() {
                Ok(pool) => pools.push(pool),
                Err(e) => invalid.push(e.to_string()),
            }
        }
    }
    let mut reserved = IpSet::new();
    for (o, _) in typed::list(store, Kind::ReservedIP).await? {
        if let Object::ReservedIP(r) = o {
            if let Ok(s) = r.to_set() {
                reserved = reserved.union(&s);
            }
        }
    }
    // As the agent: Nodes' addresses and pools' gateways are never handed out.
    let mut node_addresses = Vec::new();
    for (o, _) in typed::list(store, Kind::Node).await? {
        if let Object::Kube(_, n) = o {
            node_addresses.extend(n.node_addresses());
        }
    }
    reserved = reserved.union(&spiderpool_core::pick::never_handed_out(
        &pools,
        node_addresses,
    ));
    // What the pod already holds on this NIC: a repeated ADD is answered with it.
    let holds = match typed::get(store, Kind::Endpoint, &key).await? {
        Some((Object::Endpoint(ep), _)) => ep
            .status
            .current
            .ips
            .iter()
            .find(|n| n.interface == ask.nic)
            .map(|n| n.held()),
        _ => None,
    };
    let mut out =
        json!({"pod": key, "interface": ask.nic, "node": node, "nodeLabels": node_labels});
    let mut lines = vec![format!(
        "pod {key}, interface {}, node {node} ({})",
        ask.nic,
        if node_labels.is_empty() {
            "no labels".to_string()
        } else {
            node_labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        }
    )];
    for e in &invalid {
        lines.push(format!("ignored (invalid): {e}"));
    }
    if let Some((line, v)) = &net {
        lines.push(line.clone());
        out["network"] = v.clone();
    }
    let ok = match req.plan(&pools) {
        Err(e) => {
            lines.push(format!("no address: {e}"));
            out["error"] = json!(e.to_string());
            false
        }
        Ok(plan) => {
            lines.push(format!("candidates from: {}", plan.source));
            out["source"] = json!(plan.source.to_string());
            let mut families = Vec::new();
            let mut all_ok = true;
            for fp in &plan.families {
                lines.push(format!("{}:", fp.family));
                let mut candidates = Vec::new();
                let mut pick = None;
                for (i, pool) in fp.pools.iter().enumerate() {
                    let held = IpSet::from_ips(
                        store
                            .allocations(&pool.name)
                            .await?
                            .into_iter()
                            .map(|a| a.ip),
                    );
                    let free = free_set(pool, &reserved, &held).len();
                    let next = lowest_free(pool, &reserved, &held);
                    if pick.is_none() {
                        pick = next.map(|ip| (pool.name.clone(), ip));
                    }
                    lines.push(format!(
                        "  {}. {:<20} kept      {free} free{}",
                        i + 1,
                        pool.name,
                        next.map(|ip| format!(", next {ip}")).unwrap_or_default()
                    ));
                    candidates.push(json!({"pool": pool.name, "kept": true, "free": free as u64, "next": next.map(|i| i.to_string())}));
                }
                for r in &fp.rejected {
                    lines.push(format!("  -  {:<20} filtered  {}", r.pool, r.reason));
                    candidates.push(
                        json!({"pool": r.pool, "kept": false, "reason": r.reason.to_string()}),
                    );
                }
                match &pick {
                    Some((pool, ip)) => lines.push(format!("  would allocate {ip} from {pool}")),
                    None => {
                        all_ok = false;
                        lines.push("  no address: every candidate is exhausted".into());
                    }
                }
                families.push(
                    json!({"family": fp.family.to_string(), "candidates": candidates,
                    "wouldAllocate": pick.map(|(p, ip)| json!({"pool": p, "ip": ip.to_string()}))}),
                );
            }
            out["families"] = json!(families);
            all_ok
        }
    };
    if let Some(held) = holds {
        let s: Vec<String> = held.iter().map(|(p, ip)| format!("{ip} of {p}")).collect();
        lines.push(format!(
            "the pod already holds {} on {} (a repeated ADD of its container is answered with it)",
            s.join(", "),
            ask.nic
        ));
        out["holds"] = json!(s);
    }
    if ask.json {
        println!("{}", serde_json::to_string_pretty(&out).expect("JSON"));
    } else {
        for l in lines {
            println!("{l}");
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Which NetworkAttachmentDefinition attaches the NIC (Multus's annotations), the plugins of
/// its chain, and the SpiderMultusConfig that generated it, if one did.
async fn network(
    store: &dyn Store,
    pod: &spiderpool_api::k8s::KubeObject,
    namespace: &str,
    ask: &Ask,
) -> anyhow::Result<Option<(String, serde_json::Value)>> {
    let Some(net) =
        annotation::multus_network(&pod.metadata.annotations, namespace, &ask.nic, &ask.multus)?
    else {
        return Ok(None);
    };
    let Some((Object::Kube(_, nad), _)) = typed::get(store, Kind::NetworkAttachment, &net).await?
    else {
        return Ok(Some((
            format!("network {net}: no such NetworkAttachmentDefinition"),
            json!({"name": net, "found": false}),
        )));
    };
    let config: Option<serde_json::Value> = nad
        .spec
        .get("config")
        .and_then(serde_json::Value::as_str)
        .and_then(|c| serde_json::from_str(c).ok());
    let list: Vec<serde_json::Value> = match &config {
        Some(c) => match c.get("plugins").and_then(serde_json::Value::as_array) {
            Some(list) => list.clone(),
            None => vec![c.clone()],
        },
        None => Vec::new(),
    };
    let plugins: Vec<String> = list.iter().map(plugin_name).collect();
    let ipam_defaults = list
        .iter()
        .filter_map(|p| p.get("ipam"))
        .find(|i| i.get("type").and_then(serde_json::Value::as_str) == Some("spiderpool"))
        .map(|i| {
            json!({"default_ipv4_ippool": i.get("default_ipv4_ippool"),
                "default_ipv6_ippool": i.get("default_ipv6_ippool")})
        });
    let smc = nad
        .metadata
        .owner_references
        .iter()
        .find(|r| r.kind == "SpiderMultusConfig" && r.controller == Some(true))
        .map(|r| {
            format!(
                "{}/{}",
                nad.metadata.namespace.as_deref().unwrap_or(namespace),
                r.name
            )
        });
    let line = format!(
        "network {net} (NetworkAttachmentDefinition{}): {}",
        smc.as_ref()
            .map(|s| format!(", generated by SpiderMultusConfig {s}"))
            .unwrap_or_default(),
        if plugins.is_empty() {
            "no config".to_string()
        } else {
            plugins.join(" → ")
        }
    );
    Ok(Some((
        line,
        json!({"name": net, "found": true, "spiderMultusConfig": smc, "plugins": plugins,
            "ipamDefaults": ipam_defaults}),
    )))
}

/// A plugin of a chain: its type, and its IPAM's type after `+`.
fn plugin_name(p: &serde_json::Value) -> String {
    let t = p
        .get("type")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("?");
    match p.pointer("/ipam/type").and_then(serde_json::Value::as_str) {
        Some(ipam) => format!("{t}+{ipam}"),
        None => t.to_string(),
    }
}
