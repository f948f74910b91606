//! SpiderSubnet auto pools outside a cluster: `apply` and `delete` of a workload reconcile its
//! application, and `reconcile` all of them (the pools of deleted applications go once their
//! pods have released their addresses). In a cluster the controller does this, and the CLI
//! leaves it alone.

use std::process::ExitCode;

use spiderpool_control::apply::ApplyError;
use spiderpool_control::autopool::{self, Settings};
use spiderpool_store::Store;

/// Whether the CLI runs the reconciler itself (the datastore is not a cluster's).
pub(crate) fn ours(store: &dyn Store) -> bool {
    !store.mode().is_cluster()
}

/// Prints one application's outcome; `false` when it failed.
fn report(r: &Result<autopool::Report, ApplyError>) -> bool {
    match r {
        Ok(r) => {
            for a in &r.actions {
                println!("{}: {a}", r.app);
            }
            true
        }
        Err(e) => {
            eprintln!("error: auto pools: {e}");
            false
        }
    }
}

/// Reconciles the applications under the workload keys `keys`.
pub(crate) async fn apps(store: &dyn Store, keys: &[String], settings: Settings) -> bool {
    let mut ok = true;
    for key in keys {
        ok &= report(&autopool::reconcile(store, key, settings).await);
    }
    ok
}

/// `spiderpoolctl reconcile`.
pub(crate) async fn run(store: &dyn Store, settings: Settings) -> anyhow::Result<ExitCode> {
    if !ours(store) {
        anyhow::bail!(
            "in a cluster the spiderpool-controller reconciles auto pools; `reconcile` is for sqlite and etcd datastores"
        );
    }
    let mut ok = true;
    for r in autopool::reconcile_all(store, settings).await? {
        ok &= report(&r);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
