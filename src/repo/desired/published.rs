//! The desired state as the leader publishes it to the other replicas, through the shared
//! store. Versions go by tag alone: their content is already in the store, remembered before
//! it was first served, so a publish stays small however many versions there are.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Configuration, DesiredState, Fleet, LastGoodFleet, SeenVersion, Version};
use crate::problem::Problem;
use crate::repo::manifest::FleetSpec;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub commit: String,
    pub branch: String,
    pub commit_time: i64,
    configs: Vec<PublishedConfig>,
    fleets: Vec<PublishedFleet>,
    problems: Vec<Problem>,
    last_good: BTreeMap<String, LastGoodFleet>,
    unresolved: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PublishedConfig {
    name: String,
    head_file: Option<String>,
    versions: Vec<PublishedVersion>,
    deleted: Vec<PublishedVersion>,
}

/// A version: its tag, and where the tag points now when it moved after it was first seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PublishedVersion {
    tag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    moved_to: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PublishedFleet {
    spec: FleetSpec,
    /// The tag it is assigned.
    assignment: Option<String>,
    kept_last_good: bool,
}

/// A published version whose content the store does not hold (yet).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("version {0} is published but not in the store")]
pub struct MissingVersion(pub String);

impl Published {
    pub fn of(desired: &DesiredState) -> Self {
        let version =
            |version: &Arc<Version>| PublishedVersion { tag: version.tag.clone(), moved_to: version.moved_to.clone() };
        Self {
            commit: desired.commit.clone(),
            branch: desired.branch.clone(),
            commit_time: desired.commit_time,
            configs: desired
                .configs
                .values()
                .map(|config| PublishedConfig {
                    name: config.name.clone(),
                    head_file: config.head_file.clone(),
                    versions: config.versions.iter().map(version).collect(),
                    deleted: config.deleted.iter().map(version).collect(),
                })
                .collect(),
            fleets: desired
                .fleets
                .values()
                .map(|fleet| PublishedFleet {
                    spec: fleet.spec.clone(),
                    assignment: fleet.assignment.as_ref().map(|version| version.tag.clone()),
                    kept_last_good: fleet.kept_last_good,
                })
                .collect(),
            problems: desired.problems.clone(),
            last_good: desired.last_good.clone(),
            unresolved: desired.unresolved.clone(),
        }
    }

    /// Every tag whose content `desired` needs.
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        self.configs.iter().flat_map(|config| config.versions.iter().chain(&config.deleted)).map(|v| v.tag.as_str())
    }

    /// The desired state again, with each version's content from `seen` (the store's).
    pub fn desired(&self, seen: &BTreeMap<String, SeenVersion>) -> Result<DesiredState, MissingVersion> {
        let mut versions: BTreeMap<&str, Arc<Version>> = BTreeMap::new();
        let mut resolve = |published: &PublishedVersion| {
            let first = seen.get(&published.tag).ok_or_else(|| MissingVersion(published.tag.clone()))?;
            let version = Arc::new(Version { moved_to: published.moved_to.clone(), ..first.clone() });
            versions.insert(first.tag.as_str(), Arc::clone(&version));
            Ok::<_, MissingVersion>(version)
        };
        let mut configs = BTreeMap::new();
        for config in &self.configs {
            let configuration = Configuration {
                name: config.name.clone(),
                head_file: config.head_file.clone(),
                versions: config.versions.iter().map(&mut resolve).collect::<Result<_, _>>()?,
                deleted: config.deleted.iter().map(&mut resolve).collect::<Result<_, _>>()?,
            };
            configs.insert(config.name.clone(), configuration);
        }
        let mut fleets = BTreeMap::new();
        for fleet in &self.fleets {
            let assignment = match &fleet.assignment {
                Some(tag) => Some(Arc::clone(versions.get(tag.as_str()).ok_or_else(|| MissingVersion(tag.clone()))?)),
                None => None,
            };
            let resolved = Fleet { spec: fleet.spec.clone(), assignment, kept_last_good: fleet.kept_last_good };
            fleets.insert(fleet.spec.name.clone(), resolved);
        }
        Ok(DesiredState {
            commit: self.commit.clone(),
            branch: self.branch.clone(),
            commit_time: self.commit_time,
            configs,
            fleets,
            problems: self.problems.clone(),
            last_good: self.last_good.clone(),
            unresolved: self.unresolved.clone(),
            cache: Default::default(),
        })
    }
}
