//! The watch behind `Store::watch`: one API watch per kind, resumed from the last revision
//! after the server's timeout; a pool's events are told as the addresses that changed (against
//! the holders known from the start) and, when its spec changed, the pool; an endpoint's as
//! the addresses it records; other objects only when what their watchers care about changed
//! (a Node's labels, not its heartbeat).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures_util::StreamExt;
use kube::api::{Api, DynamicObject, ListParams, VersionMatch, WatchEvent, WatchParams};
use spiderpool_store::{Change, Changes, Kind, Result, Revision, StoreError};

use super::*;

/// Every change after revision `after` to the allocations and to the objects of `kinds`.
pub(super) async fn watch(
    inner: &Arc<Inner>,
    after: Revision,
    kinds: &[Kind],
) -> Result<Option<Changes>> {
    // The pools as of the start: what their holders' changes are told against. A watch of
    // other kinds only tells no allocation and reads no pool.
    let watch_pools = kinds.contains(&Kind::IPPool) || kinds.is_empty();
    let (pools, start) = if !watch_pools {
        let start = match after {
            // Now: the revision of a (one-item) list of the first kind.
            0 => {
                let lp = ListParams::default().limit(1);
                inner.list_objects(kinds[0], &lp).await?.1
            }
            after => after,
        };
        (Vec::new(), start)
    } else if after == 0 {
        inner
            .list_objects(Kind::IPPool, &ListParams::default())
            .await?
    } else {
        let lp = ListParams::default()
            .at(&after.to_string())
            .matching(VersionMatch::Exact);
        let (items, _) = inner.list_objects(Kind::IPPool, &lp).await?;
        (items, after)
    };
    let mut baseline: HashMap<String, (Option<i64>, BTreeMap<String, Entry>)> = HashMap::new();
    for o in &pools {
        let name = o.metadata.name.clone().unwrap_or_default();
        // An unreadable status is no reason to stop watching the others: its holders are
        // told from its next readable version on (and allocation reads it afresh meanwhile).
        let entries = entries_of(&name, &serde_json::to_value(o).unwrap_or_default())
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "watch: an unreadable pool status");
                BTreeMap::new()
            });
        baseline.insert(name, (o.metadata.generation, entries));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut watched: Vec<Kind> = if watch_pools {
        vec![Kind::IPPool]
    } else {
        Vec::new()
    };
    watched.extend(
        kinds
            .iter()
            .filter(|k| **k != Kind::IPPool && **k != Kind::Workload),
    );
    for kind in watched {
        let ar = api_resource(kind, None)?;
        let api: Api<DynamicObject> = Api::all_with(inner.client.clone(), &ar);
        let tx = tx.clone();
        let report_pools = kinds.contains(&Kind::IPPool);
        let mut baseline = if kind == Kind::IPPool {
            std::mem::take(&mut baseline)
        } else {
            HashMap::new()
        };
        // What of each object the watchers care about, as of the start: a Node's status
        // heartbeat, say, is no change of its labels.
        let mut seen: HashMap<String, String> = HashMap::new();
        if kind != Kind::IPPool {
            let lp = ListParams::default()
                .at(&start.to_string())
                .matching(VersionMatch::Exact);
            let (items, _) = inner.list_objects(kind, &lp).await?;
            for o in &items {
                seen.insert(key_of(kind, o), fingerprint(kind, o));
            }
        }
        let inner = inner.clone();
        tokio::spawn(async move {
            let mut rv = start.to_string();
            loop {
                let wp = WatchParams::default().timeout(290);
                let stream = tokio::select! {
                    s = api.watch(&wp, &rv) => s,
                    () = tx.closed() => return,
                };
                let mut stream = match stream {
                    Ok(s) => s.boxed(),
                    Err(e) => {
                        let _ = tx.send(Err(inner.err(&format!("watch {kind}"), e))).await;
                        return;
                    }
                };
                loop {
                    let ev = tokio::select! {
                        e = stream.next() => e,
                        () = tx.closed() => return,
                    };
                    let batch = match ev {
                        None => break, // the server's timeout: watch again from `rv`
                        Some(Err(e)) => Err(inner.err(&format!("watch {kind}"), e)),
                        Some(Ok(WatchEvent::Error(s))) => Err(StoreError::Unavailable(format!(
                            "kubernetes {}: watch {kind} ended: {} ({})",
                            inner.server, s.message, s.code
                        ))),
                        Some(Ok(WatchEvent::Bookmark(b))) => {
                            rv = b.metadata.resource_version;
                            continue;
                        }
                        Some(Ok(WatchEvent::Added(o) | WatchEvent::Modified(o))) => {
                            rv = o.metadata.resource_version.clone().unwrap_or(rv);
                            Ok(changes_of(
                                &inner,
                                kind,
                                &o,
                                false,
                                &mut baseline,
                                &mut seen,
                                report_pools,
                            ))
                        }
                        Some(Ok(WatchEvent::Deleted(o))) => {
                            rv = o.metadata.resource_version.clone().unwrap_or(rv);
                            Ok(changes_of(
                                &inner,
                                kind,
                                &o,
                                true,
                                &mut baseline,
                                &mut seen,
                                report_pools,
                            ))
                        }
                    };
                    let last = batch.is_err();
                    if matches!(&batch, Ok(c) if c.is_empty()) {
                        continue;
                    }
                    if tx.send(batch).await.is_err() || last {
                        return;
                    }
                }
            }
        });
    }
    Ok(Some(rx))
}

/// What of an object its watchers care about: a Node's labels and addresses (never handed
/// out), a Namespace's labels and
/// annotations, a custom resource's spec (its generation); of anything else, every change.
pub(super) fn fingerprint(kind: Kind, o: &DynamicObject) -> String {
    let m = &o.metadata;
    match kind {
        Kind::Node => serde_json::to_string(&(&m.labels, o.data.pointer("/status/addresses")))
            .unwrap_or_default(),
        Kind::Namespace => serde_json::to_string(&(&m.labels, &m.annotations)).unwrap_or_default(),
        // (A pool's changes are told from its generation and its holders, not here.)
        Kind::Subnet | Kind::ReservedIP => {
            format!("{:?}/{:?}", m.generation, m.deletion_timestamp)
        }
        _ => m.resource_version.clone().unwrap_or_default(),
    }
}

/// What one watch event means: for a pool, the addresses that changed (against what the watch
/// knew) and, when its spec changed or it came or went, the pool itself; for anything else,
/// the object.
pub(super) fn changes_of(
    inner: &Inner,
    kind: Kind,
    o: &DynamicObject,
    deleted: bool,
    known: &mut HashMap<String, (Option<i64>, BTreeMap<String, Entry>)>,
    seen: &mut HashMap<String, String>,
    report_pools: bool,
) -> Vec<Change> {
    let Ok(revision) = rv_of(o) else {
        return Vec::new();
    };
    let key = key_of(kind, o);
    if kind != Kind::IPPool {
        let changed = if deleted {
            seen.remove(&key);
            true
        } else {
            let now = fingerprint(kind, o);
            seen.insert(key.clone(), now.clone()) != Some(now)
        };
        if !changed {
            return Vec::new();
        }
        if kind == Kind::Endpoint {
            let value = (!deleted).then(|| serde_json::to_value(o).ok()).flatten();
            let ips = value.as_ref().map(crate::recorded_of).unwrap_or_default();
            return vec![Change::Recorded {
                key,
                ips,
                revision,
                value,
            }];
        }
        return vec![Change::Object {
            kind,
            key,
            revision,
        }];
    }
    inner.observe(kind, o);
    let entries = if deleted {
        BTreeMap::new()
    } else {
        match entries_of(&key, &serde_json::to_value(o).unwrap_or_default()) {
            Ok(e) => e,
            Err(e) => {
                // The pool itself is reported: a view reads it afresh (and finds it
                // unreadable) rather than go on with the holders it knew.
                tracing::error!(error = %e, "watch: an unreadable pool status");
                return if report_pools {
                    vec![Change::Object {
                        kind,
                        key,
                        revision,
                    }]
                } else {
                    Vec::new()
                };
            }
        }
    };
    let (old_gen, old) = known
        .remove(&key)
        .map(|(g, e)| (Some(g), e))
        .unwrap_or((None, BTreeMap::new()));
    let mut out = Vec::new();
    let spec_changed = deleted || old_gen != Some(o.metadata.generation);
    if spec_changed && report_pools {
        out.push(Change::Object {
            kind,
            key: key.clone(),
            revision,
        });
    }
    for (ip, e) in &entries {
        if old.get(ip) != Some(e) {
            if let Ok(ip) = ip.parse() {
                out.push(Change::Allocation {
                    pool: key.clone(),
                    ip,
                    held: true,
                    revision,
                });
            }
        }
    }
    for ip in old.keys().filter(|ip| !entries.contains_key(*ip)) {
        if let Ok(ip) = ip.parse() {
            out.push(Change::Allocation {
                pool: key.clone(),
                ip,
                held: false,
                revision,
            });
        }
    }
    if !deleted {
        known.insert(key, (o.metadata.generation, entries));
    }
    out
}
