//! The watch a view follows where the datastore can watch: a background task folds every
//! change to the allocations and to the viewed objects into a feed that each request drains.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spiderpool_store::{Change, Revision, Store};
use tokio::sync::Notify;

use super::*;

/// What a datastore watch reported and the view has not folded in yet.
#[derive(Default)]
pub(super) struct Feed {
    /// A watch is running: while it does, the view needs no revision check.
    pub(super) live: bool,
    /// The watch started (again): a view read before cannot be kept.
    pub(super) restarted: bool,
    /// The latest state of each address that changed: held or not, and the revision.
    pub(super) allocations: HashMap<(String, IpAddr), (bool, Revision)>,
    /// An object of a [`VIEWED`] kind changed.
    pub(super) objects: bool,
}

impl Feed {
    pub(super) fn merge(&mut self, changes: Vec<Change>) {
        for c in changes {
            match c {
                Change::Allocation {
                    pool,
                    ip,
                    held,
                    revision,
                } => {
                    tracing::trace!(%pool, %ip, held, revision, "an address changed");
                    self.allocations.insert((pool, ip), (held, revision));
                }
                // (Endpoints are not among the viewed kinds: the record book follows them.)
                Change::Recorded { .. } => {}
                Change::Object {
                    kind,
                    key,
                    revision,
                } => {
                    tracing::debug!(object = %format!("{kind}/{key}"), revision, "a viewed object changed; the view will be read afresh");
                    self.objects = true;
                }
            }
        }
    }
}

/// Follows the datastore's changes into `feed` for as long as the agent runs; returns at once
/// when the backend cannot watch. A watch that ends is started again from the current
/// revision, and the view is then read afresh.
pub(super) async fn follow(store: Arc<dyn Store>, feed: Arc<Mutex<Feed>>, stale: Arc<Notify>) {
    const BACKOFF: Duration = Duration::from_millis(100);
    let mut backoff = BACKOFF;
    loop {
        let started = async {
            match store.revision().await? {
                Some(after) => store.watch(after, &VIEWED).await,
                None => Ok(None),
            }
        };
        match started.await {
            Ok(None) => return,
            Ok(Some(mut changes)) => {
                {
                    let mut f = feed.lock().expect("feed lock");
                    *f = Feed {
                        live: true,
                        restarted: true,
                        ..Feed::default()
                    };
                }
                stale.notify_one();
                tracing::debug!("following the datastore's changes");
                backoff = BACKOFF;
                while let Some(batch) = changes.recv().await {
                    match batch {
                        Ok(c) => {
                            let mut f = feed.lock().expect("feed lock");
                            f.merge(c);
                            if f.objects {
                                stale.notify_one();
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the datastore watch ended; watching again");
                            break;
                        }
                    }
                }
                feed.lock().expect("feed lock").live = false;
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch the datastore; trying again"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
