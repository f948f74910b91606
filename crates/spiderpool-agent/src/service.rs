//! The allocation service: one ADD, DEL or CHECK at a time per agent. It gathers the facts (pod,
//! namespace, node, pools, reserved addresses, holders), asks the core rules for a plan, and
//! commits the claims together with the pod's endpoint record in one compare-and-swap
//! transaction, retrying a bounded number of times on conflicts with other agents.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use spiderpool_api::cni::code;
use spiderpool_api::{KubeObject, Object, ObjectMeta, ValidationError};
use spiderpool_core::candidate::AllocError;
use spiderpool_core::Labels;
use spiderpool_store::{typed, Expect, Kind, Op, Retry, Store, StoreError};
use thiserror::Error;
use tokio::sync::Mutex;

use crate::view::{ViewCache, MAX_WATCHED_AGE};

/// Why a request failed. Each variant maps to the CNI code the plugin reports.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The allocation rules found no address.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// A request field, annotation or object is invalid.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A CNI argument (container ID, interface, pod namespace or name, pod UID) is malformed or
    /// names another pod.
    #[error("{0}")]
    BadArgs(ValidationError),
    /// The pod's addresses are held by another incarnation of it (another pod UID) that nothing
    /// says is gone: they are not taken from it.
    #[error("pod {pod} is held by pod UID {holder_uid:?} ({detail}), not by {uid:?}; release it first (CNI DEL or GC of that sandbox, or `spiderpoolctl delete endpoint {pod}`), or apply the Pod object with the new metadata.uid")]
    InUse {
        /// `namespace/name`.
        pod: String,
        /// The UID of this request.
        uid: String,
        /// The UID the endpoint record holds the addresses for.
        holder_uid: String,
        /// What it holds where.
        detail: String,
    },
    /// The datastore failed or conflicts did not settle.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Conflicts with other writers did not settle within the retries; try again later.
    #[error("datastore unavailable: {0}")]
    RetriesExhausted(String),
    /// STATUS: ADD cannot be served.
    #[error("{0}")]
    NotReady(String),
    /// No SpiderCoordinator exists: the plugin goes on without coordinator settings, so this
    /// is an answer, not a failure (the plugin knows it by the message's start).
    #[error("coordinator config not found: no SpiderCoordinator (apply one named \"default\")")]
    NoCoordinator,
    /// The pod's auto pool is not there or not grown yet, after waiting for the reconciler.
    #[error("{0}")]
    AutoPoolNotReady(String),
    /// CHECK: the container holds no reservation for the interface.
    #[error("container {container_id} holds no address for interface {nic} (pod {pod})")]
    NoReservation {
        /// Container ID.
        container_id: String,
        /// Interface.
        nic: String,
        /// `namespace/name`.
        pod: String,
    },
    /// CHECK: the record names an address its pool no longer holds for the container.
    #[error("container {container_id} holds no address for interface {nic} (pod {pod}): {ip} of pool {pool} is no longer held by it")]
    NotHeld {
        /// Container ID.
        container_id: String,
        /// Interface.
        nic: String,
        /// `namespace/name`.
        pod: String,
        /// The address the record names.
        ip: std::net::IpAddr,
        /// Its pool.
        pool: String,
    },
}

impl ServiceError {
    /// The CNI error code for this failure.
    pub fn cni_code(&self) -> u32 {
        match self {
            ServiceError::Alloc(AllocError::PoolNotFound { .. }) => code::INVALID_NETWORK_CONFIG,
            ServiceError::Alloc(_) => code::NO_ADDRESS,
            ServiceError::Invalid(_) => code::INVALID_NETWORK_CONFIG,
            ServiceError::BadArgs(_) => code::INVALID_ENV,
            ServiceError::InUse { .. } => code::TRY_AGAIN_LATER,
            ServiceError::Store(e) if e.is_retryable() => code::TRY_AGAIN_LATER,
            ServiceError::Store(StoreError::Full(_)) => code::NO_ADDRESS,
            ServiceError::RetriesExhausted(_) => code::TRY_AGAIN_LATER,
            ServiceError::Store(_) => code::IO_FAILURE,
            ServiceError::NoReservation { .. } | ServiceError::NotHeld { .. } => {
                code::UNKNOWN_CONTAINER
            }
            ServiceError::NotReady(_) | ServiceError::NoCoordinator => code::PLUGIN_NOT_AVAILABLE,
            ServiceError::AutoPoolNotReady(_) => code::TRY_AGAIN_LATER,
        }
    }
}

impl ServiceError {
    /// Whether conflicts with other writers did not settle within the retries.
    pub fn retries_exhausted(&self) -> bool {
        matches!(self, ServiceError::RetriesExhausted(_))
    }
}

impl crate::metrics::Outcome for ServiceError {
    fn failure(&self) -> crate::metrics::Failure {
        use crate::metrics::Failure;
        match self {
            ServiceError::Alloc(AllocError::Exhausted { .. }) => Failure::IpUsedOut,
            ServiceError::Alloc(_) => Failure::NoAvailablePool,
            e if e.retries_exhausted() => Failure::RetriesExhausted,
            _ => Failure::Internal,
        }
    }
}

type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// The agent's identity.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// `--node-name`.
    pub name: String,
    /// `--node-labels`.
    pub labels: Labels,
}

/// The IPAM service of one agent.
pub struct IpamService {
    store: Arc<dyn Store>,
    node: NodeIdentity,
    // One request at a time inside this agent: requests never conflict with each other here,
    // only with other agents, which the store's compare-and-swap settles. The lock also
    // guards the cached view of the datastore.
    state: Mutex<ViewCache>,
    /// The book of endpoint records the view keeps (also read outside the lock).
    records: Option<Arc<crate::view::RecordBook>>,
    queue: std::sync::Mutex<Vec<PendingAdd>>,
    del_queue: std::sync::Mutex<Vec<del::PendingDel>>,
    /// How long a DEL waits for others to join its group commit.
    gather: gather::Gather,
    /// Pool releases held back while agents race for pools (deferred.rs).
    deferred: deferred::Deferred,
    /// What the agent counts (`--metrics-addr`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// How long an ADD waits for its auto pool (`--auto-pool-wait`); `None`: auto pools are
    /// off (`--enable-auto-pool=false`).
    auto_pool_wait: Option<Duration>,
    /// A KubeVirt VM's pods hold its addresses under its VMI's name (`--enable-kubevirt-static-ip`).
    kubevirt_static_ip: bool,
    multus: spiderpool_api::annotation::MultusDefaults,
    /// How long an address found in conflict is held back (`--ip-conflict-hold`).
    conflict_hold: Duration,
    /// Upstream's switches (`--enable-ip-conflict-detection`, `--enable-gateway-detection`):
    /// the `spiderpool` IPAM plugin probes, with or without a coordinator after it.
    detection: (bool, bool),
}

/// How long an ADD waits for its auto pool by default (upstream: 25 tries 2 s apart).
pub const AUTO_POOL_WAIT: Duration = Duration::from_secs(50);

/// Evaluates the attempt (an expression yielding a future of `Result`) until it does not end
/// in a conflict, as [`Retry::CONFLICTS`] says, then tells the caller to try again later. (A
/// conflict means another writer moved the datastore on: the next attempt's view has learnt the
/// address that was taken, or is read afresh.) A macro rather than a function taking an async
/// closure, whose futures cannot yet be proven `Send` for the server.
macro_rules! retrying {
    ($what:expr, $attempt:expr) => {
        retrying!($what, None::<&crate::metrics::Family>, $attempt)
    };
    ($what:expr, $family:expr, $attempt:expr) => {{
        let mut n = 0u32;
        loop {
            n += 1;
            match $attempt.await {
                Err(ServiceError::Store(StoreError::Conflict(c))) => {
                    if let Some(f) = $family {
                        f.conflict();
                    }
                    if !Retry::CONFLICTS.more(n) {
                        break Err(ServiceError::RetriesExhausted(format!(
                            "{}: gave up after {n} conflicting attempts, last: {c}",
                            $what
                        )));
                    }
                    tracing::debug!(attempt = n, conflict = %c, "{}: retrying after a conflict", $what);
                    tokio::time::sleep(Retry::CONFLICTS.wait(n)).await;
                }
                other => break other,
            }
        }
    }};
}

mod add;
mod batch;
mod check;
mod conflict;
mod coordinator;
mod deferred;
mod del;
mod gather;
mod gc;
mod plan;
mod pod;
mod record;
mod stateful;
mod status;

use add::{Commit, Prefetched, Prepared};
use batch::PendingAdd;
pub use conflict::{conflict_reservation_name, CONFLICT_HOLD};
pub use deferred::HoldBack;
use plan::Pick;
use pod::PodRef;
use record::{endpoint_of, endpoint_write, kube_of, nic_of, record_of, response_of};

impl IpamService {
    /// A service over `store` for the node `node`.
    pub fn new(store: Arc<dyn Store>, node: NodeIdentity) -> Self {
        let cache = ViewCache::following(store.clone(), Some(&node.name));
        // An ADD reads its pod there first (see add.rs `read_ahead`).
        store.follow_pods_on(&node.name);
        IpamService {
            records: cache.records(),
            state: Mutex::new(cache),
            store,
            node,
            queue: std::sync::Mutex::new(Vec::new()),
            del_queue: std::sync::Mutex::new(Vec::new()),
            gather: Default::default(),
            deferred: Default::default(),
            metrics: Arc::default(),
            auto_pool_wait: Some(AUTO_POOL_WAIT),
            kubevirt_static_ip: true,
            multus: Default::default(),
            conflict_hold: conflict::CONFLICT_HOLD,
            detection: (false, false),
        }
    }

    /// How the node's Multus names the first NIC's network (for pools' `multusName`).
    pub fn with_multus(mut self, multus: spiderpool_api::annotation::MultusDefaults) -> Self {
        self.multus = multus;
        self
    }

    /// How long an ADD waits for its auto pool to be created or grown; `None` turns auto pools
    /// off (a pod that asks for one is refused).
    pub fn with_auto_pool_wait(mut self, wait: Option<Duration>) -> Self {
        self.auto_pool_wait = wait;
        self
    }

    /// Whether a KubeVirt VM's launcher pods hold its addresses under its VMI's name (on by
    /// default, as upstream's chart).
    pub fn with_kubevirt_static_ip(mut self, on: bool) -> Self {
        self.kubevirt_static_ip = on;
        self
    }

    /// Keeps the cached view read ahead of requests: now, again whenever the datastore's watch
    /// reports a change to the objects the view is made of, and before a watched view grows too
    /// old to be trusted, so no request waits for a re-read those would otherwise cause.
    pub fn keep_warm(self: &Arc<Self>) {
        let svc = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(s) = svc.upgrade() else { return };
                let stale = {
                    let mut cache = s.state.lock().await;
                    if let Err(e) = cache.warm(s.store.as_ref()).await {
                        tracing::warn!(error = %e, "reading the view ahead of requests");
                    }
                    cache.stale()
                };
                drop(s);
                tokio::select! {
                    () = stale.notified() => {}
                    () = tokio::time::sleep(MAX_WATCHED_AGE + Duration::from_millis(10)) => {}
                }
            }
        });
    }

    /// Creates or updates this agent's Node object: labels from `--node-labels` are set, other
    /// labels are kept.
    pub async fn register_node(&self) -> Result<()> {
        retrying!("register node", self.try_register_node())
    }

    async fn try_register_node(&self) -> Result<()> {
        let cur = typed::get(self.store.as_ref(), Kind::Node, &self.node.name).await?;
        if cur.is_none() && self.store.mode().is_cluster() {
            return Err(StoreError::Config(format!(
                "node {:?} does not exist in the cluster: --node-name must name this host's Node object",
                self.node.name
            ))
            .into());
        }
        let (mut node, expect) = match cur {
            Some((o, rev)) => (kube_of(o).unwrap_or_default(), Expect::Revision(rev)),
            None => (
                KubeObject {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    metadata: ObjectMeta {
                        name: self.node.name.clone(),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                Expect::Absent,
            ),
        };
        let before = node.metadata.labels.clone();
        node.metadata.labels.extend(self.node.labels.clone());
        if expect != Expect::Absent && before == node.metadata.labels {
            return Ok(());
        }
        let obj = Object::Kube(Kind::Node, node);
        self.store
            .commit(vec![Op::Put {
                kind: Kind::Node,
                key: self.node.name.clone(),
                value: typed::to_stored_value(&obj),
                expect,
            }])
            .await?;
        Ok(())
    }

    /// Commits `ops`, timing the round trip for the metrics.
    async fn commit(
        &self,
        ops: Vec<Op>,
    ) -> std::result::Result<spiderpool_store::Revision, StoreError> {
        let started = std::time::Instant::now();
        let r = self.store.commit(ops).await;
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }

    /// Per pool, from the cached view (nothing is read for it): its name, how many addresses it
    /// has and how many of them are free (not held, not reserved).
    pub async fn pool_space(&self) -> Vec<(String, u64, u64)> {
        let cache = self.state.lock().await;
        let Some(view) = cache.cached() else {
            return Vec::new();
        };
        view.pools
            .iter()
            .filter(|p| view.has_held(&p.name))
            .map(|p| {
                let usable = p.usable();
                let free = usable
                    .difference(view.held(&p.name))
                    .difference(&view.reserved)
                    .len();
                (
                    p.name.clone(),
                    p.total_ip_count(),
                    u64::try_from(free).unwrap_or(u64::MAX),
                )
            })
            .collect()
    }

    /// What the datastore counted of its own writes.
    pub fn store_write_counts(&self) -> spiderpool_store::WriteCounts {
        self.store.write_counts()
    }

    /// Whether the datastore answers.
    pub async fn healthy(&self) -> Result<()> {
        Ok(self.store.ping().await?)
    }
}
