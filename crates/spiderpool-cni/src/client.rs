//! A blocking HTTP/1.1 client for the agent's unix socket: one request per connection, the
//! response parsed with `httparse`. No async runtime in the plugin.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use spiderpool_api::agent::ErrorBody;
use spiderpool_api::cni::code;

use crate::CniError;

/// How long one agent call may take.
const TIMEOUT: Duration = Duration::from_secs(100);

/// What the agent answered.
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

fn unreachable(socket: &Path, e: impl std::fmt::Display) -> CniError {
    CniError::new(
        code::TRY_AGAIN_LATER,
        format!(
            "spiderpool-agent at {} is not reachable: {e}; try again later",
            socket.display()
        ),
    )
}

/// Sends `method path` with a JSON body and reads the whole reply.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&impl Serialize>,
) -> Result<Reply, CniError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| unreachable(socket, e))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| unreachable(socket, e))?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .map_err(|e| unreachable(socket, e))?;
    let body = body
        .map(|b| serde_json::to_vec(b).expect("request serialises"))
        .unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: spiderpool-agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    stream.write_all(&req).map_err(|e| unreachable(socket, e))?;
    let mut raw = Vec::with_capacity(1024);
    stream
        .read_to_end(&mut raw)
        .map_err(|e| unreachable(socket, e))?;

    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let bad = |why: String| {
        CniError::new(
            code::IO_FAILURE,
            format!(
                "bad reply from spiderpool-agent at {}: {why}",
                socket.display()
            ),
        )
    };
    let head_len = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(unreachable(socket, "the connection closed mid-reply"))
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    let status = resp.code.unwrap_or(0);
    let mut body = raw[head_len..].to_vec();
    if let Some(len) = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
    {
        if body.len() < len {
            return Err(unreachable(socket, "the connection closed mid-reply"));
        }
        body.truncate(len);
    } else if resp
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
    {
        return Err(bad("chunked replies are not expected".into()));
    }
    Ok(Reply { status, body })
}

impl Reply {
    /// The body as `T` on 200, the agent's error otherwise.
    pub fn json<T: DeserializeOwned>(&self, socket: &Path) -> Result<T, CniError> {
        self.ok(socket)?;
        serde_json::from_slice(&self.body).map_err(|e| {
            CniError::new(
                code::DECODING_FAILURE,
                format!(
                    "decoding the reply of spiderpool-agent at {}: {e}",
                    socket.display()
                ),
            )
        })
    }

    /// `Ok` on 200, the agent's error otherwise.
    pub fn ok(&self, socket: &Path) -> Result<(), CniError> {
        if self.status == 200 {
            return Ok(());
        }
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(e) => Err(CniError::new(e.code, e.message)),
            Err(_) => Err(CniError::new(
                code::IO_FAILURE,
                format!(
                    "spiderpool-agent at {} answered HTTP {}: {}",
                    socket.display(),
                    self.status,
                    String::from_utf8_lossy(&self.body)
                ),
            )),
        }
    }
}
