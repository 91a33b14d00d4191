//! The single writer: one loop owns the desired state, receives `Event`s over one channel,
//! persists what must outlive a restart, and publishes snapshots (`View`) for readers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::install::token::{self, IssuedToken, TokenIndex, TokenText};
use crate::problem::{Problem, Severity};
use crate::repo::RepoSnapshot;
use crate::repo::desired::{self, DesiredState, LastGoodFleet, SeenVersion};
use crate::store::{ReconcileRecord, Store, StoreError};

/// Everything the reconciler reacts to.
#[derive(Debug)]
pub enum Event {
    /// The watcher read a new snapshot of the repository.
    RepoRead(Box<RepoSnapshot>),
    /// The watcher could not fetch or read the repository.
    RepoUnreachable { message: String },
    /// A fetch succeeded and nothing changed.
    RepoReachable,
}

/// What readers (the web API, later the OpAMP server) see. Replaced whole on each change.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// `None` until the first reconcile.
    pub desired: Option<Arc<DesiredState>>,
    /// Unix seconds of the last reconcile that changed the desired state.
    pub reconciled_at: Option<i64>,
    pub reconcile_micros: u64,
    /// Why the repository cannot be fetched right now, if it cannot.
    pub fetch_problem: Option<Problem>,
    /// Why the state database cannot be written right now, if it cannot.
    pub store_problem: Option<Problem>,
    /// Each fleet's current install token (no secrets), and the index that authenticates
    /// collectors.
    pub fleet_tokens: Arc<BTreeMap<String, IssuedToken>>,
    pub tokens: Arc<TokenIndex>,
    /// Fetches attempted since the start, and the Unix time of the last one.
    pub fetches: u64,
    pub last_fetched_at: Option<i64>,
}

impl View {
    /// Repository problems plus problems of gitfleet itself, errors first.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self.fetch_problem.iter().chain(&self.store_problem).cloned().collect();
        if let Some(desired) = &self.desired {
            problems.extend(desired.problems.iter().cloned());
        }
        problems
    }
}

pub struct Reconciler {
    store: Arc<dyn Store>,
    data_dir: PathBuf,
    /// The newest token of each fleet ever issued, including fleets since removed.
    issued: BTreeMap<String, IssuedToken>,
    seen: Arc<BTreeMap<String, SeenVersion>>,
    last_good: Arc<BTreeMap<String, LastGoodFleet>>,
    view: watch::Sender<Arc<View>>,
}

impl Reconciler {
    /// Loads what the store remembers. Blocking work runs off the runtime.
    pub async fn load(
        store: Arc<dyn Store>,
        data_dir: PathBuf,
        view: watch::Sender<Arc<View>>,
    ) -> Result<Self, StoreError> {
        let loading = Arc::clone(&store);
        let (seen, last_good, tokens) = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((loading.seen_versions()?, loading.last_good_fleets()?, loading.tokens()?))
        })
        .await
        .expect("store loading does not panic")?;
        info!(versions = seen.len(), fleets = last_good.len(), tokens = tokens.len(), "loaded state");
        // Oldest first, so the newest token of each fleet wins.
        let issued = tokens.into_iter().map(|token| (token.fleet.clone(), token)).collect();
        Ok(Self { store, data_dir, issued, seen: Arc::new(seen), last_good: Arc::new(last_good), view })
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<Event>, cancel: CancellationToken) {
        loop {
            let event = tokio::select! {
                () = cancel.cancelled() => break,
                event = events.recv() => match event {
                    Some(event) => event,
                    None => break,
                },
            };
            let now = crate::time::now_unix();
            self.view.send_modify(|view| {
                let view = Arc::make_mut(view);
                view.fetches += 1;
                view.last_fetched_at = Some(now);
            });
            match event {
                Event::RepoRead(snapshot) => self.reconcile(*snapshot).await,
                Event::RepoUnreachable { message } => {
                    let problem = Problem::general(Severity::Error, message);
                    self.view.send_modify(|view| Arc::make_mut(view).fetch_problem = Some(problem));
                }
                Event::RepoReachable => self.view.send_modify(|view| Arc::make_mut(view).fetch_problem = None),
            }
        }
        info!("reconciler stopped");
    }

    async fn reconcile(&mut self, snapshot: RepoSnapshot) {
        let started = Instant::now();
        let previous = self.view.borrow().desired.clone();
        let seen = Arc::clone(&self.seen);
        let last_good = Arc::clone(&self.last_good);
        let compiled = tokio::task::spawn_blocking(move || {
            desired::compile(
                &snapshot,
                desired::Memory { seen: Some(&seen), last_good: Some(&last_good), previous: previous.as_deref() },
            )
        })
        .await
        .expect("compile is pure and does not panic");

        if let Err(store_error) = self.persist(&compiled).await {
            error!(error = %store_error, commit = %compiled.desired.commit, "cannot persist state; keeping the last reconciled state");
            let problem = Problem::general(
                Severity::Error,
                format!("{store_error}; gitfleet keeps serving the last reconciled state"),
            );
            self.view.send_modify(|view| Arc::make_mut(view).store_problem = Some(problem));
            return;
        }

        let desired = compiled.desired;
        let (token_texts, token_problem) = match self.issue_missing_tokens(&desired).await {
            Ok(texts) => (texts, None),
            Err(problem) => (Vec::new(), Some(problem)),
        };
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let changed = {
            let view = self.view.borrow();
            match &view.desired {
                None => true,
                Some(old) => old.commit != desired.commit || old.problems != desired.problems,
            }
        };
        if changed {
            for problem in desired.problems.iter().filter(|p| p.is_error()) {
                warn!(commit = %desired::short(&desired.commit), problem = %problem, "repository problem");
            }
            info!(
                commit = %desired::short(&desired.commit),
                fleets = desired.fleets.len(),
                configs = desired.configs.len(),
                errors = desired.error_count(),
                micros,
                "reconciled"
            );
            let record = ReconcileRecord {
                commit: desired.commit.clone(),
                branch: desired.branch.clone(),
                reconciled_at: crate::time::now_unix(),
                duration_micros: micros,
                problems: desired.problems.clone(),
            };
            let store = Arc::clone(&self.store);
            let recorded = tokio::task::spawn_blocking(move || store.record_reconcile(&record))
                .await
                .expect("store does not panic");
            if let Err(store_error) = recorded {
                warn!(error = %store_error, "cannot record reconcile history");
            }
        }
        let current: BTreeMap<String, IssuedToken> = self
            .issued
            .iter()
            .filter(|(fleet, _)| desired.fleets.contains_key(*fleet))
            .map(|(fleet, token)| (fleet.clone(), token.clone()))
            .collect();
        let tokens = Arc::new(TokenIndex::new(current.values().cloned()));
        let current_tokens = Arc::new(current);
        let now = crate::time::now_unix();
        self.view.send_modify(|view| {
            let view = Arc::make_mut(view);
            view.desired = Some(Arc::new(desired));
            view.reconcile_micros = micros;
            view.store_problem = token_problem;
            view.tokens = tokens;
            view.fleet_tokens = current_tokens;
            // The snapshot was just fetched and read, so the repository is reachable.
            view.fetch_problem = None;
            if changed || view.reconciled_at.is_none() {
                view.reconciled_at = Some(now);
            }
        });
        self.write_token_files(token_texts).await;
    }

    /// Gives every fleet that has none an install token and remembers its hash. Returns the
    /// texts, for the operator's token files, which are written once the index that accepts
    /// them is published (`write_token_files`).
    async fn issue_missing_tokens(
        &mut self,
        desired: &desired::DesiredState,
    ) -> Result<Vec<(String, TokenText)>, Problem> {
        let now = crate::time::now_unix();
        let mut texts = Vec::new();
        for fleet in desired.fleets.values() {
            if self.issued.contains_key(fleet.name()) {
                continue;
            }
            let lifetime = fleet.spec.token.expires.map(|d| d.as_secs());
            let (text, issued) = token::issue(fleet.name(), now, lifetime, fleet.spec.token.rotate)
                .map_err(|error| Problem::general(Severity::Error, error.to_string()))?;
            let store = Arc::clone(&self.store);
            let saving = issued.clone();
            let saved = tokio::task::spawn_blocking(move || store.save_token(&saving))
                .await
                .expect("saving a token does not panic");
            if let Err(store_error) = saved {
                error!(fleet = %issued.fleet, error = %store_error, "cannot issue install token");
                return Err(Problem::general(Severity::Error, store_error.to_string()));
            }
            texts.push((issued.fleet.clone(), text));
            self.issued.insert(issued.fleet.clone(), issued);
        }
        Ok(texts)
    }

    /// Writes the operator's token files for freshly issued tokens.
    async fn write_token_files(&self, texts: Vec<(String, TokenText)>) {
        for (fleet, text) in texts {
            let data_dir = self.data_dir.clone();
            let writing = fleet.clone();
            let written = tokio::task::spawn_blocking(move || token::write_token_file(&data_dir, &writing, &text))
                .await
                .expect("writing a token file does not panic");
            match written {
                Ok(path) => info!(fleet = %fleet, path = %path.display(), "issued install token"),
                Err(io_error) => {
                    let message = format!("cannot write the token file of fleet `{fleet}`: {io_error}");
                    error!(fleet = %fleet, error = %message, "cannot write install token file");
                    let problem = Problem::general(Severity::Error, message);
                    self.view.send_modify(|view| Arc::make_mut(view).store_problem = Some(problem));
                }
            }
        }
    }

    /// Remembers new versions and last good fleets before they are served.
    async fn persist(&mut self, compiled: &desired::Compiled) -> Result<(), StoreError> {
        let newly_seen = compiled.newly_seen.clone();
        let last_good = (compiled.desired.last_good != *self.last_good).then(|| compiled.desired.last_good.clone());
        if newly_seen.is_empty() && last_good.is_none() {
            return Ok(());
        }
        let store = Arc::clone(&self.store);
        let to_save = last_good.clone();
        let saving = newly_seen.clone();
        tokio::task::spawn_blocking(move || {
            if !saving.is_empty() {
                store.remember_versions(&saving)?;
            }
            if let Some(fleets) = &to_save {
                store.save_last_good_fleets(fleets)?;
            }
            Ok::<_, StoreError>(())
        })
        .await
        .expect("store does not panic")?;
        if !newly_seen.is_empty() {
            let seen = Arc::make_mut(&mut self.seen);
            for version in newly_seen {
                seen.entry(version.tag.clone()).or_insert(version);
            }
        }
        if let Some(fleets) = last_good {
            self.last_good = Arc::new(fleets);
        }
        Ok(())
    }
}
