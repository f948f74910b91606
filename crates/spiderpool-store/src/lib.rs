//! The Store port: where pools, subnets, reserved IPs, endpoints and the plain Kubernetes
//! objects live, and where address claims are committed. Every write is one atomic
//! compare-and-swap transaction on revisions, the shape that SQLite transactions, etcd
//! `mod_revision` compares and Kubernetes `resourceVersion` updates all provide.
//!
//! This crate is the contract only: the trait, typed access ([`typed`]), an in-memory backend
//! ([`memory::MemoryStore`]), a read-only overlay of staged writes ([`overlay::Staged`]), the
//! retry policy every conflict loop follows ([`Retry`]), and behind the feature `conformance`
//! the suite every backend must pass. The durable backends (SQLite, etcd, the Kubernetes API)
//! are `spiderpool-backends`; the decisions taken over any store are `spiderpool-control`.

#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
pub mod memory;
pub mod overlay;
mod retry;
pub mod typed;

use std::collections::BTreeMap;
use std::net::IpAddr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
pub use spiderpool_api::Kind;

pub use error::{check, Conflict, StoreError};
pub use retry::Retry;

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

impl Holder {
    /// Whether a release by `(container_id, nic, pod_uid)` frees what this holder holds: the
    /// same container and interface; or, when the release names no container (upstream's
    /// records carry none), the same pod incarnation on the same interface (upstream's pool
    /// entries name no interface either).
    pub fn released_by(&self, container_id: &str, nic: &str, pod_uid: &str) -> bool {
        if container_id.is_empty() {
            !pod_uid.is_empty()
                && self.pod_uid == pod_uid
                && (self.nic.is_empty() || self.nic == nic)
        } else {
            self.container_id == container_id && self.nic == nic
        }
    }
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
    /// A SpiderEndpoint was written or deleted, told instead of [`Change::Object`] for
    /// [`Kind::Endpoint`]: the addresses it records now, by pool (none once deleted). So a
    /// watcher knows which addresses are recorded for a pod without reading each record.
    Recorded {
        /// The endpoint's key (`namespace/name`).
        key: String,
        /// `(pool, address)` of every NIC of the record.
        ips: Vec<(String, IpAddr)>,
        /// Revision of the change: the record's, as [`Store::get`] gives it.
        revision: Revision,
        /// The record as written (as [`Store::get`] gives it); `None` once deleted.
        value: Option<serde_json::Value>,
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
    /// never frees an address that went to someone else. Never fails the transaction. A
    /// release without a container (a record upstream Spiderpool wrote, or one whose
    /// `containerID` an old CRD schema pruned) frees the address only from the incarnation
    /// `pod_uid` on that interface ([`Holder::released_by`]).
    Release {
        /// The pool.
        pool: String,
        /// The address.
        ip: IpAddr,
        /// The holder's container (empty: unknown, see above).
        container_id: String,
        /// The holder's interface.
        nic: String,
        /// The holder's pod UID.
        pod_uid: String,
    },
}

impl Op {
    /// Releases of every address a NIC record of pod incarnation `pod_uid` holds, owned by the
    /// container and interface it records (so none frees an address that has since gone to
    /// someone else).
    pub fn releases_of(nic: &spiderpool_api::crd::EndpointInterface, pod_uid: &str) -> Vec<Op> {
        nic.held()
            .into_iter()
            .map(|(pool, ip)| Op::Release {
                pool,
                ip,
                container_id: nic.container_id.clone(),
                nic: nic.interface.clone(),
                pod_uid: pod_uid.to_string(),
            })
            .collect()
    }
}

/// Keeps what could be read; reports what could not (the error names its key) and skips it,
/// so one corrupt value never takes the rest down. For backends and readers of lists.
pub fn skip_unreadable<T>(items: impl IntoIterator<Item = Result<T>>, what: &str) -> Vec<T> {
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

/// Where the datastore lives, which decides who owns the plain Kubernetes objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The project's own datastore (SQLite, etcd, memory): Nodes, Pods and workloads are
    /// objects `spiderpoolctl apply` writes, and the agents create what they need.
    Standalone,
    /// A Kubernetes cluster's API: kubelet registers Nodes, the cluster runs Pods and
    /// workloads, and the controller's webhooks and finalizers take part.
    Cluster,
}

impl Mode {
    /// Whether this is a cluster's API.
    pub fn is_cluster(self) -> bool {
        self == Mode::Cluster
    }
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
    /// Whether the datastore is a cluster's API (Kubernetes mode) or the project's own
    /// (standalone SQLite, etcd).
    fn mode(&self) -> Mode {
        Mode::Standalone
    }
    /// What the backend counted of its own writes.
    fn write_counts(&self) -> WriteCounts {
        WriteCounts::default()
    }
    /// Every change committed after revision `after` to the objects of `kinds` and, when they
    /// include [`Kind::IPPool`], to the allocations, for as long as the receiver is kept
    /// (endpoints are told as [`Change::Recorded`]). `None` when the backend cannot watch
    /// (callers then compare [`Store::revision`] instead).
    async fn watch(&self, after: Revision, kinds: &[Kind]) -> Result<Option<Changes>> {
        let _ = (after, kinds);
        Ok(None)
    }
    /// Starts following the Pods bound to `node`, where the datastore is a cluster's API (the
    /// agent serving that node); [`Store::followed_pod`] answers from it from then on. Must be
    /// called inside a Tokio runtime.
    fn follow_pods_on(&self, node: &str) {
        let _ = node;
    }
    /// The Pod `namespace/name` as the following of its node keeps it, possibly a moment
    /// behind the API; `None`: not followed, or not (yet) there.
    fn followed_pod(&self, key: &str) -> Option<Stored> {
        let _ = key;
        None
    }
}
