//! `gitfleet check`: validate a repository and show what it would change against a base, as
//! text for a terminal, Markdown for a pull-request comment, or JSON for tools.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::git::GitError;
use crate::git::snapshot::SnapshotReader;
use crate::plan::{FleetLine, Plan, plan};
use crate::problem::{Problem, Severity};
use crate::repo::desired::{self, short};
use crate::status::FleetStatus;

/// What removing a fleet does to its collectors, for plans.
const REMOVAL_EFFECT: &str = "its collectors keep their config and may connect, observe only, for the server's --removed-fleet-grace (7d unless set); then they are refused";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Markdown,
    Json,
}

#[derive(Clone, Debug, clap::Args)]
pub struct CheckArgs {
    /// The repository to check (any directory inside it).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// The commit (branch, tag, id) to compare with, e.g. origin/main in a pull request.
    #[arg(long)]
    pub base: Option<String>,
    /// The commit to check.
    #[arg(long, default_value = "HEAD")]
    pub rev: String,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// The server's status branch, read (when the clone has it) for what the server keeps
    /// serving that Git alone no longer shows: versions whose tags were deleted or moved.
    #[arg(long, default_value = "gitfleet/status")]
    pub status_branch: String,
    /// A running server's web address: each rollout step then says how many of its live
    /// instances would fall in it now (read from the server's read-only API).
    #[arg(long)]
    pub server: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(
        "{path} is not a config repository: `{rev}` has no fleets/ and no configs/ directory (see the README for the layout)"
    )]
    NotAConfigRepository { path: String, rev: String },
    #[error(transparent)]
    Server(#[from] crate::client::ClientError),
}

/// Reads and compiles the repository at `--rev` (and `--base`), and plans the change.
///
/// The head is compiled with the base as its memory, as the server would have it: a fleet
/// file broken at the head keeps the state it had at the base.
pub fn run(args: &CheckArgs) -> Result<Plan, CheckError> {
    let repo = crate::git::discover(&args.repo)?;
    let mut reader = SnapshotReader::new();
    let branch =
        repo.head_name().ok().flatten().map(|name| name.shorten().to_string()).unwrap_or_else(|| args.rev.clone());
    let head_snapshot = reader.read(&repo, &args.rev, &branch)?;
    if !head_snapshot.files.keys().any(|path| path.starts_with("fleets") || path.starts_with("configs")) {
        let path = repo.workdir().unwrap_or(repo.git_dir()).display().to_string();
        return Err(CheckError::NotAConfigRepository { path, rev: args.rev.clone() });
    }
    let base = match &args.base {
        Some(base) => {
            let snapshot = reader.read(&repo, base, base)?;
            Some(desired::compile(&snapshot, desired::Memory::default()).desired)
        }
        None => None,
    };
    let memory = match &base {
        Some(base) => desired::Memory { last_good: Some(&base.last_good), previous: Some(base), ..Default::default() },
        None => desired::Memory::default(),
    };
    let head = desired::compile(&head_snapshot, memory).desired;
    let mut plan = plan(base.as_ref(), &head);
    let served = served_by_server(&repo, &args.status_branch);
    as_the_server_serves(&mut plan, &head, &served);
    if let Some(server) = &args.server {
        let api = crate::client::Api::new(&crate::client::ServerArg { server: server.clone() })?;
        let mut failed = None;
        crate::plan::with_instances_now(&mut plan, &head, &mut |fleet| {
            live_instances(&api, fleet).unwrap_or_else(|error| {
                failed.get_or_insert(error);
                Vec::new()
            })
        });
        if let Some(error) = failed {
            return Err(error.into());
        }
    }
    Ok(plan)
}

/// Every instance of `fleet` on the server, with what it reports (a fleet the server does not
/// have yet has none).
fn live_instances(
    api: &crate::client::Api,
    fleet: &str,
) -> Result<Vec<crate::plan::LiveInstance>, crate::client::ClientError> {
    use crate::rollout::Outcome;
    let mut instances = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/fleets/{fleet}/instances?attributes=true&limit=10000");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let page = match api.get(&path) {
            Ok(page) => page,
            Err(crate::client::ClientError::Refused { status: 404, .. }) => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        for row in page["instances"].as_array().into_iter().flatten() {
            let Some(uid) = row["instance_uid"].as_str().and_then(crate::opamp::codec::InstanceUid::parse) else {
                continue;
            };
            let status = row["status"].as_str().unwrap_or_default();
            let attributes = row["attributes"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
                .collect();
            instances.push(crate::plan::LiveInstance {
                uid: uid.0,
                live: status != "stale",
                outcome: match status {
                    "in_sync" | "observed" => Outcome::Settled,
                    "failed" => Outcome::Failed,
                    _ => Outcome::Busy,
                },
                host: row["host"].as_str().map(str::to_owned),
                attributes,
            });
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(instances),
        }
    }
}

/// What the server last recorded serving each fleet, from its status branch when this clone
/// has it (`refs/heads/<branch>` or `refs/remotes/origin/<branch>`): the memory of published
/// versions that Git alone no longer shows (deleted and moved tags).
fn served_by_server(repo: &gix::Repository, branch: &str) -> BTreeMap<String, FleetStatus> {
    let candidates = [format!("refs/remotes/origin/{branch}"), format!("refs/heads/{branch}")];
    let Some(tree) = candidates.iter().find_map(|name| {
        let id = repo.rev_parse_single(name.as_str()).ok()?;
        id.object().ok()?.peel_to_commit().ok()?.tree().ok()
    }) else {
        return BTreeMap::new();
    };
    let Some(fleets) = tree.find_entry("fleets").and_then(|entry| entry.object().ok()?.peel_to_tree().ok()) else {
        return BTreeMap::new();
    };
    let mut served = BTreeMap::new();
    for entry in fleets.iter().flatten() {
        if !entry.filename().ends_with(b".json") {
            continue;
        }
        let Ok(blob) = entry.object() else { continue };
        if let Some(summary) = std::str::from_utf8(&blob.data).ok().and_then(crate::status::summary_of_fleet_file) {
            served.insert(summary.fleet.clone(), summary);
        }
    }
    served
}

/// Makes the plan say what the server does where Git alone cannot tell: a fleet on
/// `latest` keeps a version whose tag was deleted, and a moved tag's first content is what
/// is served. The problems are the server's.
fn as_the_server_serves(plan: &mut Plan, head: &desired::DesiredState, served: &BTreeMap<String, FleetStatus>) {
    let mut deleted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut moved: BTreeMap<String, String> = BTreeMap::new();
    for line in &mut plan.fleets {
        let Some(status) = served.get(&line.name) else { continue };
        let (Some(tag), Some(hash)) = (&status.tag, &status.config_hash) else { continue };
        match head.version(tag) {
            None => {
                // Only `latest` is kept back, and only below the version the server runs: a
                // pin is the commit that moves it, a higher version moves it forward.
                let Some((_, version)) = tag.split_once('/') else { continue };
                let higher_published = line
                    .tag
                    .as_deref()
                    .and_then(|t| t.split_once('/'))
                    .is_some_and(|(_, now)| crate::repo::version::compare_versions(now, version).is_ge());
                if line.selector.as_deref() != Some("latest") || higher_published {
                    continue;
                }
                line.tag = Some(tag.clone());
                line.config_hash = Some(hash.clone());
                line.tag_deleted = true;
                deleted.entry(tag.clone()).or_default().push(line.name.clone());
            }
            Some(version) if line.tag.as_deref() == Some(tag.as_str()) && hex::encode(version.config_hash) != *hash => {
                line.config_hash = Some(hash.clone());
                moved.insert(tag.clone(), hash.clone());
            }
            Some(_) => {}
        }
    }
    let mut problems = Vec::new();
    for (tag, fleets) in &deleted {
        let config = tag.split_once('/').map(|(config, _)| config).unwrap_or_default();
        let latest = head.configs.get(config).and_then(|c| c.latest()).map(|v| v.tag.as_str());
        let keeping: Vec<&str> = fleets.iter().map(String::as_str).collect();
        problems.push(desired::deleted_tag_problem(tag, &keeping, latest));
    }
    for (tag, hash) in &moved {
        problems.push(Problem::error(
            format!("refs/tags/{tag}"),
            None,
            format!(
                "tag `{tag}` was moved to different content; published versions are immutable, so the server keeps serving what it first saw (config hash {}): publish a new version instead",
                &hash[..12.min(hash.len())]
            ),
        ));
    }
    // Not new: they come from the repository's history, not from this change.
    for problem in problems {
        plan.errors += 1;
        plan.problems.push(problem);
    }
    plan.problems
        .sort_by(|a, b| (&a.file, a.line, a.severity, &a.message).cmp(&(&b.file, b.line, b.severity, &b.message)));
}

pub fn render(plan: &Plan, format: Format) -> String {
    match format {
        Format::Text => text(plan),
        Format::Markdown => markdown(plan),
        Format::Json => serde_json::to_string_pretty(plan).expect("a plan serializes to JSON") + "\n",
    }
}

fn summary(plan: &Plan) -> String {
    let count = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    format!("{}, {}", count(plan.errors, "error"), count(plan.warnings, "warning"))
}

fn text(plan: &Plan) -> String {
    let mut out = String::new();
    match &plan.base_commit {
        Some(base) => writeln!(out, "gitfleet check: commit {} against {}", short(&plan.commit), short(base)),
        None => writeln!(out, "gitfleet check: commit {}", short(&plan.commit)),
    }
    .expect("writing to a String");
    out.push_str("\nFleets:\n");
    if plan.fleets.is_empty() {
        out.push_str("  (none)\n");
    }
    for fleet in &plan.fleets {
        let runs = fleet.runs();
        let selector = fleet.selector.as_deref().filter(|s| *s == "latest").map(|_| " [latest]").unwrap_or_default();
        let _ = writeln!(out, "  {:<24} {runs}{selector}", fleet.name);
    }
    if plan.base_commit.is_some() {
        out.push_str("\nChanges:\n");
        let mut any = false;
        for name in &plan.added {
            any = true;
            let _ = writeln!(out, "  + fleet {name} added");
        }
        for name in &plan.removed {
            any = true;
            let _ = writeln!(out, "  - fleet {name} removed: {REMOVAL_EFFECT}");
        }
        for line in plan.fleets.iter().filter(|f| plan.broken.contains(&f.name)) {
            any = true;
            let _ = writeln!(out, "  ! fleet {} {}", line.name, line.runs());
        }
        for rollout in &plan.rollouts {
            any = true;
            let _ = writeln!(
                out,
                "  ~ fleet {}: {} → {}",
                rollout.fleet,
                rollout.from.as_deref().unwrap_or("nothing"),
                rollout.to.as_deref().unwrap_or("nothing")
            );
            let _ = writeln!(out, "      {}", rollout.how);
            for (index, step) in rollout.steps.iter().enumerate() {
                let _ = writeln!(out, "        {}", step.describe(index));
            }
            for line in rollout.diff.lines() {
                let _ = writeln!(out, "      {line}");
            }
        }
        for change in &plan.settings_changed {
            any = true;
            for line in &change.changes {
                let _ = writeln!(out, "  ~ fleet {}: {line}", change.fleet);
            }
        }
        if !any {
            out.push_str("  (no fleet changes)\n");
        }
    }
    out.push_str("\nProblems:\n");
    if plan.problems.is_empty() {
        out.push_str("  (none)\n");
    }
    let new: std::collections::BTreeSet<&Problem> = plan.new_problems.iter().collect();
    for problem in &plan.problems {
        let marker = if plan.base_commit.is_some() && new.contains(problem) { " (new)" } else { "" };
        let _ = writeln!(out, "  {problem}{marker}");
    }
    if !plan.fixed_problems.is_empty() {
        out.push_str("\nFixed:\n");
        for problem in &plan.fixed_problems {
            let _ = writeln!(out, "  {problem}");
        }
    }
    let _ = writeln!(out, "\n{}", summary(plan));
    out
}

fn markdown(plan: &Plan) -> String {
    let mut out = String::new();
    let verdict = if plan.errors > 0 { "❌" } else { "✅" };
    let _ = writeln!(out, "### {verdict} gitfleet check: {}\n", summary(plan));
    match &plan.base_commit {
        Some(base) => {
            let _ = writeln!(out, "Commit `{}` compared with `{}`.\n", short(&plan.commit), short(base));
        }
        None => {
            let _ = writeln!(out, "Commit `{}`.\n", short(&plan.commit));
        }
    }
    if plan.base_commit.is_some() {
        let changes = plan.added.len()
            + plan.removed.len()
            + plan.broken.len()
            + plan.rollouts.len()
            + plan.settings_changed.len();
        if changes == 0 {
            out.push_str("No fleet changes.\n\n");
        } else {
            out.push_str("| Fleet | Change |\n|---|---|\n");
            for name in &plan.added {
                let _ = writeln!(out, "| `{name}` | added |");
            }
            for name in &plan.removed {
                let _ = writeln!(out, "| `{name}` | **removed**: {REMOVAL_EFFECT} |");
            }
            for line in plan.fleets.iter().filter(|f| plan.broken.contains(&f.name)) {
                let _ = writeln!(out, "| `{}` | {} |", line.name, markdown_runs(line));
            }
            for rollout in &plan.rollouts {
                let mut how = escape_cell(&rollout.how);
                for (index, step) in rollout.steps.iter().enumerate() {
                    how.push_str("<br>");
                    how.push_str(&escape_cell(&step.describe(index)));
                }
                let _ = writeln!(
                    out,
                    "| `{}` | {} → **{}**, {how} |",
                    rollout.fleet,
                    cell(rollout.from.as_deref()),
                    cell(rollout.to.as_deref())
                );
            }
            for change in &plan.settings_changed {
                let _ = writeln!(
                    out,
                    "| `{}` | {} |",
                    change.fleet,
                    change.changes.iter().map(|c| escape_cell(c)).collect::<Vec<_>>().join("<br>")
                );
            }
            out.push('\n');
            for rollout in plan.rollouts.iter().filter(|r| !r.diff.is_empty()) {
                let _ = writeln!(
                    out,
                    "<details><summary>Config diff for <code>{}</code></summary>\n\n```diff\n{}```\n</details>\n",
                    rollout.fleet,
                    rollout.diff.replace("```", "` ` `")
                );
            }
        }
    }
    out.push_str("| Fleet | Runs |\n|---|---|\n");
    for fleet in &plan.fleets {
        let _ = writeln!(out, "| `{}` | {} |", fleet.name, markdown_runs(fleet));
    }
    out.push('\n');
    if !plan.problems.is_empty() {
        out.push_str("#### Problems\n\n");
        let new: std::collections::BTreeSet<&Problem> = plan.new_problems.iter().collect();
        for problem in &plan.problems {
            let icon = if problem.severity == Severity::Error { "❌" } else { "⚠️" };
            let location = problem.location();
            let marker = if plan.base_commit.is_some() && new.contains(problem) { " **(new)**" } else { "" };
            let at = if location.is_empty() { String::new() } else { format!("`{location}` ") };
            let _ = writeln!(out, "- {icon} {at}{}{marker}", problem.message);
        }
        out.push('\n');
    }
    if !plan.fixed_problems.is_empty() {
        out.push_str("#### Fixed\n\n");
        for problem in &plan.fixed_problems {
            let _ = writeln!(out, "- ✔️ `{}` {}", problem.location(), problem.message);
        }
        out.push('\n');
    }
    out
}

/// `FleetLine::runs` in Markdown.
fn markdown_runs(fleet: &FleetLine) -> String {
    match (&fleet.tag, fleet.broken, fleet.observe_only) {
        (Some(tag), _, _) if fleet.tag_deleted => format!("keeps `{tag}` on the server (its tag was **deleted**)"),
        (Some(tag), true, _) => format!("**broken**: keeps `{tag}` on the server"),
        (None, true, _) => "**broken**: the server keeps its last good state".to_owned(),
        (_, false, true) => "observe-only".to_owned(),
        (tag, false, false) => cell(tag.as_deref()),
    }
}

fn cell(value: Option<&str>) -> String {
    value.map(|v| format!("`{v}`")).unwrap_or_else(|| "nothing".to_owned())
}

fn escape_cell(text: &str) -> String {
    text.replace('|', "\\|")
}
