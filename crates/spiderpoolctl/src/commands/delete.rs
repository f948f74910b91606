//! `delete KIND NAME`: removes one object, under the same rules as `apply`.

use std::process::ExitCode;

use spiderpool_control::apply;
use spiderpool_store::Store;

use super::{object_key, parse_kind, singular};

pub(crate) async fn run(
    store: &dyn Store,
    kind: &str,
    name: &str,
    namespace: Option<&str>,
    settings: spiderpool_control::autopool::Settings,
) -> anyhow::Result<ExitCode> {
    // `delete deployment web` names a workload by its kind.
    let (kind, key) = match super::workload_kind(kind) {
        Some(w) => (
            spiderpool_api::Kind::Workload,
            object_key(
                spiderpool_api::Kind::Workload,
                &format!("{w}/{name}"),
                namespace,
            ),
        ),
        None => {
            let kind = parse_kind(kind)?;
            (kind, object_key(kind, name, namespace))
        }
    };
    apply::delete(store, kind, &key).await?;
    println!("{}/{key} deleted", singular(kind));
    if kind == spiderpool_api::Kind::Workload
        && super::reconcile::ours(store)
        && !super::reconcile::apps(store, &[key], settings).await
    {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
