//! `spiderpoolctl`: apply, get and delete Spiderpool and plain Kubernetes objects in a datastore,
//! with kubectl's output conventions.

use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use spiderpool_api::manifest::parse_documents;
use spiderpool_api::{Kind, Object};
use spiderpool_store::objects::{self, Applied};
use spiderpool_store::{typed, DatastoreUrl, Store, DEFAULT_DATASTORE};

#[derive(Debug, Parser)]
#[command(
    name = "spiderpoolctl",
    version,
    about = "Manage Spiderpool IPAM objects"
)]
struct Args {
    /// Datastore: sqlite:///path/db, etcd://host:port[,host:port]?prefix=/spiderpool or kubernetes.
    #[arg(long, env = "SPIDERPOOL_DATASTORE", default_value = DEFAULT_DATASTORE, global = true)]
    datastore: DatastoreUrl,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Wide,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update objects from multi-document YAML.
    Apply {
        /// File to read, or `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        file: String,
    },
    /// List objects of a kind, or show one.
    Get {
        /// ippool, subnet, reservedip, endpoint, node, namespace, pod, workload (or their
        /// plural and short names).
        kind: String,
        /// Object name (`namespace/name` or `-n` for namespaced kinds).
        name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum)]
        output: Option<Output>,
        /// Namespace of namespaced objects.
        #[arg(short = 'n', long = "namespace")]
        namespace: Option<String>,
    },
    /// Delete an object.
    Delete {
        /// Kind, as for `get`.
        kind: String,
        /// Object name.
        name: String,
        /// Namespace of namespaced objects.
        #[arg(short = 'n', long = "namespace")]
        namespace: Option<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_kind(s: &str) -> anyhow::Result<Kind> {
    Kind::from_cli(s).with_context(|| {
        format!(
            "unknown kind {s:?} (valid: ippool, subnet, reservedip, endpoint, node, namespace, pod, workload, network-attachment-definition)"
        )
    })
}

fn object_key(kind: Kind, name: &str, namespace: Option<&str>) -> String {
    if kind.namespaced() && !name.contains('/') {
        format!("{}/{name}", namespace.unwrap_or("default"))
    } else {
        name.to_string()
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let store = spiderpool_store::open(&args.datastore)
        .await
        .with_context(|| format!("opening datastore {:?}", args.datastore))?;
    match args.command {
        Command::Apply { file } => apply(store, &file).await,
        Command::Get {
            kind,
            name,
            output,
            namespace,
        } => {
            let kind = parse_kind(&kind)?;
            let key = name.map(|n| object_key(kind, &n, namespace.as_deref()));
            get(
                store.as_ref(),
                kind,
                key.as_deref(),
                namespace.as_deref(),
                output,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete {
            kind,
            name,
            namespace,
        } => {
            let kind = parse_kind(&kind)?;
            let key = object_key(kind, &name, namespace.as_deref());
            objects::delete(store.as_ref(), kind, &key).await?;
            println!("{}/{key} deleted", singular(kind));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn singular(kind: Kind) -> &'static str {
    match kind {
        Kind::IPPool => "spiderippool.spiderpool.spidernet.io",
        Kind::Subnet => "spidersubnet.spiderpool.spidernet.io",
        Kind::ReservedIP => "spiderreservedip.spiderpool.spidernet.io",
        Kind::Endpoint => "spiderendpoint.spiderpool.spidernet.io",
        Kind::Node => "node",
        Kind::Namespace => "namespace",
        Kind::Pod => "pod",
        Kind::Workload => "workload",
        Kind::NetworkAttachment => "networkattachmentdefinition.k8s.cni.cncf.io",
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

async fn apply(store: Arc<dyn Store>, file: &str) -> anyhow::Result<ExitCode> {
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
    let mut failed = 0;
    for doc in docs {
        for w in &doc.warnings {
            eprintln!("Warning: {w}");
        }
        let name = resource_ref(&doc.object);
        match objects::apply(store.as_ref(), doc.object).await {
            Ok(outcome) => println!(
                "{name} {}",
                match outcome {
                    Applied::Created => "created",
                    Applied::Configured => "configured",
                    Applied::Unchanged => "unchanged",
                }
            ),
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The object with the status the system computes.
async fn with_status(
    store: &dyn Store,
    o: Object,
    pools: &[spiderpool_api::SpiderIPPool],
) -> anyhow::Result<Object> {
    Ok(match o {
        Object::IPPool(mut p) => {
            p.status = Some(objects::pool_status(store, &p).await?);
            Object::IPPool(p)
        }
        Object::Subnet(mut s) => {
            s.status = Some(objects::subnet_status(&s, pools));
            Object::Subnet(s)
        }
        other => other,
    })
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

fn s(v: Option<impl ToString>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

fn table(kind: Kind, items: &[Object], wide: bool) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let header: Vec<&str> = match kind {
        Kind::IPPool => {
            let mut h = vec![
                "NAME",
                "VERSION",
                "SUBNET",
                "ALLOCATED-IP-COUNT",
                "TOTAL-IP-COUNT",
                "DEFAULT",
                "DISABLE",
            ];
            if wide {
                h.extend(["NODENAME", "MULTUSNAME", "APP-NAMESPACE"]);
            }
            h
        }
        Kind::Subnet => vec![
            "NAME",
            "VERSION",
            "SUBNET",
            "ALLOCATED-IP-COUNT",
            "TOTAL-IP-COUNT",
        ],
        Kind::ReservedIP => vec!["NAME", "VERSION", "IPS"],
        Kind::Endpoint => vec![
            "NAMESPACE",
            "NAME",
            "INTERFACE",
            "IPV4POOL",
            "IPV4",
            "IPV6POOL",
            "IPV6",
            "NODE",
        ],
        Kind::Node | Kind::Namespace => vec!["NAME", "LABELS"],
        Kind::Pod => vec!["NAMESPACE", "NAME", "NODE", "UID"],
        Kind::Workload => vec!["NAMESPACE", "KIND", "NAME", "REPLICAS"],
        Kind::NetworkAttachment => vec!["NAMESPACE", "NAME"],
    };
    rows.push(header.iter().map(|h| h.to_string()).collect());
    for o in items {
        let m = o.metadata();
        match o {
            Object::IPPool(p) => {
                let version = p
                    .spec
                    .ip_version
                    .or_else(|| p.to_pool().ok().map(|x| i64::from(x.family.number())));
                let st = p.status.clone().unwrap_or_default();
                let mut r = vec![
                    m.name.clone(),
                    s(version),
                    p.spec.subnet.clone(),
                    s(st.allocated_ip_count),
                    s(st.total_ip_count),
                    p.spec.default.unwrap_or(false).to_string(),
                    p.spec.disable.unwrap_or(false).to_string(),
                ];
                if wide {
                    r.push(p.spec.node_name.join(","));
                    r.push(p.spec.multus_name.join(","));
                    r.push(s(p.spec.pod_affinity.as_ref().and_then(|a| {
                        a.match_labels.get("ipam.spidernet.io/app-namespace")
                    })));
                }
                rows.push(r);
            }
            Object::Subnet(sub) => {
                let version = sub
                    .spec
                    .ip_version
                    .or_else(|| sub.to_pool().ok().map(|x| i64::from(x.family.number())));
                let st = sub.status.clone().unwrap_or_default();
                rows.push(vec![
                    m.name.clone(),
                    s(version),
                    sub.spec.subnet.clone(),
                    s(st.allocated_ip_count),
                    s(st.total_ip_count),
                ]);
            }
            Object::ReservedIP(r) => {
                let version = r.spec.ip_version.or_else(|| {
                    r.to_set()
                        .ok()
                        .and_then(|set| set.ranges().next().map(|x| i64::from(x.family().number())))
                });
                rows.push(vec![m.name.clone(), s(version), r.spec.ips.join(",")]);
            }
            Object::Endpoint(e) => {
                for nic in &e.status.current {
                    rows.push(vec![
                        s(m.namespace.as_ref()),
                        m.name.clone(),
                        nic.interface.clone(),
                        s(nic.ipv4_pool.as_ref()),
                        s(nic.ipv4.as_ref()),
                        s(nic.ipv6_pool.as_ref()),
                        s(nic.ipv6.as_ref()),
                        e.status.node.clone(),
                    ]);
                }
            }
            Object::Kube(Kind::Pod, k) => rows.push(vec![
                s(m.namespace.as_ref()),
                m.name.clone(),
                s(k.node_name()),
                s(m.uid.as_ref()),
            ]),
            Object::Kube(Kind::Workload, k) => rows.push(vec![
                s(m.namespace.as_ref()),
                k.kind.clone(),
                m.name.clone(),
                k.replicas().to_string(),
            ]),
            Object::Kube(Kind::NetworkAttachment, _) => {
                rows.push(vec![s(m.namespace.as_ref()), m.name.clone()])
            }
            Object::Kube(_, _) => {
                let labels: Vec<String> =
                    m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                rows.push(vec![
                    m.name.clone(),
                    if labels.is_empty() {
                        "<none>".into()
                    } else {
                        labels.join(",")
                    },
                ]);
            }
        }
    }
    render(&rows)
}

/// kubectl's layout: left-aligned columns, three spaces apart.
fn render(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i + 1 == r.len() {
                    cell.clone()
                } else {
                    format!("{cell:<w$}", w = widths[i] + 3)
                }
            })
            .collect();
        out.push_str(line.concat().trim_end());
        out.push('\n');
    }
    out
}
