//! Decides when to look at the repository again, and looks.
//!
//! Triggers (the poll interval, `POST /hooks/git`, a filesystem watch on a local
//! repository's refs) are hints: each one leads to a fetch and, if refs changed, a full
//! re-read of the snapshot. Bursts are coalesced; failures are retried with backoff while
//! the last good state keeps being served.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::Watcher as _;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::git::mirror::Mirror;
use crate::git::snapshot::SnapshotReader;
use crate::reconciler::Event;

/// Why the watcher looks again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Webhook,
    FileSystem,
}

/// How long to wait for more triggers after the first one of a burst.
const DEBOUNCE: Duration = Duration::from_millis(20);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);

#[derive(Clone)]
pub struct WatcherSettings {
    pub branch: String,
    pub poll_interval: Duration,
}

/// Starts a filesystem watch on a local repository's refs; triggers go to `triggers`.
/// Changes to `ignored_branch` (the status branch gitfleet pushes) do not count.
/// The returned watcher must be kept alive.
pub fn watch_local_refs(
    git_dir: PathBuf,
    ignored_branch: Option<&str>,
    triggers: mpsc::Sender<Trigger>,
) -> notify::Result<notify::RecommendedWatcher> {
    let refs = git_dir.join("refs");
    // The ref, its lock file, and the directories the first push creates for it (a change
    // to another branch in them shows up as that branch's own file).
    let heads = refs.join("heads");
    let ignored: Vec<PathBuf> = ignored_branch
        .map(|branch| {
            let path = heads.join(branch);
            let lock = path.with_file_name(format!("{}.lock", path.file_name().unwrap_or_default().to_string_lossy()));
            let parents = path.ancestors().skip(1).take_while(|dir| *dir != heads).map(PathBuf::from);
            [path.clone(), lock].into_iter().chain(parents.collect::<Vec<_>>()).collect()
        })
        .unwrap_or_default();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        // Only changes count: reading the repository (as every fetch does) causes access
        // events, which would otherwise trigger the next fetch, forever.
        let changed = match event.kind {
            notify::EventKind::Create(_) | notify::EventKind::Remove(_) | notify::EventKind::Any => true,
            notify::EventKind::Modify(kind) => !matches!(kind, notify::event::ModifyKind::Metadata(_)),
            notify::EventKind::Access(_) | notify::EventKind::Other => false,
        };
        let relevant = changed
            && event.paths.iter().filter(|path| !ignored.contains(path)).any(|path| {
                path.starts_with(&refs) || path.file_name().is_some_and(|name| name == "packed-refs" || name == "HEAD")
            });
        if relevant {
            // A full queue already holds a trigger; dropping this one loses nothing.
            let _ = triggers.try_send(Trigger::FileSystem);
        }
    })?;
    watcher.watch(&git_dir.join("refs"), notify::RecursiveMode::Recursive)?;
    watcher.watch(&git_dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Fetches and reads the repository whenever a trigger or the poll interval says so.
pub async fn run(
    settings: WatcherSettings,
    mirror: Arc<Mirror>,
    mut triggers: mpsc::Receiver<Trigger>,
    events: mpsc::Sender<Event>,
    fatal: mpsc::Sender<String>,
    cancel: CancellationToken,
) -> mpsc::Receiver<Trigger> {
    let reader = Arc::new(Mutex::new(SnapshotReader::new()));
    let rev = format!("refs/heads/{}", settings.branch);
    let mut failures: u32 = 0;
    let mut read_once = false;
    let mut next_poll = Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = sleep_until(next_poll) => debug!("poll"),
            trigger = triggers.recv() => {
                let Some(trigger) = trigger else { break };
                debug!(?trigger, "triggered");
                sleep(DEBOUNCE).await;
                while triggers.try_recv().is_ok() {}
            }
        }
        let job_mirror = Arc::clone(&mirror);
        let job_reader = Arc::clone(&reader);
        let job_rev = rev.clone();
        let branch = settings.branch.clone();
        let must_read = !read_once;
        let (result, branches, fallback) = tokio::task::spawn_blocking(move || {
            let read = || {
                let changed = job_mirror.fetch()?;
                if !changed && !must_read {
                    return Ok(None);
                }
                let repo = job_mirror.repo();
                let mut reader = job_reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                reader.read(&repo, &job_rev, &branch).map(Some)
            };
            let result = read();
            // When the branch is not there, the branches that are, to name them.
            let branches = match &result {
                Err(crate::git::GitError::Resolve { .. }) => job_mirror.branches(),
                _ => Vec::new(),
            };
            // A start with the remote out of reach: the mirror still holds what the last run
            // fetched, which is the state it reconciled. Start from that.
            let fallback = match &result {
                Err(error) if must_read && !matches!(error, crate::git::GitError::Resolve { .. }) => {
                    let repo = job_mirror.repo();
                    let mut reader = job_reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    reader.read(&repo, &job_rev, &branch).ok()
                }
                _ => None,
            };
            (result, branches, fallback)
        })
        .await
        .expect("fetch and read do not panic");
        if let Some(snapshot) = fallback {
            read_once = true;
            info!(commit = %crate::repo::desired::short(&snapshot.commit), "the repository is out of reach: starting from the mirror's last fetched state");
            if events.send(Event::RepoRead(Box::new(snapshot))).await.is_err() {
                break;
            }
        }

        let event = match result {
            Ok(Some(snapshot)) => {
                read_once = true;
                Event::RepoRead(Box::new(snapshot))
            }
            Ok(None) => Event::RepoReachable,
            Err(crate::git::GitError::Resolve { .. }) if !read_once && !branches.is_empty() => {
                // The remote answered and has other branches: a mistake in the settings,
                // said once, rather than a problem served forever. (An empty repository is
                // a problem until its first push.)
                let shown: Vec<String> = branches.iter().take(20).map(|b| format!("`{b}`")).collect();
                let more = branches.len() - shown.len();
                let message = format!(
                    "--branch `{}`: {} has no such branch (its branches: {}{})",
                    settings.branch,
                    redact_url(mirror.url()),
                    shown.join(", "),
                    if more > 0 { format!(" and {more} more") } else { String::new() },
                );
                {
                    let _ = fatal.try_send(message);
                }
                break;
            }
            Err(error) => {
                failures += 1;
                let message = match &error {
                    crate::git::GitError::Resolve { .. } => {
                        format!("branch `{}` not found in {}: {error}", settings.branch, redact_url(mirror.url()))
                    }
                    _ => redact_url(&error.to_string()),
                };
                warn!(error = %message, failures, "cannot read the repository; keeping the last good state");
                Event::RepoUnreachable { message }
            }
        };
        let succeeded = !matches!(event, Event::RepoUnreachable { .. });
        if succeeded {
            if failures > 0 {
                info!(after_failures = failures, "repository reachable again");
            }
            failures = 0;
        }
        if events.send(event).await.is_err() {
            break;
        }
        next_poll = Instant::now()
            + if succeeded { settings.poll_interval } else { retry_delay(failures, settings.poll_interval) };
    }
    info!("watcher stopped");
    // For the next watcher, if this replica leads again.
    triggers
}

/// 1 s, 2 s, 4 s, … capped at the poll interval and at five minutes.
fn retry_delay(failures: u32, poll_interval: Duration) -> Duration {
    let exponential = FIRST_RETRY.saturating_mul(1 << failures.saturating_sub(1).min(16));
    exponential.min(poll_interval.max(FIRST_RETRY)).min(MAX_RETRY)
}

/// Removes credentials (`user:password@`) from URLs inside a message.
pub fn redact_url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let (before, after) = rest.split_at(scheme_end + 3);
        out.push_str(before);
        let authority_end = after.find(['/', ' ', '"', '\'']).unwrap_or(after.len());
        match after[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str("***@");
                rest = &after[at + 1..];
            }
            None => rest = after,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_up_to_the_poll_interval() {
        let poll = Duration::from_secs(30);
        let delays: Vec<u64> = (1..=7).map(|n| retry_delay(n, poll).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(retry_delay(40, Duration::from_secs(3600)), MAX_RETRY);
    }

    #[test]
    fn credentials_are_removed_from_urls() {
        assert_eq!(
            redact_url("cannot fetch https://bot:s3cret@git.example.com/org/repo.git: 403"),
            "cannot fetch https://***@git.example.com/org/repo.git: 403"
        );
        assert_eq!(redact_url("file:///srv/repo"), "file:///srv/repo");
        assert_eq!(redact_url("ssh://git@host/x and https://a:b@c/d"), "ssh://***@host/x and https://***@c/d");
    }
}
