//! What a datastore call can fail with. A conflict says which condition failed as a value
//! ([`Conflict`]), so callers branch on what happened, never on a message's words.

use std::net::IpAddr;

use thiserror::Error;

use crate::{Expect, Revision};

/// What went wrong in the datastore.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A condition of the transaction did not hold; nothing was written.
    #[error("conflict: {0}")]
    Conflict(Conflict),
    /// The datastore could not be reached or was busy; the operation may be retried.
    #[error("datastore unavailable: {0}")]
    Unavailable(String),
    /// A stored value could not be read.
    #[error("corrupt value under {key}: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A datastore URL or setting is wrong.
    #[error("{0}")]
    Config(String),
    /// The datastore refused a write as invalid (the Kubernetes API server's validation).
    #[error("refused: {0}")]
    Rejected(String),
    /// A pool cannot record another address (Kubernetes mode's per-pool record cap).
    #[error("{0}")]
    Full(String),
}

/// Which condition of a transaction did not hold.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Conflict {
    /// An address someone else claimed first ([`crate::Op::Claim`]): the mark of agents racing
    /// for the same addresses, rather than of an object that changed.
    #[error("{ip} of pool {pool} is already held")]
    Taken {
        /// The pool.
        pool: String,
        /// The address.
        ip: IpAddr,
    },
    /// Addresses of the pool were claimed after the revision a change to it was checked at
    /// ([`crate::Op::NoClaimsSince`]).
    #[error(
        "addresses of pool {pool} were claimed after revision {since}, while the change was being checked"
    )]
    ClaimedSince {
        /// The pool.
        pool: String,
        /// The revision the holders were read at.
        since: Revision,
    },
    /// An object was not in the state the write expected (it changed, appeared or went), or
    /// kept changing; the message names it.
    #[error("{0}")]
    Changed(String),
}

impl StoreError {
    /// The conflict of a claim on `ip` of `pool`, which is held already.
    pub fn taken_conflict(pool: &str, ip: IpAddr) -> Self {
        StoreError::Conflict(Conflict::Taken {
            pool: pool.to_string(),
            ip,
        })
    }

    /// The conflict of [`crate::Op::NoClaimsSince`].
    pub fn claimed_since(pool: &str, since: Revision) -> Self {
        StoreError::Conflict(Conflict::ClaimedSince {
            pool: pool.to_string(),
            since,
        })
    }

    /// A conflict over an object that was not as expected; `message` names it.
    pub fn changed(message: impl Into<String>) -> Self {
        StoreError::Conflict(Conflict::Changed(message.into()))
    }

    /// The pool and address of a conflict over an address someone else claimed first.
    pub fn taken(&self) -> Option<(String, IpAddr)> {
        match self {
            StoreError::Conflict(Conflict::Taken { pool, ip }) => Some((pool.clone(), *ip)),
            _ => None,
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Conflict(_) | StoreError::Unavailable(_))
    }

    /// Whether the error is the fault of one object (a value that does not parse, a key that
    /// names nothing, a write refused as invalid) rather than of the datastore (unreachable,
    /// busy, a race): a reader of many objects skips that one and goes on.
    pub fn is_object_fault(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupt { .. } | StoreError::Config(_) | StoreError::Rejected(_)
        )
    }
}

/// Checks `expect` against the current revision of `what` (`None`: absent). For backends.
pub fn check(expect: Expect, current: Option<Revision>, what: &str) -> Result<(), StoreError> {
    match (expect, current) {
        (Expect::Any, _) | (Expect::Absent, None) => Ok(()),
        (Expect::Absent, Some(r)) => Err(StoreError::changed(format!(
            "{what} already exists (revision {r})"
        ))),
        (Expect::Revision(want), Some(r)) if want == r => Ok(()),
        (Expect::Revision(want), Some(r)) => Err(StoreError::changed(format!(
            "{what} is at revision {r}, expected {want}"
        ))),
        (Expect::Revision(want), None) => Err(StoreError::changed(format!(
            "{what} no longer exists (expected revision {want})"
        ))),
    }
}
