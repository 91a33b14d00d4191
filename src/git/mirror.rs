//! A bare mirror of the config repository in the data directory, kept up to date with gix.
//!
//! Branches and tags are fetched with forced refspecs (force-pushed history and moved tags
//! are taken as they are; immutability is enforced later, by the core) and refs that
//! disappeared from the remote are pruned, so the mirror shows what the remote shows.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use gix::ObjectId;
use gix::bstr::BString;
use gix::refs::transaction::{Change, PreviousValue, RefEdit, RefLog};
use gix::remote::Direction;

use crate::git::GitError;

const REFSPECS: [&str; 2] = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];
/// Up to this many changed refs are fetched one by one; more, and the wildcards are used.
const EXPLICIT_REFSPECS_UP_TO: usize = 64;

pub struct Mirror {
    url: String,
    repo: gix::ThreadSafeRepository,
    /// A ref the mirror leaves out: the status branch gitfleet itself pushes.
    ignored: Option<BString>,
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
        Ok(Self { url: normalize_url(url), repo: repo.into_sync(), ignored: None })
    }

    /// Leaves `full_ref` (like `refs/heads/gitfleet/status`) out of every fetch, so that
    /// gitfleet's own pushes are not taken for changes to the desired state.
    pub fn ignoring(mut self, full_ref: Option<String>) -> Self {
        self.ignored = full_ref.map(BString::from);
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A handle for reading on the current thread.
    pub fn repo(&self) -> gix::Repository {
        self.repo.to_thread_local()
    }

    /// The branches the mirror has (the remote's, as of the last fetch), sorted.
    pub fn branches(&self) -> Vec<String> {
        let repo = self.repo();
        let Ok(references) = repo.references() else { return Vec::new() };
        let Ok(branches) = references.local_branches() else { return Vec::new() };
        let mut names: Vec<String> =
            branches.flatten().map(|reference| reference.name().shorten().to_string()).collect();
        names.sort();
        names
    }

    /// Fetches branches and tags from the remote and prunes refs it no longer has.
    /// Blocking: call it from a blocking thread.
    ///
    /// The remote's refs are listed first and compared with the mirror's, and only the refs
    /// that changed are fetched: with thousands of tags, a fetch of every ref costs seconds,
    /// while listing them costs milliseconds. Returns whether any ref changed.
    pub fn fetch(&self) -> Result<bool, GitError> {
        let fetch_error = |message: String| GitError::Fetch { url: self.url.clone(), message };
        let repo = self.repo();
        let interrupt = AtomicBool::new(false);

        let source = self.local_source()?;
        let mut remote_refs = match &source {
            Some(source) => refs_of(source)?,
            None => self.list_remote_refs(&repo)?,
        };
        if let Some(ignored) = &self.ignored {
            remote_refs.remove(ignored);
        }
        let local_refs = refs_of(&repo)?;

        let changed: Vec<&BString> =
            remote_refs.iter().filter(|(name, id)| local_refs.get(*name) != Some(id)).map(|(name, _)| name).collect();
        let copied = match &source {
            Some(source) if !changed.is_empty() && changed.len() <= EXPLICIT_REFSPECS_UP_TO => {
                self.copy_from_local(source, &repo, &changed, &remote_refs)?
            }
            _ => false,
        };
        if !changed.is_empty() && !copied {
            let refspecs: Vec<String> = if changed.len() > EXPLICIT_REFSPECS_UP_TO {
                REFSPECS.iter().map(|s| (*s).to_owned()).collect()
            } else {
                changed.iter().map(|name| format!("+{name}:{name}")).collect()
            };
            self.remote(&repo, refspecs.into_iter())?
                .connect(Direction::Fetch)
                .map_err(|e| fetch_error(e.to_string()))?
                .prepare_fetch(gix::progress::Discard, Default::default())
                .map_err(|e| fetch_error(e.to_string()))?
                .with_write_packed_refs_only(changed.len() > EXPLICIT_REFSPECS_UP_TO)
                .receive(gix::progress::Discard, &interrupt)
                .map_err(|e| fetch_error(e.to_string()))?;
        }

        let prune: Vec<RefEdit> = local_refs
            .keys()
            .filter(|name| !remote_refs.contains_key(*name))
            .filter_map(|name| gix::refs::FullName::try_from(name.clone()).ok())
            .map(|name| RefEdit {
                change: Change::Delete { expected: PreviousValue::Any, log: RefLog::AndReference },
                name,
                deref: false,
            })
            .collect();
        let pruned = !prune.is_empty();
        if pruned {
            repo.edit_references(prune)
                .map_err(|source| GitError::Write { what: "pruned references".into(), source })?;
        }
        Ok(!changed.is_empty() || pruned)
    }

    /// The remote's branches and tags, listed over the Git protocol.
    fn list_remote_refs(&self, repo: &gix::Repository) -> Result<HashMap<BString, ObjectId>, GitError> {
        let fetch_error = |message: String| GitError::Fetch { url: self.url.clone(), message };
        let listing = self.remote(repo, REFSPECS.iter().map(|s| (*s).to_owned()))?;
        let (ref_map, _handshake) = listing
            .connect(Direction::Fetch)
            .map_err(|e| fetch_error(e.to_string()))?
            .ref_map(gix::progress::Discard, Default::default())
            .map_err(|e| fetch_error(e.to_string()))?;
        Ok(ref_map
            .remote_refs
            .iter()
            .filter_map(|r| {
                let (name, target, _peeled) = r.unpack();
                Some((name.to_owned(), target?.to_owned())).filter(|(name, _)| is_branch_or_tag(name))
            })
            .collect())
    }

    /// The source repository when the remote is on this machine (a path or `file://`).
    fn local_source(&self) -> Result<Option<gix::Repository>, GitError> {
        let Some(path) = local_path(&self.url) else { return Ok(None) };
        gix::open_opts(&path, gix::open::Options::isolated())
            .map(Some)
            .map_err(|error| GitError::Fetch { url: self.url.clone(), message: error.to_string() })
    }

    /// Copies the objects that `changed` refs need from a local source and moves the refs,
    /// as `git clone --local` does. Returns false (having changed nothing) when the change is
    /// too large for loose objects; the caller then fetches a pack instead.
    fn copy_from_local(
        &self,
        source: &gix::Repository,
        mirror: &gix::Repository,
        changed: &[&BString],
        remote_refs: &HashMap<BString, ObjectId>,
    ) -> Result<bool, GitError> {
        let copy_error = |source: gix::Error| GitError::Fetch { url: self.url.clone(), message: source.to_string() };
        let mut missing = Vec::new();
        for name in changed {
            if !collect_missing(source, mirror, remote_refs[*name], &mut missing).map_err(copy_error)? {
                return Ok(false);
            }
        }
        // Children before parents: a crash leaves no object whose references are missing.
        for (kind, data) in missing {
            gix::objs::Write::write_buf(&mirror.objects, kind, &data).map_err(|error| GitError::Write {
                what: "objects copied into the mirror".into(),
                source: gix::Error::from_error(error),
            })?;
        }
        let edits = changed.iter().filter_map(|name| {
            let full_name = gix::refs::FullName::try_from((*name).clone()).ok()?;
            Some(RefEdit {
                change: Change::Update {
                    log: Default::default(),
                    expected: PreviousValue::Any,
                    new: gix::refs::Target::Object(remote_refs[*name]),
                },
                name: full_name,
                deref: false,
            })
        });
        mirror.edit_references(edits).map_err(|source| GitError::Write { what: "references".into(), source })?;
        Ok(true)
    }

    fn remote<'r>(
        &self,
        repo: &'r gix::Repository,
        refspecs: impl Iterator<Item = String>,
    ) -> Result<gix::Remote<'r>, GitError> {
        let fetch_error = |message: String| GitError::Fetch { url: self.url.clone(), message };
        repo.remote_at(self.url.as_str())
            .map_err(|e| fetch_error(e.to_string()))?
            .with_fetch_tags(gix::remote::fetch::Tags::None)
            .with_refspecs(refspecs.map(BString::from), Direction::Fetch)
            .map_err(|e| fetch_error(e.to_string()))
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

/// Most loose objects copied from a local source before a pack fetch is cheaper.
const MAX_COPIED_OBJECTS: usize = 5000;

fn is_branch_or_tag(name: &[u8]) -> bool {
    name.starts_with(b"refs/heads/") || name.starts_with(b"refs/tags/")
}

/// The branches and tags of a repository with the ids they point at (annotated tags: the
/// tag object).
fn refs_of(repo: &gix::Repository) -> Result<HashMap<BString, ObjectId>, GitError> {
    let read_error = |source| GitError::Read { what: "references".into(), source };
    let references = repo.references().map_err(read_error)?;
    let mut refs = HashMap::new();
    for reference in references.all().map_err(read_error)?.flatten() {
        let name = reference.name().as_bstr();
        if is_branch_or_tag(name)
            && let Some(id) = reference.target().try_id()
        {
            refs.insert(name.to_owned(), id.to_owned());
        }
    }
    Ok(refs)
}

/// The path of a repository on this machine, for a local path or a `file://` URL.
fn local_path(url: &str) -> Option<PathBuf> {
    match url.strip_prefix("file://") {
        Some(path) => Some(PathBuf::from(path)),
        None if url.contains("://") || url.contains('@') => None,
        None => Some(PathBuf::from(url)),
    }
}

/// Appends to `missing` every object reachable from `start` that the mirror lacks, each
/// after the objects it references (post-order). Returns false when there are more than
/// `MAX_COPIED_OBJECTS`.
fn collect_missing(
    source: &gix::Repository,
    mirror: &gix::Repository,
    start: ObjectId,
    missing: &mut Vec<(gix::object::Kind, Vec<u8>)>,
) -> Result<bool, gix::Error> {
    let mut visited = std::collections::HashSet::new();
    // (id, children pushed?)
    let mut stack = vec![(start, false)];
    while let Some((id, expanded)) = stack.pop() {
        if expanded {
            let object = source.find_object(id)?;
            missing.push((object.kind, object.data.clone()));
            if missing.len() > MAX_COPIED_OBJECTS {
                return Ok(false);
            }
            continue;
        }
        if mirror.has_object(id) || !visited.insert(id) {
            continue;
        }
        stack.push((id, true));
        let object = source.find_object(id)?;
        match object.kind {
            gix::object::Kind::Commit => {
                let commit = object.into_commit();
                stack.push((commit.tree_id()?.detach(), false));
                stack.extend(commit.parent_ids().map(|parent| (parent.detach(), false)));
            }
            gix::object::Kind::Tree => {
                let tree = object.into_tree();
                for entry in tree.iter() {
                    let entry = entry?;
                    // Submodule commits live in other repositories.
                    if !entry.mode().is_commit() {
                        stack.push((entry.object_id(), false));
                    }
                }
            }
            gix::object::Kind::Tag => stack.push((object.into_tag().target_id()?.detach(), false)),
            gix::object::Kind::Blob => {}
        }
    }
    Ok(true)
}
