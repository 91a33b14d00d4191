//! What a change to the repository would do: desired state at a base commit → desired state
//! at the head commit. Pure; `check` renders it for people and CI.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Serialize;

use crate::problem::{Problem, Severity};
use crate::repo::desired::{DesiredState, Fleet, Version};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub commit: String,
    pub base_commit: Option<String>,
    /// Every fleet at the head commit with what it will run.
    pub fleets: Vec<FleetLine>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Fleets that the change breaks (their files cannot be used at the head): the server
    /// keeps their last good state until the file is fixed.
    pub broken: Vec<String>,
    pub rollouts: Vec<Rollout>,
    /// Fleets whose other settings changed, with a line per change.
    pub settings_changed: Vec<SettingsChange>,
    /// Every problem at the head commit.
    pub problems: Vec<Problem>,
    /// Problems at the head that the base did not have (all of them without a base).
    pub new_problems: Vec<Problem>,
    /// Problems of the base that the head no longer has.
    pub fixed_problems: Vec<Problem>,
    pub errors: usize,
    pub warnings: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FleetLine {
    pub name: String,
    pub config: Option<String>,
    pub selector: Option<String>,
    /// The tag it runs, `None` for observe-only or unassigned fleets.
    pub tag: Option<String>,
    pub config_hash: Option<String>,
    pub observe_only: bool,
    /// Its fleet file (or the version it names) cannot be used: the server keeps serving
    /// the fleet's last good state, which is `tag` when it is known here.
    pub broken: bool,
    /// `tag` was deleted from Git, and the server keeps the fleet on it (on `latest`, a
    /// fleet never moves back without a commit).
    pub tag_deleted: bool,
}

/// A fleet whose assigned version changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rollout {
    pub fleet: String,
    pub from: Option<String>,
    pub to: Option<String>,
    /// How the change reaches the fleet's instances: "at once …", "in 3 steps", "in batches …".
    pub how: String,
    /// The steps of its `[rollout]` (batches appear once their sizes are known: with `--server`).
    pub steps: Vec<PlannedStep>,
    /// Unified diff of the configuration between the two versions.
    pub diff: String,
}

/// One step of a planned rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlannedStep {
    pub name: String,
    /// `host=gw-canary-*`, or `any instance`.
    pub selects: String,
    /// `3`, `10%` or `all`.
    pub max: String,
    /// It waits for a commit that raises `release`.
    pub hold: bool,
    /// How many of the server's live instances would fall in it now (`check --server`).
    pub now: Option<crate::rollout::StepCounts>,
}

impl PlannedStep {
    fn of(step: &crate::rollout::Step) -> Self {
        Self {
            name: step.name.clone(),
            selects: step.selector.to_string(),
            max: step.max.map_or_else(|| "all".to_owned(), |max| max.to_string()),
            hold: step.hold,
            now: None,
        }
    }

    /// "step 1 (canary, host=gw-canary-*, max 3): 3 instances, all in sync; holds …"
    pub fn describe(&self, index: usize) -> String {
        let mut text = format!("step {} ({}", index + 1, self.name);
        if self.selects != "any instance" {
            text.push_str(&format!(", {}", self.selects));
        }
        if self.max != "all" {
            text.push_str(&format!(", max {}", self.max));
        }
        text.push(')');
        if let Some(now) = &self.now {
            let plural = if now.instances == 1 { "" } else { "s" };
            text.push_str(&format!(": {} instance{plural} now", now.instances));
            let in_sync = if now.instances > 0 && now.in_sync == now.instances {
                ", all in sync".to_owned()
            } else if now.instances > 0 {
                format!(", {} in sync", now.in_sync)
            } else {
                String::new()
            };
            text.push_str(&in_sync);
            if now.failed > 0 {
                text.push_str(&format!(", {} failed", now.failed));
            }
            if now.skipped > 0 {
                text.push_str(&format!(", {} stale (skipped)", now.skipped));
            }
        }
        if self.hold {
            text.push_str("; waits for a commit that raises `release`");
        }
        text
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SettingsChange {
    pub fleet: String,
    pub changes: Vec<String>,
}

pub fn plan(base: Option<&DesiredState>, head: &DesiredState) -> Plan {
    let mut fleets: Vec<FleetLine> = head.fleets.values().map(fleet_line).collect();
    fleets.extend(head.unresolved.iter().map(|name| FleetLine {
        name: name.clone(),
        config: None,
        selector: None,
        tag: None,
        config_hash: None,
        observe_only: false,
        broken: true,
        tag_deleted: false,
    }));
    fleets.sort_by(|a, b| a.name.cmp(&b.name));
    let mut added = Vec::new();
    let mut removed = Vec::new();
    let mut broken = Vec::new();
    let mut rollouts = Vec::new();
    let mut settings_changed = Vec::new();
    if let Some(base) = base {
        for (name, fleet) in &head.fleets {
            match base.fleets.get(name) {
                None => {
                    added.push(name.clone());
                    if fleet.assignment.is_some() {
                        rollouts.push(rollout(fleet, None, fleet.assignment.as_ref()));
                    }
                }
                Some(old) => {
                    if fleet.kept_last_good && !old.kept_last_good {
                        broken.push(name.clone());
                    }
                    if old.assignment.as_ref().map(|v| v.config_hash)
                        != fleet.assignment.as_ref().map(|v| v.config_hash)
                        || old.assignment.as_ref().map(|v| &v.tag) != fleet.assignment.as_ref().map(|v| &v.tag)
                    {
                        rollouts.push(rollout(fleet, old.assignment.as_ref(), fleet.assignment.as_ref()));
                    }
                    let changes = settings_changes(old, fleet);
                    if !changes.is_empty() {
                        settings_changed.push(SettingsChange { fleet: name.clone(), changes });
                    }
                }
            }
        }
        removed = base
            .fleets
            .keys()
            .filter(|name| !head.fleets.contains_key(*name) && !head.unresolved.contains(*name))
            .cloned()
            .collect();
        broken.extend(head.unresolved.iter().filter(|name| !base.unresolved.contains(*name)).cloned());
        broken.sort();
    }
    let key = |p: &Problem| (p.file.clone(), p.severity, p.message.clone());
    let base_keys: BTreeSet<_> = base.map(|b| b.problems.iter().map(key).collect()).unwrap_or_default();
    let head_keys: BTreeSet<_> = head.problems.iter().map(key).collect();
    let new_problems = head.problems.iter().filter(|p| !base_keys.contains(&key(p))).cloned().collect();
    let fixed_problems =
        base.map(|b| b.problems.iter().filter(|p| !head_keys.contains(&key(p))).cloned().collect()).unwrap_or_default();
    Plan {
        commit: head.commit.clone(),
        base_commit: base.map(|b| b.commit.clone()),
        fleets,
        added,
        removed,
        broken,
        rollouts,
        settings_changed,
        errors: head.problems.iter().filter(|p| p.severity == Severity::Error).count(),
        warnings: head.problems.iter().filter(|p| p.severity == Severity::Warning).count(),
        problems: head.problems.clone(),
        new_problems,
        fixed_problems,
    }
}

fn fleet_line(fleet: &Fleet) -> FleetLine {
    FleetLine {
        name: fleet.name().to_owned(),
        config: fleet.spec.config.clone(),
        selector: fleet.spec.version.as_ref().map(ToString::to_string),
        tag: fleet.assignment.as_ref().map(|v| v.tag.clone()),
        config_hash: fleet.assignment.as_ref().map(|v| hex::encode(v.config_hash)),
        observe_only: fleet.spec.observe_only(),
        broken: fleet.kept_last_good,
        tag_deleted: false,
    }
}

impl FleetLine {
    /// What the fleet runs, in words: the same in every format.
    pub fn runs(&self) -> String {
        let hash = self.config_hash.as_deref().map(|h| &h[..12.min(h.len())]).unwrap_or_default();
        match (&self.tag, self.broken, self.observe_only) {
            (Some(tag), _, _) if self.tag_deleted => format!("keeps {tag} on the server (its tag was deleted)"),
            (Some(tag), true, _) => format!("broken: keeps {tag} on the server"),
            (None, true, _) => "broken: the server keeps its last good state".to_owned(),
            (_, false, true) => "observe-only".to_owned(),
            (Some(tag), false, false) => format!("{tag} ({hash})"),
            (None, false, false) => "no version to roll out".to_owned(),
        }
    }
}

fn rollout(fleet: &Fleet, from: Option<&Arc<Version>>, to: Option<&Arc<Version>>) -> Rollout {
    let text = |v: Option<&Arc<Version>>| v.map(|v| String::from_utf8_lossy(&v.body).into_owned()).unwrap_or_default();
    let label =
        |v: Option<&Arc<Version>>| v.map(|v| format!("{}:{}", v.tag, v.file)).unwrap_or_else(|| "/dev/null".to_owned());
    let (old, new) = (text(from), text(to));
    let diff = similar::TextDiff::from_lines(&old, &new)
        .unified_diff()
        .context_radius(3)
        .header(&label(from), &label(to))
        .to_string();
    let (how, steps) = approach(fleet, from.map(|v| v.tag.as_str()), to.map(|v| v.tag.as_str()));
    Rollout {
        fleet: fleet.name().to_owned(),
        from: from.map(|v| v.tag.clone()),
        to: to.map(|v| v.tag.clone()),
        how,
        steps,
        diff,
    }
}

/// How a change from `from` to `to` reaches the fleet, as the server decides it
/// (`opamp::rollouts`): at once without a version before, for an earlier version, or without
/// a `[rollout]`; else in the steps of its `[rollout]`.
fn approach(fleet: &Fleet, from: Option<&str>, to: Option<&str>) -> (String, Vec<PlannedStep>) {
    use crate::rollout::Strategy;
    let (Some(from), Some(to)) = (from, to) else {
        return ("at once: there is no version before".to_owned(), Vec::new());
    };
    if crate::rollout::is_earlier(to, from) {
        return ("at once: an earlier version is a rollback".to_owned(), Vec::new());
    }
    match &fleet.spec.rollout.strategy {
        Strategy::All => ("at once (no [rollout])".to_owned(), Vec::new()),
        Strategy::Batches { initial, factor, cap } => {
            let cap = cap.map(|cap| format!(", at most {cap} each")).unwrap_or_default();
            (format!("in batches: {initial} first, then ×{factor}{cap}; the last takes the rest"), Vec::new())
        }
        strategy => {
            let steps: Vec<PlannedStep> =
                crate::rollout::plan(strategy, 0).unwrap_or_default().iter().map(PlannedStep::of).collect();
            (format!("in {} steps", steps.len()), steps)
        }
    }
}

/// An instance as the server reports it, for `check --server`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveInstance {
    pub uid: [u8; 16],
    /// Not stale.
    pub live: bool,
    /// Where it stands with the version it runs now.
    pub outcome: crate::rollout::Outcome,
    pub host: Option<String>,
    pub attributes: Vec<(String, String)>,
}

/// Fills in how many of the live instances would fall in each step of each rollout now (for
/// batches, the batches themselves): `instances` of each fleet as the server reports them.
pub fn with_instances_now(plan: &mut Plan, head: &DesiredState, instances: &mut dyn FnMut(&str) -> Vec<LiveInstance>) {
    for rollout in &mut plan.rollouts {
        let Some(fleet) = head.fleets.get(&rollout.fleet) else { continue };
        if rollout.how.starts_with("at once") {
            continue;
        }
        let instances = instances(&rollout.fleet);
        let live = instances.iter().filter(|instance| instance.live).count();
        let Some(steps) = crate::rollout::plan(&fleet.spec.rollout.strategy, live) else { continue };
        let facts: Vec<crate::rollout::Fact> = instances
            .iter()
            .map(|instance| crate::rollout::Fact {
                uid: instance.uid,
                live: instance.live,
                matches: crate::rollout::matching_steps(
                    &steps,
                    instance.host.as_deref(),
                    instance.attributes.iter().map(|(key, value)| (key.as_str(), value.as_str())),
                ),
                outcome: instance.outcome,
            })
            .collect();
        let counts = crate::rollout::Rollout::preview(steps.clone(), &facts);
        rollout.steps = steps
            .iter()
            .zip(counts)
            .map(|(step, now)| PlannedStep { now: Some(now), ..PlannedStep::of(step) })
            .collect();
    }
}

/// A `[rollout]` table in a line, `release` aside (it has its own line).
fn rollout_text(spec: &crate::rollout::RolloutSpec) -> String {
    use crate::rollout::Strategy;
    let strategy = match &spec.strategy {
        Strategy::All => return "all at once".to_owned(),
        Strategy::Batches { initial, factor, cap } => {
            format!("batches of {initial} ×{factor}{}", cap.map(|c| format!(" at most {c}")).unwrap_or_default())
        }
        Strategy::Steps(steps) => {
            let names: Vec<&str> = steps.iter().map(|step| step.name.as_str()).collect();
            format!("steps {}", names.join(", "))
        }
    };
    format!(
        "{strategy}; bake {}, max_failures {}, on_failure {}",
        crate::duration::format_duration(spec.bake),
        spec.max_failures,
        if spec.on_failure == crate::rollout::OnFailure::Rollback { "rollback" } else { "halt" }
    )
}

fn settings_changes(old: &Fleet, new: &Fleet) -> Vec<String> {
    let (old, new) = (&old.spec, &new.spec);
    let mut changes = Vec::new();
    let mut compare = |what: &str, before: String, after: String| {
        if before != after {
            changes.push(format!("{what}: {before} → {after}"));
        }
    };
    let show = |value: Option<String>| value.unwrap_or_else(|| "(none)".to_owned());
    compare("description", format!("{:?}", old.description), format!("{:?}", new.description));
    compare(
        "version",
        show(old.version.as_ref().map(ToString::to_string)),
        show(new.version.as_ref().map(ToString::to_string)),
    );
    let expires =
        |d: Option<std::time::Duration>| d.map(crate::duration::format_duration).unwrap_or_else(|| "never".to_owned());
    compare("token.expires", expires(old.token.expires), expires(new.token.expires));
    compare("token.rotate", old.token.rotate.to_string(), new.token.rotate.to_string());
    compare(
        "token.grace",
        crate::duration::format_duration(old.token.grace),
        crate::duration::format_duration(new.token.grace),
    );
    compare("token.revoked", format!("{:?}", old.token.revoked), format!("{:?}", new.token.revoked));
    compare("install.endpoint", show(old.install.endpoint.clone()), show(new.install.endpoint.clone()));
    compare(
        "install.collector_version",
        show(old.install.collector_version.clone()),
        show(new.install.collector_version.clone()),
    );
    compare(
        "install.supervisor_version",
        show(old.install.supervisor_version.clone()),
        show(new.install.supervisor_version.clone()),
    );
    compare("rollout", rollout_text(&old.rollout), rollout_text(&new.rollout));
    let released = if new.rollout.release > old.rollout.release { " (releases a held step)" } else { "" };
    compare("rollout.release", old.rollout.release.to_string(), format!("{}{released}", new.rollout.release));
    compare(
        "health.stale_after",
        crate::duration::format_duration(old.health.stale_after),
        crate::duration::format_duration(new.health.stale_after),
    );
    changes
}
