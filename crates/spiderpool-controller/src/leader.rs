//! Leader election on the Lease `spiderpool-controller-leases` in the controller's namespace
//! (kube-lease-manager: server-side apply on the Lease, so two replicas never both lock it).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_lease_manager::LeaseManagerBuilder;

use crate::Health;

/// The Lease's name, as upstream's.
pub const LEASE: &str = "spiderpool-controller-leases";

/// Starts competing for the Lease as `identity`; the channel says whether this replica leads.
/// A task also watches who holds it, for the readiness probe.
pub async fn elect(
    client: kube::Client,
    namespace: &str,
    identity: &str,
    duration: Duration,
    health: Arc<Health>,
) -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
    let secs = duration.as_secs().max(3);
    let manager = LeaseManagerBuilder::new(client.clone(), LEASE)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(secs)
        // Renew a third of the duration before it runs out.
        .with_grace((secs / 3).max(1))
        .build()
        .await
        .with_context(|| format!("Lease {namespace}/{LEASE}"))?;
    let (rx, _task) = manager.watch().await;
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    let mut mine = rx.clone();
    tokio::spawn(async move {
        loop {
            let leading = *mine.borrow_and_update();
            health.leading.store(leading, Ordering::SeqCst);
            let known = leading
                || match leases.get_opt(LEASE).await {
                    Ok(Some(l)) => held(&l),
                    _ => false,
                };
            health.leader_known.store(known, Ordering::SeqCst);
            tokio::select! {
                r = mine.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs((secs / 3).max(1))) => {}
            }
        }
    });
    Ok(rx)
}

/// Whether a Lease has a holder whose term has not run out.
fn held(l: &Lease) -> bool {
    let Some(spec) = &l.spec else { return false };
    if spec.holder_identity.as_deref().unwrap_or("").is_empty() {
        return false;
    }
    let (Some(renew), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return false;
    };
    let until = renew.0.as_second() + i64::from(secs);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    until >= now
}
