//! Writes instance changes to the store in batches, one transaction every `FLUSH_EVERY`:
//! never a write per heartbeat (`last_seen` alone is written once a minute at most), and a
//! last flush on shutdown. Instances silent for `--forget-after` are forgotten, in memory
//! and in the store. With replicas on a shared store: what each tells the others
//! (`Replicas`), instances read when their collectors move here (`Adopter`), and the
//! other replicas' instances read on demand (`records_everywhere`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::opamp::registry::{AvailableComponents, InstanceRecord, Registry, ReplicaCounts, Targets, Unsaved};
use crate::problem::{Problem, Severity};
use crate::reconciler::{Event, ProblemSource};
use crate::store::{Store, StoreError};

const FLUSH_EVERY: Duration = Duration::from_millis(250);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// The longest wait between looks for instances to forget.
const FORGET_CHECK_MAX: Duration = Duration::from_secs(60);
/// History entries kept per instance in the store (the newest ones).
pub const EVENTS_KEPT: usize = 200;
/// History entries loaded per instance at startup.
const EVENTS_LOADED: usize = 50;

/// Loads every instance this replica held into the registry; they are `stale` until heard
/// from. Those other replicas hold stay with them (`Replicas`).
pub async fn restore(registry: &Registry, store: Arc<dyn Store>, replica: &str) -> Result<usize, StoreError> {
    let name = replica.to_owned();
    let (lists, loaded) = tokio::task::spawn_blocking(move || {
        store.prune_events(EVENTS_KEPT)?;
        Ok::<_, StoreError>((store.available_components()?, store.held_instances(&name, EVENTS_LOADED)?))
    })
    .await
    .expect("loading instances does not panic")?;
    registry.restore_components(lists.into_iter().filter_map(|(hash, body)| {
        let list: AvailableComponents = serde_json::from_str(&body).ok()?;
        Some(AvailableComponents { hash, ..list })
    }));
    let count = loaded.len();
    registry.restore(loaded.into_iter().map(|(instance, events)| {
        let components = instance.components_hash.as_deref().and_then(|hash| registry.components(hash));
        let mut record = InstanceRecord::from_stored(instance, events);
        record.components = components;
        record
    }));
    Ok(count)
}

pub async fn run(
    registry: Arc<Registry>,
    store: Arc<dyn Store>,
    replica: Arc<str>,
    forget_after: Option<Duration>,
    metrics: Arc<Metrics>,
    events: tokio::sync::mpsc::Sender<Event>,
    cancel: CancellationToken,
) {
    // The last write's failure, while the store keeps refusing: reported as a problem, and
    // withdrawn by the first write that succeeds.
    let mut failing: Option<String> = None;
    let mut flush_tick = tokio::time::interval(FLUSH_EVERY);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prune_tick = tokio::time::interval(PRUNE_EVERY);
    prune_tick.tick().await;
    // Often enough that an instance goes at most a quarter of `forget_after` late, and at
    // most a minute late.
    let forget_every = forget_after.map_or(FORGET_CHECK_MAX, |after| (after / 4).clamp(FLUSH_EVERY, FORGET_CHECK_MAX));
    let mut forget_tick = tokio::time::interval_at(tokio::time::Instant::now() + forget_every, forget_every);
    loop {
        let stopping = tokio::select! {
            () = cancel.cancelled() => true,
            _ = flush_tick.tick() => false,
            _ = forget_tick.tick(), if forget_after.is_some() => {
                let after = forget_after.expect("checked by the branch guard");
                forget(&registry, &store, after, &metrics).await;
                false
            }
            _ = prune_tick.tick() => {
                let store = Arc::clone(&store);
                match tokio::task::spawn_blocking(move || store.prune_events(EVENTS_KEPT)).await.expect("pruning does not panic") {
                    Ok(removed) => debug!(removed, "pruned instance history"),
                    Err(error) => warn!(%error, "cannot prune instance history"),
                }
                false
            }
        };
        let written = flush(&registry, &store, &replica).await;
        if written.is_err() {
            Metrics::count(&metrics.store_write_errors);
        }
        let now_failing = written.err();
        if now_failing != failing {
            // Said once per change, not every 250 ms while the store keeps refusing.
            match &now_failing {
                Some(error) => {
                    warn!(%error, "cannot write instance changes to the store; they are kept and tried again")
                }
                None => info!("the store takes instance changes again"),
            }
            let problems = now_failing
                .iter()
                .map(|error| {
                    Problem::general(
                        Severity::Error,
                        format!("cannot write instance changes to the store ({error}): they are kept in memory and written once it accepts them again; a restart before then loses them"),
                    )
                })
                .collect();
            let _ = events.send(Event::Problems { source: ProblemSource::Store, problems }).await;
            failing = now_failing;
        }
        if stopping {
            break;
        }
    }
}

/// Forgets the instances without a connection that have been silent for `after`.
async fn forget(registry: &Registry, store: &Arc<dyn Store>, after: Duration, metrics: &Metrics) {
    let cutoff = crate::time::now_ms() - i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
    let forgotten = registry.forget_silent_since(cutoff);
    if forgotten.is_empty() {
        return;
    }
    let count = forgotten.len();
    metrics.instances_forgotten.fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || store.forget_instances(&forgotten))
        .await
        .expect("forgetting does not panic")
    {
        Ok(()) => {
            info!(instances = count, after = %crate::duration::format_duration(after), "forgot instances not heard from")
        }
        // They stay in the store, come back at the next start, and are forgotten again.
        Err(error) => warn!(%error, instances = count, "cannot delete forgotten instances from the store"),
    }
}

/// Writes what changed; the error of the first write that failed, if one did.
async fn flush(registry: &Arc<Registry>, store: &Arc<dyn Store>, replica: &str) -> Result<(), String> {
    // Component lists first: the instances written next point at them.
    let lists = registry.take_unsaved_components();
    if !lists.is_empty() {
        let rows: Vec<(Vec<u8>, String)> = lists
            .iter()
            .map(|list| (list.hash.clone(), serde_json::to_string(&**list).expect("component lists serialize")))
            .collect();
        let writer = Arc::clone(store);
        match tokio::task::spawn_blocking(move || writer.save_available_components(&rows)).await {
            Ok(Ok(())) => debug!(builds = lists.len(), "saved component lists"),
            Ok(Err(error)) => {
                registry.mark_components_unsaved(lists);
                return Err(error.to_string());
            }
            Err(_) => {
                registry.mark_components_unsaved(lists);
                return Err("writing component lists panicked".into());
            }
        }
    }
    let mut unsaved = registry.unsaved();
    // In chunks: each is one transaction, acknowledged when committed, and other writers
    // (a rollout that must be stored before it moves anyone) wait for one chunk at most.
    while !unsaved.is_empty() {
        let chunk: Vec<Unsaved> = unsaved.drain(..unsaved.len().min(SAVE_CHUNK)).collect();
        let (mut instances, mut events, mut receipts) = (Vec::new(), Vec::new(), Vec::new());
        for Unsaved { mut instance, events: new, receipt } in chunk {
            instance.holder = replica.to_owned();
            instances.push(instance);
            receipts.push((receipt, new.len()));
            events.extend(new);
        }
        let writer = Arc::clone(store);
        let count = instances.len();
        let saved = tokio::task::spawn_blocking(move || writer.save_instances(&instances, &events))
            .await
            .expect("saving does not panic");
        match saved {
            Ok(()) => {
                registry.saved(receipts);
                debug!(instances = count, "saved instances");
            }
            // Nothing was marked written: the next flush takes them again.
            Err(error) => return Err(error.to_string()),
        }
    }
    Ok(())
}

/// How often a replica writes its counts and reads the others'.
const COUNT_EVERY: Duration = Duration::from_secs(1);
/// Counts are written at least this often, changed or not: a replica silent for
/// `GONE_AFTER` is taken for gone.
const COUNTS_AT_LEAST_EVERY: Duration = Duration::from_secs(3);
/// How long a replica's counts may go unwritten before the leader takes over its instances
/// (by the database's clock). A database restart stops every replica's writes for about as
/// long as it takes, so this is well above that.
const GONE_AFTER: Duration = Duration::from_secs(15);
/// How often the leader looks for gone replicas.
const GONE_CHECK_EVERY: Duration = Duration::from_secs(5);
/// How far behind the highest change number a replica reads again: a write takes its number
/// before it commits, so a write committed late has a number below ones already read.
const MOVED_LAG: Duration = Duration::from_secs(5);
/// Instances fetched per query when taking over a gone replica's.
const TAKE_OVER_CHUNK: usize = 2000;

/// What a replica on a shared store tells the others and learns from them, once a second:
/// what its instances add up to (`ReplicaCounts`, in place of the instances themselves),
/// which of its instances another replica took, and, on the leader, which replicas are
/// gone (their instances are then the leader's, and go stale there until they reconnect).
pub struct Replicas {
    registry: Arc<Registry>,
    store: Arc<dyn Store>,
    replica: Arc<str>,
    targets: tokio::sync::watch::Receiver<Arc<Targets>>,
    leading: tokio::sync::watch::Receiver<bool>,
    written: Option<(String, tokio::time::Instant)>,
    /// The highest change number read, as of when, for the last `MOVED_LAG`.
    read: std::collections::VecDeque<(tokio::time::Instant, i64)>,
    gone_checked: Option<tokio::time::Instant>,
    /// Since when exchanges have succeeded without a break. After the database was out of
    /// reach every replica's counts are old until it writes again: none is taken for gone
    /// until `GONE_AFTER` of exchanges in a row.
    reaching_since: tokio::time::Instant,
    failing: bool,
}

impl Replicas {
    pub fn new(
        registry: Arc<Registry>,
        store: Arc<dyn Store>,
        replica: Arc<str>,
        targets: tokio::sync::watch::Receiver<Arc<Targets>>,
        leading: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            registry,
            store,
            replica,
            targets,
            leading,
            written: None,
            read: std::collections::VecDeque::new(),
            gone_checked: None,
            reaching_since: tokio::time::Instant::now(),
            failing: false,
        }
    }

    /// Keeps at it until `cancel`; does nothing on a store only this process uses.
    pub async fn run(mut self, cancel: CancellationToken) {
        if !self.store.shared() {
            return;
        }
        let mut tick = tokio::time::interval(COUNT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let done = self.exchange().await;
            let failed = done.is_err();
            if failed || self.failing {
                self.reaching_since = tokio::time::Instant::now();
            }
            match (done, self.failing) {
                (Ok(()), true) => info!("exchanging counts with the other replicas again"),
                (Err(error), false) => warn!(%error, "cannot exchange counts with the other replicas; trying again"),
                _ => {}
            }
            self.failing = failed;
        }
    }

    async fn exchange(&mut self) -> Result<(), StoreError> {
        let now = tokio::time::Instant::now();
        let targets = Arc::clone(&self.targets.borrow());
        let counts = ReplicaCounts {
            fleets: self
                .registry
                .counts(&targets, crate::time::now_ms())
                .into_iter()
                .map(|(fleet, counts)| (fleet.to_string(), counts))
                .collect(),
        };
        let body = serde_json::to_string(&counts).expect("counts serialize");
        let due = self.written.as_ref().is_none_or(|(last, at)| *last != body || *at + COUNTS_AT_LEAST_EVERY <= now);
        while self.read.len() > 1 && self.read[1].0 + MOVED_LAG <= now {
            self.read.pop_front();
        }
        let after = self.read.front().map_or(0, |(_, highest)| *highest);
        let look_for_gone = *self.leading.borrow() && self.gone_checked.is_none_or(|at| at + GONE_CHECK_EVERY <= now);
        let (store, replica) = (Arc::clone(&self.store), Arc::clone(&self.replica));
        let writing = due.then(|| body.clone());
        let (others, moved, gone) = tokio::task::spawn_blocking(move || {
            if let Some(body) = &writing {
                store.save_counts(&replica, body)?;
            }
            let silent_ms = i64::try_from(GONE_AFTER.as_millis()).unwrap_or(i64::MAX);
            let others: Vec<(String, ReplicaCounts)> = store
                .replica_counts()?
                .into_iter()
                .filter(|(name, _, age_ms)| *name != *replica && *age_ms < silent_ms)
                .filter_map(|(name, body, _)| Some((name, serde_json::from_str(&body).ok()?)))
                .collect();
            let moved = store.instances_moved_away(&replica, after)?;
            let gone = if look_for_gone { take_over(&*store, &replica, silent_ms)? } else { Vec::new() };
            Ok::<_, StoreError>((others, moved, gone))
        })
        .await
        .expect("exchanging counts does not panic")?;
        if due {
            self.written = Some((body, now));
        }
        if look_for_gone {
            self.gone_checked = Some(now);
        }
        self.registry.set_others(others);
        let highest = moved.iter().map(|(_, number)| *number).max().unwrap_or(after);
        let let_go = self.registry.let_go(moved.into_iter().map(|(uid, _)| uid));
        if let_go > 0 {
            debug!(instances = let_go, "let go of instances another replica took");
        }
        self.read.push_back((now, highest.max(self.read.back().map_or(0, |(_, last)| *last))));
        for (from, instances) in gone {
            let count = instances.len();
            let taken = instances
                .into_iter()
                .map(|(instance, events)| self.registry.adopt(instance, events, false))
                .filter(|taken| *taken)
                .count();
            info!(replica = %from, instances = count, taken, "took over the instances of a gone replica");
        }
        Ok(())
    }
}

/// The leader takes over the instances of every gone replica: read back, to adopt.
#[allow(clippy::type_complexity)]
fn take_over(
    store: &dyn Store,
    replica: &str,
    silent_ms: i64,
) -> Result<Vec<(String, Vec<(crate::store::StoredInstance, Vec<crate::store::StoredEvent>)>)>, StoreError> {
    let mut taken = Vec::new();
    for gone in store.gone_replicas(replica, silent_ms)? {
        let uids = store.take_over_instances(&gone, replica)?;
        let mut instances = Vec::with_capacity(uids.len());
        for chunk in uids.chunks(TAKE_OVER_CHUNK) {
            instances.extend(store.instances_by_uid(chunk, EVENTS_LOADED)?);
        }
        taken.push((gone, instances));
    }
    Ok(taken)
}

/// Instances written per transaction.
const SAVE_CHUNK: usize = 250;

/// Instances read per query when agents new to this replica arrive together (a replica
/// gone, its agents reconnecting through the balancer).
const ADOPT_CHUNK: usize = 500;
/// The longest an agent's first message waits for its record from the store; past that it
/// is taken as new here, and its history stays where it is.
const ADOPT_WAIT: Duration = Duration::from_secs(2);

/// Reads instances this replica does not know from the store when their agents first speak
/// to it (they moved from another replica), so each keeps its history and status. Lookups
/// that arrive together go in one query.
#[derive(Clone)]
pub struct Adopter {
    asks: tokio::sync::mpsc::Sender<([u8; 16], tokio::sync::oneshot::Sender<()>)>,
}

impl Adopter {
    /// `None` on a store only this process uses: every instance it has ever held is in
    /// memory already.
    pub fn start(registry: Arc<Registry>, store: Arc<dyn Store>, cancel: CancellationToken) -> Option<Self> {
        if !store.shared() {
            return None;
        }
        let (asks, mut asked) = tokio::sync::mpsc::channel::<([u8; 16], tokio::sync::oneshot::Sender<()>)>(4096);
        tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    () = cancel.cancelled() => break,
                    first = asked.recv() => match first {
                        Some(first) => first,
                        None => break,
                    },
                };
                let mut batch = vec![first];
                while batch.len() < ADOPT_CHUNK {
                    match asked.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let uids: Vec<[u8; 16]> = batch.iter().map(|(uid, _)| *uid).collect();
                let reading = Arc::clone(&store);
                let read = tokio::task::spawn_blocking(move || reading.instances_by_uid(&uids, EVENTS_LOADED))
                    .await
                    .expect("reading does not panic");
                match read {
                    Ok(found) => {
                        for (instance, events) in found {
                            registry.adopt(instance, events, true);
                        }
                    }
                    Err(error) => warn!(%error, "cannot read instances new to this replica; they start afresh here"),
                }
                for (_, done) in batch {
                    let _ = done.send(());
                }
            }
        });
        Some(Self { asks })
    }

    /// Brings `uid`'s record from the store if this replica does not have it; returns once
    /// it is in the registry, not in the store, or `ADOPT_WAIT` has passed.
    pub async fn adopt(&self, registry: &Registry, uid: [u8; 16]) {
        if registry.knows(&crate::opamp::codec::InstanceUid(uid)) {
            return;
        }
        let (done, read) = tokio::sync::oneshot::channel();
        if self.asks.send((uid, done)).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(ADOPT_WAIT, read).await;
    }
}

/// Every instance of `fleet` (or of every fleet) in `instance_uid` order, whichever replica
/// holds it: this replica's records and, on a shared store, the others' read from it.
/// Blocking: it reads the store.
pub fn records_everywhere(
    registry: &Registry,
    store: &dyn Store,
    replica: &str,
    fleet: Option<&str>,
) -> Result<Vec<InstanceRecord>, StoreError> {
    let mut records = registry.records(fleet);
    if !store.shared() {
        return Ok(records);
    }
    let elsewhere = store.instances_held_elsewhere(replica, fleet)?;
    let known: std::collections::HashSet<[u8; 16]> = records.iter().map(|record| record.uid.0).collect();
    records.extend(
        elsewhere
            .into_iter()
            .filter(|instance| !known.contains(&instance.uid))
            .map(|instance| registry.elsewhere(instance, Vec::new())),
    );
    records.sort_by_key(|record| record.uid);
    Ok(records)
}

/// One instance, whichever replica holds it, with its history.
pub async fn record_anywhere(
    registry: &Registry,
    store: &Arc<dyn Store>,
    uid: crate::opamp::codec::InstanceUid,
) -> Result<Option<InstanceRecord>, StoreError> {
    if let Some(record) = registry.get(&uid) {
        return Ok(Some(record));
    }
    if !store.shared() {
        return Ok(None);
    }
    let reading = Arc::clone(store);
    let found = tokio::task::spawn_blocking(move || reading.instances_by_uid(&[uid.0], EVENTS_LOADED))
        .await
        .expect("reading does not panic")?;
    Ok(found.into_iter().next().map(|(instance, events)| registry.elsewhere(instance, events)))
}
