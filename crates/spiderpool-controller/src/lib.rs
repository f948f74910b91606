//! The Spiderpool controller (Kubernetes mode). Every replica serves the admission webhooks and
//! its health; the one holding the Lease `spiderpool-controller-leases` also reclaims the
//! addresses of dead pods and releases the finalizers of pools and subnets whose addresses are
//! all given back.

pub mod apps;
pub mod cache;
pub mod coordinators;
pub mod invalid;
pub mod leader;
pub mod metrics;
pub mod multus;
mod passes;
pub mod pools;
pub mod reclaim;
pub mod webhook;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::{Parser, ValueEnum};
use spiderpool_backends::kubernetes::KubeStore;
use spiderpool_control::reclaim::Policy;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Command-line flags of `spiderpool-controller`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "spiderpool-controller",
    version,
    about = "Spiderpool controller: admission webhooks, finalizers and the reclaim of leaked addresses (Kubernetes mode)"
)]
pub struct Args {
    /// The kubeconfig file (else `KUBECONFIG`, `~/.kube/config`, or the pod's service account).
    #[arg(long, env = "SPIDERPOOL_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The namespace the controller runs in: its Lease and webhook Secret live there.
    #[arg(long, env = "SPIDERPOOL_NAMESPACE", default_value = "kube-system")]
    pub namespace: String,
    /// This replica's identity in the leader election (the pod name in a cluster).
    #[arg(long, env = "SPIDERPOOL_POD_NAME")]
    pub pod_name: Option<String>,
    /// Address (`host:port`) for `GET /healthz` (the process serves) and `GET /readyz` (the
    /// webhook answers and a leader is known).
    #[arg(long, env = "SPIDERPOOL_HEALTH_ADDR", default_value = "0.0.0.0:5720")]
    pub health_addr: std::net::SocketAddr,
    /// Address (`host:port`) serving `GET /metrics`. Off when unset.
    #[arg(long, env = "SPIDERPOOL_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Address (`host:port`) the admission webhooks listen on (HTTPS).
    #[arg(long, env = "SPIDERPOOL_WEBHOOK_ADDR", default_value = "0.0.0.0:5722")]
    pub webhook_addr: std::net::SocketAddr,
    /// The Service (in `--namespace`) through which the API server reaches the webhooks.
    #[arg(
        long,
        env = "SPIDERPOOL_WEBHOOK_SERVICE",
        default_value = "spiderpool-controller"
    )]
    pub webhook_service: String,
    /// The Service's port.
    #[arg(long, env = "SPIDERPOOL_WEBHOOK_SERVICE_PORT", default_value_t = 5722)]
    pub webhook_service_port: i32,
    /// Instead of the Service, a base URL (`https://host:port`) the API server reaches the
    /// webhooks at: for a controller outside the cluster.
    #[arg(
        long,
        env = "SPIDERPOOL_WEBHOOK_URL",
        conflicts_with = "webhook_service"
    )]
    pub webhook_url: Option<String>,
    /// Whether the controller applies its ValidatingWebhookConfiguration and
    /// MutatingWebhookConfiguration (with the CA) itself.
    #[arg(long, env = "SPIDERPOOL_WEBHOOK_REGISTER", default_value_t = true, action = clap::ArgAction::Set)]
    pub webhook_register: bool,
    /// Whether IPv4 pools, subnets and reserved IPs are accepted (upstream's `ipam.enableIPv4`).
    #[arg(long, env = "SPIDERPOOL_ENABLE_IPV4", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_ipv4: bool,
    /// Whether IPv6 ones are (upstream's `ipam.enableIPv6`).
    #[arg(long, env = "SPIDERPOOL_ENABLE_IPV6", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_ipv6: bool,
    /// How long a leader's Lease lasts without renewal; another replica takes over after it.
    #[arg(long, env = "SPIDERPOOL_LEADER_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub leader_duration: Duration,
    /// Whether the leader reclaims the addresses of dead pods.
    #[arg(long, env = "SPIDERPOOL_GC_IP_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub gc_enabled: bool,
    /// Reconcile SpiderSubnet auto pools for Deployments, ReplicaSets, StatefulSets, DaemonSets,
    /// Jobs and CronJobs whose pod template has `ipam.spidernet.io/subnet(s)`.
    #[arg(long, env = "SPIDERPOOL_ENABLE_AUTO_POOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_pool: bool,
    /// Addresses an auto pool gets beyond the replicas when the template has no
    /// `ipam.spidernet.io/ippool-ip-number` (upstream's `defaultRedundantIPNumber`).
    #[arg(long, env = "SPIDERPOOL_AUTO_POOL_REDUNDANCY", default_value_t = 1)]
    pub auto_pool_redundancy: u64,
    /// Time between two passes over every application's auto pools.
    #[arg(long, env = "SPIDERPOOL_AUTO_POOL_RESYNC", default_value = "60s", value_parser = humantime::parse_duration)]
    pub auto_pool_resync: Duration,
    /// Time between two computations of every SpiderCoordinator's status beyond those its own
    /// and the ServiceCIDRs' changes cause (kubeadm-config, the controller-manager's flags and
    /// Calico's IPPools are read then).
    #[arg(long, env = "SPIDERPOOL_COORDINATOR_RESYNC", default_value = "60s", value_parser = humantime::parse_duration)]
    pub coordinator_resync: Duration,
    /// The spec (JSON) of the SpiderCoordinator `default` the leader creates when there is
    /// none, as upstream's install does (`{"podCIDRType": "auto", ...}`); an existing one is
    /// never changed. Unset: none is created.
    #[arg(long, env = "SPIDERPOOL_DEFAULT_COORDINATOR", value_parser = parse_coordinator_spec)]
    pub default_coordinator: Option<serde_json::Value>,
    /// Keep a NetworkAttachmentDefinition for each SpiderMultusConfig (upstream's
    /// `SPIDERPOOL_MULTUS_CONFIG_ENABLED`).
    #[arg(long, env = "SPIDERPOOL_MULTUS_CONFIG_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub multus_config: bool,
    /// Time between two passes over every SpiderMultusConfig beyond those watch events cause.
    #[arg(long, env = "SPIDERPOOL_MULTUS_CONFIG_RESYNC", default_value = "60s", value_parser = humantime::parse_duration)]
    pub multus_config_resync: Duration,
    /// Time between two full scans of every address (and one when leadership is won).
    #[arg(long, env = "SPIDERPOOL_GC_DEFAULT_INTERVAL_DURATION", default_value = "600s", value_parser = humantime::parse_duration)]
    pub gc_interval: Duration,
    /// Added to a pod's own grace period; also the least time between the two sightings of a
    /// leak that a release needs.
    #[arg(long, env = "SPIDERPOOL_GC_ADDITIONAL_GRACE_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub gc_grace_delay: Duration,
    /// How long a Node may be NotReady before its terminating pods' addresses are taken without
    /// waiting for their grace period.
    #[arg(long, env = "SPIDERPOOL_GC_NODE_GRACE", default_value = "300s", value_parser = humantime::parse_duration)]
    pub gc_node_grace: Duration,
    /// Time between two looks at the pods that pod events marked (deleted, terminating,
    /// finished).
    #[arg(long, env = "SPIDERPOOL_GC_TRACE_POD_GAP_DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub gc_trace_gap: Duration,
    /// The users that are Spiderpool agents, whose writes to pool statuses and reserved IPs
    /// the webhook restricts to their own node (comma-separated; default: the service account
    /// `spiderpool-agent` of `--namespace`). Users named `spiderpool-agent:NODE` are agents of
    /// NODE too.
    #[arg(long, env = "SPIDERPOOL_AGENT_USERS", value_delimiter = ',')]
    pub agent_users: Vec<String>,
    /// Log level filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, env = "SPIDERPOOL_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(
        long,
        env = "SPIDERPOOL_LOG_FORMAT",
        value_enum,
        default_value = "plain"
    )]
    pub log_format: LogFormat,
}

impl Args {
    /// Parses the command line and runs the controller until SIGTERM or SIGINT.
    pub fn parse_and_run() -> anyhow::Result<()> {
        let args = Args::parse();
        init_tracing(&args.log_level, args.log_format);
        // A loop that panics ends its task silently otherwise.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            tracing::error!("panic: {info}");
            default_hook(info);
        }));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        rt.block_on(run(args))
    }

    /// The reclaim's timing.
    pub fn policy(&self) -> Policy {
        Policy {
            grace_delay: self.gc_grace_delay,
            node_grace: self.gc_node_grace,
        }
    }

    /// This replica's identity: `--pod-name`, else the host name and process id.
    pub fn identity(&self) -> String {
        self.pod_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "spiderpool-controller".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

fn init_tracing(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => b.with_ansi(false).init(),
        LogFormat::Json => b.json().init(),
    }
}

/// What the health endpoints report.
#[derive(Debug, Default)]
pub struct Health {
    /// A leader is known (this replica or another).
    pub leader_known: AtomicBool,
    /// This replica leads.
    pub leading: AtomicBool,
    /// The webhooks serve.
    pub webhook: AtomicBool,
}

fn health_router(health: Arc<Health>) -> Router {
    async fn readyz(State(h): State<Arc<Health>>) -> Response {
        if !h.webhook.load(Ordering::SeqCst) {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the webhooks do not serve yet",
            )
                .into_response()
        } else if h.leader_known.load(Ordering::SeqCst) {
            (StatusCode::OK, "ok").into_response()
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "no leader is known yet").into_response()
        }
    }
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// Runs the controller.
/// `--default-coordinator`: a SpiderCoordinator spec as a JSON object.
fn parse_coordinator_spec(s: &str) -> Result<serde_json::Value, String> {
    let v: serde_json::Value =
        serde_json::from_str(s).map_err(|e| format!("{s:?} is not JSON: {e}"))?;
    if !v.is_object() {
        return Err(format!(
            "{s:?} is not a JSON object (a SpiderCoordinator spec)"
        ));
    }
    serde_json::from_value::<spiderpool_api::coordinator::CoordinatorSpec>(v.clone())
        .map_err(|e| format!("{s:?} is not a SpiderCoordinator spec: {e}"))?;
    Ok(v)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let store = KubeStore::connect(args.kubeconfig.as_deref())
        .await
        .context("connecting to the API server")?;
    store.check_schemas().await?;
    let client = store.client();
    let kube = store.clone();
    let store: Arc<dyn spiderpool_store::Store> = Arc::new(store);
    let health = Arc::new(Health::default());
    let metrics = Arc::new(metrics::Metrics::new());
    let identity = args.identity();
    tracing::info!(%identity, namespace = %args.namespace, "starting");

    serve(
        "--health-addr",
        args.health_addr,
        health_router(health.clone()),
    )
    .await?;
    if let Some(addr) = args.metrics_addr {
        serve("--metrics-addr", addr, metrics::router(metrics.clone())).await?;
    }

    webhook::start(
        client.clone(),
        store.clone(),
        webhook::Settings {
            addr: args.webhook_addr,
            namespace: args.namespace.clone(),
            endpoint: match &args.webhook_url {
                Some(url) => webhook::Endpoint::Url(url.clone()),
                None => webhook::Endpoint::Service {
                    name: args.webhook_service.clone(),
                    port: args.webhook_service_port,
                },
            },
            register: args.webhook_register,
            families: spiderpool_control::admission::Families {
                ipv4: args.enable_ipv4,
                ipv6: args.enable_ipv6,
            },
            agent_users: if args.agent_users.is_empty() {
                vec![format!(
                    "system:serviceaccount:{}:spiderpool-agent",
                    args.namespace
                )]
            } else {
                args.agent_users.clone()
            },
        },
    )
    .await?;
    health.webhook.store(true, Ordering::SeqCst);

    let mut leading = leader::elect(
        client.clone(),
        &args.namespace,
        &identity,
        args.leader_duration,
        health.clone(),
    )
    .await?;
    let mut work: Option<tokio::task::JoinSet<()>> = None;
    let stop = shutdown();
    tokio::pin!(stop);
    loop {
        let lead = *leading.borrow_and_update();
        metrics.leading(lead);
        match (lead, work.is_some()) {
            (true, false) => {
                tracing::info!(%identity, "leading: finalizers and the reclaim of leaked addresses");
                let mut set = tokio::task::JoinSet::new();
                // One reflector per kind, shared by the loops; each loop's store counts its
                // own API reads. The caches go when leadership does (with `set`'s tasks).
                let caches = cache::Caches::start(&client);
                let own = Arc::new(cache::OwnWrites::default());
                let cached = || cache::CachedKube::new(caches.clone(), own.clone(), &kube);
                // Objects a loop skips, said once each (an Event, a log line, a gauge).
                let invalid =
                    invalid::Invalid::new(client.clone(), identity.clone(), metrics.clone());
                set.spawn(pools::run(
                    client.clone(),
                    cached(),
                    args.gc_interval,
                    metrics.clone(),
                    invalid.clone(),
                ));
                set.spawn(coordinators::run(
                    client.clone(),
                    args.coordinator_resync,
                    args.default_coordinator.clone(),
                ));
                if args.multus_config {
                    set.spawn(multus::run(
                        client.clone(),
                        args.multus_config_resync,
                        invalid.clone(),
                    ));
                }
                if args.auto_pool {
                    set.spawn(apps::run(
                        client.clone(),
                        cached(),
                        spiderpool_control::autopool::Settings {
                            default_redundancy: args.auto_pool_redundancy,
                        },
                        args.auto_pool_resync,
                        identity.clone(),
                        metrics.clone(),
                    ));
                }
                if args.gc_enabled {
                    let r = reclaim::Reclaimer::new(
                        cached(),
                        args.policy(),
                        metrics.clone(),
                        invalid.clone(),
                        leading.clone(),
                    );
                    let (interval, gap) = (args.gc_interval, args.gc_trace_gap);
                    set.spawn(async move { r.run(interval, gap).await });
                }
                work = Some(set);
            }
            (false, true) => {
                tracing::warn!(%identity, "no longer leading: the leader's work stops");
                if let Some(mut set) = work.take() {
                    set.shutdown().await;
                }
            }
            _ => {}
        }
        tokio::select! {
            changed = leading.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the leader election stopped");
                }
            }
            _ = &mut stop => break,
        }
    }
    if let Some(mut set) = work.take() {
        set.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn serve(flag: &str, addr: std::net::SocketAddr, routes: Router) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {flag} {addr}"))?;
    tracing::info!(%addr, "serving {flag}");
    let flag = flag.to_string();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(l, routes).await {
            tracing::error!(error = %e, "{flag} stopped");
        }
    });
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_coordinator_flag_takes_a_spec_and_names_what_is_not_one() {
        let v =
            parse_coordinator_spec(r#"{"podCIDRType": "auto", "hijackCIDR": ["169.254.0.0/16"]}"#)
                .unwrap();
        assert_eq!(v["podCIDRType"], "auto");
        let e = parse_coordinator_spec("[1]").unwrap_err();
        assert!(e.contains("\"[1]\" is not a JSON object"), "{e}");
        let e = parse_coordinator_spec("{podCIDRType").unwrap_err();
        assert!(e.contains("is not JSON"), "{e}");
        let e = parse_coordinator_spec(r#"{"vethMTU": "big"}"#).unwrap_err();
        assert!(e.contains("is not a SpiderCoordinator spec"), "{e}");
    }
}
