//! The StatefulSet rule: a member whose ordinal is below `replicas` keeps its addresses.

use spiderpool_store::{typed, Kind};

use super::*;

impl IpamService {
    /// Whether the pod belongs to a StatefulSet that still wants it (ordinal below `replicas`):
    /// such a pod keeps its addresses across sandboxes and re-creations.
    pub(super) async fn stateful_member(
        &self,
        namespace: &str,
        pod: &str,
        owner_kind: &str,
        owner_name: &str,
    ) -> Result<bool> {
        if owner_kind != "StatefulSet" {
            return Ok(false);
        }
        let Some(ordinal) = pod
            .strip_prefix(owner_name)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|o| o.parse::<i64>().ok())
        else {
            return Ok(false);
        };
        let key = format!("{namespace}/StatefulSet/{owner_name}");
        let replicas = typed::get(self.store.as_ref(), Kind::Workload, &key)
            .await?
            .and_then(|(o, _)| kube_of(o))
            .map(|w| w.replicas());
        Ok(replicas.is_some_and(|r| ordinal < r))
    }
}
