//! Wire and object types of the Spiderpool IPAM: the `spiderpool.spidernet.io/v2beta1` objects
//! and plain Kubernetes objects as YAML/JSON, annotations, CNI network config and results per
//! spec version, and the agent's HTTP/JSON API.

pub mod agent;
pub mod annotation;
pub mod autopool;
pub mod cni;
pub mod coordinator;
pub mod crd;
pub mod k8s;
pub mod keys;
#[cfg(feature = "kube")]
pub mod kube;
pub mod manifest;
pub mod meta;
pub mod multus;
pub mod names;
#[cfg(feature = "kube")]
pub mod schema;

use thiserror::Error;

pub use coordinator::SpiderCoordinator;
pub use crd::{SpiderEndpoint, SpiderIPPool, SpiderReservedIP, SpiderSubnet};
pub use k8s::KubeObject;
pub use manifest::{Kind, Object};
pub use meta::{ObjectMeta, OwnerReference};

/// An object or value that breaks a rule. The message names the object, field and value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// A rule is broken; the message says which and where.
    #[error("{0}")]
    Invalid(String),
}

impl ValidationError {
    /// `field "value" why`.
    pub fn field(field: &str, value: impl AsRef<str>, why: &str) -> Self {
        ValidationError::Invalid(format!("{field} {:?} {why}", value.as_ref()))
    }

    /// Prefixes the message with the object's kind and name.
    pub fn in_object(self, kind: &str, name: &str) -> Self {
        let ValidationError::Invalid(m) = self;
        ValidationError::Invalid(format!("{kind} {name:?}: {m}"))
    }
}
