//! Commit statuses on the forge: one per fleet, context `gitfleet/<fleet>`, on the commit
//! that set the fleet's assignment. GitHub's API (also served by Gitea and Forgejo, with
//! their own prefix and auth scheme) and GitLab's.
//!
//! A status is posted only when it changes, at most once per `--status-interval` per fleet,
//! and retried with backoff when the forge cannot be reached or refuses it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::problem::{Problem, Severity};
use crate::reconciler::{Event, ProblemSource};
use crate::reporting::Statuses;
use crate::status::{FleetStatus, Verdict};
use crate::store::{PostedStatus, Store};

const FIRST_RETRY: Duration = Duration::from_secs(2);
const MAX_RETRY: Duration = Duration::from_secs(300);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// GitHub refuses longer descriptions.
const MAX_DESCRIPTION: usize = 140;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ForgeKind {
    /// GitHub, GitHub Enterprise Server.
    Github,
    /// Gitea and Forgejo.
    Gitea,
    Gitlab,
}

/// Where and how to post statuses for one repository.
#[derive(Clone)]
pub struct Forge {
    pub kind: ForgeKind,
    /// The API prefix up to the repository, like `https://api.github.com/repos/acme/fleet`.
    repository_api: String,
    token: Arc<str>,
    /// The status page, for each status's link to its fleet.
    status_page: Option<String>,
}

impl std::fmt::Debug for Forge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forge").field("kind", &self.kind).field("repository_api", &self.repository_api).finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForgeUrlError {
    #[error("`{0}` is not an http:// or https:// URL of a repository, like https://github.com/acme/fleet-config")]
    NotAUrl(String),
    #[error(
        "`{0}` does not name a repository: give the repository's web address, like https://github.com/acme/fleet-config"
    )]
    NoRepository(String),
}

impl Forge {
    /// From the repository's web address (what the browser shows), the kind of forge and
    /// the API token.
    pub fn new(kind: ForgeKind, repository_url: &str, token: &str) -> Result<Self, ForgeUrlError> {
        let url = repository_url.trim().trim_end_matches('/');
        let url = url.strip_suffix(".git").unwrap_or(url);
        let (scheme, rest) = url.split_once("://").ok_or_else(|| ForgeUrlError::NotAUrl(repository_url.into()))?;
        if !matches!(scheme, "http" | "https") {
            return Err(ForgeUrlError::NotAUrl(repository_url.into()));
        }
        let (host, path) = rest.split_once('/').ok_or_else(|| ForgeUrlError::NoRepository(repository_url.into()))?;
        let segments: Vec<&str> = path.split('/').collect();
        let valid = |s: &&str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        let enough = if kind == ForgeKind::Gitlab { segments.len() >= 2 } else { segments.len() == 2 };
        if host.is_empty() || !enough || !segments.iter().all(valid) || segments.contains(&"..") {
            return Err(ForgeUrlError::NoRepository(repository_url.into()));
        }
        let repository_api = match kind {
            ForgeKind::Github if host == "github.com" => format!("https://api.github.com/repos/{path}"),
            ForgeKind::Github => format!("{scheme}://{host}/api/v3/repos/{path}"),
            ForgeKind::Gitea => format!("{scheme}://{host}/api/v1/repos/{path}"),
            ForgeKind::Gitlab => format!("{scheme}://{host}/api/v4/projects/{}", path.replace('/', "%2F")),
        };
        Ok(Self { kind, repository_api, token: Arc::from(token), status_page: None })
    }

    /// Statuses link to `/fleets/<fleet>` on the status page at `url`.
    pub fn linking_to(mut self, url: Option<&str>) -> Self {
        self.status_page = url.map(str::to_owned);
        self
    }

    /// The request for one status: URL, headers (beyond content type) and JSON body.
    pub fn request(&self, status: &CommitStatus) -> (String, Vec<(&'static str, String)>, serde_json::Value) {
        let url = format!("{}/statuses/{}", self.repository_api, status.commit);
        let mut headers = vec![("User-Agent", concat!("gitfleet/", env!("CARGO_PKG_VERSION")).to_owned())];
        let (state, context_key) = match self.kind {
            ForgeKind::Github => {
                headers.push(("Authorization", format!("Bearer {}", self.token)));
                headers.push(("Accept", "application/vnd.github+json".into()));
                headers.push(("X-GitHub-Api-Version", "2022-11-28".into()));
                (status.github_state(), "context")
            }
            ForgeKind::Gitea => {
                headers.push(("Authorization", format!("token {}", self.token)));
                headers.push(("Accept", "application/json".into()));
                (status.github_state(), "context")
            }
            ForgeKind::Gitlab => {
                headers.push(("PRIVATE-TOKEN", self.token.to_string()));
                headers.push(("Accept", "application/json".into()));
                (status.gitlab_state(), "name")
            }
        };
        let mut body = json!({ "state": state, "description": status.description, context_key: status.context });
        if let Some(page) = &self.status_page {
            let fleet = status.context.trim_start_matches("gitfleet/");
            body["target_url"] = serde_json::Value::String(format!("{page}/fleets/{fleet}"));
        }
        (url, headers, body)
    }

    /// Posts one status. Blocking: call it from a blocking thread.
    pub fn post(&self, status: &CommitStatus) -> Result<(), String> {
        let (url, headers, body) = self.request(status);
        let client = reqwest::blocking::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|error| format!("cannot start an HTTP client: {error}"))?;
        let mut request = client.post(&url).header("Content-Type", "application/json").body(body.to_string());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response =
            request.send().map_err(|error| format!("cannot reach {url}: {}", crate::client::innermost(&error)))?;
        let code = response.status();
        if code.is_success() {
            return Ok(());
        }
        let text = response.text().unwrap_or_default();
        let detail: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
        Err(format!("{url} answered {code}: {detail}"))
    }

    /// Whether `next` must be posted when `posted` is on the forge. GitLab updates only a
    /// status that is still running (or pending), and refuses a post that keeps that state
    /// ("Cannot transition status via :run from :running"), so a running status is only
    /// left for another state; a finished one is replaced by a new one, as elsewhere.
    pub fn must_post(&self, posted: Option<&CommitStatus>, next: &CommitStatus) -> bool {
        match posted {
            None => true,
            Some(posted)
                if self.kind == ForgeKind::Gitlab
                    && posted.commit == next.commit
                    && posted.verdict == Verdict::Pending
                    && next.verdict == Verdict::Pending =>
            {
                false
            }
            Some(posted) => posted != next,
        }
    }
}

/// One fleet's status on one commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitStatus {
    pub commit: String,
    pub context: String,
    pub verdict: Verdict,
    pub description: String,
}

impl CommitStatus {
    /// The status to show for a fleet, if it has an assignment and knows its commit.
    pub fn of(status: &FleetStatus) -> Option<Self> {
        status.tag.as_ref()?;
        let commit = status.assigned_by.clone()?;
        let mut description = status.description();
        if description.len() > MAX_DESCRIPTION {
            let mut end = MAX_DESCRIPTION;
            while !description.is_char_boundary(end) {
                end -= 1;
            }
            description.truncate(end);
        }
        Some(Self { commit, context: format!("gitfleet/{}", status.fleet), verdict: status.verdict(), description })
    }

    fn github_state(&self) -> &'static str {
        match self.verdict {
            Verdict::Pending => "pending",
            Verdict::Success => "success",
            Verdict::Failure => "failure",
        }
    }

    fn gitlab_state(&self) -> &'static str {
        match self.verdict {
            Verdict::Pending => "running",
            Verdict::Success => "success",
            Verdict::Failure => "failed",
        }
    }
}

/// What the poster knows about one fleet.
#[derive(Default)]
struct Posting {
    posted: Option<CommitStatus>,
    /// Not before this instant (coalescing after a post, backoff after a failure).
    not_before: Option<Instant>,
    retry: Option<Duration>,
    error: Option<String>,
}

/// Posts each fleet's commit status when it changes.
pub async fn post_commit_statuses(
    forge: Forge,
    interval: Duration,
    mut statuses: watch::Receiver<Arc<Statuses>>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
) {
    let forge = Arc::new(forge);
    // What was posted before a restart is not posted again.
    let remembered = {
        let (store, key) = (Arc::clone(&store), forge.repository_api.clone());
        tokio::task::spawn_blocking(move || store.posted_statuses(&key)).await.expect("the store does not panic")
    };
    let mut fleets: BTreeMap<String, Posting> = match remembered {
        Ok(posted) => posted
            .into_iter()
            .filter_map(|posted| {
                let fleet = posted.context.strip_prefix("gitfleet/")?.to_owned();
                let verdict = Verdict::parse(&posted.state)?;
                let status = CommitStatus {
                    commit: posted.commit,
                    context: posted.context,
                    verdict,
                    description: posted.description,
                };
                Some((fleet, Posting { posted: Some(status), ..Default::default() }))
            })
            .collect(),
        Err(error) => {
            warn!(%error, "cannot read the commit statuses posted before; they may be posted again");
            BTreeMap::new()
        }
    };
    let mut wake: Option<Instant> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            changed = statuses.changed() => if changed.is_err() { break },
            () = async { match wake { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {}
        }
        let wanted: BTreeMap<String, CommitStatus> = statuses
            .borrow()
            .fleets
            .values()
            .filter_map(|status| Some((status.fleet.clone(), CommitStatus::of(status)?)))
            .collect();
        let before = fleets.len();
        fleets.retain(|name, _| wanted.contains_key(name));
        let mut errors_changed = fleets.len() != before;
        wake = None;
        for (name, status) in wanted {
            let posting = fleets.entry(name.clone()).or_default();
            if !forge.must_post(posting.posted.as_ref(), &status) {
                continue;
            }
            let now = Instant::now();
            if let Some(at) = posting.not_before.filter(|at| *at > now) {
                wake = Some(wake.map_or(at, |w| w.min(at)));
                continue;
            }
            let job_forge = Arc::clone(&forge);
            let job_status = status.clone();
            let posted =
                tokio::task::spawn_blocking(move || job_forge.post(&job_status)).await.expect("posting does not panic");
            match posted {
                Ok(()) => {
                    Metrics::count(&metrics.forge_posts);
                    let remember = PostedStatus {
                        forge: forge.repository_api.clone(),
                        context: status.context.clone(),
                        commit: status.commit.clone(),
                        state: status.github_state().to_owned(),
                        description: status.description.clone(),
                    };
                    let saving = Arc::clone(&store);
                    let saved = tokio::task::spawn_blocking(move || saving.save_posted_status(&remember))
                        .await
                        .expect("the store does not panic");
                    if let Err(error) = saved {
                        warn!(fleet = %name, %error, "cannot remember the posted commit status");
                    }
                    info!(fleet = %name, commit = %crate::repo::desired::short(&status.commit), state = ?status.verdict, description = %status.description, "commit status posted");
                    posting.posted = Some(status);
                    posting.not_before = Some(Instant::now() + interval);
                    posting.retry = None;
                    errors_changed |= posting.error.take().is_some();
                }
                Err(error) => {
                    Metrics::count(&metrics.forge_errors);
                    let retry = posting.retry.map_or(FIRST_RETRY, |r| (r * 2).min(MAX_RETRY));
                    warn!(fleet = %name, %error, retry_in = ?retry, "cannot post the commit status");
                    posting.retry = Some(retry);
                    posting.not_before = Some(Instant::now() + retry);
                    errors_changed |= posting.error.replace(error.clone()) != Some(error);
                }
            }
            let at = posting.not_before.expect("just set");
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
        if errors_changed {
            let problems = fleets
                .iter()
                .filter_map(|(name, posting)| {
                    let error = posting.error.as_ref()?;
                    Some(Problem::general(Severity::Warning, format!("commit status of fleet `{name}`: {error}")))
                })
                .collect();
            let _ = events.send(Event::Problems { source: ProblemSource::Forge, problems }).await;
        }
    }
    info!("commit status poster stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(verdict: Verdict, description: &str) -> CommitStatus {
        CommitStatus {
            commit: "c0ffee".into(),
            context: "gitfleet/prod".into(),
            verdict,
            description: description.into(),
        }
    }

    #[test]
    fn api_addresses_per_forge() {
        let cases = [
            (
                ForgeKind::Github,
                "https://github.com/acme/fleet-config",
                "https://api.github.com/repos/acme/fleet-config/statuses/c0ffee",
            ),
            (
                ForgeKind::Github,
                "https://ghe.example.com/acme/fleet.git/",
                "https://ghe.example.com/api/v3/repos/acme/fleet/statuses/c0ffee",
            ),
            (
                ForgeKind::Gitea,
                "http://127.0.0.1:3000/acme/fleet",
                "http://127.0.0.1:3000/api/v1/repos/acme/fleet/statuses/c0ffee",
            ),
            (
                ForgeKind::Gitlab,
                "https://gitlab.example.com/ops/infra/fleet",
                "https://gitlab.example.com/api/v4/projects/ops%2Finfra%2Ffleet/statuses/c0ffee",
            ),
        ];
        for (kind, url, api) in cases {
            let forge = Forge::new(kind, url, "t").expect("valid");
            let (address, _, body) = forge.request(&status(Verdict::Pending, ""));
            assert_eq!(address, api);
            assert_eq!(body.get("target_url"), None, "no link without a status page");
            let linked = forge.linking_to(Some("https://fleet.example.com")).request(&status(Verdict::Pending, "")).2;
            assert_eq!(linked["target_url"], "https://fleet.example.com/fleets/prod");
        }
        for bad in [
            "github.com/acme/fleet",
            "ftp://x/a/b",
            "https://github.com/acme",
            "https://github.com/a/b/c",
            "https://x/a/../b",
        ] {
            assert!(Forge::new(ForgeKind::Github, bad, "t").is_err(), "{bad}");
        }
    }

    #[test]
    fn gitlab_keeps_a_running_status_until_its_state_changes() {
        let github = Forge::new(ForgeKind::Github, "https://github.com/a/b", "s3cr3t").expect("valid");
        let gitlab = Forge::new(ForgeKind::Gitlab, "https://gitlab.com/a/b", "t").expect("valid");
        let before = status(Verdict::Pending, "1/2 in sync, 1 pending");
        let after = status(Verdict::Pending, "1/2 in sync, 1 applying");
        assert!(github.must_post(Some(&before), &after));
        assert!(!gitlab.must_post(Some(&before), &after));
        assert!(gitlab.must_post(Some(&before), &status(Verdict::Success, "2/2 in sync")));
        // A finished status is replaced by a new one: the description can change.
        let done = status(Verdict::Success, "no instances connected");
        assert!(gitlab.must_post(Some(&done), &status(Verdict::Success, "2/2 in sync")));
        assert!(!gitlab.must_post(Some(&done), &done));
        assert!(!github.must_post(Some(&before), &before));
        assert!(!format!("{github:?}").contains("s3cr3t"), "the token stays out of Debug");
    }
}
