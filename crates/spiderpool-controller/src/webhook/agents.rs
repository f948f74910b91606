//! Node restriction for agents, as the API server's NodeRestriction limits kubelets: an
//! agent's identity may add or remove only the `status.allocatedIPs` entries of its own node,
//! and may create, change or delete only the SpiderReservedIPs agents make (`ip-conflict-*`).
//! One compromised node then cannot free a live pod's address elsewhere (and so cause a
//! duplicate) nor drop an admin's reservation.
//!
//! An agent is a user named in `--agent-users` (the chart's service account), whose node is the
//! `authentication.kubernetes.io/node-name` claim the API server puts in a pod-bound token's
//! user info, or a user `spiderpool-agent:NODE` (a per-node identity outside a pod, as
//! `system:node:NODE` is a kubelet's). An entry records the node of the agent that wrote it;
//! an entry without one (written by upstream) belongs to the node its Pod runs on.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::UserInfo;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::core::DynamicObject;
use serde_json::Value;
use spiderpool_api::keys::CONFLICT_PREFIX;
use spiderpool_store::{typed, Kind, Store};

/// The user-info key of a pod-bound service-account token's node.
pub const NODE_CLAIM: &str = "authentication.kubernetes.io/node-name";
/// The user-name prefix of a per-node agent identity (`spiderpool-agent:NODE`).
pub const NODE_USER_PREFIX: &str = "spiderpool-agent:";

/// Who asks, as far as node restriction goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asker {
    /// Not an agent: not restricted here.
    Other,
    /// An agent of this node.
    Agent { user: String, node: String },
    /// An agent identity without a node: refused every restricted write.
    Nodeless { user: String },
}

/// Who `user` is, given the agent users.
pub fn asker(user: &UserInfo, agent_users: &[String]) -> Asker {
    let name = user.username.clone().unwrap_or_default();
    if let Some(node) = name.strip_prefix(NODE_USER_PREFIX) {
        return if node.is_empty() {
            Asker::Nodeless { user: name }
        } else {
            Asker::Agent {
                node: node.to_string(),
                user: name,
            }
        };
    }
    if !agent_users.contains(&name) {
        return Asker::Other;
    }
    match user
        .extra
        .as_ref()
        .and_then(|e| e.get(NODE_CLAIM))
        .and_then(|v| v.first())
        .filter(|n| !n.is_empty())
    {
        Some(node) => Asker::Agent {
            node: node.clone(),
            user: name,
        },
        None => Asker::Nodeless { user: name },
    }
}

/// One entry of `status.allocatedIPs` as far as the restriction reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    pod: String,
    node: String,
    raw: Value,
}

fn entries(o: Option<&DynamicObject>) -> Result<BTreeMap<String, Entry>, String> {
    let Some(o) = o else {
        return Ok(BTreeMap::new());
    };
    let text = match o.data.pointer("/status/allocatedIPs") {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::String(s)) if s.is_empty() => return Ok(BTreeMap::new()),
        Some(Value::String(s)) => s,
        Some(other) => return Err(format!("status.allocatedIPs is not a string: {other}")),
    };
    let map: BTreeMap<String, Value> =
        serde_json::from_str(text).map_err(|e| format!("status.allocatedIPs: {e}"))?;
    map.into_iter()
        .map(|(ip, raw)| {
            let field = |f: &str| raw.get(f).and_then(Value::as_str).unwrap_or("").to_string();
            if !raw.is_object() {
                return Err(format!("status.allocatedIPs[{ip}] is not an object"));
            }
            let e = Entry {
                pod: field("pod"),
                node: field("node"),
                raw: raw.clone(),
            };
            Ok((ip, e))
        })
        .collect()
}

/// The node an entry belongs to: the one it records, else its Pod's (`None`: no Pod).
async fn node_of(store: &dyn Store, e: &Entry) -> Result<Option<String>, String> {
    if !e.node.is_empty() {
        return Ok(Some(e.node.clone()));
    }
    if !e.pod.contains('/') {
        return Ok(None);
    }
    match typed::get(store, Kind::Pod, &e.pod).await {
        Ok(Some((spiderpool_api::Object::Kube(_, k), _))) => Ok(k.node_name().map(str::to_string)),
        Ok(_) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Why an agent's request is refused, if it is.
pub async fn refusal(
    store: &dyn Store,
    req: &AdmissionRequest<DynamicObject>,
    asker: &Asker,
) -> Option<String> {
    let (user, node) = match asker {
        Asker::Other => return None,
        Asker::Agent { user, node } => (user, node),
        Asker::Nodeless { user } => {
            return Some(format!(
                "user {user:?} is a Spiderpool agent without a node: its token carries no {NODE_CLAIM} (a pod-bound service-account token does) and its name is not {NODE_USER_PREFIX}NODE"
            ))
        }
    };
    let who = format!("user {user:?} (the agent of node {node})");
    match req.resource.resource.as_str() {
        "spiderreservedips" => {
            let name = &req.name;
            (!name.starts_with(CONFLICT_PREFIX)).then(|| {
                format!(
                    "{who} may create, change or delete only the SpiderReservedIPs agents make ({CONFLICT_PREFIX}*), not {name:?}"
                )
            })
        }
        "spiderippools" if req.sub_resource.as_deref() == Some("status") => {
            if req.operation != Operation::Update {
                return None;
            }
            let pool = &req.name;
            let old = match entries(req.old_object.as_ref()) {
                Ok(e) => e,
                Err(e) => {
                    return Some(format!(
                    "spiderippools/{pool}: {e}: an agent does not write over an unreadable status"
                ))
                }
            };
            let new = match entries(req.object.as_ref()) {
                Ok(e) => e,
                Err(e) => return Some(format!("spiderippools/{pool}: {e}")),
            };
            for (ip, e) in &new {
                if old.get(ip).is_some_and(|o| o.raw == e.raw) {
                    continue;
                }
                if &e.node != node {
                    return Some(format!(
                        "{who} may record addresses only for its own node: spiderippools/{pool} {ip} for pod {:?} names node {:?}",
                        e.pod, e.node
                    ));
                }
            }
            for (ip, e) in &old {
                if new.get(ip).is_some_and(|n| n.raw == e.raw) {
                    continue;
                }
                match node_of(store, e).await {
                    Ok(Some(n)) if &n != node => {
                        return Some(format!(
                            "{who} may remove only its own node's holders: spiderippools/{pool} {ip} is held by pod {:?} of node {n}",
                            e.pod
                        ))
                    }
                    Ok(_) => {}
                    Err(err) => {
                        return Some(format!(
                            "spiderippools/{pool} {ip}: the node of pod {:?} could not be checked: {err}",
                            e.pod
                        ))
                    }
                }
            }
            None
        }
        _ => None,
    }
}

/// The response to a request the restriction alone reviews: allowed, or refused (403).
pub fn respond(
    req: &AdmissionRequest<DynamicObject>,
    refusal: Option<String>,
) -> AdmissionResponse {
    match refusal {
        None => AdmissionResponse::from(req),
        Some(message) => {
            tracing::warn!(user = ?req.user_info.username, resource = %req.resource.resource,
                name = %req.name, %message, "node restriction: refused");
            let mut resp = AdmissionResponse::from(req).deny(message);
            resp.result.code = 403;
            resp.result.reason = "Forbidden".into();
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, node: Option<&str>) -> UserInfo {
        UserInfo {
            username: Some(name.into()),
            extra: node.map(|n| [(NODE_CLAIM.to_string(), vec![n.to_string()])].into()),
            ..Default::default()
        }
    }

    #[test]
    fn an_agent_is_told_by_its_name_and_node_claim() {
        let agents = vec!["system:serviceaccount:kube-system:spiderpool-agent".to_string()];
        assert_eq!(
            asker(
                &user(
                    "system:serviceaccount:kube-system:spiderpool-agent",
                    Some("n1")
                ),
                &agents
            ),
            Asker::Agent {
                user: agents[0].clone(),
                node: "n1".into()
            }
        );
        assert!(matches!(
            asker(
                &user("system:serviceaccount:kube-system:spiderpool-agent", None),
                &agents
            ),
            Asker::Nodeless { .. }
        ));
        assert!(matches!(
            asker(&user("spiderpool-agent:n2", None), &agents),
            Asker::Agent { node, .. } if node == "n2"
        ));
        assert_eq!(asker(&user("admin", Some("n1")), &agents), Asker::Other);
    }
}
