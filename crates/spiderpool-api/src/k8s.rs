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
    /// A Node's addresses (`status.addresses`), those that are IP addresses.
    pub fn node_addresses(&self) -> Vec<std::net::IpAddr> {
        self.status
            .get("addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|a| a.get("address")?.as_str()?.parse().ok())
            .collect()
    }

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

    /// The ordinals of a StatefulSet's members: `spec.ordinals.start` (0 unless set) up to,
    /// not including, start + `replicas`. A pod whose ordinal is outside was scaled away.
    pub fn ordinals(&self) -> std::ops::Range<i64> {
        let start = self
            .spec
            .pointer("/ordinals/start")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        start..start.saturating_add(self.replicas().max(0))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(spec: Value) -> KubeObject {
        KubeObject {
            kind: "StatefulSet".into(),
            spec,
            ..Default::default()
        }
    }

    #[test]
    fn ordinals_start_where_the_statefulset_says() {
        assert_eq!(sts(serde_json::json!({"replicas": 3})).ordinals(), 0..3);
        assert_eq!(
            sts(serde_json::json!({"replicas": 3, "ordinals": {"start": 5}})).ordinals(),
            5..8
        );
        // Scaled to nothing: no member, wherever the ordinals start.
        assert!(
            sts(serde_json::json!({"replicas": 0, "ordinals": {"start": 5}}))
                .ordinals()
                .is_empty()
        );
        // Kubernetes' default of one replica.
        assert_eq!(
            sts(serde_json::json!({"ordinals": {"start": 2}})).ordinals(),
            2..3
        );
    }
}
