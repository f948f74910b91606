//! The Pods of one node as a watch keeps them: the agent serving that node reads an ADD's pod
//! here before it sends a GET (on a burst, one GET per pod is a fifth of the agents' requests).
//! One watch per agent, filtered by the API server to the node (`spec.nodeName`), as kubelet's
//! own; a copy may be a moment behind, so a caller uses it only for the pod incarnation the
//! runtime named (its UID) and reads the API otherwise.

use std::sync::Arc;

use futures_util::StreamExt;
use kube::api::DynamicObject;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use spiderpool_store::{Kind, Stored};

use super::{api_resource, Inner};

/// What the watch of one node's Pods keeps.
pub(super) struct NodePods {
    reader: reflector::Store<DynamicObject>,
    ar: kube::api::ApiResource,
}

impl NodePods {
    /// Starts following the Pods bound to `node` (the watch lives as long as the runtime).
    pub(super) fn follow(client: kube::Client, node: &str) -> NodePods {
        let ar = api_resource(Kind::Pod, None).expect("the Pod resource");
        let writer = reflector::store::Writer::new(ar.clone());
        let reader = writer.as_reader();
        let api: Api<DynamicObject> = Api::all_with(client, &ar);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let node = node.to_string();
        tokio::spawn(async move {
            let stream = watcher(api, config)
                .default_backoff()
                .modify(|o| o.managed_fields_mut().clear());
            let mut stream = reflector::reflector(writer, stream).boxed();
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::InitDone) => {
                        tracing::debug!(node = %node, "following the node's pods")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(node = %node, error = %e, "the watch of the node's pods failed; retrying with backoff (ADDs read their pod from the API meanwhile)")
                    }
                }
            }
        });
        NodePods { reader, ar }
    }

    /// The Pod `namespace/name` as the watch has it.
    pub(super) fn get(&self, inner: &Inner, key: &str) -> Option<Stored> {
        let (ns, name) = key.split_once('/')?;
        let o = self
            .reader
            .get(&ObjectRef::new_with(name, self.ar.clone()).within(ns))?;
        inner.stored(Kind::Pod, Arc::unwrap_or_clone(o)).ok()
    }
}
