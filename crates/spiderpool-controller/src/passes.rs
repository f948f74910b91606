//! When a leader's loop makes its next pass: every `resync`, and after each burst of watch
//! events (the events of one `window` from the first are gathered into one pass).

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::time::Interval;

/// Waits for the next pass: the next tick of `tick`, or the next event of `events` and the rest
/// of its burst (all that come within `window` of it). `false` once the events have ended.
pub(crate) async fn next<S: Stream + Unpin>(
    events: &mut S,
    tick: &mut Interval,
    window: Duration,
) -> bool {
    tokio::select! {
        _ = tick.tick() => true,
        ev = events.next() => {
            if ev.is_none() {
                return false;
            }
            let quiet = tokio::time::sleep(window);
            tokio::pin!(quiet);
            loop {
                tokio::select! {
                    _ = &mut quiet => return true,
                    ev = events.next() => if ev.is_none() { return false },
                }
            }
        }
    }
}
