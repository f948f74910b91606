//! The Store port: where pools, subnets, reserved IPs, endpoints and the plain Kubernetes
//! objects live, and where address claims are committed. Every write is one atomic
//! compare-and-swap transaction on revisions, the shape that SQLite transactions, etcd
//! `mod_revision` compares and Kubernetes `resourceVersion` updates all provide.
//!
//! Backends: [`memory::MemoryStore`] (tests), [`sqlite::SqliteStore`] (the default, safe for
//! several processes on one file), [`etcd::EtcdStore`] (many hosts) and
//! [`kubernetes::KubeStore`] (the cluster's API server). [`conformance`] holds the suite every backend must pass.

pub mod admission;
pub mod audit;
pub mod autopool;
pub mod conformance;
pub mod etcd;
pub mod kubernetes;
pub mod memory;
pub mod objects;
pub mod reclaim;
pub mod sqlite;
pub mod typed;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
pub use spiderpool_api::Kind;
use thiserror::Error;

/// A datastore revision. Every committed transaction gets a higher one.
pub type Revision = u64;

/// An object as stored, with the revision of its last change.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The object's key within its kind.
    pub key: String,
    /// The object in its Kubernetes JSON form.
    pub value: Value,
    /// Revision of the last write of this object.
    pub revision: Revision,
}

/// Who holds an address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// Pod UID.
    pub pod_uid: String,
    /// Container (sandbox) ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface inside the pod.
    pub nic: String,
    /// Node of the pod.
    #[serde(default)]
    pub node: String,
}

/// One address held in one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The pool.
    pub pool: String,
    /// The address.
    pub ip: IpAddr,
    /// Its holder.
    pub holder: Holder,
    /// Revision of the claim.
    pub revision: Revision,
}

/// One change a watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An address of a pool was claimed (`held`) or released.
    Allocation {
        /// The pool.
        pool: String,
        /// The address.
        ip: IpAddr,
        /// Whether it is held after the change.
        held: bool,
        /// Revision of the change.
        revision: Revision,
    },
    /// An object was written or deleted.
    Object {
        /// Kind.
        kind: Kind,
        /// Key.
        key: String,
        /// Revision of the change.
        revision: Revision,
    },
}

/// The changes of a watch, a batch at a time: each key's in revision order (changes to the
/// allocations and to each kind may interleave). An `Err` ends the watch: what the watcher
/// built from it must be read afresh and watched again.
pub type Changes = tokio::sync::mpsc::Receiver<Result<Vec<Change>>>;

/// The condition a write puts on the object's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No condition.
    Any,
    /// The object must not exist.
    Absent,
    /// The object must exist at exactly this revision.
    Revision(Revision),
}

/// One step of a transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Create or replace an object.
    Put {
        /// Kind.
        kind: Kind,
        /// Key.
        key: String,
        /// The object JSON.
        value: Value,
        /// Condition.
        expect: Expect,
    },
    /// Delete an object.
    Delete {
        /// Kind.
        kind: Kind,
        /// Key.
        key: String,
        /// Condition (with `Any`, deleting a missing object is not an error).
        expect: Expect,
    },
    /// Take a free address of a pool. Fails the transaction when the address is held or the
    /// pool object changed since `pool_revision` (its spec may no longer allow it).
    Claim {
        /// The pool.
        pool: String,
        /// The address.
        ip: IpAddr,
        /// Who takes it.
        holder: Holder,
        /// Revision of the pool object the choice was made on.
        pool_revision: Revision,
    },
    /// Writes nothing; fails the transaction when an address of `pool` was claimed after
    /// revision `since`. A change to a pool checked against its holders as of `since` (an
    /// address excluded, the pool deleted) is thus never committed over a claim it did not see.
    NoClaimsSince {
        /// The pool.
        pool: String,
        /// The revision the holders were read at (or after).
        since: Revision,
    },
    /// Give an address back, but only if `(container_id, nic)` still holds it: a stale release
    /// never frees an address that went to someone else. Never fails the transaction.
    Release {
        /// The pool.
        pool: String,
        /// The address.
        ip: IpAddr,
        /// The holder's container.
        container_id: String,
        /// The holder's interface.
        nic: String,
    },
}

impl Op {
    /// Releases of every address a NIC record holds, owned by the container and interface it
    /// records (so none frees an address that has since gone to someone else).
    pub fn releases_of(nic: &spiderpool_api::crd::EndpointInterface) -> Vec<Op> {
        nic.held()
            .into_iter()
            .map(|(pool, ip)| Op::Release {
                pool,
                ip,
                container_id: nic.container_id.clone(),
                nic: nic.interface.clone(),
            })
            .collect()
    }
}

/// What went wrong in the datastore.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A condition of the transaction did not hold; nothing was written.
    #[error("conflict: {0}")]
    Conflict(String),
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

/// The conflict of [`Op::NoClaimsSince`].
pub(crate) fn claimed_since(pool: &str, since: Revision) -> StoreError {
    StoreError::Conflict(format!(
        "addresses of pool {pool} were claimed after revision {since}, while the change was being checked"
    ))
}

/// How a conflict over an address another holder took first ends.
pub(crate) const HELD: &str = "is already held";

impl StoreError {
    /// The conflict of a claim on `ip` of `pool`, which is held already.
    pub(crate) fn held(ip: &IpAddr, pool: &str) -> Self {
        StoreError::Conflict(format!("{ip} of pool {pool} {HELD}"))
    }

    /// The pool and address of a conflict over an address someone else claimed first (rather
    /// than over an object that changed): the mark of agents racing for the same addresses.
    pub fn taken(&self) -> Option<(String, IpAddr)> {
        let StoreError::Conflict(m) = self else {
            return None;
        };
        // The message `held` writes: "{ip} of pool {pool} is already held".
        let (ip, pool) = m.strip_suffix(HELD)?.trim_end().split_once(" of pool ")?;
        Some((pool.to_string(), ip.parse().ok()?))
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Conflict(_) | StoreError::Unavailable(_))
    }
}

/// Checks `expect` against the current revision of `what` (`None`: absent).
pub(crate) fn check(expect: Expect, current: Option<Revision>, what: &str) -> Result<()> {
    match (expect, current) {
        (Expect::Any, _) | (Expect::Absent, None) => Ok(()),
        (Expect::Absent, Some(r)) => Err(StoreError::Conflict(format!(
            "{what} already exists (revision {r})"
        ))),
        (Expect::Revision(want), Some(r)) if want == r => Ok(()),
        (Expect::Revision(want), Some(r)) => Err(StoreError::Conflict(format!(
            "{what} is at revision {r}, expected {want}"
        ))),
        (Expect::Revision(want), None) => Err(StoreError::Conflict(format!(
            "{what} no longer exists (expected revision {want})"
        ))),
    }
}

/// Keeps what could be read; reports what could not (the error names its key) and skips it,
/// so one corrupt value never takes the rest down.
pub(crate) fn skip_unreadable<T>(items: impl IntoIterator<Item = Result<T>>, what: &str) -> Vec<T> {
    items
        .into_iter()
        .filter_map(|r| {
            r.map_err(|e| tracing::error!(error = %e, "skipping an unreadable {what}"))
                .ok()
        })
        .collect()
}

/// What a backend counted of its own writes since it was opened (zero where it keeps no such
/// counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteCounts {
    /// Writes of pools' holders (Kubernetes: `status.allocatedIPs` updates).
    pub pool_writes: u64,
    /// Holder writes another writer got in first (409) and that the backend laid again itself.
    pub pool_conflicts: u64,
    /// Other object writes (endpoint records, …).
    pub object_writes: u64,
}

/// Result of a store call.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The datastore port. All backends pass [`conformance`].
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// One object.
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Stored>>;
    /// Several objects in one round trip where the backend can (etcd: one transaction of
    /// reads); the answers are in the order of `keys`.
    async fn get_many(&self, keys: &[(Kind, String)]) -> Result<Vec<Option<Stored>>> {
        let mut out = Vec::with_capacity(keys.len());
        for (kind, key) in keys {
            out.push(self.get(*kind, key).await?);
        }
        Ok(out)
    }
    /// Every object of a kind, ordered by key. Values that cannot be read are logged with their
    /// key and skipped.
    async fn list(&self, kind: Kind) -> Result<Vec<Stored>>;
    /// Every address held in `pool`.
    async fn allocations(&self, pool: &str) -> Result<Vec<Allocation>>;
    /// The addresses held in `pool`, without their holders (the allocation hot path).
    async fn held_ips(&self, pool: &str) -> Result<Vec<IpAddr>> {
        Ok(self
            .allocations(pool)
            .await?
            .into_iter()
            .map(|a| a.ip)
            .collect())
    }
    /// Number of addresses held, per pool (pools holding none are left out).
    async fn allocation_counts(&self) -> Result<BTreeMap<String, u64>>;
    /// Applies every op or none, in order: each op's condition is checked against the state
    /// the earlier ops of the transaction left (so a Release followed by a Claim of the same
    /// address hands it over). Returns the revision after the transaction; when it wrote
    /// something that is exactly one above the revision before it, so a caller whose commit
    /// returns `r + 1` knows that nothing else was written since it saw `r`.
    async fn commit(&self, ops: Vec<Op>) -> Result<Revision>;
    /// The most ops one [`Store::commit`] may carry (etcd caps transactions; 128 by default).
    fn max_ops(&self) -> usize {
        usize::MAX
    }
    /// The revision of the last committed transaction. `None` when the backend has no single
    /// datastore-wide revision (callers must then not cache across calls).
    async fn revision(&self) -> Result<Option<Revision>>;
    /// Whether the datastore answers.
    async fn ping(&self) -> Result<()>;
    /// Whether Node objects are the datastore's to create (standalone, etcd), or the
    /// cluster's (Kubernetes: kubelet registers them, and an agent only merges its labels).
    fn owns_nodes(&self) -> bool {
        true
    }
    /// What the backend counted of its own writes.
    fn write_counts(&self) -> WriteCounts {
        WriteCounts::default()
    }
    /// Every change committed after revision `after` to the allocations and to the objects of
    /// `kinds`, for as long as the receiver is kept. `None` when the backend cannot watch
    /// (callers then compare [`Store::revision`] instead).
    async fn watch(&self, after: Revision, kinds: &[Kind]) -> Result<Option<Changes>> {
        let _ = (after, kinds);
        Ok(None)
    }
}

/// A datastore location as the `--datastore` flag takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatastoreUrl {
    /// `sqlite:///path/to/file.db`.
    Sqlite(std::path::PathBuf),
    /// `memory:` (one process only; for tests).
    Memory,
    /// `etcd://host:port[,host:port]?prefix=/spiderpool`.
    Etcd {
        /// Endpoints.
        endpoints: Vec<String>,
        /// Key prefix.
        prefix: String,
    },
    /// `kubernetes[?kubeconfig=/path]`: the cluster's API server.
    Kubernetes {
        /// The kubeconfig file (else `--kubeconfig`, `KUBECONFIG`, `~/.kube/config` or the
        /// in-cluster service account).
        kubeconfig: Option<std::path::PathBuf>,
    },
}

/// The default datastore.
pub const DEFAULT_DATASTORE: &str = "sqlite:///var/lib/spiderpool/spiderpool.db";

impl std::str::FromStr for DatastoreUrl {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            StoreError::Config(format!(
                "datastore {s:?}: {why} (valid: sqlite:///path/to/db, etcd://host:2379[,host:2379]?prefix=/spiderpool, kubernetes[?kubeconfig=/path])"
            ))
        };
        if let Some(path) = s.strip_prefix("sqlite://") {
            if !path.starts_with('/') {
                return Err(bad("the sqlite path must be absolute, e.g. sqlite:///var/lib/spiderpool/spiderpool.db"));
            }
            return Ok(DatastoreUrl::Sqlite(path.into()));
        }
        if s == "memory:" {
            return Ok(DatastoreUrl::Memory);
        }
        if let Some(rest) = s.strip_prefix("kubernetes") {
            let kubeconfig = match rest {
                "" => None,
                q => match q.strip_prefix("?kubeconfig=") {
                    Some(p) if p.starts_with('/') => Some(p.into()),
                    _ => return Err(bad("the only setting is an absolute ?kubeconfig=/path")),
                },
            };
            return Ok(DatastoreUrl::Kubernetes { kubeconfig });
        }
        if let Some(rest) = s.strip_prefix("etcd://") {
            let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
            let endpoints: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect();
            if endpoints.is_empty() {
                return Err(bad("no etcd endpoint"));
            }
            let prefix = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("prefix="))
                .unwrap_or("/spiderpool")
                .to_string();
            return Ok(DatastoreUrl::Etcd { endpoints, prefix });
        }
        Err(bad("unknown scheme"))
    }
}

/// Opens the datastore at `url` (`kubernetes`: with `KUBECONFIG`, `~/.kube/config` or the
/// in-cluster service account).
pub async fn open(url: &DatastoreUrl) -> Result<Arc<dyn Store>> {
    open_with(url, None).await
}

/// Opens the datastore at `url`; `kubernetes` with the kubeconfig file `kubeconfig` when given.
pub async fn open_with(
    url: &DatastoreUrl,
    kubeconfig: Option<&std::path::Path>,
) -> Result<Arc<dyn Store>> {
    match url {
        DatastoreUrl::Sqlite(path) => Ok(Arc::new(sqlite::SqliteStore::open(path).await?)),
        DatastoreUrl::Memory => Ok(Arc::new(memory::MemoryStore::new())),
        DatastoreUrl::Etcd { endpoints, prefix } => {
            Ok(Arc::new(etcd::EtcdStore::connect(endpoints, prefix).await?))
        }
        DatastoreUrl::Kubernetes { kubeconfig: own } => Ok(Arc::new(
            kubernetes::KubeStore::connect(kubeconfig.or(own.as_deref())).await?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_datastore_urls() {
        assert_eq!(
            "sqlite:///var/lib/spiderpool/spiderpool.db"
                .parse::<DatastoreUrl>()
                .unwrap(),
            DatastoreUrl::Sqlite("/var/lib/spiderpool/spiderpool.db".into())
        );
        assert_eq!(
            "etcd://h1:2379,h2:2379?prefix=/x"
                .parse::<DatastoreUrl>()
                .unwrap(),
            DatastoreUrl::Etcd {
                endpoints: vec!["h1:2379".into(), "h2:2379".into()],
                prefix: "/x".into()
            }
        );
        let err = "sqlite://rel.db"
            .parse::<DatastoreUrl>()
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("datastore \"sqlite://rel.db\": the sqlite path must be absolute"),
            "{err}"
        );
        assert_eq!(
            "kubernetes".parse::<DatastoreUrl>().unwrap(),
            DatastoreUrl::Kubernetes { kubeconfig: None }
        );
        assert_eq!(
            "kubernetes?kubeconfig=/etc/k.conf"
                .parse::<DatastoreUrl>()
                .unwrap(),
            DatastoreUrl::Kubernetes {
                kubeconfig: Some("/etc/k.conf".into())
            }
        );
        let err = "kubernetes?server=x"
            .parse::<DatastoreUrl>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("?kubeconfig=/path"), "{err}");
        let err = "mysql://x".parse::<DatastoreUrl>().unwrap_err().to_string();
        assert!(err.contains("unknown scheme"), "{err}");
    }
}
