//! ADD: from a request to the ops that claim its addresses and write its endpoint record;
//! a repeated ADD gets the same answer, a StatefulSet member its previous addresses.

use std::net::IpAddr;

use spiderpool_api::agent::{IpamAddArgs, IpamAddResponse};
use spiderpool_api::annotation;
use spiderpool_api::crd::{EndpointInterface, EndpointStatus, RouteSpec, API_VERSION};
use spiderpool_api::{Object, ObjectMeta, SpiderEndpoint, ValidationError};
use spiderpool_control::autopool;
use spiderpool_core::candidate::AllocError;
use spiderpool_core::{IpFamily, PoolNames};
use spiderpool_store::{typed, Holder, Kind, Op, Revision, StoreError};
use tokio::sync::oneshot;

use super::*;
use crate::view::{RecordBook, ViewCache};

/// An ADD ready to commit.
pub(super) struct Commit {
    pub(super) ops: Vec<Op>,
    pub(super) claimed: Vec<(String, IpAddr)>,
    pub(super) released: Vec<(String, IpAddr)>,
    pub(super) resp: IpamAddResponse,
    pub(super) reused: bool,
    /// The endpoint record written (its key) and what it holds once committed.
    pub(super) record: (String, Vec<(String, IpAddr)>),
}

impl Commit {
    pub(super) fn log(&self, pod: &PodRef) {
        tracing::info!(
            pod = %pod.key(), container_id = %pod.container_id, nic = %pod.nic,
            ips = ?self.resp.ips.iter().map(|i| (&i.address, &i.ip_pool)).collect::<Vec<_>>(),
            reused = self.reused,
            "allocated"
        );
    }

    /// The commit is in: the book of records learns this record before its watch tells it (a
    /// second NIC's ADD, right after, then reads the record instead of taking it for absent).
    pub(super) fn recorded(&self, book: Option<&RecordBook>) {
        if let Some(book) = book {
            book.correct(&self.record.0, self.record.1.clone());
        }
    }
}

/// A pod's Pod object and endpoint record, read ahead for a batch.
pub(super) type Prefetched = (Option<(Object, Revision)>, Option<(Object, Revision)>);

/// Where an ADD stands before its commit.
pub(super) enum Prepared {
    /// Already answered (a repeated ADD).
    Done(IpamAddResponse),
    /// Ready to commit.
    Commit(Commit),
    /// Needs its own transactions; leave it out of the batch.
    Alone,
}

impl IpamService {
    /// CNI ADD: the NIC's addresses, the same ones again when repeated. A pod whose auto pool
    /// the reconciler has not created or grown yet waits for it (outside the agent's lock), up
    /// to `--auto-pool-wait`.
    pub async fn add(&self, args: &IpamAddArgs) -> Result<IpamAddResponse> {
        let wait = self.auto_pool_wait.unwrap_or_default();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let r = match self.add_once(args).await {
                // An auto pool this agent's view has not heard of yet.
                Err(ServiceError::Alloc(
                    e @ AllocError::PoolNotFound {
                        named_by: spiderpool_core::Source::AutoPool,
                        ..
                    },
                )) => Err(ServiceError::AutoPoolNotReady(e.to_string())),
                other => other,
            };
            match r {
                Err(ServiceError::AutoPoolNotReady(m)) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ServiceError::AutoPoolNotReady(format!(
                            "{m} (waited {}s for the controller to create or grow it; try again later)",
                            wait.as_secs()
                        )));
                    }
                    tracing::debug!(reason = %m, "ADD waits for its auto pool");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    }

    async fn add_once(&self, args: &IpamAddArgs) -> Result<IpamAddResponse> {
        let pod = PodRef::of_add(args)?;
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
        // The pod's object and record are read before queueing: while the batch ahead of it
        // commits, not in its own batch's time. (A read that fails is made again there.)
        let prefetched = self.read_ahead(&pod.key(), &args.pod_uid).await.ok();
        let (tx, mut rx) = oneshot::channel();
        self.queue.lock().expect("queue lock").push(PendingAdd {
            pod,
            args: args.clone(),
            reply: tx,
            prefetched,
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
            // A holder cancelled mid-batch dropped the reply; whatever it committed is
            // recorded, and a retry gets the same answer. (The server runs each request in a
            // task of its own, so a client that goes away cancels nothing.)
            Err(
                StoreError::Unavailable("the request was abandoned while queued; try again".into())
                    .into(),
            )
        }))
    }

    pub(super) async fn try_add(
        &self,
        pod: &PodRef,
        args: &IpamAddArgs,
        cache: &mut ViewCache,
    ) -> Result<IpamAddResponse> {
        let started = std::time::Instant::now();
        let prepared = match self.prepare_add(pod, args, cache, false, None).await {
            // A watched view may not have heard yet of a change that makes room (a pool
            // widened, an address released elsewhere): what it refuses is planned again on the
            // view read afresh before the refusal is final.
            Err(ServiceError::Alloc(e)) if self.refusal_may_lift(cache) => {
                tracing::debug!(error = %e, "refused on the followed view; reading it afresh");
                // What this agent's DELs held back may be the room it needs.
                self.flush_releases(cache).await;
                cache.invalidate();
                self.prepare_add(pod, args, cache, false, None).await?
            }
            other => other?,
        };
        match prepared {
            Prepared::Done(resp) => Ok(resp),
            Prepared::Commit(mut c) => {
                let (committed, raced) = self
                    .counting_conflicts(self.commit(std::mem::take(&mut c.ops)))
                    .await;
                let revision = match committed {
                    Ok(r) => {
                        if raced > 0 {
                            cache.raced(started.elapsed());
                        }
                        r
                    }
                    Err(e) => {
                        if matches!(e, StoreError::Conflict(_)) {
                            // The view missed what beat this commit.
                            cache.conflicted(e.taken(), started.elapsed());
                        }
                        return Err(e.into());
                    }
                };
                cache.committed(revision, &c.claimed, &c.released);
                c.recorded(self.records.as_deref());
                self.metrics.batch_size.observe(1.0);
                c.log(pod);
                Ok(c.resp)
            }
            Prepared::Alone => unreachable!("only batches defer"),
        }
    }

    /// Everything of an ADD up to its commit: the ops to commit and the answer to give once
    /// they are in. In a batch (`batched`), work that needs a commit of its own first (a stale
    /// record to release) is deferred with [`Prepared::Alone`].
    pub(super) async fn prepare_add(
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
            None => read_pod_and_record(store, &key).await?,
        };
        let pod_obj = pod_obj.and_then(|(o, _)| kube_of(o));
        let object_uid = pod_obj
            .as_ref()
            .and_then(|p| p.metadata.uid.as_deref())
            .filter(|u| !u.is_empty());
        // The stored Pod object says which incarnation of the pod is live when it names the
        // request's UID: then any other incarnation's record is stale.
        let confirmed_live = object_uid.is_some_and(|u| u == args.pod_uid);
        let uid = match (args.pod_uid.as_str(), object_uid) {
            ("", Some(u)) => u.to_string(),
            ("", None) if pod.bare => pod.container_id.clone(),
            (arg, _) => arg.to_string(),
        };
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
        // A KubeVirt VM's launcher pods hold its addresses under its VirtualMachineInstance's
        // name, as upstream's: a restart (a new pod, another UID) and a live migration (a
        // second pod on another node) find them there while the VM lives.
        let vm_pod;
        let (pod, key, ep_read) = match self.vm_pod_of(pod, pod_obj.as_ref()) {
            Some(v) => {
                vm_pod = v;
                let key = vm_pod.key();
                let ep = typed::get(store, Kind::Endpoint, &key).await?;
                (&vm_pod, key, ep)
            }
            None => (pod, key, ep_read),
        };
        let member = self
            .stateful_member(&pod.namespace, &pod.name, &owner_kind, &owner_name)
            .await?;

        let mut ep_entry = ep_read.and_then(|(o, rev)| endpoint_of(o).map(|e| (e, rev)));
        // This NIC's record from an earlier sandbox of a StatefulSet member: its addresses are
        // handed over if their pools are still candidates.
        let mut previous = None;
        let mut previous_uid = String::new();
        if let Some((ep, rev)) = &ep_entry {
            if let Some(nic) = ep
                .status
                .current
                .ips
                .iter()
                .find(|n| n.interface == pod.nic)
            {
                if nic.container_id == pod.container_id {
                    return Ok(Prepared::Done(response_of(nic)));
                }
            }
            // Otherwise the record belongs to an earlier incarnation of this pod or an earlier
            // sandbox of this NIC: those addresses go back before allocating afresh, except a
            // StatefulSet member's, which wait for their own NIC's ADD. Another incarnation's
            // addresses are only taken back when the Pod object says this one is live.
            let holder_uid = record_uid(ep);
            let other_incarnation = holder_uid.is_some_and(|h| h != uid);
            if other_incarnation && !member && !confirmed_live {
                return Err(ServiceError::InUse {
                    pod: key,
                    uid,
                    holder_uid: holder_uid.unwrap_or_default().to_string(),
                    detail: ep
                        .status
                        .current
                        .ips
                        .iter()
                        .map(|n| {
                            format!(
                                "{} of container {} on node {}",
                                n.interface, n.container_id, ep.status.current.node
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            let stale: Vec<&EndpointInterface> = if member {
                previous_uid = ep.status.current.uid.clone();
                previous = ep
                    .status
                    .current
                    .ips
                    .iter()
                    .find(|n| n.interface == pod.nic)
                    .cloned();
                Vec::new()
            } else {
                ep.status
                    .current
                    .ips
                    .iter()
                    .filter(|n| other_incarnation || n.interface == pod.nic)
                    .collect()
            };
            if !stale.is_empty() && batched {
                return Ok(Prepared::Alone);
            }
            if !stale.is_empty() {
                let mut kept = ep.clone();
                kept.status.current.ips.retain(|n| !stale.contains(&n));
                let mut ops: Vec<Op> = stale
                    .iter()
                    .flat_map(|n| Op::releases_of(n, &ep.status.current.uid))
                    .collect();
                ops.push(endpoint_write(key.clone(), &kept, Some(*rev)));
                tracing::info!(pod = %key, released = ?stale.iter().map(|n| &n.interface).collect::<Vec<_>>(), "releasing a stale record");
                let released: Vec<(String, IpAddr)> = stale.iter().flat_map(|n| n.held()).collect();
                let rev = self.commit(ops).await?;
                cache.committed(rev, &[], &released);
                ep_entry = typed::get(store, Kind::Endpoint, &key)
                    .await?
                    .and_then(|(o, rev)| endpoint_of(o).map(|e| (e, rev)));
            }
        }

        let custom_routes = annotations
            .get(spiderpool_api::keys::ROUTES)
            .map(|v| annotation::parse_routes(v))
            .transpose()
            .map_err(|e| ValidationError::Invalid(format!("pod {key}: {e}")))?
            .unwrap_or_default();

        let contended = cache.contended();
        let records = cache.records();
        // A batch works on one view from start to commit, so its members' picks all stand.
        let view = if batched {
            cache.pinned(store).await?
        } else {
            cache.current(store).await?
        };
        if let Some(book) = &records {
            book.refresh(store, view.revision()).await?;
        }
        let (namespace_labels, namespace_annotations) =
            view.namespace(store, &pod.namespace).await?;
        let node_labels = view
            .node_labels(store, &self.node.name)
            .await?
            .unwrap_or_else(|| self.node.labels.clone());
        // The auto pools of the pod's application; and the application's pod-affinity labels
        // whenever an auto pool could be a candidate (they bind auto pools to it).
        let (auto_pools, app_labels) = match &pod_obj {
            Some(p)
                if self.auto_pool_wait.is_none()
                    && (annotations.contains_key(spiderpool_api::keys::SUBNET)
                        || annotations.contains_key(spiderpool_api::keys::SUBNETS)) =>
            {
                return Err(ValidationError::Invalid(format!(
                    "pod {key}: it's invalid to use '{}' or '{}' annotation when Auto-Pool feature is disabled (--enable-auto-pool=false)",
                    spiderpool_api::keys::SUBNETS,
                    spiderpool_api::keys::SUBNET
                ))
                .into());
            }
            Some(p) => {
                let auto_pools =
                    autopool::pod_pools(store, p, &pod.nic)
                        .await
                        .map_err(|e| match e {
                            autopool::PodPoolsError::NotReady(m) => {
                                ServiceError::AutoPoolNotReady(m)
                            }
                            autopool::PodPoolsError::Invalid(e) => ServiceError::Invalid(e),
                            autopool::PodPoolsError::Store(e) => ServiceError::Store(e),
                            other => {
                                ServiceError::Invalid(ValidationError::Invalid(other.to_string()))
                            }
                        })?;
                let any_auto = view.pools.iter().any(|p| {
                    p.pod_affinity.as_ref().is_some_and(|a| {
                        a.match_labels.contains_key(spiderpool_api::keys::APP_NAME)
                    })
                });
                let app_labels = if any_auto {
                    autopool::top_controller(store, p)
                        .await?
                        .map(|a| a.affinity_labels())
                } else {
                    None
                };
                (auto_pools, app_labels)
            }
            None => (None, None),
        };
        let req = annotation::request(annotation::RequestFacts {
            namespace: &pod.namespace,
            pod: &pod.name,
            nic: &pod.nic,
            annotations: &annotations,
            labels: pod_labels,
            namespace_labels,
            namespace_annotations: &namespace_annotations,
            node: &self.node.name,
            node_labels,
            cni_default: PoolNames {
                v4: args.default_ipv4_ippool.clone(),
                v6: args.default_ipv6_ippool.clone(),
                clean_gateway: None,
            },
            cni_clean_gateway: args.clean_gateway,
            multus: &self.multus,
            auto_pools,
            app_labels,
        })?;
        let spread = contended.then(|| view.spread(&self.node.name));
        let pools = std::mem::take(&mut view.pools);
        let planned = self
            .plan_claims(
                &req,
                &pools,
                view,
                (&key, previous.as_ref()),
                spread,
                records.as_deref(),
            )
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
        let mut ops = previous
            .as_ref()
            .map(|n| Op::releases_of(n, &previous_uid))
            .unwrap_or_default();
        let released = previous
            .as_ref()
            .map(EndpointInterface::held)
            .unwrap_or_default();
        let mut claimed = Vec::new();
        // With a default-route NIC named, the other NICs get no default route.
        let clean_gateway = picks.clean_gateway
            || annotations
                .get(spiderpool_api::keys::DEFAULT_ROUTE_NIC)
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
            if pool.gateway.is_some() {
                nic.clean_gateway = Some(clean_gateway);
            }
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
        ep.status.current.uid = uid;
        ep.status.current.node = self.node.name.clone();
        (
            ep.status.owner_controller_type,
            ep.status.owner_controller_name,
        ) = (owner_kind, owner_name);
        ep.status.current.ips.retain(|n| n.interface != pod.nic);
        ep.status.current.ips.push(nic.clone());
        ops.push(endpoint_write(key.clone(), &ep, rev));
        Ok(Prepared::Commit(Commit {
            ops,
            claimed,
            released,
            resp: response_of(&nic),
            reused: previous.is_some(),
            record: (key, ep.held()),
        }))
    }
}

impl IpamService {
    /// The pod's Pod object and endpoint record (`key` names both) for an ADD about to queue,
    /// for the pod incarnation `uid` (the runtime's `K8S_POD_UID`, if it gave one). Each is
    /// read from the API unless something the agent follows answers for it:
    /// - the Pod, when the following of this node's Pods has the incarnation `uid` (a copy a
    ///   moment behind the API is still that incarnation's labels, annotations and owner);
    /// - the record, when the book of records, following them, has none: most ADDs are a new
    ///   pod's first, and if a record exists after all, the create refuses and the batch reads
    ///   again.
    async fn read_ahead(
        &self,
        key: &str,
        uid: &str,
    ) -> std::result::Result<Prefetched, StoreError> {
        let store = self.store.as_ref();
        let followed = store.followed_pod(key).filter(|p| {
            !uid.is_empty()
                && p.value.pointer("/metadata/uid").and_then(|u| u.as_str()) == Some(uid)
        });
        let absent = self
            .records
            .as_ref()
            .is_some_and(|book| book.surely_absent(key));
        match (followed, absent) {
            (Some(pod), true) => Ok((Some(typed::decode(Kind::Pod, pod)?), None)),
            (Some(pod), false) => Ok((
                Some(typed::decode(Kind::Pod, pod)?),
                typed::get(store, Kind::Endpoint, key).await?,
            )),
            (None, true) => Ok((typed::get(store, Kind::Pod, key).await?, None)),
            (None, false) => read_pod_and_record(store, key).await,
        }
    }
}

/// The pod's Pod object and endpoint record (`key` names both), in one round trip.
async fn read_pod_and_record(
    store: &dyn spiderpool_store::Store,
    key: &str,
) -> std::result::Result<Prefetched, StoreError> {
    let mut both = typed::get_many(
        store,
        &[
            (Kind::Pod, key.to_string()),
            (Kind::Endpoint, key.to_string()),
        ],
    )
    .await?
    .into_iter();
    Ok((both.next().flatten(), both.next().flatten()))
}

/// The pod UID an endpoint record holds its addresses for, when it is known: an earlier version
/// recorded a container's ID where the runtime gave no UID, which says nothing.
fn record_uid(ep: &SpiderEndpoint) -> Option<&str> {
    let uid = ep.status.current.uid.as_str();
    let legacy = ep.status.current.ips.iter().any(|n| n.container_id == uid);
    (!uid.is_empty() && !legacy).then_some(uid)
}
