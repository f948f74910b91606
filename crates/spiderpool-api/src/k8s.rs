//! Plain Kubernetes objects the IPAM reads facts from: Node, Namespace, Pod, apps/v1 workloads
//! and Multus NetworkAttachmentDefinitions. Only metadata is typed; spec and status are kept
//! as written.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::meta::ObjectMeta;

/// A Kubernetes object whose spec and status are kept verbatim.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeObject {
    /// e.g. `v1`, `apps/v1`.
    #[serde(default)]
    pub api_version: String,
    /// e.g. `Node`, `Pod`, `StatefulSet`.
    #[serde(default)]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec as written.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub spec: Value,
    /// Status as written.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub status: Value,
}

impl KubeObject {
    /// `spec.nodeName` of a Pod.
    pub fn node_name(&self) -> Option<&str> {
        self.spec.get("nodeName").and_then(Value::as_str)
    }

    /// `spec.replicas` of a workload (Kubernetes defaults it to 1).
    pub fn replicas(&self) -> i64 {
        self.spec
            .get("replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1)
    }
}

/// The apps/v1 and batch/v1 workload kinds accepted by `apply`.
pub const WORKLOAD_KINDS: &[&str] = &[
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "CronJob",
];
