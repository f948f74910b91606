//! One module per command; this one opens the datastore, dispatches, and names kinds and objects
//! the way kubectl does in its messages.

mod apply;
mod delete;
mod explain;
mod get;
mod ipam;
mod migrate;
mod reconcile;

use std::process::ExitCode;

use anyhow::Context;
use spiderpool_api::Kind;

use crate::args::{Args, Command};

/// Runs the parsed command line.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Reads a cluster that may still run upstream (whose CRDs the store would refuse).
    if let Command::Migrate(crate::args::Migrate::Check { output }) = &args.command {
        return migrate::check(&args.datastore, args.kubeconfig.as_deref(), *output).await;
    }
    let store = spiderpool_backends::open_with(&args.datastore, args.kubeconfig.as_deref())
        .await
        .with_context(|| format!("opening datastore {:?}", args.datastore))?;
    let settings = spiderpool_control::autopool::Settings {
        default_redundancy: args.auto_pool_redundancy,
    };
    match args.command {
        Command::Apply { file } => apply::run(store, &file, settings).await,
        Command::Reconcile => reconcile::run(store.as_ref(), settings).await,
        Command::Get {
            kind,
            name,
            output,
            namespace,
        } => get::run(store.as_ref(), &kind, name, namespace.as_deref(), output).await,
        Command::Ipam(cmd) => ipam::run(store.as_ref(), cmd).await,
        Command::Completion { .. } => unreachable!("answered before the datastore is opened"),
        Command::Migrate(_) => unreachable!("answered before the datastore is opened"),
        Command::Explain {
            kind,
            name,
            interface,
            node,
            default_ipv4_ippool,
            default_ipv6_ippool,
            multus_cluster_network,
            multus_namespace,
            output,
        } => {
            explain::run(
                store.as_ref(),
                explain::Ask {
                    kind,
                    name,
                    nic: interface,
                    node,
                    v4: default_ipv4_ippool,
                    v6: default_ipv6_ippool,
                    multus: spiderpool_api::annotation::MultusDefaults {
                        cluster_network: multus_cluster_network,
                        namespace: multus_namespace,
                    },
                    json: output == Some(crate::args::Output::Json),
                },
            )
            .await
        }
        Command::Delete {
            kind,
            name,
            namespace,
        } => delete::run(store.as_ref(), &kind, &name, namespace.as_deref(), settings).await,
    }
}

fn parse_kind(s: &str) -> anyhow::Result<Kind> {
    Kind::from_cli(s).with_context(|| {
        format!(
            "unknown kind {s:?} (valid: ippool, subnet, reservedip, endpoint, node, namespace, pod, workload, network-attachment-definition)"
        )
    })
}

/// A workload kind as kubectl names it (`deployment`, `deployments`, `deploy`, `sts`, …).
fn workload_kind(s: &str) -> Option<&'static str> {
    let s = s.to_ascii_lowercase();
    let short = match s.as_str() {
        "deploy" => "deployment",
        "rs" => "replicaset",
        "sts" => "statefulset",
        "ds" => "daemonset",
        "cj" => "cronjob",
        other => other.strip_suffix('s').unwrap_or(other),
    };
    spiderpool_api::k8s::WORKLOAD_KINDS
        .iter()
        .find(|k| k.to_ascii_lowercase() == short)
        .copied()
}

fn object_key(kind: Kind, name: &str, namespace: Option<&str>) -> String {
    let ns = namespace.unwrap_or("default");
    if kind == Kind::Workload {
        // `Kind/name` or `namespace/Kind/name`.
        return match name.matches('/').count() {
            1 => format!("{ns}/{name}"),
            _ => name.to_string(),
        };
    }
    if kind.namespaced() && !name.contains('/') {
        format!("{}/{name}", namespace.unwrap_or("default"))
    } else {
        name.to_string()
    }
}

fn singular(kind: Kind) -> &'static str {
    match kind {
        Kind::IPPool => "spiderippool.spiderpool.spidernet.io",
        Kind::Subnet => "spidersubnet.spiderpool.spidernet.io",
        Kind::ReservedIP => "spiderreservedip.spiderpool.spidernet.io",
        Kind::Endpoint => "spiderendpoint.spiderpool.spidernet.io",
        Kind::Coordinator => "spidercoordinator.spiderpool.spidernet.io",
        Kind::MultusConfig => "spidermultusconfig.spiderpool.spidernet.io",
        Kind::Node => "node",
        Kind::Namespace => "namespace",
        Kind::Pod => "pod",
        Kind::Workload => "workload",
        Kind::NetworkAttachment => "networkattachmentdefinition.k8s.cni.cncf.io",
    }
}
