//! The allocation service: one ADD, DEL or CHECK at a time per agent. It gathers the facts (pod,
//! namespace, node, pools, reserved addresses, holders), asks the core rules for a plan, and
//! commits the claims together with the pod's endpoint record in one compare-and-swap
//! transaction, retrying a bounded number of times on conflicts with other agents.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use spiderpool_api::agent::{IpConfig, IpamAddArgs, IpamAddResponse, IpamDelArgs, Route};
use spiderpool_api::annotation;
use spiderpool_api::cni::{code, Attachment};
use spiderpool_api::crd::{EndpointInterface, EndpointStatus, RouteSpec, API_VERSION};
use spiderpool_api::{KubeObject, Object, ObjectMeta, SpiderEndpoint, ValidationError};
use spiderpool_core::candidate::{free_at, lowest_free, AllocError, Rejected, Rejection, Spread};
use spiderpool_core::{IpFamily, Labels, Pool, PoolNames, Request};
use spiderpool_store::{typed, Expect, Holder, Kind, Op, Revision, Store, StoreError};
use thiserror::Error;
use tokio::sync::{oneshot, Mutex};

use crate::view::{View, ViewCache, MAX_WATCHED_AGE};

/// How often a transaction is retried after a conflict before the caller is told to try again.
const MAX_ATTEMPTS: u32 = 8;

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
    /// The datastore failed or conflicts did not settle.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// STATUS: ADD cannot be served.
    #[error("{0}")]
    NotReady(String),
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
}

impl ServiceError {
    /// The CNI error code for this failure.
    pub fn cni_code(&self) -> u32 {
        match self {
            ServiceError::Alloc(AllocError::PoolNotFound { .. }) => code::INVALID_NETWORK_CONFIG,
            ServiceError::Alloc(_) => code::NO_ADDRESS,
            ServiceError::Invalid(_) => code::INVALID_NETWORK_CONFIG,
            ServiceError::Store(e) if e.is_retryable() => code::TRY_AGAIN_LATER,
            ServiceError::Store(_) => code::IO_FAILURE,
            ServiceError::NoReservation { .. } => code::UNKNOWN_CONTAINER,
            ServiceError::NotReady(_) => code::PLUGIN_NOT_AVAILABLE,
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
    queue: std::sync::Mutex<Vec<PendingAdd>>,
}

/// An ADD waiting to be served.
struct PendingAdd {
    pod: PodRef,
    args: IpamAddArgs,
    reply: oneshot::Sender<Result<IpamAddResponse>>,
}

/// An ADD ready to commit.
struct Commit {
    ops: Vec<Op>,
    claimed: Vec<(String, IpAddr)>,
    released: Vec<(String, IpAddr)>,
    resp: IpamAddResponse,
    reused: bool,
}

impl Commit {
    fn log(&self, pod: &PodRef) {
        tracing::info!(
            pod = %pod.key(), container_id = %pod.container_id, nic = %pod.nic,
            ips = ?self.resp.ips.iter().map(|i| (&i.address, &i.ip_pool)).collect::<Vec<_>>(),
            reused = self.reused,
            "allocated"
        );
    }
}

/// A pod's Pod object and endpoint record, read ahead for a batch.
type Prefetched = (Option<(Object, Revision)>, Option<(Object, Revision)>);

/// Where an ADD stands before its commit.
enum Prepared {
    /// Already answered (a repeated ADD).
    Done(IpamAddResponse),
    /// Ready to commit.
    Commit(Commit),
    /// Needs its own transactions; leave it out of the batch.
    Alone,
}

/// One address chosen for one family.
struct Pick {
    family: IpFamily,
    pool: Pool,
    pool_revision: Revision,
    ip: IpAddr,
}

/// The addresses chosen for one NIC.
struct Picks {
    picks: Vec<Pick>,
    clean_gateway: bool,
}

/// Who a request is for.
struct PodRef {
    namespace: String,
    name: String,
    container_id: String,
    nic: String,
}

impl PodRef {
    fn new(container_id: &str, nic: &str, namespace: &str, name: &str) -> Result<Self> {
        if container_id.is_empty() {
            return Err(ValidationError::field("containerID", "", "is required").into());
        }
        if nic.is_empty() {
            return Err(ValidationError::field("ifName", "", "is required").into());
        }
        // A runtime that passes no K8S_POD_* args gets one endpoint per container.
        let (namespace, name) = match (namespace, name) {
            (_, "") => ("default".to_string(), container_id.to_string()),
            ("", n) => ("default".to_string(), n.to_string()),
            (ns, n) => (ns.to_string(), n.to_string()),
        };
        Ok(PodRef {
            namespace,
            name,
            container_id: container_id.to_string(),
            nic: nic.to_string(),
        })
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn endpoint_of(o: Object) -> Option<SpiderEndpoint> {
    match o {
        Object::Endpoint(e) => Some(e),
        _ => None,
    }
}

fn kube_of(o: Object) -> Option<KubeObject> {
    match o {
        Object::Kube(_, k) => Some(k),
        _ => None,
    }
}

/// The agent response for the NIC's record.
fn response_of(nic: &EndpointInterface) -> IpamAddResponse {
    let mut ips = Vec::new();
    for (version, addr, pool, gw) in [
        (4, &nic.ipv4, &nic.ipv4_pool, &nic.ipv4_gateway),
        (6, &nic.ipv6, &nic.ipv6_pool, &nic.ipv6_gateway),
    ] {
        if let Some(a) = addr {
            ips.push(IpConfig {
                version,
                address: a.clone(),
                nic: nic.interface.clone(),
                ip_pool: pool.clone().unwrap_or_default(),
                gateway: gw.clone(),
                vlan: nic.vlan,
            });
        }
    }
    let routes = nic
        .routes
        .iter()
        .map(|r| Route {
            if_name: nic.interface.clone(),
            dst: r.dst.clone(),
            gw: r.gw.clone(),
        })
        .collect();
    IpamAddResponse { ips, routes }
}

/// The addresses a NIC record holds, with their pools.
fn held(nic: &EndpointInterface) -> Vec<(String, IpAddr)> {
    [(&nic.ipv4_pool, &nic.ipv4), (&nic.ipv6_pool, &nic.ipv6)]
        .into_iter()
        .filter_map(|(pool, addr)| {
            let ip = addr.as_deref()?.split('/').next()?.parse().ok()?;
            Some((pool.clone()?, ip))
        })
        .collect()
}

fn release_ops(nic: &EndpointInterface) -> Vec<Op> {
    held(nic)
        .into_iter()
        .map(|(pool, ip)| Op::Release {
            pool,
            ip,
            container_id: nic.container_id.clone(),
            nic: nic.interface.clone(),
        })
        .collect()
}

/// An op that writes `ep` back (or deletes it when it holds no NIC), guarded by its revision.
fn endpoint_write(key: String, ep: &SpiderEndpoint, rev: Option<Revision>) -> Op {
    let expect = rev.map_or(Expect::Absent, Expect::Revision);
    if ep.status.current.is_empty() {
        Op::Delete {
            kind: Kind::Endpoint,
            key,
            expect,
        }
    } else {
        Op::Put {
            kind: Kind::Endpoint,
            key,
            value: typed::to_stored_value(&Object::Endpoint(ep.clone())),
            expect,
        }
    }
}

/// Evaluates the attempt (an expression yielding a future of `Result`) until it does not end
/// in a conflict, a bounded number of times, then tells the caller to try again later. (A
/// conflict means another writer moved the datastore on: the next attempt's view has learnt the
/// address that was taken, or is read afresh.) A macro rather than a function taking an async
/// closure, whose futures cannot yet be proven `Send` for the server.
macro_rules! retrying {
    ($what:expr, $attempt:expr) => {{
        let mut n = 0u32;
        loop {
            n += 1;
            match $attempt.await {
                Err(ServiceError::Store(StoreError::Conflict(m))) if n < MAX_ATTEMPTS => {
                    tracing::debug!(attempt = n, conflict = %m, "{}: retrying after a conflict", $what);
                    // Jittered backoff keeps racing agents from colliding in lockstep.
                    let jitter = u64::from(std::process::id() % 7) + u64::from(n);
                    tokio::time::sleep(Duration::from_millis(2u64.pow(n.min(6)) + jitter)).await;
                }
                Err(ServiceError::Store(StoreError::Conflict(m))) => {
                    break Err(StoreError::Unavailable(format!(
                        "{}: gave up after {n} conflicting attempts, last: {m}",
                        $what
                    ))
                    .into());
                }
                other => break other,
            }
        }
    }};
}

impl IpamService {
    /// A service over `store` for the node `node`.
    pub fn new(store: Arc<dyn Store>, node: NodeIdentity) -> Self {
        IpamService {
            state: Mutex::new(ViewCache::following(store.clone())),
            store,
            node,
            queue: std::sync::Mutex::new(Vec::new()),
        }
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

    /// Whether the datastore answers.
    pub async fn healthy(&self) -> Result<()> {
        Ok(self.store.ping().await?)
    }

    /// CNI ADD: the NIC's addresses, the same ones again when repeated.
    pub async fn add(&self, args: &IpamAddArgs) -> Result<IpamAddResponse> {
        let pod = PodRef::new(
            &args.container_id,
            &args.if_name,
            &args.pod_namespace,
            &args.pod_name,
        )?;
        // Group commit: the request joins the queue; whoever holds the lock serves everything
        // queued so far in one transaction, so concurrent ADDs on this agent cost one commit.
        let started = std::time::Instant::now();
        let served = |r: Result<IpamAddResponse>| {
            tracing::debug!(
                elapsed_us = started.elapsed().as_micros() as u64,
                ok = r.is_ok(),
                "ADD served"
            );
            r
        };
        let (tx, mut rx) = oneshot::channel();
        self.queue.lock().expect("queue lock").push(PendingAdd {
            pod,
            args: args.clone(),
            reply: tx,
        });
        let mut cache = self.state.lock().await;
        // Whoever held the lock before may have served this request already; otherwise this
        // request is still queued and this holder serves it along with the others.
        if let Ok(r) = rx.try_recv() {
            return served(r);
        }
        let batch: Vec<PendingAdd> = std::mem::take(&mut *self.queue.lock().expect("queue lock"));
        self.add_batch(batch, &mut cache).await;
        drop(cache);
        served(rx.try_recv().unwrap_or_else(|_| {
            // A holder that was cancelled (its client went away) mid-batch dropped the reply;
            // whatever it committed is recorded, and a retry gets the same answer.
            Err(
                StoreError::Unavailable("the request was abandoned while queued; try again".into())
                    .into(),
            )
        }))
    }

    /// Whether the pod belongs to a StatefulSet that still wants it (ordinal below `replicas`):
    /// such a pod keeps its addresses across sandboxes and re-creations.
    async fn stateful_member(
        &self,
        namespace: &str,
        pod: &str,
        owner_kind: &str,
        owner_name: &str,
    ) -> Result<bool> {
        if owner_kind != "StatefulSet" {
            return Ok(false);
        }
        let Some(ordinal) = pod
            .strip_prefix(owner_name)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|o| o.parse::<i64>().ok())
        else {
            return Ok(false);
        };
        let key = format!("{namespace}/StatefulSet/{owner_name}");
        let replicas = typed::get(self.store.as_ref(), Kind::Workload, &key)
            .await?
            .and_then(|(o, _)| kube_of(o))
            .map(|w| w.replicas());
        Ok(replicas.is_some_and(|r| ordinal < r))
    }

    async fn try_add(
        &self,
        pod: &PodRef,
        args: &IpamAddArgs,
        cache: &mut ViewCache,
    ) -> Result<IpamAddResponse> {
        let prepared = match self.prepare_add(pod, args, cache, false, None).await {
            // A watched view may not have heard yet of a change that makes room (a pool
            // widened, an address released elsewhere): what it refuses is planned again on the
            // view read afresh before the refusal is final.
            Err(ServiceError::Alloc(e)) if cache.watched() => {
                tracing::debug!(error = %e, "refused on the followed view; reading it afresh");
                cache.invalidate();
                self.prepare_add(pod, args, cache, false, None).await?
            }
            other => other?,
        };
        match prepared {
            Prepared::Done(resp) => Ok(resp),
            Prepared::Commit(mut c) => {
                let revision = match self.store.commit(std::mem::take(&mut c.ops)).await {
                    Ok(r) => r,
                    Err(e) => {
                        if matches!(e, StoreError::Conflict(_)) {
                            // The view missed what beat this commit.
                            cache.conflicted(e.taken());
                        }
                        return Err(e.into());
                    }
                };
                cache.committed(revision, &c.claimed, &c.released);
                c.log(pod);
                Ok(c.resp)
            }
            Prepared::Alone => unreachable!("only batches defer"),
        }
    }

    /// Everything of an ADD up to its commit: the ops to commit and the answer to give once
    /// they are in. In a batch (`batched`), work that needs a commit of its own first (a stale
    /// record to release) is deferred with [`Prepared::Alone`].
    async fn prepare_add(
        &self,
        pod: &PodRef,
        args: &IpamAddArgs,
        cache: &mut ViewCache,
        batched: bool,
        prefetched: Option<Prefetched>,
    ) -> Result<Prepared> {
        let store = self.store.as_ref();
        let key = pod.key();
        let (pod_obj, ep_read) = match prefetched {
            Some(p) => p,
            None => {
                let mut both = typed::get_many(
                    store,
                    &[(Kind::Pod, key.clone()), (Kind::Endpoint, key.clone())],
                )
                .await?
                .into_iter();
                (both.next().flatten(), both.next().flatten())
            }
        };
        let pod_obj = pod_obj.and_then(|(o, _)| kube_of(o));
        let uid = [
            args.pod_uid.as_str(),
            pod_obj
                .as_ref()
                .and_then(|p| p.metadata.uid.as_deref())
                .unwrap_or(""),
            pod.container_id.as_str(),
        ]
        .into_iter()
        .find(|s| !s.is_empty())
        .unwrap_or_default()
        .to_string();
        let (pod_labels, annotations, owner) = match &pod_obj {
            Some(p) => (
                p.metadata.labels.clone(),
                p.metadata.annotations.clone(),
                p.metadata
                    .controller()
                    .map(|o| (o.kind.clone(), o.name.clone())),
            ),
            None => Default::default(),
        };
        let (owner_kind, owner_name) = owner.unwrap_or_else(|| ("Pod".into(), pod.name.clone()));
        let member = self
            .stateful_member(&pod.namespace, &pod.name, &owner_kind, &owner_name)
            .await?;

        let mut ep_entry = ep_read.and_then(|(o, rev)| endpoint_of(o).map(|e| (e, rev)));
        // This NIC's record from an earlier sandbox of a StatefulSet member: its addresses are
        // handed over if their pools are still candidates.
        let mut previous = None;
        if let Some((ep, rev)) = &ep_entry {
            if let Some(nic) = ep.status.current.iter().find(|n| n.interface == pod.nic) {
                if nic.container_id == pod.container_id {
                    return Ok(Prepared::Done(response_of(nic)));
                }
            }
            // Otherwise the record belongs to an earlier incarnation of this pod or an earlier
            // sandbox of this NIC: those addresses go back before allocating afresh, except a
            // StatefulSet member's, which wait for their own NIC's ADD.
            let stale: Vec<&EndpointInterface> = if member {
                previous = ep
                    .status
                    .current
                    .iter()
                    .find(|n| n.interface == pod.nic)
                    .cloned();
                Vec::new()
            } else {
                ep.status
                    .current
                    .iter()
                    .filter(|n| ep.status.uid != uid || n.interface == pod.nic)
                    .collect()
            };
            if !stale.is_empty() && batched {
                return Ok(Prepared::Alone);
            }
            if !stale.is_empty() {
                let mut kept = ep.clone();
                kept.status.current.retain(|n| !stale.contains(&n));
                let mut ops: Vec<Op> = stale.iter().flat_map(|n| release_ops(n)).collect();
                ops.push(endpoint_write(key.clone(), &kept, Some(*rev)));
                tracing::info!(pod = %key, released = ?stale.iter().map(|n| &n.interface).collect::<Vec<_>>(), "releasing a stale record");
                let released: Vec<(String, IpAddr)> = stale.iter().flat_map(|n| held(n)).collect();
                let rev = self.store.commit(ops).await?;
                cache.committed(rev, &[], &released);
                ep_entry = typed::get(store, Kind::Endpoint, &key)
                    .await?
                    .and_then(|(o, rev)| endpoint_of(o).map(|e| (e, rev)));
            }
        }

        for unsupported in [annotation::SUBNET, annotation::SUBNETS] {
            if annotations.contains_key(unsupported) {
                return Err(ValidationError::Invalid(format!(
                    "pod {key}: annotation {unsupported} (SpiderSubnet auto pools) is not supported by this version; \
                     name the pools with {} or {}",
                    annotation::IPPOOL,
                    annotation::IPPOOLS
                ))
                .into());
            }
        }
        let in_pod = |e: ValidationError| ValidationError::Invalid(format!("pod {key}: {e}"));
        let pod_ippools = annotations
            .get(annotation::IPPOOLS)
            .map(|v| annotation::parse_ippools(v, &pod.nic))
            .transpose()
            .map_err(in_pod)?;
        let pod_ippool = annotations
            .get(annotation::IPPOOL)
            .map(|v| annotation::parse_ippool(v))
            .transpose()
            .map_err(in_pod)?;
        let custom_routes = annotations
            .get(annotation::ROUTES)
            .map(|v| annotation::parse_routes(v))
            .transpose()
            .map_err(in_pod)?
            .unwrap_or_default();
        let multus_network =
            annotation::multus_network(&annotations, &pod.namespace, &pod.nic).map_err(in_pod)?;

        let contended = cache.contended();
        // A batch works on one view from start to commit, so its members' picks all stand.
        let view = if batched {
            cache.pinned(store).await?
        } else {
            cache.current(store).await?
        };
        let (namespace_labels, namespace_annotations) =
            view.namespace(store, &pod.namespace).await?;
        let namespace_default = annotation::parse_namespace_default(
            namespace_annotations
                .get(annotation::NS_DEFAULT_IPV4)
                .map(String::as_str),
            namespace_annotations
                .get(annotation::NS_DEFAULT_IPV6)
                .map(String::as_str),
        )
        .map_err(|e| ValidationError::Invalid(format!("namespace {}: {e}", pod.namespace)))?;
        let node_labels = view
            .node_labels(store, &self.node.name)
            .await?
            .unwrap_or_else(|| self.node.labels.clone());

        let req = Request {
            nic: pod.nic.clone(),
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            pod_labels,
            node: self.node.name.clone(),
            node_labels,
            namespace_labels,
            pod_ippools,
            pod_ippool,
            namespace_default,
            multus_network,
            cni_default: PoolNames {
                v4: args.default_ipv4_ippool.clone(),
                v6: args.default_ipv6_ippool.clone(),
                clean_gateway: None,
            },
            cni_clean_gateway: args.clean_gateway,
        };
        let spread = contended.then(|| view.spread(&self.node.name));
        let pools = std::mem::take(&mut view.pools);
        let planned = self
            .plan_claims(&req, &pools, view, &key, previous.as_ref(), spread)
            .await;
        view.pools = pools;
        let picks = planned?;

        let holder = Holder {
            pod: key.clone(),
            pod_uid: uid.clone(),
            container_id: pod.container_id.clone(),
            nic: pod.nic.clone(),
            node: self.node.name.clone(),
        };
        let mut nic = EndpointInterface {
            interface: pod.nic.clone(),
            container_id: pod.container_id.clone(),
            network: Some(args.network.clone()).filter(|n| !n.is_empty()),
            ..Default::default()
        };
        // The previous sandbox's addresses are released first; reused ones are claimed again
        // for the new holder in the same transaction.
        let mut ops = previous.as_ref().map(release_ops).unwrap_or_default();
        let released = previous.as_ref().map(held).unwrap_or_default();
        let mut claimed = Vec::new();
        // With a default-route NIC named, the other NICs get no default route.
        let clean_gateway = picks.clean_gateway
            || annotations
                .get(annotation::DEFAULT_ROUTE_NIC)
                .is_some_and(|n| n.trim() != pod.nic);
        for Pick {
            family,
            pool,
            pool_revision,
            ip,
        } in &picks.picks
        {
            let (family, ip) = (*family, *ip);
            ops.push(Op::Claim {
                pool: pool.name.clone(),
                ip,
                holder: holder.clone(),
                pool_revision: *pool_revision,
            });
            claimed.push((pool.name.clone(), ip));
            let address = Some(format!("{ip}/{}", pool.subnet.prefix_len()));
            let gateway = pool.gateway.map(|g| g.to_string());
            match family {
                IpFamily::V4 => {
                    (nic.ipv4, nic.ipv4_pool, nic.ipv4_gateway) =
                        (address, Some(pool.name.clone()), gateway);
                }
                IpFamily::V6 => {
                    (nic.ipv6, nic.ipv6_pool, nic.ipv6_gateway) =
                        (address, Some(pool.name.clone()), gateway);
                }
            }
            nic.vlan = nic.vlan.or(pool.vlan);
            if let (Some(gw), false) = (pool.gateway, clean_gateway) {
                nic.routes.push(RouteSpec {
                    dst: match family {
                        IpFamily::V4 => "0.0.0.0/0".into(),
                        IpFamily::V6 => "::/0".into(),
                    },
                    gw: gw.to_string(),
                });
            }
            nic.routes.extend(pool.routes.iter().map(|r| RouteSpec {
                dst: r.dst.to_string(),
                gw: r.gw.to_string(),
            }));
            // Custom routes go to the NIC whose subnet holds their gateway.
            nic.routes.extend(
                custom_routes
                    .iter()
                    .filter(|r| pool.subnet.contains(&r.gw))
                    .map(|r| RouteSpec {
                        dst: r.dst.to_string(),
                        gw: r.gw.to_string(),
                    }),
            );
        }

        let (mut ep, rev) = match ep_entry {
            Some((e, rev)) => (e, Some(rev)),
            None => (
                SpiderEndpoint {
                    api_version: API_VERSION.into(),
                    kind: "SpiderEndpoint".into(),
                    metadata: ObjectMeta {
                        name: pod.name.clone(),
                        namespace: Some(pod.namespace.clone()),
                        ..Default::default()
                    },
                    status: EndpointStatus::default(),
                },
                None,
            ),
        };
        ep.status.uid = uid;
        ep.status.node = self.node.name.clone();
        (
            ep.status.owner_controller_type,
            ep.status.owner_controller_name,
        ) = (owner_kind, owner_name);
        ep.status.current.retain(|n| n.interface != pod.nic);
        ep.status.current.push(nic.clone());
        ops.push(endpoint_write(key.clone(), &ep, rev));
        Ok(Prepared::Commit(Commit {
            ops,
            claimed,
            released,
            resp: response_of(&nic),
            reused: previous.is_some(),
        }))
    }

    /// Serves a batch of queued ADDs: their claims and endpoint records go into one
    /// transaction (addresses picked one after the other on the same view, so they differ).
    /// When that transaction loses a race, each request is retried on its own.
    async fn add_batch(&self, batch: Vec<PendingAdd>, cache: &mut ViewCache) {
        let mut pending = batch;
        let mut alone = Vec::new();
        let max_ops = self.store.max_ops();
        // A batch that loses a race is prepared again on a fresh view: each round some agent's
        // batch wins whole, so rounds are few even when every agent contends. A batch larger
        // than one transaction may hold continues in the next round.
        let mut attempt = 0;
        while pending.len() > 1 && attempt < MAX_ATTEMPTS {
            // Start each round on the current state.
            if let Err(e) = cache.current(self.store.as_ref()).await {
                let msg = e.to_string();
                for p in pending.drain(..) {
                    let _ = p
                        .reply
                        .send(Err(StoreError::Unavailable(msg.clone()).into()));
                }
                break;
            }
            // The pod and endpoint of every member, read in one round trip.
            let round = std::time::Instant::now();
            let keys: Vec<(Kind, String)> = pending
                .iter()
                .flat_map(|p| [(Kind::Pod, p.pod.key()), (Kind::Endpoint, p.pod.key())])
                .collect();
            let mut prefetched: HashMap<String, Prefetched> =
                match typed::get_many(self.store.as_ref(), &keys).await {
                    Ok(read) => {
                        let mut it = read.into_iter();
                        pending
                            .iter()
                            .map(|p| (p.pod.key(), (it.next().flatten(), it.next().flatten())))
                            .collect()
                    }
                    Err(_) => HashMap::new(), // each member reads for itself
                };
            let read_us = round.elapsed().as_micros() as u64;
            let mut staged: Vec<(PendingAdd, Commit)> = Vec::new();
            let mut staged_ops = 0;
            let mut next = Vec::new();
            let mut endpoints = HashSet::new();
            for p in std::mem::take(&mut pending) {
                if staged_ops >= max_ops / 2 {
                    next.push(p);
                    continue;
                }
                if !endpoints.insert(p.pod.key()) {
                    alone.push(p); // one endpoint record per transaction
                    continue;
                }
                let pre = prefetched.remove(&p.pod.key());
                match self.prepare_add(&p.pod, &p.args, cache, true, pre).await {
                    Ok(Prepared::Done(resp)) => {
                        let _ = p.reply.send(Ok(resp));
                    }
                    Ok(Prepared::Commit(c)) if staged_ops + c.ops.len() > max_ops => next.push(p),
                    Ok(Prepared::Commit(c)) => {
                        staged_ops += c.ops.len();
                        cache.stage(&c.claimed, &c.released);
                        staged.push((p, c));
                    }
                    // Refusals on a followed view are made final on its own, on a fresh view
                    // (see try_add).
                    Ok(Prepared::Alone) | Err(ServiceError::Store(StoreError::Conflict(_))) => {
                        alone.push(p)
                    }
                    Err(ServiceError::Alloc(_)) if cache.watched() => alone.push(p),
                    Err(e) => {
                        let _ = p.reply.send(Err(e));
                    }
                }
            }
            pending = next;
            if staged.is_empty() {
                break; // what is left (if anything) goes one by one below
            }
            let ops: Vec<Op> = staged
                .iter()
                .flat_map(|(_, c)| c.ops.iter().cloned())
                .collect();
            let prepared_us = round.elapsed().as_micros() as u64;
            match self.store.commit(ops).await {
                Ok(revision) => {
                    cache.staged_committed(revision);
                    tracing::debug!(
                        requests = staged.len(),
                        read_us,
                        prepared_us,
                        committed_us = round.elapsed().as_micros() as u64,
                        "committed a batch"
                    );
                    for (p, c) in staged {
                        c.log(&p.pod);
                        let _ = p.reply.send(Ok(c.resp));
                    }
                }
                Err(e @ StoreError::Conflict(_)) => {
                    attempt += 1;
                    cache.conflicted(e.taken());
                    tracing::debug!(attempt, requests = staged.len(), conflict = %e, "batch: retrying after a conflict");
                    pending.extend(staged.into_iter().map(|(p, _)| p));
                    let jitter = u64::from(std::process::id() % 7) + u64::from(attempt);
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt) + jitter)).await;
                }
                Err(e) => {
                    cache.invalidate();
                    let msg = e.to_string();
                    for (p, _) in staged {
                        let _ = p
                            .reply
                            .send(Err(StoreError::Unavailable(msg.clone()).into()));
                    }
                }
            }
        }
        for p in pending.into_iter().chain(alone) {
            let r = retrying!("allocate", self.try_add(&p.pod, &p.args, cache));
            let _ = p.reply.send(r);
        }
    }

    /// The plan for the request and, per family, the address to claim: the previous
    /// sandbox's address when its pool is still a candidate, else the first candidate's lowest
    /// free address.
    async fn plan_claims(
        &self,
        req: &Request,
        pools: &[Pool],
        view: &mut View,
        pod: &str,
        previous: Option<&EndpointInterface>,
        spread: Option<Spread>,
    ) -> Result<Picks> {
        let plan = req.plan(pools)?;
        let kept: Vec<(String, IpAddr)> = previous.map(held).unwrap_or_default();
        let mut picks = Vec::new();
        for fp in &plan.families {
            let reuse = kept.iter().find(|(pool, ip)| {
                IpFamily::of(ip) == fp.family && fp.pools.iter().any(|p| &p.name == pool)
            });
            if let Some((pool_name, ip)) = reuse {
                let pool = fp
                    .pools
                    .iter()
                    .find(|p| &p.name == pool_name)
                    .expect("found above");
                picks.push(Pick {
                    family: fp.family,
                    pool_revision: view.pool_revs[&pool.name],
                    pool: (*pool).clone(),
                    ip: *ip,
                });
                continue;
            }
            let mut rejected = Vec::new();
            let mut found = None;
            for pool in &fp.pools {
                view.load_held(self.store.as_ref(), &pool.name).await?;
                let in_use = view.held(&pool.name);
                if let Some(ip) = free_at(pool, &view.reserved, in_use, spread) {
                    found = Some(((*pool).clone(), ip));
                    break;
                }
                rejected.push(Rejected {
                    pool: pool.name.clone(),
                    reason: Rejection::Exhausted {
                        used: u64::try_from(
                            pool.usable()
                                .intersection(&in_use.union(&view.reserved))
                                .len(),
                        )
                        .unwrap_or(u64::MAX),
                        total: pool.total_ip_count(),
                    },
                });
            }
            let Some((pool, ip)) = found else {
                return Err(AllocError::Exhausted {
                    family: fp.family,
                    pod: pod.to_string(),
                    rejected,
                }
                .into());
            };
            picks.push(Pick {
                family: fp.family,
                pool_revision: view.pool_revs[&pool.name],
                pool,
                ip,
            });
        }
        Ok(Picks {
            picks,
            clean_gateway: plan.clean_gateway,
        })
    }

    /// CNI DEL: releases what the container holds on the NIC; succeeds when there is nothing.
    pub async fn del(&self, args: &IpamDelArgs) -> Result<()> {
        let pod = PodRef::new(
            &args.container_id,
            &args.if_name,
            &args.pod_namespace,
            &args.pod_name,
        )?;
        let mut cache = self.state.lock().await;
        retrying!("release", self.try_del(&pod, &mut cache))
    }

    async fn try_del(&self, pod: &PodRef, cache: &mut ViewCache) -> Result<()> {
        let key = pod.key();
        let Some((ep, rev)) = typed::get(self.store.as_ref(), Kind::Endpoint, &key)
            .await?
            .and_then(|(o, rev)| endpoint_of(o).map(|e| (e, rev)))
        else {
            tracing::info!(pod = %key, nic = %pod.nic, "nothing to release");
            return Ok(());
        };
        let Some(nic) = ep
            .status
            .current
            .iter()
            .find(|n| n.interface == pod.nic && n.container_id == pod.container_id)
        else {
            tracing::info!(pod = %key, nic = %pod.nic, container_id = %pod.container_id, "nothing held by this container");
            return Ok(());
        };
        if self
            .stateful_member(
                &pod.namespace,
                &pod.name,
                &ep.status.owner_controller_type,
                &ep.status.owner_controller_name,
            )
            .await?
        {
            tracing::info!(pod = %key, nic = %pod.nic, statefulset = %ep.status.owner_controller_name,
                "keeping the addresses of a StatefulSet member for its next sandbox");
            return Ok(());
        }
        let mut ops = release_ops(nic);
        let mut kept = ep.clone();
        kept.status.current.retain(|n| n.interface != pod.nic);
        ops.push(endpoint_write(key.clone(), &kept, Some(rev)));
        let revision = self.store.commit(ops).await?;
        cache.committed(revision, &[], &held(nic));
        tracing::info!(pod = %key, nic = %pod.nic, released = ?held(nic), "released");
        Ok(())
    }

    /// CNI CHECK: the container's reservation for the NIC.
    pub async fn check(&self, args: &IpamDelArgs) -> Result<IpamAddResponse> {
        let pod = PodRef::new(
            &args.container_id,
            &args.if_name,
            &args.pod_namespace,
            &args.pod_name,
        )?;
        let key = pod.key();
        let ep = typed::get(self.store.as_ref(), Kind::Endpoint, &key)
            .await?
            .and_then(|(o, _)| endpoint_of(o));
        let nic = ep.as_ref().and_then(|e| {
            e.status
                .current
                .iter()
                .find(|n| n.interface == pod.nic && n.container_id == pod.container_id)
        });
        let Some(nic) = nic else {
            return Err(ServiceError::NoReservation {
                container_id: pod.container_id.clone(),
                nic: pod.nic.clone(),
                pod: key,
            });
        };
        // The record must still be backed by the pools' holders.
        for (pool, ip) in held(nic) {
            let allocs = self.store.allocations(&pool).await?;
            let ok = allocs.iter().any(|a| {
                a.ip == ip && a.holder.container_id == pod.container_id && a.holder.nic == pod.nic
            });
            if !ok {
                return Err(ServiceError::NoReservation {
                    container_id: pod.container_id.clone(),
                    nic: format!("{} ({ip} of pool {pool} is no longer held by it)", pod.nic),
                    pod: key,
                });
            }
        }
        Ok(response_of(nic))
    }

    /// CNI GC: releases every reservation of `network` on this node whose (container,
    /// interface) is not in `valid`, except a StatefulSet member's. Keeps going after errors
    /// and reports them all.
    pub async fn gc(&self, network: &str, valid: &[Attachment]) -> Result<Vec<String>> {
        let mut cache = self.state.lock().await;
        let store = self.store.as_ref();
        let valid: HashSet<(&str, &str)> = valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        let mut released = Vec::new();
        let mut errors = Vec::new();
        for (o, rev) in typed::list(store, Kind::Endpoint).await? {
            let Some(ep) = endpoint_of(o) else { continue };
            if ep.status.node != self.node.name {
                continue;
            }
            let ns = ep.metadata.namespace.clone().unwrap_or_default();
            let key = format!("{ns}/{}", ep.metadata.name);
            let (stale, kept): (Vec<EndpointInterface>, Vec<EndpointInterface>) =
                ep.status.current.iter().cloned().partition(|n| {
                    n.network.as_deref().is_none_or(|net| net == network)
                        && !valid.contains(&(n.container_id.as_str(), n.interface.as_str()))
                });
            if stale.is_empty() {
                continue;
            }
            match self
                .stateful_member(
                    &ns,
                    &ep.metadata.name,
                    &ep.status.owner_controller_type,
                    &ep.status.owner_controller_name,
                )
                .await
            {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    errors.push(format!("{key}: {e}"));
                    continue;
                }
            }
            let mut ops: Vec<Op> = stale.iter().flat_map(release_ops).collect();
            let mut rest = ep.clone();
            rest.status.current = kept;
            ops.push(endpoint_write(key.clone(), &rest, Some(rev)));
            let freed: Vec<(String, IpAddr)> = stale.iter().flat_map(held).collect();
            match self.store.commit(ops).await {
                Ok(r) => {
                    cache.committed(r, &[], &freed);
                    for n in &stale {
                        for (pool, ip) in held(n) {
                            released.push(format!("{key} {} {ip} ({pool})", n.interface));
                        }
                    }
                }
                Err(e) => {
                    cache.invalidate();
                    errors.push(format!("{key}: {e}"));
                }
            }
        }
        tracing::info!(network, released = ?released, errors = ?errors, "garbage collected");
        if errors.is_empty() {
            Ok(released)
        } else {
            Err(StoreError::Unavailable(format!(
                "GC released {} reservations but failed for: {}",
                released.len(),
                errors.join("; ")
            ))
            .into())
        }
    }

    /// CNI STATUS: whether an ADD could get an address: the datastore answers and one of the
    /// candidate pools (the given CNI defaults, or every pool) has a free address.
    pub async fn status(&self, v4: &[String], v6: &[String]) -> Result<()> {
        let mut cache = self.state.lock().await;
        let store = self.store.as_ref();
        // As for ADD: a followed view that finds no free address is read afresh before the
        // answer is "not ready".
        for afresh in [false, true] {
            if afresh {
                cache.invalidate();
            }
            let view = cache.current(store).await.map_err(|e| {
                ServiceError::NotReady(format!("the datastore does not answer: {e}"))
            })?;
            let pools = std::mem::take(&mut view.pools);
            let r = self.any_free(&pools, view, v4, v6).await;
            view.pools = pools;
            if r.is_ok() || afresh || !cache.watched() {
                return r;
            }
        }
        unreachable!("the second pass returns")
    }

    async fn any_free(
        &self,
        pools: &[Pool],
        view: &mut View,
        v4: &[String],
        v6: &[String],
    ) -> Result<()> {
        let mut names = Vec::new();
        if v4.is_empty() && v6.is_empty() {
            names.extend(pools.iter().map(|p| p.name.clone()));
        } else {
            for (family, list) in [(IpFamily::V4, v4), (IpFamily::V6, v6)] {
                names.extend(spiderpool_core::candidate::expand_wildcards(
                    list, pools, family,
                )?);
            }
        }
        let mut why = Vec::new();
        for name in &names {
            let Some(pool) = pools.iter().find(|p| &p.name == name) else {
                why.push(format!("{name}: does not exist"));
                continue;
            };
            if pool.disable || pool.terminating {
                why.push(format!("{name}: disabled or terminating"));
                continue;
            }
            view.load_held(self.store.as_ref(), name).await?;
            if lowest_free(pool, &view.reserved, view.held(name)).is_some() {
                return Ok(());
            }
            why.push(format!("{name}: exhausted"));
        }
        if names.is_empty() {
            why.push("no SpiderIPPool exists".into());
        }
        Err(ServiceError::NotReady(format!(
            "no IPPool can serve ADD: {}",
            why.join("; ")
        )))
    }
}
