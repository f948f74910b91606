//! SpiderSubnet auto-created pools: the pod-template annotations that ask for them, the
//! application that owns one, the pool's name, labels and pod affinity, and how many addresses
//! it should hold (`../spec/spiderpool-reference.md` §5).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use spiderpool_core::{IpFamily, LabelSelector, Labels};

use crate::k8s::KubeObject;
use crate::keys::{
    APP_API_GROUP, APP_API_VERSION, APP_KIND, APP_NAME, APP_NAMESPACE, IPPOOL_IP_NUMBER,
    IPPOOL_RECLAIM, LABEL_APP_GV, LABEL_APP_KIND, LABEL_APP_NAME, LABEL_APP_NAMESPACE,
    LABEL_APP_UID, LABEL_INTERFACE, LABEL_IP_VERSION, LABEL_RECLAIM, SUBNET, SUBNETS,
};
use crate::ValidationError;

/// The controllers whose applications get auto pools from the controller: (group, kind).
pub const APP_KINDS: [(&str, &str); 6] = [
    ("apps", "Deployment"),
    ("apps", "ReplicaSet"),
    ("apps", "StatefulSet"),
    ("apps", "DaemonSet"),
    ("batch", "Job"),
    ("batch", "CronJob"),
];

/// One NIC's subnets, as `ipam.spidernet.io/subnet(s)` name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetChoice {
    /// The pod interface, `eth0` when left out.
    pub interface: String,
    /// The IPv4 SpiderSubnet.
    pub v4: Option<String>,
    /// The IPv6 SpiderSubnet.
    pub v6: Option<String>,
}

impl SubnetChoice {
    /// The subnet named for `family`.
    pub fn family(&self, family: IpFamily) -> Option<&str> {
        match family {
            IpFamily::V4 => self.v4.as_deref(),
            IpFamily::V6 => self.v6.as_deref(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubnetValue {
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    ipv4: Vec<String>,
    #[serde(default)]
    ipv6: Vec<String>,
}

impl SubnetValue {
    fn choice(self) -> SubnetChoice {
        let first = |v: Vec<String>| v.into_iter().next().filter(|s| !s.trim().is_empty());
        SubnetChoice {
            interface: self
                .interface
                .filter(|i| !i.is_empty())
                .unwrap_or_else(|| "eth0".into()),
            v4: first(self.ipv4),
            v6: first(self.ipv6),
        }
    }
}

/// How many addresses an auto pool holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpNumber {
    /// `"+N"`: the application's replicas plus N.
    Flexible(u64),
    /// `"N"`: exactly N.
    Fixed(u64),
}

impl std::fmt::Display for IpNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IpNumber::Flexible(n) => write!(f, "+{n}"),
            IpNumber::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// Parses `ipam.spidernet.io/ippool-ip-number`: `"+N"` or `"N"`, N a whole number.
pub fn parse_ip_number(value: &str) -> Result<IpNumber, ValidationError> {
    let v = value.trim();
    let (flexible, digits) = match v.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let n: u64 = digits
        .parse()
        .ok()
        .filter(|_| !digits.starts_with('+'))
        .ok_or_else(|| {
            ValidationError::Invalid(format!(
                "annotation {IPPOOL_IP_NUMBER}: {value:?} is neither \"+N\" (replicas + N) nor \"N\" (exactly N) with N a whole number ≥ 0"
            ))
        })?;
    Ok(if flexible {
        IpNumber::Flexible(n)
    } else {
        IpNumber::Fixed(n)
    })
}

/// Parses `ipam.spidernet.io/ippool-reclaim` as Go's `strconv.ParseBool` does.
pub fn parse_reclaim(value: &str) -> Result<bool, ValidationError> {
    match value.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(ValidationError::Invalid(format!(
            "annotation {IPPOOL_RECLAIM}: {value:?} is not a boolean (\"true\" or \"false\")"
        ))),
    }
}

/// What a pod template's annotations ask of auto pools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoConfig {
    /// The subnets of each NIC.
    pub subnets: Vec<SubnetChoice>,
    /// `ipam.spidernet.io/ippool-ip-number`, when set.
    pub ip_number: Option<IpNumber>,
    /// `ipam.spidernet.io/ippool-reclaim`.
    pub reclaim: bool,
}

impl AutoConfig {
    /// The subnets of `nic`.
    pub fn nic(&self, nic: &str) -> Option<&SubnetChoice> {
        self.subnets.iter().find(|s| s.interface == nic)
    }

    /// How many addresses each of the application's pools holds: `+N` is `replicas + N`, `N` is
    /// N; without the annotation, `replicas + default_redundancy`.
    pub fn desired(&self, replicas: u64, default_redundancy: u64) -> u64 {
        match self.ip_number {
            Some(IpNumber::Fixed(n)) => n,
            Some(IpNumber::Flexible(n)) => replicas.saturating_add(n),
            None => replicas.saturating_add(default_redundancy),
        }
    }

    /// The value recorded in the pool's `ippool-ip-number` annotation.
    pub fn ip_number_value(&self, default_redundancy: u64) -> String {
        self.ip_number
            .unwrap_or(IpNumber::Flexible(default_redundancy))
            .to_string()
    }
}

/// Reads the auto-pool annotations (`ipam.spidernet.io/subnets` wins over `subnet`); `None`
/// when neither is set. Errors name the annotation and the bad value.
pub fn config(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<AutoConfig>, ValidationError> {
    let bad = |key: &str, value: &str, why: String| {
        ValidationError::Invalid(format!("annotation {key} {:?}: {why}", value.trim()))
    };
    let subnets = if let Some(v) = annotations.get(SUBNETS) {
        let items: Vec<SubnetValue> = serde_json::from_str(v).map_err(|e| {
            bad(
                SUBNETS,
                v,
                format!("{e} (want e.g. [{{\"interface\": \"eth0\", \"ipv4\": [\"subnet-a\"]}}, {{\"interface\": \"net1\", \"ipv4\": [\"subnet-b\"]}}])"),
            )
        })?;
        let choices: Vec<SubnetChoice> = items.into_iter().map(SubnetValue::choice).collect();
        for (i, c) in choices.iter().enumerate() {
            if choices[..i].iter().any(|o| o.interface == c.interface) {
                return Err(bad(
                    SUBNETS,
                    v,
                    format!("interface {:?} is listed twice", c.interface),
                ));
            }
            for family in [IpFamily::V4, IpFamily::V6] {
                if let Some(s) = c.family(family) {
                    if choices[..i].iter().any(|o| o.family(family) == Some(s)) {
                        return Err(bad(
                            SUBNETS,
                            v,
                            format!("subnet {s:?} serves two interfaces; give each its own"),
                        ));
                    }
                }
            }
        }
        choices
    } else if let Some(v) = annotations.get(SUBNET) {
        let item: SubnetValue = serde_json::from_str(v).map_err(|e| {
            bad(
                SUBNET,
                v,
                format!("{e} (want e.g. {{\"ipv4\": [\"subnet-a\"], \"ipv6\": [\"subnet-b\"]}})"),
            )
        })?;
        vec![item.choice()]
    } else {
        return Ok(None);
    };
    let key = if annotations.contains_key(SUBNETS) {
        SUBNETS
    } else {
        SUBNET
    };
    if subnets.is_empty() {
        return Err(bad(key, &annotations[key], "names no subnet".into()));
    }
    if let Some(c) = subnets.iter().find(|c| c.v4.is_none() && c.v6.is_none()) {
        return Err(bad(
            key,
            &annotations[key],
            format!(
                "interface {:?} names no subnet (set ipv4, ipv6 or both)",
                c.interface
            ),
        ));
    }
    // Dual stack on one NIC needs both families on every NIC, as upstream asks.
    for family in [IpFamily::V4, IpFamily::V6] {
        let with = subnets
            .iter()
            .filter(|c| c.family(family).is_some())
            .count();
        if with != 0 && with != subnets.len() {
            return Err(bad(
                key,
                &annotations[key],
                format!("some interfaces name an {family} subnet and some do not: name one for every interface or for none"),
            ));
        }
    }
    let ip_number = annotations
        .get(IPPOOL_IP_NUMBER)
        .map(|v| parse_ip_number(v))
        .transpose()?;
    let reclaim = annotations
        .get(IPPOOL_RECLAIM)
        .map(|v| parse_reclaim(v))
        .transpose()?
        .unwrap_or(true);
    Ok(Some(AutoConfig {
        subnets,
        ip_number,
        reclaim,
    }))
}

/// The application an auto pool serves: a pod's top controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// API group (empty for the core group).
    pub group: String,
    /// API version.
    pub version: String,
    /// Kind, e.g. `Deployment`.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

impl App {
    /// The application of a workload object (`apps/v1` Deployment, …).
    pub fn of(o: &KubeObject) -> App {
        let (group, version) = split_api_version(&o.api_version);
        App {
            group,
            version,
            kind: o.kind.clone(),
            namespace: o
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: o.metadata.name.clone(),
            uid: o.metadata.uid.clone().unwrap_or_default(),
        }
    }

    /// Whether the controller reconciles this kind of application (else it is a third party's).
    pub fn built_in(&self) -> bool {
        APP_KINDS
            .iter()
            .any(|(g, k)| *g == self.group && *k == self.kind)
    }

    /// The workload key: `namespace/Kind/name` for the kinds the controller knows,
    /// `namespace/Kind.version.group/name` for a third party's (read by its API group and
    /// version; a Kind of that name in `apps` is another application).
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.key_kind(), self.name)
    }

    /// The kind part of [`App::key`].
    pub fn key_kind(&self) -> String {
        if self.built_in() {
            self.kind.clone()
        } else if self.group.is_empty() {
            format!("{}.{}", self.kind, self.version)
        } else {
            format!("{}.{}.{}", self.kind, self.version, self.group)
        }
    }

    /// The application an auto pool's pod affinity names (no UID: the pool's label has it).
    pub fn from_affinity(labels: &BTreeMap<String, String>) -> Option<App> {
        let get = |k: &str| labels.get(k).cloned();
        Some(App {
            group: get(APP_API_GROUP).unwrap_or_default(),
            version: get(APP_API_VERSION)?,
            kind: get(APP_KIND)?,
            namespace: get(APP_NAMESPACE)?,
            name: get(APP_NAME)?,
            uid: String::new(),
        })
    }

    /// `apps/v1`, or `v1` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `Deployment default/web`.
    pub fn describe(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    /// The subnet status's name for it: `apps_v1_Deployment_default_web`.
    pub fn application(&self) -> String {
        format!(
            "{}_{}_{}_{}",
            self.api_version().replace('/', "_"),
            self.kind,
            self.namespace,
            self.name
        )
    }

    /// The pod-affinity labels an auto pool binds to this application.
    pub fn affinity_labels(&self) -> Labels {
        [
            (APP_API_GROUP, self.group.as_str()),
            (APP_API_VERSION, self.version.as_str()),
            (APP_KIND, self.kind.as_str()),
            (APP_NAMESPACE, self.namespace.as_str()),
            (APP_NAME, self.name.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// The pod affinity of its auto pools.
    pub fn affinity(&self) -> LabelSelector {
        LabelSelector {
            match_labels: self.affinity_labels(),
            match_expressions: Vec::new(),
        }
    }

    /// Whether `selector` is exactly the pod affinity of this application's auto pools.
    pub fn is_affinity(&self, selector: Option<&LabelSelector>) -> bool {
        selector.is_some_and(|s| {
            s.match_expressions.is_empty() && s.match_labels == self.affinity_labels()
        })
    }

    /// The name of its auto pool for `family` on `nic`: `auto4-web-eth0-1a2b3` (the last part is
    /// the first 5 characters of the UID's last dash-separated part; the application's name is
    /// cut so that the whole stays a 253-character DNS subdomain).
    pub fn pool_name(&self, family: IpFamily, nic: &str) -> String {
        let uid = self.uid.rsplit('-').next().unwrap_or_default();
        let uid: String = uid.chars().take(5).collect::<String>().to_lowercase();
        let nic = nic.to_lowercase();
        let fixed = "auto4---".len() + nic.len() + uid.len();
        let room = 253usize.saturating_sub(fixed);
        let mut name: String = self.name.to_lowercase().chars().take(room).collect();
        while name.ends_with(['-', '.']) {
            name.pop();
        }
        format!("auto{}-{name}-{nic}-{uid}", family.number())
    }

    /// The labels of its auto pool for `family` on `nic` (besides the CIDR and owner-subnet
    /// labels every pool of a subnet carries).
    pub fn pool_labels(&self, family: IpFamily, nic: &str, reclaim: bool) -> Labels {
        [
            (LABEL_APP_GV, self.api_version().replace('/', "_")),
            (LABEL_APP_KIND, self.kind.clone()),
            (LABEL_APP_NAMESPACE, self.namespace.clone()),
            (LABEL_APP_NAME, label_value(&self.name)),
            (LABEL_APP_UID, self.uid.clone()),
            (LABEL_INTERFACE, nic.to_string()),
            (LABEL_IP_VERSION, format!("IPv{}", family.number())),
            (LABEL_RECLAIM, reclaim.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// A name cut to a label value's 63 characters, ending in an alphanumeric character.
pub fn label_value(s: &str) -> String {
    let mut v: String = s.chars().take(63).collect();
    while v.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.pop();
    }
    v
}

/// The kind part of a workload key split: `Deployment` → (`Deployment`, `None`);
/// `CloneSet.v1alpha1.apps.kruise.io` → (`CloneSet`, `Some(("v1alpha1", "apps.kruise.io"))`).
pub fn split_key_kind(segment: &str) -> (&str, Option<(&str, &str)>) {
    match segment.split_once('.') {
        Some((kind, rest)) => (kind, Some(rest.split_once('.').unwrap_or((rest, "")))),
        None => (segment, None),
    }
}

/// `apps/v1` → (`apps`, `v1`); `v1` → (``, `v1`).
pub fn split_api_version(api_version: &str) -> (String, String) {
    match api_version.split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), api_version.to_string()),
    }
}

/// Whether a pool's labels mark it as an auto pool.
pub fn is_auto(labels: &BTreeMap<String, String>) -> bool {
    labels.contains_key(LABEL_APP_KIND) && labels.contains_key(LABEL_INTERFACE)
}

/// The pod template of a workload (a CronJob's is its job template's).
pub fn template(workload: &KubeObject) -> Option<&Value> {
    let spec = if workload.kind == "CronJob" {
        workload.spec.pointer("/jobTemplate/spec")?
    } else {
        &workload.spec
    };
    spec.get("template")
}

/// The annotations of a workload's pod template.
pub fn template_annotations(workload: &KubeObject) -> BTreeMap<String, String> {
    template(workload)
        .and_then(|t| t.pointer("/metadata/annotations"))
        .and_then(|a| serde_json::from_value(a.clone()).ok())
        .unwrap_or_default()
}

/// Whether a workload's pods run in the host's network (they get no auto pool).
pub fn host_network(workload: &KubeObject) -> bool {
    template(workload)
        .and_then(|t| t.pointer("/spec/hostNetwork"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// How many pods a workload wants: `spec.replicas` (default 1) of a Deployment, ReplicaSet or
/// StatefulSet; a DaemonSet's `status.desiredNumberScheduled`; a Job's (a CronJob's job
/// template's) completions, else parallelism, else 1.
pub fn replicas(workload: &KubeObject) -> u64 {
    let n = |v: Option<&Value>| v.and_then(Value::as_u64);
    match workload.kind.as_str() {
        "DaemonSet" => n(workload.status.get("desiredNumberScheduled")).unwrap_or(0),
        "Job" | "CronJob" => {
            let spec = if workload.kind == "CronJob" {
                workload.spec.pointer("/jobTemplate/spec")
            } else {
                Some(&workload.spec)
            };
            let spec = spec.cloned().unwrap_or(Value::Null);
            n(spec.get("completions"))
                .or_else(|| n(spec.get("parallelism")))
                .unwrap_or(1)
                .max(1)
        }
        _ => n(workload.spec.get("replicas")).unwrap_or(1),
    }
}

#[cfg(test)]
mod tests;
