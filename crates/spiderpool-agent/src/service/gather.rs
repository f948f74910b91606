//! How long a DEL waits for others to join its group commit. Releases come at the pace the
//! API server marks pods deleted, so without a wait a batch holds only what arrived during the
//! previous commit; and where agents race to rewrite one pool's status (Kubernetes), each write
//! that loses (409) is a fresh read and write of the whole status. So the window opens only
//! while the agent's release commits meet such conflicts: it starts at 25 ms, doubles with each
//! commit that met one (up to 500 ms), shrinks by a quarter with each that did not, and closes
//! two seconds after the last conflict. A datastore without such conflicts (etcd, SQLite: one
//! transaction, nothing laid again) never opens it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The first window after a conflict.
const START: Duration = Duration::from_millis(25);
/// The widest window.
const MAX: Duration = Duration::from_millis(500);
/// How long after the last conflict the window stays open.
const QUIET: Duration = Duration::from_secs(2);

#[derive(Default)]
struct State {
    window: Duration,
    last_conflict: Option<Instant>,
}

/// The release gather window of one agent.
#[derive(Default)]
pub(super) struct Gather {
    state: Mutex<State>,
}

impl Gather {
    /// The wait before serving a DEL that found the queue empty (zero: serve it at once).
    pub(super) fn window(&self) -> Duration {
        let s = self.state.lock().expect("gather lock");
        match s.last_conflict {
            Some(t) if t.elapsed() < QUIET => s.window,
            _ => Duration::ZERO,
        }
    }

    /// A release commit met `conflicts` lost writes; returns the window from now on.
    pub(super) fn observe(&self, conflicts: u64) -> Duration {
        let mut s = self.state.lock().expect("gather lock");
        if conflicts > 0 {
            s.window = (s.window * 2).clamp(START, MAX);
            s.last_conflict = Some(Instant::now());
        } else if s.last_conflict.is_some_and(|t| t.elapsed() < QUIET) {
            s.window = (s.window * 3 / 4).max(START);
        } else {
            s.window = Duration::ZERO;
        }
        drop(s);
        self.window()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_opens_on_conflicts_and_shrinks_without_them() {
        let g = Gather::default();
        assert_eq!(g.window(), Duration::ZERO, "closed until a conflict");
        assert_eq!(g.observe(0), Duration::ZERO);
        assert_eq!(g.observe(3), START);
        assert_eq!(g.observe(1), START * 2);
        for _ in 0..10 {
            g.observe(1);
        }
        assert_eq!(g.window(), MAX, "never wider than {MAX:?}");
        assert_eq!(g.observe(0), MAX * 3 / 4);
        for _ in 0..20 {
            g.observe(0);
        }
        assert_eq!(
            g.window(),
            START,
            "open, narrow, while conflicts are recent"
        );
        g.state.lock().unwrap().last_conflict = Some(Instant::now() - QUIET);
        assert_eq!(g.window(), Duration::ZERO, "closed once they are not");
        assert_eq!(g.observe(0), Duration::ZERO);
        assert_eq!(g.observe(1), START, "and opens afresh at the start");
    }
}
