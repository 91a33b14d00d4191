//! Server settings from flags and `GITFLEET_*` variables, validated before any socket is
//! bound: bad settings stop the server with one clear line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::duration::parse_duration;
use crate::git::mirror::local_git_dir;

/// `gitfleet serve` flags. Every flag has a `GITFLEET_*` variable.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// The config repository: a URL (https://, ssh://, file://) or a local path.
    #[arg(long, env = "GITFLEET_REPO")]
    pub repo: String,
    /// The branch whose tip is the desired state.
    #[arg(long, env = "GITFLEET_BRANCH", default_value = "main")]
    pub branch: String,
    /// Where gitfleet keeps its state database and repository mirror.
    #[arg(long, env = "GITFLEET_DATA_DIR", default_value = "./.gitfleet")]
    pub data_dir: PathBuf,
    /// Address of the collector port: OpAMP at /v1/opamp (WebSocket and plain HTTP).
    #[arg(long, env = "GITFLEET_LISTEN", default_value = "0.0.0.0:4320")]
    pub listen: String,
    /// Most WebSocket connections and HTTP requests in flight on the collector port; more
    /// get 503 with Retry-After. The process may open 20,000 files here.
    #[arg(long, env = "GITFLEET_MAX_CONNECTIONS", default_value_t = 19_500)]
    pub max_connections: usize,
    /// Address of the people port: status API, /healthz, /readyz, POST /hooks/git.
    #[arg(long, env = "GITFLEET_WEB_LISTEN", default_value = "127.0.0.1:4321")]
    pub web_listen: String,
    /// How often to fetch the repository when no webhook or filesystem event arrives.
    #[arg(long, env = "GITFLEET_POLL_INTERVAL", default_value = "30s")]
    pub poll_interval: String,
    /// Secret that POST /hooks/git deliveries must be signed with (GitHub, Gitea) or carry
    /// (GitLab). Without it, any POST triggers a fetch.
    #[arg(long, env = "GITFLEET_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub repo: String,
    pub branch: String,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub web_listen: SocketAddr,
    pub poll_interval: Duration,
    pub webhook_secret: Option<Arc<[u8]>>,
    /// The `.git` directory of a local repository, watched for ref changes.
    pub local_git_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("--repo must not be empty")]
    EmptyRepo,
    #[error("--repo {0}: no Git repository there (give a URL or the path of a repository)")]
    NotARepository(String),
    #[error("--branch `{0}` is not a valid branch name")]
    BadBranch(String),
    #[error("--listen `{0}` is not an address like 0.0.0.0:4320")]
    BadOpampListen(String),
    #[error("--max-connections must be at least 1")]
    NoConnections,
    #[error("--web-listen `{0}` is not an address like 127.0.0.1:4321")]
    BadListen(String),
    #[error("--poll-interval: {0}")]
    BadPollInterval(String),
    #[error("--webhook-secret must not be empty")]
    EmptyWebhookSecret,
    #[error("--data-dir {path}: {message}")]
    DataDir { path: String, message: String },
}

impl ServeArgs {
    pub fn validate(self) -> Result<Settings, SettingsError> {
        let repo = self.repo.trim().to_owned();
        if repo.is_empty() {
            return Err(SettingsError::EmptyRepo);
        }
        let is_url = repo.contains("://") || (repo.contains('@') && repo.contains(':'));
        let local_git_dir = local_git_dir(&repo);
        if !is_url && local_git_dir.is_none() {
            return Err(SettingsError::NotARepository(repo));
        }
        if let Some(path) = repo.strip_prefix("file://")
            && !std::path::Path::new(path).exists()
        {
            return Err(SettingsError::NotARepository(repo));
        }
        if !valid_branch(&self.branch) {
            return Err(SettingsError::BadBranch(self.branch));
        }
        let listen = self.listen.parse().map_err(|_| SettingsError::BadOpampListen(self.listen.clone()))?;
        if self.max_connections == 0 {
            return Err(SettingsError::NoConnections);
        }
        let web_listen = self.web_listen.parse().map_err(|_| SettingsError::BadListen(self.web_listen.clone()))?;
        let poll_interval = parse_duration(&self.poll_interval).map_err(SettingsError::BadPollInterval)?;
        if poll_interval < Duration::from_secs(1) {
            return Err(SettingsError::BadPollInterval(format!("`{}` is shorter than 1s", self.poll_interval)));
        }
        let webhook_secret = match self.webhook_secret {
            Some(secret) if secret.is_empty() => return Err(SettingsError::EmptyWebhookSecret),
            Some(secret) => Some(Arc::from(secret.into_bytes())),
            None => None,
        };
        std::fs::create_dir_all(&self.data_dir).map_err(|error| SettingsError::DataDir {
            path: self.data_dir.display().to_string(),
            message: error.to_string(),
        })?;
        let probe = self.data_dir.join(".write-test");
        std::fs::write(&probe, b"").and_then(|()| std::fs::remove_file(&probe)).map_err(|error| {
            SettingsError::DataDir {
                path: self.data_dir.display().to_string(),
                message: format!("not writable: {error}"),
            }
        })?;
        Ok(Settings {
            repo,
            branch: self.branch,
            data_dir: self.data_dir,
            listen,
            max_connections: self.max_connections,
            web_listen,
            poll_interval,
            webhook_secret,
            local_git_dir,
        })
    }
}

/// The rules of `git check-ref-format` that matter for a branch given on a command line.
fn valid_branch(branch: &str) -> bool {
    !branch.is_empty()
        && !branch.starts_with(['-', '/', '.'])
        && !branch.ends_with(['/', '.'])
        && !branch.ends_with(".lock")
        && !branch.contains("..")
        && !branch.contains("//")
        && !branch.contains("@{")
        && !branch.chars().any(|c| c.is_ascii_control() || " ~^:?*[\\".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names() {
        for good in ["main", "release/2026", "feature-x"] {
            assert!(valid_branch(good), "{good}");
        }
        for bad in ["", "-x", "a..b", "a b", "x.lock", "a:b", "/a", "a/"] {
            assert!(!valid_branch(bad), "{bad}");
        }
    }
}
