//! Wires the components of `gitfleet serve`, runs them as named tasks, and shuts them down
//! gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::git::mirror::Mirror;
use crate::git::watcher::{self, WatcherSettings};
use crate::git::{GitError, watcher::redact_url};
use crate::metrics::Metrics;
use crate::opamp::registry::Registry;
use crate::opamp::server::{self as opamp_server, OpampState};
use crate::reconciler::{Event, Reconciler, ReconcilerSettings, View};
use crate::reporting::{self, Statuses};
use crate::settings::{Database, Settings};
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};
use crate::web::{self, WebState};

/// How long running tasks get to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error("cannot listen on {address}: {source}")]
    Listen { address: SocketAddr, source: std::io::Error },
    #[error("cannot watch {path} for changes: {source}")]
    Watch { path: String, source: notify::Error },
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
}

/// A running server.
pub struct Running {
    pub web_addr: SocketAddr,
    pub opamp_addr: SocketAddr,
    pub registry: Arc<Registry>,
    pub view: watch::Receiver<Arc<View>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// Why the server cannot go on, when a task finds out (e.g. `--branch` names no branch).
    fatal: mpsc::Receiver<String>,
    _fs_watch: Option<notify::RecommendedWatcher>,
}

impl Running {
    /// Resolves when a task finds that the server cannot go on, with the reason; never
    /// otherwise.
    pub async fn failure(&mut self) -> String {
        match self.fatal.recv().await {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }

    /// Stops every task and waits for them (at most `DRAIN_TIMEOUT`).
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, self.tracker.wait()).await.is_err() {
            warn!("tasks did not stop within {DRAIN_TIMEOUT:?}");
        }
        info!("stopped");
    }
}

/// The two listening sockets, bound before anything is written, so that a start that
/// cannot listen leaves nothing behind.
pub struct Listeners {
    web: tokio::net::TcpListener,
    opamp: tokio::net::TcpListener,
}

impl Listeners {
    pub async fn bind(web: SocketAddr, opamp: SocketAddr) -> Result<Self, AppError> {
        let bind = |address: SocketAddr| async move {
            let listen = || -> std::io::Result<tokio::net::TcpListener> {
                let socket =
                    if address.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
                socket.set_reuseaddr(true)?;
                socket.bind(address)?;
                socket.listen(LISTEN_BACKLOG)
            };
            listen().map_err(|source| AppError::Listen { address, source })
        };
        Ok(Self { web: bind(web).await?, opamp: bind(opamp).await? })
    }
}

/// Connections waiting to be accepted, at most. A fleet reconnects all at once after a
/// restart: with the usual 1,024, the kernel drops the SYNs past it and those collectors
/// retry only after 1, 3, 7, 15 … seconds. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 65_535;

/// Starts the server; returns once every socket is bound.
pub async fn start(settings: Settings) -> Result<Running, AppError> {
    let listeners = Listeners::bind(settings.web_listen, settings.listen).await?;
    start_on(settings, listeners).await
}

/// Starts the server on sockets already bound: creates the data directory, opens the
/// store and the mirror, and starts every task.
pub async fn start_on(mut settings: Settings, listeners: Listeners) -> Result<Running, AppError> {
    crate::settings::create_data_dir(&settings.data_dir)?;
    let store: Arc<dyn Store> = match settings.database.clone() {
        Database::Sqlite => {
            let path = settings.data_dir.join("state.db");
            tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                .await
                .expect("opening the store does not panic")?
        }
        Database::Postgres { url, password, ca_file } => {
            let credentials = url.split_once("://").and_then(|(_, rest)| rest.split_once('@')).map(|(user, _)| user);
            if credentials.is_some_and(|user| user.contains(':')) {
                warn!(
                    "--database carries a password, which anyone on this host can read in `ps`; use --database-password-file"
                );
            }
            tokio::task::spawn_blocking(move || PostgresStore::open_with(&url, password.as_deref(), ca_file.as_deref()))
                .await
                .expect("opening the store does not panic")?
        }
    };
    let mirror = {
        let (repo, path) = (settings.repo.clone(), settings.data_dir.join("repo.git"));
        let ignored = settings.status_branch.as_ref().map(|branch| format!("refs/heads/{branch}"));
        Arc::new(
            tokio::task::spawn_blocking(move || Mirror::open(&repo, &path).map(|mirror| mirror.ignoring(ignored)))
                .await
                .expect("opening the mirror does not panic")?,
        )
    };
    let Listeners { web: listener, opamp: opamp_listener } = listeners;
    let web_addr = listener.local_addr().map_err(|source| AppError::Listen { address: settings.web_listen, source })?;
    let opamp_addr =
        opamp_listener.local_addr().map_err(|source| AppError::Listen { address: settings.listen, source })?;

    let replica: Arc<str> = match settings.replica.take() {
        Some(name) => name.into(),
        None => format!("{}:{}", host_name(), opamp_addr.port()).into(),
    };
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (view_tx, view_rx) = watch::channel(Arc::new(View::default()));
    let (events_tx, events_rx) = mpsc::channel(64);
    let (triggers_tx, triggers_rx) = mpsc::channel(16);

    let metrics = Arc::new(Metrics::default());
    let registry = Registry::limiting_new_instances(settings.new_instances);
    let restored = crate::opamp::persist::restore(&registry, Arc::clone(&store), &replica).await?;
    info!(instances = restored, "restored instances");
    tracker.spawn(
        crate::opamp::persist::run(
            Arc::clone(&registry),
            Arc::clone(&store),
            Arc::clone(&replica),
            settings.forget_after,
            Arc::clone(&metrics),
            events_tx.clone(),
            cancel.clone(),
        )
        .instrument(info_span!("persist")),
    );
    let rollouts = {
        let store = Arc::clone(&store);
        tokio::task::spawn_blocking(move || crate::opamp::rollouts::RolloutBook::load(&*store))
            .await
            .expect("reading rollouts does not panic")?
    };
    let leading = crate::replica::try_lead(&store, &replica).await;
    let (role_tx, role_rx) = watch::channel(leading);
    if !leading {
        info!(replica = %replica, "following: another replica leads");
    }
    let reconciler_settings = ReconcilerSettings {
        removal_grace: settings.removed_fleet_grace,
        key: settings.secret_key.clone(),
        leading,
        replica: replica.to_string(),
    };
    let reconciler =
        Reconciler::load(Arc::clone(&store), settings.data_dir.clone(), reconciler_settings, view_tx).await?;
    tracker.spawn(reconciler.run(events_rx, cancel.clone()).instrument(info_span!("reconciler")));

    let fs_watch = match &settings.local_git_dir {
        Some(git_dir) => Some(
            watcher::watch_local_refs(git_dir.clone(), settings.status_branch.as_deref(), triggers_tx.clone())
                .map_err(|source| AppError::Watch { path: git_dir.display().to_string(), source })?,
        ),
        None => None,
    };
    let install = crate::install::writer::InstallConfig {
        data_dir: settings.data_dir.clone(),
        public_endpoint: settings.opamp_endpoint(),
        fallback_endpoint: format!(
            "{}://{}:{}/v1/opamp",
            if settings.tls.is_some() { "wss" } else { "ws" },
            host_name(),
            opamp_addr.port()
        ),
        artifacts_dir: settings.artifacts_dir.clone(),
        ca: settings.install_ca.clone(),
    };
    tracker.spawn(
        crate::install::writer::keep_written(view_rx.clone(), install, events_tx.clone(), cancel.clone())
            .instrument(info_span!("install")),
    );
    let watcher_settings = WatcherSettings { branch: settings.branch.clone(), poll_interval: settings.poll_interval };
    let (fatal_tx, fatal_rx) = mpsc::channel(1);

    let (targets_tx, targets_rx) = watch::channel(Arc::new(crate::opamp::registry::Targets::new()));
    let (statuses_tx, statuses_rx) = watch::channel(Arc::new(Statuses::default()));
    tracker.spawn(
        crate::opamp::persist::Replicas::new(
            Arc::clone(&registry),
            Arc::clone(&store),
            Arc::clone(&replica),
            targets_rx.clone(),
            role_rx.clone(),
        )
        .run(cancel.clone())
        .instrument(info_span!("replicas")),
    );
    tracker.spawn(
        reporting::publish_statuses(
            view_rx.clone(),
            targets_rx.clone(),
            Arc::clone(&registry),
            statuses_tx,
            cancel.clone(),
        )
        .instrument(info_span!("statuses")),
    );
    let leader = LeaderTasks {
        settings: settings.clone(),
        watcher: watcher_settings,
        mirror,
        store: Arc::clone(&store),
        metrics: Arc::clone(&metrics),
        registry: Arc::clone(&registry),
        statuses: statuses_rx.clone(),
        view: view_rx.clone(),
        targets: targets_rx.clone(),
        events: events_tx.clone(),
        triggers: triggers_tx.clone(),
        fatal: fatal_tx.clone(),
        replica: Arc::clone(&replica),
    };
    tracker.spawn(
        take_turns(
            Arc::clone(&store),
            (leading, role_tx),
            (leader, triggers_rx),
            events_tx.clone(),
            (tracker.clone(), cancel.clone()),
        )
        .instrument(info_span!("replica")),
    );
    let (tokens_tx, tokens_rx) = watch::channel(Arc::clone(&view_rx.borrow().tokens));
    tracker.spawn(
        opamp_server::follow_targets(
            view_rx.clone(),
            targets_tx,
            tokens_tx,
            settings.opamp_endpoint(),
            settings.install_ca.clone(),
            Arc::clone(&registry),
            Arc::clone(&store),
            (rollouts, role_rx),
            cancel.clone(),
        )
        .instrument(info_span!("targets")),
    );
    let opamp_router = opamp_server::router(OpampState {
        registry: Arc::clone(&registry),
        targets: targets_rx.clone(),
        view: view_rx.clone(),
        tokens: tokens_rx,
        dialled: Arc::default(),
        install_dir: settings.data_dir.join("install"),
        connections: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        max_connections: settings.max_connections,
        tls: settings.tls.is_some(),
        metrics: Arc::clone(&metrics),
        assembling: crate::opamp::ws::Budget::new(opamp_server::ASSEMBLING_BUDGET),
        adopter: crate::opamp::persist::Adopter::start(Arc::clone(&registry), Arc::clone(&store), cancel.clone()),
        cancel: cancel.clone(),
    });
    let tls = settings.tls.clone();
    tracker.spawn(
        serve(
            opamp_listener,
            opamp_addr,
            tls.clone(),
            opamp_router,
            (settings.max_connections, OPAMP_TIMEOUTS),
            Arc::clone(&metrics),
            cancel.clone(),
        )
        .instrument(info_span!("opamp")),
    );

    let router = web::router(WebState {
        view: view_rx.clone(),
        triggers: triggers_tx,
        webhook_secret: settings.webhook_secret.clone(),
        registry: Arc::clone(&registry),
        store,
        targets: targets_rx,
        statuses: statuses_rx,
        metrics: Arc::clone(&metrics),
        cancel: cancel.clone(),
    });
    tracker.spawn(
        serve(
            listener,
            web_addr,
            tls.clone(),
            router,
            (WEB_CONNECTIONS, WEB_TIMEOUTS),
            Arc::clone(&metrics),
            cancel.clone(),
        )
        .instrument(info_span!("web")),
    );
    if let Some(tls) = tls {
        tracker.spawn(
            tls.keep_fresh(crate::tls::RELOAD_CHECK, metrics, events_tx, cancel.clone()).instrument(info_span!("tls")),
        );
    }

    info!(
        repo = %redact_url(&settings.repo),
        branch = %settings.branch,
        web = %web_addr,
        opamp = %opamp_addr,
        poll_interval = %crate::duration::format_duration(settings.poll_interval),
        fs_watch = settings.local_git_dir.is_some(),
        webhook_secret = settings.webhook_secret.is_some(),
        tls = settings.tls.is_some(),
        "gitfleet serving"
    );
    Ok(Running { web_addr, opamp_addr, registry, view: view_rx, cancel, tracker, fatal: fatal_rx, _fs_watch: fs_watch })
}

/// What only the leader runs: the watcher, the status branch, commit statuses, and for
/// replicas the publisher and the relay of webhooks. Started each time this replica leads.
struct LeaderTasks {
    settings: Settings,
    watcher: WatcherSettings,
    mirror: Arc<Mirror>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    statuses: watch::Receiver<Arc<Statuses>>,
    view: watch::Receiver<Arc<View>>,
    targets: watch::Receiver<Arc<crate::opamp::registry::Targets>>,
    events: mpsc::Sender<Event>,
    triggers: mpsc::Sender<crate::git::watcher::Trigger>,
    fatal: mpsc::Sender<String>,
    replica: Arc<str>,
}

impl LeaderTasks {
    /// Starts them until `cancel`; the watcher hands `triggers` back when it stops.
    fn start(
        &self,
        triggers: mpsc::Receiver<crate::git::watcher::Trigger>,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> tokio::task::JoinHandle<mpsc::Receiver<crate::git::watcher::Trigger>> {
        let (settings, store, metrics) = (&self.settings, &self.store, &self.metrics);
        let (statuses_rx, view_rx, targets_rx) = (&self.statuses, &self.view, &self.targets);
        let watcher = tracker.spawn(
            watcher::run(
                self.watcher.clone(),
                Arc::clone(&self.mirror),
                triggers,
                self.events.clone(),
                self.fatal.clone(),
                cancel.clone(),
            )
            .instrument(info_span!("watcher")),
        );
        // Followers hear of what the leader publishes, and it of webhooks they got.
        if store.shared() {
            tracker.spawn(
                crate::replica::hear_fetch_requests(Arc::clone(store), self.triggers.clone(), cancel.clone())
                    .instrument(info_span!("relay")),
            );
            tracker.spawn(
                crate::replica::publish_for_followers(
                    Arc::clone(store),
                    view_rx.clone(),
                    self.replica.to_string(),
                    cancel.clone(),
                )
                .instrument(info_span!("publish")),
            );
        }
        if let Some(branch) = &settings.status_branch {
            let status_settings = reporting::StatusBranchSettings {
                data_dir: settings.data_dir.clone(),
                remote: settings.repo.clone(),
                branch: branch.clone(),
                interval: settings.status_interval,
                status_page_url: settings.status_page_url.clone(),
            };
            let sources = reporting::Sources {
                statuses: statuses_rx.clone(),
                view: view_rx.clone(),
                targets: targets_rx.clone(),
                registry: Arc::clone(&self.registry),
                store: Arc::clone(&self.store),
                replica: Arc::clone(&self.replica),
            };
            tracker.spawn(
                reporting::keep_status_branch(
                    status_settings,
                    sources,
                    Arc::clone(metrics),
                    self.events.clone(),
                    cancel.clone(),
                )
                .instrument(info_span!("status_branch")),
            );
        }
        if let Some(forge) = &settings.forge {
            tracker.spawn(
                crate::forge::post_commit_statuses(
                    forge.clone(),
                    settings.status_interval,
                    statuses_rx.clone(),
                    Arc::clone(store),
                    Arc::clone(metrics),
                    self.events.clone(),
                    cancel.clone(),
                )
                .instrument(info_span!("forge")),
            );
        }
        watcher
    }
}

/// Leads or follows, in turns: a follower reads what the leader publishes and tries to take
/// the lead every second; once it leads, it starts the `LeaderTasks` and checks every
/// second that it still leads. When another replica took the lead, it stops them and
/// follows again.
async fn take_turns(
    store: Arc<dyn Store>,
    (mut leading, role): (bool, watch::Sender<bool>),
    (leader, mut triggers): (LeaderTasks, mpsc::Receiver<crate::git::watcher::Trigger>),
    events: mpsc::Sender<Event>,
    (tracker, cancel): (TaskTracker, CancellationToken),
) {
    let replica = leader.replica.to_string();
    loop {
        if !leading {
            let following = cancel.child_token();
            tracker.spawn(
                crate::replica::follow_leader(Arc::clone(&store), events.clone(), following.clone())
                    .instrument(info_span!("follow")),
            );
            let took_over = crate::replica::wait_to_lead(&store, &replica, &cancel).await;
            following.cancel();
            if !took_over {
                return;
            }
            // Before the watcher's first snapshot, through the same channel.
            if events.send(Event::Lead).await.is_err() {
                return;
            }
            role.send_replace(true);
        }
        let term = cancel.child_token();
        let watcher = leader.start(triggers, &tracker, &term);
        let cancelled = crate::replica::keep_leading(Arc::clone(&store), replica.clone(), cancel.clone()).await;
        term.cancel();
        triggers = match watcher.await {
            Ok(triggers) => triggers,
            Err(_) => return,
        };
        if cancelled {
            return;
        }
        // Another replica leads: this one follows from now on.
        if events.send(Event::Deposed).await.is_err() {
            return;
        }
        role.send_replace(false);
        leading = false;
    }
}

/// Open sockets on the people port at most: with `--max-connections` on the OpAMP port and
/// what the store and Git use, within the process's open-file limit.
const WEB_CONNECTIONS: usize = 256;

/// How long an accepted OpAMP socket may wait to send its first bytes, and stay silent
/// after. Collectors heartbeat every 30 s: six missed heartbeats close a WebSocket.
const OPAMP_TIMEOUTS: crate::net::Timeouts =
    crate::net::Timeouts { first_within: Duration::from_secs(10), silent_within: Duration::from_secs(180) };

/// The same for the people port, where a status page listens to its event stream without
/// saying anything.
const WEB_TIMEOUTS: crate::net::Timeouts =
    crate::net::Timeouts { first_within: Duration::from_secs(10), silent_within: Duration::from_secs(3600) };

/// Serves `router` on `listener`, through TLS when it is on, until `cancel`, with at most
/// `limit` sockets open, each closed when silent past its `timeouts`.
async fn serve(
    listener: tokio::net::TcpListener,
    local: SocketAddr,
    tls: Option<crate::tls::Tls>,
    router: axum::Router,
    (limit, timeouts): (usize, crate::net::Timeouts),
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    use crate::net::{Limited, serve_http1};
    match tls {
        // Every write is a whole message (an OpAMP frame, a response): send it at once.
        None => {
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| nodelay(tcp));
            serve_http1(Limited::new(listener, limit, timeouts), router, cancel).await
        }
        Some(tls) => {
            let listener = Limited::new(tls.listen(listener, local, metrics, cancel.clone()), limit, timeouts);
            serve_http1(listener, router, cancel).await
        }
    }
}

/// Turns Nagle's algorithm off on an accepted connection. Failing leaves a slower socket,
/// not a broken one.
pub fn nodelay(tcp: &tokio::net::TcpStream) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler works on unix");
        tokio::select! {
            _ = interrupt => {},
            _ = terminate.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    info!("shutdown requested");
}

/// This machine's name, for install files that must name an endpoint when none is set.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-.".contains(c)))
        .unwrap_or_else(|| "localhost".to_owned())
}
