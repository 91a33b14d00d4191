//! The status of one instance against its fleet's assigned configuration: a pure state
//! machine (PRODUCT.md §5). The OpAMP shell feeds it what agents report and what was
//! delivered; it answers with the status, the history events, and whether to push.
//!
//! Rules that real fleets need:
//! - a hash the instance reported `FAILED` is not pushed to it again until the fleet's
//!   assignment changes (otherwise the supervisor loops: apply, fail, roll back, apply…),
//!   and it stays failed unless the instance reports that very hash `APPLIED`;
//! - an instance that rolls back (reports `APPLIED` for its previous hash after failing
//!   the new one) stays `failed` for the new hash, and the history says it rolled back;
//! - instances that cannot accept remote config, and observe-only fleets, are `observed`;
//! - nothing heard for `stale_after` is `stale`, whatever came before.

use serde::{Deserialize, Serialize};

/// Agent capability bits this module reads (opamp.md §2.3).
pub const ACCEPTS_REMOTE_CONFIG: u64 = 0x2;
pub const REPORTS_REMOTE_CONFIG: u64 = 0x1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    InSync,
    Pending,
    Applying,
    Failed,
    Stale,
    Observed,
}

impl Status {
    pub const ALL: [Status; 6] =
        [Status::InSync, Status::Pending, Status::Applying, Status::Failed, Status::Stale, Status::Observed];

    /// From its snake_case name, as the API shows it.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == name)
    }

    /// The API spelling: `in_sync`, `pending`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Status::InSync => "in_sync",
            Status::Pending => "pending",
            Status::Applying => "applying",
            Status::Failed => "failed",
            Status::Stale => "stale",
            Status::Observed => "observed",
        }
    }
}

/// `RemoteConfigStatuses` as the agent reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reported {
    Unset,
    Applied,
    Applying,
    Failed,
}

impl Reported {
    /// From the protocol's enum value; unknown values count as unset.
    pub fn from_wire(value: i32) -> Self {
        match value {
            1 => Reported::Applied,
            2 => Reported::Applying,
            3 => Reported::Failed,
            _ => Reported::Unset,
        }
    }
}

/// The configuration an instance should run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub hash: Vec<u8>,
    /// The tag it comes from, e.g. `gateway/v7`, for history and display.
    pub tag: String,
}

/// An instance's remote-config state, as far as the status machine is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigState {
    pub capabilities: u64,
    /// `None` for observe-only fleets.
    pub assigned: Option<Assignment>,
    /// The hash last delivered to the instance.
    pub served: Option<Vec<u8>>,
    /// The last remote config status the instance reported: hash, status, error message.
    pub reported: Option<(Vec<u8>, Reported, String)>,
    /// The assigned hash the instance reported `FAILED` for, with the error. Cleared when the
    /// assignment changes, never by a later report.
    pub failed: Option<(Vec<u8>, String)>,
    /// Unix milliseconds of the last message from the instance.
    pub last_seen_ms: i64,
    /// Restored after a restart and not heard from since: `stale` until it speaks.
    pub awaiting_contact: bool,
    /// The assigned config was sent again because the instance reported it applied while
    /// running no pipeline (`applied_but_idle`); cleared when the assignment changes.
    pub resent_idle: bool,
}

/// Something worth a line in the instance's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    Status {
        from: Status,
        to: Status,
    },
    Assigned {
        tag: Option<String>,
        hash: Option<String>,
    },
    /// It reported `hash` applied, but its collector runs no pipeline although `hash` has
    /// some; it was sent again (`resent`), or, the second time, counted as failed.
    NotRunning {
        hash: String,
        resent: bool,
    },
    /// It failed `failed_hash` and went back to running `running_hash`.
    RolledBack {
        failed_hash: String,
        running_hash: String,
        error: String,
    },
}

impl ConfigState {
    pub fn new(capabilities: u64, assigned: Option<Assignment>, now_ms: i64) -> Self {
        Self {
            capabilities,
            assigned,
            served: None,
            reported: None,
            failed: None,
            last_seen_ms: now_ms,
            awaiting_contact: false,
            resent_idle: false,
        }
    }

    fn accepts_remote_config(&self) -> bool {
        self.capabilities & ACCEPTS_REMOTE_CONFIG != 0
    }

    /// The status now, given how long silence may last.
    pub fn status(&self, now_ms: i64, stale_after_ms: i64) -> Status {
        self.status_if_assigned(self.assigned.as_ref(), now_ms, stale_after_ms)
    }

    /// The status `assign(assigned)` would leave, without assigning.
    pub fn status_if_assigned(&self, assigned: Option<&Assignment>, now_ms: i64, stale_after_ms: i64) -> Status {
        if self.awaiting_contact || now_ms.saturating_sub(self.last_seen_ms) > stale_after_ms {
            return Status::Stale;
        }
        let Some(assigned) = assigned.filter(|_| self.accepts_remote_config()) else {
            return Status::Observed;
        };
        // `assign` forgets the failure when the hash changes.
        let same_hash = self.assigned.as_ref().is_some_and(|current| current.hash == assigned.hash);
        if same_hash && self.failed.as_ref().is_some_and(|(hash, _)| *hash == assigned.hash) {
            return Status::Failed;
        }
        match &self.reported {
            Some((hash, Reported::Applied, _)) if *hash == assigned.hash => return Status::InSync,
            Some((hash, Reported::Applying, _)) if *hash == assigned.hash => return Status::Applying,
            _ => {}
        }
        if self.served.as_ref() == Some(&assigned.hash) {
            // Delivered. An agent that never reports remote config status (the supervisor
            // without `reports_remote_config`) cannot confirm more than this.
            if self.capabilities & REPORTS_REMOTE_CONFIG == 0 {
                return Status::InSync;
            }
            return Status::Applying;
        }
        Status::Pending
    }

    /// Whether the assigned config should be sent with the next reply or push.
    pub fn config_to_push(&self) -> Option<&Assignment> {
        let assigned = self.assigned.as_ref().filter(|_| self.accepts_remote_config())?;
        if self.failed.as_ref().is_some_and(|(hash, _)| *hash == assigned.hash) {
            return None;
        }
        if self.reported.as_ref().map(|(hash, _, _)| hash) == Some(&assigned.hash) {
            return None;
        }
        // Not delivered yet, or no longer (see `heard`).
        (self.served.as_ref() != Some(&assigned.hash)).then_some(assigned)
    }

    /// The fleet's assignment changed (or was first set). A new hash forgets the failure.
    pub fn assign(&mut self, assigned: Option<Assignment>, now_ms: i64, stale_after_ms: i64) -> Vec<Change> {
        if self.assigned == assigned {
            return Vec::new();
        }
        let before = self.status(now_ms, stale_after_ms);
        let mut changes = vec![Change::Assigned {
            tag: assigned.as_ref().map(|a| a.tag.clone()),
            hash: assigned.as_ref().map(|a| hex::encode(&a.hash)),
        }];
        if self.assigned.as_ref().map(|a| &a.hash) != assigned.as_ref().map(|a| &a.hash) {
            self.failed = None;
            self.resent_idle = false;
        }
        self.assigned = assigned;
        push_status_change(&mut changes, before, self.status(now_ms, stale_after_ms));
        changes
    }

    /// The assigned config was delivered (pushed or sent in a reply).
    pub fn served(&mut self, hash: Vec<u8>, now_ms: i64, stale_after_ms: i64) -> Vec<Change> {
        let before = self.status(now_ms, stale_after_ms);
        self.served = Some(hash);
        let mut changes = Vec::new();
        push_status_change(&mut changes, before, self.status(now_ms, stale_after_ms));
        changes
    }

    /// A message arrived from the instance, with its capabilities and, if it sent one, its
    /// remote config status.
    pub fn heard(
        &mut self,
        capabilities: u64,
        report: Option<(Vec<u8>, Reported, String)>,
        now_ms: i64,
        stale_after_ms: i64,
    ) -> Vec<Change> {
        let before = self.status(now_ms, stale_after_ms);
        self.awaiting_contact = false;
        self.capabilities = capabilities;
        self.last_seen_ms = self.last_seen_ms.max(now_ms);
        let mut changes = Vec::new();
        if let Some((hash, reported, error)) = report {
            let assigned_hash = self.assigned.as_ref().map(|a| a.hash.clone());
            if reported == Reported::Failed && Some(&hash) == assigned_hash.as_ref() {
                self.failed = Some((hash.clone(), error.clone()));
            }
            // Applied after all: the Supervisor can report a failure under the hash it was just
            // sent (a check of the previous config finishing late), then apply it.
            if reported == Reported::Applied && self.failed.as_ref().is_some_and(|(failed, _)| *failed == hash) {
                self.failed = None;
            }
            if reported == Reported::Applied
                && let (Some((failed_hash, failed_error)), Some(assigned_hash)) = (&self.failed, &assigned_hash)
                && failed_hash == assigned_hash
                && hash != *assigned_hash
                && self.reported.as_ref().map(|(h, _, _)| h) != Some(&hash)
            {
                changes.push(Change::RolledBack {
                    failed_hash: hex::encode(failed_hash),
                    running_hash: hex::encode(&hash),
                    error: failed_error.clone(),
                });
            }
            // It runs, moves to, failed or knows nothing of something other than the assigned
            // hash, and not because it failed that one: whatever was delivered is gone (a
            // restart without its saved state, a lost message). It gets it again (opamp.md §3.3).
            // (With nothing assigned, nothing was failed: `None == None` is no failure.)
            let failed_assigned = self
                .failed
                .as_ref()
                .zip(assigned_hash.as_ref())
                .is_some_and(|((failed, _), assigned)| failed == assigned);
            if Some(&hash) != assigned_hash.as_ref() && !failed_assigned {
                self.served = None;
            }
            self.reported = Some((hash, reported, error));
        }
        push_status_change(&mut changes, before, self.status(now_ms, stale_after_ms));
        changes
    }

    /// The instance reported the assigned config applied, but its collector runs no
    /// pipeline while the config has some. The Supervisor can end up there when a config
    /// arrives while it starts (its start-up config overwrites the one it just received, and
    /// it reports the new hash applied once the idle collector is healthy). Sending the
    /// config again makes it restart the collector with it; if it ends up idle again, the
    /// instance is failed, with why. Call it when the instance reports applied and its
    /// effective config has no pipeline.
    pub fn applied_but_idle(&mut self, now_ms: i64, stale_after_ms: i64) -> Vec<Change> {
        let Some(assigned) = &self.assigned else { return Vec::new() };
        let applied = self
            .reported
            .as_ref()
            .is_some_and(|(hash, reported, _)| *hash == assigned.hash && *reported == Reported::Applied);
        if !applied || self.failed.as_ref().is_some_and(|(hash, _)| *hash == assigned.hash) {
            return Vec::new();
        }
        let before = self.status(now_ms, stale_after_ms);
        let hash = assigned.hash.clone();
        let mut changes = vec![Change::NotRunning { hash: hex::encode(&hash), resent: !self.resent_idle }];
        if self.resent_idle {
            let error = "it reported this configuration applied, but its collector runs no pipeline (its effective \
                         configuration has none), also after it was sent again: restart its Supervisor"
                .to_owned();
            self.failed = Some((hash, error));
        } else {
            self.resent_idle = true;
            self.served = None;
            self.reported = None;
        }
        push_status_change(&mut changes, before, self.status(now_ms, stale_after_ms));
        changes
    }

    /// The instance started over (its sequence numbers did) without being able to say what
    /// it runs: an agent without `ReportsRemoteConfig` may have lost what it was given, so
    /// it is given it again. Agents that report their status say so themselves (`heard`).
    pub fn restarted(&mut self) {
        if self.capabilities & REPORTS_REMOTE_CONFIG == 0 {
            self.served = None;
        }
    }

    /// The error message to show: the failure of the assigned hash, if any.
    pub fn error(&self) -> Option<&str> {
        self.failed.as_ref().map(|(_, error)| error.as_str()).filter(|e| !e.is_empty())
    }
}

fn push_status_change(changes: &mut Vec<Change>, from: Status, to: Status) {
    if from != to {
        changes.push(Change::Status { from, to });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: i64 = 120_000;
    const SUPERVISOR: u64 = 0x3847; // accepts and reports remote config
    const SILENT: u64 = 0x2847; // accepts remote config, reports no status
    const EXTENSION: u64 = 0x4805; // opampextension: reports only

    fn v(n: u8) -> Assignment {
        Assignment { hash: vec![n; 32], tag: format!("gateway/v{n}") }
    }

    fn report(n: u8, status: Reported, error: &str) -> Option<(Vec<u8>, Reported, String)> {
        Some((vec![n; 32], status, error.to_owned()))
    }

    #[test]
    fn status_table() {
        let base = ConfigState::new(SUPERVISOR, Some(v(2)), 1_000);
        let with = |f: &dyn Fn(&mut ConfigState)| {
            let mut state = base.clone();
            f(&mut state);
            state
        };
        let cases: Vec<(&str, ConfigState, Status)> = vec![
            ("nothing delivered", base.clone(), Status::Pending),
            ("delivered, no report", with(&|s| s.served = Some(vec![2; 32])), Status::Applying),
            ("reported applying", with(&|s| s.reported = report(2, Reported::Applying, "")), Status::Applying),
            ("reported applied", with(&|s| s.reported = report(2, Reported::Applied, "")), Status::InSync),
            ("applied an older hash", with(&|s| s.reported = report(1, Reported::Applied, "")), Status::Pending),
            ("failed the assigned hash", with(&|s| s.failed = Some((vec![2; 32], "bad".into()))), Status::Failed),
            (
                "a failure of another hash does not count",
                with(&|s| s.failed = Some((vec![1; 32], "bad".into()))),
                Status::Pending,
            ),
            ("observe-only fleet", with(&|s| s.assigned = None), Status::Observed),
            ("cannot accept remote config", with(&|s| s.capabilities = EXTENSION), Status::Observed),
            (
                "silent supervisor, delivered",
                with(&|s| {
                    s.capabilities = SILENT;
                    s.served = Some(vec![2; 32])
                }),
                Status::InSync,
            ),
            ("silent supervisor, not delivered", with(&|s| s.capabilities = SILENT), Status::Pending),
        ];
        for (name, state, expected) in &cases {
            assert_eq!(state.status(2_000, STALE), *expected, "{name}");
        }
        // Readers ask what an assignment would make the status without assigning it.
        for (name, state, _) in &cases {
            for assigned in [None, Some(v(1)), Some(v(2)), Some(v(3))] {
                let mut moved = state.clone();
                moved.assign(assigned.clone(), 2_000, STALE);
                let expected = moved.status(2_000, STALE);
                assert_eq!(state.status_if_assigned(assigned.as_ref(), 2_000, STALE), expected, "{name}, {assigned:?}");
            }
        }
        assert_eq!(base.status(1_000 + STALE + 1, STALE), Status::Stale, "silence");
        let observed = with(&|s| s.assigned = None);
        assert_eq!(observed.status(1_000 + STALE + 1, STALE), Status::Stale, "stale wins over observed");
    }

    #[test]
    fn running_nothing_while_nothing_is_assigned_is_heard_and_the_config_comes_again() {
        // Delivered, then the fleet lost its target (removed, say) and the collector came
        // back from a restart running nothing.
        let mut state = ConfigState::new(SUPERVISOR, Some(v(1)), 0);
        state.served = Some(vec![1; 32]);
        state.assign(None, 10, STALE);
        state.heard(SUPERVISOR, Some((Vec::new(), Reported::Unset, String::new())), 20, STALE);
        // The fleet is back: what was delivered before is gone, so it goes again.
        state.assign(Some(v(1)), 30, STALE);
        assert_eq!(state.config_to_push(), Some(&v(1)));
    }

    #[test]
    fn the_happy_path_and_its_history() {
        let mut state = ConfigState::new(SUPERVISOR, None, 0);
        assert_eq!(state.status(0, STALE), Status::Observed);
        assert_eq!(
            state.assign(Some(v(1)), 0, STALE),
            vec![
                Change::Assigned { tag: Some("gateway/v1".into()), hash: Some(hex::encode([1; 32])) },
                Change::Status { from: Status::Observed, to: Status::Pending },
            ]
        );
        assert_eq!(state.config_to_push(), Some(&v(1)));
        assert_eq!(
            state.served(vec![1; 32], 10, STALE),
            vec![Change::Status { from: Status::Pending, to: Status::Applying }]
        );
        assert_eq!(state.config_to_push(), None, "delivered, waiting for the report");
        assert_eq!(state.heard(SUPERVISOR, report(1, Reported::Applying, ""), 20, STALE), vec![]);
        assert_eq!(
            state.heard(SUPERVISOR, report(1, Reported::Applied, ""), 30, STALE),
            vec![Change::Status { from: Status::Applying, to: Status::InSync }]
        );
        assert_eq!(state.config_to_push(), None);
        assert_eq!(state.heard(SUPERVISOR, None, 40, STALE), vec![], "heartbeats change nothing");
    }

    #[test]
    fn a_failed_hash_is_not_pushed_again_and_a_rollback_stays_failed() {
        let mut state = ConfigState::new(SUPERVISOR, Some(v(1)), 0);
        state.served(vec![1; 32], 0, STALE);
        state.heard(SUPERVISOR, report(1, Reported::Applied, ""), 0, STALE);
        state.assign(Some(v(2)), 10, STALE);
        assert_eq!(state.config_to_push(), Some(&v(2)));
        state.served(vec![2; 32], 10, STALE);
        assert_eq!(
            state.heard(SUPERVISOR, report(2, Reported::Failed, "invalid pipeline"), 20, STALE),
            vec![Change::Status { from: Status::Applying, to: Status::Failed }]
        );
        assert_eq!(state.config_to_push(), None, "never re-push a failed hash");
        assert_eq!(state.error(), Some("invalid pipeline"));
        // The supervisor rolls back and reports the previous hash as applied.
        assert_eq!(
            state.heard(SUPERVISOR, report(1, Reported::Applied, ""), 30, STALE),
            vec![Change::RolledBack {
                failed_hash: hex::encode([2; 32]),
                running_hash: hex::encode([1; 32]),
                error: "invalid pipeline".into()
            }]
        );
        assert_eq!(state.status(30, STALE), Status::Failed, "still failed for the assigned hash");
        assert_eq!(state.config_to_push(), None, "and still not pushed again");
        // A late APPLIED for the failed hash itself means it runs after all.
        let mut late = state.clone();
        late.heard(SUPERVISOR, report(2, Reported::Applied, ""), 35, STALE);
        assert_eq!(late.status(35, STALE), Status::InSync);
        assert_eq!(late.error(), None);
        // A new assignment (a fix, or a rollback in Git) is pushed.
        state.assign(Some(v(3)), 40, STALE);
        assert_eq!(state.status(40, STALE), Status::Pending);
        assert_eq!(state.config_to_push(), Some(&v(3)));
        // Rolling the fleet back to the version the instance already runs: in sync at once.
        state.assign(Some(v(1)), 50, STALE);
        assert_eq!(state.status(50, STALE), Status::InSync);
        assert_eq!(state.config_to_push(), None);
    }

    #[test]
    fn a_restarted_agent_that_lost_its_config_gets_it_again() {
        let mut state = ConfigState::new(SUPERVISOR, Some(v(2)), 0);
        state.served(vec![2; 32], 0, STALE);
        state.heard(SUPERVISOR, report(2, Reported::Applied, ""), 0, STALE);
        state.heard(SUPERVISOR, report(1, Reported::Applied, ""), 10, STALE);
        assert_eq!(state.status(10, STALE), Status::Pending);
        assert_eq!(state.config_to_push(), Some(&v(2)));
    }

    #[test]
    fn an_agent_back_without_its_state_gets_the_config_again() {
        let in_sync = || {
            let mut state = ConfigState::new(SUPERVISOR, Some(v(2)), 0);
            state.served(vec![2; 32], 0, STALE);
            state.heard(SUPERVISOR, report(2, Reported::Applied, ""), 0, STALE);
            state
        };
        let unset = Some((Vec::new(), Reported::Unset, String::new()));
        let cases = [
            ("no status at all: unset, empty hash", unset),
            ("applying another hash", report(1, Reported::Applying, "")),
            ("failed another hash", report(1, Reported::Failed, "old failure")),
            ("unset with another hash", report(1, Reported::Unset, "")),
        ];
        for (name, report) in cases {
            let mut state = in_sync();
            assert_eq!(state.config_to_push(), None, "{name}: delivered and applied");
            let changes = state.heard(SUPERVISOR, report, 10, STALE);
            assert_eq!(changes, vec![Change::Status { from: Status::InSync, to: Status::Pending }], "{name}");
            assert_eq!(state.config_to_push(), Some(&v(2)), "{name}: sent again");
            assert_eq!(state.error(), None, "{name}: a failure of another hash is not this one's");
        }
        // Back without state after failing the assigned hash: it is not sent again.
        let mut state = ConfigState::new(SUPERVISOR, Some(v(2)), 0);
        state.served(vec![2; 32], 0, STALE);
        state.heard(SUPERVISOR, report(2, Reported::Failed, "bad exporter"), 5, STALE);
        state.heard(SUPERVISOR, Some((Vec::new(), Reported::Unset, String::new())), 10, STALE);
        assert_eq!(state.status(10, STALE), Status::Failed);
        assert_eq!(state.config_to_push(), None);
        // An agent that cannot report its status gets it again when it starts over; one that
        // can is left to say what it runs.
        let mut silent = ConfigState::new(SILENT, Some(v(2)), 0);
        silent.served(vec![2; 32], 0, STALE);
        assert_eq!(silent.status(0, STALE), Status::InSync);
        silent.restarted();
        assert_eq!(silent.config_to_push(), Some(&v(2)));
        let mut reporting = in_sync();
        reporting.restarted();
        assert_eq!(reporting.config_to_push(), None);
    }

    #[test]
    fn applied_but_idle_is_sent_again_once_then_failed() {
        let mut state = ConfigState::new(SUPERVISOR, Some(v(1)), 0);
        assert_eq!(state.applied_but_idle(0, STALE), vec![], "nothing applied yet");
        state.served(vec![1; 32], 0, STALE);
        state.heard(SUPERVISOR, report(1, Reported::Applied, ""), 10, STALE);
        assert_eq!(
            state.applied_but_idle(20, STALE),
            vec![
                Change::NotRunning { hash: hex::encode([1; 32]), resent: true },
                Change::Status { from: Status::InSync, to: Status::Pending },
            ]
        );
        assert_eq!(state.config_to_push(), Some(&v(1)), "sent again");
        state.served(vec![1; 32], 30, STALE);
        assert_eq!(state.applied_but_idle(35, STALE), vec![], "not applied again yet");
        state.heard(SUPERVISOR, report(1, Reported::Applied, ""), 40, STALE);
        assert_eq!(
            state.applied_but_idle(50, STALE),
            vec![
                Change::NotRunning { hash: hex::encode([1; 32]), resent: false },
                Change::Status { from: Status::InSync, to: Status::Failed },
            ]
        );
        assert_eq!(state.config_to_push(), None, "not a third time");
        assert!(state.error().is_some_and(|e| e.contains("runs no pipeline")));
        assert_eq!(state.applied_but_idle(60, STALE), vec![], "once failed, nothing more");
        // A new version starts afresh.
        state.assign(Some(v(2)), 70, STALE);
        state.served(vec![2; 32], 70, STALE);
        state.heard(SUPERVISOR, report(2, Reported::Applied, ""), 80, STALE);
        assert_eq!(
            state.applied_but_idle(90, STALE)[0],
            Change::NotRunning { hash: hex::encode([2; 32]), resent: true }
        );
    }

    #[test]
    fn stale_instances_catch_up_when_they_return() {
        let mut state = ConfigState::new(SUPERVISOR, Some(v(1)), 0);
        state.served(vec![1; 32], 0, STALE);
        state.heard(SUPERVISOR, report(1, Reported::Applied, ""), 0, STALE);
        assert_eq!(state.status(STALE + 1, STALE), Status::Stale);
        assert_eq!(
            state.heard(SUPERVISOR, None, STALE + 5, STALE),
            vec![Change::Status { from: Status::Stale, to: Status::InSync }]
        );
        // Restored after a restart: stale until heard from, however recent its last message.
        state.awaiting_contact = true;
        assert_eq!(state.status(STALE + 6, STALE), Status::Stale);
        assert_eq!(
            state.heard(SUPERVISOR, None, STALE + 7, STALE),
            vec![Change::Status { from: Status::Stale, to: Status::InSync }]
        );
    }

    #[test]
    fn capabilities_may_change() {
        let mut state = ConfigState::new(EXTENSION, Some(v(1)), 0);
        assert_eq!(state.config_to_push(), None, "no remote config for agents that cannot take it");
        assert_eq!(
            state.heard(SUPERVISOR, None, 5, STALE),
            vec![Change::Status { from: Status::Observed, to: Status::Pending }]
        );
        assert_eq!(state.config_to_push(), Some(&v(1)));
    }
}
