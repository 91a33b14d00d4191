//! Replicas sharing one store: which one leads, and how the others follow it.
//!
//! The leader holds a lock in the store (a PostgreSQL advisory lock; with SQLite, the only
//! process leads). It alone watches Git, reconciles, issues tokens, drives rollouts and
//! writes the status branch and commit statuses; it publishes its desired state
//! (`reconciler::LeaderState`) and announces each change. Followers read what it published
//! when it announces a change, and every `REREAD` in any case, so a lost announcement heals.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::reconciler::{Event, LeaderState, View};
use crate::store::{Store, StoreError};

/// How often a follower tries to take the lead, and the leader checks it still holds it.
pub const LEAD_CHECK: Duration = Duration::from_secs(1);
/// How long one wait for an announcement lasts (and so how long a stop may wait for it).
const LISTEN_WAIT: Duration = Duration::from_secs(1);
/// A follower reads the published state at least this often, announced or not.
const REREAD: Duration = Duration::from_secs(10);

/// Asks the store whether this replica leads: `None` when it cannot say (out of reach).
async fn lead(store: &Arc<dyn Store>, replica: &str) -> Option<bool> {
    let (store, replica) = (Arc::clone(store), replica.to_owned());
    match tokio::task::spawn_blocking(move || store.lead(&replica)).await.expect("the store does not panic") {
        Ok(leading) => Some(leading),
        // Said every second while it lasts: the writes and reads that fail say it once.
        Err(store_error) => {
            debug!(error = %store_error, "cannot reach the store to settle which replica leads");
            None
        }
    }
}

/// Whether this replica leads now; not when the store is out of reach.
pub async fn try_lead(store: &Arc<dyn Store>, replica: &str) -> bool {
    lead(store, replica).await == Some(true)
}

/// Until this replica leads: tries to take the lead every `LEAD_CHECK`, while
/// `follow_leader` keeps it in step. Returns true once it leads, false when cancelled.
pub async fn wait_to_lead(store: &Arc<dyn Store>, replica: &str, cancel: &CancellationToken) -> bool {
    loop {
        if try_lead(store, replica).await {
            return true;
        }
        tokio::select! {
            () = cancel.cancelled() => return false,
            () = tokio::time::sleep(LEAD_CHECK) => {}
        }
    }
}

/// While this replica leads: checks every `LEAD_CHECK` that it still does. Returns false
/// when another replica took the lead, true when cancelled. While the store is out of
/// reach no one can take it, and this replica goes on (its writes fail meanwhile); the
/// lock's connection lost with the database is taken again under a new term.
pub async fn keep_leading(store: Arc<dyn Store>, replica: String, cancel: CancellationToken) -> bool {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return true,
            () = tokio::time::sleep(LEAD_CHECK) => {}
        }
        if lead(&store, &replica).await == Some(false) {
            error!(replica = %replica, "lost the lead to another replica");
            return false;
        }
    }
}

/// A follower's loop: tells the reconciler to read what the leader published whenever it
/// announces a change, and every `REREAD`. Ends when cancelled (this replica leads).
pub async fn follow_leader(store: Arc<dyn Store>, events: mpsc::Sender<Event>, cancel: CancellationToken) {
    let mut last_read = None::<tokio::time::Instant>;
    let mut failing = false;
    while !cancel.is_cancelled() {
        let waiting = Arc::clone(&store);
        let heard = tokio::task::spawn_blocking(move || waiting.wait_for_change(LISTEN_WAIT))
            .await
            .expect("the store does not panic");
        let heard = match heard {
            Ok(heard) => {
                if failing {
                    info!("hearing the leader's announcements again");
                    failing = false;
                }
                heard.iter().any(|what| what == "state")
            }
            Err(store_error) => {
                if !failing {
                    warn!(error = %store_error, "cannot listen for the leader's announcements; reading every {REREAD:?}");
                    failing = true;
                }
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(LISTEN_WAIT) => {}
                }
                false
            }
        };
        let due = last_read.is_none_or(|at| at.elapsed() >= REREAD);
        if (heard || due) && !cancel.is_cancelled() {
            last_read = Some(tokio::time::Instant::now());
            if events.send(Event::Followed).await.is_err() {
                break;
            }
        }
    }
}

/// The leader's loop: fetches when a follower relays a webhook (`Store::request_fetch`).
pub async fn hear_fetch_requests(
    store: Arc<dyn Store>,
    triggers: mpsc::Sender<crate::git::watcher::Trigger>,
    cancel: CancellationToken,
) {
    while !cancel.is_cancelled() {
        let waiting = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || waiting.wait_for_change(LISTEN_WAIT)).await.expect("no panic") {
            Ok(heard) if heard.iter().any(|what| what == "fetch") => {
                let _ = triggers.try_send(crate::git::watcher::Trigger::Webhook);
            }
            Ok(_) => {}
            // Polling still finds the change; try again in a moment.
            Err(_) => tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(LISTEN_WAIT) => {}
            },
        }
    }
}

/// The leader's loop: publishes what followers need of its view each time that changes.
/// A publish that fails is tried again at the next change or a second later.
pub async fn publish_for_followers(
    store: Arc<dyn Store>,
    mut view: watch::Receiver<Arc<View>>,
    replica: String,
    cancel: CancellationToken,
) {
    let mut published: Option<LeaderState> = None;
    let mut retry = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            changed = view.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
        }
        let Some(state) = LeaderState::of(&view.borrow_and_update(), &replica) else { continue };
        if published.as_ref() == Some(&state) {
            retry = false;
            continue;
        }
        let body = serde_json::to_string(&state).expect("the published state serializes");
        let writing = Arc::clone(&store);
        let written =
            tokio::task::spawn_blocking(move || writing.publish_state(&body)).await.expect("the store does not panic");
        match written {
            Ok(()) => {
                published = Some(state);
                retry = false;
            }
            Err(StoreError::NotLeader { .. }) => {
                warn!("not publishing: another replica leads now");
                break;
            }
            Err(store_error) => {
                if !retry {
                    warn!(error = %store_error, "cannot publish the desired state for the other replicas; trying again");
                }
                retry = true;
            }
        }
    }
}
