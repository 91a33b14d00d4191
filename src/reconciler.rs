//! The single writer: one loop owns the desired state, receives `Event`s over one channel,
//! persists what must outlive a restart, and publishes snapshots (`View`) for readers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::install::token::{self, IssuedToken, TokenIndex, TokenState, TokenStatus, TokenText};
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
    /// What is wrong now with work done outside the reconciler (empty when nothing is).
    Problems { source: ProblemSource, problems: Vec<Problem> },
}

/// The tasks that report problems of their own through the reconciler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProblemSource {
    /// Writing install files.
    Install,
    /// Committing and pushing the status branch.
    StatusBranch,
    /// Posting commit statuses to the forge.
    Forge,
    /// Loading a changed TLS certificate.
    Tls,
    /// Writing instances and their histories to the store.
    Store,
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
    /// Each fleet's install tokens, and the index that authenticates collectors.
    pub fleet_tokens: Arc<BTreeMap<String, FleetTokens>>,
    pub tokens: Arc<TokenIndex>,
    /// Token problems that do not depend on the clock (those are added by `problems`).
    pub token_problems: Vec<Problem>,
    /// What the install writer, the status branch and the forge poster last reported.
    pub task_problems: BTreeMap<ProblemSource, Vec<Problem>>,
    /// Fetches attempted since the start, and the Unix time of the last one.
    pub fetches: u64,
    /// Fetches that failed, reconciles run, and reconciles that found errors, since the start.
    pub fetch_errors: u64,
    pub reconciles: u64,
    pub reconcile_errors: u64,
    pub last_fetched_at: Option<i64>,
}

/// One fleet's install tokens as readers need them.
#[derive(Clone, Debug, Default)]
pub struct FleetTokens {
    /// Newest first: the first is the current token.
    pub statuses: Vec<TokenStatus>,
    /// The current token's text, read back from its token file: for install files and
    /// connection-settings offers. Never shown.
    pub text: Option<Arc<TokenText>>,
}

impl FleetTokens {
    pub fn current(&self) -> Option<&TokenStatus> {
        self.statuses.first()
    }
}

/// A current token expiring sooner than this is a warning.
const EXPIRY_WARNING_SECONDS: i64 = 14 * 24 * 3600;

impl View {
    /// Repository problems plus problems of gitfleet itself, errors first.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self
            .fetch_problem
            .iter()
            .chain(&self.store_problem)
            .chain(&self.token_problems)
            .chain(self.task_problems.values().flatten())
            .cloned()
            .collect();
        problems.extend(self.token_deadlines(crate::time::now_unix()));
        if let Some(desired) = &self.desired {
            problems.extend(desired.problems.iter().cloned());
        }
        problems.sort_by_key(|p| p.severity);
        problems
    }

    /// Current tokens that have expired or expire soon: collectors are, or will be, refused.
    fn token_deadlines(&self, now: i64) -> Vec<Problem> {
        let mut problems = Vec::new();
        for (fleet, tokens) in self.fleet_tokens.iter() {
            let Some(current) = tokens.current() else { continue };
            let Some(expires_at) = current.expires_at else { continue };
            let file = format!("fleets/{fleet}.toml");
            let id = &current.token.id;
            let when = crate::time::rfc3339(expires_at);
            if current.state(now) == TokenState::Expired {
                problems.push(Problem::error(
                    file,
                    None,
                    format!("install token {id} expired at {when}: collectors are refused; bump `rotate` to issue a new token"),
                ));
            } else if expires_at - now < EXPIRY_WARNING_SECONDS && current.state(now) == TokenState::Active {
                problems.push(Problem::warning(
                    file,
                    None,
                    format!("install token {id} expires at {when}; bump `rotate` to issue a new token before then"),
                ));
            }
        }
        problems
    }
}

pub struct Reconciler {
    store: Arc<dyn Store>,
    data_dir: PathBuf,
    /// Every token ever issued, by fleet (including fleets since removed), oldest first.
    issued: BTreeMap<String, Vec<IssuedToken>>,
    /// The newest token's text of each fleet whose token file gitfleet could read back.
    texts: BTreeMap<String, Arc<TokenText>>,
    seen: Arc<BTreeMap<String, SeenVersion>>,
    last_good: Arc<BTreeMap<String, LastGoodFleet>>,
    /// Fleets that were removed (their token files with them): one that comes back gets a
    /// new token rather than its old one.
    removed: std::collections::BTreeSet<String>,
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
        let mut issued: BTreeMap<String, Vec<IssuedToken>> = BTreeMap::new();
        for token in tokens {
            issued.entry(token.fleet.clone()).or_default().push(token);
        }
        let reading_dir = data_dir.clone();
        let newest: Vec<IssuedToken> = issued.values().filter_map(|tokens| tokens.last().cloned()).collect();
        let texts = tokio::task::spawn_blocking(move || read_token_texts(&reading_dir, &newest))
            .await
            .expect("reading token files does not panic");
        // Removed before this start: tokens, but neither a last good state nor a token file.
        let removed = issued
            .keys()
            .filter(|fleet| !last_good.contains_key(*fleet) && !texts.contains_key(*fleet))
            .cloned()
            .collect();
        Ok(Self { store, data_dir, issued, texts, seen: Arc::new(seen), last_good: Arc::new(last_good), removed, view })
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
            let is_fetch = !matches!(event, Event::Problems { .. });
            if is_fetch {
                let now = crate::time::now_unix();
                self.view.send_modify(|view| {
                    let view = Arc::make_mut(view);
                    view.fetches += 1;
                    view.last_fetched_at = Some(now);
                });
            }
            match event {
                Event::RepoRead(snapshot) => self.reconcile(*snapshot).await,
                Event::RepoUnreachable { message } => {
                    let problem = Problem::general(Severity::Error, message);
                    self.view.send_modify(|view| {
                        let view = Arc::make_mut(view);
                        view.fetch_problem = Some(problem);
                        view.fetch_errors += 1;
                    });
                }
                Event::RepoReachable => self.view.send_modify(|view| Arc::make_mut(view).fetch_problem = None),
                Event::Problems { source, problems } => {
                    self.view.send_if_modified(|view| {
                        if view.task_problems.get(&source).map_or(problems.is_empty(), |p| *p == problems) {
                            return false;
                        }
                        Arc::make_mut(view).task_problems.insert(source, problems);
                        true
                    });
                }
            }
        }
        info!("reconciler stopped");
    }

    async fn reconcile(&mut self, snapshot: RepoSnapshot) {
        let started = Instant::now();
        let previous = self.view.borrow().desired.clone();
        let previous_fleets: Option<Vec<String>> = previous.as_ref().map(|p| p.fleets.keys().cloned().collect());
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

        // Fleets removed by this commit lose their token files with their install files;
        // fleets that were removed and are back get a new token.
        if let Some(previous) = &previous_fleets {
            let exists = |name: &String| {
                compiled.desired.fleets.contains_key(name) || compiled.desired.unresolved.contains(name)
            };
            for name in previous.iter().filter(|name| !exists(name)) {
                self.texts.remove(name);
                self.removed.insert(name.clone());
            }
        }
        let returning: Vec<String> =
            compiled.desired.fleets.keys().filter(|name| self.removed.contains(*name)).cloned().collect();
        if let Err(store_error) = self.persist(&compiled).await {
            error!(error = %store_error, commit = %compiled.desired.commit, "cannot persist state; keeping the last reconciled state");
            let problem = Problem::general(
                Severity::Error,
                format!("{store_error}; gitfleet keeps serving the last reconciled state"),
            );
            self.view.send_modify(|view| {
                let view = Arc::make_mut(view);
                view.store_problem = Some(problem);
                view.reconciles += 1;
                view.reconcile_errors += 1;
            });
            return;
        }

        let desired = compiled.desired;
        let (token_texts, token_problem) = match self.issue_tokens(&desired, &returning).await {
            Ok(texts) => (texts, None),
            Err(problem) => (Vec::new(), Some(problem)),
        };
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let has_errors = desired.error_count() > 0 || token_problem.is_some();
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
        let (fleet_tokens, token_problems) = self.fleet_tokens(&desired);
        let index = TokenIndex::new(fleet_tokens.values().flat_map(|tokens| tokens.statuses.iter().cloned()));
        let tokens = if *self.view.borrow().tokens == index { None } else { Some(Arc::new(index)) };
        let now = crate::time::now_unix();
        self.view.send_modify(|view| {
            let view = Arc::make_mut(view);
            view.desired = Some(Arc::new(desired));
            view.reconcile_micros = micros;
            view.reconciles += 1;
            view.reconcile_errors += u64::from(has_errors);
            view.store_problem = token_problem;
            if let Some(tokens) = tokens {
                view.tokens = tokens;
            }
            view.fleet_tokens = Arc::new(fleet_tokens);
            view.token_problems = token_problems;
            // The snapshot was just fetched and read, so the repository is reachable.
            view.fetch_problem = None;
            if changed || view.reconciled_at.is_none() {
                view.reconciled_at = Some(now);
            }
        });
        self.write_token_files(token_texts).await;
    }

    /// Issues a token to every fleet that needs one (new, rotated, or its newest token
    /// revoked) and remembers its hash. Returns the texts, for the operator's token files,
    /// which are written once the index that accepts them is published (`write_token_files`).
    async fn issue_tokens(
        &mut self,
        desired: &desired::DesiredState,
        returning: &[String],
    ) -> Result<Vec<(String, Arc<TokenText>)>, Problem> {
        let now = crate::time::now_unix();
        let mut texts = Vec::new();
        for fleet in desired.fleets.values() {
            let policy = &fleet.spec.token;
            let tokens = self.issued.get(fleet.name()).map(Vec::as_slice).unwrap_or_default();
            let reason = match returning.iter().any(|name| name == fleet.name()) {
                true => Some(token::IssueReason::Returned),
                false => token::needs_token(tokens, policy),
            };
            let Some(reason) = reason else { continue };
            self.removed.remove(fleet.name());
            let (text, issued) = token::issue(fleet.name(), now, policy.rotate)
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
            info!(fleet = %issued.fleet, token = %issued.id, reason = ?reason, "issued install token");
            let text = Arc::new(text);
            self.texts.insert(issued.fleet.clone(), Arc::clone(&text));
            texts.push((issued.fleet.clone(), text));
            self.issued.entry(issued.fleet.clone()).or_default().push(issued);
        }
        Ok(texts)
    }

    /// Each fleet's tokens under its current policy, and what is wrong with them.
    fn fleet_tokens(&self, desired: &desired::DesiredState) -> (BTreeMap<String, FleetTokens>, Vec<Problem>) {
        let mut problems = Vec::new();
        let mut fleets = BTreeMap::new();
        for fleet in desired.fleets.values() {
            let Some(tokens) = self.issued.get(fleet.name()) else { continue };
            let newest = tokens.last().expect("fleets in `issued` have a token");
            let policy = &fleet.spec.token;
            if policy.rotate < newest.rotation {
                problems.push(Problem::warning(
                    &fleet.spec.file,
                    None,
                    format!(
                        "`rotate = {}` is lower than {}, the rotation of the current token {}; tokens rotate only when `rotate` goes up",
                        policy.rotate, newest.rotation, newest.id
                    ),
                ));
            }
            let text = self.texts.get(fleet.name()).cloned();
            if text.is_none() {
                problems.push(Problem::error(
                    &fleet.spec.file,
                    None,
                    format!(
                        "the token file of install token {} is missing or does not match it, so install files and rotation offers cannot be made; bump `rotate` to issue a new token",
                        newest.id
                    ),
                ));
            }
            fleets.insert(fleet.name().to_owned(), FleetTokens { statuses: token::statuses(tokens, policy), text });
        }
        (fleets, problems)
    }

    /// Writes the operator's token files for freshly issued tokens.
    async fn write_token_files(&self, texts: Vec<(String, Arc<TokenText>)>) {
        for (fleet, text) in texts {
            let data_dir = self.data_dir.clone();
            let writing = fleet.clone();
            let written = tokio::task::spawn_blocking(move || token::write_token_file(&data_dir, &writing, &text))
                .await
                .expect("writing a token file does not panic");
            match written {
                Ok(path) => info!(fleet = %fleet, path = %path.display(), "wrote install token file"),
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

/// Reads back the token files of the newest tokens; a missing or foreign file yields nothing.
fn read_token_texts(data_dir: &std::path::Path, newest: &[IssuedToken]) -> BTreeMap<String, Arc<TokenText>> {
    newest
        .iter()
        .filter_map(|token| {
            let text = token::read_current(data_dir, token);
            if text.is_none() {
                warn!(fleet = %token.fleet, token = %token.id, "the token file is missing or does not hold the current token");
            }
            Some((token.fleet.clone(), Arc::new(text?)))
        })
        .collect()
}
