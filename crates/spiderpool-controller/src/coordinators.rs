//! The leader's SpiderCoordinator status: which CIDRs are the cluster's Services
//! (`status.serviceCIDR`) and, per `spec.podCIDRType`, its overlay pod CIDRs
//! (`status.overlayPodCIDR`), with `phase` `Synced` or `NotReady` and, when not ready, a reason
//! an operator can act on. Sources, as upstream: the `networking.k8s.io/v1` ServiceCIDR objects;
//! the ConfigMap `kube-system/kubeadm-config` (`networking.podSubnet`, `serviceSubnet`); the
//! kube-controller-manager pod's `--cluster-cidr` and `--service-cluster-ip-range`; Calico's
//! IPPools; Cilium's `kube-system/cilium-config`. Recomputed on every change of a coordinator or
//! a ServiceCIDR, and every `resync`.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use serde_json::{json, Value};
use spiderpool_api::coordinator::{CoordinatorSpec, CoordinatorStatus};

/// What the cluster tells about its CIDRs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// `spec.cidrs` of the ServiceCIDR objects not being deleted (`None`: the API is not served).
    pub service_cidrs: Option<Vec<String>>,
    /// kubeadm-config's `networking.podSubnet`.
    pub kubeadm_pods: Vec<String>,
    /// kubeadm-config's `networking.serviceSubnet`.
    pub kubeadm_services: Vec<String>,
    /// The kube-controller-manager pod's `--cluster-cidr`.
    pub kcm_pods: Vec<String>,
    /// The kube-controller-manager pod's `--service-cluster-ip-range`.
    pub kcm_services: Vec<String>,
    /// Calico's IPPools' `spec.cidr` (`None`: Calico is not installed).
    pub calico: Option<Vec<String>>,
    /// Cilium's `cilium-config` data (`None`: Cilium is not installed).
    pub cilium: Option<std::collections::BTreeMap<String, String>>,
}

/// Comma-separated CIDRs, the invalid ones dropped.
fn cidrs(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|c| c.parse::<ipnet::IpNet>().is_ok())
        .map(String::from)
        .collect()
}

fn not_ready(reason: String) -> CoordinatorStatus {
    CoordinatorStatus {
        phase: "NotReady".into(),
        reason: Some(reason),
        overlay_pod_cidr: Vec::new(),
        service_cidr: Vec::new(),
    }
}

/// The status a coordinator of `spec` has, given what the cluster tells.
pub fn status_of(spec: &CoordinatorSpec, f: &Facts) -> CoordinatorStatus {
    let cluster_pods = if f.kubeadm_pods.is_empty() {
        f.kcm_pods.clone()
    } else {
        f.kubeadm_pods.clone()
    };
    let declared = spec.pod_cidr_type.as_deref().unwrap_or("auto");
    // `auto`: the cluster's overlay CNI if one is installed, else none (an underlay cluster).
    let kind = match declared {
        "auto" if f.calico.is_some() => "calico",
        "auto" if f.cilium.is_some() => "cilium",
        "auto" => "none",
        k => k,
    };
    let overlay = match kind {
        "none" => Vec::new(),
        "cluster" => cluster_pods.clone(),
        "calico" => match &f.calico {
            Some(pools) => pools.clone(),
            None => {
                return not_ready(
                    "podCIDRType calico: Calico needs to be installed first (no IPPools.crd.projectcalico.org)"
                        .into(),
                )
            }
        },
        "cilium" => {
            let Some(data) = &f.cilium else {
                return not_ready(
                    "podCIDRType cilium: Cilium needs to be installed first (no ConfigMap kube-system/cilium-config)"
                        .into(),
                );
            };
            let mode = data.get("ipam").map(String::as_str).unwrap_or("cluster-pool");
            match mode {
                "cluster-pool" | "cluster-pool-v2beta" => ["cluster-pool-ipv4-cidr", "cluster-pool-ipv6-cidr"]
                    .iter()
                    .filter_map(|k| data.get(*k))
                    .flat_map(|v| cidrs(&v.replace(' ', ",")))
                    .collect(),
                "kubernetes" => cluster_pods.clone(),
                other => {
                    return not_ready(format!(
                        "podCIDRType cilium: unsupported Cilium IPAM mode {other:?} (supported: cluster-pool, kubernetes)"
                    ))
                }
            }
        }
        other => return not_ready(format!("podCIDRType {other:?} is not supported")),
    };
    let services = match &f.service_cidrs {
        Some(s) if !s.is_empty() => s.clone(),
        _ if !f.kubeadm_services.is_empty() => f.kubeadm_services.clone(),
        _ => f.kcm_services.clone(),
    };
    if services.is_empty() {
        return not_ready(
            "no Service CIDR found: no ServiceCIDR object, no serviceSubnet in kube-system/kubeadm-config, \
             no kube-controller-manager pod with --service-cluster-ip-range"
                .into(),
        );
    }
    CoordinatorStatus {
        phase: "Synced".into(),
        reason: None,
        overlay_pod_cidr: overlay,
        service_cidr: services,
    }
}

/// kubeadm's ClusterConfiguration (`data.ClusterConfiguration`): its pod and Service subnets.
fn kubeadm(cm: &ConfigMap) -> (Vec<String>, Vec<String>) {
    let Some(text) = cm.data.as_ref().and_then(|d| d.get("ClusterConfiguration")) else {
        return Default::default();
    };
    let Ok(v) = serde_norway::from_str::<Value>(text) else {
        tracing::warn!("kube-system/kubeadm-config: ClusterConfiguration is not YAML");
        return Default::default();
    };
    let get = |k: &str| {
        v.pointer(&format!("/networking/{k}"))
            .and_then(Value::as_str)
            .map(cidrs)
            .unwrap_or_default()
    };
    (get("podSubnet"), get("serviceSubnet"))
}

/// A flag's value in the kube-controller-manager pod's first container (command and args).
fn kcm_flag(pod: &Pod, flag: &str) -> Vec<String> {
    let Some(c) = pod.spec.as_ref().and_then(|s| s.containers.first()) else {
        return Vec::new();
    };
    let prefix = format!("{flag}=");
    c.command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .find_map(|a| a.strip_prefix(&prefix))
        .map(cidrs)
        .unwrap_or_default()
}

fn is_missing(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn calico_api(client: &kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("crd.projectcalico.org", "v1", "IPPool");
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, "ippools"),
    )
}

/// Gathers the facts; a source that cannot be read (other than absent) is an error.
async fn facts(client: &kube::Client) -> Result<Facts, kube::Error> {
    let mut f = Facts::default();
    let scs: Api<ServiceCIDR> = Api::all(client.clone());
    f.service_cidrs = match scs.list(&ListParams::default()).await {
        Ok(l) => Some(
            l.items
                .iter()
                .filter(|s| s.metadata.deletion_timestamp.is_none())
                .flat_map(|s| s.spec.iter().flat_map(|sp| sp.cidrs.iter().flatten()))
                .cloned()
                .collect(),
        ),
        Err(e) if is_missing(&e) => None,
        Err(e) => return Err(e),
    };
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    if let Some(cm) = cms.get_opt("kubeadm-config").await? {
        (f.kubeadm_pods, f.kubeadm_services) = kubeadm(&cm);
    }
    f.cilium = cms
        .get_opt("cilium-config")
        .await?
        .map(|cm| cm.data.unwrap_or_default());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let kcm = pods
        .list(&ListParams::default().labels("component=kube-controller-manager"))
        .await?;
    if let Some(p) = kcm.items.first() {
        f.kcm_pods = kcm_flag(p, "--cluster-cidr");
        f.kcm_services = kcm_flag(p, "--service-cluster-ip-range");
    }
    f.calico = match calico_api(client).list(&ListParams::default()).await {
        Ok(l) => Some(
            l.items
                .iter()
                .filter_map(|p| p.data.pointer("/spec/cidr").and_then(Value::as_str))
                .map(String::from)
                .collect(),
        ),
        Err(e) if is_missing(&e) => None,
        Err(e) => return Err(e),
    };
    Ok(f)
}

fn coordinators(client: &kube::Client) -> Api<DynamicObject> {
    crate::pools::api(client, "SpiderCoordinator", "spidercoordinators")
}

/// One pass: every coordinator's status written where it changed.
async fn reconcile(client: &kube::Client) -> Result<(), kube::Error> {
    let api = coordinators(client);
    let list = api.list(&ListParams::default()).await?;
    if list.items.is_empty() {
        return Ok(());
    }
    let f = facts(client).await?;
    for c in list.items {
        let name = c.metadata.name.clone().unwrap_or_default();
        let spec: CoordinatorSpec =
            serde_json::from_value(c.data.get("spec").cloned().unwrap_or(json!({})))
                .unwrap_or_default();
        let want = status_of(&spec, &f);
        let have: Option<CoordinatorStatus> = c
            .data
            .get("status")
            .and_then(|s| serde_json::from_value(s.clone()).ok());
        if have.as_ref() == Some(&want) {
            continue;
        }
        match &want.reason {
            Some(r) => {
                tracing::warn!(coordinator = %name, reason = %r, "SpiderCoordinator not ready")
            }
            None => tracing::info!(coordinator = %name, services = ?want.service_cidr,
                pods = ?want.overlay_pod_cidr, "SpiderCoordinator synced"),
        }
        // `reason` is cleared explicitly once ready (a merge patch keeps absent keys).
        let mut status = serde_json::to_value(&want).expect("status serialises");
        status["reason"] = want
            .reason
            .clone()
            .map(Value::String)
            .unwrap_or(Value::Null);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
    }
    Ok(())
}

/// How long events are gathered before one pass.
const COALESCE: Duration = Duration::from_millis(200);

/// Runs until aborted: after every burst of coordinator or ServiceCIDR events, and every
/// `resync` (kubeadm-config, the controller-manager's flags and Calico's pools are read then).
pub async fn run(client: kube::Client, resync: Duration, default: Option<Value>) {
    if let Some(spec) = default {
        ensure_default(&client, spec).await;
    }
    let scs: Api<ServiceCIDR> = Api::all(client.clone());
    let mut events = futures_util::stream::select(
        watcher(coordinators(&client), watcher::Config::default())
            .default_backoff()
            .map(|e| e.map(|_| ()))
            .boxed(),
        watcher(scs, watcher::Config::default())
            .default_backoff()
            .map(|e| e.map(|_| ()))
            .boxed(),
    );
    let mut tick = tokio::time::interval(resync);
    while crate::passes::next(&mut events, &mut tick, COALESCE).await {
        if let Err(e) = reconcile(&client).await {
            tracing::warn!(error = %e, "SpiderCoordinator status: trying again at the next event");
        }
    }
}

/// Creates the SpiderCoordinator `default` with `spec` unless one exists (through the
/// admission webhooks, which fill in upstream's defaults and check it).
async fn ensure_default(client: &kube::Client, spec: Value) {
    let api = coordinators(client);
    let object: DynamicObject = match serde_json::from_value(json!({
        "apiVersion": spiderpool_api::crd::API_VERSION,
        "kind": "SpiderCoordinator",
        "metadata": {"name": spiderpool_api::coordinator::DEFAULT_NAME},
        "spec": spec,
    })) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "--default-coordinator");
            return;
        }
    };
    let mut wait = Duration::from_millis(500);
    loop {
        match api.create(&Default::default(), &object).await {
            Ok(_) => {
                tracing::info!("created the SpiderCoordinator default (--default-coordinator)");
                return;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => return,
            Err(kube::Error::Api(e)) if e.code == 400 || e.code == 422 => {
                tracing::error!(error = %e.message, "the SpiderCoordinator default of --default-coordinator is refused");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "creating the SpiderCoordinator default: trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(t: &str) -> CoordinatorSpec {
        CoordinatorSpec {
            pod_cidr_type: Some(t.into()),
            ..Default::default()
        }
    }

    fn services() -> Facts {
        Facts {
            service_cidrs: Some(vec!["10.233.0.0/18".into()]),
            ..Default::default()
        }
    }

    #[test]
    fn each_pod_cidr_type_takes_its_source() {
        let mut f = services();
        let s = status_of(&spec("none"), &f);
        assert_eq!((s.phase.as_str(), s.reason), ("Synced", None));
        assert_eq!(s.service_cidr, ["10.233.0.0/18"]);
        assert!(s.overlay_pod_cidr.is_empty());
        // cluster: kubeadm-config before the controller-manager's flag; nothing found is
        // still Synced (an underlay cluster may have no pod CIDR), as upstream.
        assert!(status_of(&spec("cluster"), &f).overlay_pod_cidr.is_empty());
        f.kcm_pods = vec!["10.244.0.0/16".into()];
        assert_eq!(
            status_of(&spec("cluster"), &f).overlay_pod_cidr,
            ["10.244.0.0/16"]
        );
        f.kubeadm_pods = vec!["10.245.0.0/16".into(), "fd00:245::/56".into()];
        assert_eq!(
            status_of(&spec("cluster"), &f).overlay_pod_cidr,
            ["10.245.0.0/16", "fd00:245::/56"]
        );
        // calico and cilium need their CNI.
        let s = status_of(&spec("calico"), &f);
        assert_eq!(s.phase, "NotReady");
        assert!(s
            .reason
            .unwrap()
            .contains("Calico needs to be installed first"));
        let s = status_of(&spec("cilium"), &f);
        assert!(s
            .reason
            .unwrap()
            .contains("Cilium needs to be installed first"));
        f.calico = Some(vec!["192.168.0.0/16".into()]);
        assert_eq!(
            status_of(&spec("calico"), &f).overlay_pod_cidr,
            ["192.168.0.0/16"]
        );
        // auto: the installed overlay CNI, else none.
        assert_eq!(
            status_of(&spec("auto"), &f).overlay_pod_cidr,
            ["192.168.0.0/16"]
        );
        f.calico = None;
        assert!(status_of(&spec("auto"), &f).overlay_pod_cidr.is_empty());
        f.cilium = Some(
            [
                ("ipam", "cluster-pool"),
                ("cluster-pool-ipv4-cidr", "10.0.0.0/8"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
        );
        assert_eq!(
            status_of(&spec("auto"), &f).overlay_pod_cidr,
            ["10.0.0.0/8"]
        );
        f.cilium = Some([("ipam".to_string(), "eni".to_string())].into());
        let s = status_of(&spec("cilium"), &f);
        assert!(s
            .reason
            .unwrap()
            .contains("unsupported Cilium IPAM mode \"eni\""));
    }

    #[test]
    fn service_cidrs_fall_back_from_the_api_to_kubeadm_to_the_controller_manager() {
        let mut f = Facts {
            kcm_services: vec!["10.96.0.0/12".into()],
            ..Default::default()
        };
        assert_eq!(status_of(&spec("none"), &f).service_cidr, ["10.96.0.0/12"]);
        f.kubeadm_services = vec!["10.97.0.0/16".into()];
        assert_eq!(status_of(&spec("none"), &f).service_cidr, ["10.97.0.0/16"]);
        f.service_cidrs = Some(vec!["10.233.0.0/18".into()]);
        assert_eq!(status_of(&spec("none"), &f).service_cidr, ["10.233.0.0/18"]);
        let s = status_of(&spec("none"), &Facts::default());
        assert_eq!(s.phase, "NotReady");
        assert!(s.reason.unwrap().starts_with("no Service CIDR found"));
    }

    #[test]
    fn kubeadm_and_controller_manager_flags_are_read() {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "kubeadm-config"},
            "data": {"ClusterConfiguration": "apiVersion: kubeadm.k8s.io/v1beta3\nnetworking:\n  podSubnet: 10.244.0.0/16,fd00::/56\n  serviceSubnet: 10.96.0.0/12,bad\n"}}))
        .unwrap();
        assert_eq!(
            kubeadm(&cm),
            (
                vec!["10.244.0.0/16".to_string(), "fd00::/56".to_string()],
                vec!["10.96.0.0/12".to_string()]
            )
        );
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "kcm"},
            "spec": {"containers": [{"name": "kcm", "command": ["kube-controller-manager",
                "--cluster-cidr=10.244.0.0/16"], "args": ["--service-cluster-ip-range=10.96.0.0/12"]}]}}))
        .unwrap();
        assert_eq!(kcm_flag(&pod, "--cluster-cidr"), ["10.244.0.0/16"]);
        assert_eq!(
            kcm_flag(&pod, "--service-cluster-ip-range"),
            ["10.96.0.0/12"]
        );
        assert!(kcm_flag(&pod, "--node-cidr-mask-size").is_empty());
    }
}
