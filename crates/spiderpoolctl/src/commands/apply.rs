//! `apply -f FILE|-`: create or update the objects of a multi-document YAML file.

use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use spiderpool_api::manifest::parse_documents;
use spiderpool_api::{Kind, Object};
use spiderpool_control::apply::{self, Applied, Progress};
use spiderpool_store::Store;

use super::singular;

/// Files with this many objects or more report their progress.
const PROGRESS_FROM: usize = 100;

pub(crate) async fn run(
    store: Arc<dyn Store>,
    file: &str,
    settings: spiderpool_control::autopool::Settings,
) -> anyhow::Result<ExitCode> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?
    };
    let docs = parse_documents(&text).with_context(|| format!("parsing {file}"))?;
    if docs.is_empty() {
        bail!("{file}: no objects found");
    }
    for w in docs.iter().flat_map(|d| &d.warnings) {
        eprintln!("Warning: {w}");
    }
    let names: Vec<String> = docs.iter().map(|d| resource_ref(&d.object)).collect();
    let objects: Vec<Object> = docs.into_iter().map(|d| d.object).collect();
    let workloads: Vec<String> = objects
        .iter()
        .filter(|o| o.kind() == Kind::Workload)
        .map(Object::key)
        .collect();
    // A large file takes a while (each object is checked against all before it): say how far
    // it got, on stderr, about every tenth.
    let total = objects.len();
    let step = (total / 10).max(1);
    let progress = move |p: Progress| match p {
        Progress::Checked { done, total } if total >= PROGRESS_FROM && done % step == 0 => {
            eprintln!("checked {done}/{total} objects");
        }
        Progress::Writing { ops } if total >= PROGRESS_FROM => {
            eprintln!("writing {total} objects ({ops} datastore operations)");
        }
        _ => {}
    };
    match apply::apply_all_reporting(store.clone(), objects, &progress).await {
        Ok(outcomes) => {
            for (name, outcome) in names.iter().zip(outcomes) {
                let what = match outcome {
                    Applied::Created => "created",
                    Applied::Configured => "configured",
                    Applied::Unchanged => "unchanged",
                };
                println!("{name} {what}");
            }
            // The applied workloads' auto pools (in a cluster, the controller's).
            if super::reconcile::ours(store.as_ref())
                && !super::reconcile::apps(store.as_ref(), &workloads, settings).await
            {
                eprintln!("the objects were applied; their auto pools were not all reconciled (`spiderpoolctl reconcile` tries again)");
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            match e.index {
                Some(i) => eprintln!("error: document {} ({}): {}", i + 1, names[i], e.error),
                None => eprintln!("error: {}", e.error),
            }
            eprintln!("nothing was applied ({} objects in {file})", names.len());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// How kubectl names an object in its messages: `spiderippool.spiderpool.spidernet.io/p`,
/// `daemonset.apps/test-app`, `pod/test-app-j9ftl`.
fn resource_ref(o: &Object) -> String {
    let name = &o.metadata().name;
    match o {
        Object::Kube(Kind::Workload, k) => {
            let group = k.api_version.split('/').next().unwrap_or("apps");
            format!("{}.{group}/{name}", k.kind.to_ascii_lowercase())
        }
        other => format!("{}/{name}", singular(other.kind())),
    }
}
