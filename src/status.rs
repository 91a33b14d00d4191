//! What a fleet looks like from outside, computed from values only: the summary the status
//! branch records, the commit status forges show, and the words both use.
//!
//! A `FleetStatus` is the part of a fleet's state that is worth a commit: the version, the
//! counts, drift and failures. Heartbeats move `last_seen` and nothing here, so they never
//! make a commit.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::instance::Status;
use crate::repo::desired::{DesiredState, Fleet};

/// One instance as the API, the status page and the status branch show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstanceRow {
    pub instance_uid: String,
    pub fleet: String,
    pub status: Status,
    pub assigned_hash: Option<String>,
    pub assigned_tag: Option<String>,
    /// Why it has that version: `fleet`, `step 2`, `held`, `rollback`.
    pub assigned_because: Option<String>,
    pub served_hash: Option<String>,
    pub reported_hash: Option<String>,
    pub reported_status: Option<crate::instance::Reported>,
    pub host: Option<String>,
    pub os: Option<String>,
    pub arch: Option<String>,
    pub agent_version: Option<String>,
    pub healthy: Option<bool>,
    /// Unix milliseconds; RFC 3339 as `last_seen` in JSON.
    #[serde(rename = "last_seen", serialize_with = "rfc3339_of_ms")]
    pub last_seen_ms: i64,
    pub error: Option<String>,
    pub transport: Option<&'static str>,
    pub connected: bool,
    pub token_id: String,
    pub token_current: bool,
    /// Served differs from assigned.
    #[serde(skip)]
    pub drifted: bool,
}

impl InstanceRow {
    /// The API's object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("instance rows serialize to JSON")
    }
}

fn rfc3339_of_ms<S: serde::Serializer>(unix_ms: &i64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&crate::time::rfc3339(unix_ms / 1000))
}

/// Per-status counts of one fleet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub in_sync: usize,
    pub pending: usize,
    pub applying: usize,
    pub failed: usize,
    pub stale: usize,
    pub observed: usize,
}

impl Counts {
    pub fn add(&mut self, status: Status) {
        match status {
            Status::InSync => self.in_sync += 1,
            Status::Pending => self.pending += 1,
            Status::Applying => self.applying += 1,
            Status::Failed => self.failed += 1,
            Status::Stale => self.stale += 1,
            Status::Observed => self.observed += 1,
        }
    }

    pub fn get(&self, status: Status) -> usize {
        match status {
            Status::InSync => self.in_sync,
            Status::Pending => self.pending,
            Status::Applying => self.applying,
            Status::Failed => self.failed,
            Status::Stale => self.stale,
            Status::Observed => self.observed,
        }
    }

    pub fn total(&self) -> usize {
        self.in_sync + self.pending + self.applying + self.failed + self.stale + self.observed
    }

    /// Instances heard from within their fleet's `stale_after`.
    pub fn live(&self) -> usize {
        self.total() - self.stale
    }
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Self) {
        self.in_sync += other.in_sync;
        self.pending += other.pending;
        self.applying += other.applying;
        self.failed += other.failed;
        self.stale += other.stale;
        self.observed += other.observed;
    }
}

/// An instance that failed to apply the fleet's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub instance_uid: String,
    pub host: Option<String>,
    pub error: String,
}

/// The commit-worthy state of one fleet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub fleet: String,
    pub config: Option<String>,
    /// `None` for observe-only fleets and fleets with nothing to roll out.
    pub tag: Option<String>,
    pub config_hash: Option<String>,
    /// The commit that set the assignment (see `LastGoodFleet::assigned_by`).
    pub assigned_by: Option<String>,
    pub instances: usize,
    pub counts: Counts,
    pub drift: usize,
    pub failures: Vec<Failure>,
    /// The fleet's rollout while it decides per instance, or after it rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// A rollout as the status branch, forges and the status page show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// `running`, `held`, `halted`, `rolled_back`.
    pub state: String,
    /// The current step, from 1.
    pub step: usize,
    pub steps: usize,
    pub step_name: String,
    pub from: Option<String>,
    pub to: String,
    /// Instances the rollout moved that are in sync with its new version.
    pub on_new: usize,
    pub reason: Option<String>,
}

impl RolloutStatus {
    /// The rollout of a fleet as worth a commit; `None` once it completed (or went back in Git).
    pub fn of(rollout: &crate::rollout::Rollout, counts: &[crate::rollout::StepCounts]) -> Option<Self> {
        use crate::rollout::State;
        if matches!(rollout.state, State::Complete | State::Reverted) {
            return None;
        }
        let step = rollout.step.min(rollout.steps.len().saturating_sub(1));
        Some(Self {
            state: rollout.state.as_str().to_owned(),
            step: step + 1,
            steps: rollout.steps.len(),
            step_name: rollout.steps.get(step).map(|s| s.name.clone()).unwrap_or_default(),
            from: rollout.from.as_ref().map(|from| from.tag.clone()),
            to: rollout.to.tag.clone(),
            on_new: counts.iter().map(|count| count.in_sync).sum(),
            reason: rollout.reason.clone(),
        })
    }

    /// "step 2/4 (rest)"
    fn step_text(&self) -> String {
        format!("step {}/{} ({})", self.step, self.steps, self.step_name)
    }
}

/// What a forge shows for a fleet on its assignment commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// An instance is yet to apply the assignment.
    Pending,
    /// Every live instance is in sync, or none is connected.
    Success,
    /// At least one instance failed to apply the configuration.
    Failure,
}

/// What a fleet's instances add up to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub counts: Counts,
    pub drift: usize,
    /// In `instance_uid` order once `finish`ed.
    pub failures: Vec<Failure>,
    pub rollout: Option<RolloutStatus>,
}

impl Tally {
    /// Counts one instance; `failure` is asked for only when it failed.
    pub fn add(&mut self, status: Status, drifted: bool, failure: impl FnOnce() -> Failure) {
        self.counts.add(status);
        self.drift += usize::from(drifted);
        if status == Status::Failed {
            self.failures.push(failure());
        }
    }

    pub fn of_rows(rows: &[InstanceRow]) -> Self {
        let mut tally = Tally::default();
        for row in rows {
            tally.add(row.status, row.drifted, || Failure {
                instance_uid: row.instance_uid.clone(),
                host: row.host.clone(),
                error: row.error.clone().unwrap_or_default(),
            });
        }
        tally.finish()
    }

    pub fn finish(mut self) -> Self {
        self.failures.sort_by(|a, b| a.instance_uid.cmp(&b.instance_uid));
        self
    }
}

impl Verdict {
    /// From its snake_case name, as serialized.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "pending" => Some(Verdict::Pending),
            "success" => Some(Verdict::Success),
            "failure" => Some(Verdict::Failure),
            _ => None,
        }
    }
}

impl FleetStatus {
    /// The status of `fleet` given its instances (in any order).
    pub fn of(fleet: &Fleet, desired: &DesiredState, rows: &[InstanceRow]) -> Self {
        Self::of_tally(fleet, desired, Tally::of_rows(rows))
    }

    /// The status of `fleet` given what its instances add up to.
    pub fn of_tally(fleet: &Fleet, desired: &DesiredState, tally: Tally) -> Self {
        let assignment = fleet.assignment.as_deref();
        let Tally { counts, drift, failures, rollout } = tally.finish();
        let assigned_by = assignment.and_then(|version| {
            let good = desired.last_good.get(fleet.name())?;
            (good.tag.as_deref() == Some(&version.tag)).then(|| good.assigned_by.clone())?
        });
        Self {
            fleet: fleet.name().to_owned(),
            config: fleet.spec.config.clone(),
            tag: assignment.map(|v| v.tag.clone()),
            config_hash: assignment.map(|v| hex::encode(v.config_hash)),
            assigned_by,
            instances: counts.total(),
            counts,
            drift,
            failures,
            rollout,
        }
    }

    /// Failure when an instance failed; pending while an instance is yet to apply the
    /// assignment; success otherwise, including when no instance is connected: nothing is
    /// left to wait for (a required check must not block on a fleet nobody runs yet), and
    /// the description says so. An instance that connects later turns it pending again.
    pub fn verdict(&self) -> Verdict {
        let counts = &self.counts;
        match self.rollout.as_ref().map(|rollout| rollout.state.as_str()) {
            Some("halted" | "rolled_back") => return Verdict::Failure,
            Some(_) => return Verdict::Pending,
            None => {}
        }
        if counts.failed > 0 {
            Verdict::Failure
        } else if counts.pending + counts.applying > 0 {
            Verdict::Pending
        } else {
            Verdict::Success
        }
    }

    /// "9/12 in sync, 1 failed, 2 stale": what converged, then what did not.
    pub fn description(&self) -> String {
        let counts = &self.counts;
        if self.tag.is_none() {
            return format!("{} observed", self.instances);
        }
        let mut text = match &self.rollout {
            Some(rollout) => {
                let on_new = format!("{}/{} at {}", rollout.on_new, self.instances, rollout.to);
                match rollout.state.as_str() {
                    "held" => format!("held before {}, {on_new}", rollout.step_text()),
                    "halted" => format!("halted at {}, {on_new}", rollout.step_text()),
                    "rolled_back" => format!(
                        "rolled back to {} at {}, {}/{} in sync",
                        rollout.from.as_deref().unwrap_or("the version before"),
                        rollout.step_text(),
                        counts.in_sync,
                        self.instances
                    ),
                    _ => format!("{}, {on_new}", rollout.step_text()),
                }
            }
            None if self.instances == 0 => return "no instances connected".to_owned(),
            None => format!("{}/{} in sync", counts.in_sync, self.instances),
        };
        for (count, word) in [
            (counts.failed, "failed"),
            (counts.applying, "applying"),
            (counts.pending, "pending"),
            (counts.stale, "stale"),
            (counts.observed, "observed"),
        ] {
            if count > 0 {
                let _ = write!(text, ", {count} {word}");
            }
        }
        text
    }

    /// "prod-gateway: 12/12 in sync at gateway/v7", the line a commit message gives it.
    pub fn headline(&self) -> String {
        if self.rollout.is_some() {
            return format!("{}: {}", self.fleet, self.description());
        }
        match &self.tag {
            Some(tag) => format!("{}: {} at {tag}", self.fleet, self.description()),
            None => format!("{}: {} (observe only)", self.fleet, self.description()),
        }
    }
}

/// The commit message for a change from `before` to `after`: the headline of a single
/// changed fleet, or a count with one line per fleet in the body.
pub fn commit_message(before: &BTreeMap<String, FleetStatus>, after: &BTreeMap<String, FleetStatus>) -> Option<String> {
    let changed = after.iter().filter(|(name, status)| before.get(*name) != Some(status));
    let mut names: Vec<&str> = changed.clone().map(|(name, _)| name.as_str()).collect();
    let mut lines: Vec<String> = changed.map(|(_, s)| s.headline()).collect();
    let removed = before.keys().filter(|name| !after.contains_key(*name));
    names.extend(removed.clone().map(String::as_str));
    lines.extend(removed.map(|name| format!("{name}: removed")));
    match lines.len() {
        0 => None,
        1 => Some(lines.remove(0)),
        n => Some(format!("{}\n\n{}", subject_naming(n, &names), lines.join("\n"))),
    }
}

/// A subject line that names the fleets a commit changed, as many as fit in a subject
/// (`4 fleets: edge, nodes and 2 more`).
fn subject_naming(count: usize, names: &[&str]) -> String {
    const SUBJECT: usize = 72;
    let mut subject = format!("{count} fleets: ");
    for (shown, name) in names.iter().enumerate() {
        let rest = count - shown - 1;
        let tail = if rest > 0 { format!(" and {rest} more") } else { String::new() };
        let separator = if shown == 0 { "" } else { ", " };
        // Keep room for what follows, unless this is the last name.
        if subject.len() + separator.len() + name.len() + tail.len() > SUBJECT && shown > 0 {
            subject.push_str(&format!(" and {} more", count - shown));
            return subject;
        }
        subject.push_str(separator);
        subject.push_str(name);
    }
    subject
}

/// The status branch's `README.md`: a table per fleet, for people.
/// With `status_page`, it links to the live status page and each fleet's page there.
pub fn readme(
    desired: &DesiredState,
    statuses: &BTreeMap<String, FleetStatus>,
    now: i64,
    status_page: Option<&str>,
) -> String {
    let mut text = String::from("# Fleet status\n\n");
    let _ = writeln!(
        text,
        "Written by gitfleet from `{}` at commit `{}`, {}. Each fleet's details are in `fleets/<fleet>.json`.\n",
        desired.branch,
        crate::repo::desired::short(&desired.commit),
        crate::time::rfc3339(now),
    );
    if let Some(page) = status_page {
        let _ = writeln!(text, "Live status: <{page}/>\n");
    }
    if statuses.is_empty() {
        text.push_str("No fleets yet.\n");
    }
    for status in statuses.values() {
        match status_page {
            Some(page) => {
                let _ = writeln!(text, "## [{}]({page}/fleets/{})\n", markdown_text(&status.fleet), status.fleet);
            }
            None => {
                let _ = writeln!(text, "## {}\n", markdown_text(&status.fleet));
            }
        }
        text.push_str("| Version | Instances | In sync | Pending | Applying | Failed | Stale | Observed | Drift |\n");
        text.push_str("|---|---|---|---|---|---|---|---|---|\n");
        let counts = &status.counts;
        let _ = writeln!(
            text,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            status.tag.as_deref().map_or_else(|| "observe only".to_owned(), markdown_text),
            status.instances,
            counts.in_sync,
            counts.pending,
            counts.applying,
            counts.failed,
            counts.stale,
            counts.observed,
            status.drift,
        );
        if let Some(rollout) = &status.rollout {
            let _ = writeln!(
                text,
                "Rollout of {}: {}.\n",
                markdown_text(&rollout.to),
                markdown_text(&status.description())
            );
            if let Some(reason) = &rollout.reason {
                let _ = writeln!(text, "{}\n", markdown_text(reason));
            }
        }
        if !status.failures.is_empty() {
            text.push_str("| Failed instance | Host | Error |\n|---|---|---|\n");
            for failure in &status.failures {
                let _ = writeln!(
                    text,
                    "| `{}` | {} | {} |",
                    failure.instance_uid,
                    failure.host.as_deref().map(markdown_text).unwrap_or_default(),
                    markdown_text(&failure.error),
                );
            }
            text.push('\n');
        }
    }
    text
}

/// Text an agent sent, made safe inside a Markdown table cell: no HTML, no table breaks,
/// no line breaks.
fn markdown_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '|' => out.push_str("\\|"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '`' | '*' | '_' | '[' | ']' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Writes one fleet's machine-readable file, `fleets/<fleet>.json`, as it is serialized:
/// at 20,000 instances it is megabytes, and is never held whole, nor are its rows. Each
/// instance is one line, so that `git diff` between two status commits shows which
/// instances changed.
pub fn write_fleet_file(
    out: &mut dyn std::io::Write,
    status: &FleetStatus,
    rows: &mut dyn Iterator<Item = InstanceRow>,
) -> std::io::Result<()> {
    let summary = serde_json::to_string_pretty(status)?.replace('\n', "\n  ");
    let verdict = serde_json::to_string(&status.verdict())?;
    let description = serde_json::to_string(&status.description())?;
    write!(
        out,
        "{{\n  \"summary\": {summary},\n  \"verdict\": {verdict},\n  \"description\": {description},\n  \"instances\": ["
    )?;
    for (index, row) in rows.enumerate() {
        out.write_all(if index == 0 { b"\n    " } else { b",\n    " })?;
        serde_json::to_writer(&mut *out, &row)?;
    }
    out.write_all(b"\n  ]\n}\n")
}

/// The summary back out of a fleet file, to know what the branch already records.
pub fn summary_of_fleet_file(text: &str) -> Option<FleetStatus> {
    #[derive(Deserialize)]
    struct File {
        summary: FleetStatus,
    }
    serde_json::from_str::<File>(text).ok().map(|file| file.summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(counts: Counts, tag: Option<&str>) -> FleetStatus {
        FleetStatus {
            fleet: "prod-gateway".into(),
            config: Some("gateway".into()),
            tag: tag.map(Into::into),
            config_hash: None,
            assigned_by: None,
            instances: counts.total(),
            counts,
            drift: 0,
            failures: Vec::new(),
            rollout: None,
        }
    }

    #[test]
    fn a_rollout_says_its_step_and_never_looks_green() {
        let rollout = |state: &str| RolloutStatus {
            state: state.into(),
            step: 2,
            steps: 4,
            step_name: "rest".into(),
            from: Some("gateway/v7".into()),
            to: "gateway/v8".into(),
            on_new: 40,
            reason: None,
        };
        let mut fleet = status(Counts { in_sync: 119, failed: 1, ..Default::default() }, Some("gateway/v8"));
        fleet.rollout = Some(rollout("running"));
        assert_eq!(fleet.headline(), "prod-gateway: step 2/4 (rest), 40/120 at gateway/v8, 1 failed");
        assert_eq!(fleet.verdict(), Verdict::Pending);
        fleet.rollout = Some(rollout("held"));
        assert_eq!(fleet.description(), "held before step 2/4 (rest), 40/120 at gateway/v8, 1 failed");
        assert_eq!(fleet.verdict(), Verdict::Pending, "held is not success");
        fleet.rollout = Some(rollout("halted"));
        assert_eq!(fleet.verdict(), Verdict::Failure);
        fleet.rollout = Some(rollout("rolled_back"));
        fleet.counts = Counts { in_sync: 120, ..Default::default() };
        assert_eq!(fleet.description(), "rolled back to gateway/v7 at step 2/4 (rest), 120/120 in sync");
        assert_eq!(fleet.verdict(), Verdict::Failure, "a rollback is a failure of the version");
    }

    #[test]
    fn verdicts_and_descriptions() {
        let cases = [
            (Counts { in_sync: 12, ..Default::default() }, Verdict::Success, "12/12 in sync"),
            (
                Counts { in_sync: 9, failed: 1, pending: 2, ..Default::default() },
                Verdict::Failure,
                "9/12 in sync, 1 failed, 2 pending",
            ),
            (Counts { in_sync: 3, applying: 1, ..Default::default() }, Verdict::Pending, "3/4 in sync, 1 applying"),
            (Counts { in_sync: 10, stale: 2, ..Default::default() }, Verdict::Success, "10/12 in sync, 2 stale"),
            (Counts { stale: 2, ..Default::default() }, Verdict::Success, "0/2 in sync, 2 stale"),
            (Counts::default(), Verdict::Success, "no instances connected"),
        ];
        for (counts, verdict, description) in cases {
            let status = status(counts, Some("gateway/v7"));
            assert_eq!((status.verdict(), status.description().as_str()), (verdict, description), "{counts:?}");
        }
        assert_eq!(
            status(Counts { in_sync: 12, ..Default::default() }, Some("gateway/v7")).headline(),
            "prod-gateway: 12/12 in sync at gateway/v7"
        );
        assert_eq!(
            status(Counts { observed: 3, ..Default::default() }, None).headline(),
            "prod-gateway: 3 observed (observe only)"
        );
    }

    #[test]
    fn commit_messages_name_what_changed() {
        let one = |fleet: &str, in_sync| {
            let mut s = status(Counts { in_sync, pending: 2 - in_sync, ..Default::default() }, Some("gateway/v2"));
            s.fleet = fleet.into();
            (fleet.to_owned(), s)
        };
        let before = BTreeMap::from([one("a", 0), one("b", 0)]);
        assert_eq!(commit_message(&before, &before), None);
        let after = BTreeMap::from([one("a", 2), one("b", 0)]);
        assert_eq!(commit_message(&before, &after).as_deref(), Some("a: 2/2 in sync at gateway/v2"));
        let after = BTreeMap::from([one("a", 2), one("c", 1)]);
        assert_eq!(
            commit_message(&before, &after).as_deref(),
            Some(
                "3 fleets: a, c, b\n\na: 2/2 in sync at gateway/v2\nc: 1/2 in sync, 1 pending at gateway/v2\nb: removed"
            )
        );
        // Shortened when many, within a subject's 72 characters.
        let names: Vec<String> = (0..30).map(|i| format!("fleet-number-{i:02}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let subject = subject_naming(30, &refs);
        assert_eq!(subject, "30 fleets: fleet-number-00, fleet-number-01, fleet-number-02 and 27 more");
        assert!(subject.len() <= 72);
        assert_eq!(subject_naming(2, &["prod-gateway", "staging-gateway"]), "2 fleets: prod-gateway, staging-gateway");
    }

    #[test]
    fn agent_text_cannot_break_the_readme() {
        assert_eq!(markdown_text("<img src=x onerror=alert(1)>"), "&lt;img src=x onerror=alert(1)&gt;");
        assert_eq!(markdown_text("a|b\nc`d`[e](f)"), "a\\|b c\\`d\\`\\[e\\](f)");
    }

    fn row(uid: &str) -> InstanceRow {
        InstanceRow {
            instance_uid: uid.into(),
            fleet: "prod-gateway".into(),
            status: Status::InSync,
            assigned_hash: None,
            assigned_tag: None,
            assigned_because: None,
            served_hash: None,
            reported_hash: None,
            reported_status: None,
            host: Some("<h>".into()),
            os: None,
            arch: None,
            agent_version: None,
            healthy: Some(true),
            last_seen_ms: 1_795_579_704_000,
            error: None,
            transport: Some("websocket"),
            connected: true,
            token_id: "tk".into(),
            token_current: true,
            drifted: false,
        }
    }

    #[test]
    fn fleet_files_round_trip_their_summary() {
        let mut s = status(Counts { in_sync: 1, failed: 1, ..Default::default() }, Some("gateway/v2"));
        s.failures.push(Failure { instance_uid: "u".into(), host: Some("h".into()), error: "bad".into() });
        for rows in [vec![], vec![row("a"), row("b")]] {
            let mut file = Vec::new();
            write_fleet_file(&mut file, &s, &mut rows.clone().into_iter()).expect("written");
            let text = String::from_utf8(file).expect("UTF-8");
            assert_eq!(summary_of_fleet_file(&text), Some(s.clone()));
            let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            assert_eq!(value["verdict"], "failure");
            assert_eq!(value["description"], "1/2 in sync, 1 failed");
            let uids: Vec<&str> = value["instances"]
                .as_array()
                .expect("instances")
                .iter()
                .filter_map(|i| i["instance_uid"].as_str())
                .collect();
            assert_eq!(uids, rows.iter().map(|r| r.instance_uid.as_str()).collect::<Vec<_>>());
            assert_eq!(
                text.lines().filter(|line| line.starts_with("    {\"instance_uid\"")).count(),
                rows.len(),
                "one line each"
            );
        }
        assert_eq!(summary_of_fleet_file("{"), None);
    }
}
