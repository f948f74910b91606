//! The CustomResourceDefinitions of the Spider objects, generated from the Rust types
//! (`kube::CustomResource` on the spec types of [`crate::crd`]) and committed under
//! `deploy/crds/` (a test fails when they drift). Only with the `kube` feature.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::coordinator::SpiderCoordinatorResource;
use crate::crd::{
    EndpointStatus, SpiderIPPoolResource, SpiderReservedIPResource, SpiderSubnetResource,
    API_VERSION,
};
use crate::multus::SpiderMultusConfigResource;

/// Every CRD the project installs.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        SpiderIPPoolResource::crd(),
        SpiderSubnetResource::crd(),
        SpiderReservedIPResource::crd(),
        endpoint_crd(),
        SpiderCoordinatorResource::crd(),
        SpiderMultusConfigResource::crd(),
    ]
}

/// The SpiderEndpoint CRD. Written out rather than derived: like upstream's it has a status and
/// no spec, and no status subresource (the status is written with the object), which the
/// derive cannot express.
pub fn endpoint_crd() -> CustomResourceDefinition {
    // The settings kube's derive uses: no definitions, no `$schema`, structural.
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(schemars::transform::AddNullable::default())
        .with_transform(kube::core::schema::StructuralSchemaRewriter)
        .into_generator();
    let status = serde_json::to_value(generator.into_root_schema_for::<EndpointStatus>())
        .expect("the status schema serialises");
    let (group, version) = API_VERSION.split_once('/').expect("group/version");
    let column = |name: &str, path: &str| serde_json::json!({"name": name, "type": "string", "jsonPath": path});
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("spiderendpoints.{group}")},
        "spec": {
            "group": group,
            "names": {
                "categories": ["spiderpool"],
                "kind": "SpiderEndpoint",
                "listKind": "SpiderEndpointList",
                "plural": "spiderendpoints",
                "shortNames": ["se"],
                "singular": "spiderendpoint"
            },
            "scope": "Namespaced",
            "versions": [{
                "name": version,
                "served": true,
                "storage": true,
                "additionalPrinterColumns": [
                    column("INTERFACE", ".status.current.ips[0].interface"),
                    column("IPV4POOL", ".status.current.ips[0].ipv4Pool"),
                    column("IPV4", ".status.current.ips[0].ipv4"),
                    column("IPV6POOL", ".status.current.ips[0].ipv6Pool"),
                    column("IPV6", ".status.current.ips[0].ipv6"),
                    column("NODE", ".status.current.node")
                ],
                "schema": {"openAPIV3Schema": {
                    "description": "Which addresses a pod holds, per NIC: written by spiderpool-agent.",
                    "type": "object",
                    "required": ["metadata"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "status": status
                    }
                }}
            }]
        }
    }))
    .expect("a valid CRD")
}

/// Each CRD as YAML, under the file name upstream gives it
/// (`spiderpool.spidernet.io_spiderippools.yaml`).
pub fn crd_files() -> Vec<(String, String)> {
    crds()
        .into_iter()
        .map(|c| {
            let name = format!("{}_{}.yaml", c.spec.group, c.spec.names.plural);
            let yaml = serde_norway::to_string(&c).expect("a CRD serialises");
            (name, format!("# Generated from the Rust types in crates/spiderpool-api/src/ (crd.rs, coordinator.rs); do not edit.\n# Regenerate: SPIDERPOOL_UPDATE_CRDS=1 cargo test -p spiderpool-testkit --test kube crds\n---\n{yaml}"))
        })
        .collect()
}
