//! Objects as `apply` reads them: multi-document YAML (or JSON) in, typed objects out, with a
//! warning for each field the type does not know. Also the kinds the datastore keeps and how
//! each is keyed.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::coordinator::SpiderCoordinator;
use crate::crd::{SpiderEndpoint, SpiderIPPool, SpiderReservedIP, SpiderSubnet, API_VERSION};
use crate::k8s::{KubeObject, WORKLOAD_KINDS};
use crate::meta::ObjectMeta;
use crate::multus::SpiderMultusConfig;
use crate::ValidationError;

/// The kinds the datastore keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// SpiderIPPool.
    IPPool,
    /// SpiderSubnet.
    Subnet,
    /// SpiderReservedIP.
    ReservedIP,
    /// SpiderEndpoint.
    Endpoint,
    /// SpiderCoordinator.
    Coordinator,
    /// SpiderMultusConfig.
    MultusConfig,
    /// v1 Node.
    Node,
    /// v1 Namespace.
    Namespace,
    /// v1 Pod.
    Pod,
    /// apps/v1 and batch/v1 workloads.
    Workload,
    /// k8s.cni.cncf.io/v1 NetworkAttachmentDefinition.
    NetworkAttachment,
}

impl Kind {
    /// The resource name (plural, lower case) used as the datastore's key space.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::IPPool => "spiderippools",
            Kind::Subnet => "spidersubnets",
            Kind::ReservedIP => "spiderreservedips",
            Kind::Endpoint => "spiderendpoints",
            Kind::Coordinator => "spidercoordinators",
            Kind::MultusConfig => "spidermultusconfigs",
            Kind::Node => "nodes",
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
            Kind::Workload => "workloads",
            Kind::NetworkAttachment => "network-attachment-definitions",
        }
    }

    /// Parses a resource name, singular, plural or short name, as `kubectl get` does.
    pub fn from_cli(s: &str) -> Option<Kind> {
        let s = s.to_ascii_lowercase();
        Some(match s.as_str() {
            "ippool" | "ippools" | "spiderippool" | "spiderippools" | "sp" => Kind::IPPool,
            "subnet" | "subnets" | "spidersubnet" | "spidersubnets" | "ss" => Kind::Subnet,
            "reservedip" | "reservedips" | "spiderreservedip" | "spiderreservedips" | "sr" => {
                Kind::ReservedIP
            }
            "endpoint" | "endpoints" | "spiderendpoint" | "spiderendpoints" | "se" => {
                Kind::Endpoint
            }
            "coordinator" | "coordinators" | "spidercoordinator" | "spidercoordinators" | "scc" => {
                Kind::Coordinator
            }
            "multusconfig"
            | "multusconfigs"
            | "spidermultusconfig"
            | "spidermultusconfigs"
            | "smc" => Kind::MultusConfig,
            "node" | "nodes" | "no" => Kind::Node,
            "namespace" | "namespaces" | "ns" => Kind::Namespace,
            "pod" | "pods" | "po" => Kind::Pod,
            "workload" | "workloads" => Kind::Workload,
            "network-attachment-definition"
            | "network-attachment-definitions"
            | "net-attach-def" => Kind::NetworkAttachment,
            _ => return None,
        })
    }

    /// Whether objects of this kind live in a namespace (their key is `namespace/name`).
    pub fn namespaced(self) -> bool {
        matches!(
            self,
            Kind::Endpoint
                | Kind::Pod
                | Kind::Workload
                | Kind::NetworkAttachment
                | Kind::MultusConfig
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.resource())
    }
}

/// One object of any supported kind.
// Objects are handled one or a few at a time, never in bulk arrays: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// SpiderIPPool.
    IPPool(SpiderIPPool),
    /// SpiderSubnet.
    Subnet(SpiderSubnet),
    /// SpiderReservedIP.
    ReservedIP(SpiderReservedIP),
    /// SpiderEndpoint.
    Endpoint(SpiderEndpoint),
    /// SpiderCoordinator.
    Coordinator(SpiderCoordinator),
    /// SpiderMultusConfig.
    MultusConfig(SpiderMultusConfig),
    /// Node, Namespace, Pod, workload or NetworkAttachmentDefinition.
    Kube(Kind, KubeObject),
}

/// A parsed document and the unknown fields it carried.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The object.
    pub object: Object,
    /// One line per unknown field, naming it.
    pub warnings: Vec<String>,
}

fn typed<T: DeserializeOwned>(v: Value, what: &str) -> Result<(T, Vec<String>), ValidationError> {
    let mut unknown = Vec::new();
    let t = serde_ignored::deserialize(v, |path| unknown.push(path.to_string()))
        .map_err(|e| ValidationError::Invalid(format!("{what}: {e}")))?;
    let warnings = unknown
        .into_iter()
        .map(|p| format!("{what}: unknown field {p:?} ignored"))
        .collect();
    Ok((t, warnings))
}

impl Object {
    /// The kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::IPPool(_) => Kind::IPPool,
            Object::Subnet(_) => Kind::Subnet,
            Object::ReservedIP(_) => Kind::ReservedIP,
            Object::Endpoint(_) => Kind::Endpoint,
            Object::Coordinator(_) => Kind::Coordinator,
            Object::MultusConfig(_) => Kind::MultusConfig,
            Object::Kube(k, _) => *k,
        }
    }

    /// The metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::IPPool(o) => &o.metadata,
            Object::Subnet(o) => &o.metadata,
            Object::ReservedIP(o) => &o.metadata,
            Object::Endpoint(o) => &o.metadata,
            Object::Coordinator(o) => &o.metadata,
            Object::MultusConfig(o) => &o.metadata,
            Object::Kube(_, o) => &o.metadata,
        }
    }

    /// The metadata, mutable.
    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::IPPool(o) => &mut o.metadata,
            Object::Subnet(o) => &mut o.metadata,
            Object::ReservedIP(o) => &mut o.metadata,
            Object::Endpoint(o) => &mut o.metadata,
            Object::Coordinator(o) => &mut o.metadata,
            Object::MultusConfig(o) => &mut o.metadata,
            Object::Kube(_, o) => &mut o.metadata,
        }
    }

    /// The datastore key: `name`, `namespace/name`, or for workloads `namespace/Kind/name`.
    pub fn key(&self) -> String {
        let m = self.metadata();
        let ns = m.namespace.as_deref().unwrap_or("default");
        match self {
            Object::Kube(Kind::Workload, o) => format!("{ns}/{}/{}", o.kind, m.name),
            o if o.kind().namespaced() => format!("{ns}/{}", m.name),
            _ => m.name.clone(),
        }
    }

    /// A human name: `SpiderIPPool "test-ippool-6"`.
    pub fn describe(&self) -> String {
        let kind = match self {
            Object::IPPool(_) => "SpiderIPPool",
            Object::Subnet(_) => "SpiderSubnet",
            Object::ReservedIP(_) => "SpiderReservedIP",
            Object::Endpoint(_) => "SpiderEndpoint",
            Object::Coordinator(_) => "SpiderCoordinator",
            Object::MultusConfig(_) => "SpiderMultusConfig",
            Object::Kube(_, o) => o.kind.as_str(),
        };
        format!("{kind} {:?}", self.key())
    }

    /// The object as JSON in its Kubernetes form.
    pub fn to_value(&self) -> Value {
        fn v<T: Serialize>(t: &T) -> Value {
            serde_json::to_value(t).expect("objects serialise")
        }
        match self {
            Object::IPPool(o) => v(o),
            Object::Subnet(o) => v(o),
            Object::ReservedIP(o) => v(o),
            Object::Endpoint(o) => v(o),
            Object::Coordinator(o) => v(o),
            Object::MultusConfig(o) => v(o),
            Object::Kube(_, o) => v(o),
        }
    }

    /// Reads an object of `kind` back from its stored JSON.
    pub fn from_value(kind: Kind, mut value: Value) -> Result<Object, ValidationError> {
        if kind == Kind::Endpoint {
            crate::crd::upgrade_legacy_endpoint(&mut value);
        }
        let err = |e: serde_json::Error| ValidationError::Invalid(format!("stored {kind}: {e}"));
        Ok(match kind {
            Kind::IPPool => Object::IPPool(serde_json::from_value(value).map_err(err)?),
            Kind::Subnet => Object::Subnet(serde_json::from_value(value).map_err(err)?),
            Kind::ReservedIP => Object::ReservedIP(serde_json::from_value(value).map_err(err)?),
            Kind::Endpoint => Object::Endpoint(serde_json::from_value(value).map_err(err)?),
            Kind::Coordinator => Object::Coordinator(serde_json::from_value(value).map_err(err)?),
            Kind::MultusConfig => Object::MultusConfig(serde_json::from_value(value).map_err(err)?),
            k => Object::Kube(k, serde_json::from_value(value).map_err(err)?),
        })
    }

    /// Reads one document already turned into JSON.
    pub fn from_document(doc: Value) -> Result<Parsed, ValidationError> {
        let api_version = doc
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let what = format!("{kind} {name:?}");
        if name.is_empty() {
            return Err(ValidationError::Invalid(format!(
                "{} (apiVersion {api_version:?}): metadata.name is required",
                if kind.is_empty() { "object" } else { &kind }
            )));
        }
        let (object, warnings) = match (api_version.as_str(), kind.as_str()) {
            (API_VERSION, "SpiderIPPool") => {
                let (o, w) = typed(doc, &what)?;
                (Object::IPPool(o), w)
            }
            (API_VERSION, "SpiderSubnet") => {
                let (o, w) = typed(doc, &what)?;
                (Object::Subnet(o), w)
            }
            (API_VERSION, "SpiderReservedIP") => {
                let (o, w) = typed(doc, &what)?;
                (Object::ReservedIP(o), w)
            }
            (API_VERSION, "SpiderCoordinator") => {
                let (o, w) = typed(doc, &what)?;
                (Object::Coordinator(o), w)
            }
            (API_VERSION, "SpiderMultusConfig") => {
                let (o, w) = typed(doc, &what)?;
                (Object::MultusConfig(o), w)
            }
            ("v1", "Node") => kube(Kind::Node, doc, &what)?,
            ("v1", "Namespace") => kube(Kind::Namespace, doc, &what)?,
            ("v1", "Pod") => kube(Kind::Pod, doc, &what)?,
            ("apps/v1" | "batch/v1", k) if WORKLOAD_KINDS.contains(&k) => kube(Kind::Workload, doc, &what)?,
            ("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinition") => {
                kube(Kind::NetworkAttachment, doc, &what)?
            }
            _ => {
                return Err(ValidationError::Invalid(format!(
                    "{what}: unsupported apiVersion {api_version:?} kind {kind:?} (supported: \
                     {API_VERSION} SpiderIPPool, SpiderSubnet, SpiderReservedIP, SpiderCoordinator, SpiderMultusConfig; v1 Node, Namespace, Pod; \
                     apps/v1 {}; k8s.cni.cncf.io/v1 NetworkAttachmentDefinition)",
                    WORKLOAD_KINDS.join(", ")
                )))
            }
        };
        Ok(Parsed { object, warnings })
    }
}

fn kube(kind: Kind, doc: Value, what: &str) -> Result<(Object, Vec<String>), ValidationError> {
    let (o, w): (KubeObject, _) = typed(doc, what)?;
    Ok((Object::Kube(kind, o), w))
}

/// Parses multi-document YAML (JSON is YAML too). Empty documents are skipped; an error names
/// the document's position. A key repeated in one mapping is an error naming the key and its
/// line, not a silent last-wins; anchors and aliases may not expand the text past
/// [`EXPANSION_PER_BYTE`] values and string bytes per byte of it (plus [`EXPANSION_BASE`]).
pub fn parse_documents(text: &str) -> Result<Vec<Parsed>, ValidationError> {
    let budget = Cell::new(
        text.len()
            .saturating_mul(EXPANSION_PER_BYTE)
            .saturating_add(EXPANSION_BASE),
    );
    let mut out = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let doc = Strict { budget: &budget }
            .deserialize(de)
            .map_err(|e| ValidationError::Invalid(format!("document {}: {e}", i + 1)))?;
        if doc.is_null() {
            continue;
        }
        if !doc.is_object() {
            return Err(ValidationError::Invalid(format!(
                "document {}: expected an object with apiVersion, kind and metadata, got {}",
                i + 1,
                shape(&doc)
            )));
        }
        out.push(
            Object::from_document(doc)
                .map_err(|e| ValidationError::Invalid(format!("document {}: {e}", i + 1)))?,
        );
    }
    Ok(out)
}

/// How many values and string bytes a manifest may expand to, per byte of its text. Without
/// aliases a byte of YAML makes at most about two; the rest is room for anchors reused a few
/// times, while an alias bomb (aliases of aliases, each copying the whole tree below it) stops
/// here instead of exhausting memory.
pub const EXPANSION_PER_BYTE: usize = 4;
/// Values and string bytes every manifest may expand to on top of [`EXPANSION_PER_BYTE`].
pub const EXPANSION_BASE: usize = 1 << 20;

/// A short description of a document that is not an object, for errors.
fn shape(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("a list ({} items)", a.len()),
        Value::String(s) if s.chars().count() > 40 => {
            format!("{:?}…", s.chars().take(40).collect::<String>())
        }
        other => other.to_string(),
    }
}

/// Reads one YAML document as JSON, like `serde_json::Value`'s own `Deserialize`, but refuses a
/// key repeated in a mapping and stops once the document has spent the shared budget.
#[derive(Clone, Copy)]
struct Strict<'b> {
    budget: &'b Cell<usize>,
}

impl Strict<'_> {
    fn spend<E: de::Error>(self, units: usize) -> Result<(), E> {
        match self.budget.get().checked_sub(units) {
            Some(left) => {
                self.budget.set(left);
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "anchors and aliases expand the manifest past {EXPANSION_PER_BYTE} values and \
                 string bytes per byte of it (plus {EXPANSION_BASE})"
            ))),
        }
    }

    fn string<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.spend(1 + s.len())?;
        Ok(Value::String(s.to_owned()))
    }
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.spend(1)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.spend(1)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.spend(1)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        self.spend(1)?;
        serde_json::Number::deserialize(de::value::I128Deserializer::new(v)).map(Value::Number)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        self.spend(1)?;
        serde_json::Number::deserialize(de::value::U128Deserializer::new(v)).map(Value::Number)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.spend(1)?;
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.string(v)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.spend(1)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.spend(1)?;
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.spend(1)?;
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key_seed(Key {
            seen: &out,
            value: self,
        })? {
            let v = map.next_value_seed(self)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// A mapping key, refused when the mapping already has it. The error is raised while the key
/// itself is read, so the YAML reader gives it the key's own line and the mapping's path.
struct Key<'a, 'b> {
    seen: &'a serde_json::Map<String, Value>,
    value: Strict<'b>,
}

impl<'de> DeserializeSeed<'de> for Key<'_, '_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_, '_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        if self.seen.contains_key(v) {
            return Err(E::custom(format_args!(
                "duplicate key {v:?} (each key may appear once in a mapping)"
            )));
        }
        self.value.spend(1 + v.len())?;
        Ok(v.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multi_document_yaml_with_warnings() {
        let text = "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n  labels: {node-subnet: subnet-6}\n---\n# only a comment\n---\napiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: p}\nspec:\n  subnet: 10.6.0.0/16\n  ipz: [10.6.0.1]\n";
        let docs = parse_documents(text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].object.kind(), Kind::Node);
        assert_eq!(docs[0].object.metadata().labels["node-subnet"], "subnet-6");
        assert_eq!(docs[1].object.key(), "p");
        assert_eq!(
            docs[1].warnings,
            ["SpiderIPPool \"p\": unknown field \"spec.ipz\" ignored"]
        );
    }

    #[test]
    fn errors_name_the_document() {
        let err = parse_documents("apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\napiVersion: v9\nkind: Thing\nmetadata: {name: t}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "document 2: Thing \"t\": unsupported apiVersion \"v9\" kind \"Thing\""
            ),
            "{err}"
        );
        let err = parse_documents("apiVersion: v1\nkind: Node\nmetadata: {}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "document 1: Node (apiVersion \"v1\"): metadata.name is required"
        );
        let err = parse_documents("a: [").unwrap_err().to_string();
        assert!(err.starts_with("document 1: "), "{err}");
        let err = parse_documents(
            "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: p}\nspec: {subnet: [1]}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("document 1: SpiderIPPool \"p\": invalid type"),
            "{err}"
        );
    }

    #[test]
    fn keys_of_namespaced_objects() {
        let docs = parse_documents(
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: web, namespace: prod}\nspec: {replicas: 3}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-0}\n",
        )
        .unwrap();
        assert_eq!(docs[0].object.key(), "prod/StatefulSet/web");
        assert_eq!(docs[1].object.key(), "default/web-0");
    }
    const POOL: &str = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\n";

    #[test]
    fn duplicate_keys_are_refused_with_their_line() {
        let err = |text: &str| parse_documents(text).unwrap_err().to_string();
        assert_eq!(
            err(&format!(
                "{POOL}metadata: {{name: a}}\nspec: {{subnet: 10.6.0.0/16}}\nmetadata: {{name: b}}\n"
            )),
            "document 1: duplicate key \"metadata\" (each key may appear once in a mapping) at line 5 column 1"
        );
        assert_eq!(
            err(&format!(
                "{POOL}metadata: {{name: p}}\n---\n{POOL}metadata: {{name: q}}\nspec:\n  subnet: 10.6.0.0/16\n  ips: [10.6.0.10]\n  subnet: 10.7.0.0/16\n"
            )),
            "document 2: spec: duplicate key \"subnet\" (each key may appear once in a mapping) at line 11 column 3"
        );
        assert_eq!(
            err(&format!(
                "{POOL}metadata: {{name: p}}\nspec: {{subnet: 10.6.0.0/16, subnet: 10.7.0.0/16}}\n"
            )),
            "document 1: spec: duplicate key \"subnet\" (each key may appear once in a mapping) at line 4 column 29"
        );
        assert_eq!(
            err("apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n  labels:\n    node-subnet: subnet-6\n    zone: a\n    node-subnet: subnet-7\n"),
            "document 1: metadata.labels: duplicate key \"node-subnet\" (each key may appear once in a mapping) at line 8 column 5"
        );
        // JSON is held to the same rule.
        assert!(err(
            r#"{"apiVersion": "v1", "kind": "Node", "kind": "Node", "metadata": {"name": "n"}}"#
        )
        .contains("duplicate key \"kind\""));
        // The same key in different mappings, or through an alias, is fine.
        let docs = parse_documents(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: n\n  labels: &l {zone: a}\n  annotations: *l\n",
        )
        .unwrap();
        assert_eq!(docs[0].object.metadata().annotations["zone"], "a");
    }

    #[test]
    fn alias_bombs_stop_at_the_expansion_budget() {
        // 5 kB of text, 50 million strings: each alias of `b` copies a thousand aliases of `a`,
        // few enough jumps for the YAML reader's own repetition limit.
        let list = |item: &str, n| vec![item; n].join(",");
        let text = format!(
            "a: &a [{}]\nb: &b [{}]\nc: [{}]\n",
            list("x", 1000),
            list("*a", 1000),
            list("*b", 50)
        );
        let err = parse_documents(&text).unwrap_err().to_string();
        assert!(
            err.starts_with("document 1: ")
                && err.contains("anchors and aliases expand the manifest past"),
            "{err}"
        );
        // Anchors reused a few times stay well inside it.
        let docs = parse_documents(&format!(
            "{POOL}metadata: {{name: p, labels: &l {{a: b}}, annotations: *l}}\nspec: {{subnet: 10.6.0.0/16}}\n"
        ))
        .unwrap();
        assert_eq!(docs[0].object.metadata().annotations["a"], "b");
    }

    #[test]
    fn values_keep_their_json_types() {
        let docs = parse_documents(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: 3, f: 1.5, n: ~, t: true, s: '3'}\n",
        )
        .unwrap();
        let v = docs[0].object.to_value();
        assert_eq!(v["spec"]["replicas"], 3);
        assert_eq!(v["spec"]["f"], 1.5);
        assert_eq!(v["spec"]["n"], Value::Null);
        assert_eq!(v["spec"]["t"], true);
        assert_eq!(v["spec"]["s"], "3");
        let err = parse_documents("- a\n- b\n").unwrap_err().to_string();
        assert_eq!(
            err,
            "document 1: expected an object with apiVersion, kind and metadata, got a list (2 items)"
        );
    }
}
