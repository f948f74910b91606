//! The `spiderpool` CNI IPAM plugin. It reads the CNI environment and network config, asks the
//! node's spiderpool-agent over its unix socket, and prints the result for the requested spec
//! version. Every failure becomes CNI error JSON on stdout and a non-zero exit; logs go to the
//! configured log file or stderr, never stdout.

pub mod client;
pub mod plugin;

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

