//! The `spiderpool` CNI IPAM plugin. It reads the CNI environment and network config, asks the
//! node's spiderpool-agent over its unix socket, and prints the result for the requested spec
//! version. Every failure becomes CNI error JSON on stdout and a non-zero exit; logs go to the
//! configured log file (rotated as upstream rotates it) or stderr, never stdout.
//!
//! The parsers of the call's input ([`plugin::Command::parse`], [`plugin::CniEnv::read`],
//! [`plugin::parse_cni_args`], [`plugin::parse_conf`], [`plugin::prev_result_addresses`],
//! [`log_file::LogFile::from_ipam`]) are pure and public, so a fuzz target can drive them
//! without I/O; none of them panics on any input.

pub mod arp;
pub mod client;
pub mod coordinator;
pub mod log_file;
pub mod netlink;
pub mod plugin;
pub mod probe;

use std::io::{Read, Write};
use std::process::ExitCode;

use serde_json::Value;
use spiderpool_api::cni::CniErrorJson;

/// One CNI call of a plugin: the environment and stdin in, `Ok(Some(json))` to print, or the
/// error with the version to report it in.
pub type Run = fn(
    &std::collections::HashMap<String, String>,
    &[u8],
) -> Result<Option<Value>, (String, CniError)>;

/// A plugin binary's `main`: reads stdin and the environment, runs `run`, and prints its answer
/// or CNI error JSON (exit status 1).
pub fn main_with(run: Run) -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // `std::env::vars` panics on a value that is not UTF-8; such a value is read lossily here
    // and then refused by the checks it fails (a container ID with U+FFFD in it, say).
    let env: std::collections::HashMap<String, String> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    let outcome = match read {
        Ok(_) => run(&env, &stdin),
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

/// An I/O failure (code 5) while doing `what`.
pub(crate) fn io(what: &str, e: impl std::fmt::Display) -> CniError {
    CniError::new(
        spiderpool_api::cni::code::IO_FAILURE,
        format!("{what}: {e}"),
    )
}

/// Moves the calling thread into the network namespace `ns` (`what` names it in an error).
pub(crate) fn enter(ns: &std::fs::File, what: &str) -> Result<(), CniError> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| io(&format!("entering {what}"), e))
}

/// Longest excerpt of a JSON value quoted in a message, in characters.
const EXCERPT_CHARS: usize = 64;

/// A JSON value as text for a message, cut to [`EXCERPT_CHARS`] characters (never inside one).
pub(crate) fn excerpt(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() <= EXCERPT_CHARS {
        return s;
    }
    let mut cut: String = s.chars().take(EXCERPT_CHARS).collect();
    cut.push('…');
    cut
}
