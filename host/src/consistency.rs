//! Read-your-writes: readers wait for the stream versions and positions they need, woken by
//! the append or the commit that reaches them. Each waiter is filed under what it waits for, so
//! an append or a commit touches only the waiters it satisfies, and no waiter queries the
//! database when woken: the cost of an append does not grow with the number of waiting reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::source::{Appended, Placed, Source, SourceError};

/// What a projection has committed, and whether it has stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub position: u64,
    pub failed: bool,
    /// This version no longer serves reads (another version took over, or it was removed):
    /// a read waiting on it looks up the one that serves now.
    pub retired: bool,
    /// Batches committed with observer actions in them: what wakes the dispatcher, which
    /// need not read the action log after a batch that logged none.
    pub action_batches: u64,
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
    #[error("timed out waiting for event {id} to reach the log")]
    EventNotAppended { id: String },
    #[error("event {id} (position {position}) was set aside as a dead letter: {reason}")]
    EventDeadLettered {
        id: String,
        position: u64,
        reason: String,
    },
    #[error("the projection has failed at position {reached}, before position {target}")]
    Failed { reached: u64, target: u64 },
    /// The version waited on stopped serving; the caller waits on the one that serves now.
    #[error("the projection version stopped serving at position {reached}")]
    Retired { reached: u64 },
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

/// The position of each event id, waiting (until `deadline`) for those not in the log yet:
/// woken by the head moving (an append, a Kafka batch), never polled.
pub async fn event_positions(
    source: &dyn Source,
    ids: &[String],
    deadline: Instant,
) -> Result<Vec<u64>, WaitError> {
    let mut positions: Vec<Option<u64>> = vec![None; ids.len()];
    let mut head = source.head();
    loop {
        // Marked seen before looking, so a move after the look still wakes us.
        head.borrow_and_update();
        for (id, position) in ids.iter().zip(positions.iter_mut()) {
            if position.is_none() {
                *position = source.position_of_event(id).await?;
            }
        }
        if let Some(missing) = ids
            .iter()
            .zip(&positions)
            .find_map(|(id, p)| p.is_none().then_some(id))
        {
            match tokio::time::timeout_at(deadline, head.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    return Err(WaitError::EventNotAppended {
                        id: missing.clone(),
                    })
                }
            }
        }
        return Ok(positions.into_iter().flatten().collect());
    }
}

/// Turns `min_position` and `wait_for` into the one position to wait for, and the position of
/// each `wait_for` version. A stream version not appended yet is waited for too (woken by the
/// append that writes it), until `deadline`.
pub async fn target_position(
    appends: &Appends,
    min_position: Option<u64>,
    wait_for: &[StreamVersion],
    deadline: Instant,
) -> Result<(u64, Vec<u64>), WaitError> {
    let mut target = min_position.unwrap_or(0);
    let mut positions = Vec::with_capacity(wait_for.len());
    for wanted in wait_for {
        let position = appends.position_of(wanted, deadline).await?;
        target = target.max(position);
        positions.push(position);
    }
    Ok((target, positions))
}

/// Events matched against the waiters in one look at the outbox, at most: past that, the
/// waiters' versions are looked up instead (one statement for all of them), whichever is
/// cheaper bounded by the other.
const SCAN_LIMIT: usize = 1024;

/// The reads waiting for stream versions to be appended, by stream and version.
///
/// This process's appends resolve them directly ([`Appends::appended`]). Events written by
/// others (another instance, an application writing the outbox) are found by one watcher: when
/// the source's head moves and someone waits, it reads the (stream, version, position) of the
/// events between the last head it matched and the new one, in one statement, and resolves the
/// waiters they satisfy. Nothing is read for a waiter when it is woken.
#[derive(Clone)]
pub struct Appends {
    inner: Arc<AppendsInner>,
}

struct AppendsInner {
    source: Arc<dyn Source>,
    state: Mutex<AppendsState>,
}

#[derive(Default)]
struct AppendsState {
    /// The head up to which events have been matched against the waiters: a waiter filed
    /// later looks up what came before by itself, once.
    matched: u64,
    /// Each awaited version's slot, shared by the reads waiting for it: `None` until its
    /// position is known. A slot goes when its last reader does.
    waiting: HashMap<String, HashMap<u64, Slot>>,
    /// The versions this process appended lately.
    recent: Recent,
}

/// Streams remembered per generation by [`Recent`].
const RECENT_STREAMS: usize = 65_536;

/// The newest version this process appended to each stream it wrote lately, and its position:
/// a read that waits for its own write (append, 201, read with `wait_for`) is answered
/// without a lookup in the outbox. Two generations of at most [`RECENT_STREAMS`] streams each,
/// the older dropped when the newer fills. A position, once appended, never changes.
#[derive(Default)]
struct Recent {
    current: HashMap<String, (u64, u64)>,
    previous: HashMap<String, (u64, u64)>,
}

impl Recent {
    fn note(&mut self, stream: &str, version: u64, position: u64) {
        match self.current.get_mut(stream) {
            Some(entry) => *entry = (version, position),
            None => {
                if self.current.len() >= RECENT_STREAMS {
                    self.previous = std::mem::take(&mut self.current);
                }
                self.current.insert(stream.to_owned(), (version, position));
            }
        }
    }

    fn position(&self, stream: &str, version: u64) -> Option<u64> {
        [&self.current, &self.previous]
            .into_iter()
            .find_map(|generation| {
                generation
                    .get(stream)
                    .filter(|(v, _)| *v == version)
                    .map(|(_, position)| *position)
            })
    }
}

struct Slot {
    position: watch::Sender<Option<u64>>,
    /// Counted under the lock (a receiver count would include readers already leaving).
    readers: usize,
}

impl AppendsState {
    /// Resolves the readers of `stream@version`, if any.
    fn resolve(&mut self, stream: &str, version: u64, position: u64) {
        if let Some(slot) = self.waiting.get(stream).and_then(|v| v.get(&version)) {
            slot.position
                .send_if_modified(|p| p.replace(position).is_none());
        }
    }

    fn awaited(&self) -> Vec<StreamVersion> {
        self.waiting
            .iter()
            .flat_map(|(stream, versions)| {
                versions
                    .iter()
                    .filter(|(_, slot)| slot.position.borrow().is_none())
                    .map(|(&version, _)| StreamVersion {
                        stream: stream.clone(),
                        version,
                    })
            })
            .collect()
    }
}

impl Appends {
    /// Starts watching `source`'s head. The watcher ends with the last clone of this value.
    pub fn new(source: Arc<dyn Source>) -> Self {
        let mut head = source.head();
        let matched = *head.borrow_and_update();
        let inner = Arc::new(AppendsInner {
            source,
            state: Mutex::new(AppendsState {
                matched,
                ..AppendsState::default()
            }),
        });
        tokio::spawn(watch_head(Arc::downgrade(&inner), head));
        Self { inner }
    }

    /// This process appended `events` (committed): their readers are answered from what the
    /// append returned.
    pub fn appended(&self, events: &[Appended]) {
        let mut state = self.inner.state();
        for e in events {
            state.recent.note(&e.stream, e.version, e.position);
        }
        if state.waiting.is_empty() {
            return;
        }
        for e in events {
            state.resolve(&e.stream, e.version, e.position);
        }
    }

    /// The position of `wanted`, waiting until it is appended or `deadline` passes.
    pub async fn position_of(
        &self,
        wanted: &StreamVersion,
        deadline: Instant,
    ) -> Result<u64, WaitError> {
        // Filed before the lookup: an event appended between the two resolves the slot.
        let mut waiter = self.file(wanted);
        if let Some(position) = *waiter.slot.borrow() {
            return Ok(position);
        }
        let recent = self
            .inner
            .state()
            .recent
            .position(&wanted.stream, wanted.version);
        if let Some(position) = recent {
            return Ok(position);
        }
        // Once per read, for what came before it was filed.
        if let Some(position) = self
            .inner
            .source
            .position_of(&wanted.stream, wanted.version)
            .await?
        {
            return Ok(position);
        }
        let resolved = tokio::time::timeout_at(deadline, waiter.slot.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|p| *p));
        resolved.ok_or_else(|| WaitError::NotAppended {
            stream: wanted.stream.clone(),
            version: wanted.version,
        })
    }

    fn file(&self, wanted: &StreamVersion) -> VersionWaiter {
        let mut state = self.inner.state();
        let slot = state
            .waiting
            .entry(wanted.stream.clone())
            .or_default()
            .entry(wanted.version)
            .or_insert_with(|| Slot {
                position: watch::Sender::new(None),
                readers: 0,
            });
        slot.readers += 1;
        let slot = slot.position.subscribe();
        VersionWaiter {
            inner: self.inner.clone(),
            stream: wanted.stream.clone(),
            version: wanted.version,
            slot,
        }
    }

    /// How many distinct stream versions are waited for.
    pub fn awaited(&self) -> usize {
        self.inner.state().waiting.values().map(HashMap::len).sum()
    }

    /// How many reads wait for a stream version to be appended.
    pub fn waiting_reads(&self) -> usize {
        self.inner
            .state()
            .waiting
            .values()
            .flat_map(HashMap::values)
            .map(|slot| slot.readers)
            .sum()
    }
}

impl AppendsInner {
    fn state(&self) -> MutexGuard<'_, AppendsState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Matches the events up to `head` against the waiters: nothing to read when nobody
    /// waits; else the events since the last match, or (when they are many) the awaited
    /// versions, in one statement.
    async fn match_up_to(&self, head: u64) -> Result<(), SourceError> {
        let after = {
            let mut state = self.state();
            if head <= state.matched {
                return Ok(());
            }
            if state.waiting.is_empty() {
                state.matched = head;
                return Ok(());
            }
            state.matched
        };
        if let Some(placed) = self.source.placed_between(after, head, SCAN_LIMIT).await? {
            if placed.len() < SCAN_LIMIT {
                let mut state = self.state();
                for Placed {
                    stream,
                    version,
                    position,
                } in placed
                {
                    state.resolve(&stream, version, position);
                }
                state.matched = state.matched.max(head);
                return Ok(());
            }
        }
        // Filed after this point, a waiter looks up by itself what is below `head`.
        let awaited = self.state().awaited();
        let positions = self.source.positions_of(&awaited).await?;
        let mut state = self.state();
        for (wanted, position) in awaited.iter().zip(positions) {
            if let Some(position) = position {
                state.resolve(&wanted.stream, wanted.version, position);
            }
        }
        state.matched = state.matched.max(head);
        Ok(())
    }
}

/// Follows the source's head for as long as the registry lives; a failed lookup is retried
/// (with backoff) until it succeeds, so no event is passed by unmatched.
async fn watch_head(inner: Weak<AppendsInner>, mut head: watch::Receiver<u64>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if head.changed().await.is_err() {
            return;
        }
        loop {
            let Some(inner) = inner.upgrade() else { return };
            let upto = *head.borrow_and_update();
            match inner.match_up_to(upto).await {
                Ok(()) => {
                    backoff = Duration::from_millis(50);
                    break;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "matching appended events against waiting reads failed; retrying");
                    drop(inner);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// A read filed under a stream version; dropping it (answered, timed out, or the client gone)
/// takes the slot away with its last reader.
struct VersionWaiter {
    inner: Arc<AppendsInner>,
    stream: String,
    version: u64,
    slot: watch::Receiver<Option<u64>>,
}

impl Drop for VersionWaiter {
    fn drop(&mut self) {
        let mut state = self.inner.state();
        let Some(versions) = state.waiting.get_mut(&self.stream) else {
            return;
        };
        let Some(slot) = versions.get_mut(&self.version) else {
            return;
        };
        slot.readers = slot.readers.saturating_sub(1);
        if slot.readers == 0 {
            versions.remove(&self.version);
            if versions.is_empty() {
                state.waiting.remove(&self.stream);
            }
        }
    }
}

/// A projection's committed position, and the reads waiting for it to reach theirs, by
/// target: a commit wakes only the reads whose target it reaches (a failure wakes all).
pub struct Committed {
    state: Mutex<CommittedState>,
    /// For observers that follow every change (tests, benches); reads do not use it.
    observed: watch::Sender<Progress>,
}

struct CommittedState {
    progress: Progress,
    /// By (target, ticket): the ticket tells apart reads waiting for the same position.
    waiting: BTreeMap<(u64, u64), oneshot::Sender<()>>,
    next_ticket: u64,
}

impl Committed {
    pub fn new(progress: Progress) -> Self {
        Self {
            state: Mutex::new(CommittedState {
                progress,
                waiting: BTreeMap::new(),
                next_ticket: 0,
            }),
            observed: watch::Sender::new(progress),
        }
    }

    fn state(&self) -> MutexGuard<'_, CommittedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self) -> Progress {
        self.state().progress
    }

    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.observed.subscribe()
    }

    /// Changes the progress; wakes the reads it answers: those whose target it reaches, or all
    /// when the projection has failed or retired.
    pub fn update(&self, change: impl FnOnce(&mut Progress)) {
        let (progress, woken) = {
            let mut state = self.state();
            change(&mut state.progress);
            let progress = state.progress;
            let woken = if progress.failed || progress.retired {
                std::mem::take(&mut state.waiting)
            } else {
                let above = state
                    .waiting
                    .split_off(&(progress.position.saturating_add(1), 0));
                std::mem::replace(&mut state.waiting, above)
            };
            (progress, woken)
        };
        for (_, waiter) in woken {
            let _ = waiter.send(());
        }
        self.observed.send_if_modified(|p| {
            let changed = *p != progress;
            *p = progress;
            changed
        });
    }

    /// Waits until the committed position reaches `target`; returns the position reached.
    pub async fn wait_for(&self, target: u64, deadline: Instant) -> Result<u64, WaitError> {
        let (ticket, woken) = {
            let mut state = self.state();
            let now = state.progress;
            if now.position >= target {
                return Ok(now.position);
            }
            if now.retired {
                return Err(WaitError::Retired {
                    reached: now.position,
                });
            }
            if now.failed {
                return Err(WaitError::Failed {
                    reached: now.position,
                    target,
                });
            }
            let ticket = (target, state.next_ticket);
            state.next_ticket += 1;
            let (tx, rx) = oneshot::channel();
            state.waiting.insert(ticket, tx);
            (ticket, rx)
        };
        let _filed = PositionWaiter {
            committed: self,
            ticket,
        };
        let _ = tokio::time::timeout_at(deadline, woken).await;
        let now = self.get();
        if now.position >= target {
            Ok(now.position)
        } else if now.retired {
            Err(WaitError::Retired {
                reached: now.position,
            })
        } else if now.failed {
            Err(WaitError::Failed {
                reached: now.position,
                target,
            })
        } else {
            Err(WaitError::Timeout {
                reached: now.position,
                target,
            })
        }
    }

    /// How many reads wait.
    pub fn waiting(&self) -> usize {
        self.state().waiting.len()
    }
}

/// A read filed under its target; dropping it (answered, timed out, or the client gone)
/// removes the entry if a commit has not already taken it.
struct PositionWaiter<'a> {
    committed: &'a Committed,
    ticket: (u64, u64),
}

impl Drop for PositionWaiter<'_> {
    fn drop(&mut self) {
        self.committed.state().waiting.remove(&self.ticket);
    }
}

/// `timeout_ms` as asked, capped, or the default.
pub fn deadline(asked_ms: Option<u64>, default_ms: u64, max_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(asked_ms.unwrap_or(default_ms).min(max_ms))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

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

    /// An outbox in memory that counts the lookups made of it.
    #[derive(Default)]
    struct Counting {
        placed: Mutex<Vec<Placed>>,
        head: watch::Sender<u64>,
        /// `placed_between` answers `None`, as a source that cannot compare streams as text.
        no_scan: bool,
        position_of: AtomicUsize,
        placed_between: AtomicUsize,
        positions_of: AtomicUsize,
    }

    impl Counting {
        fn new(no_scan: bool) -> Arc<Self> {
            Arc::new(Self {
                no_scan,
                ..Self::default()
            })
        }

        /// Events written by someone else: the head moves once for all of them.
        fn write(&self, events: &[(&str, u64)]) {
            let mut placed = self.placed.lock().unwrap();
            for (stream, version) in events {
                let position = placed.len() as u64 + 1;
                placed.push(Placed {
                    stream: (*stream).into(),
                    version: *version,
                    position,
                });
            }
            self.head.send_replace(placed.len() as u64);
        }

        fn calls(&self) -> (usize, usize, usize) {
            (
                self.position_of.load(Ordering::SeqCst),
                self.placed_between.load(Ordering::SeqCst),
                self.positions_of.load(Ordering::SeqCst),
            )
        }

        fn find(&self, stream: &str, version: u64) -> Option<u64> {
            let placed = self.placed.lock().unwrap();
            placed
                .iter()
                .find(|p| p.stream == stream && p.version == version)
                .map(|p| p.position)
        }
    }

    #[async_trait]
    impl Source for Counting {
        async fn read(
            &self,
            _: u64,
            _: usize,
            _: usize,
        ) -> Result<Vec<crate::event::Event>, SourceError> {
            Ok(Vec::new())
        }
        fn head(&self) -> watch::Receiver<u64> {
            self.head.subscribe()
        }
        async fn position_of(
            &self,
            stream: &str,
            version: u64,
        ) -> Result<Option<u64>, SourceError> {
            self.position_of.fetch_add(1, Ordering::SeqCst);
            Ok(self.find(stream, version))
        }
        async fn version_at(&self, _: &str, _: u64) -> Result<u64, SourceError> {
            Ok(0)
        }
        async fn placed_between(
            &self,
            after: u64,
            upto: u64,
            limit: usize,
        ) -> Result<Option<Vec<Placed>>, SourceError> {
            self.placed_between.fetch_add(1, Ordering::SeqCst);
            if self.no_scan {
                return Ok(None);
            }
            let placed = self.placed.lock().unwrap();
            Ok(Some(
                placed
                    .iter()
                    .filter(|p| p.position > after && p.position <= upto)
                    .take(limit)
                    .cloned()
                    .collect(),
            ))
        }
        async fn positions_of(
            &self,
            wanted: &[StreamVersion],
        ) -> Result<Vec<Option<u64>>, SourceError> {
            self.positions_of.fetch_add(1, Ordering::SeqCst);
            Ok(wanted
                .iter()
                .map(|w| self.find(&w.stream, w.version))
                .collect())
        }
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    fn sv(stream: &str, version: u64) -> StreamVersion {
        StreamVersion {
            stream: stream.into(),
            version,
        }
    }

    /// Lets the spawned tasks run until `done` holds (single-threaded test runtime: they run
    /// only when this one yields).
    async fn settle(mut done: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the waiters did not settle");
    }

    type Waiting = tokio::task::JoinHandle<Result<u64, WaitError>>;

    fn wait(appends: &Appends, stream: &str, version: u64) -> Waiting {
        let (appends, wanted) = (appends.clone(), sv(stream, version));
        tokio::spawn(async move { appends.position_of(&wanted, later()).await })
    }

    #[tokio::test]
    async fn an_append_resolves_only_the_waiters_it_satisfies_without_a_query() {
        let source = Counting::new(false);
        let appends = Appends::new(source.clone());
        let a = wait(&appends, "a", 1);
        let b = wait(&appends, "b", 1);
        let a2 = wait(&appends, "a", 2);
        settle(|| appends.awaited() == 3 && source.calls().0 == 3).await;
        appends.appended(&[Appended {
            id: "e".into(),
            stream: "a".into(),
            version: 1,
            position: 10,
        }]);
        assert_eq!(a.await.unwrap().unwrap(), 10);
        settle(|| appends.awaited() == 2).await;
        assert!(!b.is_finished() && !a2.is_finished());
        // One lookup per read when it was filed; none since.
        assert_eq!(source.calls(), (3, 0, 0));
        b.abort();
        a2.abort();
    }

    #[tokio::test]
    async fn events_written_by_others_are_matched_in_one_lookup_per_head_move() {
        let source = Counting::new(false);
        let appends = Appends::new(source.clone());
        let waiters: Vec<Waiting> = (0..1_000)
            .map(|i| wait(&appends, &format!("s-{i}"), 1))
            .collect();
        settle(|| appends.awaited() == 1_000 && source.calls().0 == 1_000).await;
        source.write(&[("s-7", 1), ("other", 1)]);
        settle(|| waiters[7].is_finished()).await;
        assert_eq!(source.calls(), (1_000, 1, 0));
        source.write(&[("other", 2), ("s-9", 1), ("s-11", 2)]);
        settle(|| waiters[9].is_finished()).await;
        assert_eq!(
            source.calls(),
            (1_000, 2, 0),
            "one lookup per head move, whatever the waiters"
        );
        assert_eq!(appends.awaited(), 998);
        let answered = waiters.iter().filter(|w| w.is_finished()).count();
        assert_eq!(answered, 2);
        for w in &waiters {
            w.abort();
        }
    }

    #[tokio::test]
    async fn a_read_of_a_version_this_process_appended_lately_looks_nothing_up() {
        let source = Counting::new(false);
        let appends = Appends::new(source.clone());
        source.write(&[("a", 1), ("a", 2), ("b", 1)]);
        let appended = |stream: &str, version, position| Appended {
            id: format!("{stream}-{version}"),
            stream: stream.into(),
            version,
            position,
        };
        appends.appended(&[appended("a", 1, 1), appended("a", 2, 2)]);
        assert_eq!(appends.position_of(&sv("a", 2), later()).await.unwrap(), 2);
        assert_eq!(source.calls(), (0, 0, 0), "the newest appended version");
        // An older version of the stream, or one another writer appended: looked up.
        assert_eq!(appends.position_of(&sv("a", 1), later()).await.unwrap(), 1);
        assert_eq!(appends.position_of(&sv("b", 1), later()).await.unwrap(), 3);
        assert_eq!(source.calls(), (2, 0, 0));
        assert_eq!(appends.awaited(), 0);
    }

    #[test]
    fn recent_versions_are_bounded_to_two_generations() {
        let mut recent = Recent::default();
        for n in 0..RECENT_STREAMS as u64 * 2 + 1 {
            recent.note(&format!("s-{n}"), 1, n + 1);
        }
        assert_eq!(recent.current.len(), 1);
        assert_eq!(recent.previous.len(), RECENT_STREAMS);
        // The first generation is gone; the second is still answered.
        assert_eq!(recent.position("s-0", 1), None);
        assert_eq!(
            recent.position(&format!("s-{}", RECENT_STREAMS), 1),
            Some(RECENT_STREAMS as u64 + 1)
        );
        assert_eq!(
            recent.position(&format!("s-{}", RECENT_STREAMS * 2), 2),
            None,
            "another version"
        );
    }

    #[tokio::test]
    async fn nothing_is_read_when_the_head_moves_and_nobody_waits() {
        let source = Counting::new(false);
        let appends = Appends::new(source.clone());
        for n in 0..20 {
            source.write(&[("a", n + 1)]);
            tokio::task::yield_now().await;
        }
        settle(|| appends.inner.state().matched == 20).await;
        assert_eq!(source.calls(), (0, 0, 0));
        // Filed later, a read finds what came before by itself.
        assert_eq!(appends.position_of(&sv("a", 3), later()).await.unwrap(), 3);
        assert_eq!(appends.awaited(), 0);
    }

    #[tokio::test]
    async fn many_events_at_once_are_looked_up_by_the_awaited_versions_in_one_statement() {
        let source = Counting::new(false);
        let appends = Appends::new(source.clone());
        let waiters: Vec<Waiting> = (0..50)
            .map(|i| wait(&appends, &format!("s-{i}"), 1))
            .collect();
        settle(|| appends.awaited() == 50).await;
        let mut burst: Vec<(String, u64)> = (0..SCAN_LIMIT as u64 + 10)
            .map(|v| ("bulk".to_owned(), v + 1))
            .collect();
        burst.push(("s-3".into(), 1));
        let burst: Vec<(&str, u64)> = burst.iter().map(|(s, v)| (s.as_str(), *v)).collect();
        source.write(&burst);
        let position = SCAN_LIMIT as u64 + 11;
        settle(|| waiters[3].is_finished()).await;
        let (_, scans, lookups) = source.calls();
        assert_eq!((scans, lookups), (1, 1));
        assert_eq!(appends.awaited(), 49);
        assert_eq!(source.find("s-3", 1), Some(position));
        for w in &waiters {
            w.abort();
        }
    }

    #[tokio::test]
    async fn a_source_that_cannot_scan_looks_up_the_awaited_versions_once_per_head_move() {
        let source = Counting::new(true);
        let appends = Appends::new(source.clone());
        let waiters: Vec<Waiting> = (0..300)
            .map(|i| wait(&appends, &format!("s-{i}"), 1))
            .collect();
        settle(|| appends.awaited() == 300).await;
        source.write(&[("s-1", 1)]);
        settle(|| waiters[1].is_finished()).await;
        source.write(&[("s-2", 1)]);
        settle(|| waiters[2].is_finished()).await;
        assert_eq!(source.calls(), (300, 2, 2));
        for w in &waiters {
            w.abort();
        }
    }

    #[tokio::test]
    async fn a_read_that_goes_away_leaves_no_entry() {
        let source = Counting::new(false);
        let appends = Appends::new(source.clone());
        let first = wait(&appends, "a", 1);
        let second = wait(&appends, "a", 1);
        settle(|| source.calls().0 == 2).await;
        assert_eq!(
            appends.awaited(),
            1,
            "two reads of one version share its slot"
        );
        // The client hangs up: the request's future is dropped mid-wait.
        first.abort();
        let _ = first.await;
        assert_eq!(appends.awaited(), 1);
        second.abort();
        let _ = second.await;
        assert_eq!(appends.awaited(), 0);
        assert!(appends.inner.state().waiting.is_empty());
        // Timed out: the same.
        let err = appends
            .position_of(&sv("b", 4), Instant::now() + Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(
            matches!(err, WaitError::NotAppended { ref stream, version: 4 } if stream == "b"),
            "{err}"
        );
        assert_eq!(appends.awaited(), 0);
    }

    #[tokio::test]
    async fn a_version_appended_before_the_read_is_answered_at_once() {
        let source = Counting::new(false);
        source.write(&[("a", 1), ("a", 2)]);
        let appends = Appends::new(source.clone());
        let (target, positions) =
            target_position(&appends, Some(1), &[sv("a", 2), sv("a", 1)], later())
                .await
                .unwrap();
        assert_eq!((target, positions), (2, vec![2, 1]));
        assert_eq!(appends.awaited(), 0);
    }

    fn committed_at(position: u64) -> Arc<Committed> {
        Arc::new(Committed::new(Progress {
            position,
            ..Progress::default()
        }))
    }

    fn commit(committed: &Committed, position: u64) {
        committed.update(|p| p.position = position);
    }

    #[tokio::test]
    async fn a_commit_wakes_only_the_reads_it_reaches() {
        let committed = committed_at(0);
        let reads: Vec<_> = [3, 5, 7, 9]
            .into_iter()
            .map(|target| {
                let committed = committed.clone();
                tokio::spawn(async move { committed.wait_for(target, later()).await })
            })
            .collect();
        settle(|| committed.waiting() == 4).await;
        commit(&committed, 5);
        // Taken off the list by the commit itself: the others were not touched.
        assert_eq!(committed.waiting(), 2);
        let mut reads = reads.into_iter();
        assert_eq!(reads.next().unwrap().await.unwrap().unwrap(), 5);
        assert_eq!(reads.next().unwrap().await.unwrap().unwrap(), 5);
        let (seven, nine) = (reads.next().unwrap(), reads.next().unwrap());
        commit(&committed, 8);
        assert_eq!(seven.await.unwrap().unwrap(), 8);
        assert!(!nine.is_finished());
        nine.abort();
        let _ = nine.await;
        assert_eq!(
            committed.waiting(),
            0,
            "a read that goes away leaves no entry"
        );
    }

    #[tokio::test]
    async fn a_read_times_out_with_the_position_reached() {
        let committed = committed_at(2);
        let err = committed
            .wait_for(5, Instant::now() + Duration::from_millis(20))
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
        assert_eq!(committed.waiting(), 0);
    }

    #[tokio::test]
    async fn a_failed_projection_answers_every_read() {
        let committed = committed_at(2);
        let waiting = {
            let committed = committed.clone();
            tokio::spawn(async move { committed.wait_for(9, later()).await })
        };
        settle(|| committed.waiting() == 1).await;
        committed.update(|p| p.failed = true);
        let err = waiting.await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                WaitError::Failed {
                    reached: 2,
                    target: 9
                }
            ),
            "{err}"
        );
        // And a read that comes after, at once.
        let err = committed.wait_for(5, later()).await.unwrap_err();
        assert!(matches!(err, WaitError::Failed { reached: 2, .. }), "{err}");
        assert_eq!(committed.waiting(), 0);
    }
}
