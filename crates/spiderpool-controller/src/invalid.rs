//! Objects a leader's loop cannot read or write (a pool whose status does not parse, an entry
//! without a pod, a status the API server refuses): each loop reports them after every pass and
//! goes on with the others. A newly bad object (or a new problem with it) gets a Warning Event
//! and a log line, once; the gauge `spiderpool_controller_invalid_objects{loop,kind}` counts
//! what each loop skips now; an object readable again is logged once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};

use crate::metrics::Metrics;

/// One object a loop skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bad {
    /// The kind, as `kubectl` names it: `SpiderIPPool`, `SpiderSubnet`, `SpiderEndpoint`.
    pub kind: &'static str,
    /// `name`, or `namespace/name` for a namespaced kind.
    pub name: String,
    /// What is wrong, at most [`PROBLEM_MAX`] characters.
    pub problem: String,
}

/// The longest problem an event or log line quotes.
pub const PROBLEM_MAX: usize = 400;

impl Bad {
    /// A bad object; `problem` is cut to [`PROBLEM_MAX`] characters.
    pub fn new(
        kind: &'static str,
        name: impl Into<String>,
        problem: impl std::fmt::Display,
    ) -> Bad {
        let problem = problem.to_string();
        let problem = match problem.char_indices().nth(PROBLEM_MAX) {
            Some((at, _)) => format!(
                "{}… ({} characters)",
                &problem[..at],
                problem.chars().count()
            ),
            None => problem,
        };
        Bad {
            kind,
            name: name.into(),
            problem,
        }
    }

    fn reference(&self) -> ObjectReference {
        let (namespace, name) = match self.name.split_once('/') {
            Some((ns, n)) => (Some(ns.to_string()), n.to_string()),
            None => (None, self.name.clone()),
        };
        ObjectReference {
            api_version: Some("spiderpool.spidernet.io/v2beta1".into()),
            kind: Some(self.kind.into()),
            namespace,
            name: Some(name),
            ..Default::default()
        }
    }
}

/// The report of bad objects, shared by the leader's loops.
pub struct Invalid {
    metrics: Arc<Metrics>,
    events: Option<tokio::sync::mpsc::UnboundedSender<(ObjectReference, KubeEvent)>>,
    /// Per loop: each bad object's problem as last reported.
    known: Mutex<BTreeMap<String, Problems>>,
}

/// Each bad object (kind, name) with its problem.
type Problems = BTreeMap<(&'static str, String), String>;

impl Invalid {
    /// A report whose events are published as the controller `identity`.
    pub fn new(client: kube::Client, identity: String, metrics: Arc<Metrics>) -> Arc<Invalid> {
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "spiderpool-controller".into(),
                instance: Some(identity),
            },
        );
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(ObjectReference, KubeEvent)>();
        // Ends when the report is dropped (with the leader's loops).
        tokio::spawn(async move {
            while let Some((r, ev)) = rx.recv().await {
                if let Err(e) = recorder.publish(&ev, &r).await {
                    tracing::debug!(object = ?r.name, error = %e, "publishing an event");
                }
            }
        });
        Arc::new(Invalid {
            metrics,
            events: Some(tx),
            known: Mutex::default(),
        })
    }

    /// The bad objects one pass of `loop_name` skipped (all of them: one missing from `found`
    /// is good again).
    pub fn pass(&self, loop_name: &str, found: Vec<Bad>) {
        let mut known = self.known.lock().expect("invalid lock");
        let was = known.entry(loop_name.to_string()).or_default();
        let mut now: Problems = BTreeMap::new();
        for bad in found {
            let key = (bad.kind, bad.name.clone());
            if was.get(&key) != Some(&bad.problem) {
                tracing::warn!(loop_name, kind = bad.kind, object = %bad.name, problem = %bad.problem,
                    "skipping an object that cannot be read or written; the others go on");
                if let Some(tx) = &self.events {
                    let ev = KubeEvent {
                        type_: EventType::Warning,
                        reason: "InvalidObject".into(),
                        note: Some(format!("{loop_name}: skipped: {}", bad.problem)),
                        action: "Reconcile".into(),
                        secondary: None,
                    };
                    let _ = tx.send((bad.reference(), ev));
                }
            }
            now.insert(key, bad.problem);
        }
        for (kind, name) in was.keys() {
            if !now.contains_key(&(*kind, name.clone())) {
                tracing::info!(loop_name, kind, object = %name, "the object is readable again");
            }
        }
        let kinds: BTreeSet<&'static str> = was.keys().chain(now.keys()).map(|(k, _)| *k).collect();
        for kind in kinds {
            let n = now.keys().filter(|(k, _)| *k == kind).count();
            self.metrics.invalid(loop_name, kind, n);
        }
        *was = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_is_cut_and_the_gauge_follows_each_pass() {
        let long = "x".repeat(5_000);
        let b = Bad::new("SpiderIPPool", "p", &long);
        assert!(b.problem.len() < PROBLEM_MAX + 40, "{}", b.problem.len());
        assert!(b.problem.ends_with("(5000 characters)"), "{}", b.problem);

        let metrics = Arc::new(Metrics::new());
        let report = Invalid {
            metrics: metrics.clone(),
            events: None,
            known: Mutex::default(),
        };
        report.pass(
            "reclaim",
            vec![
                Bad::new("SpiderIPPool", "a", "corrupt"),
                Bad::new("SpiderIPPool", "b", "corrupt"),
            ],
        );
        let text = metrics.render();
        assert!(
            text.contains(
                r#"spiderpool_controller_invalid_objects{loop="reclaim",kind="SpiderIPPool"} 2"#
            ),
            "{text}"
        );
        report.pass("reclaim", vec![]);
        let text = metrics.render();
        assert!(
            text.contains(
                r#"spiderpool_controller_invalid_objects{loop="reclaim",kind="SpiderIPPool"} 0"#
            ),
            "{text}"
        );
    }
}
