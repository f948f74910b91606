//! The agent's HTTP/JSON API on its unix socket. Bodies are parsed here so that a malformed one
//! gets the same error shape (`{"code", "message"}`) as every other failure.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use spiderpool_api::agent::{
    ErrorBody, IpamAddArgs, IpamDelArgs, IpamGcArgs, IpamGcResponse, IpamStatusArgs, PATH_CHECK,
    PATH_GC, PATH_HEALTHY, PATH_IP, PATH_STATUS,
};
use spiderpool_api::cni::code;
use tokio::net::UnixListener;

use crate::service::{IpamService, ServiceError};

fn error(status: StatusCode, code: u32, message: String) -> Response {
    (status, Json(ErrorBody { code, message })).into_response()
}

fn service_error(e: ServiceError) -> Response {
    let code = e.cni_code();
    tracing::warn!(code, error = %e, "request failed");
    error(StatusCode::INTERNAL_SERVER_ERROR, code, e.to_string())
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
    match tracing::Instrument::instrument(svc.add(&args), span).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => service_error(e),
    }
}

async fn del(State(svc): State<Arc<IpamService>>, body: Bytes) -> Response {
    let args: IpamDelArgs = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_body(e),
    };
    let span = tracing::info_span!("del", container_id = %args.container_id, pod = %format!("{}/{}", args.pod_namespace, args.pod_name), ifname = %args.if_name);
    match tracing::Instrument::instrument(svc.del(&args), span).await {
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
    match svc.gc(&args.network, &args.valid_attachments).await {
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

/// The API's routes.
pub fn router(svc: Arc<IpamService>) -> Router {
    Router::new()
        .route(PATH_HEALTHY, get(healthy))
        .route(PATH_IP, post(add).delete(del))
        .route(PATH_CHECK, post(check))
        .route(PATH_GC, post(gc))
        .route(PATH_STATUS, post(status))
        .with_state(svc)
}

/// A bound socket that removes its file when dropped.
pub struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the unix socket at `path`, replacing a stale one.
pub fn bind(path: &Path) -> anyhow::Result<(UnixListener, SocketGuard)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()))
        }
    }
    let l =
        UnixListener::bind(path).with_context(|| format!("binding socket {}", path.display()))?;
    Ok((l, SocketGuard(path.to_path_buf())))
}
