//! Reads and conditional writes of whole objects: get, list (the workload kinds together),
//! create or replace guarded by `resourceVersion`, delete with a precondition, and the JSON
//! sent for each (an endpoint owned by its pod, as upstream's).

use std::sync::atomic::Ordering;

use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, Preconditions,
};
use serde_json::Value;
use spiderpool_store::{check, Expect, Kind, Result, Revision, StoreError, Stored};

use super::*;

impl Inner {
    /// Tells the write hook (if any) of a write of `kind`/`key`.
    pub(super) fn wrote(&self, kind: Kind, key: &str, written: Written<'_>) {
        if let Some(f) = &self.on_write {
            f(kind, key, written);
        }
    }

    pub(super) fn stored(&self, kind: Kind, o: DynamicObject) -> Result<Stored> {
        self.observe(kind, &o);
        let revision = rv_of(&o)?;
        let key = key_of(kind, &o);
        let value = serde_json::to_value(&o).map_err(|e| StoreError::Corrupt {
            key: format!("{kind}/{key}"),
            message: e.to_string(),
        })?;
        Ok(Stored {
            key,
            value,
            revision,
        })
    }

    pub(super) async fn get_object(&self, kind: Kind, key: &str) -> Result<Option<DynamicObject>> {
        let (api, name) = match third_party(kind, key) {
            Some((ns, gvk, name)) => match kube::discovery::pinned_kind(&self.client, &gvk).await {
                Ok((ar, _)) => (
                    Api::namespaced_with(self.client.clone(), ns, &ar),
                    name.into(),
                ),
                // The group or version is not served, or has no such kind: nothing of it exists.
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
                Err(kube::Error::Discovery(_)) => return Ok(None),
                Err(e) => return Err(self.err(&format!("discover {kind}/{key}"), e)),
            },
            None => self.api(kind, key)?,
        };
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let o = match api.get_opt(&name).await {
            Ok(o) => o,
            // A kind the API server does not serve (a CRD not installed: a plain 404 page,
            // which get_opt does not take for "not found") holds nothing.
            Err(kube::Error::Api(s)) if s.code == 404 => None,
            Err(e) => return Err(self.err(&format!("get {kind}/{key}"), e)),
        };
        if let Some(o) = &o {
            self.observe(kind, o);
        }
        Ok(o)
    }

    pub(super) async fn get(&self, kind: Kind, key: &str) -> Result<Option<Stored>> {
        self.get_object(kind, key)
            .await?
            .map(|o| self.stored(kind, o))
            .transpose()
    }

    /// The object JSON to send for a write of `value` as `kind`/`key`.
    pub(super) fn prepare(
        &self,
        kind: Kind,
        key: &str,
        name: &str,
        value: Value,
        rv: Option<Revision>,
    ) -> Result<DynamicObject> {
        let workload = (kind == Kind::Workload).then(|| key.split('/').nth(1).unwrap_or_default());
        let ar = api_resource(kind, workload)?;
        let mut value = match value {
            Value::Object(m) => Value::Object(m),
            _ => Value::Object(Default::default()),
        };
        value["apiVersion"] = ar.api_version.clone().into();
        value["kind"] = ar.kind.clone().into();
        if !value.get("metadata").is_some_and(Value::is_object) {
            value["metadata"] = Value::Object(Default::default());
        }
        let meta = value["metadata"].as_object_mut().expect("an object");
        meta.insert("name".into(), name.into());
        if kind.namespaced() {
            let ns = key.split('/').next().unwrap_or_default();
            meta.insert("namespace".into(), ns.into());
        }
        match rv {
            Some(rv) => {
                meta.insert("resourceVersion".into(), rv.to_string().into());
            }
            None => {
                for k in ["resourceVersion", "uid", "creationTimestamp", "generation"] {
                    meta.remove(k);
                }
            }
        }
        meta.remove("managedFields");
        // An endpoint is owned by its pod (not a StatefulSet member's or a KubeVirt VM's, whose
        // record outlives the pod), as upstream's.
        if kind == Kind::Endpoint && !meta.contains_key("ownerReferences") {
            let uid = value.pointer("/status/current/uid").and_then(Value::as_str);
            let owner = value
                .pointer("/status/ownerControllerType")
                .and_then(Value::as_str);
            if let (Some(uid), false) = (
                uid.filter(|u| !u.is_empty()),
                matches!(owner, Some("StatefulSet" | spiderpool_api::keys::VMI_KIND)),
            ) {
                let pod = serde_json::json!([{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}]);
                value["metadata"]["ownerReferences"] = pod;
            }
        }
        serde_json::from_value(value)
            .map_err(|e| StoreError::Rejected(format!("{kind}/{key}: {e}")))
    }

    /// The current revision of `kind`/`key`, to say which condition failed.
    pub(super) async fn current_rv(&self, kind: Kind, key: &str) -> Option<Revision> {
        match self.get_object(kind, key).await {
            Ok(Some(o)) => rv_of(&o).ok(),
            _ => None,
        }
    }

    pub(super) async fn put(
        &self,
        kind: Kind,
        key: &str,
        value: Value,
        expect: Expect,
    ) -> Result<Revision> {
        let (api, name) = self.api(kind, key)?;
        let what = format!("{kind}/{key}");
        let pp = PostParams::default();
        for _ in 0..RELAY.attempts {
            let (rv, create) = match expect {
                Expect::Absent => (None, true),
                Expect::Revision(r) => (Some(r), false),
                Expect::Any => match self.get_object(kind, key).await? {
                    Some(o) => (Some(rv_of(&o)?), false),
                    None => (None, true),
                },
            };
            let obj = self.prepare(kind, key, &name, value.clone(), rv)?;
            let r = if create {
                api.create(&pp, &obj).await
            } else {
                api.replace(&name, &pp, &obj).await
            };
            match r {
                Ok(o) => {
                    self.stats.object_writes.fetch_add(1, Ordering::Relaxed);
                    self.observe(kind, &o);
                    self.wrote(kind, key, Written::Object(&o));
                    return rv_of(&o);
                }
                // Creating in a namespace that does not exist.
                Err(kube::Error::Api(s)) if s.code == 404 && create => {
                    return Err(StoreError::Rejected(format!("{what}: {}", s.message)))
                }
                Err(kube::Error::Api(s))
                    if (s.code == 409 || s.code == 404) && expect == Expect::Any =>
                {
                    continue
                }
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                    let current = self.current_rv(kind, key).await;
                    check(expect, current, &what)?;
                    return Err(StoreError::changed(format!("{what}: {}", s.message)));
                }
                Err(e) => return Err(self.err(&format!("write {what}"), e)),
            }
        }
        Err(StoreError::changed(format!("{what} kept changing")))
    }

    pub(super) async fn delete(&self, kind: Kind, key: &str, expect: Expect) -> Result<()> {
        let (api, name) = self.api(kind, key)?;
        let what = format!("{kind}/{key}");
        let dp = match expect {
            Expect::Revision(r) => DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: Some(r.to_string()),
                    uid: None,
                }),
                ..Default::default()
            },
            _ => DeleteParams::default(),
        };
        match api.delete(&name, &dp).await {
            Ok(answer) => {
                self.stats.object_writes.fetch_add(1, Ordering::Relaxed);
                match answer.left() {
                    // An endpoint upstream Spiderpool wrote carries its finalizer: what it
                    // guarded (the addresses) went in this commit, so it goes too.
                    Some(o) if kind == Kind::Endpoint && has_upstream_finalizer(&o) => {
                        self.drop_upstream_finalizer(&api, kind, key, &o).await?
                    }
                    // Still there until its finalizers go: its new state is the write.
                    Some(o) => self.wrote(kind, key, Written::Object(&o)),
                    None => {
                        let revision = match expect {
                            Expect::Revision(r) => Some(r),
                            _ => None,
                        };
                        self.wrote(kind, key, Written::Gone { revision })
                    }
                }
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => check(expect, None, &what),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let current = self.current_rv(kind, key).await;
                check(expect, current, &what)?;
                Err(StoreError::changed(format!("{what}: {}", s.message)))
            }
            Err(e) => Err(self.err(&format!("delete {what}"), e)),
        }
    }

    /// Removes upstream's finalizer from `o` (being deleted), guarded by its resourceVersion.
    async fn drop_upstream_finalizer(
        &self,
        api: &Api<DynamicObject>,
        kind: Kind,
        key: &str,
        o: &DynamicObject,
    ) -> Result<()> {
        let what = format!("{kind}/{key}");
        let rest: Vec<&String> = o
            .metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != spiderpool_api::keys::FINALIZER)
            .collect();
        // A merge patch naming the resourceVersion is refused (409) if the object changed.
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": o.metadata.resource_version,
            "finalizers": rest,
        }});
        let name = o.metadata.name.clone().unwrap_or_default();
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(left) if left.metadata.deletion_timestamp.is_some() && !rest.is_empty() => {
                self.wrote(kind, key, Written::Object(&left));
                Ok(())
            }
            Ok(_) => {
                self.wrote(kind, key, Written::Gone { revision: None });
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.wrote(kind, key, Written::Gone { revision: None });
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Err(StoreError::changed(format!(
                "{what}: changed while its finalizer was removed: {}",
                s.message
            ))),
            Err(e) => Err(self.err(&format!("remove the finalizer of {what}"), e)),
        }
    }

    pub(super) async fn list_objects(
        &self,
        kind: Kind,
        lp: &ListParams,
    ) -> Result<(Vec<DynamicObject>, Revision)> {
        let apis: Vec<Api<DynamicObject>> = if kind == Kind::Workload {
            WORKLOADS
                .iter()
                .map(|(g, k, p)| Api::all_with(self.client.clone(), &resource(g, "v1", k, p)))
                .collect()
        } else {
            vec![Api::all_with(
                self.client.clone(),
                &api_resource(kind, None)?,
            )]
        };
        let mut out = Vec::new();
        let mut rv = 0;
        for api in apis {
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            let list = api
                .list(lp)
                .await
                .map_err(|e| self.err(&format!("list {kind}"), e))?;
            rv = list
                .metadata
                .resource_version
                .as_deref()
                .and_then(|r| r.parse().ok())
                .unwrap_or(rv);
            out.extend(list.items);
        }
        Ok((out, rv))
    }
}

/// Whether `o` carries upstream Spiderpool's finalizer.
fn has_upstream_finalizer(o: &DynamicObject) -> bool {
    o.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == spiderpool_api::keys::FINALIZER)
}
