//! The config repository as plain values: what the Git shell reads, and the pure code that
//! turns it into desired state.
//!
//! `RepoSnapshot` is produced by `git::snapshot` and consumed by `desired::compile`; neither
//! side of that boundary knows the other's types.

pub mod desired;
pub mod hash;
pub mod lint;
pub mod manifest;
pub mod names;
pub mod version;
pub mod yaml;

use std::collections::BTreeMap;
use std::sync::Arc;

/// Largest configuration file gitfleet reads (bigger ones are a problem, not a crash).
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;
/// Largest fleet file gitfleet reads.
pub const MAX_FLEET_FILE_BYTES: u64 = 64 * 1024;

/// Everything gitfleet needs from one commit of the config repository.
#[derive(Clone, Debug, Default)]
pub struct RepoSnapshot {
    /// Full hex id of the commit at the tip of `branch`.
    pub commit: String,
    pub branch: String,
    /// Committer time of `commit`, seconds since the Unix epoch.
    pub commit_time: i64,
    /// Every entry under `configs/` and `fleets/` at `commit`, by path.
    pub files: BTreeMap<String, RepoFile>,
    /// Every tag in the repository, sorted by name. A tag that did not move between two
    /// reads is the same `Arc`, which lets the core reuse what it made of it.
    pub tags: Vec<Arc<TagSnapshot>>,
    /// The commit that last changed each `fleets/` file (what gave it its content at
    /// `commit`), by path: the commit a fleet's status belongs on.
    pub fleet_commits: BTreeMap<String, String>,
}

/// One entry of the tree. The Git shell does not judge it; `desired` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoFile {
    /// Hex object id: equal ids mean equal content, which lets the core reuse earlier work.
    pub blob_id: String,
    pub content: FileContent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileContent {
    Blob(Arc<[u8]>),
    /// Larger than the limit for its kind; not read.
    TooLarge {
        size: u64,
    },
    Symlink,
    /// A sub-directory or submodule where a file was expected.
    NotAFile,
}

/// One tag, peeled to its commit, with the candidate config files it publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagSnapshot {
    /// Short name, e.g. `gateway/v3`.
    pub name: String,
    /// The commit the tag points at (after peeling annotated tags), or `None` when the tag
    /// points at something that is not a commit.
    pub commit: Option<String>,
    /// Tagger time for annotated tags, committer time otherwise.
    pub time: i64,
    /// The annotated tag's message, trimmed; `None` for lightweight tags.
    pub note: Option<String>,
    /// `configs/<name>.yaml|.yml|.json` present at the tagged commit, by path.
    pub files: BTreeMap<String, RepoFile>,
}

/// The content type a configuration file carries in OpAMP, from its extension.
pub fn content_type_for_path(path: &str) -> Option<&'static str> {
    let (_, extension) = path.rsplit_once('.')?;
    match extension {
        "yaml" | "yml" => Some("text/yaml"),
        "json" => Some("application/json"),
        _ => None,
    }
}

/// The extensions a configuration file may have, in order of preference.
pub const CONFIG_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];
