//! Reads a `RepoSnapshot` out of a Git repository with gix.
//!
//! `SnapshotReader` keeps what it read last time (tags by target id, blobs by id), so a
//! read after a one-file push only touches the objects that changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use gix::ObjectId;
use gix::bstr::ByteSlice;

use crate::git::GitError;
use crate::repo::{
    CONFIG_EXTENSIONS, FileContent, MAX_CONFIG_BYTES, MAX_FLEET_FILE_BYTES, RepoFile, RepoSnapshot, TagSnapshot,
};

/// Directories of the repository gitfleet reads, with their file size limits.
const READ_DIRS: [(&str, u64); 2] = [("configs", MAX_CONFIG_BYTES), ("fleets", MAX_FLEET_FILE_BYTES)];

#[derive(Default)]
pub struct SnapshotReader {
    /// Tags by (name, id the ref points at); a tag that did not move is not read again.
    /// Shared with the snapshots, so that the core can tell an unchanged tag by pointer.
    tags: HashMap<(String, ObjectId), Arc<TagSnapshot>>,
    blobs: HashMap<ObjectId, Arc<[u8]>>,
    /// The commit that last changed each fleet file, with the blob it found there.
    fleet_commits: HashMap<String, (String, String)>,
}

/// How far back the walk for the commits that changed fleet files goes.
const MAX_HISTORY_WALK: usize = 100_000;

impl SnapshotReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the snapshot at `rev` (e.g. `refs/heads/main`, `HEAD`, `origin/main~2`).
    /// `branch` is only a label carried into the snapshot.
    pub fn read(&mut self, repo: &gix::Repository, rev: &str, branch: &str) -> Result<RepoSnapshot, GitError> {
        let resolve = |source| GitError::Resolve { rev: rev.to_owned(), source };
        let id = repo.rev_parse_single(rev).map_err(resolve)?;
        let commit = id.object().map_err(resolve)?.peel_to_commit().map_err(resolve)?;
        let commit_time = commit.time().map(|t| t.seconds).unwrap_or_default();
        let tree = commit.tree().map_err(|source| read_error("the commit's tree", source))?;

        let mut blobs_used = HashMap::new();
        let mut files = BTreeMap::new();
        for (dir, limit) in READ_DIRS {
            let Some(entry) = tree.find_entry(dir) else { continue };
            if !entry.mode().is_tree() {
                files.insert(
                    dir.to_owned(),
                    RepoFile { blob_id: entry.object_id().to_string(), content: FileContent::NotAFile },
                );
                continue;
            }
            let subtree =
                entry.object().and_then(|object| object.peel_to_tree()).map_err(|source| read_error(dir, source))?;
            for entry in subtree.iter() {
                let entry = entry.map_err(|source| read_error(dir, source))?;
                let path = format!("{dir}/{}", entry.filename().to_str_lossy());
                let file = self.file(repo, entry.mode(), entry.object_id(), limit, &mut blobs_used)?;
                files.insert(path, file);
            }
        }

        let mut tags = Vec::new();
        let mut tags_seen = HashMap::new();
        let references = repo.references().map_err(|source| read_error("references", source))?;
        for reference in references.tags().map_err(|source| read_error("tags", source))? {
            let reference = reference.map_err(|source| read_error("a tag", gix::Error::from_error(source)))?;
            let name = reference.name().shorten().to_str_lossy().into_owned();
            let Some(target) = reference.target().try_id().map(ToOwned::to_owned) else { continue };
            let key = (name.clone(), target);
            let tag = match self.tags.remove(&key) {
                Some(tag) => tag,
                None => Arc::new(self.read_tag(repo, &name, target, &mut blobs_used)?),
            };
            tags_seen.insert(key, Arc::clone(&tag));
            tags.push(tag);
        }
        tags.sort_by(|a, b| a.name.cmp(&b.name));
        self.tags = tags_seen;
        self.blobs = blobs_used;

        let fleet_commits = self.last_changes(&commit, &files)?;
        Ok(RepoSnapshot {
            commit: commit.id.to_string(),
            branch: branch.to_owned(),
            commit_time,
            files,
            tags,
            fleet_commits,
        })
    }

    /// The commit that last changed each `fleets/` file: walks first-parent history from
    /// `head` back to the commit that gave each file its current content. Commits that did
    /// not touch `fleets/` cost one tree lookup; what an earlier read found is reused while
    /// the file keeps its content.
    fn last_changes(
        &mut self,
        head: &gix::Commit<'_>,
        files: &BTreeMap<String, RepoFile>,
    ) -> Result<BTreeMap<String, String>, GitError> {
        let mut found = BTreeMap::new();
        let mut pending: HashMap<&str, Option<ObjectId>> = HashMap::new();
        for (path, file) in files.iter().filter(|(path, _)| path.starts_with("fleets/")) {
            match self.fleet_commits.get(path) {
                Some((blob_id, commit)) if *blob_id == file.blob_id => {
                    found.insert(path.clone(), commit.clone());
                }
                _ => {
                    pending.insert(path.as_str(), ObjectId::from_hex(file.blob_id.as_bytes()).ok());
                }
            }
        }
        let walk_error = |source| read_error("the history of fleets/", source);
        let mut child = head.clone();
        let mut child_tree = fleets_tree(&child)?;
        let mut walked = 0;
        while !pending.is_empty() {
            let parent = match child.parent_ids().next() {
                Some(id) if walked < MAX_HISTORY_WALK => {
                    id.object().and_then(|o| o.peel_to_commit()).map_err(walk_error)?
                }
                // The first commit, or as far as the walk goes: the rest date from here.
                _ => {
                    for (path, _) in pending.drain() {
                        found.insert(path.to_owned(), child.id.to_string());
                    }
                    break;
                }
            };
            walked += 1;
            let parent_tree = fleets_tree(&parent)?;
            if parent_tree.as_ref().map(|t| t.id) != child_tree.as_ref().map(|t| t.id) {
                pending.retain(|path, blob_id| {
                    let name = path.trim_start_matches("fleets/");
                    let before = parent_tree.as_ref().and_then(|tree| tree.find_entry(name)).map(|e| e.object_id());
                    if before.is_some() && before == *blob_id {
                        return true;
                    }
                    found.insert((*path).to_owned(), child.id.to_string());
                    false
                });
            }
            child = parent;
            child_tree = parent_tree;
        }
        self.fleet_commits = files
            .iter()
            .filter_map(|(path, file)| Some((path.clone(), (file.blob_id.clone(), found.get(path)?.clone()))))
            .collect();
        Ok(found)
    }

    fn read_tag(
        &mut self,
        repo: &gix::Repository,
        name: &str,
        target: ObjectId,
        blobs_used: &mut HashMap<ObjectId, Arc<[u8]>>,
    ) -> Result<TagSnapshot, GitError> {
        let what = || format!("tag {name}");
        let object = repo.find_object(target).map_err(|source| read_error(&what(), source))?;
        let mut note = None;
        let mut tag_time = None;
        if object.kind == gix::object::Kind::Tag {
            let tag = object.clone().try_into_tag().map_err(|source| read_error(&what(), source))?;
            let decoded = tag.decode().map_err(|source| read_error(&what(), source))?;
            let message = decoded.message.to_str_lossy().trim().to_owned();
            note = Some(message).filter(|m| !m.is_empty());
            let tagger = tag.tagger().map_err(|source| read_error(&what(), source))?;
            tag_time = tagger.and_then(|tagger| tagger.time().ok()).map(|t| t.seconds);
        }
        let Ok(commit) = object.peel_to_commit() else {
            return Ok(TagSnapshot {
                name: name.to_owned(),
                commit: None,
                time: tag_time.unwrap_or_default(),
                note,
                files: BTreeMap::new(),
            });
        };
        let time = tag_time.unwrap_or_else(|| commit.time().map(|t| t.seconds).unwrap_or_default());
        let mut files = BTreeMap::new();
        if let Some((config, _)) = name.split_once('/') {
            let tree = commit.tree().map_err(|source| read_error(&what(), source))?;
            for extension in CONFIG_EXTENSIONS {
                let path = format!("configs/{config}.{extension}");
                let entry = tree.lookup_entry_by_path(&path).map_err(|source| read_error(&path, source))?;
                if let Some(entry) = entry {
                    let file = self.file(repo, entry.mode(), entry.object_id(), MAX_CONFIG_BYTES, blobs_used)?;
                    files.insert(path, file);
                }
            }
        }
        Ok(TagSnapshot { name: name.to_owned(), commit: Some(commit.id.to_string()), time, note, files })
    }

    fn file(
        &mut self,
        repo: &gix::Repository,
        mode: gix::object::tree::EntryMode,
        id: ObjectId,
        limit: u64,
        blobs_used: &mut HashMap<ObjectId, Arc<[u8]>>,
    ) -> Result<RepoFile, GitError> {
        let blob_id = id.to_string();
        let content = if mode.is_link() {
            FileContent::Symlink
        } else if !mode.is_blob() {
            FileContent::NotAFile
        } else if let Some(body) = self.blobs.get(&id).or_else(|| blobs_used.get(&id)) {
            let body = Arc::clone(body);
            blobs_used.insert(id, Arc::clone(&body));
            FileContent::Blob(body)
        } else {
            let header = repo.find_header(id).map_err(|source| read_error(&format!("blob {blob_id}"), source))?;
            if header.size() > limit {
                FileContent::TooLarge { size: header.size() }
            } else {
                let blob = repo.find_object(id).map_err(|source| read_error(&format!("blob {blob_id}"), source))?;
                let body: Arc<[u8]> = Arc::from(blob.data.as_slice());
                blobs_used.insert(id, Arc::clone(&body));
                FileContent::Blob(body)
            }
        };
        Ok(RepoFile { blob_id, content })
    }
}

/// The `fleets/` tree of a commit, if it has one.
fn fleets_tree<'repo>(commit: &gix::Commit<'repo>) -> Result<Option<gix::Tree<'repo>>, GitError> {
    let walk_error = |source| read_error("the history of fleets/", source);
    let tree = commit.tree().map_err(walk_error)?;
    match tree.find_entry("fleets") {
        Some(entry) if entry.mode().is_tree() => {
            Ok(Some(entry.object().and_then(|o| o.peel_to_tree()).map_err(walk_error)?))
        }
        _ => Ok(None),
    }
}

fn read_error(what: &str, source: gix::Error) -> GitError {
    GitError::Read { what: what.to_owned(), source }
}
