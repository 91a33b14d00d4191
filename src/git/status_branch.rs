//! The status branch: an orphan branch (`gitfleet/status`) pushed to the config
//! repository's remote, with a `README.md` for people and `fleets/<fleet>.json` for tools.
//! `git log gitfleet/status` reads as the history of the fleets.
//!
//! gix cannot push, so this module runs the system `git` (see ARCHITECTURE.md). Commits are
//! made in a bare repository of their own (`<data-dir>/status.git`) with `git fast-import`,
//! one process per commit whatever the number of fleets, and pushed without force. A push
//! the remote rejects because someone else moved the branch is retried after a fetch, with
//! the unpushed commits replayed on top; the user's branches are never touched.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::git::watcher::redact_url;
use crate::status::{self, FleetStatus};

/// More unpushed commits than this are squashed into one when replayed after a rejection.
const REPLAY_AT_MOST: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum StatusBranchError {
    #[error("cannot run git: {0} (the status branch needs git installed)")]
    Spawn(std::io::Error),
    #[error("git {what} failed: {message}")]
    Git { what: String, message: String },
    #[error("cannot push the status branch to {remote}: {message}")]
    Push { remote: String, message: String },
    #[error("cannot reach {remote} for the status branch: {message}")]
    Unreachable { remote: String, message: String },
}

/// The status branch's local repository and the remote it is pushed to.
pub struct StatusBranch {
    git_dir: PathBuf,
    remote: String,
    branch: String,
}

/// What a push did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// The remote already had the local tip.
    UpToDate,
    /// The remote now has it.
    Pushed { commit: String, replayed: bool },
}

impl StatusBranch {
    /// Opens `<data_dir>/status.git`, creating it if needed. Does not touch the network.
    pub fn open(data_dir: &Path, remote: &str, branch: &str) -> Result<Self, StatusBranchError> {
        let status =
            Self { git_dir: data_dir.join("status.git"), remote: remote.to_owned(), branch: branch.to_owned() };
        if !status.git_dir.join("HEAD").exists() {
            let output = Command::new("git")
                .args(["init", "--bare", "--quiet"])
                .arg(&status.git_dir)
                .env("GIT_TERMINAL_PROMPT", "0")
                .output()
                .map_err(StatusBranchError::Spawn)?;
            status.check("init", output)?;
        }
        // Commits made for another repository are not this one's history. The remote is
        // remembered by hash: its URL may carry credentials.
        let remote_id = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(remote.as_bytes()));
        let known = status.run("config", &["config", "--get", "gitfleet.remote"]).ok();
        if known.as_deref() != Some(remote_id.as_str()) {
            for reference in [status.local_ref(), status.remote_ref()] {
                let _ = status.run("update-ref", &["update-ref", "-d", &reference]);
            }
            status.run("config", &["config", "gitfleet.remote", &remote_id])?;
        }
        Ok(status)
    }

    fn local_ref(&self) -> String {
        format!("refs/heads/{}", self.branch)
    }

    fn remote_ref(&self) -> String {
        format!("refs/remotes/origin/{}", self.branch)
    }

    fn git(&self) -> Command {
        let mut command = Command::new("git");
        command
            .env("GIT_DIR", &self.git_dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_AUTHOR_NAME", "gitfleet")
            .env("GIT_AUTHOR_EMAIL", "gitfleet@localhost")
            .env("GIT_COMMITTER_NAME", "gitfleet")
            .env("GIT_COMMITTER_EMAIL", "gitfleet@localhost")
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        command
    }

    fn run(&self, what: &str, args: &[&str]) -> Result<String, StatusBranchError> {
        let output = self.git().args(args).output().map_err(StatusBranchError::Spawn)?;
        self.check(what, output)
    }

    fn check(&self, what: &str, output: Output) -> Result<String, StatusBranchError> {
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).trim_end().to_owned());
        }
        Err(StatusBranchError::Git { what: what.to_owned(), message: last_line(&output.stderr) })
    }

    fn resolve(&self, reference: &str) -> Option<String> {
        self.run("rev-parse", &["rev-parse", "--verify", "--quiet", &format!("{reference}^{{commit}}")]).ok()
    }

    /// The local tip: the newest status commit, pushed or not.
    pub fn tip(&self) -> Option<String> {
        self.resolve(&self.local_ref())
    }

    /// Fetches the remote's status branch. `Ok(None)` when the remote has no such branch yet.
    pub fn fetch(&self) -> Result<Option<String>, StatusBranchError> {
        let unreachable = |message: String| StatusBranchError::Unreachable {
            remote: redact_url(&self.remote),
            message: redact_url(&message),
        };
        let listed = self
            .git()
            .args(["ls-remote", "--heads", &self.remote, &self.local_ref()])
            .output()
            .map_err(StatusBranchError::Spawn)?;
        if !listed.status.success() {
            return Err(unreachable(last_line(&listed.stderr)));
        }
        if listed.stdout.is_empty() {
            return Ok(None);
        }
        let refspec = format!("+{}:{}", self.local_ref(), self.remote_ref());
        let fetched = self
            .git()
            .args(["fetch", "--quiet", "--no-tags", &self.remote, &refspec])
            .output()
            .map_err(StatusBranchError::Spawn)?;
        if !fetched.status.success() {
            return Err(unreachable(last_line(&fetched.stderr)));
        }
        Ok(self.resolve(&self.remote_ref()))
    }

    /// Puts the local branch on top of `remote_tip`: taken as is when there is nothing local,
    /// left alone when it already contains it, otherwise the local-only commits are replayed
    /// on top (their trees and messages, as `git rebase` would with no conflicts possible:
    /// each commit's tree is the whole status).
    pub fn follow(&self, remote_tip: &str) -> Result<bool, StatusBranchError> {
        let Some(local) = self.tip() else {
            self.run("update-ref", &["update-ref", &self.local_ref(), remote_tip])?;
            return Ok(false);
        };
        let contained = self
            .git()
            .args(["merge-base", "--is-ancestor", remote_tip, &local])
            .status()
            .map_err(StatusBranchError::Spawn)?;
        if contained.success() {
            return Ok(false);
        }
        let listed = self.run("rev-list", &["rev-list", "--reverse", &format!("{remote_tip}..{local}")])?;
        let commits: Vec<&str> = listed.lines().collect();
        let replayed: &[&str] = if commits.len() > REPLAY_AT_MOST { &commits[commits.len() - 1..] } else { &commits };
        let mut parent = remote_tip.to_owned();
        for commit in replayed {
            let tree = self.run("rev-parse", &["rev-parse", &format!("{commit}^{{tree}}")])?;
            let message = self.run("log", &["log", "-1", "--format=%B", commit])?;
            let date = self.run("log", &["log", "-1", "--format=%ct", commit])?;
            let output = self
                .git()
                .args(["commit-tree", &tree, "-p", &parent, "-m", &message])
                .env("GIT_AUTHOR_DATE", format!("@{date} +0000"))
                .env("GIT_COMMITTER_DATE", format!("@{date} +0000"))
                .output()
                .map_err(StatusBranchError::Spawn)?;
            parent = self.check("commit-tree", output)?;
        }
        self.run("update-ref", &["update-ref", &self.local_ref(), &parent, &local])?;
        Ok(true)
    }

    /// The fleet summaries the local tip records (empty without a tip).
    pub fn recorded(&self) -> BTreeMap<String, FleetStatus> {
        let Some(tip) = self.tip() else { return BTreeMap::new() };
        let Ok(listing) = self.run("ls-tree", &["ls-tree", "--name-only", &format!("{tip}:fleets")]) else {
            return BTreeMap::new();
        };
        listing
            .lines()
            .filter(|name| name.ends_with(".json"))
            .filter_map(|name| self.run("cat-file", &["cat-file", "blob", &format!("{tip}:fleets/{name}")]).ok())
            .filter_map(|text| status::summary_of_fleet_file(&text))
            .map(|summary| (summary.fleet.clone(), summary))
            .collect()
    }

    /// Makes a new commit on the local branch whose whole tree is what `write` puts into
    /// the `Import` (the files are streamed to `git fast-import`, never held whole). Returns
    /// the commit id.
    pub fn commit(
        &self,
        message: &str,
        unix_seconds: i64,
        write: impl FnOnce(&mut Import<'_>) -> std::io::Result<()>,
    ) -> Result<String, StatusBranchError> {
        let mut child = self
            .git()
            .args(["fast-import", "--quiet", "--done"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(StatusBranchError::Spawn)?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdin);
        let written = (|| {
            writeln!(out, "commit {}", self.local_ref())?;
            writeln!(out, "committer gitfleet <gitfleet@localhost> {unix_seconds} +0000")?;
            writeln!(out, "data {}\n{message}", message.len())?;
            if let Some(parent) = self.tip() {
                writeln!(out, "from {parent}")?;
            }
            out.write_all(b"deleteall\n")?;
            write(&mut Import { out: &mut out })?;
            out.write_all(b"done\n")?;
            out.flush()
        })();
        drop(out);
        let output = child.wait_with_output().map_err(StatusBranchError::Spawn)?;
        self.check("fast-import", output)?;
        if let Err(error) = written {
            return Err(StatusBranchError::Git { what: "fast-import".into(), message: error.to_string() });
        }
        self.tip().ok_or_else(|| StatusBranchError::Git {
            what: "fast-import".into(),
            message: "the branch has no commit after the import".into(),
        })
    }

    /// Pushes the local tip without force. A rejection (the remote moved) is answered with
    /// a fetch, a replay of the local commits on top, and one more push.
    pub fn push(&self) -> Result<Pushed, StatusBranchError> {
        let Some(tip) = self.tip() else { return Ok(Pushed::UpToDate) };
        if self.resolve(&self.remote_ref()).as_deref() == Some(tip.as_str()) {
            return Ok(Pushed::UpToDate);
        }
        match self.push_once(&tip)? {
            true => Ok(Pushed::Pushed { commit: tip, replayed: false }),
            false => {
                if let Some(remote_tip) = self.fetch()? {
                    self.follow(&remote_tip)?;
                }
                let tip = self.tip().expect("the branch still has a tip");
                match self.push_once(&tip)? {
                    true => Ok(Pushed::Pushed { commit: tip, replayed: true }),
                    false => Err(StatusBranchError::Push {
                        remote: redact_url(&self.remote),
                        message: "rejected twice: the branch moves under us; will try again".into(),
                    }),
                }
            }
        }
    }

    /// One push: `Ok(true)` when accepted, `Ok(false)` when rejected as not a fast-forward.
    fn push_once(&self, tip: &str) -> Result<bool, StatusBranchError> {
        let refspec = format!("{tip}:{}", self.local_ref());
        let output = self
            .git()
            .args(["push", "--porcelain", "--quiet", &self.remote, &refspec])
            .output()
            .map_err(StatusBranchError::Spawn)?;
        if output.status.success() {
            self.run("update-ref", &["update-ref", &self.remote_ref(), tip])?;
            return Ok(true);
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        if stdout.lines().any(|line| line.starts_with('!') && line.contains("[rejected]")) {
            return Ok(false);
        }
        let message = match stdout.lines().find(|line| line.starts_with('!')) {
            Some(line) => line.rsplit('\t').next().unwrap_or(line).to_owned(),
            None => last_line(&output.stderr),
        };
        Err(StatusBranchError::Push { remote: redact_url(&self.remote), message: redact_url(&message) })
    }
}

/// What went wrong, from git's stderr: its first `fatal:` or `error:` line, else the last
/// line (hints and advice come after the cause).
fn last_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let mut lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
    let cause = lines.clone().find(|line| line.starts_with("fatal:") || line.starts_with("error:"));
    cause.or_else(|| lines.next_back()).unwrap_or("no message").to_owned()
}

/// The files of one status commit, as they are written.
pub struct Import<'a> {
    out: &'a mut dyn std::io::Write,
}

/// Ends each file in the fast-import stream. A file's content never has this line: the
/// fleet files are JSON and the README's lines are headings, tables and prose.
const END_OF_FILE: &str = "GITFLEET-END-OF-FILE-6d1f0c";

impl Import<'_> {
    /// Adds the file at `path` with what `content` writes (it should end with a newline).
    pub fn file(
        &mut self,
        path: &str,
        content: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        writeln!(self.out, "M 100644 inline {path}\ndata <<{END_OF_FILE}")?;
        content(&mut *self.out)?;
        writeln!(self.out, "{END_OF_FILE}")
    }
}

/// The files of a status commit: `README.md`, and one JSON file per fleet written by
/// `fleet_file`.
pub fn write_files(
    import: &mut Import<'_>,
    desired: &crate::repo::desired::DesiredState,
    statuses: &BTreeMap<String, FleetStatus>,
    now: i64,
    status_page: Option<&str>,
    fleet_file: &mut dyn FnMut(&FleetStatus, &mut dyn std::io::Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    import.file("README.md", |out| out.write_all(status::readme(desired, statuses, now, status_page).as_bytes()))?;
    for (fleet, fleet_status) in statuses {
        import.file(&format!("fleets/{fleet}.json"), |out| fleet_file(fleet_status, out))?;
    }
    Ok(())
}
