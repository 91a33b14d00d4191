//! Server settings from flags and `GITFLEET_*` variables, validated before any socket is
//! bound: bad settings stop the server with one clear line.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::duration::parse_duration;
use crate::git::mirror::local_git_dir;
use crate::opamp::registry::NewInstanceLimit;

const DEFAULT_BRANCH: &str = "main";
const DEFAULT_LISTEN: &str = "0.0.0.0:4320";
const DEFAULT_MAX_CONNECTIONS: usize = 19_500;
const DEFAULT_WEB_LISTEN: &str = "127.0.0.1:4321";
const DEFAULT_POLL_INTERVAL: &str = "30s";
const DEFAULT_STATUS_BRANCH: &str = "gitfleet/status";
const DEFAULT_STATUS_INTERVAL: &str = "10s";
const DEFAULT_FORGET_AFTER: &str = "7d";
const DEFAULT_REMOVED_FLEET_GRACE: &str = "7d";
const DEFAULT_NEW_INSTANCES: NewInstanceLimit = NewInstanceLimit { burst: 20_000, per_minute: 1_000 };

/// `gitfleet serve` flags. Every flag has a `GITFLEET_*` variable.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// The config repository: a URL (https://, ssh://, file://) or a local path.
    #[arg(long, env = "GITFLEET_REPO")]
    pub repo: String,
    /// The branch whose tip is the desired state.
    #[arg(long, env = "GITFLEET_BRANCH", default_value = DEFAULT_BRANCH)]
    pub branch: String,
    /// Where gitfleet keeps its state database and repository mirror.
    #[arg(long, env = "GITFLEET_DATA_DIR", default_value = "./.gitfleet")]
    pub data_dir: PathBuf,
    /// A PostgreSQL database for gitfleet's state (`postgres://user@host:port/db`) instead
    /// of SQLite in the data directory. Give the password in --database-password-file, not
    /// in the URL (anyone on the host can read a flag in `ps`).
    #[arg(long, env = "GITFLEET_DATABASE")]
    pub database: Option<String>,
    /// A file holding the PostgreSQL password and nothing else.
    #[arg(long, env = "GITFLEET_DATABASE_PASSWORD_FILE", requires = "database")]
    pub database_password_file: Option<PathBuf>,
    /// With --database …?sslmode=require: the CA certificates (PEM) that signed the
    /// database server's certificate, instead of the system's trust store.
    #[arg(long, env = "GITFLEET_DATABASE_CA_FILE", requires = "database")]
    pub database_ca_file: Option<PathBuf>,
    /// With --database: a file with the key every replica shares (64 hex digits, from
    /// `gitfleet secret-key`). Install token secrets are kept in the database sealed under
    /// it, so that every replica can serve install files.
    #[arg(long, env = "GITFLEET_SECRET_KEY_FILE", requires = "database")]
    pub secret_key_file: Option<PathBuf>,
    /// How this replica is named to the others, in logs, the API and metrics labels
    /// (default: the host name and the collector port).
    #[arg(long, env = "GITFLEET_REPLICA_NAME")]
    pub replica_name: Option<String>,
    /// Address of the collector port: OpAMP at /v1/opamp (WebSocket and plain HTTP).
    #[arg(long, env = "GITFLEET_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Most WebSocket connections and HTTP requests in flight on the collector port; more
    /// get 503 with Retry-After. The process may open 20,000 files here.
    #[arg(long, env = "GITFLEET_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Address of the people port: status API, /healthz, /readyz, POST /hooks/git.
    #[arg(long, env = "GITFLEET_WEB_LISTEN", default_value = DEFAULT_WEB_LISTEN)]
    pub web_listen: String,
    /// How often to fetch the repository when no webhook or filesystem event arrives.
    #[arg(long, env = "GITFLEET_POLL_INTERVAL", default_value = DEFAULT_POLL_INTERVAL)]
    pub poll_interval: String,
    /// The URL collectors reach the collector port at, such as https://fleet.example.com:4320.
    /// Install files and token-rotation offers use it for fleets without `[install].endpoint`.
    #[arg(long, env = "GITFLEET_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// A directory of otelcol-contrib and opampsupervisor release files (with their
    /// checksums files) to put into the offline install bundles.
    #[arg(long, env = "GITFLEET_ARTIFACTS_DIR")]
    pub artifacts_dir: Option<PathBuf>,
    /// Secret that POST /hooks/git deliveries must be signed with (GitHub, Gitea) or carry
    /// (GitLab). Without it, any POST triggers a fetch. Visible to other users in `ps`:
    /// prefer --webhook-secret-file or the variable.
    #[arg(long, env = "GITFLEET_WEBHOOK_SECRET", hide_env_values = true, conflicts_with = "webhook_secret_file")]
    pub webhook_secret: Option<String>,
    /// A file holding the webhook secret (one line; a trailing newline is ignored).
    #[arg(long, env = "GITFLEET_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// The orphan branch fleet status is committed to and pushed to the repository's remote.
    #[arg(long, env = "GITFLEET_STATUS_BRANCH", default_value = DEFAULT_STATUS_BRANCH)]
    pub status_branch: String,
    /// Do not write the status branch.
    #[arg(long, env = "GITFLEET_NO_STATUS_BRANCH")]
    pub no_status_branch: bool,
    /// At most one status commit, and one commit status per fleet, per interval.
    #[arg(long, env = "GITFLEET_STATUS_INTERVAL", default_value = DEFAULT_STATUS_INTERVAL)]
    pub status_interval: String,
    /// Post commit statuses to this kind of forge (gitea also means Forgejo).
    #[arg(long, env = "GITFLEET_FORGE", value_enum, requires_all = ["forge_url", "forge_token_file"])]
    pub forge: Option<crate::forge::ForgeKind>,
    /// The config repository's web address on the forge, like https://github.com/acme/fleet-config.
    #[arg(long, env = "GITFLEET_FORGE_URL", requires = "forge")]
    pub forge_url: Option<String>,
    /// A file holding the forge API token (statuses write permission).
    #[arg(long, env = "GITFLEET_FORGE_TOKEN_FILE", requires = "forge")]
    pub forge_token_file: Option<PathBuf>,
    /// The URL people reach the status page at, like https://fleet.example.com; commit
    /// statuses link to the fleet's page there.
    #[arg(long, env = "GITFLEET_STATUS_PAGE_URL")]
    pub status_page_url: Option<String>,
    /// Forget an instance (its record and history) once it has had no connection and sent
    /// nothing for this long; `never` keeps every instance. A forgotten collector that comes
    /// back is simply new again.
    #[arg(long, env = "GITFLEET_FORGET_AFTER", default_value = DEFAULT_FORGET_AFTER)]
    pub forget_after: String,
    /// How long the collectors of a fleet removed from the repository may still connect,
    /// observe only, keeping the config they run: a removal by mistake (a force-push) can be
    /// undone without reinstalling them. `0s` refuses them at once.
    #[arg(long, env = "GITFLEET_REMOVED_FLEET_GRACE", default_value = DEFAULT_REMOVED_FLEET_GRACE)]
    pub removed_fleet_grace: String,
    /// How many new instances (ids gitfleet has not seen) one install token may create at
    /// once: a whole machine's worth of collectors installed together.
    #[arg(long, env = "GITFLEET_NEW_INSTANCES_BURST", default_value_t = DEFAULT_NEW_INSTANCES.burst)]
    pub new_instances_burst: u32,
    /// How many more new instances a token may create each minute once its burst is spent.
    /// Past both, a message that would create one gets 429 (HTTP) or close 1013 (WebSocket).
    #[arg(long, env = "GITFLEET_NEW_INSTANCES_PER_MINUTE", default_value_t = DEFAULT_NEW_INSTANCES.per_minute)]
    pub new_instances_per_minute: u32,
    /// A PEM file of the CA certificates collectors should trust for this server (for a
    /// private CA): put into the install files of fleets that dial wss:// or https://, as
    /// ca.pem and the supervisor's `server.tls.ca_file`.
    #[arg(long, env = "GITFLEET_INSTALL_CA_FILE")]
    pub install_ca_file: Option<PathBuf>,
    /// A PEM certificate chain: both ports then speak only TLS (wss://, https://). Read
    /// again when it changes, so a renewal needs no restart.
    #[arg(long, env = "GITFLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "GITFLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Where gitfleet keeps its state.
#[derive(Clone)]
pub enum Database {
    /// `state.db` in the data directory.
    Sqlite,
    Postgres {
        url: String,
        password: Option<String>,
        /// With `sslmode=require`: the CA certificates to verify the server with, instead
        /// of the system's trust store.
        ca_file: Option<PathBuf>,
    },
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite => f.write_str("Sqlite"),
            // Never the password.
            Self::Postgres { .. } => f.write_str("Postgres"),
        }
    }
}

/// The store `--database` and `--database-password-file` name: SQLite without them.
pub fn database(
    url: Option<String>,
    password_file: Option<&Path>,
    ca_file: Option<&Path>,
) -> Result<Database, SettingsError> {
    let Some(url) = url else { return Ok(Database::Sqlite) };
    let url = url.trim().to_owned();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(SettingsError::BadDatabase(crate::store::postgres::redact(&url)));
    }
    let password = match password_file {
        None => None,
        Some(path) => {
            let password_error =
                |message: String| SettingsError::DatabasePassword { path: path.display().to_string(), message };
            let text = std::fs::read_to_string(path).map_err(|error| password_error(error.to_string()))?;
            let password = text.trim_end_matches(['\n', '\r']);
            if password.is_empty() || password.contains('\n') {
                return Err(password_error("the file must hold the password and nothing else".into()));
            }
            Some(password.to_owned())
        }
    };
    Ok(Database::Postgres { url, password, ca_file: ca_file.map(Path::to_path_buf) })
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
    /// Without a trailing slash.
    pub public_url: Option<String>,
    pub artifacts_dir: Option<PathBuf>,
    /// The `.git` directory of a local repository, watched for ref changes.
    pub local_git_dir: Option<PathBuf>,
    /// `None` when the status branch is off.
    pub status_branch: Option<String>,
    pub status_interval: Duration,
    pub forge: Option<crate::forge::Forge>,
    /// Without a trailing slash.
    pub status_page_url: Option<String>,
    /// TLS on both ports, with the certificate already loaded.
    pub tls: Option<crate::tls::Tls>,
    /// `None` for `never`.
    pub forget_after: Option<Duration>,
    pub removed_fleet_grace: Duration,
    pub new_instances: NewInstanceLimit,
    pub database: Database,
    /// The key token secrets are sealed under in a shared database.
    pub secret_key: Option<Arc<crate::install::seal::SecretKey>>,
    /// This replica's name; `None`: the host name and the collector port.
    pub replica: Option<String>,
    /// The PEM text of `--install-ca-file`.
    pub install_ca: Option<Arc<str>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("--repo must not be empty")]
    EmptyRepo,
    #[error("--repo {0}: no Git repository there (give a URL or the path of a repository)")]
    NotARepository(String),
    #[error("--repo {repo}: {what}: permission denied (the repository must be readable by this user)")]
    UnreadableRepository { repo: String, what: String },
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
    #[error("--webhook-secret-file {path}: {message}")]
    WebhookSecretFile { path: String, message: String },
    #[error("--public-url `{0}` is not an http:// or https:// URL without a path, like https://fleet.example.com:4320")]
    BadPublicUrl(String),
    #[error("--artifacts-dir {path}: {message}")]
    ArtifactsDir { path: String, message: String },
    #[error("--data-dir {path}: {message}")]
    DataDir { path: String, message: String },
    #[error("--status-branch `{0}` is not a valid branch name")]
    BadStatusBranch(String),
    #[error("--status-branch must differ from --branch: gitfleet never writes the branch it reads")]
    StatusBranchIsBranch,
    #[error("--status-interval: {0}")]
    BadStatusInterval(String),
    #[error("--status-page-url `{0}` is not an http:// or https:// URL without a path, like https://fleet.example.com")]
    BadStatusPageUrl(String),
    #[error("--forge-url {0}")]
    BadForgeUrl(#[from] crate::forge::ForgeUrlError),
    #[error("--forge-token-file {path}: {message}")]
    ForgeToken { path: String, message: String },
    #[error("--install-ca-file {0}")]
    InstallCa(String),
    #[error("--forget-after: {0}")]
    BadForgetAfter(String),
    #[error("--database-password-file {path}: {message}")]
    DatabasePassword { path: String, message: String },
    #[error("--database {0}: give a postgres:// or postgresql:// URL")]
    BadDatabase(String),
    #[error("--secret-key-file {0}")]
    SecretKey(#[from] crate::install::seal::KeyError),
    #[error(
        "--database needs --secret-key-file: every replica must be able to serve install files (create the file once with `gitfleet secret-key > FILE` and give it to every replica)"
    )]
    NoSecretKey,
    #[error("--replica-name `{0}`: use 1 to 64 letters, digits, `.`, `-`, `_` or `:`")]
    BadReplicaName(String),
    #[error("--removed-fleet-grace: {0}")]
    BadRemovedFleetGrace(String),
    #[error("--new-instances-burst must be at least 1 (no collector could ever connect)")]
    NoNewInstances,
    #[error("--tls-cert/--tls-key: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl ServeArgs {
    /// `serve --repo <repo> --data-dir <data_dir>` with every other flag at its default
    /// (and no `GITFLEET_*` variable read): for the commands that run a server of their own.
    pub fn new(repo: String, data_dir: PathBuf) -> Self {
        Self {
            repo,
            branch: DEFAULT_BRANCH.to_owned(),
            data_dir,
            database: None,
            database_password_file: None,
            database_ca_file: None,
            secret_key_file: None,
            replica_name: None,
            listen: DEFAULT_LISTEN.to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            web_listen: DEFAULT_WEB_LISTEN.to_owned(),
            poll_interval: DEFAULT_POLL_INTERVAL.to_owned(),
            public_url: None,
            artifacts_dir: None,
            webhook_secret: None,
            webhook_secret_file: None,
            status_branch: DEFAULT_STATUS_BRANCH.to_owned(),
            no_status_branch: false,
            status_interval: DEFAULT_STATUS_INTERVAL.to_owned(),
            forge: None,
            forge_url: None,
            forge_token_file: None,
            status_page_url: None,
            forget_after: DEFAULT_FORGET_AFTER.to_owned(),
            removed_fleet_grace: DEFAULT_REMOVED_FLEET_GRACE.to_owned(),
            new_instances_burst: DEFAULT_NEW_INSTANCES.burst,
            new_instances_per_minute: DEFAULT_NEW_INSTANCES.per_minute,
            install_ca_file: None,
            tls_cert: None,
            tls_key: None,
        }
    }

    pub fn validate(self) -> Result<Settings, SettingsError> {
        let repo = self.repo.trim().to_owned();
        if repo.is_empty() {
            return Err(SettingsError::EmptyRepo);
        }
        let is_url = repo.contains("://") || (repo.contains('@') && repo.contains(':'));
        let local_path = if is_url { repo.strip_prefix("file://") } else { Some(repo.as_str()) };
        if let Some(what) = local_path.and_then(|path| crate::git::unreadable(Path::new(path))) {
            return Err(SettingsError::UnreadableRepository { repo, what });
        }
        let local_git_dir = local_git_dir(&repo);
        // A local repository that is not there at all is a mistake in the settings, unless
        // an earlier run fetched it into the data directory: then the server starts from
        // that, and reports the repository as out of reach until it is back.
        let missing = local_path.is_some_and(|path| !Path::new(path).exists());
        let fetched_before = self.data_dir.join("repo.git").join("HEAD").exists();
        if !(missing && fetched_before) {
            if !is_url && local_git_dir.is_none() {
                return Err(SettingsError::NotARepository(repo));
            }
            if missing {
                return Err(SettingsError::NotARepository(repo));
            }
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
        let webhook_secret = match (self.webhook_secret, &self.webhook_secret_file) {
            (Some(secret), _) if secret.is_empty() => return Err(SettingsError::EmptyWebhookSecret),
            (Some(secret), _) => Some(Arc::from(secret.into_bytes())),
            (None, Some(path)) => {
                let file_error =
                    |message: String| SettingsError::WebhookSecretFile { path: path.display().to_string(), message };
                let text = std::fs::read_to_string(path).map_err(|error| file_error(error.to_string()))?;
                let secret = text.strip_suffix('\n').unwrap_or(&text);
                let secret = secret.strip_suffix('\r').unwrap_or(secret);
                if secret.is_empty() || secret.contains('\n') {
                    return Err(file_error("the file must hold the secret on one line".into()));
                }
                Some(Arc::from(secret.as_bytes()))
            }
            (None, None) => None,
        };
        let public_url = self.public_url.as_deref().map(parse_public_url).transpose()?;
        if let Some(dir) = &self.artifacts_dir {
            std::fs::read_dir(dir).map_err(|error| SettingsError::ArtifactsDir {
                path: dir.display().to_string(),
                message: error.to_string(),
            })?;
        }
        let status_branch = match self.no_status_branch {
            true => None,
            false if !valid_branch(&self.status_branch) => {
                return Err(SettingsError::BadStatusBranch(self.status_branch));
            }
            false if self.status_branch == self.branch => return Err(SettingsError::StatusBranchIsBranch),
            false => Some(self.status_branch),
        };
        let status_interval = parse_duration(&self.status_interval).map_err(SettingsError::BadStatusInterval)?;
        if status_interval < Duration::from_secs(1) {
            return Err(SettingsError::BadStatusInterval(format!("`{}` is shorter than 1s", self.status_interval)));
        }
        let status_page_url = match &self.status_page_url {
            Some(url) => Some(parse_public_url(url).map_err(|_| SettingsError::BadStatusPageUrl(url.clone()))?),
            None => None,
        };
        let forge = match (self.forge, &self.forge_url, &self.forge_token_file) {
            (Some(kind), Some(url), Some(token_file)) => {
                let token_error =
                    |message: String| SettingsError::ForgeToken { path: token_file.display().to_string(), message };
                let token = std::fs::read_to_string(token_file).map_err(|error| token_error(error.to_string()))?;
                let token = token.trim();
                if token.is_empty() || token.contains(char::is_whitespace) {
                    return Err(token_error("the file must hold one token and nothing else".into()));
                }
                Some(crate::forge::Forge::new(kind, url, token)?.linking_to(status_page_url.as_deref()))
            }
            _ => None,
        };
        let forget_after = match self.forget_after.trim() {
            "never" => None,
            text => {
                let after = parse_duration(text).map_err(SettingsError::BadForgetAfter)?;
                if after < Duration::from_secs(1) {
                    return Err(SettingsError::BadForgetAfter(format!("`{text}` is shorter than 1s")));
                }
                Some(after)
            }
        };
        let removed_fleet_grace =
            parse_duration(self.removed_fleet_grace.trim()).map_err(SettingsError::BadRemovedFleetGrace)?;
        if self.new_instances_burst == 0 {
            return Err(SettingsError::NoNewInstances);
        }
        let new_instances =
            NewInstanceLimit { burst: self.new_instances_burst, per_minute: self.new_instances_per_minute };
        let install_ca = match &self.install_ca_file {
            Some(path) => Some(Arc::from(crate::tls::read_ca_bundle(path).map_err(SettingsError::InstallCa)?)),
            None => None,
        };
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::Tls::new(crate::tls::TlsFiles { cert, key })?),
            _ => None,
        };
        let database =
            database(self.database, self.database_password_file.as_deref(), self.database_ca_file.as_deref())?;
        let secret_key = match (&database, &self.secret_key_file) {
            (_, Some(path)) => Some(Arc::new(crate::install::seal::SecretKey::read(path)?)),
            (Database::Postgres { .. }, None) => return Err(SettingsError::NoSecretKey),
            (Database::Sqlite, None) => None,
        };
        let replica = match self.replica_name {
            Some(name) => {
                let usable = (1..=64).contains(&name.len())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c));
                if !usable {
                    return Err(SettingsError::BadReplicaName(name));
                }
                Some(name)
            }
            None => None,
        };
        check_data_dir(&self.data_dir)?;
        Ok(Settings {
            repo,
            branch: self.branch,
            data_dir: self.data_dir,
            database,
            secret_key,
            replica,
            listen,
            max_connections: self.max_connections,
            web_listen,
            poll_interval,
            webhook_secret,
            public_url,
            artifacts_dir: self.artifacts_dir,
            local_git_dir,
            status_branch,
            status_interval,
            forge,
            status_page_url,
            tls,
            forget_after,
            removed_fleet_grace,
            new_instances,
            install_ca,
        })
    }
}

impl Settings {
    /// The OpAMP URL from `--public-url`: `wss://` for `https://`, `ws://` for `http://`.
    pub fn opamp_endpoint(&self) -> Option<String> {
        self.public_url.as_deref().map(opamp_endpoint)
    }
}

/// The OpAMP WebSocket URL under a public base URL (checked by `parse_public_url`).
pub fn opamp_endpoint(public_url: &str) -> String {
    match public_url.strip_prefix("https://") {
        Some(rest) => format!("wss://{rest}/v1/opamp"),
        None => format!("ws://{}/v1/opamp", public_url.trim_start_matches("http://")),
    }
}

/// Checks, without writing anything, that `path` is a directory or can become one: it
/// exists as a directory, or the nearest part of it that exists is one.
fn check_data_dir(path: &Path) -> Result<(), SettingsError> {
    let error = |message: String| SettingsError::DataDir { path: path.display().to_string(), message };
    for existing in path.ancestors() {
        let existing = if existing.as_os_str().is_empty() { Path::new(".") } else { existing };
        match std::fs::metadata(existing) {
            Ok(metadata) if metadata.is_dir() => return Ok(()),
            Ok(_) if existing == path => {
                return Err(error("is a file, not a directory (give a directory; it is created if missing)".into()));
            }
            Ok(_) => {
                return Err(error(format!("{} is a file, so no directory can be made under it", existing.display())));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(error(format!("{}: permission denied", existing.display())));
            }
            Err(e) => return Err(error(format!("{}: {e}", existing.display()))),
        }
    }
    Ok(())
}

/// Creates the data directory (mode 0700 for what gitfleet creates) and checks that this
/// user can write in it. Called once the sockets are bound.
pub fn create_data_dir(path: &Path) -> Result<(), SettingsError> {
    let error = |message: String| SettingsError::DataDir { path: path.display().to_string(), message };
    let denied = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied (it must be writable by this user)".to_owned(),
        _ => e.to_string(),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| error(format!("cannot create it: {}", denied(e))))?;
    let probe = path.join(".write-test");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| error(format!("not writable: {}", denied(e))))
}

/// `http(s)://host[:port]`, with an optional trailing slash removed.
pub fn parse_public_url(url: &str) -> Result<String, SettingsError> {
    let trimmed = url.trim().trim_end_matches('/');
    let bad = || SettingsError::BadPublicUrl(url.to_owned());
    let rest = trimmed.strip_prefix("https://").or_else(|| trimmed.strip_prefix("http://")).ok_or_else(bad)?;
    let valid = !rest.is_empty()
        && rest.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
        && !rest.starts_with([':', '.', '-']);
    if !valid {
        return Err(bad());
    }
    Ok(trimmed.to_owned())
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
    fn public_urls() {
        assert_eq!(
            parse_public_url("https://fleet.example.com:4320/").ok().as_deref(),
            Some("https://fleet.example.com:4320")
        );
        assert_eq!(opamp_endpoint("https://fleet.example.com:4320"), "wss://fleet.example.com:4320/v1/opamp");
        assert_eq!(opamp_endpoint("http://10.0.0.5:4320"), "ws://10.0.0.5:4320/v1/opamp");
        for bad in ["fleet.example.com", "ftp://x", "https://", "https://x/path", "https://u@x", "https://x?y"] {
            assert!(parse_public_url(bad).is_err(), "{bad}");
        }
    }

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
