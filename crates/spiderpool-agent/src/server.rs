//! The agent's HTTP/JSON API on its unix socket. Bodies are parsed here so that a malformed one
//! gets the same error shape (`{"code", "message"}`) as every other failure. Connections are
//! capped and must send their headers in time, so slow or broken clients cannot starve the
//! plugins; each request is served in a task of its own, so a client that goes away drops only
//! its own answer, never the batch its request joined.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use spiderpool_api::agent::{
    CoordinatorConfigArgs, ErrorBody, IpamAddArgs, IpamBatchDelArgs, IpamDelArgs, IpamGcArgs,
    IpamGcResponse, IpamStatusArgs, PATH_CHECK, PATH_COORDINATOR_CONFIG, PATH_GC, PATH_HEALTHY,
    PATH_IP, PATH_IPS, PATH_STATUS,
};
use spiderpool_api::cni::code;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use crate::service::{IpamService, ServiceError};
use crate::socket::Trust;

fn error(status: StatusCode, code: u32, message: String) -> Response {
    (status, Json(ErrorBody { code, message })).into_response()
}

fn service_error(e: ServiceError) -> Response {
    let code = e.cni_code();
    match e {
        // A cluster without a SpiderCoordinator answers this to every ADD.
        ServiceError::NoCoordinator => tracing::debug!(code, error = %e, "request failed"),
        _ => tracing::warn!(code, error = %e, "request failed"),
    }
    error(http_status(&e), code, e.to_string())
}

/// The HTTP status that goes with a failure (the CNI code in the body is what the plugin uses).
fn http_status(e: &ServiceError) -> StatusCode {
    match e {
        ServiceError::InUse { .. } => StatusCode::CONFLICT,
        _ => match e.cni_code() {
            code::INVALID_ENV | code::DECODING_FAILURE | code::INVALID_NETWORK_CONFIG => {
                StatusCode::BAD_REQUEST
            }
            code::UNKNOWN_CONTAINER => StatusCode::NOT_FOUND,
            code::NO_ADDRESS => StatusCode::CONFLICT,
            code::TRY_AGAIN_LATER | code::PLUGIN_NOT_AVAILABLE => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        },
    }
}

/// Runs `work` in a task of its own and waits for it: when the client goes away the handler is
/// dropped, but the work (and the batch it may be serving for others) goes on to its end.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, ServiceError>> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::spawn(work).await.unwrap_or_else(|e| {
        Err(ServiceError::Store(
            spiderpool_store::StoreError::Unavailable(format!("the request's task failed: {e}")),
        ))
    })
}

fn bad_body(e: serde_json::Error) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        code::DECODING_FAILURE,
        format!("request body: {e}"),
    )
}

async fn healthy(State(svc): State<Arc<IpamService>>) -> Response {
    match svc.healthy().await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => service_error(e),
    }
}

async fn add(State(svc): State<Arc<IpamService>>, body: Bytes) -> Response {
    let args: IpamAddArgs = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_body(e),
    };
    let span = tracing::info_span!("add", container_id = %args.container_id, pod = %format!("{}/{}", args.pod_namespace, args.pod_name), ifname = %args.if_name);
    let (ip_conflict, gateway) = svc.detection();
    let work = async move { svc.metrics.allocation.observed(svc.add(&args)).await };
    match detached(tracing::Instrument::instrument(work, span)).await {
        Ok(mut r) => {
            // Upstream's switches: the IPAM plugin probes (ADD only; CHECK answers none).
            r.detect_ip_conflict = ip_conflict;
            r.detect_gateway = gateway;
            Json(r).into_response()
        }
        Err(e) => service_error(e),
    }
}

async fn del(State(svc): State<Arc<IpamService>>, body: Bytes) -> Response {
    let args: IpamDelArgs = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_body(e),
    };
    let span = tracing::info_span!("del", container_id = %args.container_id, pod = %format!("{}/{}", args.pod_namespace, args.pod_name), ifname = %args.if_name);
    let work = async move { svc.metrics.release.observed(svc.del(&args)).await };
    match detached(tracing::Instrument::instrument(work, span)).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => service_error(e),
    }
}

async fn check(State(svc): State<Arc<IpamService>>, body: Bytes) -> Response {
    let args: IpamDelArgs = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_body(e),
    };
    match svc.check(&args).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => service_error(e),
    }
}

async fn gc(State(svc): State<Arc<IpamService>>, body: Bytes) -> Response {
    let args: IpamGcArgs = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_body(e),
    };
    match detached(async move { svc.gc(&args.network, &args.valid_attachments).await }).await {
        Ok(released) => Json(IpamGcResponse { released }).into_response(),
        Err(e) => service_error(e),
    }
}

async fn status(State(svc): State<Arc<IpamService>>, body: Bytes) -> Response {
    let args: IpamStatusArgs = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_body(e),
    };
    match svc
        .status(&args.default_ipv4_ippool, &args.default_ipv6_ippool)
        .await
    {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => service_error(e),
    }
}

async fn release_conflicts(State(svc): State<Arc<IpamService>>, body: Bytes) -> Response {
    let args: IpamBatchDelArgs = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_body(e),
    };
    let span = tracing::info_span!("release_conflicts", container_id = %args.container_id, pod = %format!("{}/{}", args.pod_namespace, args.pod_name), ifname = %args.if_name);
    let work = async move { svc.release_conflicts(&args).await };
    match detached(tracing::Instrument::instrument(work, span)).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => service_error(e),
    }
}

async fn coordinator_config(State(svc): State<Arc<IpamService>>, body: Bytes) -> Response {
    let args: CoordinatorConfigArgs = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_body(e),
    };
    match svc
        .coordinator_config(&args.pod_namespace, &args.pod_name)
        .await
    {
        Ok(c) => Json(c).into_response(),
        Err(e) => service_error(e),
    }
}

/// The health endpoints on `--health-addr`: `/healthz` answers while the process serves,
/// `/readyz` when the datastore answers too (503 with the reason otherwise).
pub fn health_router(svc: Arc<IpamService>) -> Router {
    async fn readyz(State(svc): State<Arc<IpamService>>) -> Response {
        match svc.healthy().await {
            Ok(()) => (StatusCode::OK, "ok").into_response(),
            Err(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the datastore does not answer: {e}"),
            )
                .into_response(),
        }
    }
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(svc)
}

/// `GET /metrics` on `--metrics-addr`: the OpenMetrics text of the agent's metrics.
pub fn metrics_router(svc: Arc<IpamService>) -> Router {
    async fn metrics(State(svc): State<Arc<IpamService>>) -> Response {
        let space = svc.pool_space().await;
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            svc.metrics.render(svc.store_write_counts(), &space),
        )
            .into_response()
    }
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(svc)
}

/// The API's routes.
pub fn router(svc: Arc<IpamService>) -> Router {
    Router::new()
        .route(PATH_HEALTHY, get(healthy))
        .route(PATH_IP, post(add).delete(del))
        .route(PATH_CHECK, post(check))
        .route(PATH_GC, post(gc))
        .route(PATH_STATUS, post(status))
        .route(PATH_COORDINATOR_CONFIG, post(coordinator_config))
        .route(PATH_IPS, delete(release_conflicts))
        .with_state(svc)
}

/// Limits on clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time a connection has to send a request's headers.
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` completes: only trusted peers reach the
/// routes (others get 403 with the reason), at most `limits.max_connections` at a time.
pub async fn serve(
    listener: UnixListener,
    router: Router,
    trust: Trust,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let clients = Clients::new(per_client(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let http = Arc::new(http);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: wait for connections to end.
                    tracing::warn!(error = %e, "accepting a connection");
                    drop(slot);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = match trust.check(&stream) {
            Ok(()) => router.clone(),
            Err(why) => {
                tracing::warn!(reason = %why, "refusing an untrusted client");
                forbidden(why)
            }
        };
        // One client process holds at most `per_client` connections: the rest are answered
        // 429 at once, so no client can hold every slot (a plugin makes one at a time).
        let pid = stream.peer_cred().ok().and_then(|c| c.pid());
        let held = pid.and_then(|pid| clients.enter(pid));
        if pid.is_some() && held.is_none() {
            tracing::debug!(?pid, "refusing a connection: the client holds too many");
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::io::AsyncWriteExt::write_all(&mut stream, TOO_MANY),
                )
                .await;
                drop(slot);
            });
            continue;
        }
        let http = http.clone();
        tokio::spawn(async move {
            let conn =
                http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended");
            }
            drop(held);
            drop(slot);
        });
    }
    // Let the requests in progress finish (briefly): their clients are waiting for answers.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(10), slots.acquire_many(all)).await;
}

/// The most connections one client process may hold: a quarter of the slots, at least 4.
pub fn per_client(max_connections: usize) -> usize {
    (max_connections / 4).max(4)
}

/// The answer to a connection beyond its client's share (the request is not read).
const TOO_MANY: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: 96\r\n\r\n{\"code\":11,\"msg\":\"this client process holds too many connections to the agent; try again later\"}";

/// How many connections each client process holds.
#[derive(Clone)]
struct Clients {
    held: Arc<std::sync::Mutex<std::collections::HashMap<i32, usize>>>,
    cap: usize,
}

/// One connection of a client, counted until dropped.
struct Held {
    clients: Clients,
    pid: i32,
}

impl Clients {
    fn new(cap: usize) -> Self {
        Clients {
            held: Arc::default(),
            cap,
        }
    }

    /// Counts a connection of `pid`, unless it holds its share already.
    fn enter(&self, pid: i32) -> Option<Held> {
        let mut held = self.held.lock().expect("clients lock");
        let n = held.entry(pid).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(Held {
            clients: self.clone(),
            pid,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.clients.held.lock().expect("clients lock");
        if let Some(n) = held.get_mut(&self.pid) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.pid);
            }
        }
    }
}

/// The routes an untrusted peer gets: every request answered 403 with the reason.
fn forbidden(why: String) -> Router {
    Router::new().fallback(move || {
        let why = why.clone();
        async move { error(StatusCode::FORBIDDEN, code::IO_FAILURE, why) }
    })
}
