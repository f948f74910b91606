//! Typed access on top of the raw port: objects in, objects out, with `metadata.resourceVersion`
//! set from the store's revision.

use spiderpool_api::Object;

use crate::{Kind, Result, Revision, Store, StoreError, Stored};

/// A stored value of `kind` as an object, with its revision.
pub fn decode(kind: Kind, s: Stored) -> Result<(Object, Revision)> {
    let mut o = Object::from_value(kind, s.value).map_err(|e| StoreError::Corrupt {
        key: format!("{kind}/{}", s.key),
        message: e.to_string(),
    })?;
    o.metadata_mut().resource_version = Some(s.revision.to_string());
    Ok((o, s.revision))
}

/// One object with its revision.
pub async fn get(store: &dyn Store, kind: Kind, key: &str) -> Result<Option<(Object, Revision)>> {
    store
        .get(kind, key)
        .await?
        .map(|s| decode(kind, s))
        .transpose()
}

/// Several objects, each with its revision, in one round trip where the backend can.
pub async fn get_many(
    store: &dyn Store,
    keys: &[(Kind, String)],
) -> Result<Vec<Option<(Object, Revision)>>> {
    store
        .get_many(keys)
        .await?
        .into_iter()
        .zip(keys)
        .map(|(s, (kind, _))| s.map(|s| decode(*kind, s)).transpose())
        .collect()
}

/// Every object of a kind with its revision. Objects that do not decode are logged with their
/// key and skipped.
pub async fn list(store: &dyn Store, kind: Kind) -> Result<Vec<(Object, Revision)>> {
    let stored = store.list(kind).await?;
    Ok(crate::skip_unreadable(
        stored.into_iter().map(|s| decode(kind, s)),
        "object",
    ))
}

/// The JSON to store for `o`: `resourceVersion` is the store's business, not the value's.
pub fn to_stored_value(o: &Object) -> serde_json::Value {
    let mut o = o.clone();
    o.metadata_mut().resource_version = None;
    o.to_value()
}
