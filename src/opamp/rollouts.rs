//! Every fleet's rollout, kept in step with the desired state and moved on by what the
//! fleet's instances report. The rules are in `rollout` (pure); this is the book keeping:
//! which fleets' rollouts changed, storing them, and handing out only what is stored, so that
//! a restart (or a kill) never finds an instance on a version its rollout does not know of.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tracing::{info, warn};

use crate::opamp::registry::{InstanceRecord, Registry};
use crate::repo::desired::{DesiredState, Fleet};
use crate::rollout::{Rollout, State, Strategy, VersionChange, VersionRef};
use crate::store::{Store, StoreError, StoredRollout};

/// Each fleet's rollout: the working copies, and the ones stored (which targets use).
#[derive(Default)]
pub struct RolloutBook {
    working: BTreeMap<String, Rollout>,
    /// Fleets whose working copy is not stored yet (`None` in `working`: forget it).
    unsaved: BTreeSet<String>,
    stored: BTreeMap<String, Arc<Rollout>>,
}

impl RolloutBook {
    /// The rollouts in the store; one that cannot be read is dropped with a warning (the
    /// fleet then starts from where it is, with no rollout).
    pub fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let mut book = Self::default();
        for (fleet, stored) in store.rollouts()? {
            let members = crate::rollout::members_from_bytes(&stored.members);
            let read =
                serde_json::from_str::<Rollout>(&stored.body).map_err(|error| error.to_string()).and_then(|rollout| {
                    match members {
                        Some(members) => Ok(Rollout { members, ..rollout }),
                        None => Err("its members are not in their stored form".to_owned()),
                    }
                });
            match read {
                Ok(rollout) => {
                    book.stored.insert(fleet.clone(), Arc::new(rollout.clone()));
                    book.working.insert(fleet, rollout);
                }
                Err(error) => warn!(%fleet, %error, "dropping a stored rollout that cannot be read"),
            }
        }
        Ok(book)
    }

    /// The stored rollouts: what instances are assigned by.
    pub fn stored(&self) -> &BTreeMap<String, Arc<Rollout>> {
        &self.stored
    }

    /// The fleets whose instances `follow` or `advance` look at now: those moving to a new
    /// version, and those whose rollout is running, held or halted.
    pub fn wanting_facts(&self, desired: &DesiredState) -> Vec<String> {
        desired
            .fleets
            .values()
            .filter(|fleet| {
                let Some(version) = fleet.assignment.as_deref() else { return false };
                self.working.get(fleet.name()).is_some_and(|rollout| {
                    let moving = rollout.to.tag != version.tag || rollout.to.hash != hex::encode(version.config_hash);
                    // Strategy `all` takes a new version at once, without looking.
                    matches!(rollout.state, State::Running | State::Held | State::Halted)
                        || (moving && fleet.spec.rollout.strategy != Strategy::All)
                })
            })
            .map(|fleet| fleet.name().to_owned())
            .collect()
    }

    pub fn any_active(&self) -> bool {
        self.working.values().any(|rollout| matches!(rollout.state, State::Running | State::Held))
    }

    /// A running rollout's bake is over by `now_ms`: time alone moves it on.
    pub fn bake_over(&self, desired: &DesiredState, now_ms: i64) -> bool {
        self.working.iter().any(|(name, rollout)| {
            let bake = desired.fleets.get(name).map_or(0, |fleet| fleet.spec.rollout.bake.as_millis());
            rollout.state == State::Running
                && rollout
                    .settled_since_ms
                    .is_some_and(|since| since + i64::try_from(bake).unwrap_or(i64::MAX) <= now_ms)
        })
    }

    /// Follows the desired state: a fleet on a new version starts a rollout (or takes it at
    /// once: strategy `all`, a first version, an earlier version), a halted rollout looks at
    /// its budget again, removed fleets are forgotten.
    pub fn follow(&mut self, desired: &DesiredState, instances: &Instances<'_>, now_ms: i64) {
        let gone: Vec<String> = self.working.keys().filter(|f| !desired.fleets.contains_key(*f)).cloned().collect();
        for fleet in gone {
            self.working.remove(&fleet);
            self.unsaved.insert(fleet);
        }
        for fleet in desired.fleets.values() {
            let Some(version) = fleet.assignment.as_deref() else {
                if self.working.remove(fleet.name()).is_some() {
                    self.unsaved.insert(fleet.name().to_owned());
                }
                continue;
            };
            let to = VersionRef { tag: version.tag.clone(), hash: hex::encode(version.config_hash) };
            let next = match self.working.get_mut(fleet.name()) {
                None => Some(Rollout::settled(None, to, None, now_ms)),
                Some(current) if current.to == to => {
                    // Only a halted rollout has anything to look at again; a pass over the
                    // fleet's instances for every fleet on every reconcile would be waste.
                    if current.state != State::Halted {
                        continue;
                    }
                    let facts = facts(instances, fleet, current, now_ms);
                    if current.reconsider(&fleet.spec.rollout, &facts, now_ms) {
                        info!(fleet = fleet.name(), "halted rollout runs on: its failures fit the budget now");
                        self.unsaved.insert(fleet.name().to_owned());
                    }
                    None
                }
                Some(current) => Some(changed(current, to, fleet, desired, instances, now_ms)),
            };
            if let Some(next) = next {
                info!(fleet = fleet.name(), to = %next.to.tag, state = next.state.as_str(), reason = next.reason.as_deref().unwrap_or(""), "rollout");
                self.working.insert(fleet.name().to_owned(), next);
                self.unsaved.insert(fleet.name().to_owned());
            }
        }
    }

    /// Moves running and held rollouts on from what their instances report.
    pub fn advance(&mut self, desired: &DesiredState, instances: &Instances<'_>, now_ms: i64) {
        for (name, rollout) in &mut self.working {
            if !matches!(rollout.state, State::Running | State::Held) {
                continue;
            }
            let Some(fleet) = desired.fleets.get(name) else { continue };
            let facts = facts(instances, fleet, rollout, now_ms);
            let state = rollout.state;
            let step = rollout.step;
            if rollout.advance(&fleet.spec.rollout, &facts, now_ms) {
                if (state, step) != (rollout.state, rollout.step) {
                    info!(fleet = %name, to = %rollout.to.tag, state = rollout.state.as_str(), step = rollout.step + 1, steps = rollout.steps.len(), reason = rollout.reason.as_deref().unwrap_or(""), "rollout");
                }
                self.unsaved.insert(name.clone());
            }
        }
    }

    /// Stores what changed, then hands it out. Returns whether the stored rollouts changed;
    /// on a failed write they stay as they were and the write is tried again next time.
    pub async fn save(&mut self, store: &Arc<dyn Store>) -> bool {
        if self.unsaved.is_empty() {
            return false;
        }
        let changed: Vec<(String, Option<StoredRollout>)> = self
            .unsaved
            .iter()
            .map(|fleet| {
                let stored = self.working.get(fleet).map(|rollout| StoredRollout {
                    body: serde_json::to_string(rollout).expect("rollouts serialize"),
                    members: crate::rollout::members_to_bytes(&rollout.members),
                });
                (fleet.clone(), stored)
            })
            .collect();
        let writer = Arc::clone(store);
        let written = tokio::task::spawn_blocking(move || writer.save_rollouts(&changed)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                warn!(%error, "cannot store rollouts; they wait until the store takes them");
                return false;
            }
            Err(_) => {
                warn!("storing rollouts panicked");
                return false;
            }
        }
        for fleet in std::mem::take(&mut self.unsaved) {
            match self.working.get(&fleet) {
                Some(rollout) => self.stored.insert(fleet, Arc::new(rollout.clone())),
                None => self.stored.remove(&fleet),
            };
        }
        true
    }
}

/// The fleet moved from `current.to` to `to`: what its rollout is now.
fn changed(
    current: &Rollout,
    to: VersionRef,
    fleet: &Fleet,
    desired: &DesiredState,
    instances: &Instances<'_>,
    now_ms: i64,
) -> Rollout {
    let active = current.state.is_active();
    let back_to_before = active && current.from.as_ref().is_some_and(|from| from.tag == to.tag);
    if back_to_before || crate::rollout::is_earlier(&to.tag, &current.to.tag) {
        let reason = if active {
            format!("{} went back to {} in Git: every instance takes it at once", current.to.tag, to.tag)
        } else {
            format!("{} is earlier than {}: every instance takes it at once", to.tag, current.to.tag)
        };
        let mut settled = Rollout::settled(Some(current.to.clone()), to, Some(reason), now_ms);
        if active {
            settled.state = State::Reverted;
        }
        return settled;
    }
    // A rollout that is still deciding starts over from the version before it; after a
    // rollback, that version is what the instances run.
    let from =
        if active || current.state == State::RolledBack { current.from.clone() } else { Some(current.to.clone()) };
    let spec = &fleet.spec.rollout;
    let servable = from.as_ref().is_some_and(|from| version_of(desired, &from.tag).is_some());
    if spec.strategy == Strategy::All || !servable {
        let reason = (!servable && spec.strategy != Strategy::All)
            .then(|| "the version before is no longer published: every instance takes the new one at once".to_owned());
        return Rollout::settled(from, to, reason, now_ms);
    }
    let change = VersionChange { from, to, spec, replacing: active.then_some(current), now_ms };
    let live = {
        let stale_after = stale_after_ms(fleet);
        instances.facts(fleet.name(), &[], &[], stale_after, now_ms).iter().filter(|f| f.live).count()
    };
    let mut rollout = Rollout::plan(change, live).expect("a strategy other than all has steps");
    let facts = facts(instances, fleet, &rollout, now_ms);
    rollout.begin(spec, &facts, now_ms);
    rollout
}

/// The published version with `tag` (a deleted tag's version too, while it is remembered).
pub fn version_of<'d>(desired: &'d DesiredState, tag: &str) -> Option<&'d Arc<crate::repo::desired::Version>> {
    let (config, version) = tag.split_once('/')?;
    let configuration = desired.configs.get(config)?;
    configuration.find(version).or_else(|| configuration.find_deleted(version))
}

fn stale_after_ms(fleet: &Fleet) -> i64 {
    i64::try_from(fleet.spec.health.stale_after.as_millis()).unwrap_or(i64::MAX)
}

fn facts(instances: &Instances<'_>, fleet: &Fleet, rollout: &Rollout, now_ms: i64) -> Vec<crate::rollout::Fact> {
    let mut to = [0u8; 32];
    let to = match hex::decode_to_slice(&rollout.to.hash, &mut to) {
        Ok(()) => to.to_vec(),
        Err(_) => Vec::new(),
    };
    instances.facts(fleet.name(), &rollout.steps, &to, stale_after_ms(fleet), now_ms)
}

/// The instances rollouts look at: this replica's records and, on a shared store, the
/// other replicas' instances of the fleets that need them, read just before
/// (`RolloutBook::wanting_facts`).
pub struct Instances<'a> {
    pub registry: &'a Registry,
    pub elsewhere: &'a HashMap<String, Vec<InstanceRecord>>,
}

impl Instances<'_> {
    /// `Registry::rollout_facts` over every replica's instances of `fleet`.
    fn facts(
        &self,
        fleet: &str,
        steps: &[crate::rollout::Step],
        to: &[u8],
        stale_after_ms: i64,
        now_ms: i64,
    ) -> Vec<crate::rollout::Fact> {
        let mut facts = self.registry.rollout_facts(fleet, steps, to, stale_after_ms, now_ms);
        if let Some(records) = self.elsewhere.get(fleet) {
            facts.extend(records.iter().map(|record| record.rollout_fact(steps, to, now_ms, stale_after_ms)));
            facts.sort_unstable_by_key(|fact| fact.uid);
        }
        facts
    }
}
