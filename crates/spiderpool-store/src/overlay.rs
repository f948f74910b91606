//! The datastore as a multi-object write in progress sees it: a base store with the objects
//! staged by the earlier steps put over it, read-only, so each step is checked against the
//! state the steps before it leave (`spiderpool-control`'s apply of several documents).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::Value;

use crate::{Allocation, Kind, Mode, Op, Result, Revision, Store, StoreError, Stored};

/// The datastore as an apply in progress sees it: the base store with the objects staged by
/// the earlier documents put over it. Read-only.
pub struct Staged {
    base: Arc<dyn Store>,
    objects: Mutex<BTreeMap<(Kind, String), Value>>,
}

impl Staged {
    /// Nothing staged yet over `base`.
    pub fn new(base: Arc<dyn Store>) -> Self {
        Staged {
            base,
            objects: Mutex::new(BTreeMap::new()),
        }
    }

    /// Puts the objects that `ops` write over the base.
    pub fn stage(&self, ops: &[Op]) {
        let mut objects = self.objects.lock().expect("staged objects");
        for op in ops {
            if let Op::Put {
                kind, key, value, ..
            } = op
            {
                objects.insert((*kind, key.clone()), value.clone());
            }
        }
    }

    fn staged(&self, kind: Kind) -> Vec<Stored> {
        let objects = self.objects.lock().expect("staged objects");
        objects
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, key), value)| Stored {
                key: key.clone(),
                value: value.clone(),
                revision: 0,
            })
            .collect()
    }
}

#[async_trait]
impl Store for Staged {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Stored>> {
        let staged = self
            .objects
            .lock()
            .expect("staged objects")
            .get(&(kind, key.to_string()))
            .cloned();
        if let Some(value) = staged {
            return Ok(Some(Stored {
                key: key.to_string(),
                value,
                revision: 0,
            }));
        }
        self.base.get(kind, key).await
    }

    async fn list(&self, kind: Kind) -> Result<Vec<Stored>> {
        let staged = self.staged(kind);
        let mut all: Vec<Stored> = self
            .base
            .list(kind)
            .await?
            .into_iter()
            .filter(|b| !staged.iter().any(|s| s.key == b.key))
            .collect();
        all.extend(staged);
        Ok(all)
    }

    async fn allocations(&self, pool: &str) -> Result<Vec<Allocation>> {
        self.base.allocations(pool).await
    }

    async fn allocation_counts(&self) -> Result<BTreeMap<String, u64>> {
        self.base.allocation_counts().await
    }

    async fn commit(&self, _ops: Vec<Op>) -> Result<Revision> {
        Err(StoreError::Unavailable(
            "an apply in progress commits all it staged at once, not piece by piece".into(),
        ))
    }

    async fn revision(&self) -> Result<Option<Revision>> {
        self.base.revision().await
    }

    async fn ping(&self) -> Result<()> {
        self.base.ping().await
    }

    fn mode(&self) -> Mode {
        self.base.mode()
    }

    fn max_ops(&self) -> usize {
        self.base.max_ops()
    }
}
