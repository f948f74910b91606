//! What stands in the way of moving a cluster from upstream Spiderpool, read from the cluster
//! (read-only; it works against a cluster still running upstream): `spiderpoolctl migrate
//! check`.

use std::collections::BTreeMap;

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde::Serialize;
use serde_json::Value;
use spiderpool_store::Result;

use super::*;

/// One thing to do (or to know) before or during the move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hazard {
    /// A stable name (`endpoint-crd`, `upstream-installed`, …).
    pub id: &'static str,
    /// Whether the move must wait until it is dealt with.
    pub blocks: bool,
    /// What the cluster holds that makes it a hazard.
    pub what: String,
    /// The objects involved (at most [`LISTED`], then how many more).
    pub objects: Vec<String>,
    /// What to do.
    pub fix: String,
}

/// How many objects a hazard names before it says how many more there are.
pub const LISTED: usize = 20;

fn listed(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    let more = names.len().saturating_sub(LISTED);
    names.truncate(LISTED);
    if more > 0 {
        names.push(format!("… and {more} more"));
    }
    names
}

fn api(
    client: &kube::Client,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural),
    )
}

/// Every object of a kind, or none when the API server does not serve it.
async fn list_all(inner: &Inner, a: &Api<DynamicObject>, what: &str) -> Result<Vec<DynamicObject>> {
    match a.list(&ListParams::default()).await {
        Ok(l) => Ok(l.items),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
        Err(e) => Err(inner.err(&format!("list {what}"), e)),
    }
}

fn name_of(o: &DynamicObject) -> String {
    match &o.metadata.namespace {
        Some(ns) => format!("{ns}/{}", o.metadata.name.clone().unwrap_or_default()),
        None => o.metadata.name.clone().unwrap_or_default(),
    }
}

impl KubeStore {
    /// Every hazard of moving this cluster from upstream Spiderpool, blocking ones first.
    pub async fn migration_hazards(&self) -> Result<Vec<Hazard>> {
        let inner = &self.inner;
        let client = &inner.client;
        let mut out = Vec::new();

        // Upstream's SpiderEndpoint schema.
        let crds = api(
            client,
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
        );
        const EP_CRD: &str = "spiderendpoints.spiderpool.spidernet.io";
        match crds.get_opt(EP_CRD).await {
            Ok(Some(crd)) => {
                if let Some(why) = endpoint_schema_problem(&crd.data) {
                    out.push(Hazard {
                        id: "endpoint-crd",
                        blocks: true,
                        what: format!("CRD {EP_CRD} is upstream Spiderpool's ({why}): the API server would drop the containerID this project records, and its agents refuse to start on it"),
                        objects: vec![format!("customresourcedefinition/{EP_CRD}")],
                        fix: "kubectl apply -f deploy/crds/ (helm never upgrades a chart's CRDs)".into(),
                    });
                }
            }
            Ok(None) => {}
            Err(e) => return Err(inner.err(&format!("get CRD {EP_CRD}"), e)),
        }

        // Upstream itself, whose uninstall deletes every Spider object and the CRDs.
        let deployments = list_all(
            inner,
            &api(client, "apps", "v1", "Deployment", "deployments"),
            "deployments",
        )
        .await?;
        let daemonsets = list_all(
            inner,
            &api(client, "apps", "v1", "DaemonSet", "daemonsets"),
            "daemonsets",
        )
        .await?;
        let upstream: Vec<String> = deployments
            .iter()
            .map(|d| ("deployment", d))
            .chain(daemonsets.iter().map(|d| ("daemonset", d)))
            .filter(|(_, o)| {
                o.data
                    .pointer("/spec/template/spec/containers")
                    .and_then(Value::as_array)
                    .is_some_and(|cs| {
                        cs.iter().any(|c| {
                            c["image"]
                                .as_str()
                                .is_some_and(|i| i.contains("spidernet-io/spiderpool/"))
                        })
                    })
            })
            .map(|(k, o)| format!("{k}/{}", name_of(o)))
            .collect();
        if !upstream.is_empty() {
            out.push(Hazard {
                id: "upstream-installed",
                blocks: false,
                what: "upstream Spiderpool runs here; its chart's uninstall hook (spiderpoolController.cleanup.enable, on by default) deletes every pool, subnet, endpoint and reserved IP and the CRDs".into(),
                objects: listed(upstream),
                fix: "before helm uninstall: helm upgrade RELEASE spiderpool/spiderpool -n NAMESPACE --reuse-values --set spiderpoolController.cleanup.enable=false".into(),
            });
        }

        // Overlay-mode coordinators: served, but pods upstream attached keep upstream's routes.
        let coordinators = list_all(
            inner,
            &api(
                client,
                "spiderpool.spidernet.io",
                "v2beta1",
                "SpiderCoordinator",
                "spidercoordinators",
            ),
            "spidercoordinators",
        )
        .await?;
        let overlay: Vec<String> = coordinators
            .iter()
            .filter(|c| c.data.pointer("/spec/mode").and_then(Value::as_str) == Some("overlay"))
            .map(|c| format!("spidercoordinator/{}", name_of(c)))
            .collect();
        if !overlay.is_empty() {
            out.push(Hazard {
                id: "overlay-coordinator",
                blocks: false,
                what: "SpiderCoordinators in overlay mode: this project's coordinator serves them from the move on (eth0 keeps the default route, the underlay NIC a table of its own); pods upstream attached keep upstream's routes and marks until they are re-created".into(),
                objects: listed(overlay),
                fix: "re-create (roll) the overlay pods after the move so that each one's routes are this coordinator's, which its DEL removes exactly".into(),
            });
        }

        // SpiderMultusConfigs: their NADs are this project's controller's from now on.
        let smcs = list_all(
            inner,
            &api(
                client,
                "spiderpool.spidernet.io",
                "v2beta1",
                "SpiderMultusConfig",
                "spidermultusconfigs",
            ),
            "spidermultusconfigs",
        )
        .await?;
        if !smcs.is_empty() {
            out.push(Hazard {
                id: "spidermultusconfig",
                blocks: false,
                what: "SpiderMultusConfigs: this project's controller keeps their NetworkAttachmentDefinitions from the move on, and rewrites one whose chain differs from what it generates (the same plugins; it passes podRPFilter when set and does not copy kubectl's last-applied annotation); chains with a VLAN or bond still need upstream's ifacer plugin on the nodes".into(),
                objects: listed(smcs.iter().map(|o| format!("spidermultusconfig/{}", name_of(o))).collect()),
                fix: "compare each NAD (kubectl get net-attach-def -o yaml) before and after the move; keep the ifacer binary in the CNI directory where a SpiderMultusConfig sets vlanID or bond".into(),
            });
        }

        // Endpoints upstream wrote: their finalizer, and ones already stuck Terminating.
        let endpoints = list_all(
            inner,
            &api(
                client,
                "spiderpool.spidernet.io",
                "v2beta1",
                "SpiderEndpoint",
                "spiderendpoints",
            ),
            "spiderendpoints",
        )
        .await?;
        let stuck: Vec<String> = endpoints
            .iter()
            .filter(|e| {
                e.metadata.deletion_timestamp.is_some()
                    && e.metadata
                        .finalizers
                        .iter()
                        .flatten()
                        .any(|f| f == spiderpool_api::keys::FINALIZER)
            })
            .map(|e| format!("spiderendpoint/{}", name_of(e)))
            .collect();
        if !stuck.is_empty() {
            out.push(Hazard {
                id: "endpoint-terminating",
                blocks: false,
                what: "SpiderEndpoints being deleted and held by upstream's finalizer: after the move the controller releases their addresses and removes it".into(),
                objects: listed(stuck),
                fix: "nothing to do; spiderpoolctl --datastore kubernetes ipam gc speeds it up".into(),
            });
        }

        // Holders with no Pod of that name: KubeVirt VMs (kept while the VMI lives).
        let pods_by_name: BTreeMap<String, DynamicObject> =
            list_all(inner, &api(client, "", "v1", "Pod", "pods"), "pods")
                .await?
                .into_iter()
                .map(|p| (name_of(&p), p))
                .collect();
        let vmis: std::collections::BTreeSet<String> = list_all(
            inner,
            &api(
                client,
                "kubevirt.io",
                "v1",
                "VirtualMachineInstance",
                "virtualmachineinstances",
            ),
            "virtualmachineinstances",
        )
        .await?
        .iter()
        .map(name_of)
        .collect();
        let pools = list_all(
            inner,
            &api(
                client,
                "spiderpool.spidernet.io",
                "v2beta1",
                "SpiderIPPool",
                "spiderippools",
            ),
            "spiderippools",
        )
        .await?;
        let mut by_vmi = Vec::new();
        let mut multus_pools: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in &pools {
            let pool = name_of(p);
            let value = serde_json::to_value(p).unwrap_or_default();
            let entries = allocated_ips::entries_of(&pool, &value).unwrap_or_default();
            let multus = p
                .data
                .pointer("/spec/multusName")
                .and_then(Value::as_array)
                .is_some_and(|m| !m.is_empty());
            for (ip, e) in entries {
                if !pods_by_name.contains_key(&e.pod) && vmis.contains(&e.pod) {
                    by_vmi.push(format!(
                        "{ip} ({pool}) held by VirtualMachineInstance {}",
                        e.pod
                    ));
                }
                if multus {
                    multus_pools
                        .entry(pool.clone())
                        .or_default()
                        .push(e.pod.clone());
                }
            }
        }
        if !by_vmi.is_empty() {
            out.push(Hazard {
                id: "kubevirt-vmi",
                blocks: false,
                what: "addresses upstream keyed by a VirtualMachineInstance's name: kept while the VMI exists (the chart lets the controller read VMIs)".into(),
                objects: listed(by_vmi),
                fix: "nothing to do with this project's chart; a controller that may not get virtualmachineinstances.kubevirt.io would fail its reclaim scans".into(),
            });
        }
        // Pods drawing from pools with multusName that name no default network: on Multus's
        // cluster network, which the agents must be told.
        let on_cluster_network: Vec<String> = multus_pools
            .iter()
            .flat_map(|(pool, holders)| holders.iter().map(move |h| (pool, h)))
            .filter(|(_, h)| {
                pods_by_name.get(*h).is_some_and(|p| {
                    !p.metadata.annotations.as_ref().is_some_and(|a| {
                        a.contains_key(spiderpool_api::keys::MULTUS_DEFAULT_NETWORK)
                    })
                })
            })
            .map(|(pool, h)| format!("pod {h} (pool {pool})"))
            .collect();
        if !on_cluster_network.is_empty() {
            out.push(Hazard {
                id: "multus-cluster-network",
                blocks: false,
                what: "pods on Multus's cluster network (no v1.multus-cni.io/default-network) hold addresses of pools with multusName: their next sandbox matches those pools only if the agents know the cluster network".into(),
                objects: listed(on_cluster_network),
                fix: "install this chart with upstream's multus.multusCNI.defaultCniCRName".into(),
            });
        }
        out.sort_by_key(|h| (!h.blocks, h.id));
        Ok(out)
    }
}
