//! Read-your-writes: each projection publishes the position it has committed, and readers wait
//! for the position they need, woken by the commit itself (a `watch` channel, no polling).

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::source::{Source, SourceError};

/// What a projection has committed, and whether it has stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub position: u64,
    pub failed: bool,
}

/// A stream version a reader wants to see applied: `stream@version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamVersion {
    pub stream: String,
    pub version: u64,
}

impl std::str::FromStr for StreamVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (stream, version) = s
            .rsplit_once('@')
            .ok_or_else(|| format!("{s:?} is not stream@version"))?;
        if stream.is_empty() {
            return Err(format!("{s:?} names no stream"));
        }
        let version = version
            .parse()
            .map_err(|_| format!("{s:?}: the version {version:?} is not a whole number"))?;
        Ok(Self {
            stream: stream.to_owned(),
            version,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("timed out at position {reached} waiting for position {target}")]
    Timeout { reached: u64, target: u64 },
    #[error("timed out waiting for {stream}@{version} to be appended")]
    NotAppended { stream: String, version: u64 },
    #[error("the projection has failed at position {reached}, before position {target}")]
    Failed { reached: u64, target: u64 },
    #[error("{stream}@{version} (position {position}) was set aside as a dead letter: {reason}")]
    DeadLettered {
        stream: String,
        version: u64,
        position: u64,
        reason: String,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// Turns `min_position` and `wait_for` into the one position to wait for, and the position of
/// each `wait_for` version. A stream version not appended yet is waited for too (woken by
/// appends), until `deadline`.
pub async fn target_position(
    source: &dyn Source,
    min_position: Option<u64>,
    wait_for: &[StreamVersion],
    deadline: Instant,
) -> Result<(u64, Vec<u64>), WaitError> {
    let mut target = min_position.unwrap_or(0);
    let mut positions = Vec::with_capacity(wait_for.len());
    for wanted in wait_for {
        let mut head = source.head();
        loop {
            if let Some(position) = source.position_of(&wanted.stream, wanted.version).await? {
                target = target.max(position);
                positions.push(position);
                break;
            }
            let appended = tokio::time::timeout_at(deadline, head.changed()).await;
            if !matches!(appended, Ok(Ok(()))) {
                return Err(WaitError::NotAppended {
                    stream: wanted.stream.clone(),
                    version: wanted.version,
                });
            }
        }
    }
    Ok((target, positions))
}

/// Waits until `progress` reaches `target`; returns the position reached.
pub async fn wait_for_position(
    mut progress: watch::Receiver<Progress>,
    target: u64,
    deadline: Instant,
) -> Result<u64, WaitError> {
    let reached = tokio::time::timeout_at(
        deadline,
        progress.wait_for(|p| p.position >= target || p.failed),
    )
    .await
    .map(|r| r.map(|p| *p));
    let now = *progress.borrow();
    match reached {
        Ok(Ok(p)) if p.position >= target => Ok(p.position),
        Ok(_) if now.failed => Err(WaitError::Failed {
            reached: now.position,
            target,
        }),
        _ => Err(WaitError::Timeout {
            reached: now.position,
            target,
        }),
    }
}

/// `timeout_ms` as asked, capped, or the default.
pub fn deadline(asked_ms: Option<u64>, default_ms: u64, max_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(asked_ms.unwrap_or(default_ms).min(max_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stream_at_version() {
        let sv: StreamVersion = "order@eu@3".parse().unwrap();
        assert_eq!(sv.stream, "order@eu");
        assert_eq!(sv.version, 3);
        assert!("nope".parse::<StreamVersion>().is_err());
        assert!("@3".parse::<StreamVersion>().is_err());
        assert!("a@x".parse::<StreamVersion>().is_err());
    }

    #[tokio::test]
    async fn a_waiter_wakes_on_the_commit_that_passes_its_target() {
        let (tx, rx) = watch::channel(Progress::default());
        let waiter = tokio::spawn(wait_for_position(
            rx,
            5,
            Instant::now() + Duration::from_secs(10),
        ));
        tx.send_replace(Progress {
            position: 3,
            failed: false,
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        tx.send_replace(Progress {
            position: 7,
            failed: false,
        });
        assert_eq!(waiter.await.unwrap().unwrap(), 7);
    }

    #[tokio::test]
    async fn a_waiter_times_out_with_the_position_reached() {
        let (tx, rx) = watch::channel(Progress {
            position: 2,
            failed: false,
        });
        let err = wait_for_position(rx, 5, Instant::now() + Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                WaitError::Timeout {
                    reached: 2,
                    target: 5
                }
            ),
            "{err}"
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_failed_projection_answers_at_once() {
        let (_tx, rx) = watch::channel(Progress {
            position: 2,
            failed: true,
        });
        let err = wait_for_position(rx, 5, Instant::now() + Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(matches!(err, WaitError::Failed { reached: 2, .. }), "{err}");
    }
}
