//! Every instance gitfleet knows, in memory, sharded so that thousands of connections can
//! update their own record without waiting on each other. A lock is held only for the
//! duration of a pure update, never across an `.await`.
//!
//! What an instance reported (description, health, effective config, remote config status)
//! is kept whole; its status against the fleet's assignment comes from `instance::ConfigState`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::instance::{Assignment, Change, ConfigState, Status};
use crate::opamp::codec::InstanceUid;
use crate::rollout::{Decision, Rollout};
use crate::status::{Failure, InstanceRow, Tally};

const SHARDS: usize = 64;

/// Bumped whenever an instance's status or health changes: running rollouts look at their
/// instances again only when it moved (or a bake is due), not on every tick.
static OUTCOME_CHANGES: AtomicU64 = AtomicU64::new(0);

/// An instance's status or health changed.
pub fn note_outcome_change() {
    OUTCOME_CHANGES.fetch_add(1, Ordering::Relaxed);
}

/// How many times an instance's status or health changed since the process started.
pub fn outcome_changes() -> u64 {
    OUTCOME_CHANGES.load(Ordering::Relaxed)
}
/// History entries kept in memory per instance.
const HISTORY_KEPT: usize = 50;

/// What one fleet's instances should run, as the OpAMP layer needs it.
#[derive(Clone, Debug)]
pub struct FleetTarget {
    /// The fleet's version; `None` for observe-only fleets and fleets without a version.
    pub version: Option<Arc<ServedVersion>>,
    /// The fleet's rollout, the one running or the last one.
    pub rollout: Option<Arc<Rollout>>,
    /// The version before the rollout: what the instances it holds back (or rolled back) run.
    pub before: Option<Arc<ServedVersion>>,
    pub stale_after_ms: i64,
    /// The id of the fleet's current install token.
    pub current_token: Option<Arc<str>>,
    /// The fleet's current token, offered over OpAMP to instances still on an older one
    /// (when gitfleet has its text).
    pub credentials: Option<Arc<Credentials>>,
    /// Goes up each time this fleet's target changes (not counted in `==`): a session wakes
    /// for its own fleet only.
    pub generation: u64,
}

/// A version as it goes out to collectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedVersion {
    pub assignment: Assignment,
    pub content_type: String,
    pub body: Arc<[u8]>,
    /// It declares collector pipelines: an instance that reports it applied must run some
    /// (`ConfigState::applied_but_idle`).
    pub declares_pipelines: bool,
}

/// Targets are compared each time they are rebuilt, to wake sessions only on a change. A
/// rollout is a new `Arc` whenever it changed (`RolloutBook::save`), so its pointer says it;
/// comparing the rollouts' contents would compare every instance they moved.
impl PartialEq for FleetTarget {
    fn eq(&self, other: &Self) -> bool {
        let same = |a: &Option<Arc<ServedVersion>>, b: &Option<Arc<ServedVersion>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
            (a, b) => a.is_none() && b.is_none(),
        };
        let same_rollout = match (&self.rollout, &other.rollout) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (a, b) => a.is_none() && b.is_none(),
        };
        same(&self.version, &other.version)
            && same(&self.before, &other.before)
            && same_rollout
            && self.stale_after_ms == other.stale_after_ms
            && self.current_token == other.current_token
            && self.credentials == other.credentials
    }
}

impl Eq for FleetTarget {}

impl FleetTarget {
    /// The version `record` should run, and why: the one place an instance's assignment is
    /// decided.
    pub fn decide(&self, record: &InstanceRecord) -> (Option<&Arc<ServedVersion>>, Decision) {
        let Some(version) = &self.version else { return (None, Decision::Fleet) };
        // `targets_of` attaches only the rollout of the fleet's version.
        let Some(rollout) = self.rollout.as_deref().filter(|r| r.state.decides()) else {
            return (Some(version), Decision::Fleet);
        };
        let decision = rollout.decide(&record.uid.0, || record.matching_steps(&rollout.steps));
        match (decision.runs_new(), &self.before) {
            (false, Some(before)) => (Some(before), decision),
            _ => (Some(version), decision),
        }
    }

    /// The rollout while it decides per instance, with the hash of its new version.
    pub fn deciding(&self) -> Option<(&Rollout, &[u8])> {
        let rollout = self.rollout.as_deref().filter(|r| r.state.is_active())?;
        Some((rollout, self.version.as_ref()?.assignment.hash.as_slice()))
    }

    /// Adds `record` to `counts` (one entry per step) while the fleet's rollout decides.
    pub fn count_step(&self, record: &InstanceRecord, counts: &mut Vec<crate::rollout::StepCounts>, now_ms: i64) {
        let Some((rollout, to)) = self.deciding() else { return };
        counts.resize(rollout.steps.len(), Default::default());
        rollout.count(counts, &record.rollout_fact(&rollout.steps, to, now_ms, self.stale_after_ms));
    }

    /// The assignment `record` should have.
    pub fn assignment_for(&self, record: &InstanceRecord) -> Option<&Assignment> {
        self.decide(record).0.map(|version| &version.assignment)
    }

    /// The version with config `hash`, if the fleet serves it.
    pub fn version_with(&self, hash: &[u8]) -> Option<&Arc<ServedVersion>> {
        [&self.version, &self.before].into_iter().flatten().find(|version| version.assignment.hash == hash)
    }
}

/// What an instance needs to move to a fleet's current install token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub token_id: Arc<str>,
    /// When the token was issued (Unix seconds): instances first seen later get no offer.
    pub issued_at: i64,
    /// `Bearer <token>`: a secret, never printed.
    pub authorization: String,
    /// The fleet's `[install].endpoint`, else the one from `--public-url`; without either,
    /// the endpoint the instance dialled is offered.
    pub endpoint: Option<String>,
    /// `--install-ca-file` (PEM): offered with a `wss://` or `https://` endpoint.
    pub ca: Option<Arc<str>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("token_id", &self.token_id)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Every fleet's target, published by the reconciler.
pub type Targets = BTreeMap<String, FleetTarget>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    WebSocket,
    Http,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    pub host: Option<String>,
    pub os: Option<String>,
    pub os_description: Option<String>,
    pub arch: Option<String>,
    pub agent_name: Option<String>,
    pub agent_version: Option<String>,
    /// Every attribute, identifying first, as `key = value` text.
    pub identifying: Vec<(String, String)>,
    pub non_identifying: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub healthy: bool,
    pub status: String,
    pub last_error: String,
    pub start_time_unix_nano: u64,
    /// Components, flattened: `pipeline:traces/receiver:otlp`.
    pub components: Vec<ComponentHealth>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentHealth {
    pub name: String,
    pub healthy: bool,
    pub status: String,
    pub last_error: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectiveConfig {
    pub content_type: String,
    pub body: String,
}

/// The components an agent's build has (OpAMP `AvailableComponents`): kind (`receivers`,
/// `processors`, …) → component name → what the build says of it (the collector gives its
/// Go module and version). Shared by every instance of one build.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvailableComponents {
    #[serde(skip)]
    pub hash: Vec<u8>,
    pub kinds: BTreeMap<String, BTreeMap<String, String>>,
}

impl AvailableComponents {
    /// How many components the build has.
    pub fn len(&self) -> usize {
        self.kinds.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds gitfleet remembers at most: a few per fleet is the norm; a flood of distinct
/// lists (a hostile agent) is not kept. With each list within 128 KiB of text
/// (`agent::available_components`), they hold at most 32 MiB.
const BUILDS_KEPT: usize = 256;

/// Component lists by hash, and the ones not in the store yet.
#[derive(Default)]
struct ComponentCatalog {
    by_hash: HashMap<Vec<u8>, Arc<AvailableComponents>>,
    unsaved: Vec<Arc<AvailableComponents>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// Unix milliseconds.
    pub at_ms: i64,
    #[serde(flatten)]
    pub change: Change,
}

#[derive(Clone, Debug)]
pub struct InstanceRecord {
    pub uid: InstanceUid,
    pub fleet: Arc<str>,
    pub token_id: Arc<str>,
    pub config: ConfigState,
    /// The status last recorded in the history.
    pub status: Status,
    /// The last `sequence_num` received; `None` when the instance has not spoken since
    /// gitfleet (re)started.
    pub sequence_num: Option<u64>,
    pub description: Option<Box<Description>>,
    pub health: Option<Box<Health>>,
    /// The effective config reported since the last write to the store; after the write it
    /// lives only in the store (`Store::effective_config`).
    pub effective_config: Option<Box<EffectiveConfig>>,
    /// The components of its build, shared with the other instances of that build.
    pub components: Option<Arc<AvailableComponents>>,
    /// Whether the effective config it last reported has any pipeline; `None` before it
    /// reported one (or for a config that is not YAML).
    pub runs_pipelines: Option<bool>,
    pub first_seen_ms: i64,
    pub transport: Option<Transport>,
    /// The live WebSocket session, if any.
    pub session: Option<u64>,
    /// On a record of an instance another replica holds, read from the store to show
    /// (`Registry::elsewhere`), never kept in the registry: that replica, and whether it
    /// had a live WebSocket session with it.
    pub held_by: Option<Arc<str>>,
    pub remote_connected: bool,
    /// Takeovers of this id by a newer connection since `takeovers_since_ms`.
    pub takeovers: u32,
    pub takeovers_since_ms: i64,
    pub history: VecDeque<HistoryEntry>,
    /// Bumped by every change worth writing (`touch`); the record is written while it differs
    /// from `saved_edits`, the count the store acknowledged.
    edits: u32,
    saved_edits: u32,
    /// History entries at the end of `history` not written yet.
    pub unsaved_events: usize,
    /// The `last_seen` the store has.
    pub last_seen_saved_ms: i64,
}

impl InstanceRecord {
    pub fn new(uid: InstanceUid, fleet: Arc<str>, token_id: Arc<str>, capabilities: u64, now_ms: i64) -> Self {
        Self {
            uid,
            fleet,
            token_id,
            config: ConfigState::new(capabilities, None, now_ms),
            status: Status::Pending,
            sequence_num: None,
            description: None,
            health: None,
            effective_config: None,
            components: None,
            runs_pipelines: None,
            first_seen_ms: now_ms,
            transport: None,
            session: None,
            held_by: None,
            remote_connected: false,
            takeovers: 0,
            takeovers_since_ms: 0,
            history: VecDeque::new(),
            edits: 1,
            saved_edits: 0,
            unsaved_events: 0,
            last_seen_saved_ms: 0,
        }
    }

    /// Something worth writing to the store changed.
    pub fn touch(&mut self) {
        self.edits = self.edits.wrapping_add(1);
    }

    /// Changed since the store last acknowledged it.
    pub fn is_dirty(&self) -> bool {
        self.edits != self.saved_edits
    }

    /// Records changes in the history, keeping the last `HISTORY_KEPT`.
    pub fn record(&mut self, changes: Vec<Change>, now_ms: i64) {
        if !changes.is_empty() {
            self.touch();
        }
        for change in changes {
            self.unsaved_events = (self.unsaved_events + 1).min(HISTORY_KEPT);
            if let Change::Status { to, .. } = &change {
                self.status = *to;
                note_outcome_change();
            }
            if self.history.len() == HISTORY_KEPT {
                self.history.pop_front();
            }
            self.history.push_back(HistoryEntry { at_ms: now_ms, change });
        }
    }

    /// Brings the record up to date with its fleet's target (a new assignment, or time
    /// passing into staleness) and records what changed.
    pub fn sync(&mut self, target: Option<&FleetTarget>, now_ms: i64) {
        let stale_after = target.map_or(i64::MAX, |t| t.stale_after_ms);
        let assignment = target.and_then(|t| t.assignment_for(self)).cloned();
        let mut changes = self.config.assign(assignment, now_ms, stale_after);
        let status = self.config.status(now_ms, stale_after);
        if status != self.status && !changes.iter().any(|c| matches!(c, Change::Status { .. })) {
            changes.push(Change::Status { from: self.status, to: status });
        }
        self.record(changes, now_ms);
    }
}

/// How often `last_seen` alone is written: a heartbeat never causes a write by itself.
pub const LAST_SEEN_WRITE_EVERY_MS: i64 = 60_000;

impl InstanceRecord {
    /// The status against `target` as it is now. Readers call this rather than
    /// `config.status`: between a new target and `sync` catching up with it, the record
    /// still holds the old assignment, and would count as in sync with it.
    pub fn status_for(&self, target: Option<&FleetTarget>, now_ms: i64) -> Status {
        self.status_with(target, target.and_then(|t| t.assignment_for(self)), now_ms)
    }

    /// `status_for`, and whether the config last delivered is not the one assigned.
    pub fn status_and_drift(&self, target: Option<&FleetTarget>, now_ms: i64) -> (Status, bool) {
        let assigned = target.and_then(|t| t.assignment_for(self));
        (self.status_with(target, assigned, now_ms), self.drifted_from(assigned))
    }

    fn status_with(&self, target: Option<&FleetTarget>, assigned: Option<&Assignment>, now_ms: i64) -> Status {
        let stale_after = self.stale_after(target.map_or(i64::MAX, |t| t.stale_after_ms));
        self.config.status_if_assigned(assigned, now_ms, stale_after)
    }

    /// When silence makes it stale: for a record another replica wrote, later by as much
    /// as that replica may wait to write `last_seen` alone.
    fn stale_after(&self, stale_after_ms: i64) -> i64 {
        match self.held_by {
            Some(_) => stale_after_ms.saturating_add(LAST_SEEN_WRITE_EVERY_MS),
            None => stale_after_ms,
        }
    }

    /// Whether the config last delivered is not the one `assigned`.
    fn drifted_from(&self, assigned: Option<&Assignment>) -> bool {
        assigned.is_some_and(|a| self.config.served.as_ref() != Some(&a.hash))
    }

    /// Bit `i` set when step `i`'s selector matches what the instance reported.
    pub fn matching_steps(&self, steps: &[crate::rollout::Step]) -> u64 {
        let description = self.description.as_deref();
        let attributes = description
            .into_iter()
            .flat_map(|d| d.identifying.iter().chain(&d.non_identifying))
            .map(|(key, value)| (key.as_str(), value.as_str()));
        crate::rollout::matching_steps(steps, description.and_then(|d| d.host.as_deref()), attributes)
    }

    /// What a rollout to config `to` with `steps` needs to know of the instance.
    pub fn rollout_fact(
        &self,
        steps: &[crate::rollout::Step],
        to: &[u8],
        now_ms: i64,
        stale_after_ms: i64,
    ) -> crate::rollout::Fact {
        let stale_after_ms = self.stale_after(stale_after_ms);
        crate::rollout::Fact {
            uid: self.uid.0,
            live: self.config.status(now_ms, stale_after_ms) != Status::Stale,
            matches: self.matching_steps(steps),
            outcome: self.outcome_with(to, now_ms, stale_after_ms),
        }
    }

    /// Where the instance stands with the config `to`.
    fn outcome_with(&self, to: &[u8], now_ms: i64, stale_after_ms: i64) -> crate::rollout::Outcome {
        use crate::rollout::Outcome;
        if self.config.assigned.as_ref().is_none_or(|assigned| assigned.hash != to) {
            return Outcome::Busy;
        }
        match self.config.status(now_ms, stale_after_ms) {
            Status::InSync if self.health.as_ref().is_some_and(|health| !health.healthy) => Outcome::Unhealthy,
            Status::InSync | Status::Observed => Outcome::Settled,
            Status::Failed => Outcome::Failed,
            Status::Pending | Status::Applying | Status::Stale => Outcome::Busy,
        }
    }

    /// The instance as the API, the page and the status branch show it.
    pub fn row(&self, targets: &Targets, now_ms: i64) -> InstanceRow {
        let target = targets.get(&*self.fleet);
        let (version, decision) = target.map_or((None, Decision::Fleet), |t| t.decide(self));
        let assignment = version.map(|v| &v.assignment);
        let description = self.description.as_deref();
        let described = |field: fn(&Description) -> &Option<String>| description.and_then(|d| field(d).clone());
        let reported = self.config.reported.as_ref();
        InstanceRow {
            instance_uid: self.uid.to_string(),
            fleet: self.fleet.to_string(),
            status: self.status_with(target, assignment, now_ms),
            assigned_hash: assignment.map(|a| hex::encode(&a.hash)),
            assigned_tag: assignment.map(|a| a.tag.clone()),
            assigned_because: assignment.map(|_| decision.label()),
            served_hash: self.config.served.as_ref().map(hex::encode),
            reported_hash: reported.map(|(hash, _, _)| hex::encode(hash)).filter(|h| !h.is_empty()),
            reported_status: reported.map(|(_, status, _)| *status),
            host: described(|d| &d.host),
            os: described(|d| &d.os),
            arch: described(|d| &d.arch),
            agent_version: described(|d| &d.agent_version),
            healthy: self.health.as_ref().map(|h| h.healthy),
            last_seen_ms: self.config.last_seen_ms,
            error: self.config.error().map(str::to_owned),
            transport: self.transport.map(|t| match t {
                Transport::WebSocket => "websocket",
                Transport::Http => "http",
            }),
            connected: self.session.is_some() || self.remote_connected,
            token_id: self.token_id.to_string(),
            token_current: target.and_then(|t| t.current_token.as_deref()) == Some(&*self.token_id),
            drifted: self.drifted_from(assignment),
        }
    }

    pub fn to_stored(&self) -> crate::store::StoredInstance {
        crate::store::StoredInstance {
            uid: self.uid.0,
            fleet: self.fleet.to_string(),
            token_id: self.token_id.to_string(),
            capabilities: self.config.capabilities,
            assigned: self.config.assigned.as_ref().map(|a| (a.hash.clone(), a.tag.clone())),
            served_hash: self.config.served.clone(),
            reported: self.config.reported.as_ref().map(|(hash, status, error)| {
                let status =
                    serde_json::to_value(status).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
                (hash.clone(), status, error.clone())
            }),
            failed: self.config.failed.clone(),
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.config.last_seen_ms,
            status: self.status.as_str().to_owned(),
            transport: self
                .transport
                .map(|t| if t == Transport::WebSocket { "websocket".to_owned() } else { "http".to_owned() }),
            description: self.description.as_deref().map(to_json),
            health: self.health.as_deref().map(to_json),
            effective_config: self.effective_config.as_deref().map(to_json),
            components_hash: self.components.as_ref().map(|c| c.hash.clone()),
            // The writer names itself (`persist`).
            holder: String::new(),
            connected: self.session.is_some(),
        }
    }

    /// A record restored after a restart: `stale` until the instance speaks again.
    pub fn from_stored(stored: crate::store::StoredInstance, events: Vec<crate::store::StoredEvent>) -> Self {
        let mut record = Self::new(
            InstanceUid(stored.uid),
            Arc::from(stored.fleet.as_str()),
            Arc::from(stored.token_id.as_str()),
            stored.capabilities,
            stored.last_seen_ms,
        );
        record.first_seen_ms = stored.first_seen_ms;
        record.status = parse_enum(&stored.status).unwrap_or(Status::Stale);
        record.config.assigned = stored.assigned.map(|(hash, tag)| Assignment { hash, tag });
        record.config.served = stored.served_hash;
        record.config.reported = stored.reported.map(|(hash, status, error)| {
            (hash, parse_enum(&status).unwrap_or(crate::instance::Reported::Unset), error)
        });
        record.config.failed = stored.failed;
        record.config.awaiting_contact = true;
        record.transport = match stored.transport.as_deref() {
            Some("websocket") => Some(Transport::WebSocket),
            Some("http") => Some(Transport::Http),
            _ => None,
        };
        record.description = stored.description.and_then(|d| serde_json::from_str(&d).ok()).map(Box::new);
        record.health = stored.health.and_then(|h| serde_json::from_str(&h).ok()).map(Box::new);
        record.history = events
            .into_iter()
            .filter_map(|event| {
                Some(HistoryEntry { at_ms: event.at_ms, change: serde_json::from_str(&event.event).ok()? })
            })
            .collect();
        record.saved_edits = record.edits;
        record.last_seen_saved_ms = stored.last_seen_ms;
        record
    }
}

/// An enum from its serde name (`in_sync`, `applied`, …).
fn parse_enum<T: serde::de::DeserializeOwned>(text: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).ok()
}

/// A report type as JSON text, for the store.
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("report types serialize to JSON")
}

pub use crate::status::Counts;

/// A record to write, with what the store must acknowledge (`Registry::saved`).
pub struct Unsaved {
    pub instance: crate::store::StoredInstance,
    pub events: Vec<crate::store::StoredEvent>,
    pub receipt: Receipt,
}

/// Which state of a record a write carried.
#[derive(Clone, Copy, Debug)]
pub struct Receipt {
    uid: InstanceUid,
    edits: u32,
    last_seen_ms: i64,
}

/// A fleet's counts plus drift (served ≠ assigned), and its instances per install token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetSummary {
    pub instances: usize,
    pub counts: Counts,
    pub drift: usize,
    pub by_token: BTreeMap<Arc<str>, usize>,
    /// Per step of the fleet's rollout, while it is deciding.
    pub steps: Vec<crate::rollout::StepCounts>,
}

/// What one replica's instances of a fleet add up to: what replicas tell each other
/// (`ReplicaCounts`) in place of the instances themselves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetCounts {
    /// The config hash (hex) the instances were counted against; empty for none.
    pub target: String,
    pub instances: usize,
    pub counts: Counts,
    pub drift: usize,
    pub by_token: BTreeMap<String, usize>,
    /// Per step of the fleet's rollout, while it is deciding.
    pub steps: Vec<crate::rollout::StepCounts>,
    /// In no particular order.
    pub failures: Vec<Failure>,
}

impl FleetCounts {
    /// Adds another replica's counts. Counted against another version than `target` (one
    /// of the two has not followed the newest desired state yet), its instances are
    /// pending: not in sync with what this replica serves.
    fn add(&mut self, other: &FleetCounts, target: &str) {
        self.instances += other.instances;
        for (token, count) in &other.by_token {
            *self.by_token.entry(token.clone()).or_default() += count;
        }
        if other.target != target {
            self.counts.pending += other.instances;
            return;
        }
        self.counts += other.counts;
        self.drift += other.drift;
        self.failures.extend(other.failures.iter().cloned());
        if self.steps.len() < other.steps.len() {
            self.steps.resize(other.steps.len(), Default::default());
        }
        for (mine, theirs) in self.steps.iter_mut().zip(&other.steps) {
            *mine += *theirs;
        }
    }
}

/// What one replica's instances add up to, fleet by fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaCounts {
    pub fleets: BTreeMap<String, FleetCounts>,
}

/// The config hash (hex) instances are counted against: their fleet's version.
fn counted_against(target: Option<&FleetTarget>) -> String {
    target.and_then(|t| t.version.as_ref()).map(|v| hex::encode(&v.assignment.hash)).unwrap_or_default()
}

pub struct Registry {
    shards: Box<[Mutex<HashMap<InstanceUid, InstanceRecord>>]>,
    next_session: AtomicU64,
    /// Locked after a shard (never the other way round), or alone.
    components: Mutex<ComponentCatalog>,
    /// Whether an effective config runs pipelines, by the hash of its text: thousands of
    /// instances of a fleet report the same text, and parsing it is the dearest part of a
    /// report. Locked after a shard, or alone.
    pipelines: Mutex<HashMap<u64, Option<bool>>>,
    /// Fleet names and token ids, one `Arc` each for all their instances: less memory, and
    /// passes over every record find their fleet by pointer.
    names: Interner,
    /// How many instances each token may still create. Locked after a shard, or alone.
    allowances: Mutex<HashMap<Arc<str>, Allowance>>,
    new_instances: NewInstanceLimit,
    /// What the other replicas' instances add up to, by replica (replicas on a shared
    /// store; empty otherwise).
    others: Mutex<Vec<(String, ReplicaCounts)>>,
}

/// How many new instances (ids gitfleet does not know) one token may create: `burst` at
/// once, a whole machine's worth of collectors installed together, then `per_minute`. A
/// flood of made-up ids would otherwise grow memory and the store until `--forget-after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewInstanceLimit {
    pub burst: u32,
    pub per_minute: u32,
}

/// A token bucket: what a token may still create, as of `at_ms`.
#[derive(Debug)]
struct Allowance {
    left: f64,
    at_ms: i64,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_session: AtomicU64::new(1),
            components: Mutex::default(),
            pipelines: Mutex::default(),
            names: Interner::default(),
            allowances: Mutex::default(),
            // No limit but the counter's size: `serve` sets its own (`limiting_new_instances`).
            new_instances: NewInstanceLimit { burst: u32::MAX, per_minute: 0 },
            others: Mutex::default(),
        }
    }
}

impl Registry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn limiting_new_instances(limit: NewInstanceLimit) -> Arc<Self> {
        Arc::new(Self { new_instances: limit, ..Self::default() })
    }

    /// Whether `token_id` may create one more instance now; takes it from its allowance.
    pub fn admit_new_instance(&self, token_id: &Arc<str>, now_ms: i64) -> bool {
        let NewInstanceLimit { burst, per_minute } = self.new_instances;
        let mut allowances = self.allowances.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let allowance =
            allowances.entry(Arc::clone(token_id)).or_insert(Allowance { left: f64::from(burst), at_ms: now_ms });
        let elapsed = (now_ms - allowance.at_ms).max(0) as f64;
        allowance.left = (allowance.left + elapsed * f64::from(per_minute) / 60_000.0).min(f64::from(burst));
        allowance.at_ms = now_ms;
        if allowance.left < 1.0 {
            return false;
        }
        allowance.left -= 1.0;
        true
    }

    fn catalog(&self) -> MutexGuard<'_, ComponentCatalog> {
        self.components.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The component list of the build with `hash`, if gitfleet has it.
    pub fn components(&self, hash: &[u8]) -> Option<Arc<AvailableComponents>> {
        self.catalog().by_hash.get(hash).cloned()
    }

    /// Keeps a component list an agent sent; the first list seen for a hash stays.
    /// `None` when it cannot be kept (too many builds).
    pub fn learn_components(&self, components: AvailableComponents) -> Option<Arc<AvailableComponents>> {
        let mut catalog = self.catalog();
        if let Some(known) = catalog.by_hash.get(&components.hash) {
            return Some(Arc::clone(known));
        }
        if catalog.by_hash.len() >= BUILDS_KEPT {
            return None;
        }
        let components = Arc::new(components);
        catalog.by_hash.insert(components.hash.clone(), Arc::clone(&components));
        catalog.unsaved.push(Arc::clone(&components));
        Some(components)
    }

    /// Component lists loaded from the store at startup.
    pub fn restore_components(&self, lists: impl IntoIterator<Item = AvailableComponents>) {
        let mut catalog = self.catalog();
        for list in lists {
            catalog.by_hash.insert(list.hash.clone(), Arc::new(list));
        }
    }

    /// The component lists learned since the last call, to write to the store.
    pub fn take_unsaved_components(&self) -> Vec<Arc<AvailableComponents>> {
        std::mem::take(&mut self.catalog().unsaved)
    }

    /// Lists whose write failed, to write again with the next batch.
    pub fn mark_components_unsaved(&self, lists: Vec<Arc<AvailableComponents>>) {
        self.catalog().unsaved.extend(lists);
    }

    /// Whether an effective config (YAML) runs any pipeline; `None` when it cannot tell.
    pub fn runs_pipelines(&self, config: &str) -> Option<bool> {
        use std::hash::{BuildHasher, RandomState};
        /// Distinct texts remembered; beyond that the memory starts over.
        const KEPT: usize = 1024;
        static KEYS: std::sync::LazyLock<RandomState> = std::sync::LazyLock::new(RandomState::new);
        let key = KEYS.hash_one(config);
        let lock = || self.pipelines.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(known) = lock().get(&key) {
            return *known;
        }
        let runs = crate::repo::lint::pipeline_count(config).map(|count| count > 0);
        let mut known = lock();
        if known.len() >= KEPT {
            known.clear();
        }
        known.insert(key, runs);
        runs
    }

    /// The shared `Arc` of a fleet name or token id.
    pub fn name(&self, text: &str) -> Arc<str> {
        self.names.intern(text)
    }

    pub fn new_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The shard holding `uid`, locked; for the OpAMP step functions (`agent::handle`,
    /// `server::push_for`) only. Never hold it across an `.await`.
    pub(super) fn shard(&self, uid: &InstanceUid) -> MutexGuard<'_, HashMap<InstanceUid, InstanceRecord>> {
        let index = u64::from_le_bytes(uid.0[8..].try_into().expect("8 bytes")) as usize % SHARDS;
        // A panic while holding the lock leaves plain data; carry on with it.
        self.shards[index].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` over every record, one shard at a time.
    fn for_each(&self, mut f: impl FnMut(&mut InstanceRecord)) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            shard.values_mut().for_each(&mut f);
        }
    }

    /// Removes the instances without a live connection that have not been heard from since
    /// `cutoff_ms`; returns their ids.
    pub fn forget_silent_since(&self, cutoff_ms: i64) -> Vec<[u8; 16]> {
        let mut forgotten = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            shard.retain(|uid, record| {
                let keep = record.session.is_some() || record.config.last_seen_ms >= cutoff_ms;
                if !keep {
                    forgotten.push(uid.0);
                }
                keep
            });
        }
        forgotten
    }

    /// Brings every record up to date with the targets (see `InstanceRecord::sync`).
    pub fn sync_all(&self, targets: &Targets, now_ms: i64) {
        self.for_each(|record| {
            record.sync(targets.get(&*record.fleet), now_ms);
        });
    }

    /// `sync_all` for the records without a live WebSocket session: after new targets are
    /// published, each session syncs its own record as it pushes.
    pub fn sync_unattended(&self, targets: &Targets, now_ms: i64) {
        self.for_each(|record| {
            if record.session.is_none() {
                record.sync(targets.get(&*record.fleet), now_ms);
            }
        });
    }

    /// What this replica's instances add up to, per fleet that has any: one pass over
    /// the records, for the page, the API and the other replicas (`persist`).
    pub fn counts(&self, targets: &Targets, now_ms: i64) -> HashMap<Arc<str>, FleetCounts> {
        let mut fleets: PerFleet<(FleetCounts, TokenCounts)> = PerFleet::new(targets);
        self.for_each(|record| {
            let (target, (counts, tokens)) = fleets.of(&record.fleet);
            let (status, drifted) = record.status_and_drift(target, now_ms);
            counts.instances += 1;
            counts.counts.add(status);
            counts.drift += usize::from(drifted);
            if status == Status::Failed {
                counts.failures.push(Failure {
                    instance_uid: record.uid.to_string(),
                    host: record.description.as_ref().and_then(|d| d.host.clone()),
                    error: record.config.error().unwrap_or_default().to_owned(),
                });
            }
            match tokens.iter_mut().find(|(token, _)| Arc::ptr_eq(token, &record.token_id) || *token == record.token_id)
            {
                Some((_, count)) => *count += 1,
                None => tokens.push((Arc::clone(&record.token_id), 1)),
            }
            if let Some(target) = target {
                target.count_step(record, &mut counts.steps, now_ms);
            }
        });
        fleets
            .into_entries()
            .map(|(fleet, (mut counts, tokens))| {
                counts.target = counted_against(targets.get(&*fleet));
                for (token, count) in tokens {
                    *counts.by_token.entry(token.to_string()).or_default() += count;
                }
                (fleet, counts)
            })
            .collect()
    }

    /// What the other replicas' instances add up to, as they last wrote it (`persist`).
    pub fn set_others(&self, others: Vec<(String, ReplicaCounts)>) {
        let mut kept = self.others.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *kept != others {
            // The leader's rollouts look again when any instance's outcome moved.
            note_outcome_change();
            *kept = others;
        }
    }

    /// This replica's counts and the other replicas', per fleet: the whole fleet.
    fn whole_counts(&self, targets: &Targets, now_ms: i64) -> HashMap<Arc<str>, FleetCounts> {
        let mut whole = self.counts(targets, now_ms);
        let others = self.others.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (_, replica) in others.iter() {
            for (fleet, theirs) in &replica.fleets {
                let fleet = self.name(fleet);
                let counted = whole.entry(Arc::clone(&fleet)).or_default();
                counted.add(theirs, &counted_against(targets.get(&*fleet)));
            }
        }
        whole
    }

    /// Counts and drift of every fleet that has instances, on every replica.
    pub fn summaries(&self, targets: &Targets, now_ms: i64) -> HashMap<Arc<str>, FleetSummary> {
        self.whole_counts(targets, now_ms)
            .into_iter()
            .map(|(fleet, counts)| {
                let summary = FleetSummary {
                    instances: counts.instances,
                    counts: counts.counts,
                    drift: counts.drift,
                    by_token: counts.by_token.into_iter().map(|(token, count)| (self.name(&token), count)).collect(),
                    steps: counts.steps,
                };
                (fleet, summary)
            })
            .collect()
    }

    /// What each fleet's instances add up to, on every replica, with its failures and its
    /// rollout's progress.
    pub fn tallies(&self, targets: &Targets, now_ms: i64) -> HashMap<Arc<str>, Tally> {
        let mut steps = HashMap::new();
        let mut tallies: HashMap<Arc<str>, Tally> = self
            .whole_counts(targets, now_ms)
            .into_iter()
            .map(|(fleet, counts)| {
                steps.insert(Arc::clone(&fleet), counts.steps);
                let tally =
                    Tally { counts: counts.counts, drift: counts.drift, failures: counts.failures, rollout: None };
                (fleet, tally)
            })
            .collect();
        for (fleet, target) in targets {
            let Some(rollout) = target.rollout.as_deref() else { continue };
            let counts = steps.get(fleet.as_str()).map(Vec::as_slice).unwrap_or_default();
            if let Some(status) = crate::status::RolloutStatus::of(rollout, counts) {
                tallies.entry(Arc::from(fleet.as_str())).or_default().rollout = Some(status);
            }
        }
        tallies
    }

    /// Every instance's id, by fleet, in `instance_uid` order: 16 bytes each, where rows
    /// would be hundreds.
    pub fn uids_by_fleet(&self) -> BTreeMap<Arc<str>, Vec<InstanceUid>> {
        let mut uids: BTreeMap<Arc<str>, Vec<InstanceUid>> = BTreeMap::new();
        self.for_each(|record| match uids.get_mut(&record.fleet) {
            Some(fleet) => fleet.push(record.uid),
            None => {
                uids.insert(Arc::clone(&record.fleet), vec![record.uid]);
            }
        });
        uids.values_mut().for_each(|fleet| fleet.sort_unstable());
        uids
    }

    /// What a rollout needs to know of each instance of `fleet`, against its new version
    /// `to` (config hash), in `instance_uid` order.
    pub fn rollout_facts(
        &self,
        fleet: &str,
        steps: &[crate::rollout::Step],
        to: &[u8],
        stale_after_ms: i64,
        now_ms: i64,
    ) -> Vec<crate::rollout::Fact> {
        let mut facts = Vec::new();
        self.for_each(|record| {
            if *record.fleet == *fleet {
                facts.push(record.rollout_fact(steps, to, now_ms, stale_after_ms));
            }
        });
        facts.sort_unstable_by_key(|fact| fact.uid);
        facts
    }

    /// One instance as a row, if it is still there.
    pub fn row_of(&self, uid: &InstanceUid, targets: &Targets, now_ms: i64) -> Option<InstanceRow> {
        self.shard(uid).get(uid).map(|record| record.row(targets, now_ms))
    }

    /// Copies of the records of one fleet, or of all fleets.
    pub fn records(&self, fleet: Option<&str>) -> Vec<InstanceRecord> {
        let mut records = Vec::new();
        self.for_each(|record| {
            if fleet.is_none_or(|fleet| *record.fleet == *fleet) {
                records.push(record.clone());
            }
        });
        records.sort_by_key(|record| record.uid);
        records
    }

    pub fn get(&self, uid: &InstanceUid) -> Option<InstanceRecord> {
        self.shard(uid).get(uid).cloned()
    }

    /// What must be written: records that changed (and their new history entries), and
    /// records whose `last_seen` moved by `LAST_SEEN_WRITE_EVERY_MS`. Nothing is marked
    /// written here: `saved` does that once the store has committed them, so a failed write
    /// loses nothing and is tried again.
    pub fn unsaved(&self) -> Vec<Unsaved> {
        let mut unsaved = Vec::new();
        self.for_each(|record| {
            let last_seen_due = record.config.last_seen_ms - record.last_seen_saved_ms >= LAST_SEEN_WRITE_EVERY_MS;
            let unchanged = !record.is_dirty() && !last_seen_due && record.unsaved_events == 0;
            if unchanged {
                return;
            }
            let skip = record.history.len().saturating_sub(record.unsaved_events);
            let events = record
                .history
                .iter()
                .skip(skip)
                .map(|entry| {
                    let event = serde_json::to_string(&entry.change).expect("changes serialize to JSON");
                    crate::store::StoredEvent { uid: record.uid.0, at_ms: entry.at_ms, event }
                })
                .collect();
            unsaved.push(Unsaved {
                instance: record.to_stored(),
                events,
                receipt: Receipt { uid: record.uid, edits: record.edits, last_seen_ms: record.config.last_seen_ms },
            });
        });
        unsaved
    }

    /// The store committed what `receipts` took: those records are clean unless they changed
    /// since, and their effective configs live in the store from now on.
    pub fn saved(&self, receipts: impl IntoIterator<Item = (Receipt, usize)>) {
        for (receipt, events) in receipts {
            let mut shard = self.shard(&receipt.uid);
            let Some(record) = shard.get_mut(&receipt.uid) else { continue };
            record.unsaved_events = record.unsaved_events.saturating_sub(events);
            record.last_seen_saved_ms = record.last_seen_saved_ms.max(receipt.last_seen_ms);
            if record.edits == receipt.edits {
                record.saved_edits = receipt.edits;
                // An effective config can be large: once stored, memory lets go of it.
                record.effective_config = None;
            }
        }
    }

    /// A WebSocket session ended: its instance has no live connection any more, unless a
    /// newer session took it over.
    pub fn session_ended(&self, uid: &InstanceUid, session: u64) {
        let mut shard = self.shard(uid);
        if let Some(record) = shard.get_mut(uid)
            && record.session == Some(session)
        {
            record.session = None;
            // Other replicas see it disconnected once this is written.
            record.touch();
        }
    }

    /// Connected instances by transport: WebSocket sessions, and plain-HTTP agents that
    /// keep polling (heard from within their fleet's `stale_after`).
    pub fn connected(&self, targets: &Targets, now_ms: i64) -> (usize, usize) {
        let (mut websocket, mut http) = (0, 0);
        self.for_each(|record| {
            let stale_after = targets.get(&*record.fleet).map_or(i64::MAX, |t| t.stale_after_ms);
            match record.transport {
                Some(Transport::WebSocket) if record.session.is_some() => websocket += 1,
                // Polling this replica, not another.
                Some(Transport::Http) if now_ms - record.config.last_seen_ms <= stale_after => http += 1,
                _ => {}
            }
        });
        (websocket, http)
    }

    /// Takes an instance another replica held, read from the store: the agent spoke to this
    /// replica (`claim`: written as this replica's from now on), or its replica is gone and
    /// this one took over its instances (the store says so already). An instance this
    /// replica has already is left as it is. Returns whether it was taken.
    pub fn adopt(
        &self,
        stored: crate::store::StoredInstance,
        events: Vec<crate::store::StoredEvent>,
        claim: bool,
    ) -> bool {
        let components = stored.components_hash.as_deref().and_then(|hash| self.components(hash));
        let mut record = InstanceRecord::from_stored(stored, events);
        record.fleet = self.name(&record.fleet);
        record.token_id = self.name(&record.token_id);
        record.components = components;
        if claim {
            record.touch();
        }
        let mut shard = self.shard(&record.uid);
        if shard.contains_key(&record.uid) {
            return false;
        }
        note_outcome_change();
        shard.insert(record.uid, record);
        true
    }

    /// Lets go of instances another replica took (`Store::instances_moved_away`), unless
    /// this one holds them again (a live session) or has changes of them not written yet:
    /// its next write takes them back. Returns how many it let go.
    pub fn let_go(&self, uids: impl IntoIterator<Item = [u8; 16]>) -> usize {
        let mut gone = 0;
        for uid in uids {
            let uid = InstanceUid(uid);
            let mut shard = self.shard(&uid);
            let ours = shard
                .get(&uid)
                .is_none_or(|record| record.session.is_some() || record.is_dirty() || record.unsaved_events > 0);
            if !ours {
                shard.remove(&uid);
                note_outcome_change();
                gone += 1;
            }
        }
        gone
    }

    /// A record of an instance another replica holds, as read from the store: to show, never
    /// kept here.
    pub fn elsewhere(
        &self,
        stored: crate::store::StoredInstance,
        events: Vec<crate::store::StoredEvent>,
    ) -> InstanceRecord {
        let holder = self.name(&stored.holder);
        let connected = stored.connected;
        let components = stored.components_hash.as_deref().and_then(|hash| self.components(hash));
        let mut record = InstanceRecord::from_stored(stored, events);
        record.fleet = self.name(&record.fleet);
        record.token_id = self.name(&record.token_id);
        record.components = components;
        record.config.awaiting_contact = false;
        record.held_by = Some(holder);
        record.remote_connected = connected;
        record
    }

    /// Whether this replica has a record of `uid`.
    pub fn knows(&self, uid: &InstanceUid) -> bool {
        self.shard(uid).contains_key(uid)
    }

    /// Puts restored records in place (at startup).
    pub fn restore(&self, records: impl IntoIterator<Item = InstanceRecord>) {
        for mut record in records {
            record.fleet = self.name(&record.fleet);
            record.token_id = self.name(&record.token_id);
            self.shard(&record.uid).insert(record.uid, record);
        }
    }
}

/// Shares equal strings. Bounded: past `INTERNED_MAX` entries a string is not shared.
#[derive(Debug, Default)]
pub struct Interner(Mutex<std::collections::HashSet<Arc<str>>>);

const INTERNED_MAX: usize = 1024;

impl Interner {
    pub fn intern(&self, text: &str) -> Arc<str> {
        let mut set = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(shared) = set.get(text) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = Arc::from(text);
        if set.len() < INTERNED_MAX {
            set.insert(Arc::clone(&shared));
        }
        shared
    }
}

/// Instances per install token, while a pass runs: a fleet has a few tokens.
type TokenCounts = Vec<(Arc<str>, usize)>;

/// One accumulator per fleet for a pass over every record. Records of a fleet share its
/// `Arc` (`Registry::name`), so the fleet of the record before is found by pointer; another
/// is looked up by name.
struct PerFleet<'t, T> {
    targets: &'t Targets,
    fleets: Vec<(Arc<str>, Option<&'t FleetTarget>, T)>,
    index: HashMap<Arc<str>, usize>,
    last: usize,
}

impl<'t, T: Default> PerFleet<'t, T> {
    fn new(targets: &'t Targets) -> Self {
        Self { targets, fleets: Vec::new(), index: HashMap::new(), last: 0 }
    }

    fn of(&mut self, fleet: &Arc<str>) -> (Option<&'t FleetTarget>, &mut T) {
        let index = match self.fleets.get(self.last) {
            Some((name, ..)) if Arc::ptr_eq(name, fleet) => self.last,
            _ => match self.index.get(fleet) {
                Some(index) => *index,
                None => {
                    self.fleets.push((Arc::clone(fleet), self.targets.get(&**fleet), T::default()));
                    self.index.insert(Arc::clone(fleet), self.fleets.len() - 1);
                    self.fleets.len() - 1
                }
            },
        };
        self.last = index;
        let (_, target, value) = &mut self.fleets[index];
        (*target, value)
    }

    fn into_entries(self) -> impl Iterator<Item = (Arc<str>, T)> {
        self.fleets.into_iter().map(|(fleet, _, value)| (fleet, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(hash: u8) -> FleetTarget {
        FleetTarget {
            version: Some(Arc::new(ServedVersion {
                assignment: Assignment { hash: vec![hash; 32], tag: format!("gateway/v{hash}") },
                content_type: "text/yaml".into(),
                body: Arc::from(&b"a: 1\n"[..]),
                declares_pipelines: false,
            })),
            rollout: None,
            before: None,
            stale_after_ms: 60_000,
            current_token: None,
            credentials: None,
            generation: 0,
        }
    }

    #[test]
    fn readers_count_against_the_target_before_sync_catches_up() {
        let v1 = target(1);
        let mut record = InstanceRecord::new(InstanceUid([7; 16]), Arc::from("prod"), Arc::from("tk"), 0x3847, 0);
        record.sync(Some(&v1), 0);
        let _ = record.config.served(vec![1; 32], 0, 60_000);
        let report = Some((vec![1; 32], crate::instance::Reported::Applied, String::new()));
        let _ = record.config.heard(0x3847, report, 10, 60_000);
        assert_eq!(record.status_for(Some(&v1), 20), Status::InSync);

        // v2 is the target now; `sync` has not run yet.
        let v2 = target(2);
        assert_eq!(record.status_for(Some(&v2), 20), Status::Pending, "not in sync with v2");
        let targets = Targets::from([("prod".to_owned(), v2.clone())]);
        assert_eq!(record.row(&targets, 20).status, Status::Pending);
        assert!(record.row(&targets, 20).drifted);
        record.sync(Some(&v2), 20);
        assert_eq!(record.status_for(Some(&v2), 20), Status::Pending, "the same once synced");
    }

    #[test]
    fn counts_are_per_fleet_and_token_whether_or_not_names_are_shared() {
        let registry = Registry::default();
        let targets = Targets::from([("a".to_owned(), target(1)), ("b".to_owned(), target(2))]);
        let mut records = Vec::new();
        for n in 0..60u8 {
            // Fleets interleaved; some names from the registry, some not (as after a restore
            // past the interner's bound).
            let fleet = if n % 3 == 0 { "a" } else { "b" };
            let name = if n % 2 == 0 { registry.name(fleet) } else { Arc::from(fleet) };
            let token = if n % 5 == 0 { Arc::from("tk_old") } else { registry.name("tk_new") };
            let mut record = InstanceRecord::new(InstanceUid([n; 16]), name, token, 0x3847, 0);
            record.sync(targets.get(fleet), 0);
            records.push(record);
        }
        for record in records {
            registry.shard(&record.uid).insert(record.uid, record);
        }
        let summaries = registry.summaries(&targets, 0);
        let (a, b) = (&summaries["a"], &summaries["b"]);
        assert_eq!((a.instances, b.instances), (20, 40));
        assert_eq!(a.counts.get(Status::Pending) + b.counts.get(Status::Pending), 60);
        assert_eq!(a.by_token.get("tk_old").copied(), Some(4), "n = 0, 15, 30, 45");
        assert_eq!(b.by_token.get("tk_old").copied(), Some(8));
        assert_eq!(a.by_token.get("tk_new").copied(), Some(16));
        let tallies = registry.tallies(&targets, 0);
        assert_eq!(tallies["a"].counts, a.counts);
        assert_eq!(tallies["b"].counts, b.counts);
    }

    #[test]
    fn a_record_is_clean_only_once_the_store_acknowledged_what_it_took() {
        let registry = Registry::default();
        let uid = InstanceUid([9; 16]);
        let mut record = InstanceRecord::new(uid, Arc::from("prod"), Arc::from("tk"), 0x3847, 0);
        record.effective_config = Some(Box::new(EffectiveConfig { content_type: String::new(), body: "a: 1".into() }));
        record.record(vec![Change::Status { from: Status::Pending, to: Status::InSync }], 5);
        registry.restore([record]);

        // A write that failed: nothing was acknowledged, everything is taken again.
        let first = registry.unsaved();
        assert_eq!((first.len(), first[0].events.len()), (1, 1));
        let again = registry.unsaved();
        assert_eq!((again.len(), again[0].events.len()), (1, 1), "nothing lost");
        assert!(registry.get(&uid).unwrap().effective_config.is_some(), "kept until stored");

        // Changed while the write was under way: the new change stays to be written.
        let taken = registry.unsaved().remove(0);
        registry
            .shard(&uid)
            .get_mut(&uid)
            .unwrap()
            .record(vec![Change::Status { from: Status::InSync, to: Status::Failed }], 9);
        registry.saved([(taken.receipt, taken.events.len())]);
        let after = registry.unsaved();
        assert_eq!(after.len(), 1, "still dirty");
        assert_eq!(after[0].events.len(), 1, "only the new entry");
        assert!(registry.get(&uid).unwrap().effective_config.is_some());

        let taken = after.into_iter().next().unwrap();
        registry.saved([(taken.receipt, taken.events.len())]);
        assert!(registry.unsaved().is_empty(), "clean");
        assert!(registry.get(&uid).unwrap().effective_config.is_none(), "the store has it now");
    }

    #[test]
    fn another_replicas_instance_read_from_the_store_shows_where_it_is_connected() {
        let registry = Registry::default();
        let targets = Targets::from([("prod".to_owned(), target(2))]);
        let now = crate::time::now_ms();
        // Another replica's collector, in sync at v1 and connected there.
        let mut theirs = InstanceRecord::new(InstanceUid([4; 16]), Arc::from("prod"), Arc::from("tk"), 0x3847, now);
        theirs.sync(Some(&target(1)), now);
        let _ = theirs.config.served(vec![1; 32], now, 60_000);
        let report = Some((vec![1; 32], crate::instance::Reported::Applied, String::new()));
        let _ = theirs.config.heard(0x3847, report, now, 60_000);
        let mut stored = theirs.to_stored();
        (stored.holder, stored.connected) = ("r2".to_owned(), true);

        let shown = registry.elsewhere(stored, Vec::new());
        assert_eq!(shown.held_by.as_deref(), Some("r2"));
        assert!(shown.row(&targets, now).connected, "connected, to r2");
        assert!(!registry.knows(&InstanceUid([4; 16])), "shown, not kept");
        // Counted against this replica's target (v2): pending, not stale.
        assert_eq!(shown.status_for(targets.get("prod"), now), Status::Pending);
        // Silent longer than the fleet's stale_after, but within the time r2 may wait to
        // write `last_seen` alone: still live.
        assert_eq!(shown.status_for(targets.get("prod"), now + 60_000 + 30_000), Status::Pending);
        assert_eq!(shown.status_for(targets.get("prod"), now + 60_000 + LAST_SEEN_WRITE_EVERY_MS + 1), Status::Stale);
    }

    #[test]
    fn the_whole_fleet_counts_are_this_replicas_plus_the_others_counted_against_the_same_version() {
        let registry = Registry::default();
        let targets = Targets::from([("prod".to_owned(), target(2))]);
        let now = crate::time::now_ms();
        registry.restore([InstanceRecord::new(InstanceUid([1; 16]), Arc::from("prod"), Arc::from("tk"), 0x3847, now)]);
        let counted = |target: u8, in_sync: usize| FleetCounts {
            target: hex::encode([target; 32]),
            instances: in_sync,
            counts: Counts { in_sync, ..Counts::default() },
            by_token: BTreeMap::from([("tk".to_owned(), in_sync)]),
            ..FleetCounts::default()
        };
        let replica = |counts: FleetCounts| ReplicaCounts { fleets: BTreeMap::from([("prod".to_owned(), counts)]) };
        // r2 follows the same version; r3 still counts against v1.
        registry.set_others(vec![("r2".to_owned(), replica(counted(2, 3))), ("r3".to_owned(), replica(counted(1, 4)))]);
        let summary = registry.summaries(&targets, now).remove("prod").expect("prod");
        assert_eq!(summary.instances, 1 + 3 + 4);
        assert_eq!(summary.counts.in_sync, 3, "r2's; r3's are not in sync with v2 yet");
        assert_eq!(summary.counts.pending, 1 + 4, "this replica's new instance, and r3's");
        assert_eq!(summary.by_token.get("tk"), Some(&8));
        let mine = registry.counts(&targets, now).remove("prod").expect("prod");
        assert_eq!((mine.instances, mine.target.as_str()), (1, hex::encode([2; 32]).as_str()), "own counts alone");
    }

    #[test]
    fn an_instance_another_replica_took_is_let_go_unless_it_is_held_here_again() {
        let registry = Registry::default();
        let now = crate::time::now_ms();
        let record = |uid: u8| InstanceRecord::new(InstanceUid([uid; 16]), Arc::from("prod"), Arc::from("tk"), 0, now);
        let mut live = record(2);
        live.session = Some(7);
        registry.restore([record(1), live]);
        // Restored records count as written: only the one with a session is held here.
        registry.saved(registry.unsaved().into_iter().map(|u| (u.receipt, u.events.len())));
        assert_eq!(registry.let_go([[1; 16], [2; 16], [3; 16]]), 1);
        assert!(!registry.knows(&InstanceUid([1; 16])));
        assert!(registry.knows(&InstanceUid([2; 16])), "a live session keeps it");

        // An agent that moved here: taken from the store, with its history, and written as
        // this replica's; one already here is left as it is.
        let mut moved = record(5).to_stored();
        moved.holder = "r2".to_owned();
        let event = crate::store::StoredEvent {
            uid: [5; 16],
            at_ms: now,
            event: "{\"kind\":\"status\",\"from\":\"pending\",\"to\":\"in_sync\"}".into(),
        };
        assert!(registry.adopt(moved, vec![event], true));
        let adopted = registry.get(&InstanceUid([5; 16])).expect("adopted");
        assert_eq!((adopted.held_by, adopted.history.len()), (None, 1), "its own now, with its history");
        assert!(registry.unsaved().iter().any(|u| u.instance.uid == [5; 16]), "written as this replica's");
        assert!(!registry.adopt(record(2).to_stored(), Vec::new(), true), "already here");
        assert_eq!(registry.get(&InstanceUid([2; 16])).expect("kept").session, Some(7));
    }
}
