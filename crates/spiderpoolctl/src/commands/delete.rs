//! `delete KIND NAME`: removes one object, under the same rules as `apply`.

use std::process::ExitCode;

use spiderpool_store::objects;
use spiderpool_store::Store;

use super::{object_key, parse_kind, singular};

pub(crate) async fn run(
    store: &dyn Store,
    kind: &str,
    name: &str,
    namespace: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let kind = parse_kind(kind)?;
    let key = object_key(kind, name, namespace);
    objects::delete(store, kind, &key).await?;
    println!("{}/{key} deleted", singular(kind));
    Ok(ExitCode::SUCCESS)
}
