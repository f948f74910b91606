//! STATUS (CNI 1.1): whether an ADD could be served now.

use spiderpool_core::pick::lowest_free;
use spiderpool_core::{IpFamily, Pool};

use super::*;
use crate::view::View;

impl IpamService {
    /// CNI STATUS: whether an ADD could get an address: the datastore answers and one of the
    /// candidate pools (the given CNI defaults, or every pool) has a free address.
    pub async fn status(&self, v4: &[String], v6: &[String]) -> Result<()> {
        let mut cache = self.state.lock().await;
        let store = self.store.as_ref();
        // As for ADD: a followed view that finds no free address is read afresh before the
        // answer is "not ready".
        for afresh in [false, true] {
            if afresh {
                cache.invalidate();
            }
            let view = cache.current(store).await.map_err(|e| {
                ServiceError::NotReady(format!("the datastore does not answer: {e}"))
            })?;
            let pools = std::mem::take(&mut view.pools);
            let r = self.any_free(&pools, view, v4, v6).await;
            view.pools = pools;
            if r.is_ok() || afresh || !cache.watched() {
                return r;
            }
        }
        unreachable!("the second pass returns")
    }

    pub(super) async fn any_free(
        &self,
        pools: &[Pool],
        view: &mut View,
        v4: &[String],
        v6: &[String],
    ) -> Result<()> {
        let mut names = Vec::new();
        if v4.is_empty() && v6.is_empty() {
            names.extend(pools.iter().map(|p| p.name.clone()));
        } else {
            for (family, list) in [(IpFamily::V4, v4), (IpFamily::V6, v6)] {
                names.extend(spiderpool_core::candidate::expand_wildcards(
                    list, pools, family,
                )?);
            }
        }
        let mut why = Vec::new();
        for name in &names {
            let Some(pool) = pools.iter().find(|p| &p.name == name) else {
                why.push(format!("{name}: does not exist"));
                continue;
            };
            if pool.disable || pool.terminating {
                why.push(format!("{name}: disabled or terminating"));
                continue;
            }
            view.load_held(self.store.as_ref(), name).await?;
            if lowest_free(pool, &view.reserved, view.held(name)).is_some() {
                return Ok(());
            }
            why.push(format!("{name}: exhausted"));
        }
        if names.is_empty() {
            why.push("no SpiderIPPool exists".into());
        }
        Err(ServiceError::NotReady(format!(
            "no IPPool can serve ADD: {}",
            why.join("; ")
        )))
    }
}
