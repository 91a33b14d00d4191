//! The single writer: one loop owns the desired state, receives `Event`s over one channel,
//! persists what must outlive a restart, and publishes snapshots (`View`) for readers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::install::seal::SecretKey;
use crate::install::token::{self, IssuedToken, TokenIndex, TokenState, TokenStatus, TokenText};
use crate::problem::{Problem, Severity};
use crate::repo::RepoSnapshot;
use crate::repo::desired::published::Published;
use crate::repo::desired::{self, DesiredState, LastGoodFleet, SeenVersion};
use crate::store::{ReconcileRecord, RemovedFleet, Store, StoreError};

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
    /// The leader announced a change, or it is time to look again: a follower reads what
    /// the leader published.
    Followed,
    /// This replica became the leader.
    Lead,
    /// Another replica took the lead: this one follows it from now on.
    Deposed,
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
    /// Writing the operator's token files.
    TokenFiles,
    /// What the leader reports of its own work, as a follower sees it.
    Leader,
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
    /// Each fleet's install tokens, and the index that authenticates collectors (which
    /// also holds the tokens of fleets in `removed_fleets`).
    pub fleet_tokens: Arc<BTreeMap<String, FleetTokens>>,
    /// Fleets removed from the repository whose collectors may still connect.
    pub removed_fleets: Arc<BTreeMap<String, RemovedFleet>>,
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
    /// This replica's name, whether it leads, and which replica does as far as it knows.
    pub replica: String,
    pub leading: bool,
    pub leader: Option<String>,
}

/// What the leader publishes for the other replicas (JSON in the store): the desired state
/// and what a reader of any replica should see of the leader's work.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaderState {
    pub replica: String,
    pub desired: Published,
    pub reconciled_at: Option<i64>,
    pub reconcile_micros: u64,
    /// Fetching, writing, the status branch, commit statuses: the leader's own problems.
    pub problems: Vec<Problem>,
    /// The current token of each fleet and the fleets being removed: a change that leaves
    /// the desired state as it was (a removal's end) still reaches the followers.
    pub tokens: Vec<String>,
    pub removed: Vec<String>,
}

impl LeaderState {
    /// What to publish of the leader's `view`; nothing before its first reconcile.
    pub fn of(view: &View, replica: &str) -> Option<Self> {
        let desired = view.desired.as_deref()?;
        let own = [ProblemSource::StatusBranch, ProblemSource::Forge];
        Some(Self {
            replica: replica.to_owned(),
            desired: Published::of(desired),
            reconciled_at: view.reconciled_at,
            reconcile_micros: view.reconcile_micros,
            problems: view
                .fetch_problem
                .iter()
                .chain(&view.store_problem)
                .chain(own.iter().filter_map(|source| view.task_problems.get(source)).flatten())
                .cloned()
                .collect(),
            tokens: view.fleet_tokens.values().filter_map(|t| Some(t.current()?.token.id.clone())).collect(),
            removed: view.removed_fleets.keys().cloned().collect(),
        })
    }
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

/// What the reconciler publishes of tokens, worked out before the view is modified.
struct TokenView {
    fleet_tokens: Arc<BTreeMap<String, FleetTokens>>,
    problems: Vec<Problem>,
    /// `None` when the index is unchanged.
    index: Option<Arc<TokenIndex>>,
    removed: Arc<BTreeMap<String, RemovedFleet>>,
}

impl TokenView {
    fn publish(self, view: &mut View) {
        view.fleet_tokens = self.fleet_tokens;
        view.token_problems = self.problems;
        if let Some(index) = self.index {
            view.tokens = index;
        }
        view.removed_fleets = self.removed;
    }
}

/// Sleeps until the Unix second `at` (not at all without one).
async fn sleep_until_unix(at: Option<i64>) {
    let Some(at) = at else { return std::future::pending().await };
    let wait = at.saturating_sub(crate::time::now_unix()).max(0);
    tokio::time::sleep(std::time::Duration::from_secs(u64::try_from(wait).unwrap_or(0))).await;
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
        let now = crate::time::now_unix();
        problems.extend(self.token_deadlines(now));
        problems.extend(self.removal_deadlines(now));
        if let Some(desired) = &self.desired {
            problems.extend(desired.problems.iter().cloned());
        }
        problems.sort_by_key(|p| p.severity);
        problems
    }

    /// Removed fleets whose collectors are still let in, and until when.
    fn removal_deadlines(&self, now: i64) -> impl Iterator<Item = Problem> + '_ {
        self.removed_fleets.iter().filter(move |(_, removed)| removed.until > now).map(|(fleet, removed)| {
            Problem::warning(
                format!("fleets/{fleet}.toml"),
                None,
                format!(
                    "fleet `{fleet}` was removed in commit {} at {}: its collectors keep the config they run and may still connect, observe only, until {}; then they are refused. Restore fleets/{fleet}.toml before then to keep them",
                    desired::short(&removed.commit),
                    crate::time::rfc3339(removed.removed_at),
                    crate::time::rfc3339(removed.until),
                ),
            )
        })
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

/// When the next removal that still lets its tokens in ends. One whose end passed while the
/// reconciler was busy with an event is due at once: its token text is still held.
fn next_removal_end<T>(removed: &BTreeMap<String, RemovedFleet>, texts: &BTreeMap<String, T>) -> Option<i64> {
    removed.iter().filter(|(fleet, _)| texts.contains_key(*fleet)).map(|(_, removal)| removal.until).min()
}

pub struct Reconciler {
    store: Arc<dyn Store>,
    /// Every token ever issued, by fleet (including fleets since removed), oldest first.
    issued: BTreeMap<String, Vec<IssuedToken>>,
    /// The newest token's text of each fleet whose token file gitfleet could read back.
    texts: BTreeMap<String, Arc<TokenText>>,
    seen: Arc<BTreeMap<String, SeenVersion>>,
    last_good: Arc<BTreeMap<String, LastGoodFleet>>,
    /// Fleets removed from the repository. Until its `until`, a removed fleet's tokens and
    /// token file are kept, and it keeps them if it comes back; after, one that comes back
    /// gets a new token.
    removed: BTreeMap<String, RemovedFleet>,
    /// How long a removed fleet's tokens stay accepted, in seconds.
    removal_grace: i64,
    /// Newly issued tokens' texts, to be written to their token files in order.
    token_files: mpsc::UnboundedSender<Vec<(String, Arc<TokenText>)>>,
    token_files_written: tokio::task::JoinHandle<()>,
    view: watch::Sender<Arc<View>>,
    /// The key new tokens' texts are sealed under for the other replicas.
    key: Option<Arc<SecretKey>>,
    /// False while another replica leads: then the desired state is what it publishes.
    leading: bool,
    replica: String,
    data_dir: PathBuf,
}

/// How the reconciler starts.
pub struct ReconcilerSettings {
    /// How long a removed fleet's tokens stay accepted.
    pub removal_grace: std::time::Duration,
    pub key: Option<Arc<SecretKey>>,
    pub leading: bool,
    /// This replica's name, in what it publishes.
    pub replica: String,
}

/// What the store remembers, read at a start and when a follower becomes the leader.
struct Memory {
    seen: BTreeMap<String, SeenVersion>,
    last_good: BTreeMap<String, LastGoodFleet>,
    issued: BTreeMap<String, Vec<IssuedToken>>,
    removed: BTreeMap<String, RemovedFleet>,
    texts: BTreeMap<String, Arc<TokenText>>,
    /// Fleets whose text came from the store: their token file is to be written.
    unsealed: Vec<String>,
}

impl Memory {
    async fn read(
        store: &Arc<dyn Store>,
        data_dir: &std::path::Path,
        key: Option<&Arc<SecretKey>>,
    ) -> Result<Self, StoreError> {
        let loading = Arc::clone(store);
        let (seen, last_good, tokens, mut removed) = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((
                loading.seen_versions()?,
                loading.last_good_fleets()?,
                loading.tokens()?,
                loading.removed_fleets()?,
            ))
        })
        .await
        .expect("store loading does not panic")?;
        info!(versions = seen.len(), fleets = last_good.len(), tokens = tokens.len(), "loaded state");
        let issued = by_fleet(tokens);
        let reading_dir = data_dir.to_path_buf();
        let newest = newest_tokens(&issued, &removed);
        let key = key.cloned();
        let (texts, unsealed) =
            tokio::task::spawn_blocking(move || read_token_texts(&reading_dir, &newest, key.as_deref()))
                .await
                .expect("reading token files does not panic");
        // Removed before removals were remembered: tokens, but neither a last good state nor
        // a token file. Long over.
        for fleet in issued.keys() {
            if !last_good.contains_key(fleet) && !texts.contains_key(fleet) && !removed.contains_key(fleet) {
                removed.insert(
                    fleet.clone(),
                    RemovedFleet { removed_at: 0, commit: String::new(), until: 0, tokens: Vec::new() },
                );
            }
        }
        Ok(Self { seen, last_good, issued, removed, texts, unsealed })
    }
}

/// Tokens by fleet, oldest first.
fn by_fleet(tokens: Vec<IssuedToken>) -> BTreeMap<String, Vec<IssuedToken>> {
    let mut issued: BTreeMap<String, Vec<IssuedToken>> = BTreeMap::new();
    for token in tokens {
        issued.entry(token.fleet.clone()).or_default().push(token);
    }
    issued
}

/// Each fleet's newest token, but for fleets whose removal is over.
fn newest_tokens(
    issued: &BTreeMap<String, Vec<IssuedToken>>,
    removed: &BTreeMap<String, RemovedFleet>,
) -> Vec<IssuedToken> {
    let now = crate::time::now_unix();
    issued
        .iter()
        .filter(|(fleet, _)| removed.get(*fleet).is_none_or(|removal| removal.until > now))
        .filter_map(|(_, tokens)| tokens.last().cloned())
        .collect()
}

impl Reconciler {
    /// Loads what the store remembers. Blocking work runs off the runtime. A follower
    /// (`leading` false) serves what the leader publishes until it becomes the leader.
    pub async fn load(
        store: Arc<dyn Store>,
        data_dir: PathBuf,
        settings: ReconcilerSettings,
        view: watch::Sender<Arc<View>>,
    ) -> Result<Self, StoreError> {
        let memory = Memory::read(&store, &data_dir, settings.key.as_ref()).await?;
        let (token_files, to_write) = mpsc::unbounded_channel();
        let token_files_written = tokio::spawn(write_token_files(to_write, data_dir.clone(), view.clone()));
        let unsealed = memory.unsealed.iter().map(|fleet| (fleet.clone(), Arc::clone(&memory.texts[fleet]))).collect();
        let _ = token_files.send(unsealed);
        view.send_modify(|view| {
            let view = Arc::make_mut(view);
            view.replica.clone_from(&settings.replica);
            view.leading = settings.leading;
            view.leader = settings.leading.then(|| settings.replica.clone());
        });
        Ok(Self {
            store,
            issued: memory.issued,
            texts: memory.texts,
            seen: Arc::new(memory.seen),
            last_good: Arc::new(memory.last_good),
            removed: memory.removed,
            removal_grace: i64::try_from(settings.removal_grace.as_secs()).unwrap_or(i64::MAX),
            key: settings.key,
            leading: settings.leading,
            replica: settings.replica,
            data_dir,
            token_files,
            token_files_written,
            view,
        })
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<Event>, cancel: CancellationToken) {
        loop {
            let removal_ends = self.next_removal_end();
            let event = tokio::select! {
                () = cancel.cancelled() => break,
                event = events.recv() => match event {
                    Some(event) => event,
                    None => break,
                },
                () = sleep_until_unix(removal_ends), if removal_ends.is_some() => {
                    self.end_removals();
                    continue;
                }
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
                // A follower's watcher does not run; one that stopped as it lost the lead
                // may still have sent a snapshot.
                Event::RepoRead(_) if !self.leading => {}
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
                Event::Followed => self.follow().await,
                Event::Lead => self.lead().await,
                Event::Deposed => {
                    self.leading = false;
                    self.view.send_modify(|view| {
                        let view = Arc::make_mut(view);
                        view.leading = false;
                        view.leader = None;
                    });
                    warn!(replica = %self.replica, "another replica leads now; following it");
                }
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
        // Token files already issued are written before gitfleet stops.
        drop(self.token_files);
        if let Err(join_error) = self.token_files_written.await {
            error!(error = %join_error, "the token file writer failed");
        }
        info!("reconciler stopped");
    }

    /// A follower's reconcile: the leader's published state, with the versions, tokens and
    /// removals the store holds (the leader wrote them before it published).
    async fn follow(&mut self) {
        if self.leading {
            return;
        }
        let store = Arc::clone(&self.store);
        let known = Arc::clone(&self.seen);
        let read = tokio::task::spawn_blocking(move || {
            let Some(body) = store.published_state()? else { return Ok(None) };
            let state: LeaderState = serde_json::from_str(&body)
                .map_err(|error| StoreError::Corrupt { what: "published state", message: error.to_string() })?;
            let seen = if state.desired.tags().all(|tag| known.contains_key(tag)) {
                None
            } else {
                Some(store.seen_versions()?)
            };
            Ok::<_, StoreError>(Some((state, seen, store.tokens()?, store.removed_fleets()?)))
        })
        .await
        .expect("store reading does not panic");
        let (state, seen, tokens, removed) = match read {
            Ok(Some(read)) => read,
            // Nothing published yet: the leader has not reconciled.
            Ok(None) => return,
            Err(store_error) => {
                warn!(error = %store_error, "cannot read what the leader published; serving what was read before");
                let problem = Problem::general(
                    Severity::Error,
                    format!("{store_error}; this replica serves what it read before"),
                );
                self.view.send_modify(|view| Arc::make_mut(view).store_problem = Some(problem));
                return;
            }
        };
        if let Some(seen) = seen {
            self.seen = Arc::new(seen);
        }
        let desired = match state.desired.desired(&self.seen) {
            Ok(desired) => desired,
            Err(missing) => {
                warn!(error = %missing, "the leader's published state is ahead of the store; waiting");
                return;
            }
        };
        self.issued = by_fleet(tokens);
        self.removed = removed;
        let newest: Vec<IssuedToken> = newest_tokens(&self.issued, &self.removed)
            .into_iter()
            .filter(|token| {
                self.texts.get(&token.fleet).is_none_or(|text| !text.expose().starts_with(&format!("{}.", token.id)))
            })
            .collect();
        if !newest.is_empty() {
            let (dir, key) = (self.data_dir.clone(), self.key.clone());
            let texts = tokio::task::spawn_blocking(move || read_token_texts(&dir, &newest, key.as_deref()))
                .await
                .expect("reading token texts does not panic");
            self.write_unsealed(&texts);
            self.texts.extend(texts.0);
        }
        self.texts.retain(|fleet, _| self.issued.contains_key(fleet));
        self.last_good = Arc::new(desired.last_good.clone());
        let now = crate::time::now_unix();
        let tokens = self.token_view(&desired, now);
        let changed = self.view.borrow().desired.as_ref().is_none_or(|old| old.commit != desired.commit);
        if changed {
            info!(commit = %desired::short(&desired.commit), leader = %state.replica, "following the leader's desired state");
        }
        self.view.send_modify(|view| {
            let view = Arc::make_mut(view);
            tokens.publish(view);
            view.desired = Some(Arc::new(desired));
            view.reconciled_at = state.reconciled_at;
            view.reconcile_micros = state.reconcile_micros;
            view.store_problem = None;
            view.task_problems.insert(ProblemSource::Leader, state.problems);
            view.leader = Some(state.replica);
        });
    }

    /// This replica takes over: what the store remembers becomes its memory, and the
    /// snapshots its watcher reads are reconciled from now on.
    async fn lead(&mut self) {
        match Memory::read(&self.store, &self.data_dir, self.key.as_ref()).await {
            Ok(memory) => {
                self.seen = Arc::new(memory.seen);
                self.last_good = Arc::new(memory.last_good);
                self.issued = memory.issued;
                self.removed = memory.removed;
                self.write_unsealed(&(memory.texts.clone(), memory.unsealed));
                self.texts = memory.texts;
            }
            // What the follower read last stands in; the next reconcile writes what it must.
            Err(store_error) => warn!(error = %store_error, "cannot read the store as the new leader"),
        }
        self.leading = true;
        self.view.send_modify(|view| {
            let view = Arc::make_mut(view);
            view.task_problems.remove(&ProblemSource::Leader);
            view.leading = true;
            view.leader = Some(self.replica.clone());
        });
        info!(replica = %self.replica, "leading: reconciling the repository");
    }

    /// Writes this host's token files of texts that came from the store.
    fn write_unsealed(&self, (texts, unsealed): &(BTreeMap<String, Arc<TokenText>>, Vec<String>)) {
        let batch: Vec<_> =
            unsealed.iter().filter_map(|fleet| Some((fleet.clone(), Arc::clone(texts.get(fleet)?)))).collect();
        if !batch.is_empty() {
            let _ = self.token_files.send(batch);
        }
    }

    async fn reconcile(&mut self, snapshot: RepoSnapshot) {
        let started = Instant::now();
        let previous = self.view.borrow().desired.clone();
        let before = previous.clone();
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

        let now = crate::time::now_unix();
        let (removals, returning) = self.removals(before.as_deref(), &compiled, now);
        if let Err(store_error) = self.persist(&compiled, &removals).await {
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
        let tokens = self.token_view(&desired, now);
        self.view.send_modify(|view| {
            let view = Arc::make_mut(view);
            tokens.publish(view);
            view.desired = Some(Arc::new(desired));
            view.reconcile_micros = micros;
            view.reconciles += 1;
            view.reconcile_errors += u64::from(has_errors);
            view.store_problem = token_problem;
            // The snapshot was just fetched and read, so the repository is reachable.
            view.fetch_problem = None;
            if changed || view.reconciled_at.is_none() {
                view.reconciled_at = Some(now);
            }
        });
        if !token_texts.is_empty() {
            // Written once the index that accepts them is published, off this task: a
            // thousand new fleets' files take seconds to write and sync, and the next push
            // must not wait for them.
            let _ = self.token_files.send(token_texts);
        }
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
        let mut issuing = Vec::new();
        for fleet in desired.fleets.values() {
            let policy = &fleet.spec.token;
            let tokens = self.issued.get(fleet.name()).map(Vec::as_slice).unwrap_or_default();
            let reason = match returning.iter().any(|name| name == fleet.name()) {
                true => Some(token::IssueReason::Returned),
                false => token::needs_token(tokens, policy),
            };
            let Some(reason) = reason else { continue };
            let (text, mut issued) = token::issue(fleet.name(), now, policy.rotate)
                .map_err(|error| Problem::general(Severity::Error, error.to_string()))?;
            issued.sealed = self.key.as_ref().map(|key| key.seal(&issued.id, &text));
            issuing.push((reason, Arc::new(text), issued));
        }
        if issuing.is_empty() {
            return Ok(Vec::new());
        }
        // One transaction for all of them: a first start with a thousand fleets issues a
        // thousand tokens.
        let store = Arc::clone(&self.store);
        let saving: Vec<IssuedToken> = issuing.iter().map(|(_, _, issued)| issued.clone()).collect();
        let saved = tokio::task::spawn_blocking(move || store.save_tokens(&saving))
            .await
            .expect("saving tokens does not panic");
        if let Err(store_error) = saved {
            error!(tokens = issuing.len(), error = %store_error, "cannot issue install tokens");
            return Err(Problem::general(Severity::Error, store_error.to_string()));
        }
        let mut texts = Vec::with_capacity(issuing.len());
        for (reason, text, issued) in issuing {
            info!(fleet = %issued.fleet, token = %issued.id, reason = ?reason, "issued install token");
            self.removed.remove(&issued.fleet);
            self.texts.insert(issued.fleet.clone(), Arc::clone(&text));
            texts.push((issued.fleet.clone(), text));
            self.issued.entry(issued.fleet.clone()).or_default().push(issued);
        }
        Ok(texts)
    }

    /// Fleets with tokens that this commit removes, and removed fleets it brings back; and
    /// of those coming back, the ones whose removal is over, which get a new token.
    fn removals(
        &self,
        before: Option<&DesiredState>,
        compiled: &desired::Compiled,
        now: i64,
    ) -> (Vec<(String, Option<RemovedFleet>)>, Vec<String>) {
        let exists =
            |name: &str| compiled.desired.fleets.contains_key(name) || compiled.desired.unresolved.contains(name);
        let mut changed = Vec::new();
        let mut returning = Vec::new();
        for (fleet, tokens) in &self.issued {
            match (exists(fleet), self.removed.get(fleet)) {
                (true, Some(removal)) => {
                    if removal.until <= now {
                        returning.push(fleet.clone());
                    }
                    changed.push((fleet.clone(), None));
                }
                (false, None) => {
                    // Its tokens as its last fleet file had them: revoked ones stay revoked.
                    let policy = before
                        .and_then(|before| before.fleets.get(fleet))
                        .map(|before| before.spec.token.clone())
                        .or_else(|| {
                            let last = self.last_good.get(fleet)?;
                            let file = format!("fleets/{fleet}.toml");
                            crate::repo::manifest::parse_fleet(fleet, &file, &last.source).0.map(|spec| spec.token)
                        })
                        .unwrap_or_default();
                    let until = now.saturating_add(self.removal_grace);
                    let tokens = token::statuses(tokens, &policy)
                        .into_iter()
                        .filter(|status| status.state(now).accepted())
                        .map(|status| {
                            (status.token.id.clone(), status.refused_from().map_or(until, |at| at.min(until)))
                        })
                        .filter(|(_, refused_from)| *refused_from > now)
                        .collect::<Vec<_>>();
                    // With no token left to let in, the removal is over at once.
                    let until = if tokens.is_empty() { now } else { until };
                    let removal =
                        RemovedFleet { removed_at: now, commit: compiled.desired.commit.clone(), until, tokens };
                    if until > now {
                        warn!(fleet = %fleet, until = %crate::time::rfc3339(until), "fleet removed; its collectors may connect until its removal grace ends");
                    } else {
                        info!(fleet = %fleet, "fleet removed; none of its tokens is let in any longer");
                    }
                    changed.push((fleet.clone(), Some(removal)));
                }
                _ => {}
            }
        }
        (changed, returning)
    }

    /// The tokens readers see: each fleet's, and those of removed fleets still let in.
    fn token_view(&self, desired: &DesiredState, now: i64) -> TokenView {
        let (fleet_tokens, problems) = self.fleet_tokens(desired);
        let removed: BTreeMap<String, RemovedFleet> = self
            .removed
            .iter()
            .filter(|(_, removal)| removal.until > now)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let removed_statuses = removed.iter().flat_map(|(fleet, removal)| {
            let issued = self.issued.get(fleet).map(Vec::as_slice).unwrap_or_default();
            removal.tokens.iter().filter_map(move |(id, refused_from)| {
                let token = issued.iter().find(|token| token.id == *id)?;
                Some(TokenStatus {
                    token: token.clone(),
                    expires_at: None,
                    retires_at: Some(*refused_from),
                    revoked: false,
                })
            })
        });
        let index = TokenIndex::new(
            fleet_tokens.values().flat_map(|tokens| tokens.statuses.iter().cloned()).chain(removed_statuses),
        );
        let index = if *self.view.borrow().tokens == index { None } else { Some(Arc::new(index)) };
        TokenView { fleet_tokens: Arc::new(fleet_tokens), problems, index, removed: Arc::new(removed) }
    }

    /// When the next removal grace ends, if one is running.
    fn next_removal_end(&self) -> Option<i64> {
        next_removal_end(&self.removed, &self.texts)
    }

    /// Removals whose grace has ended: their tokens are no longer let in, and their token
    /// files go with their install files.
    fn end_removals(&mut self) {
        let now = crate::time::now_unix();
        for (fleet, removal) in &self.removed {
            if removal.until <= now && self.texts.remove(fleet).is_some() {
                info!(fleet = %fleet, "the removal grace of fleet ended; its tokens are refused");
            }
        }
        let Some(desired) = self.view.borrow().desired.clone() else { return };
        let tokens = self.token_view(&desired, now);
        self.view.send_modify(|view| tokens.publish(Arc::make_mut(view)));
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

    /// Remembers new versions and last good fleets before they are served.
    async fn persist(
        &mut self,
        compiled: &desired::Compiled,
        removals: &[(String, Option<RemovedFleet>)],
    ) -> Result<(), StoreError> {
        let newly_seen = compiled.newly_seen.clone();
        let last_good = (compiled.desired.last_good != *self.last_good).then(|| compiled.desired.last_good.clone());
        if newly_seen.is_empty() && last_good.is_none() && removals.is_empty() {
            return Ok(());
        }
        let store = Arc::clone(&self.store);
        // Only the fleets that changed: a push changes one fleet file of a thousand.
        let good_changes =
            last_good.as_ref().map(|fleets| changed_entries(&self.last_good, fleets)).unwrap_or_default();
        let saving = newly_seen.clone();
        let removing = removals.to_vec();
        tokio::task::spawn_blocking(move || {
            if !saving.is_empty() {
                store.remember_versions(&saving)?;
            }
            if !removing.is_empty() {
                store.save_removed_fleets(&removing)?;
            }
            if !good_changes.is_empty() {
                store.save_last_good_fleets(&good_changes)?;
            }
            Ok::<_, StoreError>(())
        })
        .await
        .expect("store does not panic")?;
        let now = crate::time::now_unix();
        for (fleet, removal) in removals {
            match removal {
                // A removal with no grace left loses its token text at once.
                Some(removal) => {
                    if removal.until <= now {
                        self.texts.remove(fleet);
                    }
                    self.removed.insert(fleet.clone(), removal.clone());
                }
                None => {
                    self.removed.remove(fleet);
                }
            }
        }
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

/// What differs from `before` to `after`: each changed or new entry, and `None` for each
/// one gone.
fn changed_entries<V: Clone + PartialEq>(
    before: &BTreeMap<String, V>,
    after: &BTreeMap<String, V>,
) -> Vec<(String, Option<V>)> {
    let gone = before.keys().filter(|key| !after.contains_key(*key)).map(|key| (key.clone(), None));
    let changed = after
        .iter()
        .filter(|(key, value)| before.get(*key) != Some(*value))
        .map(|(key, value)| (key.clone(), Some(value.clone())));
    gone.chain(changed).collect()
}

/// Writes the operator's token files, batch after batch in the order the tokens were
/// issued, until the reconciler stops. A file that cannot be written is a problem until a
/// later write of that fleet's file succeeds.
async fn write_token_files(
    mut batches: mpsc::UnboundedReceiver<Vec<(String, Arc<TokenText>)>>,
    data_dir: PathBuf,
    view: watch::Sender<Arc<View>>,
) {
    let mut failed: BTreeMap<String, Problem> = BTreeMap::new();
    while let Some(batch) = batches.recv().await {
        let dir = data_dir.clone();
        let outcomes = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .map(|(fleet, text)| {
                    let written = token::write_token_file(&dir, &fleet, &text);
                    (fleet, written)
                })
                .collect::<Vec<_>>()
        })
        .await
        .expect("writing token files does not panic");
        for (fleet, written) in outcomes {
            match written {
                Ok(path) => {
                    info!(fleet = %fleet, path = %path.display(), "wrote install token file");
                    failed.remove(&fleet);
                }
                Err(io_error) => {
                    let message = format!("cannot write the token file of fleet `{fleet}`: {io_error}");
                    error!(fleet = %fleet, error = %message, "cannot write install token file");
                    failed.insert(fleet, Problem::general(Severity::Error, message));
                }
            }
        }
        let problems: Vec<Problem> = failed.values().cloned().collect();
        view.send_if_modified(|view| {
            let known = view.task_problems.get(&ProblemSource::TokenFiles);
            if known.map_or(problems.is_empty(), |known| *known == problems) {
                return false;
            }
            Arc::make_mut(view).task_problems.insert(ProblemSource::TokenFiles, problems.clone());
            true
        });
    }
}

/// Reads back the token files of the newest tokens; a missing or foreign file yields nothing.
/// Each token's text: from this host's token file, or else unsealed from the store (a token
/// another replica issued). The second holds the fleets whose file is to be written.
fn read_token_texts(
    data_dir: &std::path::Path,
    newest: &[IssuedToken],
    key: Option<&SecretKey>,
) -> (BTreeMap<String, Arc<TokenText>>, Vec<String>) {
    let mut unsealed = Vec::new();
    let texts = newest
        .iter()
        .filter_map(|token| {
            let text = token::read_current(data_dir, token).or_else(|| {
                let text = key.zip(token.sealed.as_deref()).and_then(|(key, sealed)| key.open(token, sealed));
                unsealed.extend(text.is_some().then(|| token.fleet.clone()));
                text
            });
            if text.is_none() {
                warn!(fleet = %token.fleet, token = %token.id, "the token file is missing or does not hold the current token");
            }
            Some((token.fleet.clone(), Arc::new(text?)))
        })
        .collect();
    (texts, unsealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn removal(until: i64) -> RemovedFleet {
        RemovedFleet { removed_at: until - 2, commit: "c0ffee".into(), until, tokens: vec![("tk_1".into(), until)] }
    }

    #[test]
    fn a_removal_whose_end_passed_during_an_event_is_still_due() {
        let removed = BTreeMap::from([("nodes".to_owned(), removal(100)), ("edge".to_owned(), removal(200))]);
        // Both still hold their token text: the earliest end is due, even though it is past.
        let texts = BTreeMap::from([("nodes".to_owned(), ()), ("edge".to_owned(), ())]);
        assert_eq!(next_removal_end(&removed, &texts), Some(100));
        // Once ended (its text dropped), the next one is.
        let texts = BTreeMap::from([("edge".to_owned(), ())]);
        assert_eq!(next_removal_end(&removed, &texts), Some(200));
        assert_eq!(next_removal_end(&removed, &BTreeMap::<String, ()>::new()), None);
    }

    #[test]
    fn only_what_changed_is_written() {
        let before = BTreeMap::from([("a".to_owned(), 1), ("b".to_owned(), 2), ("c".to_owned(), 3)]);
        let after = BTreeMap::from([("a".to_owned(), 1), ("b".to_owned(), 20), ("d".to_owned(), 4)]);
        assert_eq!(
            changed_entries(&before, &after),
            vec![("c".to_owned(), None), ("b".to_owned(), Some(20)), ("d".to_owned(), Some(4))]
        );
        assert_eq!(changed_entries(&after, &after), vec![]);
    }
}
