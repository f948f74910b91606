//! The codec of a pool's `status.allocatedIPs`: a JSON string, address → upstream's `pod` and
//! `podUid`, plus the `containerID`, `interface` and `node` this project adds (upstream ignores
//! them).

use std::collections::BTreeMap;
use std::net::IpAddr;

use kube::api::DynamicObject;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use spiderpool_store::{Allocation, Holder, Result, StoreError};

/// One entry of `status.allocatedIPs`: upstream's `pod` and `podUid`, plus who exactly holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Entry {
    pub(super) pod: String,
    pub(super) pod_uid: String,
    #[serde(
        default,
        rename = "containerID",
        skip_serializing_if = "String::is_empty"
    )]
    pub(super) container_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(super) interface: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(super) node: String,
}

impl From<&Holder> for Entry {
    fn from(h: &Holder) -> Self {
        Entry {
            pod: h.pod.clone(),
            pod_uid: h.pod_uid.clone(),
            container_id: h.container_id.clone(),
            interface: h.nic.clone(),
            node: h.node.clone(),
        }
    }
}

impl From<Entry> for Holder {
    fn from(e: Entry) -> Self {
        Holder {
            pod: e.pod,
            pod_uid: e.pod_uid,
            container_id: e.container_id,
            nic: e.interface,
            node: e.node,
        }
    }
}

/// The address map of a pool object's `status.allocatedIPs` (absent: none).
pub(super) fn entries_of(pool: &str, o: &Value) -> Result<BTreeMap<String, Entry>> {
    match o.pointer("/status/allocatedIPs") {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(BTreeMap::new()),
        Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
            key: format!("spiderippools/{pool} status.allocatedIPs"),
            message: e.to_string(),
        }),
        Some(other) => Err(StoreError::Corrupt {
            key: format!("spiderippools/{pool} status.allocatedIPs"),
            message: format!("not a JSON string: {other}"),
        }),
    }
}

pub(super) fn parse_ip(pool: &str, s: &str) -> Result<IpAddr> {
    s.parse().map_err(|_| StoreError::Corrupt {
        key: format!("spiderippools/{pool} status.allocatedIPs"),
        message: format!("{s:?} is not an IP address"),
    })
}

/// Every address a pool object holds, with its holder, at the object's revision.
pub fn allocations_of(pool: &str, o: &DynamicObject) -> Result<Vec<Allocation>> {
    let revision = super::rv_of(o)?;
    let value = serde_json::to_value(o).unwrap_or_default();
    entries_of(pool, &value)?
        .into_iter()
        .map(|(ip, e)| {
            Ok(Allocation {
                pool: pool.to_string(),
                ip: parse_ip(pool, &ip)?,
                holder: e.into(),
                revision,
            })
        })
        .collect()
}
