//! The runtime's stand-in for a pod's containers: each TCP `containerPort` answers HTTP with
//! the pod's name inside the pod's network namespace.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

use super::*;

/// Starts an HTTP responder inside the pod's namespace `netns` for each TCP container port of
/// `pod`, answering every request with 200 and the pod's name.
pub(super) async fn serve_ports(
    pod: &Pod,
    netns: &str,
    name: &str,
) -> SimResult<Vec<tokio::task::AbortHandle>> {
    let ports: Vec<u16> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    let mut out = Vec::new();
    for port in ports {
        let ns = netns.to_string();
        let listener = tokio::task::spawn_blocking(move || {
            in_netns(&ns, move || {
                // Both families where the namespace has IPv6, else IPv4 alone.
                let l = std::net::TcpListener::bind(("::", port))
                    .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", port)))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("listening on port {port} in {netns}: {e}"))?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let body = format!("{name}\n");
        let task = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                // The request's head, read until its blank line (5 s at most).
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        req.extend_from_slice(&buf[..n]);
                        if req.windows(4).any(|w| w == b"\r\n\r\n") || req.len() > 16384 {
                            break;
                        }
                    }
                })
                .await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
                let _ = conn.shutdown().await;
            }
        });
        out.push(task.abort_handle());
    }
    Ok(out)
}
