//! Carries fleet statuses out of the server: one task keeps every fleet's `FleetStatus`
//! current (published on a watch channel for the status page's live updates, the status
//! branch and the forge), and one commits them to the status branch and pushes it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::git::status_branch::{self, Pushed, StatusBranch};
use crate::metrics::Metrics;
use crate::opamp::codec::InstanceUid;
use crate::opamp::registry::{Registry, Targets};
use crate::problem::{Problem, Severity};
use crate::reconciler::{Event, ProblemSource, View};
use crate::status::FleetStatus;

/// How often statuses are recomputed: the longest a change waits to be seen.
const RECOMPUTE_EVERY: Duration = Duration::from_secs(1);
/// Push retries back off from here…
const FIRST_PUSH_RETRY: Duration = Duration::from_secs(2);
/// …to here.
const MAX_PUSH_RETRY: Duration = Duration::from_secs(300);

/// Every fleet's status at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Statuses {
    /// False until the first desired state has been read.
    pub ready: bool,
    pub fleets: BTreeMap<String, FleetStatus>,
}

/// Recomputes statuses every second and publishes them when they change.
pub async fn publish_statuses(
    view: watch::Receiver<Arc<View>>,
    targets: watch::Receiver<Arc<Targets>>,
    registry: Arc<Registry>,
    statuses: watch::Sender<Arc<Statuses>>,
    cancel: CancellationToken,
) {
    let mut ticks = tokio::time::interval(RECOMPUTE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let Some(desired) = view.borrow().desired.clone() else { continue };
        let targets = Arc::clone(&targets.borrow());
        // Right after a reconcile the targets may not have caught up with the desired state:
        // counts against the old assignment under the new version's name would say "in
        // sync" too early (and a forge would show success on the new commit).
        let caught_up = desired.fleets.values().all(|fleet| {
            let wanted = fleet.assignment.as_ref().map(|version| version.config_hash.as_slice());
            let served =
                targets.get(fleet.name()).and_then(|t| t.version.as_ref()).map(|v| v.assignment.hash.as_slice());
            wanted == served
        });
        if !caught_up {
            continue;
        }
        let mut tallies = registry.tallies(&targets, crate::time::now_ms());
        let fleets = desired
            .fleets
            .values()
            .map(|fleet| {
                let tally = tallies.remove(fleet.name()).unwrap_or_default();
                (fleet.name().to_owned(), FleetStatus::of_tally(fleet, &desired, tally))
            })
            .collect();
        let next = Statuses { ready: true, fleets };
        statuses.send_if_modified(|current| {
            if **current == next {
                return false;
            }
            *current = Arc::new(next);
            true
        });
    }
}

/// What the status branch writer reads: statuses to know when, the rest to write the files.
pub struct Sources {
    pub statuses: watch::Receiver<Arc<Statuses>>,
    pub view: watch::Receiver<Arc<View>>,
    pub targets: watch::Receiver<Arc<Targets>>,
    pub registry: Arc<Registry>,
    /// Where the other replicas' instances are (a shared store), and this one's name.
    pub store: Arc<dyn crate::store::Store>,
    pub replica: Arc<str>,
}

/// Settings of the status branch writer.
pub struct StatusBranchSettings {
    pub data_dir: std::path::PathBuf,
    pub remote: String,
    pub branch: String,
    /// At most one commit per interval.
    pub interval: Duration,
    /// The status page, for the README's links.
    pub status_page_url: Option<String>,
}

/// Commits status changes to the status branch, at most one commit per interval, and
/// pushes them; a remote that cannot be reached is retried with backoff while the server
/// carries on.
pub async fn keep_status_branch(
    settings: StatusBranchSettings,
    sources: Sources,
    metrics: Arc<Metrics>,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
) {
    let opened = {
        let (data_dir, remote, branch) = (settings.data_dir.clone(), settings.remote.clone(), settings.branch.clone());
        tokio::task::spawn_blocking(move || open_and_follow(&data_dir, &remote, &branch))
            .await
            .expect("opening the status branch does not panic")
    };
    let Opened { branch, mut recorded, problem: start_problem } = match opened {
        Ok(opened) => opened,
        Err(error) => {
            warn!(%error, "the status branch is off");
            let problem = Problem::general(Severity::Error, format!("status branch: {error}"));
            let _ = events.send(Event::Problems { source: ProblemSource::StatusBranch, problems: vec![problem] }).await;
            return;
        }
    };
    let Sources { mut statuses, view, targets, registry, store, replica } = sources;
    let branch = Arc::new(branch);
    let mut problem = start_problem;
    report(&events, &problem).await;

    // After a restart, restored instances are stale until they reconnect; one interval
    // lets them, so a restart alone does not make a commit.
    let mut last_commit: Option<Instant> = (!recorded.is_empty()).then(Instant::now);
    let mut push_at: Option<Instant> = Some(Instant::now());
    let mut push_retry = FIRST_PUSH_RETRY;
    let mut stopping = false;
    while !stopping {
        let changed = {
            let current = statuses.borrow();
            current.ready && current.fleets != recorded
        };
        let commit_at = match (changed, last_commit) {
            (false, _) => None,
            (true, None) => Some(Instant::now()),
            (true, Some(last)) => Some(last + settings.interval),
        };
        let wake = [commit_at, push_at].into_iter().flatten().min();
        let commit_at = tokio::select! {
            // At shutdown, what changed since the last commit is committed and pushed now,
            // without waiting for the interval.
            () = cancel.cancelled() => {
                stopping = true;
                push_at = push_at.or(commit_at.map(|_| Instant::now()));
                commit_at.map(|_| Instant::now())
            }
            changed = statuses.changed() => {
                if changed.is_err() { break }
                continue;
            }
            () = sleep_until_or_forever(wake) => commit_at,
        };
        let now = Instant::now();
        if commit_at.is_some_and(|at| at <= now) {
            let current = statuses.borrow().fleets.clone();
            let Some(desired) = view.borrow().desired.clone() else { continue };
            let Some(message) = crate::status::commit_message(&recorded, &current) else { continue };
            let job_targets = Arc::clone(&targets.borrow());
            let (job_branch, job_registry, job_current) = (Arc::clone(&branch), Arc::clone(&registry), current.clone());
            let (job_store, job_replica) = (Arc::clone(&store), Arc::clone(&replica));
            let job_message = message.clone();
            let status_page = settings.status_page_url.clone();
            // Every instance goes into the fleet files: megabytes at 20,000 instances, so the
            // files are made off the runtime too.
            let committed = tokio::task::spawn_blocking(move || {
                let now_ms = crate::time::now_ms();
                let unix = now_ms / 1000;
                // Only the ids are collected; each row is made as it is written.
                let uids = job_registry.uids_by_fleet();
                job_branch.commit(&job_message, unix, |import| {
                    status_branch::write_files(
                        import,
                        &desired,
                        &job_current,
                        unix,
                        status_page.as_deref(),
                        &mut |status, out| {
                            let fleet_uids = uids.get(status.fleet.as_str()).map(Vec::as_slice).unwrap_or_default();
                            // The other replicas' instances of the fleet, one fleet at a time.
                            let elsewhere = match job_store.shared() {
                                true => job_store
                                    .instances_held_elsewhere(&job_replica, Some(&status.fleet))
                                    .map_err(std::io::Error::other)?,
                                false => Vec::new(),
                            };
                            let mut elsewhere = elsewhere
                                .into_iter()
                                .filter(|instance| !job_registry.knows(&InstanceUid(instance.uid)))
                                .map(|instance| job_registry.elsewhere(instance, Vec::new()).row(&job_targets, now_ms))
                                .peekable();
                            let mut own = fleet_uids
                                .iter()
                                .filter_map(|uid| job_registry.row_of(uid, &job_targets, now_ms))
                                .peekable();
                            // Both in `instance_uid` order: merged, so is the file.
                            let mut rows = std::iter::from_fn(|| match (own.peek(), elsewhere.peek()) {
                                (Some(a), Some(b)) if b.instance_uid < a.instance_uid => elsewhere.next(),
                                (Some(_), _) => own.next(),
                                (None, _) => elsewhere.next(),
                            });
                            crate::status::write_fleet_file(out, status, &mut rows)
                        },
                    )
                })
            })
            .await
            .expect("committing does not panic");
            last_commit = Some(now);
            match committed {
                Ok(commit) => {
                    let subject = message.lines().next().unwrap_or_default();
                    info!(commit = %crate::repo::desired::short(&commit), message = %subject, "status committed");
                    Metrics::count(&metrics.status_commits);
                    recorded = current;
                    push_at = Some(now);
                }
                Err(error) => {
                    warn!(%error, "cannot commit fleet status");
                    problem = Some(format!("cannot commit fleet status: {error}"));
                    report(&events, &problem).await;
                }
            }
        }
        if push_at.is_some_and(|at| at <= Instant::now()) {
            let pushing = Arc::clone(&branch);
            let pushed = tokio::task::spawn_blocking(move || pushing.push()).await.expect("pushing does not panic");
            match pushed {
                Ok(outcome) => {
                    if let Pushed::Pushed { commit, replayed } = outcome {
                        info!(commit = %crate::repo::desired::short(&commit), replayed, "status branch pushed");
                    }
                    push_at = None;
                    push_retry = FIRST_PUSH_RETRY;
                    if problem.take().is_some() {
                        report(&events, &None).await;
                    }
                }
                Err(error) => {
                    Metrics::count(&metrics.git_push_errors);
                    warn!(%error, retry_in = ?push_retry, "cannot push the status branch; commits are kept and pushed later");
                    problem = Some(format!("{error}; status commits are kept and pushed once it works"));
                    report(&events, &problem).await;
                    push_at = Some(Instant::now() + push_retry);
                    push_retry = (push_retry * 2).min(MAX_PUSH_RETRY);
                }
            }
        }
    }
    info!("status branch writer stopped");
}

/// The status branch as found at startup.
struct Opened {
    branch: StatusBranch,
    /// What its tip records.
    recorded: BTreeMap<String, FleetStatus>,
    /// Why the remote could not be reached, if it could not.
    problem: Option<String>,
}

/// Opens the local status repository and catches up with the remote's branch if it can.
fn open_and_follow(
    data_dir: &std::path::Path,
    remote: &str,
    branch: &str,
) -> Result<Opened, status_branch::StatusBranchError> {
    let branch = StatusBranch::open(data_dir, remote, branch)?;
    let problem = match branch.fetch() {
        Ok(Some(remote_tip)) => {
            branch.follow(&remote_tip)?;
            None
        }
        Ok(None) => None,
        Err(error) => {
            warn!(%error, "cannot fetch the status branch; writing locally until the remote is back");
            Some(format!("{error}; status commits are kept and pushed once it works"))
        }
    };
    let recorded = branch.recorded();
    Ok(Opened { branch, recorded, problem })
}

async fn report(events: &mpsc::Sender<Event>, problem: &Option<String>) {
    let problems = problem.iter().map(|message| Problem::general(Severity::Warning, message.clone())).collect();
    let _ = events.send(Event::Problems { source: ProblemSource::StatusBranch, problems }).await;
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
