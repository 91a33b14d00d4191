//! `gitfleet import`: adopt a collector config that already runs somewhere as a new
//! configuration of the repository, published as its first version.
//!
//! The file is linted first; with errors nothing is written. Then it is committed alone
//! (other staged work stays staged) and tagged, with the system `git`, so that the
//! person's identity, hooks and signing settings apply. Pushing is left to the person.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::problem::Problem;
use crate::repo::{CONFIG_EXTENSIONS, MAX_CONFIG_BYTES, lint::lint, names};

#[derive(Clone, Debug, clap::Args)]
pub struct ImportArgs {
    /// The collector config to adopt: YAML, or JSON for other OpAMP agents (by its
    /// extension); `-` reads YAML from standard input.
    pub file: PathBuf,
    /// The new configuration's name: the file becomes configs/<name>.yaml.
    #[arg(long)]
    pub config: String,
    /// Its first version: the annotated tag <config>/<version>.
    #[arg(long, default_value = "v1")]
    pub version: String,
    /// The release note kept in the tag.
    #[arg(long)]
    pub note: Option<String>,
    /// Any directory inside the config repository's working tree.
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("--config: {0}")]
    BadName(String),
    #[error("--version: {0}")]
    BadVersion(String),
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is larger than {MAX_CONFIG_BYTES} bytes, the limit for a configuration")]
    TooLarge { path: String },
    #[error("the configuration has errors; nothing was written")]
    Problems(Vec<Problem>),
    #[error("{path} already exists: change it and tag a new version to publish it")]
    Exists { path: String },
    #[error("the tag {tag} already exists")]
    TagExists { tag: String },
    #[error("{}: not inside a Git working tree ({message})", .repo.display())]
    NotARepository { repo: PathBuf, message: String },
    #[error("`git {args}` failed: {message}")]
    Git { args: String, message: String },
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("committed {commit}, but `git tag` failed: {message}; tag it with `git tag --annotate {tag} {commit}`")]
    Tag { commit: String, tag: String, message: String },
}

/// What was made.
#[derive(Debug)]
pub struct Imported {
    /// `configs/<name>.<ext>`, relative to the repository.
    pub path: String,
    pub tag: String,
    pub commit: String,
    /// Lint warnings; the import went ahead.
    pub warnings: Vec<Problem>,
}

pub fn run(args: &ImportArgs) -> Result<Imported, ImportError> {
    names::check_name(&args.config).map_err(ImportError::BadName)?;
    names::check_version(&args.version).map_err(ImportError::BadVersion)?;
    let (source, body) = read_source(&args.file)?;
    let extension = match args.file.extension().and_then(|e| e.to_str()) {
        Some("json") => "json",
        Some("yml") => "yml",
        _ => "yaml",
    };
    let path = format!("configs/{}.{extension}", args.config);
    let (errors, warnings): (Vec<Problem>, Vec<Problem>) = lint(&path, &body).into_iter().partition(Problem::is_error);
    if !errors.is_empty() {
        return Err(ImportError::Problems(errors));
    }

    let top = git(&args.repo, &["rev-parse", "--show-toplevel"])
        .map_err(|error| ImportError::NotARepository { repo: args.repo.clone(), message: error.to_string() })?;
    let top = PathBuf::from(top);
    if let Some(existing) = CONFIG_EXTENSIONS
        .iter()
        .map(|extension| format!("configs/{}.{extension}", args.config))
        .find(|existing| top.join(existing).exists() || tracked(&top, existing))
    {
        return Err(ImportError::Exists { path: existing });
    }
    let tag = format!("{}/{}", args.config, args.version);
    if git(&top, &["rev-parse", "--quiet", "--verify", &format!("refs/tags/{tag}")]).is_ok() {
        return Err(ImportError::TagExists { tag });
    }

    let target = top.join(&path);
    let written = std::fs::create_dir_all(top.join("configs")).and_then(|()| std::fs::write(&target, &body));
    written.map_err(|source| ImportError::Write { path: target.display().to_string(), source })?;
    let message = format!("Import configuration {} from {source}", args.config);
    let committed = git(&top, &["add", "--", &path])
        .and_then(|_| git(&top, &["commit", "--quiet", "--message", &message, "--only", "--", &path]));
    if let Err(error) = committed {
        // Leave the working tree as it was: nothing half-done.
        let _ = git(&top, &["rm", "--cached", "--quiet", "--", &path]);
        let _ = std::fs::remove_file(&target);
        return Err(error);
    }
    let commit = git(&top, &["rev-parse", "HEAD"])?;
    let note = args.note.clone().unwrap_or_else(|| format!("Imported from {source}"));
    if let Err(error) = git(&top, &["tag", "--annotate", "--message", &note, &tag, &commit]) {
        return Err(ImportError::Tag { commit, tag, message: error.to_string() });
    }
    Ok(Imported { path, tag, commit, warnings })
}

/// The file's bytes and how to name where they came from.
fn read_source(file: &Path) -> Result<(String, Vec<u8>), ImportError> {
    use std::io::Read;
    let (name, reader): (String, Box<dyn Read>) = if file == Path::new("-") {
        ("standard input".to_owned(), Box::new(std::io::stdin()))
    } else {
        let name = file.display().to_string();
        let opened = std::fs::File::open(file).map_err(|source| ImportError::Read { path: name.clone(), source })?;
        (name, Box::new(opened))
    };
    let mut body = Vec::new();
    reader
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|source| ImportError::Read { path: name.clone(), source })?;
    if body.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ImportError::TooLarge { path: name });
    }
    Ok((name, body))
}

/// Whether `path` is in the index (a configuration deleted from the working tree but not
/// from Git still counts).
fn tracked(top: &Path, path: &str) -> bool {
    git(top, &["ls-files", "--error-unmatch", "--", path]).is_ok()
}

fn git(dir: &Path, args: &[&str]) -> Result<String, ImportError> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|error| ImportError::Git { args: args.join(" "), message: format!("cannot run git: {error}") })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(ImportError::Git { args: args.join(" "), message: stderr.trim().to_owned() });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// What to do next, for the person who ran it.
pub fn next_steps(imported: &Imported) -> String {
    let (config, version) = imported.tag.split_once('/').expect("a tag is <config>/<version>");
    let short = &imported.commit[..imported.commit.len().min(12)];
    format!(
        "Imported {path} as {tag} (commit {short}).\n\
         Publish it:   git push origin HEAD {tag}\n\
         Run it on a fleet, in fleets/<fleet>.toml:\n  config  = \"{config}\"\n  version = \"{version}\"\n",
        path = imported.path,
        tag = imported.tag,
    )
}
