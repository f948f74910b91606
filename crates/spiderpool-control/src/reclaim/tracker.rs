//! When a leak is ripe: seen leaked twice, the grace delay apart, and its pod's own grace
//! period over.

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use super::{HolderKey, Leak, Policy};

/// Remembers when each leak was first seen, and hands a leak out for reclaiming only once it
/// was seen again at least the grace delay later and its pod's own grace period is over.
#[derive(Debug, Default)]
pub struct Tracker {
    first_seen: HashMap<HolderKey, SystemTime>,
}

impl Tracker {
    /// A new tracker that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the sightings of a full scan: holders not leaked any more are forgotten.
    pub fn full(&mut self, leaks: Vec<Leak>, policy: &Policy, now: SystemTime) -> Vec<Leak> {
        let current: BTreeSet<HolderKey> = leaks
            .iter()
            .map(|l| (l.pod.clone(), l.uid.clone()))
            .collect();
        self.first_seen.retain(|k, _| current.contains(k));
        self.seen(leaks, policy, now)
    }

    /// Records the sightings of a partial scan of `pods`: their holders not leaked any more
    /// are forgotten, others are left alone.
    pub fn partial(
        &mut self,
        pods: &BTreeSet<String>,
        leaks: Vec<Leak>,
        policy: &Policy,
        now: SystemTime,
    ) -> Vec<Leak> {
        let current: BTreeSet<HolderKey> = leaks
            .iter()
            .map(|l| (l.pod.clone(), l.uid.clone()))
            .collect();
        self.first_seen
            .retain(|k, _| !pods.contains(&k.0) || current.contains(k));
        self.seen(leaks, policy, now)
    }

    fn seen(&mut self, leaks: Vec<Leak>, policy: &Policy, now: SystemTime) -> Vec<Leak> {
        leaks
            .into_iter()
            .filter(|l| {
                let first = *self
                    .first_seen
                    .entry((l.pod.clone(), l.uid.clone()))
                    .or_insert(now);
                Self::ripe(first, l, policy, now)
            })
            .collect()
    }

    fn ripe(first: SystemTime, l: &Leak, policy: &Policy, now: SystemTime) -> bool {
        first < now && l.due.map_or(first, |d| first.max(d)) + policy.grace_delay <= now
    }

    /// The pods of the leaks being tracked.
    pub fn pods(&self) -> BTreeSet<String> {
        self.first_seen.keys().map(|(pod, _)| pod.clone()).collect()
    }

    /// Forgets a holder (after it was reclaimed).
    pub fn forget(&mut self, leak: &Leak) {
        self.first_seen
            .remove(&(leak.pod.clone(), leak.uid.clone()));
    }

    /// How many leaks are being tracked.
    pub fn len(&self) -> usize {
        self.first_seen.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.first_seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reclaim::Cause;
    use std::time::Duration;

    fn leak(pod: &str, due: SystemTime) -> Leak {
        let due = Some(due);
        Leak {
            pod: pod.into(),
            uid: "u".into(),
            cause: Cause::Deleted,
            why: format!("pod {pod} is gone"),
            due,
        }
    }

    #[test]
    fn a_leak_is_ripe_only_when_seen_twice_a_grace_delay_apart() {
        let policy = Policy {
            grace_delay: Duration::from_secs(5),
            ..Policy::default()
        };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut t = Tracker::new();
        assert!(t.full(vec![leak("a/x", t0)], &policy, t0).is_empty());
        let t1 = t0 + Duration::from_secs(4);
        assert!(t.full(vec![leak("a/x", t0)], &policy, t1).is_empty());
        let t2 = t0 + Duration::from_secs(5);
        assert_eq!(t.full(vec![leak("a/x", t0)], &policy, t2).len(), 1);
        // Not leaked at one scan: the clock starts again.
        assert!(t.full(vec![], &policy, t2).is_empty());
        assert!(t
            .full(vec![leak("a/x", t0)], &policy, t2 + Duration::from_secs(1))
            .is_empty());
    }

    #[test]
    fn a_terminating_pod_waits_for_its_own_grace_period_too() {
        let policy = Policy::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let due = t0 + Duration::from_secs(30);
        let mut t = Tracker::new();
        assert!(t.full(vec![leak("a/x", due)], &policy, t0).is_empty());
        let early = t0 + Duration::from_secs(20);
        assert!(t.full(vec![leak("a/x", due)], &policy, early).is_empty());
        let late = due + policy.grace_delay;
        assert_eq!(t.full(vec![leak("a/x", due)], &policy, late).len(), 1);
    }

    #[test]
    fn a_partial_scan_forgets_only_its_own_pods() {
        let policy = Policy::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut t = Tracker::new();
        t.full(vec![leak("a/x", t0), leak("a/y", t0)], &policy, t0);
        let pods: BTreeSet<String> = ["a/x".to_string()].into();
        t.partial(&pods, vec![], &policy, t0 + Duration::from_secs(1));
        assert_eq!(t.len(), 1);
        let later = t0 + Duration::from_secs(10);
        let ripe = t.partial(&pods, vec![leak("a/y", t0)], &policy, later);
        assert_eq!(ripe.len(), 1, "a/y was first seen at t0");
    }
}
