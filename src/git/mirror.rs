//! A bare mirror of the config repository in the data directory, kept up to date with gix.
//!
//! Branches and tags are fetched with forced refspecs (force-pushed history and moved tags
//! are taken as they are; immutability is enforced later, by the core) and refs that
//! disappeared from the remote are pruned, so the mirror shows what the remote shows.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use gix::bstr::BString;
use gix::refs::transaction::{Change, PreviousValue, RefEdit, RefLog};
use gix::remote::Direction;

use crate::git::GitError;

const REFSPECS: [&str; 2] = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];

pub struct Mirror {
    url: String,
    path: PathBuf,
    repo: gix::ThreadSafeRepository,
}

impl Mirror {
    /// Opens the mirror at `path`, creating an empty bare repository there if needed.
    /// `url` is a remote URL (`https://…`, `ssh://…`, `file://…`) or a local path.
    pub fn open(url: &str, path: &Path) -> Result<Self, GitError> {
        let open_error = |source| GitError::Open { path: path.display().to_string(), source };
        let repo = if path.join("HEAD").exists() {
            gix::open(path).map_err(open_error)?
        } else {
            std::fs::create_dir_all(path).map_err(|error| open_error(gix::Error::from_error(error)))?;
            gix::init_bare(path).map_err(open_error)?
        };
        Ok(Self { url: normalize_url(url), path: path.to_owned(), repo: repo.into_sync() })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle for reading on the current thread.
    pub fn repo(&self) -> gix::Repository {
        self.repo.to_thread_local()
    }

    /// Fetches branches and tags from the remote and prunes refs it no longer has.
    /// Blocking: call it from a blocking thread.
    pub fn fetch(&self) -> Result<(), GitError> {
        let fetch_error = |message: String| GitError::Fetch { url: self.url.clone(), message };
        let repo = self.repo();
        let remote = repo
            .remote_at(self.url.as_str())
            .map_err(|e| fetch_error(e.to_string()))?
            .with_fetch_tags(gix::remote::fetch::Tags::None)
            .with_refspecs(REFSPECS, Direction::Fetch)
            .map_err(|e| fetch_error(e.to_string()))?;
        let connection = remote.connect(Direction::Fetch).map_err(|e| fetch_error(e.to_string()))?;
        let interrupt = AtomicBool::new(false);
        let outcome = connection
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(|e| fetch_error(e.to_string()))?
            .with_write_packed_refs_only(true)
            .receive(gix::progress::Discard, &interrupt)
            .map_err(|e| fetch_error(e.to_string()))?;

        let advertised: HashSet<BString> =
            outcome.ref_map.remote_refs.iter().map(|r| r.unpack().0.to_owned()).collect();
        let mut prune = Vec::new();
        let references = repo.references().map_err(|source| GitError::Read { what: "references".into(), source })?;
        let all = references.all().map_err(|source| GitError::Read { what: "references".into(), source })?;
        for reference in all.flatten() {
            let name = reference.name().as_bstr();
            let ours = name.starts_with(b"refs/heads/") || name.starts_with(b"refs/tags/");
            if ours && !advertised.contains(name) {
                prune.push(RefEdit {
                    change: Change::Delete { expected: PreviousValue::Any, log: RefLog::AndReference },
                    name: reference.name().to_owned(),
                    deref: false,
                });
            }
        }
        if !prune.is_empty() {
            repo.edit_references(prune)
                .map_err(|source| GitError::Write { what: "pruned references".into(), source })?;
        }
        Ok(())
    }

    /// A fingerprint of every branch and tag of the mirror: equal fingerprints mean nothing
    /// to read again.
    pub fn refs_fingerprint(&self) -> Result<u64, GitError> {
        use std::hash::{Hash, Hasher};
        let repo = self.repo();
        let read_error = |source| GitError::Read { what: "references".into(), source };
        let references = repo.references().map_err(read_error)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for reference in references.all().map_err(read_error)?.flatten() {
            reference.name().as_bstr().hash(&mut hasher);
            if let Some(id) = reference.target().try_id() {
                id.as_bytes().hash(&mut hasher);
            }
        }
        Ok(hasher.finish())
    }
}

/// Local paths become absolute so that the mirror does not depend on the working directory.
fn normalize_url(url: &str) -> String {
    if url.contains("://") || url.contains('@') {
        return url.to_owned();
    }
    std::fs::canonicalize(url).map(|p| p.display().to_string()).unwrap_or_else(|_| url.to_owned())
}

/// The Git directory of a repository given as a local path, for the filesystem watch.
/// `None` for URLs, `file://` included: those are fetched on the poll interval and on
/// webhooks, like any remote.
pub fn local_git_dir(url: &str) -> Option<PathBuf> {
    if url.contains("://") {
        return None;
    }
    let path = PathBuf::from(url);
    let dot_git = path.join(".git");
    if dot_git.is_dir() {
        Some(dot_git)
    } else if path.join("HEAD").is_file() && path.join("refs").is_dir() {
        Some(path)
    } else {
        None
    }
}
