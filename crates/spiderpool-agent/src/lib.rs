//! The node-local Spiderpool agent: it serves the `spiderpool` CNI plugin over a unix socket,
//! gathers pod/node/namespace facts from the datastore and its own flags, and allocates and
//! releases addresses through the allocation service.

pub mod metrics;
pub mod server;
pub mod service;
pub mod socket;
pub mod view;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use spiderpool_backends::{DatastoreUrl, DEFAULT_DATASTORE};
use spiderpool_core::Labels;

use crate::service::{IpamService, NodeIdentity};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Command-line flags of `spiderpool-agent`.
#[derive(Debug, Parser)]
#[command(
    name = "spiderpool-agent",
    version,
    about = "Spiderpool IPAM agent: serves the spiderpool CNI plugin on a unix socket"
)]
pub struct Args {
    /// Name of the node this agent serves.
    #[arg(long, env = "SPIDERPOOL_NODE_NAME")]
    pub node_name: String,
    /// Labels of the node, `k=v,k2=v2`; merged into its Node object.
    #[arg(long, env = "SPIDERPOOL_NODE_LABELS", default_value = "", value_parser = parse_labels)]
    pub node_labels: Labels,
    /// Unix socket to serve on. Its directory is created 0750 and the socket 0660 whatever the
    /// umask; a path that is not a socket, or a socket another agent answers on, is refused.
    #[arg(long, env = "SPIDERPOOL_SOCKET", default_value = spiderpool_api::cni::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Group (name or number) given the socket and the directories the agent creates for it;
    /// its members are trusted besides root and the agent's own user.
    #[arg(long, env = "SPIDERPOOL_SOCKET_GROUP")]
    pub socket_group: Option<socket::SocketGroup>,
    /// Connections served at once (more wait in the listen backlog); kept below the open-file
    /// limit.
    #[arg(long, env = "SPIDERPOOL_MAX_CONNECTIONS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Address (`host:port`) for the health endpoints a kubelet probe or supervisor uses:
    /// `GET /healthz` (the process serves) and `GET /readyz` (the datastore answers). Off when
    /// unset.
    #[arg(long, env = "SPIDERPOOL_HEALTH_ADDR")]
    pub health_addr: Option<std::net::SocketAddr>,
    /// Address (`host:port`) serving `GET /metrics` (Prometheus, upstream's metric names). Off
    /// when unset.
    #[arg(long, env = "SPIDERPOOL_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Time a client has to send a request's headers before its connection is closed.
    #[arg(long, env = "SPIDERPOOL_HEADER_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub header_timeout: std::time::Duration,
    /// Multus's cluster network (upstream's `MULTUS_CLUSTER_NETWORK`): the network of a pod's
    /// eth0 when it names no `v1.multus-cni.io/default-network`, for pools' `multusName`.
    #[arg(long, env = "MULTUS_CLUSTER_NETWORK")]
    pub multus_cluster_network: Option<String>,
    /// The namespace of a bare default or cluster network name (upstream: the agent's own; the
    /// chart sets it to its release's). Unset: the pod's namespace.
    #[arg(long, env = "SPIDERPOOL_MULTUS_NAMESPACE")]
    pub multus_namespace: Option<String>,
    /// How long an ADD waits for its SpiderSubnet auto pool to be created or grown before it
    /// fails with CNI code 11 (try again later).
    #[arg(long, env = "SPIDERPOOL_AUTO_POOL_WAIT", default_value = "50s", value_parser = humantime::parse_duration)]
    pub auto_pool_wait: std::time::Duration,
    /// Serve pods whose annotations ask for SpiderSubnet auto pools (`ipam.spidernet.io/subnet(s)`);
    /// when off they are refused.
    #[arg(long, env = "SPIDERPOOL_ENABLE_AUTO_POOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_auto_pool: bool,
    /// Upstream's `enableKubevirtStaticIP`: a KubeVirt VM's launcher pods hold its addresses
    /// under its VirtualMachineInstance's name, so they stay across restarts and live
    /// migrations while the VM lives; when off they are an ordinary pod's.
    #[arg(long, env = "SPIDERPOOL_ENABLE_KUBEVIRT_STATIC_IP", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_kubevirt_static_ip: bool,
    /// How long an address the coordinator found in conflict (another host answered its ARP
    /// probe) is held back from allocation, by a SpiderReservedIP `ip-conflict-ADDRESS`, before
    /// it is tried again.
    #[arg(long, env = "SPIDERPOOL_IP_CONFLICT_HOLD", default_value = "10m", value_parser = humantime::parse_duration)]
    pub ip_conflict_hold: std::time::Duration,
    /// When a DEL may answer before its pool write, which then carries the releases of one
    /// second of DELs: `auto` while this agent's pool writes meet other agents' (409 on
    /// Kubernetes), `always`, or `never` (each DEL waits for its pool write). A held-back
    /// release the agent dies with is freed by the controller's reclaim.
    #[arg(
        long,
        env = "SPIDERPOOL_RELEASE_HOLD_BACK",
        value_enum,
        default_value = "auto"
    )]
    pub release_hold_back: service::HoldBack,
    /// Upstream's `enableIPConflictDetection`: every coordinator probes each address before
    /// the pod uses it, whatever its SpiderCoordinator's `detectIPConflict` says.
    #[arg(long, env = "SPIDERPOOL_ENABLE_IP_CONFLICT_DETECTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub enable_ip_conflict_detection: bool,
    /// Upstream's `enableGatewayDetection`: every coordinator checks that the pod's gateways
    /// answer, whatever its SpiderCoordinator's `detectGateway` says.
    #[arg(long, env = "SPIDERPOOL_ENABLE_GATEWAY_DETECTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub enable_gateway_detection: bool,
    /// Datastore: sqlite:///path/db, etcd://host:port[,host:port]?prefix=/spiderpool or kubernetes.
    #[arg(long, env = "SPIDERPOOL_DATASTORE", default_value = DEFAULT_DATASTORE)]
    pub datastore: DatastoreUrl,
    /// With `--datastore kubernetes`: the kubeconfig file (else `KUBECONFIG`,
    /// `~/.kube/config`, or the pod's service account).
    #[arg(long, env = "SPIDERPOOL_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
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

/// Parses `k=v,k2=v2`.
pub fn parse_labels(s: &str) -> Result<Labels, String> {
    let mut out = Labels::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("label {pair:?} is not key=value"))?;
        if k.is_empty() {
            return Err(format!("label {pair:?} has an empty key"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

impl Args {
    /// Parses the command line and runs the agent until SIGTERM or SIGINT.
    pub fn parse_and_run() -> anyhow::Result<()> {
        let args = Args::parse();
        init_tracing(&args.log_level, args.log_format);
        // One thread: requests are served one batch at a time under the service's lock and
        // spend their time waiting on the datastore, so more threads only add wake-ups (a
        // fifth of the agents' CPU time in the race benchmark).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        rt.block_on(run(args))
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

/// Runs the agent.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let store = spiderpool_backends::open_with(&args.datastore, args.kubeconfig.as_deref())
        .await
        .with_context(|| format!("opening datastore {:?}", args.datastore))?;
    let svc = Arc::new(
        IpamService::new(
            store,
            NodeIdentity {
                name: args.node_name.clone(),
                labels: args.node_labels.clone(),
            },
        )
        .with_auto_pool_wait(args.enable_auto_pool.then_some(args.auto_pool_wait))
        .with_kubevirt_static_ip(args.enable_kubevirt_static_ip)
        .with_conflict_hold(args.ip_conflict_hold)
        .with_multus(spiderpool_api::annotation::MultusDefaults {
            cluster_network: args
                .multus_cluster_network
                .clone()
                .filter(|n| !n.is_empty()),
            namespace: args.multus_namespace.clone().filter(|n| !n.is_empty()),
        })
        .with_detection(
            args.enable_ip_conflict_detection,
            args.enable_gateway_detection,
        ),
    );
    svc.register_node()
        .await
        .with_context(|| format!("registering node {}", args.node_name))?;
    svc.keep_warm();
    svc.flush_releases_every(args.release_hold_back);
    svc.sweep_conflicts((args.ip_conflict_hold / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    ));
    let (listener, _guard) = socket::bind(&args.socket, args.socket_group)?;
    let trust = socket::Trust::new(args.socket_group);
    let limits = server::Limits {
        max_connections: connection_cap(args.max_connections),
        header_timeout: args.header_timeout,
    };
    tracing::info!(socket = %args.socket.display(), node = %args.node_name, datastore = ?args.datastore,
        max_connections = limits.max_connections, "serving");
    for (flag, addr, routes) in [
        (
            "--health-addr",
            args.health_addr,
            server::health_router(svc.clone()),
        ),
        (
            "--metrics-addr",
            args.metrics_addr,
            server::metrics_router(svc.clone()),
        ),
    ] {
        let Some(addr) = addr else { continue };
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {flag} {addr}"))?;
        tracing::info!(%addr, "serving {flag}");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, routes).await {
                tracing::error!(error = %e, "{flag} stopped");
            }
        });
    }
    server::serve(
        listener,
        server::router(svc.clone()),
        trust,
        limits,
        shutdown(),
    )
    .await;
    // Releases DELs held back are written before the agent goes.
    svc.flush_releases_now().await;
    tracing::info!("stopped");
    Ok(())
}

/// `--max-connections`, kept below the open-file limit so that the agent always has
/// descriptors left for its datastore and a listener that can still accept.
fn connection_cap(wanted: u32) -> usize {
    let wanted = usize::try_from(wanted).unwrap_or(usize::MAX);
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => {
            let room = usize::try_from(soft.saturating_sub(64))
                .unwrap_or(usize::MAX)
                .max(1);
            if room < wanted {
                tracing::warn!(
                    wanted,
                    open_file_limit = soft,
                    cap = room,
                    "fewer connections than --max-connections: the open-file limit is low"
                );
            }
            wanted.min(room)
        }
        Err(_) => wanted,
    }
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
