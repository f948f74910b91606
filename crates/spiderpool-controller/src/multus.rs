//! The leader's SpiderMultusConfigs: each keeps one NetworkAttachmentDefinition, of its
//! namespace and its name (or annotation `multus.spidernet.io/cr-name`), owned by it (the
//! garbage collector deletes it with its owner), whose `spec.config` is the chain its cniType
//! generates. A change of the SpiderMultusConfig rewrites it, an edit or deletion of the NAD is
//! put back, and a NAD of that name the SpiderMultusConfig does not own is left alone, reported
//! (an Event on the SpiderMultusConfig, the invalid-objects gauge) until it is deleted.
//! Passes follow the watch of both kinds, and every `resync`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use serde_json::Value;
use spiderpool_api::multus::{Nad, SpiderMultusConfig};

use crate::invalid::{Bad, Invalid};

/// How long events are gathered before one pass.
const COALESCE: Duration = Duration::from_millis(200);
/// The next pass after one whose write failed (the API server busy, a conflict).
const RETRY: Duration = Duration::from_secs(2);

/// The NetworkAttachmentDefinitions' resource, as the datastore knows it.
fn nad_resource() -> ApiResource {
    spiderpool_backends::kubernetes::api_resource(spiderpool_api::Kind::NetworkAttachment, None)
        .expect("a kind the datastore maps")
}

fn nads(client: &kube::Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &nad_resource())
}

fn nads_in(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &nad_resource())
}

fn smcs(client: &kube::Client) -> Api<DynamicObject> {
    crate::pools::api(client, "SpiderMultusConfig", "spidermultusconfigs")
}

/// What a pass does with one SpiderMultusConfig's NAD.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Nothing: the NAD is as generated.
    Keep,
    /// Create it.
    Create(Value),
    /// Replace it (the object carries the resourceVersion read).
    Replace(Value),
    /// Leave it: it is not this SpiderMultusConfig's (the reason says whose it is).
    Foreign(String),
    /// Wait: it is an earlier SpiderMultusConfig's of the same name, which the garbage
    /// collector is deleting.
    Wait,
}

/// What to do for the NAD `want` of the SpiderMultusConfig `name` (UID `uid`), given the NAD
/// of that name as read (`None`: there is none). Pure.
pub fn action(want: &Nad, name: &str, uid: &str, have: Option<&DynamicObject>) -> Action {
    let object = want.to_object(name, uid);
    let Some(have) = have else {
        return Action::Create(object);
    };
    let owners = have.metadata.owner_references.clone().unwrap_or_default();
    if !owners
        .iter()
        .any(|r| r.kind == "SpiderMultusConfig" && r.uid == uid && r.controller == Some(true))
    {
        if owners
            .iter()
            .any(|r| r.kind == "SpiderMultusConfig" && r.name == name && r.controller == Some(true))
        {
            return Action::Wait;
        }
        let whose = match owners.iter().find(|r| r.controller == Some(true)) {
            Some(r) => format!("it is controlled by {} {}", r.kind, r.name),
            None => "it has no owner (written by hand or by another tool)".into(),
        };
        return Action::Foreign(format!(
            "NetworkAttachmentDefinition {}/{} exists and is not this SpiderMultusConfig's ({whose}): \
             it is left alone; delete it and the controller writes the generated one, or name \
             another with the annotation {}",
            want.namespace,
            want.name,
            spiderpool_api::multus::CR_NAME
        ));
    }
    let annotations: BTreeMap<String, String> =
        have.metadata.annotations.clone().unwrap_or_default();
    let config = have.data.pointer("/spec/config").and_then(Value::as_str);
    if annotations == want.annotations && config == want.config.as_deref() {
        return Action::Keep;
    }
    let mut object = object;
    object["metadata"]["resourceVersion"] = have.metadata.resource_version.clone().into();
    if let Some(labels) = &have.metadata.labels {
        object["metadata"]["labels"] = serde_json::to_value(labels).unwrap_or_default();
    }
    Action::Replace(object)
}

/// One pass; `Err` when a write failed and the pass should come again soon.
async fn reconcile(client: &kube::Client, invalid: &Invalid) -> Result<(), kube::Error> {
    let list = smcs(client).list(&ListParams::default()).await?;
    let mut existing: BTreeMap<(String, String), DynamicObject> = BTreeMap::new();
    if !list.items.is_empty() {
        for n in nads(client).list(&ListParams::default()).await?.items {
            let key = (
                n.metadata.namespace.clone().unwrap_or_default(),
                n.metadata.name.clone().unwrap_or_default(),
            );
            existing.insert(key, n);
        }
    }
    let mut bad = Vec::new();
    let mut failed = None;
    for o in list.items {
        if o.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ns = o.metadata.namespace.clone().unwrap_or_default();
        let name = o.metadata.name.clone().unwrap_or_default();
        let uid = o.metadata.uid.clone().unwrap_or_default();
        let smc: Result<SpiderMultusConfig, String> = serde_json::to_value(&o)
            .map_err(|e| e.to_string())
            .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()));
        let nad = smc.and_then(|mut s| {
            s.default_spec();
            s.render().map_err(|e| e.to_string())
        });
        let nad = match nad {
            Ok(n) => n,
            Err(e) => {
                bad.push(Bad::new("SpiderMultusConfig", format!("{ns}/{name}"), e));
                continue;
            }
        };
        let have = existing.get(&(nad.namespace.clone(), nad.name.clone()));
        if have.is_some_and(|h| h.metadata.deletion_timestamp.is_some()) {
            continue; // written again once it is gone
        }
        let api = nads_in(client, &nad.namespace);
        let result = match action(&nad, &name, &uid, have) {
            Action::Keep | Action::Wait => Ok(()),
            Action::Foreign(why) => {
                bad.push(Bad::new("SpiderMultusConfig", format!("{ns}/{name}"), why));
                Ok(())
            }
            Action::Create(v) => match serde_json::from_value::<DynamicObject>(v) {
                Ok(d) => api.create(&PostParams::default(), &d).await.map(|_| {
                    tracing::info!(smc = %format!("{ns}/{name}"), nad = %nad.name, "created the NetworkAttachmentDefinition");
                }),
                Err(e) => Err(kube::Error::SerdeError(e)),
            },
            Action::Replace(v) => match serde_json::from_value::<DynamicObject>(v) {
                Ok(d) => api
                    .replace(&nad.name, &PostParams::default(), &d)
                    .await
                    .map(|_| {
                        tracing::info!(smc = %format!("{ns}/{name}"), nad = %nad.name, "rewrote the NetworkAttachmentDefinition");
                    }),
                Err(e) => Err(kube::Error::SerdeError(e)),
            },
        };
        if let Err(e) = result {
            tracing::warn!(smc = %format!("{ns}/{name}"), error = %e, "writing the NetworkAttachmentDefinition: trying again");
            failed = Some(e);
        }
    }
    invalid.pass("multus", bad);
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Runs until aborted: after every burst of SpiderMultusConfig or NAD events, and every
/// `resync`.
pub async fn run(client: kube::Client, resync: Duration, invalid: Arc<Invalid>) {
    let mut events = futures_util::stream::select(
        watcher(smcs(&client), watcher::Config::default())
            .default_backoff()
            .map(|e| e.map(|_| ()))
            .boxed(),
        watcher(nads(&client), watcher::Config::default())
            .default_backoff()
            .map(|e| e.map(|_| ()))
            .boxed(),
    );
    let mut tick = tokio::time::interval(resync);
    while crate::passes::next(&mut events, &mut tick, COALESCE).await {
        if let Err(e) = reconcile(&client, &invalid).await {
            tracing::warn!(error = %e, "SpiderMultusConfigs: trying again");
            tokio::time::sleep(RETRY).await;
            tick.reset_after(Duration::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nad() -> Nad {
        Nad {
            namespace: "kube-system".into(),
            name: "macvlan-conf".into(),
            annotations: BTreeMap::new(),
            config: Some(r#"{"cniVersion":"0.3.1"}"#.into()),
        }
    }

    fn have(owner_uid: Option<&str>, config: &str) -> DynamicObject {
        let mut v = json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": "macvlan-conf", "namespace": "kube-system", "resourceVersion": "7",
                "labels": {"team": "net"}},
            "spec": {"config": config}});
        if let Some(uid) = owner_uid {
            v["metadata"]["ownerReferences"] = json!([{"apiVersion": "spiderpool.spidernet.io/v2beta1",
                "kind": "SpiderMultusConfig", "name": "m", "uid": uid, "controller": true}]);
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_nad_is_created_kept_put_back_or_left_alone_when_not_its_owners() {
        let want = nad();
        assert!(matches!(action(&want, "m", "u1", None), Action::Create(_)));
        let same = have(Some("u1"), r#"{"cniVersion":"0.3.1"}"#);
        assert_eq!(action(&want, "m", "u1", Some(&same)), Action::Keep);
        // A hand edit is put back, with the resourceVersion read and the NAD's labels kept.
        let edited = have(Some("u1"), r#"{"cniVersion":"1.0.0"}"#);
        let Action::Replace(v) = action(&want, "m", "u1", Some(&edited)) else {
            panic!("an edited NAD is replaced")
        };
        assert_eq!(v["metadata"]["resourceVersion"], "7");
        assert_eq!(v["metadata"]["labels"]["team"], "net");
        assert_eq!(v["spec"]["config"], r#"{"cniVersion":"0.3.1"}"#);
        // The NAD of an earlier SMC of the same name (another UID) goes with it.
        assert_eq!(
            action(&want, "m", "u1", Some(&have(Some("u0"), "{}"))),
            Action::Wait
        );
        // A NAD written by hand, or another SMC's.
        let mut theirs = have(Some("u2"), "{}");
        theirs.metadata.owner_references.as_mut().unwrap()[0].name = "other".into();
        for other in [have(None, "{}"), theirs] {
            let Action::Foreign(why) = action(&want, "m", "u1", Some(&other)) else {
                panic!("a NAD not its own is left alone")
            };
            assert!(
                why.contains("NetworkAttachmentDefinition kube-system/macvlan-conf exists and is not this SpiderMultusConfig's"),
                "{why}"
            );
        }
    }
}
