//! Durable state: what Git cannot hold. Everything goes through the `Store` trait so that a
//! PostgreSQL backend can serve several replicas later; `sqlite` is the embedded one.
//!
//! The store only records what was observed (versions first seen, last good fleets,
//! reconcile history). Git stays the only source of desired state.

#[doc(hidden)]
pub mod conformance;
mod pg_tls;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::install::token::IssuedToken;
use crate::problem::Problem;
use crate::repo::desired::{LastGoodFleet, SeenVersion};

/// What a backend's own error is carried as: the store's errors name no backend.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}: {source}")]
    Open { path: String, source: BackendError },
    #[error("state database migration to version {version} failed: {source}")]
    Migrate { version: usize, source: BackendError },
    #[error("state database {operation} failed: {source}")]
    Query { operation: &'static str, source: BackendError },
    #[error("state database holds a corrupt {what}: {message}")]
    Corrupt { what: &'static str, message: String },
    #[error("state database is version {found}, newer than this gitfleet understands ({supported}); upgrade gitfleet")]
    TooNew { found: usize, supported: usize },
    #[error("state database {operation} refused: another replica leads now")]
    NotLeader { operation: &'static str },
}

/// One reconcile of a new commit (or of new problems at the same commit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReconcileRecord {
    pub commit: String,
    pub branch: String,
    /// Unix seconds.
    pub reconciled_at: i64,
    pub duration_micros: u64,
    pub problems: Vec<Problem>,
}

/// An instance as the store keeps it: plain fields, JSON for the nested reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredInstance {
    pub uid: [u8; 16],
    pub fleet: String,
    pub token_id: String,
    pub capabilities: u64,
    /// The assignment it was last synced to: hash and tag.
    pub assigned: Option<(Vec<u8>, String)>,
    pub served_hash: Option<Vec<u8>>,
    /// Hash, status (`applied`, …) and error message of the last remote config status.
    pub reported: Option<(Vec<u8>, String, String)>,
    /// The assigned hash it failed, with the error.
    pub failed: Option<(Vec<u8>, String)>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub status: String,
    pub transport: Option<String>,
    /// JSON documents. `effective_config` is `None` when it did not change since the last
    /// write (it is then left as it is in the store).
    pub description: Option<String>,
    pub health: Option<String>,
    pub effective_config: Option<String>,
    /// The hash of its build's component list (`Store::available_components`).
    pub components_hash: Option<Vec<u8>>,
    /// The replica that wrote it last, and whether it had a live WebSocket session with it
    /// then. A store only one process uses keeps neither: `""` and false.
    pub holder: String,
    pub connected: bool,
}

/// A fleet's rollout as stored: JSON (`rollout::Rollout`), and the instances it moved
/// (`rollout::members_to_bytes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRollout {
    pub body: String,
    pub members: Vec<u8>,
}

/// A fleet removed from the repository. Its collectors keep what they run and may still
/// connect, observe only, until `until`; then its tokens are refused, and a fleet of that
/// name that comes back gets a new token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovedFleet {
    /// Unix seconds.
    pub removed_at: i64,
    /// The commit that removed it.
    pub commit: String,
    /// Unix seconds from which none of its tokens is accepted.
    pub until: i64,
    /// The tokens it had accepted when it was removed, each with the Unix second from which
    /// it is refused (its own expiry or grace, if sooner than `until`).
    pub tokens: Vec<(String, i64)>,
}

/// One history entry of an instance; `event` is JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    pub uid: [u8; 16],
    pub at_ms: i64,
    pub event: String,
}

/// A commit status as last posted to a forge, so that a restart does not post it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostedStatus {
    /// Which forge and repository (its API address).
    pub forge: String,
    /// `gitfleet/<fleet>`.
    pub context: String,
    pub commit: String,
    /// `pending`, `success` or `failure`.
    pub state: String,
    pub description: String,
}

/// Blocking: call from a blocking thread (`spawn_blocking`), never on the async runtime.
pub trait Store: Send + Sync + 'static {
    /// Every version seen so far, by tag, with the content first seen.
    fn seen_versions(&self) -> Result<BTreeMap<String, SeenVersion>, StoreError>;
    /// Remembers versions seen for the first time. A tag already remembered is left alone.
    fn remember_versions(&self, versions: &[SeenVersion]) -> Result<(), StoreError>;
    fn last_good_fleets(&self) -> Result<BTreeMap<String, LastGoodFleet>, StoreError>;
    /// Writes the fleets whose last good state changed in one transaction; `None` forgets
    /// the fleet's (it left the repository).
    fn save_last_good_fleets(&self, changed: &[(String, Option<LastGoodFleet>)]) -> Result<(), StoreError>;
    fn record_reconcile(&self, record: &ReconcileRecord) -> Result<(), StoreError>;
    /// Each fleet's rollout.
    fn rollouts(&self) -> Result<BTreeMap<String, StoredRollout>, StoreError>;
    /// Writes rollouts in one transaction; `None` forgets the fleet's.
    fn save_rollouts(&self, changed: &[(String, Option<StoredRollout>)]) -> Result<(), StoreError>;
    /// Fleets removed from the repository (`RemovedFleet`), by name.
    fn removed_fleets(&self) -> Result<BTreeMap<String, RemovedFleet>, StoreError>;
    /// Writes removals in one transaction; `None` forgets the fleet's (it came back).
    fn save_removed_fleets(&self, changed: &[(String, Option<RemovedFleet>)]) -> Result<(), StoreError>;
    /// Every install token ever issued (hashes only), oldest first.
    fn tokens(&self) -> Result<Vec<IssuedToken>, StoreError>;
    /// Writes newly issued tokens in one transaction.
    fn save_tokens(&self, tokens: &[IssuedToken]) -> Result<(), StoreError>;
    /// Writes instances and new history entries in one transaction.
    fn save_instances(&self, instances: &[StoredInstance], events: &[StoredEvent]) -> Result<(), StoreError>;
    /// Every instance, with its newest `events_per_instance` history entries (oldest first).
    fn load_instances(&self, events_per_instance: usize)
    -> Result<Vec<(StoredInstance, Vec<StoredEvent>)>, StoreError>;
    /// Remembers component lists (hash, JSON); a hash already remembered is left alone.
    fn save_available_components(&self, lists: &[(Vec<u8>, String)]) -> Result<(), StoreError>;
    /// Every component list remembered: hash and JSON.
    fn available_components(&self) -> Result<Vec<(Vec<u8>, String)>, StoreError>;
    /// The effective config an instance last reported (JSON), which is not kept in memory.
    fn effective_config(&self, uid: [u8; 16]) -> Result<Option<String>, StoreError>;
    /// Keeps only the newest `per_instance` history entries of each instance.
    fn prune_events(&self, per_instance: usize) -> Result<usize, StoreError>;
    /// Deletes instances and their history.
    fn forget_instances(&self, uids: &[[u8; 16]]) -> Result<(), StoreError>;
    /// The newest reconciles first.
    fn reconcile_history(&self, limit: usize) -> Result<Vec<ReconcileRecord>, StoreError>;
    /// The commit statuses last posted to `forge`.
    fn posted_statuses(&self, forge: &str) -> Result<Vec<PostedStatus>, StoreError>;
    /// Remembers a posted commit status (replacing the one before for its context).
    fn save_posted_status(&self, status: &PostedStatus) -> Result<(), StoreError>;

    // Replicas. A store only one process uses (SQLite) makes it the leader, with no one to
    // publish to.

    /// Whether other processes may share this store (replicas).
    fn shared(&self) -> bool {
        false
    }
    /// Takes the leadership, or keeps it: true while this process leads. `replica` names
    /// it to the others. False after true: another replica took it, and writes only the
    /// leader makes fail with `StoreError::NotLeader`. An error says nothing either way (the
    /// database is out of reach, and no one can take the lead meanwhile).
    fn lead(&self, _replica: &str) -> Result<bool, StoreError> {
        Ok(true)
    }
    /// The instances `replica` holds, or that no replica wrote, each with its newest
    /// `events_per_instance` history entries: what a replica restores at startup. A store
    /// only one process uses holds them all.
    fn held_instances(
        &self,
        _replica: &str,
        events_per_instance: usize,
    ) -> Result<Vec<(StoredInstance, Vec<StoredEvent>)>, StoreError> {
        self.load_instances(events_per_instance)
    }
    /// The instances replicas other than `replica` hold, of `fleet` or of every fleet,
    /// without history or effective config, in `uid` order.
    fn instances_held_elsewhere(
        &self,
        _replica: &str,
        _fleet: Option<&str>,
    ) -> Result<Vec<StoredInstance>, StoreError> {
        Ok(Vec::new())
    }
    /// The instances `uids`, each with its newest `events_per_instance` history entries.
    fn instances_by_uid(
        &self,
        _uids: &[[u8; 16]],
        _events_per_instance: usize,
    ) -> Result<Vec<(StoredInstance, Vec<StoredEvent>)>, StoreError> {
        Ok(Vec::new())
    }
    /// The instances `replica` held that another replica wrote since the change `after`,
    /// each with its change number. The numbers grow with each write; a write's number is
    /// taken before it commits, so a reader asks again a little behind the highest it saw.
    fn instances_moved_away(&self, _replica: &str, _after: i64) -> Result<Vec<([u8; 16], i64)>, StoreError> {
        Ok(Vec::new())
    }
    /// Replicas other than `replica` that hold instances but have not written their counts
    /// (`save_counts`) for `silent_ms`, by the database's clock: gone.
    fn gone_replicas(&self, _replica: &str, _silent_ms: i64) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
    /// The leader makes itself (`to`) the holder of every instance the gone replica `from`
    /// holds, and forgets its counts; returns their ids.
    fn take_over_instances(&self, _from: &str, _to: &str) -> Result<Vec<[u8; 16]>, StoreError> {
        Ok(Vec::new())
    }
    /// Writes what `replica`'s instances add up to (JSON, `registry::ReplicaCounts`).
    fn save_counts(&self, _replica: &str, _body: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Every replica's counts: its name, the JSON, and how long ago it was written by the
    /// database's clock (milliseconds), so that replicas' clocks need not agree.
    fn replica_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        Ok(Vec::new())
    }
    /// Which replica leads, and since when (Unix seconds).
    fn leader(&self) -> Result<Option<(String, i64)>, StoreError> {
        Ok(None)
    }
    /// The leader's desired state for followers (`replica::Published`, JSON); tells them.
    fn publish_state(&self, _body: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// What the leader last published.
    fn published_state(&self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
    /// Waits at most `timeout` for announcements between replicas: `state` (the leader
    /// published a state or a rollout; also said when announcements may have gone unheard)
    /// and `fetch` (`request_fetch`). Empty when none came.
    fn wait_for_change(&self, timeout: std::time::Duration) -> Result<Vec<String>, StoreError> {
        std::thread::sleep(timeout);
        Ok(Vec::new())
    }
    /// Asks the leader to fetch the repository now (a webhook reached a follower).
    fn request_fetch(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
