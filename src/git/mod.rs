//! The Git shell: reading snapshots with gix, keeping a mirror of the remote up to date, and
//! the watcher that decides when to look again.

pub mod mirror;
pub mod snapshot;
pub mod status_branch;
pub mod watcher;
pub mod webhook;

/// Errors from Git operations, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot open repository {path}: {source}")]
    Open { path: String, source: gix::Error },
    #[error("cannot resolve `{rev}`: {source}")]
    Resolve { rev: String, source: gix::Error },
    #[error("cannot read {what}: {source}")]
    Read { what: String, source: gix::Error },
    #[error("cannot fetch {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("cannot write {what}: {source}")]
    Write { what: String, source: gix::Error },
}
