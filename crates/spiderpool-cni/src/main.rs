//! The `spiderpool` CNI IPAM plugin. It reads the CNI environment and network config, asks the
//! node's spiderpool-agent over its unix socket, and prints the result for the requested spec
//! version. Every failure becomes CNI error JSON on stdout and a non-zero exit; logs go to the
//! configured log file or stderr, never stdout.

mod client;
mod plugin;

use std::io::{Read, Write};
use std::process::ExitCode;

use spiderpool_api::cni::CniErrorJson;

/// A failure with its CNI error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    /// CNI error code.
    pub code: u32,
    /// Message naming the bad value.
    pub msg: String,
}

impl CniError {
    /// An error with `code`.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
        }
    }
}

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let outcome = match read {
        Ok(_) => plugin::run(&env, &stdin),
        Err(e) => Err((
            plugin::FALLBACK_VERSION.to_string(),
            CniError::new(
                spiderpool_api::cni::code::IO_FAILURE,
                format!("reading stdin: {e}"),
            ),
        )),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err((version, e)) => {
            tracing::error!(code = e.code, error = %e.msg, "failed");
            let j = CniErrorJson {
                cni_version: version,
                code: e.code,
                msg: e.msg,
                details: String::new(),
            };
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string(&j).expect("error serialises")
            );
            ExitCode::FAILURE
        }
    }
}
