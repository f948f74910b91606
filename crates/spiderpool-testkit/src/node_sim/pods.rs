//! One pod's life on the node, as kubelet's pod worker: its sandbox made (retried after a
//! failed ADD with kubelet's backoff), its failure reported, its teardown and finalization.

use std::process::Command;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{json, Value};

use super::*;

impl Sim {
    /// Starts serving a pod event: a new pod is set up, a deleted one torn down, each in a task
    /// of its own (a pod's teardown waits for its setup).
    pub(super) fn serve(self: &Arc<Self>, pod: Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if uid.is_empty() {
            return;
        }
        let sim = self.clone();
        if pod.metadata.deletion_timestamp.is_some() {
            tokio::spawn(async move { sim.teardown(&pod, true).await });
            return;
        }
        let slot = {
            let mut pods = self.pods.lock().expect("pods lock");
            if pods.contains_key(&uid) {
                return;
            }
            let slot: Slot = Arc::default();
            pods.insert(uid.clone(), slot.clone());
            slot
        };
        tokio::spawn(async move {
            // As kubelet: a failed sandbox is killed (DEL for what its ADD made, the namespace
            // removed) and made again after a backoff, until it comes up or the pod goes.
            let mut backoff = RETRY_FIRST;
            loop {
                let mut guard = slot.lock().await;
                if !sim.pods.lock().expect("pods lock").contains_key(&uid) {
                    return;
                }
                let Err(e) = sim.setup(&pod, &mut guard).await else {
                    return;
                };
                eprintln!(
                    "node simulator {}: pod {}/{}: {e}",
                    sim.spec.name,
                    pod.metadata.namespace.as_deref().unwrap_or(""),
                    pod.metadata.name.as_deref().unwrap_or("")
                );
                let _ = sim.report_failure(&pod, &e).await;
                if let Some(set) = guard.take() {
                    sim.clone().unmake(set, uid.clone()).await;
                }
                drop(guard);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        });
    }

    /// The network config of a pod: the NAD its default-network annotation names, else the
    /// node's default.
    pub(super) async fn network_of(&self, pod: &Pod) -> SimResult<Value> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let Some(name) = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("v1.multus-cni.io/default-network"))
        else {
            return Ok(self.spec.default_network.clone());
        };
        let (nad_ns, nad_name) = name.split_once('/').unwrap_or((&ns, name));
        let gvk = GroupVersionKind::gvk("k8s.cni.cncf.io", "v1", "NetworkAttachmentDefinition");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "network-attachment-definitions");
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), nad_ns, &ar);
        let nad = api
            .get(nad_name)
            .await
            .map_err(|e| format!("NetworkAttachmentDefinition {nad_ns}/{nad_name}: {e}"))?;
        let config = nad.data["spec"]["config"].as_str().ok_or_else(|| {
            format!("NetworkAttachmentDefinition {nad_ns}/{nad_name} has no spec.config")
        })?;
        serde_json::from_str(config).map_err(|e| {
            format!("NetworkAttachmentDefinition {nad_ns}/{nad_name}: spec.config: {e}")
        })
    }

    pub(super) async fn report_failure(&self, pod: &Pod, why: &str) -> SimResult<()> {
        let pods: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let now = Self::now();
        let status = json!({"status": {"phase": "Pending", "conditions": [{"type": "PodReadyToStartContainers",
            "status": "False", "reason": "CNIFailed", "message": why, "lastTransitionTime": now}]}});
        pods.patch_status(
            pod.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// DEL for what a sandbox was given, and its namespace removed.
    pub(super) async fn unmake(self: Arc<Self>, mut set: SetUp, uid: String) {
        for s in set.servers.drain(..) {
            s.abort();
        }
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = self.chain(&mut set, &uid, "DEL") {
                eprintln!(
                    "node simulator {}: DEL {}/{}: {e}",
                    self.spec.name, set.namespace, set.name
                );
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &set.netns])
                .output();
            self.netns.lock().expect("netns lock").remove(&set.netns);
        })
        .await;
    }

    /// DEL for what the pod was given, its namespace removed, and (`finalize`) the pod deleted
    /// for good, as kubelet does once the containers are gone.
    pub(super) async fn teardown(self: Arc<Self>, pod: &Pod, finalize: bool) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let slot = self.pods.lock().expect("pods lock").remove(&uid);
        // Waits for the pod's setup, if it is still running.
        let set = match slot {
            Some(slot) => slot.lock().await.take(),
            None => None,
        };
        if let Some(set) = set {
            self.clone().unmake(set, uid.clone()).await;
        }
        if finalize {
            let pods: Api<Pod> = Api::namespaced(
                self.client.clone(),
                pod.metadata.namespace.as_deref().unwrap_or_default(),
            );
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(kube::api::Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..Default::default()
            };
            let _ = pods
                .delete(pod.metadata.name.as_deref().unwrap_or_default(), &dp)
                .await;
        }
    }
}
