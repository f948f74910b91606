//! Schemas of Kubernetes types the CRDs embed, for the `kube` feature's derive: the project's
//! own selector type lives in the pure core crate, which knows nothing of schemas.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The schema of a `metav1.LabelSelector` (the project's own selector type lives in the pure
/// core crate, which knows nothing of schemas).
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorSchema {
    /// Every pair must be present with this value.
    #[serde(default)]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Every requirement must hold.
    #[serde(default)]
    pub match_expressions: Option<Vec<RequirementSchema>>,
}

/// The schema of one `matchExpressions` entry.
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
pub struct RequirementSchema {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    /// Values for `In` and `NotIn`.
    #[serde(default)]
    pub values: Option<Vec<String>>,
}
