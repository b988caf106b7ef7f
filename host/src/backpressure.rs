//! Backpressure: the write side slows down before the read side falls behind.
//!
//! The rule. An append is let in while every projection this instance runs is at most
//! `runner.max_lag_ms` behind (its lag: how long ago the oldest event it has not applied was
//! appended). Past that, an append waits, woken by the projection's commits, until the lag is
//! back under the bound; if the lag instead grows past `runner.refuse_lag_ms`, the append is
//! refused with `503` and `Retry-After`: nothing of it written, and the caller told when to
//! come back. Writes never outrun the read side by more than the bound plus the batch in
//! flight, however hard they come.
//!
//! Only running projections count, and only for events appended since they started here. A
//! paused or failed one (an operator's business), one another instance runs, and the backlog
//! of one catching up or rebuilding from position 0 (hours behind, by design) must not stop
//! every write.

use std::sync::Arc;
use std::time::Duration;

use crate::registry::Registry;
use crate::runner::Projection;
use crate::store::ProjectionStatus;

#[derive(Debug, Clone, Copy)]
pub struct Backpressure {
    /// 0: off (pure ingestion).
    pub max_lag_ms: u64,
    pub refuse_lag_ms: u64,
}

/// Refused: the read side is too far behind.
#[derive(Debug, thiserror::Error)]
#[error("projection {projection} is {lag_ms} ms behind (bound {max_lag_ms} ms): append refused to let it catch up; retry in {retry_after_s} s")]
pub struct Lagging {
    pub projection: String,
    pub lag_ms: u64,
    pub max_lag_ms: u64,
    pub retry_after_s: u64,
}

impl Backpressure {
    /// Waits until appends may go on, or refuses.
    pub async fn admit(&self, registry: &Registry) -> Result<(), Lagging> {
        if self.max_lag_ms == 0 {
            return Ok(());
        }
        loop {
            let Some((projection, lag_ms)) = furthest_behind(registry) else {
                return Ok(());
            };
            if lag_ms <= self.max_lag_ms {
                return Ok(());
            }
            if lag_ms > self.refuse_lag_ms {
                return Err(Lagging {
                    projection: projection.name().to_owned(),
                    lag_ms,
                    max_lag_ms: self.max_lag_ms,
                    // About the time it takes to come back under the bound.
                    retry_after_s: (lag_ms - self.max_lag_ms).div_ceil(1000).max(1),
                });
            }
            // Woken by its next commit, or when the lag would cross the refusal bound.
            let mut progress = projection.progress();
            let until_refusal = Duration::from_millis(self.refuse_lag_ms - lag_ms + 1);
            tokio::select! {
                _ = progress.changed() => {}
                _ = tokio::time::sleep(until_refusal) => {}
            }
        }
    }
}

fn furthest_behind(registry: &Registry) -> Option<(Arc<Projection>, u64)> {
    registry
        .projections()
        .into_iter()
        .filter(|p| p.status() == ProjectionStatus::Running)
        .map(|p| {
            let lag = p.live_lag_ms();
            (p, lag)
        })
        .max_by_key(|(_, lag)| *lag)
}
