//! The election among instances sharing etcd.
//!
//! Each instance holds a lease and keeps it alive. The leader key is created in a transaction
//! that succeeds only while no leader key exists, bound to the creator's lease, so it vanishes
//! when the leader stops renewing. The key's creation revision is the fence: every status write
//! compares it in the same transaction. A leader that has not heard its lease renewed for three
//! quarters of the TTL steps down on its own, before the lease can have expired at etcd.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, Txn, TxnOp, TxnOpResponse, WatchOptions};
use ractor::ActorRef;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Leadership, Role};
use crate::registry::RegistryMsg;
use crate::store::etcd::EtcdStore;

/// How long to wait before trying etcd again after it failed.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Between attempts within one lease, e.g. while etcd elects a new leader member.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Renewal attempts per tick before waiting for the next one.
const RENEWAL_ATTEMPTS: usize = 4;

/// Runs the election until `stop` turns true; then a leader gives its lease back, so another
/// instance takes over at once.
pub async fn run(
    store: EtcdStore,
    instance: String,
    ttl: Duration,
    registry: ActorRef<RegistryMsg>,
    mut stop: watch::Receiver<bool>,
) {
    let mut election = Election {
        store,
        instance,
        ttl,
        registry,
        shown: Leadership::undecided(),
        lease: None,
    };
    tokio::select! {
        () = election.run_forever() => {}
        _ = stop.wait_for(|stop| *stop) => {}
    }
    election.step_down(None);
    if let Some(lease) = election.lease {
        let mut client = election.store.client();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
    }
}

struct Election {
    store: EtcdStore,
    instance: String,
    ttl: Duration,
    registry: ActorRef<RegistryMsg>,
    shown: Leadership,
    /// The lease held now, given back at shutdown.
    lease: Option<i64>,
}

/// Why a lease ended.
enum LeaseEnd {
    /// etcd could not be reached in time: the store is unavailable.
    Unreachable(String),
    /// etcd answers, but the lease is gone or may be (after a freeze, say).
    Expired(String),
}

impl Election {
    fn renew_every(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(200))
    }

    /// A leader must have stopped before the lease may have expired at etcd.
    fn step_down_after(&self) -> Duration {
        self.ttl * 3 / 4
    }

    fn show(&mut self, leadership: Leadership) {
        if leadership != self.shown {
            match leadership.role {
                Role::Leader => {
                    tracing::info!(instance = %self.instance, "this instance is now the leader")
                }
                Role::Follower if self.shown.role == Role::Leader => {
                    tracing::warn!(instance = %self.instance, "this instance is no longer the leader");
                }
                _ => {}
            }
            self.shown = leadership.clone();
            let _ = self.registry.cast(RegistryMsg::Leadership(leadership));
        }
    }

    fn step_down(&mut self, storage_error: Option<String>) {
        self.store.set_fence(None);
        let leader = if self.shown.role == Role::Leader {
            None
        } else {
            self.shown.leader.clone()
        };
        self.show(Leadership {
            role: Role::Follower,
            leader,
            storage_error,
        });
    }

    async fn run_forever(&mut self) {
        loop {
            match self.hold_a_lease().await {
                LeaseEnd::Unreachable(why) => {
                    self.step_down(Some(why));
                    tokio::time::sleep(RETRY_DELAY).await;
                }
                // etcd answers: a new lease at once (after a freeze, say).
                LeaseEnd::Expired(why) => {
                    tracing::warn!(reason = %why, "the etcd lease ended");
                    self.step_down(None);
                }
            }
        }
    }

    /// Grants a lease and campaigns with it until it is lost. A broken stream (an etcd member
    /// went away) is re-opened on another member; only a lease that may have expired ends it.
    async fn hold_a_lease(&mut self) -> LeaseEnd {
        let mut client = self.store.client();
        let ttl_seconds = i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted_at = Instant::now();
        let lease = match client.lease_grant(ttl_seconds, None).await {
            Ok(lease) => {
                self.lease = Some(lease.id());
                lease.id()
            }
            Err(e) => return LeaseEnd::Unreachable(format!("cannot obtain an etcd lease: {e}")),
        };
        let mut renewed_at = granted_at;
        let mut renewal: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> =
            None;
        let mut last_error = String::new();
        let leader_key = self.store.keys().leader();
        let mut tick = tokio::time::interval(self.renew_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether the lease may be gone: past the TTL for anyone, past the step-down margin
        // for the leader.
        let (step_down_after, ttl) = (self.step_down_after(), self.ttl);
        let expired = move |renewed_at: Instant, leading: bool, last_error: &str| {
            let limit = if leading { step_down_after } else { ttl };
            (renewed_at.elapsed() >= limit).then(|| {
                if last_error.is_empty() {
                    LeaseEnd::Expired("the etcd lease was not renewed in time".to_owned())
                } else {
                    LeaseEnd::Unreachable(format!("etcd is unreachable: {last_error}"))
                }
            })
        };
        let mut leading = false;
        loop {
            if let Some(end) = expired(renewed_at, leading, &last_error) {
                return end;
            }
            // Campaign: create the leader key if there is none.
            let campaign = client
                .txn(
                    Txn::new()
                        .when([Compare::create_revision(
                            leader_key.as_str(),
                            CompareOp::Equal,
                            0,
                        )])
                        .and_then([TxnOp::put(
                            leader_key.as_str(),
                            self.instance.as_str(),
                            Some(etcd_client::PutOptions::new().with_lease(lease)),
                        )])
                        .or_else([TxnOp::get(leader_key.as_str(), None)]),
                )
                .await;
            let campaign = match campaign {
                Ok(response) => response,
                Err(e) => {
                    last_error = e.to_string();
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            };
            let revision = campaign.header().map_or(0, |h| h.revision());
            let holder = campaign.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| Holder {
                    id: String::from_utf8_lossy(kv.value()).into_owned(),
                    lease: kv.lease(),
                    created: kv.create_revision(),
                }),
                _ => None,
            });
            let fence = match holder {
                None if campaign.succeeded() => Some(revision),
                // Still ours: the watch broke, not the lease.
                Some(holder) if holder.lease == lease => Some(holder.created),
                // Ours from a lease lost earlier: it goes with that lease, but sooner is
                // better than waiting out its TTL.
                Some(holder) if holder.id == self.instance => {
                    let _ = client.lease_revoke(holder.lease).await;
                    continue;
                }
                Some(holder) => {
                    self.store.set_fence(None);
                    self.show(Leadership {
                        role: Role::Follower,
                        leader: Some(holder.id),
                        storage_error: None,
                    });
                    None
                }
                None => continue,
            };
            leading = fence.is_some();
            if let Some(fence) = fence {
                self.store.set_fence(Some(fence));
                self.show(Leadership {
                    role: Role::Leader,
                    leader: Some(self.instance.clone()),
                    storage_error: None,
                });
            }
            let mut watch = match client
                .watch(
                    leader_key.as_str(),
                    Some(WatchOptions::new().with_start_revision(revision + 1)),
                )
                .await
            {
                Ok(stream) => stream,
                Err(e) => {
                    last_error = e.to_string();
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            };
            last_error.clear();
            // Renew the lease; follow the leader key until it is deleted (then campaign again).
            loop {
                let limit = if leading { step_down_after } else { ttl };
                tokio::select! {
                    // The margin is kept to the moment, not to the next renewal's tick.
                    () = tokio::time::sleep_until(renewed_at + limit) => {
                        if let Some(end) = expired(renewed_at, leading, &last_error) {
                            return end;
                        }
                    }
                    _ = tick.tick() => {
                        if let Some(end) = expired(renewed_at, leading, &last_error) {
                            return end;
                        }
                        // A failed renewal is tried again at once, a few times: the client
                        // spreads attempts over the members, and one may be gone.
                        for _ in 0..RENEWAL_ATTEMPTS {
                            match self.renew(&mut client, lease, &mut renewal).await {
                                Ok(Some(sent)) => {
                                    renewed_at = sent;
                                    last_error.clear();
                                    break;
                                }
                                Ok(None) => break,
                                Err(RenewError::Expired) => {
                                    return LeaseEnd::Expired("etcd says the lease expired".into());
                                }
                                Err(RenewError::Failed(e)) => {
                                    last_error = e;
                                    if expired(renewed_at, leading, &last_error).is_some() {
                                        break;
                                    }
                                    tokio::time::sleep(RETRY_PAUSE).await;
                                }
                            }
                        }
                    }
                    event = watch.message() => {
                        let response = match event {
                            Ok(Some(response)) => response,
                            // Re-opened by the next campaign round.
                            Ok(None) | Err(_) => break,
                        };
                        let deleted = response.events().iter().any(|e| e.event_type() == EventType::Delete);
                        if deleted {
                            if leading {
                                self.store.set_fence(None);
                                return LeaseEnd::Expired("the leader key was removed".into());
                            }
                            break;
                        }
                        if let Some(kv) = response.events().iter().filter_map(|e| e.kv()).next_back() {
                            let holder = String::from_utf8_lossy(kv.value()).into_owned();
                            if leading && holder != self.instance {
                                self.store.set_fence(None);
                                return LeaseEnd::Expired("another instance took the leader key".into());
                            }
                            if !leading {
                                self.show(Leadership {
                                    role: Role::Follower,
                                    leader: Some(holder),
                                    storage_error: None,
                                });
                            }
                        }
                    }
                }
            }
        }
    }

    /// One renewal; `Some(sent)` when etcd confirmed it, with when it was sent. A broken
    /// renewal stream is opened again (on another member, if one went away).
    async fn renew(
        &self,
        client: &mut etcd_client::Client,
        lease: i64,
        renewal: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    ) -> Result<Option<Instant>, RenewError> {
        if renewal.is_none() {
            *renewal = Some(
                client
                    .lease_keep_alive(lease)
                    .await
                    .map_err(|e| RenewError::Failed(e.to_string()))?,
            );
        }
        let Some((keeper, answers)) = renewal.as_mut() else {
            return Ok(None);
        };
        let sent = Instant::now();
        if let Err(e) = keeper.keep_alive().await {
            *renewal = None;
            return Err(RenewError::Failed(e.to_string()));
        }
        // Short enough that the step-down deadline is never waited past by much.
        match tokio::time::timeout(self.renew_every() / 2, answers.message()).await {
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => Ok(Some(sent)),
            Ok(Ok(Some(_))) => Err(RenewError::Expired),
            Ok(Ok(None)) => {
                *renewal = None;
                Err(RenewError::Failed("the renewal stream ended".into()))
            }
            Ok(Err(e)) => {
                *renewal = None;
                Err(RenewError::Failed(e.to_string()))
            }
            // No answer: the stream may hang on a member that is gone. The next attempt opens
            // a new one, on another member.
            Err(_) => {
                *renewal = None;
                Err(RenewError::Failed("no answer to the lease renewal".into()))
            }
        }
    }
}

/// The leader key as etcd holds it.
struct Holder {
    id: String,
    lease: i64,
    created: i64,
}

/// Why a renewal did not renew.
enum RenewError {
    /// etcd answered that the lease is gone.
    Expired,
    /// etcd could not be asked.
    Failed(String),
}
