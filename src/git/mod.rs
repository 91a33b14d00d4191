//! The Git shell: reading snapshots with gix, keeping a mirror of the remote up to date, and
//! the watcher that decides when to look again.

pub mod mirror;
pub mod snapshot;
pub mod status_branch;
pub mod watcher;
pub mod webhook;

use std::path::Path;

/// Errors from Git operations, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot open repository {path}: {source}")]
    Open { path: String, source: gix::Error },
    #[error("cannot open repository {path}: {what}: permission denied (the repository must be readable by this user)")]
    PermissionDenied { path: String, what: String },
    #[error("cannot open repository {path}: it does not exist")]
    Missing { path: String },
    #[error("cannot resolve `{rev}`: {source}")]
    Resolve { rev: String, source: gix::Error },
    #[error("cannot read {what}: {source}")]
    Read { what: String, source: gix::Error },
    #[error("cannot fetch {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("cannot write {what}: {source}")]
    Write { what: String, source: gix::Error },
}

/// Opens the repository that `path` is in, as `git` finds it. A repository this user cannot
/// read is said to be so, rather than "not a repository".
pub fn discover(path: &Path) -> Result<gix::Repository, GitError> {
    let shown = path.display().to_string();
    if std::fs::symlink_metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return Err(GitError::Missing { path: shown });
    }
    gix::discover(path).map_err(|source| match unreadable(path) {
        Some(what) => GitError::PermissionDenied { path: shown.clone(), what },
        None => GitError::Open { path: shown, source },
    })
}

/// The first of the directories and files of the repository at `path` that this user cannot
/// read, if any:
/// gix reports those as "no repository there", which sends people looking in the wrong
/// place.
pub fn unreadable(path: &Path) -> Option<String> {
    let denied = |result: std::io::Result<()>| result.is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied);
    let read_dir = |dir: &Path| std::fs::read_dir(dir).map(drop);
    let read_file = |file: &Path| std::fs::File::open(file).map(drop);
    if denied(read_dir(path)) {
        return Some(path.display().to_string());
    }
    for git_dir in [path.join(".git"), path.to_path_buf()] {
        for (file, is_dir) in [("", true), ("HEAD", false), ("objects", true), ("refs", true), ("config", false)] {
            let entry = if file.is_empty() { git_dir.clone() } else { git_dir.join(file) };
            if !entry.exists() && !denied(std::fs::symlink_metadata(&entry).map(drop)) {
                continue;
            }
            let result = if is_dir { read_dir(&entry) } else { read_file(&entry) };
            if denied(result) {
                return Some(entry.display().to_string());
            }
        }
    }
    None
}
