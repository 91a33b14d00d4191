//! `gitfleet install-files <fleet> --out DIR`: a fleet's install files written on the
//! server host from the server's own state (its data directory), so they match what
//! `/v1/install/` serves.

use std::path::PathBuf;

use crate::install::files::{self, InstallSpec};
use crate::install::{artifacts, token};
use crate::settings::Database;
use crate::store::Store;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;

#[derive(Clone, Debug, clap::Args)]
pub struct InstallFilesArgs {
    /// The fleet (the stem of its `fleets/<fleet>.toml`).
    pub fleet: String,
    /// Where to write the files (created if missing, mode 0700).
    #[arg(long)]
    pub out: PathBuf,
    /// The data directory of `gitfleet serve`, which holds the fleet's token.
    #[arg(long, env = "GITFLEET_DATA_DIR", default_value = "./.gitfleet")]
    pub data_dir: PathBuf,
    /// The PostgreSQL database of `gitfleet serve --database`, if it keeps its state there.
    #[arg(long, env = "GITFLEET_DATABASE")]
    pub database: Option<String>,
    /// A file holding the PostgreSQL password and nothing else.
    #[arg(long, env = "GITFLEET_DATABASE_PASSWORD_FILE", requires = "database")]
    pub database_password_file: Option<PathBuf>,
    /// The CA certificates of the database server, as given to `gitfleet serve`.
    #[arg(long, env = "GITFLEET_DATABASE_CA_FILE", requires = "database")]
    pub database_ca_file: Option<PathBuf>,
    /// The URL collectors reach the collector port at, for a fleet without
    /// `[install].endpoint`. By default, the endpoint the server wrote the fleet's files with.
    #[arg(long, env = "GITFLEET_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Release files to put into the offline bundles (as given to `gitfleet serve`).
    #[arg(long, env = "GITFLEET_ARTIFACTS_DIR")]
    pub artifacts_dir: Option<PathBuf>,
    /// CA certificates collectors should trust. By default, those the server put in the
    /// fleet's files.
    #[arg(long, env = "GITFLEET_INSTALL_CA_FILE")]
    pub install_ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Setting(#[from] crate::settings::SettingsError),
    #[error("no gitfleet state in {0}: run `gitfleet serve --data-dir {0}` first")]
    NoState(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("gitfleet has never served a fleet `{0}` (see `gitfleet check`)")]
    UnknownFleet(String),
    #[error("fleet `{0}` has no install token yet: `gitfleet serve` issues one when it first reads the fleet")]
    NoToken(String),
    #[error(
        "the token file of fleet `{fleet}` is missing or does not hold its current token {id}; bump `rotate` in its fleet file to issue a new one"
    )]
    TokenFile { fleet: String, id: String },
    #[error(
        "fleet `{0}` names no `[install].endpoint` and the server has not written its install files yet: give --public-url"
    )]
    NoEndpoint(String),
    #[error("{0}")]
    Artifacts(String),
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// Writes the set and returns the paths written.
pub fn run(args: &InstallFilesArgs) -> Result<Vec<PathBuf>, ExportError> {
    let public_url = args.public_url.as_deref().map(crate::settings::parse_public_url).transpose()?;
    let ca = match &args.install_ca_file {
        Some(path) => Some(crate::tls::read_ca_bundle(path).map_err(crate::settings::SettingsError::InstallCa)?),
        None => None,
    };
    let store: std::sync::Arc<dyn Store> = match crate::settings::database(
        args.database.clone(),
        args.database_password_file.as_deref(),
        args.database_ca_file.as_deref(),
    )? {
        Database::Sqlite => {
            let database = args.data_dir.join("state.db");
            if !database.is_file() {
                return Err(ExportError::NoState(args.data_dir.display().to_string()));
            }
            SqliteStore::open(&database)?
        }
        // Read only, beside the server that serves from it.
        Database::Postgres { url, password, ca_file } => {
            PostgresStore::open_with(&url, password.as_deref(), ca_file.as_deref())?
        }
    };
    let last_good = store.last_good_fleets()?;
    let source = last_good.get(&args.fleet).ok_or_else(|| ExportError::UnknownFleet(args.fleet.clone()))?;
    let file = format!("fleets/{}.toml", args.fleet);
    let spec = crate::repo::manifest::parse_fleet(&args.fleet, &file, &source.source)
        .0
        .ok_or_else(|| ExportError::UnknownFleet(args.fleet.clone()))?;
    let newest = store
        .tokens()?
        .into_iter()
        .rfind(|t| t.fleet == args.fleet)
        .ok_or_else(|| ExportError::NoToken(args.fleet.clone()))?;
    let text = token::read_current(&args.data_dir, &newest)
        .ok_or_else(|| ExportError::TokenFile { fleet: args.fleet.clone(), id: newest.id.clone() })?;
    // The fleet's own endpoint, else --public-url, else the one the server wrote the fleet's
    // files with (it knows its --public-url).
    let served_dir = args.data_dir.join("install").join(&args.fleet);
    let endpoint = spec
        .install
        .endpoint
        .clone()
        .or_else(|| public_url.as_deref().map(crate::settings::opamp_endpoint))
        .or_else(|| files::written_endpoint(&served_dir))
        .ok_or_else(|| ExportError::NoEndpoint(args.fleet.clone()))?;
    // Likewise the CA the server put in the fleet's files.
    let ca = ca.or_else(|| std::fs::read_to_string(served_dir.join("ca.pem")).ok());
    let (collector_version, supervisor_version) = files::versions(&spec.install);
    let install = InstallSpec {
        fleet: &args.fleet,
        token: &text,
        endpoint: &endpoint,
        collector_version: &collector_version,
        supervisor_version: &supervisor_version,
        ca: ca.as_deref(),
        server_releases: &[],
        access: &spec.install.access,
    };
    let included = match &args.artifacts_dir {
        Some(dir) => match artifacts::for_bundles(dir, &install) {
            (_, Some(refused)) => return Err(ExportError::Artifacts(refused)),
            (included, None) => included,
        },
        None => Vec::new(),
    };
    // As the server writes it: a server with the same --artifacts-dir serves these.
    let served: Vec<artifacts::Artifact> = included.iter().flat_map(|(_, found)| found.iter().cloned()).collect();
    let install = InstallSpec { server_releases: &served, ..install };
    let rendered = files::render(&install);
    files::write_set(&args.out, &install, &rendered, &included, None)
        .map_err(|source| ExportError::Write { path: args.out.display().to_string(), source })?;
    let mut written: Vec<PathBuf> = rendered.iter().map(|file| args.out.join(file.name)).collect();
    written.extend(files::ARCHES.iter().map(|arch| args.out.join(files::bundle_name(&args.fleet, arch))));
    Ok(written)
}
