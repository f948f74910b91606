//! `get KIND [NAME]`: objects as kubectl prints them, with the status the system computes.

use std::process::ExitCode;

use anyhow::bail;
use serde_json::json;
use spiderpool_api::{Kind, Object};
use spiderpool_store::{typed, Store};

use super::{object_key, parse_kind, singular};
use crate::args::Output;
use crate::print::table;

/// The object with the status the system computes.
async fn with_status(
    store: &dyn Store,
    o: Object,
    pools: &[spiderpool_api::SpiderIPPool],
) -> anyhow::Result<Object> {
    Ok(match o {
        Object::IPPool(mut p) => {
            p.status = Some(spiderpool_control::status::pool_status(store, &p).await?);
            Object::IPPool(p)
        }
        Object::Subnet(mut s) => {
            s.status = Some(spiderpool_control::status::subnet_status(&s, pools));
            Object::Subnet(s)
        }
        other => other,
    })
}

pub(crate) async fn run(
    store: &dyn Store,
    kind: &str,
    name: Option<String>,
    namespace: Option<&str>,
    output: Option<Output>,
) -> anyhow::Result<ExitCode> {
    let kind = parse_kind(kind)?;
    let key = name.map(|n| object_key(kind, &n, namespace));
    get(store, kind, key.as_deref(), namespace, output).await?;
    Ok(ExitCode::SUCCESS)
}

async fn get(
    store: &dyn Store,
    kind: Kind,
    key: Option<&str>,
    namespace: Option<&str>,
    output: Option<Output>,
) -> anyhow::Result<()> {
    let mut items: Vec<Object> = match key {
        Some(k) => match typed::get(store, kind, k).await? {
            Some((o, _)) => vec![o],
            None => bail!("{}/{k} not found", singular(kind)),
        },
        None => typed::list(store, kind)
            .await?
            .into_iter()
            .map(|(o, _)| o)
            .filter(|o| namespace.is_none() || o.metadata().namespace.as_deref() == namespace)
            .collect(),
    };
    let pools: Vec<_> = if kind == Kind::Subnet {
        typed::list(store, Kind::IPPool)
            .await?
            .into_iter()
            .filter_map(|(o, _)| match o {
                Object::IPPool(p) => Some(p),
                _ => None,
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut with = Vec::with_capacity(items.len());
    for o in items.drain(..) {
        with.push(with_status(store, o, &pools).await?);
    }
    let items = with;
    match output {
        Some(Output::Json) | Some(Output::Yaml) => {
            let v = if key.is_some() {
                items[0].to_value()
            } else {
                json!({"apiVersion": "v1", "kind": "List", "items": items.iter().map(Object::to_value).collect::<Vec<_>>()})
            };
            if output == Some(Output::Json) {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", serde_norway::to_string(&v)?);
            }
        }
        Some(Output::Name) => {
            for o in &items {
                println!("{}/{}", singular(kind), o.metadata().name);
            }
        }
        _ => {
            if items.is_empty() {
                eprintln!("No resources found");
                return Ok(());
            }
            print!("{}", table(kind, &items, output == Some(Output::Wide)));
        }
    }
    Ok(())
}
