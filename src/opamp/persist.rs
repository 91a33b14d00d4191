//! Writes instance changes to the store in batches, one transaction every `FLUSH_EVERY`:
//! never a write per heartbeat (`last_seen` alone is written once a minute at most), and a
//! last flush on shutdown. Instances silent for `--forget-after` are forgotten, in memory
//! and in the store.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::opamp::registry::{AvailableComponents, InstanceRecord, Registry, Unsaved};
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
/// History entries taken in with an instance another replica wrote: the page and the API
/// show these; the store keeps `EVENTS_KEPT`.
const EVENTS_MERGED: usize = 10;

/// Loads every remembered instance into the registry; they are `stale` until heard from,
/// but for those another replica wrote last, which it may hold live (`Registry::merge`).
pub async fn restore(registry: &Registry, store: Arc<dyn Store>, replica: &str) -> Result<usize, StoreError> {
    let (lists, loaded) = tokio::task::spawn_blocking(move || {
        store.prune_events(EVENTS_KEPT)?;
        Ok::<_, StoreError>((store.available_components()?, store.load_instances(EVENTS_LOADED)?))
    })
    .await
    .expect("loading instances does not panic")?;
    registry.restore_components(lists.into_iter().filter_map(|(hash, body)| {
        let list: AvailableComponents = serde_json::from_str(&body).ok()?;
        Some(AvailableComponents { hash, ..list })
    }));
    let count = loaded.len();
    let (others, own): (Vec<_>, Vec<_>) =
        loaded.into_iter().partition(|(instance, _)| !instance.holder.is_empty() && instance.holder != replica);
    registry.restore(own.into_iter().map(|(instance, events)| {
        let components = instance.components_hash.as_deref().and_then(|hash| registry.components(hash));
        let mut record = InstanceRecord::from_stored(instance, events);
        record.components = components;
        record
    }));
    registry.merge(others);
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
    let mut merge_tick = tokio::time::interval(MERGE_EVERY);
    merge_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut others = Others::default();
    loop {
        let stopping = tokio::select! {
            () = cancel.cancelled() => true,
            _ = flush_tick.tick() => false,
            _ = merge_tick.tick() => {
                others.take_in(&registry, &store, &replica).await;
                continue;
            }
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

/// How often a replica takes in what the others wrote.
const MERGE_EVERY: Duration = Duration::from_secs(1);
/// How far behind the highest change number a replica reads again: a write takes its number
/// before it commits, so a write committed late has a number below ones already read.
const MERGE_LAG: Duration = Duration::from_secs(5);

/// Where a replica stands in what the others wrote: the highest change number read, as of
/// when, for the last `MERGE_LAG`; and which change of each instance it took in within that
/// window, so reading behind costs a list of ids, not the instances again.
#[derive(Default)]
struct Others {
    read: std::collections::VecDeque<(tokio::time::Instant, i64)>,
    taken: std::collections::HashMap<[u8; 16], i64>,
    failing: bool,
}

/// Instances fetched per query while taking in what others wrote.
const MERGE_CHUNK: usize = 2000;

impl Others {
    /// Reads what other replicas wrote since a little before the last read, into the
    /// registry.
    async fn take_in(&mut self, registry: &Arc<Registry>, store: &Arc<dyn Store>, replica: &Arc<str>) {
        let now = tokio::time::Instant::now();
        while self.read.len() > 1 && self.read[1].0 + MERGE_LAG <= now {
            self.read.pop_front();
        }
        let after = self.read.front().map_or(0, |(_, highest)| *highest);
        self.taken.retain(|_, number| *number > after);
        let taken = self.taken.clone();
        let (reading, name) = (Arc::clone(store), Arc::clone(replica));
        let read = tokio::task::spawn_blocking(move || {
            let changes = reading.instance_changes(after, &name)?;
            let highest = changes.iter().map(|(_, number)| *number).max();
            let wanted: Vec<[u8; 16]> = changes
                .into_iter()
                .filter(|(uid, number)| taken.get(uid).is_none_or(|seen| seen < number))
                .map(|(uid, _)| uid)
                .collect();
            let mut rows = Vec::with_capacity(wanted.len());
            for chunk in wanted.chunks(MERGE_CHUNK) {
                rows.extend(reading.instances_by_uid(chunk, EVENTS_MERGED)?);
            }
            Ok::<_, StoreError>((highest, rows))
        })
        .await
        .expect("reading does not panic");
        match read {
            Ok((highest, rows)) => {
                if self.failing {
                    info!("reading what other replicas wrote again");
                    self.failing = false;
                }
                let highest = highest.unwrap_or(after).max(self.read.back().map_or(0, |(_, last)| *last));
                for (instance, _, number) in &rows {
                    self.taken.insert(instance.uid, *number);
                }
                let merged = registry.merge(rows.into_iter().map(|(instance, events, _)| (instance, events)));
                if merged > 0 {
                    debug!(instances = merged, "took in instances other replicas wrote");
                }
                self.read.push_back((now, highest));
            }
            Err(error) => {
                if !self.failing {
                    warn!(%error, "cannot read what other replicas wrote; trying again");
                    self.failing = true;
                }
            }
        }
    }
}

/// Instances written per transaction.
const SAVE_CHUNK: usize = 250;
