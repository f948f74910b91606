//! The one retry policy of every loop that meets conflicts: how many attempts, how long between
//! them, and what is worth another attempt (a conflict: another writer moved the datastore on,
//! so a plan made afresh may succeed; anything else is returned at once).

use std::time::Duration;

use crate::StoreError;

/// How a loop that meets conflicts tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// The wait after the first failed attempt, doubled after each further one up to
    /// `max_wait`, plus a few milliseconds of jitter; zero: the next attempt starts at once.
    pub first_wait: Duration,
    /// The longest wait.
    pub max_wait: Duration,
}

impl Retry {
    /// Writers racing for the same objects (agents' commits, carves of one subnet): eight
    /// attempts, 2 ms doubling to 64 ms, jittered so racing agents do not collide in lockstep.
    pub const CONFLICTS: Retry = Retry {
        attempts: 8,
        first_wait: Duration::from_millis(2),
        max_wait: Duration::from_millis(64),
    };

    /// A user's apply, planned afresh on each attempt: five attempts, no wait.
    pub const APPLY: Retry = Retry {
        attempts: 5,
        first_wait: Duration::ZERO,
        max_wait: Duration::ZERO,
    };

    /// One object write laid again at once on a fresh read after a 409 (a pool's status, which
    /// every agent writes): sixteen attempts, no wait.
    pub const RELAY: Retry = Retry {
        attempts: 16,
        first_wait: Duration::ZERO,
        max_wait: Duration::ZERO,
    };

    /// After attempt `attempt` (1-based) failed with `error`: the wait before the next one, or
    /// `None` when the error is to be returned (not a conflict, or the attempts are spent).
    pub fn again(&self, attempt: u32, error: &StoreError) -> Option<Duration> {
        (matches!(error, StoreError::Conflict(_)) && self.more(attempt)).then(|| self.wait(attempt))
    }

    /// Whether another attempt may follow attempt `attempt` (1-based).
    pub fn more(&self, attempt: u32) -> bool {
        attempt < self.attempts
    }

    /// The wait after attempt `attempt` (1-based) failed.
    pub fn wait(&self, attempt: u32) -> Duration {
        if self.first_wait.is_zero() {
            return Duration::ZERO;
        }
        let doubled = self
            .first_wait
            .saturating_mul(1 << attempt.saturating_sub(1).min(16));
        let jitter = u64::from(std::process::id() % 7) + u64::from(attempt);
        doubled.min(self.max_wait) + Duration::from_millis(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Conflict;

    #[test]
    fn conflicts_are_retried_until_the_attempts_are_spent() {
        let conflict = StoreError::Conflict(Conflict::Changed("x".into()));
        let r = Retry::CONFLICTS;
        for n in 1..8 {
            let wait = r.again(n, &conflict).expect("another attempt");
            assert!(
                wait >= Duration::from_millis(2u64 << (n - 1).min(5)),
                "{n}: {wait:?}"
            );
            assert!(wait <= Duration::from_millis(64 + 7 + 8), "{n}: {wait:?}");
        }
        assert_eq!(r.again(8, &conflict), None);
        assert_eq!(r.again(1, &StoreError::Unavailable("down".into())), None);
        assert_eq!(Retry::APPLY.again(1, &conflict), Some(Duration::ZERO));
        assert_eq!(Retry::APPLY.again(5, &conflict), None);
    }
}
