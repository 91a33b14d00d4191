//! Keeps every fleet's install files in `<data-dir>/install/<fleet>/` in step with its
//! current token and `[install]` settings, off the reconciler's path (bundles with release
//! archives take a while to pack). Problems go back to the reconciler as an event.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::install::files::{self, InstallSpec};
use crate::install::{artifacts, token::TokenText};
use crate::problem::Problem;
use crate::reconciler::{Event, ProblemSource, View};

/// Where install files go and what they default to.
#[derive(Clone, Debug)]
pub struct InstallConfig {
    pub data_dir: PathBuf,
    /// The OpAMP URL from `--public-url`.
    pub public_endpoint: Option<String>,
    /// Used, with a warning, when neither the fleet nor `--public-url` names an endpoint.
    pub fallback_endpoint: String,
    pub artifacts_dir: Option<PathBuf>,
    /// `--install-ca-file`, for fleets that dial `wss://` or `https://`.
    pub ca: Option<std::sync::Arc<str>>,
}

/// One fleet's set to write.
struct Job {
    fleet: String,
    file: String,
    token: Arc<TokenText>,
    endpoint: String,
    endpoint_fallback: bool,
    collector_version: String,
    supervisor_version: String,
    access: crate::repo::manifest::Access,
}

pub async fn keep_written(
    mut view: watch::Receiver<Arc<View>>,
    config: InstallConfig,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
) {
    // What each fleet's files were last written (or found) from.
    let mut written: HashMap<String, String> = HashMap::new();
    let mut reported: Vec<Problem> = Vec::new();
    let mut last_inputs = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            changed = view.changed() => if changed.is_err() { break },
        }
        let jobs = {
            let current = view.borrow_and_update();
            // Most view changes (a fetch that found nothing new) touch neither input.
            let inputs =
                (current.desired.clone(), Arc::clone(&current.fleet_tokens), Arc::clone(&current.removed_fleets));
            let unchanged = last_inputs.as_ref().is_some_and(|(desired, tokens, removed)| {
                Arc::ptr_eq(tokens, &inputs.1)
                    && Arc::ptr_eq(removed, &inputs.2)
                    && match (desired, &inputs.0) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    }
            });
            if unchanged {
                continue;
            }
            let jobs = jobs(&current, &config);
            last_inputs = Some(inputs);
            jobs
        };
        let job_config = config.clone();
        let mut memo = std::mem::take(&mut written);
        let (memo, problems) = match tokio::task::spawn_blocking(move || {
            let (jobs, keep) = jobs;
            let mut problems = write_all(&jobs, &job_config, &mut memo);
            if let Some(keep) = keep {
                problems.extend(remove_gone(&job_config, &keep, &mut memo));
            }
            (memo, problems)
        })
        .await
        {
            Ok(done) => done,
            Err(_) => {
                warn!("writing install files panicked");
                continue;
            }
        };
        written = memo;
        if !problems.is_empty() {
            // Try again on the next view change (the next fetch), as for a full disk.
            last_inputs = None;
        }
        if problems != reported {
            reported = problems.clone();
            if events.send(Event::Problems { source: ProblemSource::Install, problems }).await.is_err() {
                break;
            }
        }
    }
}

/// What to write, and the fleets whose directories stay (`None` before the first reconcile,
/// when nothing may be removed).
fn jobs(view: &View, config: &InstallConfig) -> (Vec<Job>, Option<HashSet<String>>) {
    let Some(desired) = &view.desired else { return (Vec::new(), None) };
    // A fleet whose file is broken still exists, and a removed fleet keeps its token file
    // while its collectors may still connect: only fleets removed for good lose their files.
    let keep = desired.fleets.keys().chain(&desired.unresolved).chain(view.removed_fleets.keys()).cloned().collect();
    let jobs = desired
        .fleets
        .values()
        .filter_map(|fleet| {
            let token = view.fleet_tokens.get(fleet.name())?.text.clone()?;
            let install = &fleet.spec.install;
            let configured = install.endpoint.clone().or_else(|| config.public_endpoint.clone());
            let (collector_version, supervisor_version) = files::versions(install);
            Some(Job {
                fleet: fleet.name().to_owned(),
                file: fleet.spec.file.clone(),
                token,
                endpoint_fallback: configured.is_none(),
                endpoint: configured.unwrap_or_else(|| config.fallback_endpoint.clone()),
                collector_version,
                supervisor_version,
                access: install.access.clone(),
            })
        })
        .collect();
    (jobs, Some(keep))
}

/// Removes the install directories (files and token file) of fleets removed for good: their
/// tokens are no longer accepted, and a fleet that comes back gets a new one.
fn remove_gone(config: &InstallConfig, keep: &HashSet<String>, written: &mut HashMap<String, String>) -> Vec<Problem> {
    let root = config.data_dir.join("install");
    let Ok(entries) = std::fs::read_dir(&root) else { return Vec::new() };
    let mut problems = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
        if !is_dir || keep.contains(&name) || crate::repo::names::check_name(&name).is_err() {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => {
                written.remove(&name);
                info!(fleet = %name, dir = %entry.path().display(), "removed the install files of a removed fleet");
            }
            Err(error) => {
                let message = format!(
                    "cannot remove the install files of removed fleet `{name}` ({}): {error}",
                    entry.path().display()
                );
                warn!(fleet = %name, error = %message, "cannot remove install files");
                problems.push(Problem::general(crate::problem::Severity::Warning, message));
            }
        }
    }
    problems
}

fn write_all(jobs: &[Job], config: &InstallConfig, written: &mut HashMap<String, String>) -> Vec<Problem> {
    let mut problems = Vec::new();
    for job in jobs {
        let spec = InstallSpec {
            fleet: &job.fleet,
            token: &job.token,
            endpoint: &job.endpoint,
            collector_version: &job.collector_version,
            supervisor_version: &job.supervisor_version,
            ca: config.ca.as_deref(),
            server_releases: &[],
            access: &job.access,
        };
        if let Err(message) = write_fleet(&spec, job.endpoint_fallback, config, written) {
            warn!(fleet = %job.fleet, error = %message, "cannot write install files");
            problems.push(Problem::error(&job.file, None, message));
        }
    }
    problems
}

/// Writes one fleet's set unless it is current. The error says what is wrong.
fn write_fleet(
    spec: &InstallSpec<'_>,
    endpoint_fallback: bool,
    config: &InstallConfig,
    written: &mut HashMap<String, String>,
) -> Result<(), String> {
    // What the set is made from: its files before the release files are known, and the
    // release files' names, sizes and times (verifying them is the slow part).
    let rendered = files::render(spec);
    let release_paths: Vec<PathBuf> = match &config.artifacts_dir {
        Some(dir) => {
            files::ARCHES.iter().flat_map(|arch| files::release_files(spec, arch)).map(|n| dir.join(n)).collect()
        }
        None => Vec::new(),
    };
    let fingerprint = files::fingerprint(&rendered, &release_paths);
    if written.get(spec.fleet) == Some(&fingerprint) {
        return Ok(());
    }
    let dir = config.data_dir.join("install").join(spec.fleet);
    if files::is_current(&dir, &fingerprint) {
        written.insert(spec.fleet.to_owned(), fingerprint);
        return Ok(());
    }
    let (included, refused) = match &config.artifacts_dir {
        Some(artifacts_dir) => artifacts::for_bundles(artifacts_dir, spec),
        None => (Vec::new(), None),
    };
    let served: Vec<artifacts::Artifact> = included.iter().flat_map(|(_, found)| found.iter().cloned()).collect();
    let spec = &InstallSpec { server_releases: &served, ..*spec };
    let rendered = files::render(spec);
    files::write_set(&dir, spec, &rendered, &included, Some(&fingerprint))
        .map_err(|error| format!("cannot write the install files in {}: {error}", dir.display()))?;
    info!(
        fleet = %spec.fleet,
        dir = %dir.display(),
        offline_bundles = included.len(),
        "wrote install files"
    );
    if endpoint_fallback {
        warn!(
            fleet = %spec.fleet,
            endpoint = %spec.endpoint,
            "the fleet has no [install].endpoint and --public-url is not set: its install files dial this machine's name, which collectors on other hosts may not reach"
        );
    }
    written.insert(spec.fleet.to_owned(), fingerprint);
    match refused {
        // The set is written without the refused files; say why they are missing.
        Some(message) => Err(format!("offline bundle left without release files: {message}")),
        None => Ok(()),
    }
}
