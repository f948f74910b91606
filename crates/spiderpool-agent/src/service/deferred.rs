//! Releases held back while agents race for one pool's status. Where each pool write is a
//! read and rewrite of the whole status that other agents' writes refuse (409 on Kubernetes),
//! what paces a burst of DELs is that pool, not the DELs. So while the release gather window
//! is open (see `gather.rs`: the agent's release commits met conflicts lately), a DEL commits
//! only its endpoint record (the pod no longer holds the addresses) and answers; its pool
//! releases wait here and go in one write per pool, every [`FLUSH_EVERY`], before an ADD of
//! this agent is served, and when the agent stops.
//!
//! Until then the pool still shows the addresses held by the old container, so nobody takes
//! them early; a release is owned by that container and interface, so one that comes late
//! never frees what a newer holder took. If the agent dies with releases held back, the pool
//! entries outlive their pod and the controller's reclaim frees them, as it frees any address
//! a dead pod leaked.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use spiderpool_store::{Op, StoreError};
use tokio::sync::Notify;

use super::*;
use crate::view::ViewCache;

/// How often held-back releases are written (one write per pool and agent each time).
pub(super) const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// How many flushes a release that fails for another reason than a conflict is tried in.
const ATTEMPTS: u32 = 5;

/// When DELs hold their pool releases back (`--release-hold-back`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HoldBack {
    /// While the agent's release writes meet other writers' (the gather window is open).
    Auto,
    /// Always.
    Always,
    /// Never: each DEL answers once its pool write is done.
    Never,
}

/// The releases held back, and whether anything writes them.
#[derive(Default)]
pub(super) struct Deferred {
    ops: std::sync::Mutex<Vec<(Op, u32)>>,
    /// `--release-hold-back`, set when a flusher starts ([`IpamService::flush_releases_every`]):
    /// nothing is held back before (a service used without one releases at once).
    mode: OnceLock<HoldBack>,
    /// Wakes the flusher when releases are held back (its own `Arc`: the flusher waits on it
    /// without keeping the service alive).
    pending: Arc<Notify>,
}

impl Deferred {
    /// Whether a DEL holds its releases back, the gather window being `window`.
    pub(super) fn now(&self, window: Duration) -> bool {
        match self.mode.get() {
            Some(HoldBack::Always) => true,
            Some(HoldBack::Auto) => !window.is_zero(),
            Some(HoldBack::Never) | None => false,
        }
    }

    /// Holds `ops` (pool releases) back until the next flush.
    pub(super) fn hold(&self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        self.ops
            .lock()
            .expect("deferred lock")
            .extend(ops.into_iter().map(|o| (o, 0)));
        self.pending.notify_one();
    }

    pub(super) fn is_empty(&self) -> bool {
        self.ops.lock().expect("deferred lock").is_empty()
    }

    fn take(&self) -> Vec<(Op, u32)> {
        std::mem::take(&mut *self.ops.lock().expect("deferred lock"))
    }
}

/// The pool and address of each release in `ops`.
fn released(ops: &[(Op, u32)]) -> Vec<(String, IpAddr)> {
    ops.iter()
        .filter_map(|(o, _)| match o {
            Op::Release { pool, ip, .. } => Some((pool.clone(), *ip)),
            _ => None,
        })
        .collect()
}

impl IpamService {
    /// Whether a refusal for want of addresses may not be final: the view is followed and may
    /// not have heard of a change that makes room, or this agent's DELs held releases back.
    pub(super) fn refusal_may_lift(&self, cache: &ViewCache) -> bool {
        cache.watched() || !self.deferred.is_empty()
    }

    /// Writes held-back releases every [`FLUSH_EVERY`] while there are any; from now on DELs
    /// hold theirs back as `when` says (see the module comment).
    pub fn flush_releases_every(self: &Arc<Self>, when: HoldBack) {
        if when == HoldBack::Never || self.deferred.mode.set(when).is_err() {
            return; // nothing to flush, or a flusher runs already
        }
        let svc = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(s) = svc.upgrade() else { return };
                if s.deferred.is_empty() {
                    let pending = s.deferred.pending.clone();
                    drop(s);
                    pending.notified().await;
                    continue;
                }
                drop(s);
                tokio::time::sleep(FLUSH_EVERY).await;
                let Some(s) = svc.upgrade() else { return };
                let mut cache = s.state.lock().await;
                s.flush_releases(&mut cache).await;
            }
        });
    }

    /// Writes what is held back now (the agent stopping).
    pub async fn flush_releases_now(&self) {
        let mut cache = self.state.lock().await;
        self.flush_releases(&mut cache).await;
    }

    /// Writes the held-back releases, one write per pool; those that fail are held again (a
    /// conflict always, another error for [`ATTEMPTS`] flushes, then the controller's reclaim
    /// frees them). Under the agent's lock, as its other commits, so its view learns them.
    pub(super) async fn flush_releases(&self, cache: &mut ViewCache) {
        let ops = self.deferred.take();
        if ops.is_empty() {
            return;
        }
        let (r, conflicts) = self
            .counting_conflicts(self.commit(ops.iter().map(|(o, _)| o.clone()).collect()))
            .await;
        self.observe_release_conflicts(conflicts);
        match r {
            Ok(revision) => {
                let released = released(&ops);
                cache.committed(revision, &[], &released);
                tracing::info!(released = ?released, "released what DELs held back");
            }
            Err(e) => {
                cache.invalidate();
                let conflict = matches!(e, StoreError::Conflict(_));
                let (again, dropped): (Vec<_>, Vec<_>) = ops
                    .into_iter()
                    .map(|(o, n)| (o, if conflict { n } else { n + 1 }))
                    .partition(|(_, n)| *n < ATTEMPTS);
                if !dropped.is_empty() {
                    tracing::warn!(error = %e, addresses = ?released(&dropped),
                        "could not release what DELs held back; the controller's reclaim frees it");
                } else {
                    tracing::debug!(error = %e, "held-back releases failed; trying at the next flush");
                }
                let mut held = self.deferred.ops.lock().expect("deferred lock");
                held.extend(again);
                drop(held);
                self.deferred.pending.notify_one();
            }
        }
    }
}
