//! The `spiderpool` CNI IPAM plugin. It reads the CNI environment and network config, asks the
//! node's spiderpool-agent over its unix socket, and prints the result for the requested spec
//! version. Every failure becomes CNI error JSON on stdout and a non-zero exit; logs go to the
//! configured log file (rotated as upstream rotates it) or stderr, never stdout.
//!
//! The parsers of the call's input ([`plugin::Command::parse`], [`plugin::CniEnv::read`],
//! [`plugin::parse_cni_args`], [`plugin::parse_conf`], [`plugin::prev_result_addresses`],
//! [`log_file::LogFile::from_ipam`]) are pure and public, so a fuzz target can drive them
//! without I/O; none of them panics on any input.

pub mod client;
pub mod log_file;
pub mod plugin;

use serde_json::Value;

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
