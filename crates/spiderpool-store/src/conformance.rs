//! The conformance suite every Store backend must pass. Each check takes a function that opens
//! a handle on one shared datastore (for SQLite a new connection to the same file, standing in
//! for another process), so cross-handle races are exercised too.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use serde_json::json;

use crate::{Expect, Holder, Kind, Op, Store, StoreError};

mod claims;
mod objects;
mod races;
mod watch;

pub use claims::{
    claims_and_owned_releases, no_claims_since_guards_pool_changes,
    releases_without_a_container_match_the_incarnation,
};
pub use objects::{
    objects_and_conditions, revisions_advance_by_one, transactions_are_all_or_nothing,
};
pub use races::{
    commits_cut_short_are_all_or_nothing, concurrent_compare_and_swap,
    racing_claims_never_duplicate,
};
pub use watch::{watch_reports_every_change, watch_tells_recorded_addresses};

/// The names of the checks, each to run on a fresh datastore (see [`run_check`]).
pub const CHECKS: [&str; 11] = [
    "objects",
    "revisions",
    "txn",
    "claims",
    "cas",
    "race",
    "watch",
    "recorded",
    "quiet",
    "cut",
    "upstream",
];

/// Runs the check named `check` (one of [`CHECKS`]) on the fresh datastore `open` opens
/// handles on.
pub async fn run_check<F, Fut>(check: &str, open: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    match check {
        "objects" => objects_and_conditions(open().await).await,
        "revisions" => revisions_advance_by_one(open).await,
        "txn" => transactions_are_all_or_nothing(open().await).await,
        "claims" => claims_and_owned_releases(open().await).await,
        "cas" => concurrent_compare_and_swap(open).await,
        "race" => racing_claims_never_duplicate(open).await,
        "watch" => watch_reports_every_change(open().await).await,
        "recorded" => watch_tells_recorded_addresses(open().await).await,
        "quiet" => no_claims_since_guards_pool_changes(open().await).await,
        "cut" => commits_cut_short_are_all_or_nothing(open).await,
        "upstream" => releases_without_a_container_match_the_incarnation(open().await).await,
        other => panic!("no conformance check {other:?}"),
    }
}

fn put(kind: Kind, key: &str, value: serde_json::Value, expect: Expect) -> Op {
    Op::Put {
        kind,
        key: key.into(),
        value,
        expect,
    }
}

fn holder(container: &str, nic: &str) -> Holder {
    Holder {
        pod: format!("default/{container}"),
        pod_uid: format!("uid-{container}"),
        container_id: container.into(),
        nic: nic.into(),
        node: "n1".into(),
    }
}

/// An object whose data is one label (every backend keeps labels as they are written).
fn labelled(k: &str, v: &str) -> serde_json::Value {
    json!({"metadata": {"labels": {k: v}}, "spec": {}})
}

fn label<'a>(o: &'a serde_json::Value, k: &str) -> &'a str {
    o["metadata"]["labels"][k].as_str().unwrap_or_default()
}

/// A revision to check a pool's claims against: the datastore's, or where there is none
/// datastore-wide, the pool's own.
async fn check_point(s: &dyn Store, pool: &str) -> crate::Revision {
    match s.revision().await.unwrap() {
        Some(r) => r,
        None => s.get(Kind::IPPool, pool).await.unwrap().unwrap().revision,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn conflict<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Err(StoreError::Conflict(c)) => c.to_string(),
        other => panic!("expected a conflict, got {other:?}"),
    }
}
