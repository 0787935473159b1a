//! The store writer: every commit runs here, off the registry actor, so a slow disk never
//! holds up a read.
//!
//! Writes that arrive while a commit is in flight share the next transaction (group commit).
//! Durable writes (registrations, deletions) get their own outcome; background batches
//! (monitor results) that fail are kept, merged with newer ones and retried with back-off, and
//! while writes fail the writer probes the disk so health recovers without a restart.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::store::{CommitOutcome, Store, StoreError, WriteBatch};

/// The first retry after a failed commit, doubling up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(500);
/// Health recovers within this much of the disk recovering.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

enum Job {
    /// Must be on disk before its sender hears `Ok`.
    Durable(WriteBatch, oneshot::Sender<Result<(), StoreError>>),
    /// Written with the next commit; kept and retried if that fails.
    Background(WriteBatch),
    /// Answered once everything sent before it has been attempted.
    Sync(oneshot::Sender<()>),
}

/// A handle to the writer task. Clones share it; the task ends when the last one is dropped.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::UnboundedSender<Job>,
    health: watch::Receiver<Option<String>>,
}

impl Writer {
    /// Starts the writer task on `store`.
    pub fn spawn(store: Store) -> Self {
        let (jobs, receiver) = mpsc::unbounded_channel();
        let (health_tx, health) = watch::channel(None);
        tokio::spawn(run(store, receiver, health_tx));
        Self { jobs, health }
    }

    /// Resolves once `batch` is durable, or with the reason it is not.
    pub fn write_durably(
        &self,
        batch: WriteBatch,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (done, outcome) = oneshot::channel();
        let sent = self.jobs.send(Job::Durable(batch, done));
        async move {
            sent.map_err(|_| stopped())?;
            outcome.await.map_err(|_| stopped())?
        }
    }

    /// Queues `batch` for the next commit.
    pub fn write_in_background(&self, batch: WriteBatch) {
        if batch.is_empty() {
            return;
        }
        if self.jobs.send(Job::Background(batch)).is_err() {
            tracing::error!("the store writer has stopped; monitor results are not persisted");
        }
    }

    /// Waits until everything queued so far has been attempted.
    pub async fn sync(&self) {
        let (done, finished) = oneshot::channel();
        if self.jobs.send(Job::Sync(done)).is_ok() {
            let _ = finished.await;
        }
    }

    /// Why writes are failing, or `None` while they succeed.
    pub fn failure(&self) -> Option<String> {
        self.health.borrow().clone()
    }
}

fn stopped() -> StoreError {
    StoreError::Database("the store writer has stopped".into())
}

async fn run(
    store: Store,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    health: watch::Sender<Option<String>>,
) {
    let mut pending = WriteBatch::default();
    let mut retry_delay = FIRST_RETRY_DELAY;
    // Fixed when a commit fails, so jobs arriving meanwhile do not restart the back-off.
    let mut next_retry = tokio::time::Instant::now();
    loop {
        let failing = health.borrow().is_some();
        let first = if failing {
            tokio::select! {
                job = jobs.recv() => job,
                () = tokio::time::sleep_until(next_retry) => {
                    if pending.is_empty() {
                        probe(&store, &health).await;
                    } else {
                        let outcome = commit(&store, pending.clone(), Vec::new(), &health).await;
                        if !matches!(outcome.background, Err(StoreError::Database(_) | StoreError::Unavailable(_))) {
                            pending = WriteBatch::default();
                        }
                    }
                    retry_delay = if health.borrow().is_none() {
                        FIRST_RETRY_DELAY
                    } else {
                        (retry_delay * 2).min(MAX_RETRY_DELAY)
                    };
                    next_retry = tokio::time::Instant::now() + retry_delay;
                    continue;
                }
            }
        } else {
            jobs.recv().await
        };
        let Some(first) = first else {
            // Every handle is gone: a last attempt at what is pending, then stop.
            if !pending.is_empty() {
                let _ = commit(&store, pending, Vec::new(), &health).await;
            }
            return;
        };
        // Whatever else is already queued joins this commit.
        let mut durable = Vec::new();
        let mut durable_batches = Vec::new();
        let mut syncs = Vec::new();
        let mut background = std::mem::take(&mut pending);
        let mut next = Some(first);
        while let Some(job) = next {
            match job {
                Job::Durable(part, done) => {
                    durable_batches.push(part);
                    durable.push(done);
                }
                Job::Background(part) => background.merge(part),
                Job::Sync(done) => syncs.push(done),
            }
            next = jobs.try_recv().ok();
        }
        if failing && durable.is_empty() {
            // Monitor results wait for the next retry rather than hammering a failing store.
            pending = background;
        } else if !background.is_empty() || !durable.is_empty() {
            let outcome = commit(&store, background.clone(), durable_batches, &health).await;
            for (done, result) in durable.into_iter().zip(outcome.durable) {
                let _ = done.send(result);
            }
            // Only monitor results are kept for the retry: a failed registration or deletion
            // was answered with an error and must not happen later behind the client's back.
            // Results a deposed leader wrote are dropped: the new leader has its own.
            pending = match outcome.background {
                Err(StoreError::NotLeader) => {
                    tracing::warn!("monitor results dropped: no longer the leader");
                    WriteBatch::default()
                }
                Err(_) => background,
                Ok(()) => WriteBatch::default(),
            };
            if health.borrow().is_some() {
                next_retry = tokio::time::Instant::now() + retry_delay;
            } else {
                retry_delay = FIRST_RETRY_DELAY;
            }
        }
        for done in syncs {
            let _ = done.send(());
        }
    }
}

/// Commits and records the outcome as the writer's health. A rejected status write of a
/// deposed leader or a taken name says nothing about the storage's health.
async fn commit(
    store: &Store,
    background: WriteBatch,
    durable: Vec<WriteBatch>,
    health: &watch::Sender<Option<String>>,
) -> CommitOutcome {
    let store = store.clone();
    let count = durable.len();
    let outcome = tokio::task::spawn_blocking(move || store.commit(&background, &durable))
        .await
        .unwrap_or_else(|e| {
            let failed = StoreError::Database(format!("the commit task failed: {e}"));
            CommitOutcome {
                background: Err(failed.clone()),
                durable: vec![Err(failed); count],
            }
        });
    let failure = std::iter::once(&outcome.background)
        .chain(&outcome.durable)
        .find_map(|result| match result {
            Err(StoreError::NotLeader | StoreError::NameTaken) | Ok(()) => None,
            Err(e) => Some(e),
        });
    match failure {
        None => {
            if health.send_replace(None).is_some() {
                tracing::info!("storage writes succeed again");
            }
        }
        Some(e) => {
            tracing::error!(error = %e, "cannot write to the storage; will retry");
            health.send_replace(Some(e.to_string()));
        }
    }
    outcome
}

async fn probe(store: &Store, health: &watch::Sender<Option<String>>) {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || store.probe()).await {
        Ok(Ok(())) => {
            tracing::info!("database writes succeed again");
            health.send_replace(None);
        }
        Ok(Err(e)) => {
            health.send_replace(Some(e.to_string()));
        }
        Err(e) => {
            health.send_replace(Some(format!("the probe task failed: {e}")));
        }
    }
}

/// A cluster's record and the history it recorded since the last batch.
pub(super) fn batch_of(cluster: &mut crate::cluster::Cluster) -> WriteBatch {
    let mut batch = WriteBatch::default();
    let id = cluster.id();
    let (history, trim) = cluster.take_unstored_history();
    batch
        .history
        .extend(history.into_iter().map(|(sequence, t)| (id, sequence, t)));
    if let Some(below) = trim {
        batch.trims.insert(id, below);
    }
    batch.records.insert(id, cluster.record.clone());
    batch
}
