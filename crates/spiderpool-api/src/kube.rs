//! The CustomResourceDefinitions of the Spider objects, generated from the Rust types
//! (`kube::CustomResource` on the spec types of [`crate::crd`]) and committed under
//! `deploy/crds/` (a test fails when they drift). Only with the `kube` feature.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde::{Deserialize, Serialize};

use crate::crd::{SpiderIPPoolResource, SpiderReservedIPResource, SpiderSubnetResource};

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

/// Every CRD the project installs.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        SpiderIPPoolResource::crd(),
        SpiderSubnetResource::crd(),
        SpiderReservedIPResource::crd(),
    ]
}

/// Each CRD as YAML, under the file name upstream gives it
/// (`spiderpool.spidernet.io_spiderippools.yaml`).
pub fn crd_files() -> Vec<(String, String)> {
    crds()
        .into_iter()
        .map(|c| {
            let name = format!("{}_{}.yaml", c.spec.group, c.spec.names.plural);
            let yaml = serde_norway::to_string(&c).expect("a CRD serialises");
            (name, format!("# Generated from the Rust types in crates/spiderpool-api/src/crd.rs; do not edit.\n# Regenerate: SPIDERPOOL_UPDATE_CRDS=1 cargo test -p spiderpool-testkit --test kube crds\n---\n{yaml}"))
        })
        .collect()
}
