//! Snapshot → desired state: the pure heart of gitfleet.
//!
//! `compile` reads a `RepoSnapshot` and returns the published versions of every
//! configuration, every fleet with the version it is assigned, and every problem found.
//! It never fails: a broken file becomes a problem, and a fleet that cannot be resolved
//! keeps its last good state (`LastGoodFleet`), so collectors keep receiving what they had.
//!
//! Published versions are immutable: the first content seen for a tag (`SeenVersion`,
//! remembered by the store) wins over whatever the tag points at later.

pub mod published;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::problem::{Problem, Severity};
use crate::repo::hash::single_file_hash;
use crate::repo::manifest::{FleetSpec, VersionSelector, parse_fleet};
use crate::repo::version::compare_versions;
use crate::repo::{
    CONFIG_EXTENSIONS, FileContent, MAX_CONFIG_BYTES, MAX_FLEET_FILE_BYTES, RepoFile, RepoSnapshot, TagSnapshot,
    content_type_for_path, lint, names,
};

/// One published version of a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub config: String,
    pub version: String,
    /// `<config>/<version>`.
    pub tag: String,
    pub commit: String,
    /// Tag time (tagger time, or committer time for lightweight tags), Unix seconds.
    pub time: i64,
    pub note: Option<String>,
    /// Path of the file at the tagged commit, e.g. `configs/gateway.yaml`.
    pub file: String,
    pub content_type: String,
    pub body: Arc<[u8]>,
    pub config_hash: [u8; 32],
    /// Git blob id of `body` as first seen.
    pub blob_id: String,
    /// The commit the tag points at now, when it was moved away from `commit` after it was
    /// first seen. Everything else above is what was first seen, and is what is served.
    pub moved_to: Option<String>,
}

/// What the store remembers of a version the first time it is seen.
pub type SeenVersion = Version;

/// A configuration: its file at the branch tip (if any) and its published versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Configuration {
    pub name: String,
    pub head_file: Option<String>,
    /// Ascending in version order; the last one is `latest`.
    pub versions: Vec<Arc<Version>>,
    /// Versions published earlier whose tags are gone, ascending. They are not selectable,
    /// but a fleet on `latest` that runs one keeps it (a fleet never moves backwards
    /// without a commit saying so).
    pub deleted: Vec<Arc<Version>>,
}

impl Configuration {
    fn new(name: &str) -> Self {
        Self { name: name.to_owned(), head_file: None, versions: Vec::new(), deleted: Vec::new() }
    }

    pub fn find(&self, version: &str) -> Option<&Arc<Version>> {
        self.versions.iter().find(|v| v.version == version)
    }

    pub fn latest(&self) -> Option<&Arc<Version>> {
        self.versions.last()
    }

    pub fn find_deleted(&self, version: &str) -> Option<&Arc<Version>> {
        self.deleted.iter().find(|v| v.version == version)
    }

    /// What `latest` means for a fleet that runs `running` now: the highest published
    /// version, unless `running` is a deleted version above it.
    fn latest_for(&self, running: Option<&str>) -> Option<&Arc<Version>> {
        let kept = running
            .and_then(|tag| tag.strip_prefix(self.name.as_str())?.strip_prefix('/'))
            .and_then(|version| self.find_deleted(version));
        match (self.latest(), kept) {
            (Some(latest), Some(kept)) if compare_versions(&kept.version, &latest.version).is_le() => Some(latest),
            (_, Some(kept)) => Some(kept),
            (latest, None) => latest,
        }
    }
}

/// A fleet with its resolved assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fleet {
    pub spec: FleetSpec,
    /// The version its instances should run; `None` for observe-only fleets and fleets
    /// that have never had a good assignment.
    pub assignment: Option<Arc<Version>>,
    /// True when the spec or the assignment was kept from an earlier commit because the
    /// current one is broken.
    pub kept_last_good: bool,
}

impl Fleet {
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// What a fleet last resolved to without errors; persisted so that a restart keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LastGoodFleet {
    /// The fleet file's text when it last parsed cleanly.
    pub source: String,
    /// The tag it was assigned (`None` for observe-only).
    pub tag: Option<String>,
    /// The commit that set this assignment: the branch commit that changed the fleet file,
    /// or the tagged commit when a new tag moved a `config/*` selector. Forges show the
    /// rollout's status on it.
    pub assigned_by: Option<String>,
}

/// The desired state of every fleet at one commit.
#[derive(Clone, Debug, Default)]
pub struct DesiredState {
    pub commit: String,
    pub branch: String,
    pub commit_time: i64,
    pub configs: BTreeMap<String, Configuration>,
    pub fleets: BTreeMap<String, Fleet>,
    /// Sorted by file, then line.
    pub problems: Vec<Problem>,
    /// The last good state of every fleet that exists at this commit: what it resolved to
    /// now if it resolved cleanly, what was remembered otherwise.
    pub last_good: BTreeMap<String, LastGoodFleet>,
    /// Fleets whose files exist but cannot be read, with no last good state known here: not
    /// in `fleets`, yet not removed (a server that knows their last good state keeps it).
    pub unresolved: BTreeSet<String>,
    cache: Cache,
}

impl DesiredState {
    pub fn error_count(&self) -> usize {
        self.problems.iter().filter(|p| p.is_error()).count()
    }

    pub fn version(&self, tag: &str) -> Option<&Arc<Version>> {
        let (config, version) = tag.split_once('/')?;
        self.configs.get(config)?.find(version)
    }
}

/// Work from an earlier compile that can be reused when the same inputs come back.
#[derive(Clone, Debug, Default)]
struct Cache {
    /// What each tag published, by tag name; reused while the reader hands back the same
    /// `Arc<TagSnapshot>` (the tag did not move).
    tags: HashMap<String, TagOutcome>,
    /// Lint results by `path\0blob_id`.
    lint: HashMap<String, Arc<Vec<Problem>>>,
    /// Parsed fleet files by `path\0blob_id`.
    fleets: HashMap<String, (Option<FleetSpec>, Vec<Problem>)>,
}

#[derive(Clone, Debug)]
struct TagOutcome {
    snapshot: Arc<TagSnapshot>,
    /// Whether `configs/<name>.*` existed at the head when this was computed (it decides
    /// whether a tag without its file is an error or an unrelated tag).
    config_exists: bool,
    version: Option<Arc<Version>>,
    problems: Vec<Problem>,
}

/// Everything `compile` reads besides the snapshot.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory<'a> {
    /// Versions first seen earlier, by tag (from the store).
    pub seen: Option<&'a BTreeMap<String, SeenVersion>>,
    /// Last good fleets (from the store, or the previous compile).
    pub last_good: Option<&'a BTreeMap<String, LastGoodFleet>>,
    /// The previous compile, for reuse only; it never changes the result.
    pub previous: Option<&'a DesiredState>,
}

/// The result of a compile: the desired state and the versions seen for the first time,
/// which the caller must remember before serving them.
#[derive(Debug)]
pub struct Compiled {
    pub desired: DesiredState,
    pub newly_seen: Vec<SeenVersion>,
}

pub fn compile(snapshot: &RepoSnapshot, memory: Memory<'_>) -> Compiled {
    let empty_seen = BTreeMap::new();
    let empty_last_good = BTreeMap::new();
    let seen = memory.seen.unwrap_or(&empty_seen);
    let last_good = memory.last_good.unwrap_or(&empty_last_good);
    let previous_cache = memory.previous.map(|p| &p.cache);

    let mut problems = Vec::new();
    let mut cache = Cache::default();

    let head_configs = head_configurations(snapshot, &mut problems);
    let (mut configs, newly_seen) =
        published_versions(snapshot, seen, &head_configs, previous_cache, &mut cache, &mut problems);
    for (name, path) in &head_configs {
        configs.entry(name.clone()).or_insert_with(|| Configuration::new(name)).head_file = Some(path.clone());
    }

    // Lint every configuration at the branch tip.
    let mut lint_errors_by_blob: HashMap<String, bool> = HashMap::new();
    for path in head_configs.values() {
        let file = &snapshot.files[path];
        if let FileContent::Blob(body) = &file.content {
            let found = lint_cached(path, &file.blob_id, body, previous_cache, &mut cache);
            lint_errors_by_blob.insert(file.blob_id.clone(), found.iter().any(Problem::is_error));
            problems.extend(found.iter().cloned());
        }
    }

    let mut fleets = BTreeMap::new();
    let mut good = BTreeMap::new();
    let mut unresolved = BTreeSet::new();
    for (path, file) in &snapshot.files {
        let Some(rest) = path.strip_prefix("fleets/") else {
            continue;
        };
        let Some(name) = fleet_name(path, rest, file, &mut problems) else {
            continue;
        };
        let text = match &file.content {
            FileContent::Blob(body) => match std::str::from_utf8(body) {
                Ok(text) => Some(text),
                Err(_) => {
                    problems.push(Problem::error(path, None, "fleet file is not valid UTF-8"));
                    None
                }
            },
            _ => None,
        };
        let parsed = text.map(|text| {
            let key = format!("{path}\0{}", file.blob_id);
            let entry = previous_cache
                .and_then(|c| c.fleets.get(&key))
                .cloned()
                .unwrap_or_else(|| parse_fleet(&name, path, text));
            cache.fleets.insert(key, entry.clone());
            entry
        });
        let (spec, fleet_problems) = parsed.unwrap_or((None, Vec::new()));
        problems.extend(fleet_problems);
        // The commit that gave the fleet file its content set what it says.
        let changed_by = snapshot.fleet_commits.get(path).unwrap_or(&snapshot.commit);
        let fleet = resolve_fleet(
            changed_by,
            &name,
            path,
            spec,
            text,
            &configs,
            seen,
            last_good,
            &lint_errors_by_blob,
            previous_cache,
            &mut cache,
            &mut problems,
        );
        match fleet {
            Some((fleet, clean)) => {
                if let Some(clean) = clean {
                    good.insert(name.clone(), clean);
                }
                fleets.insert(name, fleet);
            }
            None => {
                unresolved.insert(name);
            }
        }
    }

    deleted_tags(&configs, &fleets, &mut problems);
    problems.sort_by(|a, b| (&a.file, a.line, a.severity, &a.message).cmp(&(&b.file, b.line, b.severity, &b.message)));
    problems.dedup();
    Compiled {
        desired: DesiredState {
            commit: snapshot.commit.clone(),
            branch: snapshot.branch.clone(),
            commit_time: snapshot.commit_time,
            configs,
            fleets,
            problems,
            last_good: good,
            unresolved,
            cache,
        },
        newly_seen,
    }
}

/// Deleted tags above a configuration's highest published version: deleting them would
/// move fleets on `latest` backwards, which gitfleet does not do without a commit saying so.
/// An error while a fleet still runs one, a warning otherwise. Older deleted tags are
/// ordinary clean-up and only matter to a fleet that pins one (a problem of its own).
fn deleted_tags(
    configs: &BTreeMap<String, Configuration>,
    fleets: &BTreeMap<String, Fleet>,
    problems: &mut Vec<Problem>,
) {
    for configuration in configs.values() {
        let latest = configuration.latest();
        let above_latest = configuration
            .deleted
            .iter()
            .filter(|v| latest.is_none_or(|latest| compare_versions(&v.version, &latest.version).is_gt()));
        for version in above_latest {
            let keeping: Vec<&str> = fleets
                .values()
                .filter(|f| f.assignment.as_ref().is_some_and(|a| a.tag == version.tag))
                .map(Fleet::name)
                .collect();
            problems.push(deleted_tag_problem(&version.tag, &keeping, latest.map(|v| v.tag.as_str())));
        }
    }
}

/// The problem on a published tag that was deleted, with the fleets that keep running it
/// (shared with `check`, which learns them from the status branch).
pub fn deleted_tag_problem(tag: &str, keeping: &[&str], latest: Option<&str>) -> Problem {
    let location = format!("refs/tags/{tag}");
    if keeping.is_empty() {
        let now = latest.map(|tag| format!("`{tag}`")).unwrap_or_else(|| "nothing".to_owned());
        return Problem::warning(
            location,
            None,
            format!("tag `{tag}` was deleted after it was published; no fleet runs it, and `latest` is {now} now"),
        );
    }
    Problem::error(
        location,
        None,
        format!(
            "tag `{tag}` was deleted after it was published; {} keep{} running it, since a fleet never moves back without a commit: push the tag again, publish a higher version, or pin a version in the fleet file",
            keeping.iter().map(|name| format!("`{name}`")).collect::<Vec<_>>().join(", "),
            if keeping.len() == 1 { "s" } else { "" },
        ),
    )
}

/// `configs/<name>.<ext>` files at the branch tip, by configuration name.
fn head_configurations(snapshot: &RepoSnapshot, problems: &mut Vec<Problem>) -> BTreeMap<String, String> {
    let mut by_name: BTreeMap<String, String> = BTreeMap::new();
    for (path, file) in &snapshot.files {
        let Some(rest) = path.strip_prefix("configs/") else {
            continue;
        };
        if rest.contains('/') {
            problems.push(Problem::warning(path, None, "ignored: configurations live directly in configs/"));
            continue;
        }
        if is_documentation(rest) {
            continue;
        }
        let Some((stem, extension)) = rest.rsplit_once('.').filter(|(_, ext)| CONFIG_EXTENSIONS.contains(ext)) else {
            problems.push(Problem::warning(path, None, "ignored: configuration files end in .yaml, .yml or .json"));
            continue;
        };
        let _ = extension;
        if let Err(message) = names::check_name(stem) {
            problems.push(Problem::error(path, None, format!("configuration {message}")));
            continue;
        }
        if !check_content(path, file, MAX_CONFIG_BYTES, problems) {
            continue;
        }
        if let Some(other) = by_name.get(stem) {
            problems.push(Problem::error(
                path,
                None,
                format!("configuration `{stem}` is defined twice ({other} and {path}); keep one file"),
            ));
            continue;
        }
        by_name.insert(stem.to_owned(), path.clone());
    }
    by_name
}

fn is_documentation(file_name: &str) -> bool {
    file_name.starts_with('.') || file_name.to_ascii_lowercase().starts_with("readme") || file_name.ends_with(".md")
}

/// Reports files gitfleet will not read; true when the content can be used.
fn check_content(path: &str, file: &RepoFile, limit: u64, problems: &mut Vec<Problem>) -> bool {
    match &file.content {
        FileContent::Blob(_) => true,
        FileContent::TooLarge { size } => {
            problems.push(Problem::error(path, None, format!("file is {size} bytes; the limit is {limit} bytes")));
            false
        }
        FileContent::Symlink => {
            problems.push(Problem::error(path, None, "symbolic links are not followed; commit the file itself"));
            false
        }
        FileContent::NotAFile => {
            problems.push(Problem::error(path, None, "expected a file, found a directory or submodule"));
            false
        }
    }
}

/// The fleet name of `fleets/<rest>`, or `None` (with a problem where one is due).
fn fleet_name(path: &str, rest: &str, file: &RepoFile, problems: &mut Vec<Problem>) -> Option<String> {
    if rest.contains('/') {
        problems.push(Problem::warning(path, None, "ignored: fleet files live directly in fleets/"));
        return None;
    }
    if is_documentation(rest) {
        return None;
    }
    let Some(stem) = rest.strip_suffix(".toml") else {
        problems.push(Problem::warning(path, None, "ignored: fleet files end in .toml"));
        return None;
    };
    if let Err(message) = names::check_name(stem) {
        problems.push(Problem::error(path, None, format!("fleet {message}")));
        return None;
    }
    if !check_content(path, file, MAX_FLEET_FILE_BYTES, problems) {
        // The fleet still exists (it keeps its last good state); its file is unreadable.
        return Some(stem.to_owned());
    }
    Some(stem.to_owned())
}

fn published_versions(
    snapshot: &RepoSnapshot,
    seen: &BTreeMap<String, SeenVersion>,
    head_configs: &BTreeMap<String, String>,
    previous: Option<&Cache>,
    cache: &mut Cache,
    problems: &mut Vec<Problem>,
) -> (BTreeMap<String, Configuration>, Vec<SeenVersion>) {
    let mut configs: BTreeMap<String, Configuration> = BTreeMap::new();
    let mut newly_seen = Vec::new();
    for tag in &snapshot.tags {
        let config_exists = tag.name.split_once('/').is_some_and(|(config, _)| head_configs.contains_key(config));
        let reused = previous
            .and_then(|c| c.tags.get(&tag.name))
            .filter(|outcome| Arc::ptr_eq(&outcome.snapshot, tag) && outcome.config_exists == config_exists);
        let outcome = match reused {
            Some(outcome) => outcome.clone(),
            None => tag_outcome(tag, config_exists, seen),
        };
        problems.extend(outcome.problems.iter().cloned());
        if let Some(version) = &outcome.version {
            if !seen.contains_key(&tag.name) {
                newly_seen.push(Version::clone(version));
            }
            configs
                .entry(version.config.clone())
                .or_insert_with(|| Configuration::new(&version.config))
                .versions
                .push(Arc::clone(version));
        }
        cache.tags.insert(tag.name.clone(), outcome);
    }
    let present: HashSet<&str> = snapshot.tags.iter().map(|tag| tag.name.as_str()).collect();
    for (tag, version) in seen {
        if !present.contains(tag.as_str()) {
            configs
                .entry(version.config.clone())
                .or_insert_with(|| Configuration::new(&version.config))
                .deleted
                .push(Arc::new(Version { moved_to: None, ..version.clone() }));
        }
    }
    for configuration in configs.values_mut() {
        configuration.versions.sort_by(|a, b| compare_versions(&a.version, &b.version));
        configuration.deleted.sort_by(|a, b| compare_versions(&a.version, &b.version));
    }
    (configs, newly_seen)
}

/// What one tag publishes (if anything) and the problems it has.
fn tag_outcome(tag: &Arc<TagSnapshot>, config_exists: bool, seen: &BTreeMap<String, SeenVersion>) -> TagOutcome {
    let mut outcome = TagOutcome { snapshot: Arc::clone(tag), config_exists, version: None, problems: Vec::new() };
    let location = format!("refs/tags/{}", tag.name);
    let Some((config, version)) = tag.name.split_once('/') else {
        let message = format!("tag `{}` is not <configuration>/<version>; ignored", tag.name);
        outcome.problems.push(Problem::warning(location, None, message));
        return outcome;
    };
    if let Err(message) = names::check_name(config).and_then(|()| names::check_version(version)) {
        outcome.problems.push(Problem::warning(location, None, format!("tag `{}` ignored: {message}", tag.name)));
        return outcome;
    }
    let Some(version) = read_tag(tag, config, version, config_exists, &location, &mut outcome.problems) else {
        return outcome;
    };
    let version = match seen.get(&tag.name) {
        Some(first) if first.config_hash != version.config_hash => {
            outcome.problems.push(Problem::error(
                location,
                None,
                format!(
                    "tag `{}` was moved to different content (first seen at commit {}, now {}); published versions are immutable, so the first content is kept: publish a new version instead",
                    tag.name,
                    short(&first.commit),
                    short(&version.commit)
                ),
            ));
            Version { moved_to: Some(version.commit), ..first.clone() }
        }
        Some(first) => {
            let moved_to = (first.commit != version.commit).then_some(version.commit);
            Version { moved_to, ..first.clone() }
        }
        None => version,
    };
    outcome.version = Some(Arc::new(version));
    outcome
}

/// The version a tag publishes, or `None` with a problem.
fn read_tag(
    tag: &TagSnapshot,
    config: &str,
    version: &str,
    config_exists: bool,
    location: &str,
    problems: &mut Vec<Problem>,
) -> Option<Version> {
    let Some(commit) = &tag.commit else {
        problems.push(Problem::error(location, None, format!("tag `{}` does not point at a commit", tag.name)));
        return None;
    };
    let mut candidates = tag.files.iter();
    let Some((path, file)) = candidates.next() else {
        let message = format!(
            "tag `{}` points at commit {}, which has no configs/{config}.yaml, .yml or .json",
            tag.name,
            short(commit)
        );
        problems.push(if config_exists {
            Problem::error(location, None, message)
        } else {
            Problem::warning(location, None, format!("{message}; ignored"))
        });
        return None;
    };
    if let Some((other, _)) = candidates.next() {
        problems.push(Problem::error(
            location,
            None,
            format!("tag `{}` is ambiguous: commit {} has both {path} and {other}", tag.name, short(commit)),
        ));
        return None;
    }
    let body = match &file.content {
        FileContent::Blob(body) => Arc::clone(body),
        FileContent::TooLarge { size } => {
            problems.push(Problem::error(
                location,
                None,
                format!("tag `{}`: {path} is {size} bytes; the limit is {MAX_CONFIG_BYTES} bytes", tag.name),
            ));
            return None;
        }
        FileContent::Symlink => {
            problems.push(Problem::error(
                location,
                None,
                format!("tag `{}`: {path} is a symbolic link, which is not followed", tag.name),
            ));
            return None;
        }
        FileContent::NotAFile => {
            problems.push(Problem::error(location, None, format!("tag `{}`: {path} is not a file", tag.name)));
            return None;
        }
    };
    let content_type = content_type_for_path(path).expect("candidates have a config extension");
    Some(Version {
        config: config.to_owned(),
        version: version.to_owned(),
        tag: tag.name.clone(),
        commit: commit.clone(),
        time: tag.time,
        note: tag.note.clone(),
        file: path.clone(),
        content_type: content_type.to_owned(),
        config_hash: single_file_hash(content_type, &body),
        body,
        blob_id: file.blob_id.clone(),
        moved_to: None,
    })
}

fn lint_cached(
    path: &str,
    blob_id: &str,
    body: &[u8],
    previous: Option<&Cache>,
    cache: &mut Cache,
) -> Arc<Vec<Problem>> {
    let key = format!("{path}\0{blob_id}");
    let found = previous.and_then(|c| c.lint.get(&key)).cloned().unwrap_or_else(|| Arc::new(lint::lint(path, body)));
    cache.lint.insert(key, Arc::clone(&found));
    found
}

/// Resolves one fleet. Returns the fleet (if it exists at all) and what to remember as its
/// last good state: the current file when it resolved cleanly, the remembered one otherwise.
/// `file_commit` is the commit that gave the fleet file its content.
#[allow(clippy::too_many_arguments)]
fn resolve_fleet(
    file_commit: &str,
    name: &str,
    path: &str,
    spec: Option<FleetSpec>,
    text: Option<&str>,
    configs: &BTreeMap<String, Configuration>,
    seen: &BTreeMap<String, SeenVersion>,
    last_good: &BTreeMap<String, LastGoodFleet>,
    lint_errors_by_blob: &HashMap<String, bool>,
    previous: Option<&Cache>,
    cache: &mut Cache,
    problems: &mut Vec<Problem>,
) -> Option<(Fleet, Option<LastGoodFleet>)> {
    let remembered = last_good.get(name);
    let (spec, mut kept) = match spec {
        Some(spec) => (spec, false),
        None => {
            let remembered = remembered?;
            let (Some(spec), _) = parse_fleet(name, path, &remembered.source) else {
                return None;
            };
            problems.push(Problem::warning(
                path,
                None,
                format!("fleet `{name}` keeps its last good settings until this file is fixed"),
            ));
            (spec, true)
        }
    };
    let location_line = spec.version_line;
    let resolved: Result<Option<Arc<Version>>, String> = match (&spec.version, &spec.config) {
        (None, _) => Ok(None),
        (Some(_), None) => Err("no configuration named".to_owned()),
        (Some(selector), Some(config)) => match configs.get(config) {
            None => Err(format!(
                "configuration `{config}` does not exist (no configs/{config}.yaml and no {config}/* tags)"
            )),
            Some(configuration) => match selector {
                VersionSelector::Latest => {
                    let running = remembered.and_then(|r| r.tag.as_deref());
                    configuration.latest_for(running).cloned().map(Some).ok_or_else(|| {
                        format!(
                            "configuration `{config}` has no published versions yet; publish one with `git tag {config}/v1 && git push --tags`"
                        )
                    })
                }
                VersionSelector::Exact(_) if configuration.versions.is_empty() => Err(format!(
                    "configuration `{config}` has no published versions yet; publish one with `git tag {config}/v1 && git push --tags`"
                )),
                VersionSelector::Exact(version) => configuration.find(version).cloned().map(Some).ok_or_else(|| {
                    let published: Vec<&str> =
                        configuration.versions.iter().rev().take(5).map(|v| v.version.as_str()).collect();
                    format!("`{config}/{version}` is not published (latest published: {})", published.join(", "))
                }),
            },
        },
    };
    let resolved = resolved.and_then(|assignment| match &assignment {
        Some(version) if version_has_errors(version, lint_errors_by_blob, previous, cache, problems) => Err(format!(
            "`{}` has configuration errors (see {}:{}) and is not rolled out",
            version.tag, version.tag, version.file
        )),
        _ => Ok(assignment),
    });
    let assignment = match resolved {
        Ok(assignment) => assignment,
        Err(reason) => {
            let fallback = remembered
                .and_then(|r| r.tag.as_deref())
                .and_then(|tag| find_version(tag, configs, seen))
                .filter(|v| Some(&v.config) == spec.config.as_ref());
            let message = match &fallback {
                Some(version) => format!("fleet `{name}`: {reason}; it keeps running `{}`", version.tag),
                None => format!("fleet `{name}`: {reason}; it has no version to roll out"),
            };
            problems.push(Problem {
                file: Some(path.to_owned()),
                line: location_line,
                severity: Severity::Error,
                message,
            });
            kept = kept || fallback.is_some();
            return Some((Fleet { spec, assignment: fallback, kept_last_good: kept }, remembered.cloned()));
        }
    };
    let clean = if kept {
        remembered.cloned()
    } else {
        let source = text.unwrap_or_default().to_owned();
        let tag = assignment.as_ref().map(|v| v.tag.clone());
        // A commit that raises the rollout's `release` is an approval: the fleet's commit
        // status moves to it, and follows the rest of the rollout there.
        let released = remembered.is_some_and(|before| {
            before.source != source
                && parse_fleet(name, path, &before.source).0.is_some_and(|b| b.rollout.release < spec.rollout.release)
        });
        let assigned_by = match (remembered, &assignment) {
            (_, None) => None,
            (Some(before), Some(_)) if released && before.tag == tag => Some(file_commit.to_owned()),
            (Some(before), Some(_)) if before.tag == tag && before.assigned_by.is_some() => before.assigned_by.clone(),
            (Some(before), Some(version)) if before.source == source => Some(version.commit.clone()),
            (_, Some(_)) => Some(file_commit.to_owned()),
        };
        Some(LastGoodFleet { source, tag, assigned_by })
    };
    Some((Fleet { spec, assignment, kept_last_good: kept }, clean))
}

/// Lints a version about to be assigned (once per blob) and reports its problems under
/// `<tag>:<path>`; true when it has errors.
fn version_has_errors(
    version: &Version,
    at_head: &HashMap<String, bool>,
    previous: Option<&Cache>,
    cache: &mut Cache,
    problems: &mut Vec<Problem>,
) -> bool {
    if let Some(has_errors) = at_head.get(&version.blob_id) {
        return *has_errors;
    }
    let location = format!("{}:{}", version.tag, version.file);
    let found = lint_cached(&location, &version.blob_id, &version.body, previous, cache);
    problems.extend(found.iter().cloned());
    found.iter().any(Problem::is_error)
}

/// A version by tag: published now, or remembered from before (for last good fleets whose
/// tag was deleted).
fn find_version(
    tag: &str,
    configs: &BTreeMap<String, Configuration>,
    seen: &BTreeMap<String, SeenVersion>,
) -> Option<Arc<Version>> {
    let (config, version) = tag.split_once('/')?;
    configs.get(config).and_then(|c| c.find(version).cloned()).or_else(|| seen.get(tag).map(|v| Arc::new(v.clone())))
}

pub fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::TagSnapshot;

    const GATEWAY_V1: &str = "receivers:\n  otlp: {}\nexporters:\n  debug: {}\nservice:\n  pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [debug]\n";
    const GATEWAY_V2: &str = "receivers:\n  otlp: {}\nexporters:\n  debug: {}\n  otlphttp: {}\nservice:\n  pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [debug, otlphttp]\n";

    fn blob(text: &str) -> RepoFile {
        let id = hex::encode(&single_file_hash("blob", text.as_bytes())[..20]);
        RepoFile { blob_id: id, content: FileContent::Blob(Arc::from(text.as_bytes())) }
    }

    fn tag(name: &str, commit: &str, config_text: &str) -> TagSnapshot {
        let config = name.split_once('/').map(|(c, _)| c).unwrap_or(name);
        TagSnapshot {
            name: name.to_owned(),
            commit: Some(commit.to_owned()),
            time: 1_700_000_000,
            note: None,
            files: BTreeMap::from([(format!("configs/{config}.yaml"), blob(config_text))]),
        }
    }

    fn snapshot(files: &[(&str, &str)], tags: Vec<TagSnapshot>) -> RepoSnapshot {
        let tags = tags.into_iter().map(Arc::new).collect();
        RepoSnapshot {
            commit: "head".to_owned(),
            branch: "main".to_owned(),
            commit_time: 0,
            files: files.iter().map(|(path, text)| ((*path).to_owned(), blob(text))).collect(),
            tags,
            fleet_commits: BTreeMap::new(),
        }
    }

    fn messages(desired: &DesiredState) -> Vec<String> {
        desired.problems.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn pinned_latest_and_observe_only_fleets() {
        let snap = snapshot(
            &[
                ("configs/gateway.yaml", GATEWAY_V2),
                ("fleets/prod.toml", "config = \"gateway\"\nversion = \"v1\"\n"),
                ("fleets/staging.toml", "config = \"gateway\"\nversion = \"latest\"\n"),
                ("fleets/edge.toml", "description = \"watch only\"\n"),
            ],
            vec![
                tag("gateway/v1", "c1", GATEWAY_V1),
                tag("gateway/v10", "c3", GATEWAY_V2),
                tag("gateway/v2", "c2", GATEWAY_V2),
            ],
        );
        let compiled = compile(&snap, Memory::default());
        let desired = &compiled.desired;
        assert_eq!(messages(desired), Vec::<String>::new());
        let tag_of = |fleet: &str| desired.fleets[fleet].assignment.as_ref().map(|v| v.tag.clone());
        assert_eq!(tag_of("prod").as_deref(), Some("gateway/v1"));
        assert_eq!(tag_of("staging").as_deref(), Some("gateway/v10"));
        assert_eq!(tag_of("edge"), None);
        let versions: Vec<&str> = desired.configs["gateway"].versions.iter().map(|v| v.version.as_str()).collect();
        assert_eq!(versions, vec!["v1", "v2", "v10"]);
        assert_eq!(compiled.newly_seen.len(), 3);
        assert_eq!(desired.last_good.keys().collect::<Vec<_>>(), vec!["edge", "prod", "staging"]);
    }

    #[test]
    fn a_broken_fleet_file_keeps_the_last_good_state() {
        let tags = vec![tag("gateway/v1", "c1", GATEWAY_V1), tag("gateway/v2", "c2", GATEWAY_V2)];
        let good = compile(
            &snapshot(
                &[
                    ("configs/gateway.yaml", GATEWAY_V2),
                    ("fleets/prod.toml", "config = \"gateway\"\nversion = \"v1\"\n"),
                ],
                tags.clone(),
            ),
            Memory::default(),
        )
        .desired;
        let broken = snapshot(
            &[
                ("configs/gateway.yaml", GATEWAY_V2),
                ("fleets/prod.toml", "config = \"gateway\"\nversion = \"v2\"\nverison = 3\n"),
            ],
            tags.clone(),
        );
        let desired =
            compile(&broken, Memory { last_good: Some(&good.last_good), previous: Some(&good), ..Default::default() })
                .desired;
        assert_eq!(
            messages(&desired),
            vec![
                "fleets/prod.toml: warning: fleet `prod` keeps its last good settings until this file is fixed",
                "fleets/prod.toml:3: error: unknown key `verison` (allowed: description, config, version, token, install, health, rollout)",
            ]
        );
        let prod = &desired.fleets["prod"];
        assert_eq!(prod.assignment.as_ref().map(|v| v.tag.as_str()), Some("gateway/v1"));
        assert!(prod.kept_last_good);
        assert_eq!(desired.last_good, good.last_good);

        // Without anything remembered, a broken fleet has no state to keep, yet it exists.
        let cold = compile(&broken, Memory::default()).desired;
        assert!(!cold.fleets.contains_key("prod"));
        assert!(cold.unresolved.contains("prod"));
    }

    #[test]
    fn the_commit_that_set_an_assignment_is_remembered() {
        let at = |commit: &str, files: &[(&str, &str)], tags: Vec<TagSnapshot>, before: Option<&DesiredState>| {
            let mut snap = snapshot(files, tags);
            snap.commit = commit.to_owned();
            let memory = Memory { last_good: before.map(|b| &b.last_good), ..Default::default() };
            compile(&snap, memory).desired
        };
        let assigned_by = |desired: &DesiredState, fleet: &str| desired.last_good[fleet].assigned_by.clone();
        let latest = ("fleets/prod.toml", "config = \"gateway\"\nversion = \"latest\"\n");
        let watch = ("fleets/edge.toml", "description = \"watch only\"\n");
        let v1 = || tag("gateway/v1", "c1", GATEWAY_V1);
        let v2 = || tag("gateway/v2", "c2", GATEWAY_V2);

        // A fleet seen for the first time: the branch commit it appeared in.
        let first = at("main1", &[latest, watch], vec![v1()], None);
        assert_eq!(assigned_by(&first, "prod").as_deref(), Some("main1"));
        assert_eq!(assigned_by(&first, "edge"), None, "observe-only fleets have no assignment");
        // Unrelated branch commits keep it.
        let unrelated = at("main2", &[latest, watch, ("README.md", "hi")], vec![v1()], Some(&first));
        assert_eq!(assigned_by(&unrelated, "prod").as_deref(), Some("main1"));
        // A new tag moves the `latest` selector: the tagged commit set it.
        let tagged = at("main2", &[latest, watch], vec![v1(), v2()], Some(&unrelated));
        assert_eq!(assigned_by(&tagged, "prod").as_deref(), Some("c2"));
        // Pinning back in the fleet file: the branch commit that changed the file.
        let pinned = ("fleets/prod.toml", "config = \"gateway\"\nversion = \"v1\"\n");
        let rolled_back = at("main3", &[pinned, watch], vec![v1(), v2()], Some(&tagged));
        assert_eq!(assigned_by(&rolled_back, "prod").as_deref(), Some("main3"));
    }

    #[test]
    fn a_missing_version_keeps_the_assignment_it_had() {
        let tags = vec![tag("gateway/v1", "c1", GATEWAY_V1)];
        let good = compile(
            &snapshot(&[("fleets/prod.toml", "config = \"gateway\"\nversion = \"v1\"\n")], tags.clone()),
            Memory::default(),
        )
        .desired;
        let desired = compile(
            &snapshot(&[("fleets/prod.toml", "config = \"gateway\"\nversion = \"v9\"\n")], tags),
            Memory { last_good: Some(&good.last_good), ..Default::default() },
        )
        .desired;
        assert_eq!(
            messages(&desired),
            vec![
                "fleets/prod.toml:2: error: fleet `prod`: `gateway/v9` is not published (latest published: v1); it keeps running `gateway/v1`"
            ]
        );
        assert_eq!(desired.fleets["prod"].assignment.as_ref().map(|v| v.tag.as_str()), Some("gateway/v1"));
    }

    #[test]
    fn a_follower_rebuilds_the_published_state_from_the_versions_in_the_store() {
        let first = compile(&snapshot(&[], vec![tag("gateway/v1", "c1", GATEWAY_V1)]), Memory::default());
        let seen: BTreeMap<String, SeenVersion> = first.newly_seen.into_iter().map(|v| (v.tag.clone(), v)).collect();
        // A moved tag, a broken fleet kept at its last good state, a pinned and a `latest` one.
        let snap = snapshot(
            &[
                ("configs/gateway.yaml", GATEWAY_V2),
                ("fleets/prod.toml", "config = \"gateway\"\nversion = \"v1\"\n[token]\nrotate = 2\n"),
                ("fleets/staging.toml", "config = \"gateway\"\nversion = \"latest\"\n"),
                ("fleets/edge.toml", "description = \"watch only\"\n"),
            ],
            vec![tag("gateway/v1", "c9", GATEWAY_V1), tag("gateway/v2", "c2", GATEWAY_V2)],
        );
        let leader = compile(&snap, Memory { seen: Some(&seen), ..Default::default() });
        let mut stored = seen.clone();
        stored.extend(leader.newly_seen.iter().map(|v| (v.tag.clone(), v.clone())));

        let published = published::Published::of(&leader.desired);
        let text = serde_json::to_string(&published).expect("serializes");
        assert!(!text.contains("exporters"), "versions go by tag, not content: {text}");
        let read: published::Published = serde_json::from_str(&text).expect("reads back");
        let follower = read.desired(&stored).expect("every version is in the store");
        assert_eq!(follower.fleets, leader.desired.fleets);
        assert_eq!(follower.configs, leader.desired.configs);
        assert_eq!(follower.problems, leader.desired.problems);
        assert_eq!(follower.last_good, leader.desired.last_good);
        assert_eq!(follower.version("gateway/v1").and_then(|v| v.moved_to.as_deref()), Some("c9"));
        assert_eq!(published::Published::of(&follower), published);

        // A version not in the store yet is refused, not served empty.
        assert_eq!(read.desired(&seen).map(|_| ()), Err(published::MissingVersion("gateway/v2".to_owned())));
    }

    #[test]
    fn a_moved_tag_keeps_its_first_content() {
        let first = compile(&snapshot(&[], vec![tag("gateway/v1", "c1", GATEWAY_V1)]), Memory::default());
        let seen: BTreeMap<String, SeenVersion> = first.newly_seen.into_iter().map(|v| (v.tag.clone(), v)).collect();
        let moved = compile(
            &snapshot(&[], vec![tag("gateway/v1", "c9", GATEWAY_V2)]),
            Memory { seen: Some(&seen), ..Default::default() },
        );
        assert_eq!(
            messages(&moved.desired),
            vec![
                "refs/tags/gateway/v1: error: tag `gateway/v1` was moved to different content (first seen at commit c1, now c9); published versions are immutable, so the first content is kept: publish a new version instead"
            ]
        );
        let version = moved.desired.version("gateway/v1").expect("still published");
        assert_eq!(&*version.body, GATEWAY_V1.as_bytes());
        assert_eq!(version.commit, "c1");
        assert_eq!(version.moved_to.as_deref(), Some("c9"));
        assert!(moved.newly_seen.is_empty());

        // Moved with a new note and date, to the same content: still what was first seen,
        // marked as moved, and no problem.
        let mut retagged = tag("gateway/v1", "c5", GATEWAY_V1);
        retagged.note = Some("moved".to_owned());
        retagged.time = 1_800_000_000;
        let again = compile(&snapshot(&[], vec![retagged]), Memory { seen: Some(&seen), ..Default::default() });
        assert_eq!(messages(&again.desired), Vec::<String>::new());
        let version = again.desired.version("gateway/v1").expect("still published");
        assert_eq!((version.commit.as_str(), version.time, version.note.as_deref()), ("c1", 1_700_000_000, None));
        assert_eq!(version.moved_to.as_deref(), Some("c5"));
        let unmoved = compile(
            &snapshot(&[], vec![tag("gateway/v1", "c1", GATEWAY_V1)]),
            Memory { seen: Some(&seen), ..Default::default() },
        );
        assert_eq!(unmoved.desired.version("gateway/v1").expect("published").moved_to, None);
    }

    #[test]
    fn a_deleted_tag_never_moves_a_fleet_backwards() {
        let files = [
            ("configs/gateway.yaml", GATEWAY_V2),
            ("fleets/staging.toml", "config = \"gateway\"\nversion = \"latest\"\n"),
        ];
        let published = compile(
            &snapshot(&files, vec![tag("gateway/v1", "c1", GATEWAY_V1), tag("gateway/v2", "c2", GATEWAY_V2)]),
            Memory::default(),
        );
        let seen: BTreeMap<String, SeenVersion> =
            published.newly_seen.into_iter().map(|v| (v.tag.clone(), v)).collect();
        let tag_of = |desired: &DesiredState| desired.fleets["staging"].assignment.as_ref().map(|v| v.tag.clone());
        assert_eq!(tag_of(&published.desired).as_deref(), Some("gateway/v2"));

        // `git push origin :refs/tags/gateway/v2`: staging keeps v2, and the tag is an error.
        fn memory<'a>(seen: &'a BTreeMap<String, SeenVersion>, before: &'a DesiredState) -> Memory<'a> {
            Memory { seen: Some(seen), last_good: Some(&before.last_good), previous: None }
        }
        let deleted =
            compile(&snapshot(&files, vec![tag("gateway/v1", "c1", GATEWAY_V1)]), memory(&seen, &published.desired));
        assert_eq!(tag_of(&deleted.desired).as_deref(), Some("gateway/v2"));
        assert_eq!(
            messages(&deleted.desired),
            vec![
                "refs/tags/gateway/v2: error: tag `gateway/v2` was deleted after it was published; `staging` keeps running it, since a fleet never moves back without a commit: push the tag again, publish a higher version, or pin a version in the fleet file"
            ]
        );
        let gateway = &deleted.desired.configs["gateway"];
        assert_eq!(gateway.latest().map(|v| v.tag.as_str()), Some("gateway/v1"));
        assert_eq!(gateway.deleted.iter().map(|v| v.tag.as_str()).collect::<Vec<_>>(), vec!["gateway/v2"]);
        // It stays so across restarts (the last good state remembers v2).
        let again =
            compile(&snapshot(&files, vec![tag("gateway/v1", "c1", GATEWAY_V1)]), memory(&seen, &deleted.desired));
        assert_eq!(tag_of(&again.desired).as_deref(), Some("gateway/v2"));

        // A fleet file that pins v1 is the commit that says so.
        let pinned = [files[0], ("fleets/staging.toml", "config = \"gateway\"\nversion = \"v1\"\n")];
        let rolled_back =
            compile(&snapshot(&pinned, vec![tag("gateway/v1", "c1", GATEWAY_V1)]), memory(&seen, &again.desired));
        assert_eq!(tag_of(&rolled_back.desired).as_deref(), Some("gateway/v1"));
        assert_eq!(
            messages(&rolled_back.desired),
            vec![
                "refs/tags/gateway/v2: warning: tag `gateway/v2` was deleted after it was published; no fleet runs it, and `latest` is `gateway/v1` now"
            ]
        );

        // A higher version moves it forward, and the deleted tag is history.
        let v3 = compile(
            &snapshot(&files, vec![tag("gateway/v1", "c1", GATEWAY_V1), tag("gateway/v3", "c3", GATEWAY_V2)]),
            memory(&seen, &again.desired),
        );
        assert_eq!(tag_of(&v3.desired).as_deref(), Some("gateway/v3"));
        assert_eq!(messages(&v3.desired), Vec::<String>::new());
    }

    #[test]
    fn a_version_with_lint_errors_is_not_rolled_out() {
        let broken = "receivers:\n  otlp: {}\nservice:\n  pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [nope]\n";
        let tags = vec![tag("gateway/v1", "c1", GATEWAY_V1), tag("gateway/v2", "c2", broken)];
        let good = compile(
            &snapshot(&[("fleets/prod.toml", "config = \"gateway\"\nversion = \"v1\"\n")], tags.clone()),
            Memory::default(),
        )
        .desired;
        let desired = compile(
            &snapshot(&[("fleets/prod.toml", "config = \"gateway\"\nversion = \"v2\"\n")], tags),
            Memory { last_good: Some(&good.last_good), ..Default::default() },
        )
        .desired;
        assert_eq!(
            messages(&desired),
            vec![
                "fleets/prod.toml:2: error: fleet `prod`: `gateway/v2` has configuration errors (see gateway/v2:configs/gateway.yaml) and is not rolled out; it keeps running `gateway/v1`",
                "gateway/v2:configs/gateway.yaml:7: error: exporter `nope` is used in pipeline `traces` but not defined under `exporters` or `connectors`",
            ]
        );
        assert_eq!(desired.fleets["prod"].assignment.as_ref().map(|v| v.tag.as_str()), Some("gateway/v1"));
    }

    #[test]
    fn bad_names_files_and_tags() {
        let mut snap = snapshot(
            &[
                ("configs/Gateway.yaml", GATEWAY_V1),
                ("configs/notes.txt", "x"),
                ("configs/README.md", "docs"),
                ("fleets/../../etc.toml", "x = 1"),
                ("fleets/prod.yaml", "config: gateway"),
            ],
            vec![
                tag("v1.0", "c1", GATEWAY_V1),
                tag("release/2024", "c2", GATEWAY_V1),
                tag("gateway/latest", "c3", GATEWAY_V1),
            ],
        );
        Arc::make_mut(&mut snap.tags[1]).files.clear();
        snap.files.insert(
            "configs/big.yaml".into(),
            RepoFile { blob_id: "b".into(), content: FileContent::TooLarge { size: 5_000_000 } },
        );
        snap.files.insert("configs/link.yaml".into(), RepoFile { blob_id: "l".into(), content: FileContent::Symlink });
        snap.files.insert(
            "fleets/bin.toml".into(),
            RepoFile { blob_id: "n".into(), content: FileContent::Blob(Arc::from(&b"config = \"\xff\""[..])) },
        );
        let desired = compile(&snap, Memory::default()).desired;
        assert_eq!(
            messages(&desired),
            vec![
                "configs/Gateway.yaml: error: configuration name `Gateway` must start with a lowercase letter or a digit",
                "configs/big.yaml: error: file is 5000000 bytes; the limit is 4194304 bytes",
                "configs/link.yaml: error: symbolic links are not followed; commit the file itself",
                "configs/notes.txt: warning: ignored: configuration files end in .yaml, .yml or .json",
                "fleets/../../etc.toml: warning: ignored: fleet files live directly in fleets/",
                "fleets/bin.toml: error: fleet file is not valid UTF-8",
                "fleets/prod.yaml: warning: ignored: fleet files end in .toml",
                "refs/tags/gateway/latest: warning: tag `gateway/latest` ignored: `latest` is reserved: it means the highest published version",
                "refs/tags/release/2024: warning: tag `release/2024` points at commit c2, which has no configs/release.yaml, .yml or .json; ignored",
                "refs/tags/v1.0: warning: tag `v1.0` is not <configuration>/<version>; ignored",
            ]
        );
        assert!(desired.fleets.is_empty());
    }
}
