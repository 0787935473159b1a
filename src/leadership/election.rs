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
    /// etcd did not renew it, or could not be reached.
    Lost(String),
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
                Role::Leader => tracing::info!(instance = %self.instance, "this instance is now the leader"),
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
            let LeaseEnd::Lost(why) = self.hold_a_lease().await;
            self.step_down(Some(why));
            tokio::time::sleep(RETRY_DELAY).await;
        }
    }

    /// Grants a lease and campaigns with it until it is lost.
    async fn hold_a_lease(&mut self) -> LeaseEnd {
        let mut client = self.store.client();
        let ttl_seconds = i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted_at = Instant::now();
        let lease = match client.lease_grant(ttl_seconds, None).await {
            Ok(lease) => {
                self.lease = Some(lease.id());
                lease.id()
            }
            Err(e) => return LeaseEnd::Lost(format!("cannot obtain an etcd lease: {e}")),
        };
        let (mut keeper, mut renewals) = match client.lease_keep_alive(lease).await {
            Ok(pair) => pair,
            Err(e) => return LeaseEnd::Lost(format!("cannot renew the etcd lease: {e}")),
        };
        let mut renewed_at = granted_at;
        let leader_key = self.store.keys().leader();
        let mut tick = tokio::time::interval(self.renew_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Campaign: create the leader key if there is none.
            let campaign = client
                .txn(
                    Txn::new()
                        .when([Compare::create_revision(leader_key.as_str(), CompareOp::Equal, 0)])
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
                Err(e) => return LeaseEnd::Lost(format!("etcd is unreachable: {e}")),
            };
            let revision = campaign.header().map_or(0, |h| h.revision());
            let leading = if campaign.succeeded() {
                self.store.set_fence(Some(revision));
                self.show(Leadership {
                    role: Role::Leader,
                    leader: Some(self.instance.clone()),
                    storage_error: None,
                });
                true
            } else {
                let holder = campaign.op_responses().into_iter().find_map(|r| match r {
                    TxnOpResponse::Get(get) => get.kvs().first().map(|kv| {
                        (
                            String::from_utf8_lossy(kv.value()).into_owned(),
                            kv.lease(),
                        )
                    }),
                    _ => None,
                });
                match holder {
                    // Ours from a lease lost earlier: it goes with that lease, but sooner is
                    // better than waiting out its TTL.
                    Some((holder, old_lease)) if holder == self.instance && old_lease != lease => {
                        let _ = client.lease_revoke(old_lease).await;
                        continue;
                    }
                    holder => {
                        self.store.set_fence(None);
                        self.show(Leadership {
                            role: Role::Follower,
                            leader: holder.map(|(id, _)| id),
                            storage_error: None,
                        });
                    }
                }
                false
            };
            let mut watch = match client
                .watch(
                    leader_key.as_str(),
                    Some(WatchOptions::new().with_start_revision(revision + 1)),
                )
                .await
            {
                Ok(stream) => stream,
                Err(e) => return LeaseEnd::Lost(format!("cannot watch the leader key: {e}")),
            };
            // Renew the lease; follow the leader key until it is deleted (then campaign again).
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if renewed_at.elapsed() > self.step_down_after() && leading {
                            return LeaseEnd::Lost(
                                "the etcd lease was not renewed in time".into(),
                            );
                        }
                        if renewed_at.elapsed() > self.ttl {
                            return LeaseEnd::Lost("the etcd lease expired".into());
                        }
                        let sent = Instant::now();
                        if keeper.keep_alive().await.is_err() {
                            return LeaseEnd::Lost("cannot renew the etcd lease".into());
                        }
                        let answer = tokio::time::timeout(self.renew_every(), renewals.message()).await;
                        match answer {
                            Ok(Ok(Some(renewal))) if renewal.ttl() > 0 => renewed_at = sent,
                            Ok(Ok(Some(_))) => return LeaseEnd::Lost("the etcd lease expired".into()),
                            Ok(Ok(None)) | Ok(Err(_)) => {
                                return LeaseEnd::Lost("the etcd lease renewal stream broke".into());
                            }
                            // No answer yet: the next tick tries again, the deadline decides.
                            Err(_) => {}
                        }
                    }
                    event = watch.message() => {
                        let response = match event {
                            Ok(Some(response)) => response,
                            Ok(None) | Err(_) => {
                                return LeaseEnd::Lost("the leader key watch broke".into());
                            }
                        };
                        let deleted = response.events().iter().any(|e| e.event_type() == EventType::Delete);
                        if deleted {
                            if leading {
                                return LeaseEnd::Lost("the leader key was removed".into());
                            }
                            break;
                        }
                        if let Some(kv) = response.events().iter().filter_map(|e| e.kv()).next_back() {
                            let holder = String::from_utf8_lossy(kv.value()).into_owned();
                            if leading && holder != self.instance {
                                return LeaseEnd::Lost("another instance took the leader key".into());
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
}
