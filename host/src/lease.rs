//! One active runner per projection across instances: the store's lease decides where a
//! projection runs; the other instances stand by, follow its checkpoint, and take over when the
//! lease comes free.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::RunnerConfig;
use crate::runner::{Projection, RunEnd, Runner, FIRST_RETRY};
use crate::source::Source;
use crate::store::{Store, StoreError};

/// How often a standby instance tries to take a projection over (and reads its checkpoint).
const STANDBY_POLL: Duration = Duration::from_millis(500);

/// Runs `projection` whenever this instance holds its lease (one instance at a time across
/// a cluster); stands by, following the active instance's checkpoint, while another holds it.
/// Returns on shutdown.
pub async fn run_with_lease(
    projection: Arc<Projection>,
    store: Arc<dyn Store>,
    source: Arc<dyn Source>,
    config: RunnerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = projection.name().to_owned();
    let mut standing_by = false;
    let mut backoff = FIRST_RETRY;
    let max_backoff = Duration::from_millis(config.max_retry_backoff_ms).max(FIRST_RETRY);
    while !*shutdown.borrow() {
        let taken = async {
            let lease = store.try_lease(&name).await?;
            match lease {
                Some(lease) => Ok(Some((
                    lease,
                    store.checkpoint(projection.descriptor()).await?,
                ))),
                None => Ok::<_, StoreError>(None),
            }
        };
        let pause = match taken.await {
            Ok(Some((mut lease, checkpoint))) => {
                backoff = FIRST_RETRY;
                if std::mem::take(&mut standing_by) {
                    tracing::info!(projection = %name, checkpoint, "lease taken: this instance runs the projection now");
                }
                projection.resume_at(checkpoint);
                let (stop_tx, stop_rx) = watch::channel(false);
                let runner = Runner::new(
                    projection.clone(),
                    store.clone(),
                    source.clone(),
                    config.clone(),
                );
                let run = runner.run_supervised(stop_rx);
                tokio::pin!(run);
                let end = tokio::select! {
                    end = &mut run => end,
                    _ = lease.lost() => {
                        let _ = stop_tx.send(true);
                        run.await;
                        RunEnd::Fenced
                    }
                    _ = shutdown.changed() => {
                        let _ = stop_tx.send(true);
                        run.await
                    }
                };
                match end {
                    RunEnd::Stopped => return,
                    RunEnd::Failed => {
                        // Another instance would fail on the same event: keep the lease until
                        // an operator acts (or shutdown).
                        while !*shutdown.borrow() && shutdown.changed().await.is_ok() {}
                        return;
                    }
                    RunEnd::Fenced => {
                        tracing::warn!(projection = %name, "lease lost: standing by");
                        standing_by = true;
                        STANDBY_POLL
                    }
                }
            }
            Ok(None) => {
                backoff = FIRST_RETRY;
                projection.stand_by();
                if !standing_by {
                    tracing::info!(projection = %name, "another instance runs this projection: standing by");
                    standing_by = true;
                }
                match store.checkpoint(projection.descriptor()).await {
                    Ok(checkpoint) => projection.follow(checkpoint),
                    Err(err) => projection.update_health(|h| h.retrying = Some(err.to_string())),
                }
                STANDBY_POLL
            }
            Err(err) => {
                tracing::warn!(projection = %name, error = %err, retry_in_ms = backoff.as_millis() as u64, "cannot take the projection's lease, retrying");
                projection.update_health(|h| h.retrying = Some(err.to_string()));
                let pause = backoff;
                backoff = (backoff * 2).min(max_backoff);
                pause
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            changed = shutdown.changed() => if changed.is_err() { return },
        }
    }
}
