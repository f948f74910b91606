//! The NetworkAttachmentDefinition of a SpiderMultusConfig outside a cluster: `spiderpoolctl
//! apply` writes it with the SpiderMultusConfig, in the same transaction, and `delete` removes
//! it with its owner (in a cluster the controller's leader and the garbage collector do). A
//! NAD of that name that the SpiderMultusConfig does not own is never overwritten.

use spiderpool_api::multus::SpiderMultusConfig;
use spiderpool_api::{Object, ValidationError};
use spiderpool_store::{typed, Expect, Kind, Op, Store, StoreError};

/// Whether the NAD `o` is controlled by the SpiderMultusConfig with UID `uid`.
pub fn owned_by(o: &Object, uid: &str) -> bool {
    o.metadata()
        .owner_references
        .iter()
        .any(|r| r.kind == "SpiderMultusConfig" && r.uid == uid && r.controller == Some(true))
}

/// The write of `smc`'s NAD (`smc` mutated, with its UID), or why it may not be written.
pub async fn nad_ops(
    store: &dyn Store,
    smc: &SpiderMultusConfig,
) -> Result<Vec<Op>, ApplyNadError> {
    let nad = smc.render()?;
    let uid = smc.metadata.uid.clone().unwrap_or_default();
    let key = smc.nad_key();
    let current = typed::get(store, Kind::NetworkAttachment, &key).await?;
    let expect = match &current {
        None => Expect::Absent,
        Some((o, _)) if !owned_by(o, &uid) => {
            return Err(ApplyNadError::Invalid(ValidationError::Invalid(format!(
                "SpiderMultusConfig {:?}: NetworkAttachmentDefinition {key:?} exists and is not \
                 this SpiderMultusConfig's; delete it first, or name another with the annotation {}",
                smc.full_name(),
                spiderpool_api::multus::CR_NAME
            ))))
        }
        Some((_, rev)) => Expect::Revision(*rev),
    };
    let object = Object::from_value(
        Kind::NetworkAttachment,
        nad.to_object(&smc.metadata.name, &uid),
    )?;
    if let Some((o, _)) = &current {
        if typed::to_stored_value(o)["spec"] == typed::to_stored_value(&object)["spec"]
            && o.metadata().annotations == object.metadata().annotations
        {
            return Ok(Vec::new());
        }
    }
    Ok(vec![Op::Put {
        kind: Kind::NetworkAttachment,
        key,
        value: typed::to_stored_value(&object),
        expect,
    }])
}

/// The deletion of the NADs `smc` owns (its generated name's, if it owns that one).
pub async fn nad_delete_ops(
    store: &dyn Store,
    smc: &SpiderMultusConfig,
) -> Result<Vec<Op>, StoreError> {
    let key = smc.nad_key();
    let uid = smc.metadata.uid.clone().unwrap_or_default();
    Ok(
        match typed::get(store, Kind::NetworkAttachment, &key).await? {
            Some((o, rev)) if owned_by(&o, &uid) => vec![Op::Delete {
                kind: Kind::NetworkAttachment,
                key,
                expect: Expect::Revision(rev),
            }],
            _ => Vec::new(),
        },
    )
}

/// Why a NAD cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum ApplyNadError {
    /// It cannot be rendered, or another object has its name.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
