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
}

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

        Ok(RepoSnapshot { commit: commit.id.to_string(), branch: branch.to_owned(), commit_time, files, tags })
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

fn read_error(what: &str, source: gix::Error) -> GitError {
    GitError::Read { what: what.to_owned(), source }
}
