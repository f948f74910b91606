//! `migrate check`: the hazards of moving a cluster from upstream Spiderpool.

use std::process::ExitCode;

use anyhow::Context;
use spiderpool_backends::kubernetes::KubeStore;
use spiderpool_backends::DatastoreUrl;

use crate::args::Output;

pub(crate) async fn check(
    datastore: &DatastoreUrl,
    kubeconfig: Option<&std::path::Path>,
    output: Option<Output>,
) -> anyhow::Result<ExitCode> {
    let DatastoreUrl::Kubernetes { kubeconfig: own } = datastore else {
        anyhow::bail!(
            "migrate check reads a Kubernetes cluster: use --datastore kubernetes (not {:?})",
            datastore.scheme()
        );
    };
    let store = KubeStore::connect(kubeconfig.or(own.as_deref()))
        .await
        .context("connecting to the cluster")?;
    let hazards = store.migration_hazards().await?;
    let blocking = hazards.iter().filter(|h| h.blocks).count();
    if output == Some(Output::Json) {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "hazards": hazards,
                "blocking": blocking,
            }))?
        );
    } else if hazards.is_empty() {
        println!("nothing stands in the way of the move");
    } else {
        for h in &hazards {
            println!(
                "{:<7} {}: {}",
                if h.blocks { "BLOCKS" } else { "NOTE" },
                h.id,
                h.what
            );
            for o in &h.objects {
                println!("          {o}");
            }
            println!("        fix: {}", h.fix);
        }
        println!("{} hazards, {blocking} blocking the move", hazards.len());
    }
    Ok(if blocking > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
